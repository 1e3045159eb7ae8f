"""Training configuration: what the SAE is (`ArchitectureConfig`) and how it is trained (`TrainerConfig`).

`TrainConfig` pairs the two (`cfg.sae`, `cfg.trainer`, as SAE-Lens's runner config pairs
its `sae` config with trainer fields); `PRESETS` holds the paper's recipe and the modern
SAE-Lens architectures. Flat field names still read (`cfg.lr`, `cfg.d_sae`) and
`TrainConfig.preset(name, **fields)` / `cfg.replace(**fields)` route each field to its
half. Checkpoints and `sae.cfg.metadata.vlens_training["config"]` store the flat dict of
`cfg.to_dict()`, the format of vlens 0.1, so old checkpoints resume and compare.

Why vlens keeps its own schedules rather than SAE-Lens's `get_lr_scheduler` and
`CoefficientScheduler`: the shapes are the same (linear warm-up, constant, linear decay to
0; linear coefficient warm-up from λ/W), but SAE-Lens's chained `LinearLR` updates the
learning rate recursively and `CoefficientScheduler` multiplies in another order, so
their values differ from the closed forms below in the last bits at a fraction of the
steps (measured: 196 of 1000 lr values, up to 3.6e-15 relative; 13 of 1000 coefficient
values). Closed forms of the step number also make a resumed run bit-identical without
saving scheduler state (`tests/test_sae.py::test_schedules_match_sae_lens_to_rounding`).

Both schedules advance once per optimiser step by default. The paper's code advances them
once per data chunk (an "epoch": 200 conversations harvested, shuffled into the buffer, then
as many optimiser steps as half the buffer holds, a number that varies from chunk to
chunk); vlens's data have no chunks, so by default its schedules are the same closed forms
in the step number, which is what the chunk-wise steps approximate (the same shape: λ
linear from 0 over the first 5%, lr constant for 80% then linear to 0).
`steps_per_chunk=n` gives the paper's unit: the closed forms are evaluated at the chunk
number `step // n` over `ceil(total_steps / n)` chunks, so λ and the lr change once every
n optimiser steps (a fixed n: the paper's varying count per chunk is not reproduced). The
paper's λ warm-up starts at 0 (`coefficient_warmup_from_zero`, the paper preset) where
SAE-Lens's starts at λ/W.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import SAEMetadata, TrainingSAE

from ...errors import InputError
from .. import standard as _standard  # noqa: F401  (registers "vlens_paper" with SAE-Lens)
from ..fused import has_fused_step
from ..transcoder import TRANSCODER_ARCHITECTURES, training_transcoder

TRAINING_ARCHITECTURES = ("vlens_paper", "standard", "topk", "batchtopk", "jumprelu")


@dataclass
class ArchitectureConfig:
    """What the SAE is: its SAE-Lens training architecture, sizes and initialisation.

    Example:
        >>> ArchitectureConfig("topk", d_in=64, d_sae=512, k=16).k
        16
    """

    architecture: str = "vlens_paper"
    d_in: int = 0
    d_sae: int = 0
    k: float = 32
    jumprelu_init_threshold: float = 0.01
    apply_b_dec_to_input: bool = False
    decoder_init_norm: float = 0.1
    #: `vlens_paper` only: the decoder norms that weight the L1 penalty are constants for the
    #: gradient, as the paper's code reads them (`fc2.weight.data`); False is SAE-Lens's form
    #: (the penalty's gradient reaches W_dec through its norms). See `vlens.sae.standard`.
    detach_decoder_norm: bool = True
    #: a transcoder (`vlens.sae.transcoder`): reads one site, predicts another of width `d_out`
    #: (0: d_in), with SAE-Lens's skip connection when `skip`. Left out of `to_dict` for SAEs.
    transcoder: bool = False
    skip: bool = False
    d_out: int = 0


@dataclass
class TrainerConfig:
    """How the SAE is trained: length, batch, optimiser and schedules, loss coefficients, data handling.

    Example:
        >>> t = TrainerConfig(total_steps=1000)
        >>> t.lr_at(0), round(t.lr_at(999), 12)
        (5e-05, 2.5e-07)
    """

    batch_size: int = 4096
    total_steps: int = 0
    lr: float = 5e-5
    lr_warmup_steps: int = 0
    lr_decay_frac: float = 0.2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0
    l1_coefficient: float = 5.0
    coefficient_warmup_frac: float = 0.05
    coefficient_warmup_from_zero: bool = True
    aux_loss_coefficient: float = 1.0 / 32
    l0_coefficient: float = 1.0
    jumprelu_bandwidth: float = 0.05
    normalize: bool = True
    n_norm_batches: int = 16
    dead_window_tokens: int = 1_000_000
    seed: int = 0
    shuffle: bool = True
    fused: bool = True
    #: The schedules' unit: 0 advances λ and the lr once per optimiser step; n >= 1 once per
    #: chunk of n optimiser steps (the paper's code steps both once per data chunk).
    steps_per_chunk: int = 0
    #: With `normalize`: "fixed" multiplies every batch by one factor, √d_in / the mean norm of
    #: `n_norm_batches · batch_size` rows, estimated before the first step; "running" by √d_in /
    #: the mean norm of every row read so far, refreshed at each chunk (`steps_per_chunk`, or
    #: every step) with that chunk's rows read ahead: the paper's drifting `64 / (normsum / cnt)`.
    scale_mode: str = "fixed"

    def schedule_position(self, step: int) -> tuple[int, int]:
        """(position, length) of optimiser step `step` in the schedules' unit: steps, or chunks of `steps_per_chunk`.

        Example:
            >>> TrainerConfig(total_steps=10).schedule_position(7), TrainerConfig(total_steps=10, steps_per_chunk=4).schedule_position(7)
            ((7, 10), (1, 3))
        """
        n = self.steps_per_chunk
        if n <= 0:
            return step, self.total_steps
        return step // n, -(-self.total_steps // n)

    def lr_at(self, step: int) -> float:
        """Learning rate at `step`: linear warm-up, constant, then linear decay to 0 over the last `lr_decay_frac`.

        With `steps_per_chunk` the warm-up and decay count chunks, not steps.
        """
        lr = self.lr
        i, total = self.schedule_position(step)
        if self.lr_warmup_steps and i < self.lr_warmup_steps:
            lr *= (i + 1) / self.lr_warmup_steps
        decay_steps = int(round(self.lr_decay_frac * total))
        start = total - decay_steps
        if decay_steps > 0 and i >= start:
            lr *= (total - i) / decay_steps
        return lr


_ARCH_FIELDS = tuple(f.name for f in fields(ArchitectureConfig))
_TRAINER_FIELDS = tuple(f.name for f in fields(TrainerConfig))
#: Every field name, in the order of vlens 0.1's flat `TrainConfig` (the checkpoint format).
FIELDS = (
    "architecture", "d_in", "d_sae", "batch_size", "total_steps", "lr", "lr_warmup_steps", "lr_decay_frac",
    "adam_beta1", "adam_beta2", "grad_clip", "l1_coefficient", "coefficient_warmup_frac", "k", "aux_loss_coefficient",
    "l0_coefficient", "jumprelu_init_threshold", "jumprelu_bandwidth", "apply_b_dec_to_input", "decoder_init_norm",
    "normalize", "n_norm_batches", "dead_window_tokens", "seed", "shuffle", "fused",
    # added in vlens 0.3 (issue 23): which loss trained the SAE. A checkpoint without them was
    # trained with `LEGACY_LOSS` (`vlens.sae.training.resume` resumes it with that loss).
    "detach_decoder_norm", "coefficient_warmup_from_zero",
    # added with the reproduction options (issue 23); absent in older checkpoints: the default
    "steps_per_chunk", "scale_mode",
    # added in vlens 0.4 (issue 25): transcoders; written only for transcoders (`TrainConfig.to_dict`)
    "transcoder", "skip", "d_out",
)
TRANSCODER_FIELDS = ("transcoder", "skip", "d_out")
#: The loss fields' values of checkpoints written before they existed (SAE-Lens's penalty
#: gradient through the decoder norms, λ warmed up from λ/W).
LEGACY_LOSS = {"detach_decoder_norm": False, "coefficient_warmup_from_zero": False}
#: Reproduction options added later, with the values every run before them used: a saved
#: config without them means these (a checkpoint resumes, `from_dict` reads it).
ADDED_LATER = {"steps_per_chunk": 0, "scale_mode": "fixed"}
if set(FIELDS) != set(_ARCH_FIELDS) | set(_TRAINER_FIELDS):  # pragma: no cover - a field added to one list only
    raise RuntimeError("vlens bug: FIELDS and the two config dataclasses disagree")


def _check_names(names: Any) -> None:
    bad = sorted(set(names) - set(FIELDS))
    if bad:
        raise InputError(f"unknown training option(s) {bad}; valid: {sorted(FIELDS)}")


@dataclass(init=False)
class TrainConfig:
    """A training run: `sae` (an `ArchitectureConfig`) and `trainer` (a `TrainerConfig`).

    Build one from a preset (`TrainConfig.preset("paper", d_sae=4096, lr=1e-4)`) or from
    the two halves (`TrainConfig(sae=ArchitectureConfig(...), trainer=TrainerConfig(...))`).
    Flat names read through (`cfg.lr` is `cfg.trainer.lr`).

    Example:
        >>> cfg = TrainConfig.preset("paper", d_in=64, d_sae=512, total_steps=1000)
        >>> cfg.lr, cfg.l1_coefficient, cfg.lr_at(0), round(cfg.lr_at(999), 12), cfg.coefficient_at(0)
        (5e-05, 5.0, 5e-05, 2.5e-07, 0.0)
        >>> cfg.sae.d_sae, cfg.trainer.total_steps
        (512, 1000)
    """

    sae: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def __init__(self, sae: ArchitectureConfig | None = None, trainer: TrainerConfig | None = None) -> None:
        object.__setattr__(self, "sae", sae if sae is not None else ArchitectureConfig())
        object.__setattr__(self, "trainer", trainer if trainer is not None else TrainerConfig())

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("sae", "trainer"):
            raise AttributeError(name)
        if name in _ARCH_FIELDS:
            return getattr(self.sae, name)
        if name in _TRAINER_FIELDS or name == "lr_at":
            return getattr(self.trainer, name)
        raise AttributeError(f"{type(self).__name__!r} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _ARCH_FIELDS:
            setattr(self.sae, name, value)
        elif name in _TRAINER_FIELDS:
            setattr(self.trainer, name, value)
        else:
            object.__setattr__(self, name, value)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "TrainConfig":
        """A preset by name ('paper', 'standard', 'topk', 'batchtopk', 'jumprelu') with flat-field overrides."""
        if name not in PRESETS:
            raise InputError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
        return PRESETS[name].replace(**overrides)

    def replace(self, **overrides: Any) -> "TrainConfig":
        """A copy with flat fields replaced, each routed to `sae` or `trainer`."""
        _check_names(overrides)
        arch = {k: v for k, v in overrides.items() if k in _ARCH_FIELDS}
        trainer = {k: v for k, v in overrides.items() if k in _TRAINER_FIELDS}
        return TrainConfig(sae=replace(self.sae, **arch), trainer=replace(self.trainer, **trainer))

    def to_dict(self) -> dict[str, Any]:
        """The flat dict of every field (vlens 0.1's format: checkpoints, `vlens_training` metadata)."""
        both = {**asdict(self.sae), **asdict(self.trainer)}
        return {k: both[k] for k in FIELDS if self.sae.transcoder or k not in TRANSCODER_FIELDS}

    @classmethod
    def from_dict(cls, flat: dict[str, Any]) -> "TrainConfig":
        """Inverse of `to_dict` (unknown keys refused; a dict without the loss fields, written
        before they existed, gets `LEGACY_LOSS`, the loss it was trained with)."""
        _check_names(flat)
        flat = {**ADDED_LATER, **{k: v for k, v in LEGACY_LOSS.items() if k not in flat}, **flat}
        return TrainConfig(sae=ArchitectureConfig(**{k: v for k, v in flat.items() if k in _ARCH_FIELDS}),
                           trainer=TrainerConfig(**{k: v for k, v in flat.items() if k in _TRAINER_FIELDS}))

    @property
    def loss(self) -> str:
        """Which loss trains the SAE, in words (recorded in exports: `vlens_training["loss"]`).

        Example:
            >>> TrainConfig.preset("paper").loss
            'paper code: L1 weighted by detached decoder norms, lambda warmed up from 0'
            >>> TrainConfig.preset("standard").loss
            'SAE-Lens standard: L1 weighted by decoder norms (gradient through them), lambda warmed up from lambda/W'
        """
        a, t = self.sae, self.trainer
        warm = "lambda warmed up from 0" if t.coefficient_warmup_from_zero else "lambda warmed up from lambda/W"
        if a.architecture == "vlens_paper" and a.detach_decoder_norm:
            return f"paper code: L1 weighted by detached decoder norms, {warm}"
        if a.architecture in ("vlens_paper", "standard"):
            return f"SAE-Lens standard: L1 weighted by decoder norms (gradient through them), {warm}"
        return f"SAE-Lens {a.architecture}"

    def coefficient_at(self, step: int) -> float:
        """Sparsity coefficient (λ for L1, or the L0 coefficient of JumpReLU) at optimiser step `step`.

        Warmed up linearly over W = `coefficient_warmup_frac` · total_steps steps: from 0
        (λ·step/W, the paper's `np.arange(0, λ, λ/W)`) with `coefficient_warmup_from_zero`,
        else from λ/W (λ·(step+1)/W with W rounded, SAE-Lens's `CoefficientScheduler`).

        Example:
            >>> cfg = TrainConfig.preset("paper", total_steps=100)
            >>> [cfg.coefficient_at(s) for s in (0, 1, 4, 5)]
            [0.0, 1.0, 4.0, 5.0]
            >>> cfg.replace(coefficient_warmup_from_zero=False).coefficient_at(0)
            1.0
        """
        t = self.trainer
        final = t.l0_coefficient if self.sae.architecture == "jumprelu" else t.l1_coefficient
        step, total = t.schedule_position(step)  # with steps_per_chunk: the chunk number and count
        if t.coefficient_warmup_from_zero:
            warm_steps = t.coefficient_warmup_frac * total
            return final * min(step / warm_steps, 1.0) if warm_steps > 0 else final
        warm = int(round(t.coefficient_warmup_frac * total))
        if warm > 0 and step < warm:
            return final * (step + 1) / warm
        return final

    def check(self) -> "TrainConfig":
        """Refuse values no run can use (sizes, lengths, rates out of range), naming each field; return self.

        Example:
            >>> TrainConfig.preset("topk", d_in=8, d_sae=16, k=32, total_steps=10).check()
            Traceback (most recent call last):
            ...
            vlens.errors.InputError: bad training option(s): k=32 (topk keeps k latents of d_sae=16: need 1 <= k <= d_sae)
        """
        a, t = self.sae, self.trainer

        def count(v: Any, low: int) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= low

        def real(v: Any, low: float, high: float = math.inf, open_low: bool = False) -> bool:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            return ok and (v > low if open_low else v >= low) and v <= high

        rules = [
            ("d_in", count(a.d_in, 1), "the activation width, >= 1"),
            ("d_sae", count(a.d_sae, 1), "the number of latents, >= 1"),
            ("batch_size", count(t.batch_size, 1), "rows per step, >= 1"),
            ("total_steps", count(t.total_steps, 1), "steps=, n_tokens= or epochs= must give at least one step"),
            ("lr", real(t.lr, 0.0, open_low=True), "a learning rate > 0"),
            ("lr_warmup_steps", count(t.lr_warmup_steps, 0), ">= 0"),
            ("lr_decay_frac", real(t.lr_decay_frac, 0.0, 1.0), "a fraction in [0, 1]"),
            ("coefficient_warmup_frac", real(t.coefficient_warmup_frac, 0.0, 1.0), "a fraction in [0, 1]"),
            ("adam_beta1", real(t.adam_beta1, 0.0, 1.0) and t.adam_beta1 < 1, "in [0, 1)"),
            ("adam_beta2", real(t.adam_beta2, 0.0, 1.0) and t.adam_beta2 < 1, "in [0, 1)"),
            ("grad_clip", real(t.grad_clip, 0.0), ">= 0 (0 turns clipping off)"),
            ("l1_coefficient", real(t.l1_coefficient, 0.0), ">= 0"),
            ("l0_coefficient", real(t.l0_coefficient, 0.0), ">= 0"),
            ("n_norm_batches", count(t.n_norm_batches, 1), ">= 1"),
            ("steps_per_chunk", count(t.steps_per_chunk, 0), ">= 0 (0: the schedules advance every optimiser step)"),
            ("scale_mode", t.scale_mode in ("fixed", "running") and (t.normalize or t.scale_mode == "fixed"),
             "'fixed' or 'running' ('running' rescales inputs, so it needs normalize=True)"),
            ("dead_window_tokens", count(t.dead_window_tokens, 1), ">= 1"),
            ("decoder_init_norm", real(a.decoder_init_norm, 0.0, open_low=True), "> 0"),
        ]
        if a.detach_decoder_norm and a.architecture != "vlens_paper":
            rules.append(("detach_decoder_norm", False, "only the vlens_paper architecture detaches the decoder norms "
                          "in its penalty (the paper's code); use architecture='vlens_paper' or False"))
        if a.transcoder:
            rules += [("architecture", a.architecture in TRANSCODER_ARCHITECTURES,
                       f"transcoders train as {', '.join(TRANSCODER_ARCHITECTURES)}"),
                      ("apply_b_dec_to_input", not a.apply_b_dec_to_input,
                       "a transcoder's b_dec lives in the output space: set it False"),
                      ("d_out", count(a.d_out, 0), "the output width (0: d_in)")]
        elif a.skip:
            rules.append(("skip", False, "only transcoders have a skip connection (transcoder=True)"))
        if a.architecture == "jumprelu":
            rules += [("jumprelu_init_threshold", real(a.jumprelu_init_threshold, 0.0, open_low=True), "> 0"),
                      ("jumprelu_bandwidth", real(t.jumprelu_bandwidth, 0.0, open_low=True), "> 0")]
        if a.architecture in ("topk", "batchtopk"):
            ok = real(a.k, 1.0) and (a.k <= a.d_sae if count(a.d_sae, 1) else True)
            rules.append(("k", ok, f"{a.architecture} keeps k latents of d_sae={a.d_sae}: need 1 <= k <= d_sae"))
        bad = [f"{name}={getattr(self, name)!r} ({why})" for name, ok, why in rules if not ok]
        if bad:
            raise InputError("bad training option(s): " + "; ".join(bad))
        return self

    @property
    def uses_fused_step(self) -> bool:
        """Whether training runs a fused step (`vlens.sae.fused`: standard / paper, TopK with k ≤ d_sae/16)."""
        return self.trainer.fused and has_fused_step(self.sae.architecture, self.sae.d_sae, self.sae.k)


def _preset(arch: dict[str, Any], trainer: dict[str, Any]) -> TrainConfig:
    return TrainConfig(sae=ArchitectureConfig(**arch), trainer=TrainerConfig(**trainer))


_SAE_LENS = (dict(detach_decoder_norm=False), dict(coefficient_warmup_from_zero=False))  # SAE-Lens's loss forms

PRESETS: dict[str, TrainConfig] = {
    "paper": _preset({}, {}),
    "standard": _preset(dict(architecture="standard", apply_b_dec_to_input=True, **_SAE_LENS[0]),
                        dict(lr=3e-4, l1_coefficient=1.0, coefficient_warmup_frac=0.0, normalize=False,
                             **_SAE_LENS[1])),
    # TopK: SAE-Lens's trainer defaults (constant lr, raw activations). Measured on the toy's
    # activations (benchmarks/sae_quality_toy.py, 400 steps): the 20% lr decay and the √d
    # input scaling each cost held-out EV at small k (k = 1: 0.591 with both, 0.636 without).
    "topk": _preset(dict(architecture="topk", k=32, apply_b_dec_to_input=True, **_SAE_LENS[0]),
                    dict(lr=3e-4, coefficient_warmup_frac=0.0, lr_decay_frac=0.0, normalize=False, **_SAE_LENS[1])),
    "batchtopk": _preset(dict(architecture="batchtopk", k=32, apply_b_dec_to_input=True, **_SAE_LENS[0]),
                         dict(lr=3e-4, coefficient_warmup_frac=0.0, lr_decay_frac=0.0, normalize=False,
                              **_SAE_LENS[1])),
    "jumprelu": _preset(dict(architecture="jumprelu", apply_b_dec_to_input=True, **_SAE_LENS[0]),
                        dict(lr=3e-4, l0_coefficient=1.0, **_SAE_LENS[1])),
}
"""The presets of `vlens.sae.train` (see `vlens.sae.training`)."""


def make_training_sae(cfg: TrainConfig, metadata: dict[str, Any] | None = None) -> TrainingSAE:
    """The SAE-Lens training SAE for `cfg`, initialised deterministically from `cfg.trainer.seed`.

    Example:
        >>> sae = make_training_sae(TrainConfig.preset("topk", d_in=8, d_sae=32, k=4))
        >>> type(sae).__name__, sae.cfg.k
        ('TopKTrainingSAE', 4)
    """
    arch = cfg.sae.architecture
    if cfg.sae.transcoder:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.trainer.seed)
            k = int(cfg.sae.k) if arch == "topk" else cfg.sae.k
            return training_transcoder(arch, **{**cfg.to_dict(), "k": k},
                                       metadata=SAEMetadata(**(metadata or {})))
    if arch not in TRAINING_ARCHITECTURES:
        raise InputError(f"unknown architecture {arch!r}: use one of {TRAINING_ARCHITECTURES}")
    sae_cls, cfg_cls = get_sae_training_class(arch)
    names = {f.name for f in fields(cfg_cls)}
    kwargs = {k: v for k, v in cfg.to_dict().items() if k in names and k != "metadata"}
    if "k" in names and arch == "topk":
        kwargs["k"] = int(cfg.sae.k)
    sae_cfg = cfg_cls(**kwargs)
    sae_cfg.metadata = SAEMetadata(**(metadata or {}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.trainer.seed)
        return sae_cls(sae_cfg)
