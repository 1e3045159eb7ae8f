"""Static HTML feature dashboards: one page per latent, plus an index.

Each latent page shows its modality score and statistics, a histogram of its
non-zero activations, its top-activating images with a patch heatmap painted
from the token geometry (`layout.images[i].geometry.box`: every image token's pixel
box in the original image; base-tile and high-res tokens overlap, each pixel shows
the larger activation), and its top caption contexts with the firing token
highlighted. Pages are self-contained HTML (images inlined as PNG); the plotly
script is written once as `plotly.min.js` next to them, so they open offline.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import plotly.graph_objects as go
import torch
from PIL import Image
from sae_lens import SAE
from tqdm.auto import tqdm

_CSS = """body{font-family:system-ui,sans-serif;margin:24px;max-width:1100px;color:#222}
.imgs{display:flex;flex-wrap:wrap;gap:12px}.card{font-size:12px;text-align:center}
.card img{image-rendering:pixelated;border:1px solid #ccc}table{border-collapse:collapse}
td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:right}th{text-align:left}
.ctx{font-family:monospace;margin:4px 0}.hit{background:rgba(220,40,40,var(--a));border-radius:3px;padding:0 2px}
a{color:#1f5fa6}"""


def _png(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def heatmap_overlay(image: Image.Image, boxes: torch.Tensor, acts: torch.Tensor, vmax: float | None = None,
                    size: int = 160) -> Image.Image:
    """Paint per-token activations over `image` using each token's pixel box (NaN boxes skipped).

    Example:
        >>> import torch
        >>> from PIL import Image
        >>> img = heatmap_overlay(Image.new("RGB", (32, 32)), torch.tensor([[0., 0., 16., 16.]]), torch.tensor([1.0]))
        >>> img.size
        (160, 160)
    """
    image = image.convert("RGB")
    w, h = image.size
    heat = np.zeros((h, w), dtype=np.float32)
    vmax = float(vmax if vmax is not None else (acts.max() if acts.numel() else 0.0)) or 1.0
    for (x0, y0, x1, y1), a in zip(boxes.tolist(), acts.tolist()):
        if any(math.isnan(v) for v in (x0, y0, x1, y1)) or a <= 0:
            continue
        ys, ye, xs, xe = int(y0), max(int(math.ceil(y1)), int(y0) + 1), int(x0), max(int(math.ceil(x1)), int(x0) + 1)
        heat[ys:ye, xs:xe] = np.maximum(heat[ys:ye, xs:xe], a / vmax)
    rgba = np.zeros((h, w, 4), dtype=np.uint8)
    rgba[..., 0] = 230
    rgba[..., 1] = 30
    rgba[..., 2] = 30
    rgba[..., 3] = (np.clip(heat, 0, 1) * 170).astype(np.uint8)
    out = Image.alpha_composite(image.convert("RGBA"), Image.fromarray(rgba, "RGBA")).convert("RGB")
    scale = size / max(w, h)
    return out.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.NEAREST)


@torch.no_grad()
def _collect(vlm: Any, sae: SAE, layer: int, samples: Sequence[Any], latents: list[int], prompt: str,
             batch_size: int, progress: bool) -> dict[str, Any]:
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
        with vlm.trace(batch) as tracer:
            h = vlm.resid_pre(layer).save()
            tracer.stop()
        f = sae.encode(h.to(sae.device, sae.dtype))[..., lat.to(sae.device)].float().cpu()  # [B, S, L]
        lay = batch.layout
        for span in lay.images:
            a = f[span.batch_index, span.start : span.end]
            images.append({"sample": s + span.batch_index, "boxes": span.geometry.box, "acts": a.half()})
        sel = lay.image | lay.answer
        for j in range(len(latents)):
            v = f[..., j][sel]
            nonzero[j].extend(v[v > 0].tolist())
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


def dashboard(
    sae: SAE,
    vlm: Any,
    samples: Sequence[Any],
    layer: int,
    out: str | Path,
    *,
    latents: Sequence[int] | None = None,
    n_latents: int = 32,
    top_k: int = 8,
    prompt: str = "<image>\nWhat is shown in this image?",
    batch_size: int = 8,
    progress: bool = True,
) -> Path:
    """Write `index.html` and `latent_{i}.html` pages for `latents` (default: the `n_latents` most frequent).

    `samples` are `vlens.data.Sample`s (image, and caption for text contexts); the SAE reads
    `resid_pre.{layer}`. Returns the path of the index page.

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
        raise ValueError(f"SAE d_in {sae.cfg.d_in} != model d_model {vlm.d_model}: this SAE belongs to another model")
    chosen = [int(i) for i in (latents if latents is not None else _choose_latents(sae, n_latents))]
    bad = [i for i in chosen if not 0 <= i < sae.cfg.d_sae]
    if bad:
        raise ValueError(f"latents {bad} out of range 0..{sae.cfg.d_sae - 1}")
    data = _collect(vlm, sae, layer, samples, chosen, prompt, batch_size, progress)
    st = getattr(sae, "modality", None)
    score = st.score if st is not None else None
    kinds = st.kind() if st is not None else None
    hook = sae.cfg.metadata.hook_name or f"resid_pre.{layer}"
    js_written = False
    rows = []
    for j, latent in enumerate(chosen):
        img_max = torch.tensor([float(im["acts"][:, j].max()) if im["acts"].numel() else 0.0 for im in data["images"]])
        top_img = torch.argsort(img_max, descending=True, stable=True)[:top_k].tolist()
        vmax = float(img_max.max()) if img_max.numel() else 1.0
        cards = []
        for i in top_img:
            im = data["images"][i]
            if img_max[i] <= 0:
                break
            pic = heatmap_overlay(samples[im["sample"]].image, im["boxes"], im["acts"][:, j].float(), vmax)
            cap = getattr(samples[im["sample"]], "caption", None) or ""
            cards.append(f'<div class="card"><img src="{_png(pic)}"><br>max {img_max[i]:.3g}<br>'
                         f'{html.escape(str(cap))[:60]}</div>')
        ctx_scores = []
        for t in data["texts"]:
            a = t["acts"][:, j].float()
            if a.numel():
                ctx_scores.append((float(a.max()), t))
        ctx_scores.sort(key=lambda p: -p[0])
        contexts = []
        for m, t in ctx_scores[:top_k]:
            if m <= 0:
                break
            a = t["acts"][:, j].float()
            spans = "".join(
                f'<span class="hit" style="--a:{min(float(v) / m, 1):.2f}">{html.escape(w)}</span>' if v > 0 else html.escape(w)
                for w, v in zip(t["tokens"], a.tolist())
            )
            contexts.append(f'<div class="ctx">{m:.3g} &nbsp; {spans}</div>')
        vals = data["nonzero"][j]
        fig = go.Figure(go.Histogram(x=vals, nbinsx=40, marker_color="#4c78a8"))
        fig.update_layout(title="non-zero activations (image + caption tokens)", xaxis_title="activation",
                          yaxis_title="tokens", height=260, width=480, margin=dict(l=40, r=10, t=40, b=40))
        hist_html = fig.to_html(full_html=False, include_plotlyjs=False)
        if not js_written:
            fig.write_html(out / "_plotly_probe.html", include_plotlyjs="directory")
            (out / "_plotly_probe.html").unlink()
            js_written = True
        stats_html = ""
        if st is not None:
            s = float(score[latent])  # type: ignore[index]
            stats_html = (
                "<table>"
                f"<tr><th>modality score</th><td>{'—' if math.isnan(s) else f'{s:.3f}'} ({kinds[latent]})</td></tr>"  # type: ignore[index]
                f"<tr><th>firing freq image / text</th><td>{float(st.freq_image[latent]):.4f} / {float(st.freq_text[latent]):.4f}</td></tr>"
                f"<tr><th>mean act image / text</th><td>{float(st.mean_image[latent]):.4g} / {float(st.mean_text[latent]):.4g}</td></tr>"
                "</table>"
            )
        page = (
            f"<!doctype html><html><head><meta charset='utf-8'><title>latent {latent}</title>"
            f"<script src='plotly.min.js'></script><style>{_CSS}</style></head><body>"
            f"<p><a href='index.html'>← index</a></p><h1>Latent {latent}</h1><p>{html.escape(str(hook))}, "
            f"d_sae {sae.cfg.d_sae}</p>{stats_html}{hist_html}"
            f"<h2>Top images</h2><div class='imgs'>{''.join(cards) or '<p>never fires on these images</p>'}</div>"
            f"<h2>Top caption contexts</h2>{''.join(contexts) or '<p>never fires on these captions</p>'}"
            "</body></html>"
        )
        (out / f"latent_{latent}.html").write_text(page)
        s_txt = "—" if score is None or math.isnan(float(score[latent])) else f"{float(score[latent]):.3f}"
        rows.append(f"<tr><th><a href='latent_{latent}.html'>{latent}</a></th><td>{s_txt}</td>"
                    f"<td>{kinds[latent] if kinds else '—'}</td><td>{len(vals)}</td><td>{vmax:.3g}</td></tr>")
    index = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>SAE dashboard</title><style>{_CSS}</style></head>"
        f"<body><h1>SAE dashboard</h1><p>{html.escape(str(hook))} · {len(samples)} samples · "
        f"{len(chosen)} latents</p><table><tr><th>latent</th><th>modality score</th><th>kind</th>"
        f"<th>firing tokens</th><th>max on images</th></tr>{''.join(rows)}</table></body></html>"
    )
    (out / "index.html").write_text(index)
    return out / "index.html"
