"""Modality analysis: which latents read image tokens, which read text, which are shared — by layer.

Definitions (also in `ModalityStats`): for latent i, mean_image = mean of f_i over all image
tokens (zeros included), mean_text likewise over text tokens, and

    score_i = mean_image / (mean_image + mean_text)  ∈ [0, 1]

(the image share of the latent's activation mass, normalised by token counts). A latent
is *shared* if 0.2 ≤ score ≤ 0.8, image-specific above, text-specific below, dead if it
never fires. `sharing_by_layer` reports these fractions over alive latents per layer;
`plot_sharing_by_layer` is the paper's "sharing grows with depth" figure.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from sae_lens import SAE

from .base import DEFAULT_SHARED, ModalityStats
from .train import modality_stats_from_source


def modality_stats(sae: SAE, data: Any, *, n_tokens: int = 200_000, shared_range: tuple[float, float] = DEFAULT_SHARED,
                   attach: bool = True) -> ModalityStats:
    """Compute (and by default attach to `sae.modality`) per-latent modality statistics.

    Example:
        >>> import torch, vlens.sae as vs
        >>> x, mod = torch.randn(512, 8), torch.arange(512) % 2
        >>> sae = vs.train(x, "paper", d_sae=16, steps=2, batch_size=128, progress=False)
        >>> modality_stats(sae, (x, mod)).n_image
        256
    """
    st = modality_stats_from_source(sae, data, n_tokens, shared_range)
    if st is None:
        raise ValueError("these activations carry no modality labels: pass (x, modality) or a store with a modality column")
    if attach:
        sae.modality = st  # type: ignore[attr-defined]
    return st


def _stats(x: SAE | ModalityStats) -> ModalityStats:
    st = x if isinstance(x, ModalityStats) else getattr(x, "modality", None)
    if st is None:
        raise ValueError("this SAE has no modality statistics: run vlens.sae.modality_stats(sae, data) first")
    return st


def sharing_by_layer(saes: Mapping[int, SAE | ModalityStats]) -> dict[int, dict[str, float]]:
    """Fractions of image-specific, text-specific and shared alive latents (and dead ones), by layer.

    Example:
        >>> import torch
        >>> st = ModalityStats.from_activations(torch.tensor([[1., 0.], [1., 1.]]), torch.tensor([1, 0]))
        >>> sharing_by_layer({3: st})[3]["shared"]
        0.5
    """
    return {layer: _stats(s).fractions() for layer, s in sorted(saes.items())}


def plot_modality_histogram(saes: Mapping[int, SAE | ModalityStats], bins: int = 40) -> go.Figure:
    """Histogram of the per-latent modality score, one panel per layer, shared band shaded.

    Example:
        >>> import torch
        >>> st = ModalityStats.from_activations(torch.rand(20, 6), torch.arange(20) % 2)
        >>> len(plot_modality_histogram({1: st, 2: st}).data)
        2
    """
    layers = sorted(saes)
    fig = make_subplots(rows=1, cols=len(layers), shared_yaxes=True,
                        subplot_titles=[f"layer {layer}" for layer in layers])
    for c, layer in enumerate(layers, start=1):
        st = _stats(saes[layer])
        s = st.score
        s = s[~torch.isnan(s)]
        fig.add_trace(go.Histogram(x=s.tolist(), xbins=dict(start=0, end=1.0001, size=1 / bins), name=f"layer {layer}",
                                   marker_color="#4c78a8", showlegend=False), row=1, col=c)
        lo, hi = st.shared_range
        fig.add_vrect(x0=lo, x1=hi, fillcolor="#f58518", opacity=0.12, line_width=0, row=1, col=c)
        fig.update_xaxes(title_text="modality score (0 text … 1 image)", range=[0, 1], row=1, col=c)
    fig.update_yaxes(title_text="latents", row=1, col=1)
    fig.update_layout(title="Per-latent modality score by layer (shaded: shared)", bargap=0.02,
                      height=350, width=max(400, 300 * len(layers)))
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
    lo, hi = next(iter(_stats(s) for s in saes.values())).shared_range if saes else DEFAULT_SHARED
    fig.update_layout(title=f"Shared latents by layer (shared: {lo} ≤ score ≤ {hi})", xaxis_title="layer (resid_pre)",
                      yaxis_title="fraction of alive latents", yaxis_range=[0, 1], height=380, width=600)
    return fig


def modality_table(sae: SAE | ModalityStats) -> list[dict[str, float | str | int]]:
    """One row per latent: frequencies, means, score and kind (handy for pandas)."""
    st = _stats(sae)
    kinds = st.kind()
    rows = []
    for i in range(st.d_sae):
        score = float(st.score[i])
        rows.append({"latent": i, "freq_image": float(st.freq_image[i]), "freq_text": float(st.freq_text[i]),
                     "mean_image": float(st.mean_image[i]), "mean_text": float(st.mean_text[i]),
                     "score": None if math.isnan(score) else score, "kind": kinds[i]})
    return rows
