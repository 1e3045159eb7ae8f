"""Static HTML feature dashboards: one page per latent, plus an index.

Each latent page shows its modality score and statistics, a histogram of its
non-zero activations, its top-activating images with a patch heatmap painted
from the token geometry (`layout.images[i].geometry.box`: every image token's pixel
box in the original image; base-tile and high-res tokens overlap, each pixel shows
the larger activation), and its top caption contexts with the firing token
highlighted. Activations are read with `vlens.activations.read_layers`; the pages are
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
from tqdm.auto import tqdm

from ..activations.read import read_layers
from ..errors import InputError
from ..prompts import QUESTION
from ..sites import SiteLike
from ..viz import figure_html, heatmap_overlay, image_data_uri, plotly_script, render, save_html

if TYPE_CHECKING:
    from ..model import VLM


@torch.no_grad()
def _collect(vlm: VLM, sae: SAE, site: SiteLike, samples: Sequence[Any], latents: list[int], prompt: str,
             batch_size: int, progress: bool) -> dict[str, Any]:
    """The chosen latents on every image token and caption token of `samples`."""
    lat = torch.tensor(latents)
    images: list[dict[str, Any]] = []  # per image: sample index, boxes, acts [n_tok, L]
    texts: list[dict[str, Any]] = []  # per sample with caption: tokens, acts [n_ans, L]
    nonzero: list[list[float]] = [[] for _ in latents]
    tok = vlm.tokenizer
    for s in tqdm(range(0, len(samples), batch_size), desc="dashboard activations", disable=(not progress) or None):
        part = samples[s : s + batch_size]
        caps = [getattr(x, "caption", None) for x in part]
        answers = caps if all(c is not None for c in caps) else None
        batch = vlm.prepare([prompt] * len(part), [x.image for x in part], answers=answers)
        lay = batch.layout
        sel = lay.image | lay.answer
        h = read_layers(vlm, batch, site, tokens=sel)[site]
        f = torch.zeros(*sel.shape, len(latents))  # [B, S, L], zero outside the selection
        f[sel] = sae.encode(h.to(sae.device, sae.dtype))[..., lat.to(sae.device)].float().cpu()
        for span in lay.images:
            a = f[span.batch_index, span.start : span.end]
            images.append({"sample": s + span.batch_index, "boxes": span.geometry.box, "acts": a.half()})
        for j in range(len(latents)):
            v = f[..., j][sel]
            nonzero[j].extend(v[v != 0].tolist())
        if answers is not None:
            for b in range(len(part)):
                m = lay.answer[b]
                ids = lay.input_ids[b][m].tolist()
                texts.append({"sample": s + b, "tokens": [tok.decode([i]) for i in ids], "acts": f[b][m].half()})
    return {"images": images, "texts": texts, "nonzero": nonzero}


def _choose_latents(sae: SAE, n: int) -> list[int]:
    st = getattr(sae, "modality", None)
    if st is not None:
        freq = st.frequency
        alive = (freq > 0).nonzero().flatten()
        order = alive[torch.argsort(freq[alive], descending=True, stable=True)]
        return order[:n].tolist()
    return list(range(min(n, sae.cfg.d_sae)))


def _top_images(data: dict[str, Any], samples: Sequence[Any], j: int, top_k: int) -> tuple[list[dict[str, Any]], float]:
    img_max = torch.tensor([float(im["acts"][:, j].max()) if im["acts"].numel() else 0.0 for im in data["images"]])
    vmax = float(img_max.max()) if img_max.numel() else 1.0
    cards = []
    for i in torch.argsort(img_max, descending=True, stable=True)[:top_k].tolist():
        if img_max[i] <= 0:
            break
        im = data["images"][i]
        pic = heatmap_overlay(samples[im["sample"]].image, im["boxes"], im["acts"][:, j].float(), vmax)
        cap = getattr(samples[im["sample"]], "caption", None) or ""
        cards.append({"src": image_data_uri(pic), "max": f"{float(img_max[i]):.3g}", "caption": str(cap)[:60]})
    return cards, vmax


def _top_contexts(data: dict[str, Any], j: int, top_k: int) -> list[dict[str, Any]]:
    scored = [(float(t["acts"][:, j].float().max()), t) for t in data["texts"] if t["acts"].numel()]
    scored.sort(key=lambda p: -p[0])
    out = []
    for m, t in scored[:top_k]:
        if m <= 0:
            break
        a = t["acts"][:, j].float().tolist()
        out.append({"max": f"{m:.3g}",
                    "tokens": [(w, f"{min(v / m, 1):.2f}" if v > 0 else None) for w, v in zip(t["tokens"], a)]})
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
    layer: SiteLike,
    out: str | Path,
    *,
    latents: Sequence[int] | None = None,
    n_latents: int = 32,
    top_k: int = 8,
    prompt: str = QUESTION,
    batch_size: int = 8,
    progress: bool = True,
) -> Path:
    """Write `index.html` and `latent_{i}.html` pages for `latents` (default: the `n_latents` most frequent).

    `samples` are `vlens.data.Sample`s (image, and caption for text contexts); the SAE reads
    `layer` (an int L is `resid_pre.L`; any site name works). Returns the path of the index page.

    Example:
        >>> import tempfile, torch, vlens, vlens.sae as vs
        >>> from PIL import Image
        >>> from vlens.data import Sample
        >>> vlm = vlens.tiny(words=["a", "red", "square"])
        >>> sae = vs.train(torch.randn(512, vlm.d_model), "paper", d_sae=16, steps=2, batch_size=256, progress=False)
        >>> ds = [Sample(Image.new("RGB", (32, 32), "red"), caption="a red square")]
        >>> dashboard(sae, vlm, ds, 2, tempfile.mkdtemp(), latents=[0, 1], progress=False).name
        'index.html'
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if sae.cfg.d_in != vlm.d_model:
        raise InputError(f"SAE d_in {sae.cfg.d_in} != model d_model {vlm.d_model}: this SAE belongs to another model")
    chosen = [int(i) for i in (latents if latents is not None else _choose_latents(sae, n_latents))]
    bad = [i for i in chosen if not 0 <= i < sae.cfg.d_sae]
    if bad:
        raise InputError(f"latents {bad} out of range 0..{sae.cfg.d_sae - 1}")
    data = _collect(vlm, sae, layer, samples, chosen, prompt, batch_size, progress)
    st = getattr(sae, "modality", None)
    kinds = st.kind() if st is not None else None
    hook = sae.cfg.metadata.hook_name or vlm.site(layer).name
    script = plotly_script(out)
    rows = []
    for j, latent in enumerate(chosen):
        cards, vmax = _top_images(data, samples, j, top_k)
        vals = data["nonzero"][j]
        fig = go.Figure(go.Histogram(x=vals, nbinsx=40, marker_color="#4c78a8"))
        fig.update_layout(title="non-zero activations (image + caption tokens)", xaxis_title="activation",
                          yaxis_title="tokens", height=260, width=480, margin=dict(l=40, r=10, t=40, b=40))
        page = render("latent.html.j2", title=f"latent {latent}", plotly_script=script, latent=latent, hook=hook,
                      d_sae=sae.cfg.d_sae, stats=_stats_rows(sae, latent), histogram=figure_html(fig), cards=cards,
                      contexts=_top_contexts(data, j, top_k))
        save_html(out / f"latent_{latent}.html", page)
        score = float(st.score[latent]) if st is not None else math.nan
        rows.append({"latent": latent, "score": "—" if math.isnan(score) else f"{score:.3f}",
                     "kind": kinds[latent] if kinds else "—", "firing": len(vals), "max": f"{vmax:.3g}"})
    index = render("dashboard_index.html.j2", title="SAE dashboard", plotly_script="", hook=hook,
                   n_samples=len(samples), rows=rows)
    save_html(out / "index.html", index)
    return out / "index.html"
