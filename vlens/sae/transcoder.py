"""Transcoders: sparse dictionaries that read an MLP's input and predict its output.

A transcoder (Dunefsky et al. 2024; the building block of "Circuit Tracing", Ameisen et
al. 2025) reads `mlp_in.L` and predicts `mlp_out.L`:

    f = σ(x W_enc + b_enc)          (σ: ReLU, TopK or JumpReLU)
    ŷ = f W_dec + b_dec  [+ x W_skipᵀ for a skip transcoder]

and is trained on ‖ŷ − y‖² (y the MLP's true output) plus the architecture's sparsity
term, exactly SAE-Lens's losses with the reconstruction target swapped for y (L1 × ‖W_dec‖
for ReLU, AuxK for TopK, the L0 penalty for JumpReLU). The skip term is SAE-Lens's
`SkipTranscoder` (W_skip of shape [d_out, d_in], zero at the start).

What is SAE-Lens's and what is vlens's:

- inference: SAE-Lens's own classes, `Transcoder` (`"transcoder"`), `SkipTranscoder`
  (`"skip_transcoder"`), `JumpReLUTranscoder` (`"jumprelu_transcoder"`) and
  `JumpReLUSkipTranscoder` (`"jumprelu_skip_transcoder"`); BatchTopK transcoders end as
  JumpReLU transcoders (SAE-Lens's BatchTopK conversion). SAE-Lens 6.54 has no TopK
  transcoder, so this module registers `TopKTranscoder` (`"topk_transcoder"`,
  `"topk_skip_transcoder"`) with SAE-Lens's `register_sae_class`: those load through
  `SAE.load_from_disk` once `vlens.sae` is imported, not with SAE-Lens alone;
- training: SAE-Lens 6.54 registers transcoders for inference only, so each training class
  here is SAE-Lens's training SAE of that architecture (its encoder, sparsity loss,
  threshold or top-k bookkeeping) with `TranscoderTraining` below it in the method order: an
  output width `d_out`, the optional skip, and a training pass whose target is
  `TranscoderStepInput.target`. The fused sparse steps (`vlens.sae.fused`) take the same
  target, so ReLU and TopK transcoders train without autograd like SAEs do.

Cross-layer transcoders (one encoder per layer writing to every later layer's MLP output)
are not built: a run here has one input site and one output site, and a cross-layer
transcoder's loss couples the outputs of all layers, which the one-run-one-buffer design of
`vlens.sae.train_many` does not share cheaply.

    >>> import torch
    >>> tc = training_transcoder("topk", d_in=8, d_out=6, d_sae=32, k=4, skip=True)
    >>> type(tc).__name__, tuple(tc.W_dec.shape), tuple(tc.W_skip.shape)
    ('TopKTranscoderTraining', (32, 6), (6, 8))
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from jaxtyping import Float
from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
from sae_lens.saes import (
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from sae_lens.saes.sae import SAEConfig, TrainingSAE, TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import TopK
from sae_lens.saes.transcoder import (
    JumpReLUSkipTranscoderConfig,
    JumpReLUTranscoderConfig,
    SkipTranscoder,
    SkipTranscoderConfig,
    Transcoder,
    TranscoderConfig,
)
from torch import Tensor, nn
from typing_extensions import override

from ..errors import InputError

__all__ = [
    "TopKTranscoder", "TopKTranscoderConfig", "TopKSkipTranscoder", "TopKSkipTranscoderConfig",
    "TranscoderStepInput", "TranscoderTraining", "TRANSCODER_ARCHITECTURES", "training_transcoder",
    "is_transcoder", "transcoder_specs",
]


# -- inference: the TopK transcoder SAE-Lens 6.54 lacks ----------------------------------------


@dataclass
class TopKTranscoderConfig(TranscoderConfig):
    """SAE-Lens `TranscoderConfig` with a TopK activation (`k` latents per token).

    Example:
        >>> TopKTranscoderConfig(d_in=8, d_sae=16, d_out=8, k=2).architecture()
        'topk_transcoder'
    """

    k: int = 32
    apply_b_dec_to_input: bool = False  # SAE-Lens refuses True for transcoders; its default is True

    @override
    @classmethod
    def architecture(cls) -> str:
        return "topk_transcoder"


class TopKTranscoder(Transcoder):
    """SAE-Lens `Transcoder` whose activation is SAE-Lens's `TopK` (decoder rows of unit norm, as vlens exports them).

    Example:
        >>> import torch
        >>> tc = TopKTranscoder(TopKTranscoderConfig(d_in=8, d_sae=16, d_out=4, k=2))
        >>> int((tc.encode(torch.randn(3, 8)) != 0).sum(-1).max()) <= 2
        True
    """

    cfg: TopKTranscoderConfig  # type: ignore[assignment]

    @override
    def get_activation_fn(self) -> Any:
        return TopK(self.cfg.k)


@dataclass
class TopKSkipTranscoderConfig(TopKTranscoderConfig):
    """`TopKTranscoderConfig` with SAE-Lens's skip connection.

    Example:
        >>> TopKSkipTranscoderConfig(d_in=8, d_sae=16, d_out=8, k=2).architecture()
        'topk_skip_transcoder'
    """

    @override
    @classmethod
    def architecture(cls) -> str:
        return "topk_skip_transcoder"


class TopKSkipTranscoder(TopKTranscoder, SkipTranscoder):
    """A TopK transcoder with SAE-Lens's `SkipTranscoder` forward (`+ x W_skipᵀ`).

    Example:
        >>> import torch
        >>> tc = TopKSkipTranscoder(TopKSkipTranscoderConfig(d_in=8, d_sae=16, d_out=4, k=2))
        >>> tuple(tc.W_skip.shape), tuple(tc(torch.randn(3, 8)).shape)
        ((4, 8), (3, 4))
    """

    cfg: TopKSkipTranscoderConfig  # type: ignore[assignment]


def _register() -> None:
    """Register the TopK transcoders with SAE-Lens (idempotent)."""
    for name, cls, cfg in (("topk_transcoder", TopKTranscoder, TopKTranscoderConfig),
                           ("topk_skip_transcoder", TopKSkipTranscoder, TopKSkipTranscoderConfig)):
        if name not in SAE_CLASS_REGISTRY:
            register_sae_class(name, cls, cfg)


_register()


def is_transcoder(sae: Any) -> bool:
    """Whether `sae` is a transcoder (reads one site, writes another: SAE-Lens's `Transcoder` family or a training one).

    Example:
        >>> from sae_lens.saes import StandardSAE, StandardSAEConfig
        >>> is_transcoder(StandardSAE(StandardSAEConfig(d_in=4, d_sae=8))), is_transcoder(training_transcoder(
        ...     "standard", d_in=4, d_out=4, d_sae=8))
        (False, True)
    """
    return isinstance(sae, (Transcoder, TranscoderTraining))


# -- training ----------------------------------------------------------------------------------


@dataclass
class TranscoderStepInput(TrainStepInput):
    """SAE-Lens's `TrainStepInput` plus the target the transcoder predicts (the MLP's output rows)."""

    target: Tensor | None = None


class TranscoderTraining(TrainingSAE):
    """What turns an SAE-Lens training SAE into a transcoder: `d_out`, the optional skip, the training target.

    Sits just above `TrainingSAE` in the method order of each training class below, so the
    architecture's own steps (JumpReLU's threshold projection, BatchTopK's threshold update)
    still run around this training pass.
    """

    def __init__(self, cfg: Any, use_error_term: bool = False) -> None:
        super().__init__(cfg, use_error_term)
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(cfg.d_out, cfg.d_in, dtype=self.dtype, device=self.device))

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        d_out = self.cfg.d_out
        if d_out != self.cfg.d_in:  # the decoder writes the output width
            w = torch.empty(self.cfg.d_sae, d_out, dtype=self.dtype, device=self.device)
            nn.init.kaiming_uniform_(w)
            if self.cfg.decoder_init_norm is not None:
                w = w / w.norm(dim=-1, keepdim=True) * self.cfg.decoder_init_norm
            self.W_dec = nn.Parameter(w)
            self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=self.dtype, device=self.device))

    @override
    def process_sae_in(self, sae_in: Tensor) -> Tensor:
        """SAE-Lens's `Transcoder.process_sae_in`: no b_dec on the input (it lives in the output space)."""
        return Transcoder.process_sae_in(self, sae_in)  # type: ignore[arg-type]

    def skip_out(self, x: Float[Tensor, "batch d_in"]) -> Tensor | float:
        """The skip term `x W_skipᵀ` (SAE-Lens's `SkipTranscoder.forward`), 0 without a skip."""
        w = getattr(self, "W_skip", None)
        return 0.0 if w is None else x @ w.T

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x)) + self.skip_out(x)

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """SAE-Lens's training pass with the target in place of the input (the input when no target is given)."""
        target = getattr(step_input, "target", None)
        target = step_input.sae_in if target is None else target
        feature_acts, hidden_pre = self.encode_with_hidden_pre(step_input.sae_in)
        sae_out = self.decode(feature_acts) + self.skip_out(step_input.sae_in)
        mse_loss = self.mse_loss_fn(sae_out, target).sum(dim=-1).mean()
        # the auxiliary losses read the reconstruction target as `sae_in` (TopK's AuxK residual)
        aux = self.calculate_aux_loss(step_input=replace(step_input, sae_in=target), feature_acts=feature_acts,
                                      hidden_pre=hidden_pre, sae_out=sae_out)
        losses = {"mse_loss": mse_loss, **aux}
        return TrainStepOutput(sae_in=step_input.sae_in, sae_out=sae_out, feature_acts=feature_acts,
                               hidden_pre=hidden_pre, loss=sum(losses.values()), losses=losses)


def _inference_config(cfg: Any, plain: type[SAEConfig], skip: type[SAEConfig]) -> type[SAEConfig]:
    return skip if cfg.skip else plain


@dataclass
class StandardTranscoderTrainingConfig(StandardTrainingSAEConfig):
    """SAE-Lens's standard (ReLU, L1 × ‖W_dec‖) training config with an output width and an optional skip."""

    d_out: int = 0
    skip: bool = False

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        return _inference_config(self, TranscoderConfig, SkipTranscoderConfig)


class StandardTranscoderTraining(StandardTrainingSAE, TranscoderTraining):
    """A ReLU transcoder in training: ends as SAE-Lens's `Transcoder` / `SkipTranscoder`."""


@dataclass
class TopKTranscoderTrainingConfig(TopKTrainingSAEConfig):
    """SAE-Lens's TopK training config (AuxK on dead latents) with an output width and an optional skip."""

    d_out: int = 0
    skip: bool = False

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        return _inference_config(self, TopKTranscoderConfig, TopKSkipTranscoderConfig)


class TopKTranscoderTraining(TopKTrainingSAE, TranscoderTraining):
    """A TopK transcoder in training: ends as `TopKTranscoder` (decoder norms folded in, SAE-Lens's step)."""

    forward = TranscoderTraining.forward  # TopKTrainingSAE's own forward has no skip term


@dataclass
class BatchTopKTranscoderTrainingConfig(BatchTopKTrainingSAEConfig):
    """SAE-Lens's BatchTopK training config with an output width and an optional skip."""

    d_out: int = 0
    skip: bool = False

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        return _inference_config(self, JumpReLUTranscoderConfig, JumpReLUSkipTranscoderConfig)


class BatchTopKTranscoderTraining(BatchTopKTrainingSAE, TranscoderTraining):
    """A BatchTopK transcoder in training: ends as SAE-Lens's `JumpReLUTranscoder` (its learnt global threshold)."""

    forward = TranscoderTraining.forward


@dataclass
class JumpReLUTranscoderTrainingConfig(JumpReLUTrainingSAEConfig):
    """SAE-Lens's JumpReLU training config (L0 penalty, straight-through threshold) with `d_out` and a skip."""

    d_out: int = 0
    skip: bool = False

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        return _inference_config(self, JumpReLUTranscoderConfig, JumpReLUSkipTranscoderConfig)


class JumpReLUTranscoderTraining(JumpReLUTrainingSAE, TranscoderTraining):
    """A JumpReLU transcoder in training: ends as SAE-Lens's `JumpReLUTranscoder` / `JumpReLUSkipTranscoder`."""


#: Training architecture → (training class, its config class).
TRANSCODER_ARCHITECTURES: dict[str, tuple[type[TrainingSAE], type[Any]]] = {
    "standard": (StandardTranscoderTraining, StandardTranscoderTrainingConfig),
    "topk": (TopKTranscoderTraining, TopKTranscoderTrainingConfig),
    "batchtopk": (BatchTopKTranscoderTraining, BatchTopKTranscoderTrainingConfig),
    "jumprelu": (JumpReLUTranscoderTraining, JumpReLUTranscoderTrainingConfig),
}


def training_transcoder(architecture: str, /, **fields_: Any) -> TrainingSAE:
    """A transcoder training SAE of `architecture` ('standard', 'topk', 'batchtopk', 'jumprelu') from config fields.

    Fields are those of the SAE-Lens training config (`d_in`, `d_sae`, `k`, ...) plus `d_out`
    (0: `d_in`) and `skip`; `apply_b_dec_to_input` is always False (b_dec lives in the output space).

    Example:
        >>> tc = training_transcoder("jumprelu", d_in=8, d_sae=16)
        >>> tc.cfg.d_out, tc.cfg.get_inference_config_class().architecture()
        (8, 'jumprelu_transcoder')
    """
    if architecture not in TRANSCODER_ARCHITECTURES:
        raise InputError(f"no transcoder of architecture {architecture!r}: use one of {sorted(TRANSCODER_ARCHITECTURES)}")
    cls, cfg_cls = TRANSCODER_ARCHITECTURES[architecture]
    names = {f.name for f in fields(cfg_cls)}
    kwargs = {k: v for k, v in fields_.items() if k in names}
    kwargs["apply_b_dec_to_input"] = False
    kwargs["d_out"] = int(kwargs.get("d_out") or kwargs["d_in"])
    return cls(cfg_cls(**kwargs))


def transcoder_specs(vlm: Any, preset: str = "topk", layers: Any = None, *, skip: bool = False,
                     **fields_: Any) -> dict[str, dict[str, Any]]:
    """`vlens.sae.train_many` specs of one transcoder per layer, `mlp_in.L` → `mlp_out.L`, named `transcoder.L`.

    `layers`: an int, a list of ints, or None (every layer of the language model). `fields_`
    go into every spec (`k`, `d_sae`, `lr`, ...).

    Example:
        >>> import vlens
        >>> specs = transcoder_specs(vlens.tiny(), "jumprelu", [0, 2], skip=True, d_sae=64)
        >>> specs["transcoder.2"]
        {'site': 'mlp_in.2', 'target': 'mlp_out.2', 'preset': 'jumprelu', 'skip': True, 'd_sae': 64}
    """
    if layers is None:
        layers = range(vlm.n_layers)
    elif isinstance(layers, int):
        layers = [layers]
    out = {}
    for layer in layers:
        i = int(layer) % vlm.n_layers if int(layer) < 0 else int(layer)
        out[f"transcoder.{i}"] = {"site": f"mlp_in.{i}", "target": f"mlp_out.{i}", "preset": preset, "skip": skip,
                                  **fields_}
    return out
