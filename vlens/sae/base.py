"""Multimodal SAE classes: SAE-Lens architectures that carry per-latent modality statistics.

A vlens SAE *is* an SAE-Lens SAE (`isinstance(sae, sae_lens.SAE)`): the
inference classes below subclass SAE-Lens's `StandardSAE`, `TopKSAE` and
`JumpReLUSAE` without changing their maths, so `encode` / `decode` / `forward`
are SAE-Lens's own, and an exported vlens SAE loads in plain SAE-Lens. What
they add is `sae.modality`: a `ModalityStats` with, for every latent, its firing
frequency and mean activation on image tokens and on text tokens, and the
modality score derived from them (see `ModalityStats.score`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from jaxtyping import Bool, Float
from sae_lens import SAE
from sae_lens.saes import JumpReLUSAE, StandardSAE, TopKSAE
from torch import Tensor

IMAGE, TEXT = 1, 0
"""Modality codes used everywhere in `vlens.sae`: 1 = image token, 0 = text token."""

DEFAULT_SHARED = (0.2, 0.8)
"""A latent is *shared* when its modality score lies in this closed interval."""


@dataclass
class ModalityStats:
    """Per-latent statistics of an SAE on image tokens and on text tokens.

    For latent i, over a set of tokens of known modality:

    - `freq_image[i]`: fraction of image tokens on which f_i > 0 (same for `freq_text`);
    - `mean_image[i]`: mean of f_i over *all* image tokens, zeros included (same for `mean_text`);
    - `score[i]` = mean_image / (mean_image + mean_text): the image share of the latent's
      activation mass after normalising by token counts. 1 = fires only on image tokens,
      0 = only on text tokens, 0.5 = equal activation per token on both. NaN for a latent
      that never fired on these tokens.
    - shared: `shared_range[0] <= score <= shared_range[1]` (default 0.2..0.8); image-specific
      above, text-specific below.

    Example:
        >>> import torch
        >>> acts = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 0.0], [0.0, 1.0, 2.0]])
        >>> mod = torch.tensor([1, 1, 0])             # two image tokens, one text token
        >>> st = ModalityStats.from_activations(acts, mod)
        >>> st.score[0].item(), st.score[1].item(), round(st.score[2].item(), 3)
        (1.0, 0.0, 0.333)
        >>> st.kind()
        ['image', 'text', 'shared']
    """

    freq_image: Float[Tensor, " d_sae"]
    freq_text: Float[Tensor, " d_sae"]
    mean_image: Float[Tensor, " d_sae"]
    mean_text: Float[Tensor, " d_sae"]
    n_image: int = 0
    n_text: int = 0
    shared_range: tuple[float, float] = DEFAULT_SHARED
    density: Float[Tensor, " d_sae"] | None = field(default=None, repr=False)

    FIELDS: ClassVar[tuple[str, ...]] = ("freq_image", "freq_text", "mean_image", "mean_text")

    @property
    def d_sae(self) -> int:
        return int(self.freq_image.shape[0])

    @property
    def score(self) -> Float[Tensor, " d_sae"]:
        """Modality score per latent in [0, 1] (NaN where the latent never fired)."""
        total = self.mean_image + self.mean_text
        return torch.where(total > 0, self.mean_image / total.clamp_min(1e-30), torch.full_like(total, math.nan))

    @property
    def alive(self) -> Bool[Tensor, " d_sae"]:
        """Latents that fired at least once on the tokens these statistics were computed on."""
        return (self.freq_image + self.freq_text) > 0

    @property
    def frequency(self) -> Float[Tensor, " d_sae"]:
        """Firing frequency over all tokens (image and text pooled by their counts)."""
        n = max(self.n_image + self.n_text, 1)
        return (self.freq_image * self.n_image + self.freq_text * self.n_text) / n

    def kind(self) -> list[str]:
        """'image', 'text', 'shared' or 'dead' for each latent."""
        lo, hi = self.shared_range
        out = []
        for s in self.score.tolist():
            out.append("dead" if math.isnan(s) else "image" if s > hi else "text" if s < lo else "shared")
        return out

    def fractions(self) -> dict[str, float]:
        """Fraction of *alive* latents that are image-specific, text-specific and shared."""
        kinds = self.kind()
        alive = [k for k in kinds if k != "dead"]
        n = max(len(alive), 1)
        return {
            "image": alive.count("image") / n,
            "text": alive.count("text") / n,
            "shared": alive.count("shared") / n,
            "dead": kinds.count("dead") / max(len(kinds), 1),
        }

    # -- accumulation -------------------------------------------------------------

    @classmethod
    def empty(cls, d_sae: int, shared_range: tuple[float, float] = DEFAULT_SHARED) -> "ModalityStats":
        z = torch.zeros(d_sae, dtype=torch.float64)
        return cls(z.clone(), z.clone(), z.clone(), z.clone(), 0, 0, tuple(shared_range))  # sums until finalised

    @classmethod
    def from_activations(
        cls,
        acts: Float[Tensor, "n d_sae"],
        modality: Tensor,
        shared_range: tuple[float, float] = DEFAULT_SHARED,
    ) -> "ModalityStats":
        """Statistics from latent activations and a per-token modality (1 image, 0 text)."""
        acc = _Accumulator(acts.shape[-1])
        acc.add(acts, modality)
        return acc.finish(shared_range)

    # -- (de)serialisation ----------------------------------------------------------

    def tensors(self) -> dict[str, Tensor]:
        """The per-latent tensors, as saved in `modality.safetensors`."""
        out = {k: getattr(self, k).float().contiguous() for k in self.FIELDS}
        out["score"] = self.score.float().contiguous()
        return out

    def summary(self) -> dict[str, Any]:
        """JSON-able summary stored in `cfg.json` metadata (`vlens_modality`)."""
        return {
            "n_image_tokens": int(self.n_image),
            "n_text_tokens": int(self.n_text),
            "shared_range": list(self.shared_range),
            "fractions": self.fractions(),
            "score_definition": "mean_image / (mean_image + mean_text); means over all tokens of each modality",
            "file": "modality.safetensors",
        }

    @classmethod
    def from_saved(cls, tensors: dict[str, Tensor], summary: dict[str, Any]) -> "ModalityStats":
        return cls(
            *(tensors[k].float() for k in cls.FIELDS),
            n_image=int(summary.get("n_image_tokens", 0)),
            n_text=int(summary.get("n_text_tokens", 0)),
            shared_range=tuple(summary.get("shared_range", DEFAULT_SHARED)),  # type: ignore[arg-type]
        )


class _Accumulator:
    """Streaming sums for `ModalityStats` (float64, deterministic)."""

    def __init__(self, d_sae: int) -> None:
        z = torch.zeros(d_sae, dtype=torch.float64)
        self.fire = {IMAGE: z.clone(), TEXT: z.clone()}
        self.mass = {IMAGE: z.clone(), TEXT: z.clone()}
        self.n = {IMAGE: 0, TEXT: 0}

    @torch.no_grad()
    def add(self, acts: Tensor, modality: Tensor) -> None:
        acts = acts.reshape(-1, acts.shape[-1])
        modality = torch.as_tensor(modality).reshape(-1).to(acts.device)
        for code in (IMAGE, TEXT):
            sel = modality == code
            k = int(sel.sum())
            if k == 0:
                continue
            a = acts[sel]
            self.fire[code] += (a > 0).sum(0).double().cpu()
            self.mass[code] += a.double().sum(0).cpu()
            self.n[code] += k

    def finish(self, shared_range: tuple[float, float] = DEFAULT_SHARED) -> ModalityStats:
        ni, nt = self.n[IMAGE], self.n[TEXT]
        return ModalityStats(
            freq_image=(self.fire[IMAGE] / max(ni, 1)).float(),
            freq_text=(self.fire[TEXT] / max(nt, 1)).float(),
            mean_image=(self.mass[IMAGE] / max(ni, 1)).float(),
            mean_text=(self.mass[TEXT] / max(nt, 1)).float(),
            n_image=ni,
            n_text=nt,
            shared_range=tuple(shared_range),  # type: ignore[arg-type]
        )


class MultimodalSAE:
    """Mixin for the vlens inference SAEs: SAE-Lens maths plus `modality` statistics.

    `sae.modality` is a `ModalityStats` or None; it is not a buffer, so the
    state dict (and `sae_weights.safetensors`) stays exactly SAE-Lens's.
    """

    modality: ModalityStats | None = None

    def check_input(self, x: Tensor) -> None:
        """Raise a clear error when `x`'s last dimension is not this SAE's `d_in`."""
        d_in = self.cfg.d_in  # type: ignore[attr-defined]
        if x.shape[-1] != d_in:
            raise ValueError(
                f"this SAE reads {d_in}-dimensional activations but got shape {tuple(x.shape)}: "
                f"use an SAE trained on this model and site (its d_in must equal d_model = {x.shape[-1]})"
            )

    def encode(self, x: Tensor) -> Tensor:  # type: ignore[override]
        self.check_input(x)
        return super().encode(x)  # type: ignore[misc]

    @property
    def modality_score(self) -> Tensor | None:
        """Per-latent modality score (see `ModalityStats.score`), or None without statistics."""
        return None if self.modality is None else self.modality.score

    def __repr__(self) -> str:
        cfg = self.cfg  # type: ignore[attr-defined]
        hook = cfg.metadata.hook_name
        mod = "" if self.modality is None else f", modality stats on {self.modality.n_image}+{self.modality.n_text} tokens"
        return f"{type(self).__name__}({cfg.architecture()}: d_in {cfg.d_in} -> d_sae {cfg.d_sae}, hook {hook!r}{mod})"


class MultimodalStandardSAE(MultimodalSAE, StandardSAE):
    """SAE-Lens `StandardSAE` (ReLU) with modality statistics.

    Example:
        >>> import torch
        >>> from sae_lens.saes import StandardSAEConfig
        >>> sae = MultimodalStandardSAE(StandardSAEConfig(d_in=8, d_sae=32))
        >>> sae.encode(torch.randn(5, 8)).shape
        torch.Size([5, 32])
    """


class MultimodalTopKSAE(MultimodalSAE, TopKSAE):
    """SAE-Lens `TopKSAE` with modality statistics (also the target of sparsify conversions)."""


class MultimodalJumpReLUSAE(MultimodalSAE, JumpReLUSAE):
    """SAE-Lens `JumpReLUSAE` with modality statistics (BatchTopK and JumpReLU training end here)."""


MULTIMODAL_CLASSES: dict[str, type[SAE]] = {
    "standard": MultimodalStandardSAE,
    "topk": MultimodalTopKSAE,
    "jumprelu": MultimodalJumpReLUSAE,
}


def as_multimodal(sae: SAE, modality: ModalityStats | None = None) -> SAE:
    """The vlens class for a plain SAE-Lens inference SAE, sharing its parameters.

    Example:
        >>> from sae_lens.saes import StandardSAE, StandardSAEConfig
        >>> type(as_multimodal(StandardSAE(StandardSAEConfig(d_in=4, d_sae=8)))).__name__
        'MultimodalStandardSAE'
    """
    arch = sae.cfg.architecture()
    if arch not in MULTIMODAL_CLASSES:
        raise ValueError(
            f"architecture {arch!r} has no vlens multimodal class; supported: {sorted(MULTIMODAL_CLASSES)}"
        )
    cls = MULTIMODAL_CLASSES[arch]
    if not isinstance(sae, cls):
        device = sae.cfg.device
        sae.cfg.device = "meta"
        new = cls(sae.cfg)
        sae.cfg.device = device
        new.cfg.device = device
        new.load_state_dict(sae.state_dict(), assign=True)
        new = new.to(device=device)
        sae = new
    if modality is not None:
        sae.modality = modality  # type: ignore[attr-defined]
    return sae
