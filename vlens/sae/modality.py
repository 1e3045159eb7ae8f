"""Modality statistics of SAE latents, attached to any SAE-Lens SAE by composition, and their analysis by layer.

For latent i, over tokens of known modality (`vlens.roles.IMAGE` = 1, `TEXT` = 0):
mean_image = mean of |f_i| over all image tokens (zeros included), mean_text likewise over
text tokens, and

    score_i = mean_image / (mean_image + mean_text)  ∈ [0, 1]

(the image share of the latent's activation mass, normalised by token counts). A latent
is *shared* if 0.2 ≤ score ≤ 0.8, image-specific above, text-specific below, dead if it
never fires. `sharing_by_layer` reports these fractions over alive latents per layer;
`plot_sharing_by_layer` is the paper's "sharing grows with depth" figure.

Composition, not subclassing: the statistics live in a plain attribute, `sae.modality`
(a `ModalityStats` or None), on whatever SAE-Lens class the SAE is (`standard`, `topk`,
`jumprelu`, `gated`, `abstopk`, `matching_pursuit`, transcoders...). `as_multimodal(sae)`
sets it (and installs a width check on the SAE's `hook_sae_input`, so a wrong-width input
fails with a message rather than a shape error deep in a matmul); the state dict and
`sae_weights.safetensors` stay exactly SAE-Lens's. `vlens.sae.io` saves the statistics
next to the weights (`modality.safetensors`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import plotly.graph_objects as go
import torch
from jaxtyping import Bool, Float
from plotly.subplots import make_subplots
from sae_lens import SAE
from torch import Tensor

from ..errors import InputError, NonFiniteActivations
from ..roles import IMAGE, TEXT
from .sources import as_source

__all__ = [
    "DEFAULT_SHARED", "ModalityStats", "as_multimodal", "firing_density", "modality_stats", "modality_stats_from_source",
    "sharing_by_layer", "plot_modality_histogram", "plot_sharing_by_layer", "modality_table", "ModalityAccumulator",
]

DEFAULT_SHARED = (0.2, 0.8)
"""A latent is *shared* when its modality score lies in this closed interval."""


@dataclass
class ModalityStats:
    """Per-latent statistics of an SAE on image tokens and on text tokens.

    For latent i, over a set of tokens of known modality:

    - `freq_image[i]`: fraction of image tokens on which f_i ≠ 0 (same for `freq_text`);
    - `mean_image[i]`: mean of |f_i| over *all* image tokens, zeros included (same for `mean_text`);
      |f_i| = f_i for every architecture whose latents are non-negative (all but `abstopk`);
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

    @classmethod
    def from_activations(
        cls,
        acts: Float[Tensor, "n d_sae"],
        modality: Tensor,
        shared_range: tuple[float, float] = DEFAULT_SHARED,
    ) -> "ModalityStats":
        """Statistics from latent activations and a per-token modality (1 image, 0 text)."""
        acc = ModalityAccumulator(acts.shape[-1])
        acc.add(acts, modality)
        return acc.finish(shared_range)

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
        """Rebuild from `tensors()` and `summary()` (what `vlens.sae.io` writes)."""
        return cls(
            *(tensors[k].float() for k in cls.FIELDS),
            n_image=int(summary.get("n_image_tokens", 0)),
            n_text=int(summary.get("n_text_tokens", 0)),
            shared_range=tuple(summary.get("shared_range", DEFAULT_SHARED)),  # type: ignore[arg-type]
        )


class ModalityAccumulator:
    """Streaming sums for `ModalityStats` (float64, deterministic): `add` latents batch by batch, then `finish`.

    The seam `train_many` uses to take the statistics of several SAEs in one pass.

    Example:
        >>> acc = ModalityAccumulator(2)
        >>> acc.add(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([1, 0]))
        >>> st = acc.finish((0.1, 0.9))
        >>> st.freq_image.tolist(), st.freq_text.tolist()
        ([1.0, 0.0], [0.0, 1.0])
    """

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
            self.fire[code] += (a != 0).sum(0).double().cpu()
            self.mass[code] += a.double().abs().sum(0).cpu()
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


# -- composition: any SAE-Lens SAE -------------------------------------------------------------


class _WidthCheck:
    """Forward pre-hook on `sae.hook_sae_input`: a clear error for inputs of the wrong width or with NaN/inf (picklable)."""

    def __init__(self, d_in: int) -> None:
        self.d_in = int(d_in)

    def __call__(self, module: torch.nn.Module, args: tuple[Tensor, ...]) -> None:
        x = args[0]
        if x.shape[-1] != self.d_in:
            raise InputError(
                f"this SAE reads {self.d_in}-dimensional activations but got shape {tuple(x.shape)}: "
                f"use an SAE trained on this model and site (its d_in must equal d_model = {x.shape[-1]})"
            )
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).any(-1).sum()) if x.dim() > 1 else 1
            raise NonFiniteActivations(
                f"{bad} input row(s) hold NaN/inf: the activations upstream of this SAE are broken (check the model's "
                "dtype, e.g. fp16 overflow) or filter them with torch.isfinite(x).all(-1)"
            )


def as_multimodal(sae: SAE, modality: ModalityStats | None = None, *,
                  density: Float[Tensor, " d_sae"] | None = None) -> SAE:
    """Give any SAE-Lens SAE vlens's additions, in place, and return it (the same object, same class).

    Sets `sae.modality` (`modality`, or keeps statistics already attached), `sae.density`
    (firing density per latent over all tokens, labelled or not: `density`, else kept, else
    None; `sae.modality.frequency` when only the statistics are known) and installs a width
    check on the input. The SAE's maths and state dict are untouched.

    Example:
        >>> from sae_lens.saes import GatedSAE, GatedSAEConfig
        >>> sae = as_multimodal(GatedSAE(GatedSAEConfig(d_in=4, d_sae=8)))
        >>> type(sae).__name__, sae.modality is None, sae.density is None
        ('GatedSAE', True, True)
    """
    if not isinstance(sae, SAE):
        raise InputError(f"expected an SAE-Lens SAE (sae_lens.SAE), got {type(sae).__name__}")
    if modality is not None:
        if modality.d_sae != sae.cfg.d_sae:
            raise InputError(f"modality statistics for {modality.d_sae} latents do not fit an SAE with {sae.cfg.d_sae}")
        sae.modality = modality  # type: ignore[assignment]
    elif "modality" not in vars(sae):
        sae.modality = None  # type: ignore[assignment]
    if density is not None:
        if density.shape != (sae.cfg.d_sae,):
            raise InputError(f"a firing density of shape {tuple(density.shape)} does not fit an SAE with "
                             f"{sae.cfg.d_sae} latents")
        sae.density = density.float().cpu()  # type: ignore[assignment]
    elif modality is not None or vars(sae).get("density") is None:
        sae.density = None if sae.modality is None else sae.modality.frequency  # type: ignore[assignment]
    hook = getattr(sae, "hook_sae_input", None)
    if isinstance(hook, torch.nn.Module) and not any(isinstance(h, _WidthCheck) for h in hook._forward_pre_hooks.values()):
        hook.register_forward_pre_hook(_WidthCheck(sae.cfg.d_in))
    return sae


@torch.no_grad()
def modality_stats_from_source(sae: SAE, source: Any, n_tokens: int = 200_000,
                               shared_range: tuple[float, float] = DEFAULT_SHARED,
                               batch_size: int = 4096) -> ModalityStats | None:
    """Per-latent `ModalityStats` of `sae` over up to `n_tokens` tokens of `source` (None without modality labels).

    Example:
        >>> import torch
        >>> from sae_lens.saes import TopKSAE, TopKSAEConfig
        >>> sae = TopKSAE(TopKSAEConfig(d_in=8, d_sae=16, k=2))
        >>> st = modality_stats_from_source(sae, (torch.randn(100, 8), torch.arange(100) % 2))
        >>> st.n_image, st.n_text
        (50, 50)
    """
    source = as_source(source)
    acc = ModalityAccumulator(sae.cfg.d_sae)
    seen = 0
    for x, mod in source.sequential(batch_size, n_tokens):
        if mod is None:
            return None
        acc.add(sae.encode(x.to(sae.device, sae.dtype)), mod)
        seen += x.shape[0]
        if seen >= n_tokens:
            break
    if seen == 0:
        return None
    return acc.finish(shared_range)


@torch.no_grad()
def firing_density(sae: SAE, data: Any, n_tokens: int = 200_000, batch_size: int = 4096) -> Float[Tensor, " d_sae"]:
    """Fraction of the first `n_tokens` tokens of `data` on which each latent fires (modality labels not needed).

    What `sparsity.safetensors` stores (as log10) when an SAE has no modality statistics:
    attach it with `as_multimodal(sae, density=firing_density(sae, data))` before `export`.

    Example:
        >>> import torch
        >>> from sae_lens.saes import TopKSAE, TopKSAEConfig
        >>> sae = TopKSAE(TopKSAEConfig(d_in=8, d_sae=16, k=2))
        >>> x = torch.randn(100, 8)
        >>> torch.allclose(firing_density(sae, x), (sae.encode(x) != 0).float().mean(0))
        True
    """
    source = as_source(data)
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    seen = 0
    for x, _ in source.sequential(batch_size, n_tokens):
        fired += (sae.encode(x.to(sae.device, sae.dtype)) != 0).sum(0).double().cpu()
        seen += x.shape[0]
        if seen >= n_tokens:
            break
    if seen == 0:
        raise InputError("no activations to measure the firing density on")
    return (fired / seen).float()


def modality_stats(sae: SAE, data: Any = None, *, n_tokens: int = 200_000,
                   shared_range: tuple[float, float] = DEFAULT_SHARED, attach: bool = True) -> ModalityStats:
    """The modality statistics of `sae`: those attached (`data=None`), or computed on `data` and attached.

    Works on any SAE-Lens SAE; `data` is anything `vlens.sae.train` accepts with modality labels
    (`(x, modality)`, an `ActivationStore` with a `modality` column, ...).

    Example:
        >>> import torch
        >>> from sae_lens.saes import GatedSAE, GatedSAEConfig
        >>> x, mod = torch.randn(512, 8), torch.arange(512) % 2
        >>> sae = GatedSAE(GatedSAEConfig(d_in=8, d_sae=16))
        >>> modality_stats(sae, (x, mod)).n_image, modality_stats(sae).n_text
        (256, 256)
    """
    if data is None:
        st = getattr(sae, "modality", None) if not isinstance(sae, ModalityStats) else sae
        if st is None:
            raise InputError("this SAE has no modality statistics: compute them with vlens.sae.modality_stats(sae, data)")
        return st
    st = modality_stats_from_source(sae, data, n_tokens, shared_range)
    if st is None:
        raise InputError("these activations carry no modality labels: pass (x, modality) or a store with a modality column")
    if attach:
        as_multimodal(sae, st)
    return st


# -- analysis by layer -------------------------------------------------------------------------


def sharing_by_layer(saes: Mapping[int, SAE | ModalityStats]) -> dict[int, dict[str, float]]:
    """Fractions of image-specific, text-specific and shared alive latents (and dead ones), by layer.

    Example:
        >>> import torch
        >>> st = ModalityStats.from_activations(torch.tensor([[1., 0.], [1., 1.]]), torch.tensor([1, 0]))
        >>> sharing_by_layer({3: st})[3]["shared"]
        0.5
    """
    return {layer: modality_stats(s).fractions() for layer, s in sorted(saes.items())}


def plot_modality_histogram(saes: Mapping[int, SAE | ModalityStats], bins: int = 40,
                            columns: int = 3) -> go.Figure:
    """Histogram of the per-latent modality score, one panel per layer, shared band shaded.

    The panels wrap after `columns` per row and the figure takes the width of its
    page (no fixed width), so six layers fit a 1280-px window as two rows of three.

    Example:
        >>> import torch
        >>> st = ModalityStats.from_activations(torch.rand(20, 6), torch.arange(20) % 2)
        >>> fig = plot_modality_histogram({1: st, 2: st, 3: st, 4: st})
        >>> len(fig.data), fig.layout.width, fig.layout.height
        (4, None, 600)
    """
    layers = sorted(saes)
    cols = max(1, min(columns, len(layers)))
    rows = -(-len(layers) // cols)
    fig = make_subplots(rows=rows, cols=cols, shared_yaxes=True, vertical_spacing=0.3 / rows,
                        subplot_titles=[f"layer {layer}" for layer in layers])
    for i, layer in enumerate(layers):
        r, c = divmod(i, cols)
        st = modality_stats(saes[layer])
        s = st.score
        s = s[~torch.isnan(s)]
        fig.add_trace(go.Histogram(x=s.tolist(), xbins=dict(start=0, end=1.0001, size=1 / bins), name=f"layer {layer}",
                                   marker_color="#4c78a8", showlegend=False), row=r + 1, col=c + 1)
        lo, hi = st.shared_range
        fig.add_vrect(x0=lo, x1=hi, fillcolor="#f58518", opacity=0.12, line_width=0, row=r + 1, col=c + 1)
        last_row = i + cols >= len(layers)
        fig.update_xaxes(title_text="modality score (0 text … 1 image)" if last_row else None, range=[0, 1],
                         row=r + 1, col=c + 1)
    for r in range(rows):
        fig.update_yaxes(title_text="latents", row=r + 1, col=1)
    fig.update_layout(title="Per-latent modality score by layer (shaded: shared)", bargap=0.02,
                      height=300 * rows)
    return fig


def plot_sharing_by_layer(saes: Mapping[int, SAE | ModalityStats]) -> go.Figure:
    """Fraction of shared / image-only / text-only alive latents against layer ("sharing grows with depth").

    Example:
        >>> import torch
        >>> st = ModalityStats.from_activations(torch.rand(20, 6), torch.arange(20) % 2)
        >>> [t.name for t in plot_sharing_by_layer({1: st, 2: st}).data]
        ['shared', 'image', 'text']
    """
    table = sharing_by_layer(saes)
    layers = list(table)
    fig = go.Figure()
    for kind, color in (("shared", "#f58518"), ("image", "#4c78a8"), ("text", "#54a24b")):
        fig.add_trace(go.Scatter(x=layers, y=[table[layer][kind] for layer in layers], mode="lines+markers",
                                 name=kind, line=dict(color=color, width=3 if kind == "shared" else 1.5)))
    lo, hi = next(iter(modality_stats(s) for s in saes.values())).shared_range if saes else DEFAULT_SHARED
    fig.update_layout(title=f"Shared latents by layer (shared: {lo} ≤ score ≤ {hi})", xaxis_title="layer (resid_pre)",
                      yaxis_title="fraction of alive latents", yaxis_range=[0, 1], height=380, width=600)
    return fig


def modality_table(sae: SAE | ModalityStats) -> list[dict[str, float | str | int]]:
    """One row per latent: frequencies, means, score and kind (handy for pandas).

    Example:
        >>> import torch
        >>> st = ModalityStats.from_activations(torch.tensor([[1., 0.], [0., 2.]]), torch.tensor([1, 0]))
        >>> [r["kind"] for r in modality_table(st)]
        ['image', 'text']
    """
    st = modality_stats(sae)
    kinds = st.kind()
    rows = []
    for i in range(st.d_sae):
        score = float(st.score[i])
        rows.append({"latent": i, "freq_image": float(st.freq_image[i]), "freq_text": float(st.freq_text[i]),
                     "mean_image": float(st.mean_image[i]), "mean_text": float(st.mean_text[i]),
                     "score": None if math.isnan(score) else score, "kind": kinds[i]})
    return rows

