"""Static HTML feature dashboards: one page per latent, plus an index.

Each latent page shows its modality score and statistics, a histogram of its
non-zero activations, its top-activating images with a patch heatmap painted
from the token geometry (`layout.images[i].geometry.box`: every image token's pixel
box in the original image; base-tile and high-res tokens overlap, each pixel shows
the larger activation), and its top caption contexts with the firing token
highlighted, and its logit attribution (top and bottom vocabulary tokens of its decoder row,
`vlens.sae.features.feature_logits`). Activations are read at the SAE's own site with
`vlens.sae.features.collect` (through `vlens.activations.read_layers`); the pages are
`vlens.viz` templates (images inlined as PNG, `plotly.min.js` written once next to
them), so they open offline.

Why not SAE-Lens's companion `sae-dashboard`: it is text-only and pins
`transformers<4.57`; these pages need the image-token geometry.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence, TYPE_CHECKING

import plotly.graph_objects as go
import torch
from sae_lens import SAE

from ..attribution import grad_x_act, sae_target
from ..errors import InputError
from ..prompts import QUESTION
from ..sites import SiteLike
from ..viz import figure_html, heatmap_overlay, image_data_uri, plotly_script, render, save_html
from .features import choose_latents, collect, feature_logits
from .io import site_of

if TYPE_CHECKING:
    from ..model import VLM


def _top_images(records: list[dict[str, Any]], samples: Sequence[Any], j: int,
                top_k: int) -> tuple[list[dict[str, Any]], float, list[int]]:
    imgs = [(r, im) for r in records for im in r["images"]]
    peak = torch.tensor([float(r["acts"][im["start"]:im["end"], j].float().max()) for r, im in imgs]) \
        if imgs else torch.zeros(0)
    vmax = float(peak.max()) if peak.numel() else 1.0
    cards, shown = [], []  # shown: the sample index behind each card
    for i in torch.argsort(peak, descending=True, stable=True)[:top_k].tolist():
        if peak[i] <= 0:
            break
        r, im = imgs[i]
        sample = samples[r["sample"]]
        pic = heatmap_overlay(sample.image, r["boxes"][im["start"]:im["end"]],
                              r["acts"][im["start"]:im["end"], j].float(), vmax)
        cap = getattr(sample, "caption", None) or ""
        cards.append({"src": image_data_uri(pic), "max": f"{float(peak[i]):.3g}", "caption": str(cap)[:60]})
        shown.append(r["sample"])
    return cards, vmax, shown


def _attribution_maps(vlm: VLM, sae: SAE, site: Any, latent: int, pictures: list[Any], prompt: str,
                      at: SiteLike) -> list[str]:
    """Gradient × activation at `at` of the latent's summed activation over each picture's image tokens."""
    if not pictures:
        return []
    batch = vlm.prepare([prompt] * len(pictures), pictures)
    attr = grad_x_act(vlm, batch, sae_target(sae, site.name, latent), site=at)
    return [image_data_uri(attr.overlay(p, i, sign="abs")) for i, p in enumerate(pictures)]


def _top_contexts(records: list[dict[str, Any]], j: int, top_k: int) -> list[dict[str, Any]]:
    scored = []
    for r in records:
        text = ~r["is_image"]
        if bool(text.any()):
            a = r["acts"][text, j].float()
            scored.append((float(a.max()), [t for t, m in zip(r["tokens"], text.tolist()) if m], a.tolist()))
    scored.sort(key=lambda p: -p[0])
    out = []
    for m, words, a in scored[:top_k]:
        if m <= 0:
            break
        out.append({"max": f"{m:.3g}", "tokens": [(w, f"{min(v / m, 1):.2f}" if v > 0 else None) for w, v in zip(words, a)]})
    return out


def _stats_rows(sae: SAE, latent: int) -> list[list[str]] | None:
    st = getattr(sae, "modality", None)
    if st is None:
        return None
    s = float(st.score[latent])
    return [
        ["modality score", f"{'—' if math.isnan(s) else f'{s:.3f}'} ({st.kind()[latent]})"],
        ["firing freq image / text", f"{float(st.freq_image[latent]):.4f} / {float(st.freq_text[latent]):.4f}"],
        ["mean act image / text", f"{float(st.mean_image[latent]):.4g} / {float(st.mean_text[latent]):.4g}"],
    ]


def dashboard(
    sae: SAE,
    vlm: VLM,
    samples: Sequence[Any],
    out: str | Path,
    *,
    layer: SiteLike | None = None,
    latents: Sequence[int] | None = None,
    n_latents: int = 32,
    top_k: int = 8,
    n_logits: int = 10,
    prompt: str = QUESTION,
    batch_size: int = 8,
    attribution: SiteLike | None = None,
    progress: bool = True,
) -> Path:
    """Write `index.html` and `latent_{i}.html` pages for `latents` (default: the `n_latents` most frequent).

    `samples` are `vlens.data.Sample`s (image, and caption for text contexts). The SAE reads its
    own site, from `sae.cfg.metadata.hook_name` (`vlens.sae.io.site_of`); `layer` (an int L is
    `resid_pre.L`; any site name works) is needed only when the SAE does not name one, and must
    agree with it when it does. Each page also shows the latent's logit attribution
    (`vlens.sae.features.feature_logits`, `n_logits` tokens each way). With `attribution` set to an
    earlier site (e.g. `"resid_pre.0"`, the image tokens as the LM receives them), each top image
    also shows where the latent comes from: gradient × activation there of the latent's summed
    activation over the image's tokens (`vlens.attribution.grad_x_act`, magnitude, one backward
    pass per latent). Returns the path of the index page.

    Example:
        >>> import tempfile, torch, vlens, vlens.sae as vs
        >>> from PIL import Image
        >>> from vlens.data import Sample
        >>> vlm = vlens.tiny(words=["a", "red", "square"])
        >>> sae = vs.train(torch.randn(512, vlm.d_model), "paper", d_sae=16, steps=2, batch_size=256, progress=False)
        >>> ds = [Sample(Image.new("RGB", (32, 32), "red"), caption="a red square")]
        >>> dashboard(sae, vlm, ds, tempfile.mkdtemp(), layer=2, latents=[0, 1], progress=False).name
        'index.html'
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if sae.cfg.d_in != vlm.d_model:
        raise InputError(f"SAE d_in {sae.cfg.d_in} != model d_model {vlm.d_model}: this SAE belongs to another model")
    site = site_of(sae, vlm, layer)
    if attribution is not None and vlm.sites.index(vlm.site(attribution).name) >= vlm.sites.index(site.name):
        raise InputError(f"attribution site {vlm.site(attribution).name} must come before the SAE's site {site.name}: "
                         "gradient × activation attributes the latent to an earlier site (e.g. 'resid_pre.0')")
    chosen = [int(i) for i in (latents if latents is not None else choose_latents(sae, n_latents))]
    logits = feature_logits(sae, vlm, chosen, n_logits)  # checks the latent range
    records = collect(vlm, sae, samples, chosen, layer=site, prompt=prompt, batch_size=batch_size, progress=progress)
    st = getattr(sae, "modality", None)
    kinds = st.kind() if st is not None else None
    hook = sae.cfg.metadata.hook_name or site.hook_name
    script = plotly_script(out)
    rows = []
    for j, latent in enumerate(chosen):
        cards, vmax, shown = _top_images(records, samples, j, top_k)
        if attribution is not None:
            maps = _attribution_maps(vlm, sae, site, latent, [samples[i].image for i in shown], prompt, attribution)
            for card, src in zip(cards, maps):
                card["attr"] = src
        vals = [v for r in records for v in r["acts"][:, j].float().tolist() if v != 0]
        fig = go.Figure(go.Histogram(x=vals, nbinsx=40, marker_color="#4c78a8"))
        fig.update_layout(title="non-zero activations (image + caption tokens)", xaxis_title="activation",
                          yaxis_title="tokens", height=260, width=480, margin=dict(l=40, r=10, t=40, b=40))
        pairs = list(zip(logits[j]["top"], logits[j]["bottom"]))
        logit_rows = [[t["token"], f"{t['value']:+.3g}", b["token"], f"{b['value']:+.3g}"] for t, b in pairs]
        page = render("latent.html.j2", title=f"latent {latent}", plotly_script=script, latent=latent, hook=hook,
                      d_sae=sae.cfg.d_sae, stats=_stats_rows(sae, latent), histogram=figure_html(fig), cards=cards,
                      contexts=_top_contexts(records, j, top_k), logits=logit_rows,
                      attribution=vlm.site(attribution).name if attribution is not None else None)
        save_html(out / f"latent_{latent}.html", page)
        score = float(st.score[latent]) if st is not None else math.nan
        rows.append({"latent": latent, "score": "—" if math.isnan(score) else f"{score:.3f}",
                     "kind": kinds[latent] if kinds else "—", "firing": len(vals), "max": f"{vmax:.3g}"})
    index = render("dashboard_index.html.j2", title="SAE dashboard", plotly_script="", hook=hook,
                   n_samples=len(samples), rows=rows)
    save_html(out / "index.html", index)
    return out / "index.html"
