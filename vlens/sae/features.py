"""Per-feature data of an SAE on a VLM, machine-readable: logit attribution, top activations, Neuronpedia's format.

- `feature_logits(sae, vlm, latents)`: the **logit attribution** of each latent, the top and
  bottom vocabulary tokens of its decoder row read through the final norm's gain and the
  unembedding, (W_dec[i] ⊙ γ) · W_Uᵀ (`vlens.lens.project_on_vocab(..., norm="fold")`: a
  `LayerNorm` also centres the row first; the norm's division by the residual's scale is left
  out, as in sae-dashboard and Neuronpedia, so values are comparable across latents, not logit
  changes of a given token).
- `collect(...)`: the chosen latents on every image and caption token of some samples, read
  with `vlens.activations.read_layers` at the SAE's own site (`vlens.sae.io.site_of`); the
  dashboards (`vlens.sae.dashboards`) and the export below share it.
- `export_features(...)`: a JSON file in Neuronpedia's feature upload format (the payload of
  `neuronpedia`'s `FeatureRequest.upload_batch`: `index`, `density`, `topLogits`,
  `bottomLogits`, `activations` of `tokens` / `values`, `explanations`) that a viewer or an
  upload reads as it is; nothing is uploaded. Image tokens are written as stable pseudo-tokens
  (`image_token_names`: `<img0:t1:r3:c5>` is image 0, tile 1, patch row 3, column 5;
  `<img0:newline:r3>` a row-end token), and vlens's extra fields sit alongside under the key
  `vlens`: per feature the modality score and statistics, per activation record the sample,
  a thumbnail file (`thumbnails/sample_N.png`, the image as the sample gave it), its size and
  each token's pixel box in that image (None for text tokens), so a viewer can paint patch
  heatmaps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from sae_lens import SAE
from torch import Tensor
from tqdm.auto import tqdm

from ..activations.read import read_layers
from ..errors import InputError
from ..lens import project_on_vocab
from ..prepare import load_image
from ..prompts import QUESTION
from ..sites import Site, SiteLike
from ..tokens import ImageGeometry
from ..viz import token_strings
from .io import site_of

if TYPE_CHECKING:
    from ..model import VLM

__all__ = ["feature_logits", "image_token_names", "collect", "choose_latents", "export_features"]


@torch.no_grad()
def feature_logits(sae: SAE, vlm: VLM, latents: Sequence[int], k: int = 10) -> list[dict[str, list[dict[str, Any]]]]:
    """Top and bottom `k` vocabulary tokens of each latent's decoder row through the final norm and unembedding.

    One dict per latent, `{"top": [{"token": str, "value": float}, ...], "bottom": [...]}`
    (Neuronpedia's `topLogits` / `bottomLogits` entries), largest first / smallest first.

    Example:
        >>> import vlens, torch, vlens.sae as vs
        >>> vlm = vlens.tiny(words=["red", "blue", "circle"])
        >>> sae = vs.train(torch.randn(256, vlm.d_model), "paper", d_sae=8, steps=2, batch_size=128, progress=False)
        >>> out = feature_logits(sae, vlm, [0, 3], k=2)
        >>> len(out), [len(out[0]["top"]), len(out[0]["bottom"])], out[0]["top"][0]["value"] >= out[0]["bottom"][0]["value"]
        (2, [2, 2], True)
    """
    latents = [int(i) for i in latents]
    bad = [i for i in latents if not 0 <= i < sae.cfg.d_sae]
    if bad:
        raise InputError(f"latents {bad} out of range 0..{sae.cfg.d_sae - 1}")
    rows = sae.W_dec.detach()[torch.tensor(latents, dtype=torch.long, device=sae.W_dec.device)]
    tok = vlm.tokenizer
    out = []
    for s0 in range(0, len(latents), 64):  # [64, vocab] logits at a time
        proj = project_on_vocab(vlm, rows[s0 : s0 + 64], k, norm="fold")  # the norm module's own gain (Gemma: 1 + w)
        for j in range(len(proj.top_ids)):
            out.append({name: [{"token": t, "value": float(v)} for v, t in zip(vals[j], token_strings(tok, ids[j]))]
                        for name, ids, vals in (("top", proj.top_ids, proj.top_values),
                                                ("bottom", proj.bottom_ids, proj.bottom_values))})
    return out


def image_token_names(geometry: ImageGeometry, image: int = 0) -> list[str]:
    """Stable pseudo-tokens for one image's tokens: `<img{image}:t{tile}:r{row}:c{col}>`, `<img{image}:newline:r{row}>`.

    Example:
        >>> import vlens; from PIL import Image
        >>> b = vlens.tiny().prepare(["<image>"], [Image.new("RGB", (32, 48))])
        >>> image_token_names(b.layout.images[0].geometry)[:2]
        ['<img0:t0:r0:c0>', '<img0:t0:r0:c1>']
    """
    out = []
    for kind, tile, row, col in zip(geometry.kind.tolist(), geometry.tile.tolist(), geometry.row.tolist(),
                                    geometry.col.tolist()):
        out.append(f"<img{image}:newline:r{row}>" if kind == 2 else f"<img{image}:t{tile}:r{row}:c{col}>")
    return out


@torch.no_grad()
def collect(vlm: VLM, sae: SAE, samples: Sequence[Any], latents: Sequence[int], *, layer: SiteLike | None = None,
            prompt: str = QUESTION, batch_size: int = 8, progress: bool = True) -> list[dict[str, Any]]:
    """The chosen latents on every image token and caption token of `samples`, one record per sample.

    The SAE reads its own site (`site_of(sae, vlm, layer)`). Each record: `sample` (index),
    `tokens` (image pseudo-tokens and decoded caption tokens, in sequence order), `acts`
    (`[n_tokens, len(latents)]`, float16), `is_image` (`[n_tokens]` bool), `boxes`
    (`[n_tokens, 4]` pixel boxes, NaN for text), `images` (per image: `start`, `end` into the
    record's tokens). Captions are used when every sample of a batch has one.

    Example:
        >>> import torch, vlens, vlens.sae as vs
        >>> from PIL import Image
        >>> from vlens.data import Sample
        >>> vlm = vlens.tiny(words=["a", "red", "square"])
        >>> sae = vs.train(torch.randn(256, vlm.d_model), "paper", d_sae=8, steps=2, batch_size=128, progress=False)
        >>> recs = collect(vlm, sae, [Sample(Image.new("RGB", (32, 32)), caption="a red square")], [0, 1], layer=2,
        ...                progress=False)
        >>> recs[0]["tokens"][-3:], tuple(recs[0]["acts"].shape)[1]
        (['a', 'red', 'square'], 2)
    """
    site = site_of(sae, vlm, layer)
    lat = torch.tensor([int(i) for i in latents], dtype=torch.long)
    tok = vlm.tokenizer
    records: list[dict[str, Any]] = []
    for s in tqdm(range(0, len(samples), batch_size), desc="feature activations", disable=(not progress) or None):
        part = samples[s : s + batch_size]
        caps = [getattr(x, "caption", None) for x in part]
        answers = caps if all(c is not None for c in caps) else None
        batch = vlm.prepare([prompt] * len(part), [x.image for x in part], answers=answers)
        lay = batch.layout
        sel = lay.image | lay.answer
        h = read_layers(vlm, batch, site, tokens=sel)[site]
        f = torch.zeros(*sel.shape, len(lat))  # [B, S, L], zero outside the selection
        f[sel] = sae.encode(h.to(sae.device, sae.dtype))[..., lat.to(sae.device)].float().cpu()
        for b in range(len(part)):
            pos = sel[b].nonzero().flatten()
            names = token_strings(tok, lay.input_ids[b][pos].tolist())
            boxes = torch.full((len(pos), 4), math.nan)
            images = []
            for n, span in enumerate(sp for sp in lay.images if sp.batch_index == b):
                where = ((pos >= span.start) & (pos < span.end)).nonzero().flatten()
                start, end = int(where[0]), int(where[-1]) + 1
                names[start:end] = image_token_names(span.geometry, n)
                boxes[start:end] = span.geometry.box.float()
                images.append({"start": start, "end": end})
            records.append({"sample": s + b, "tokens": names, "acts": f[b][pos].half(), "is_image": lay.image[b][pos],
                            "boxes": boxes, "images": images})
    return records


def choose_latents(sae: SAE, n: int) -> list[int]:
    """The `n` most frequently firing latents (by `sae.density`), else the first `n`.

    Example:
        >>> from sae_lens.saes import TopKSAE, TopKSAEConfig
        >>> choose_latents(TopKSAE(TopKSAEConfig(d_in=4, d_sae=8, k=2)), 3)
        [0, 1, 2]
    """
    density = _known_density(sae)
    if density is not None:
        alive = (density > 0).nonzero().flatten()
        return alive[torch.argsort(density[alive], descending=True, stable=True)][:n].tolist()
    return list(range(min(n, sae.cfg.d_sae)))


def _known_density(sae: SAE) -> Tensor | None:
    """`sae.density` (set by `as_multimodal`), else the modality statistics' frequency, else None."""
    density = getattr(sae, "density", None)
    if density is None and getattr(sae, "modality", None) is not None:
        density = sae.modality.frequency
    return density


def _density(sae: SAE, records: list[dict[str, Any]], j: int, latent: int) -> float:
    density = _known_density(sae)
    if density is not None:
        return float(density[latent])
    n = sum(len(r["tokens"]) for r in records)
    return sum(int((r["acts"][:, j] != 0).sum()) for r in records) / max(n, 1)


def _modality_fields(sae: SAE, latent: int) -> dict[str, Any]:
    st = getattr(sae, "modality", None)
    if st is None:
        return {}
    score = float(st.score[latent])
    return {"modality_score": None if math.isnan(score) else score, "modality_kind": st.kind()[latent],
            **{k: float(getattr(st, k)[latent]) for k in st.FIELDS}}


def _thumbnail(sample: Any, path: Path, size: int = 256) -> None:
    img = load_image(sample.image).copy()
    img.thumbnail((size, size))
    img.save(path)


def _source(site: Site) -> str:
    """Neuronpedia-style source id: `{layer}-vlens-{kind}` (`vlens-{kind}` for sites without a layer)."""
    return f"vlens-{site.kind}" if site.index is None else f"{site.index}-vlens-{site.kind}"


def export_features(
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
    model_id: str | None = None,
    source: str | None = None,
    prompt: str = QUESTION,
    batch_size: int = 8,
    progress: bool = True,
) -> Path:
    """Write `out/features.json` (Neuronpedia's feature upload payload plus vlens fields) and thumbnails; return the file.

    `{"modelId", "source", "features": [...]}`; per feature `index`, `density` (firing density:
    `sae.density`, else measured on `samples`), `topLogits` / `bottomLogits` (`feature_logits`),
    `activations` (the `top_k` samples with the largest activation, each with `tokens` and
    `values` over its image and caption tokens), `explanations` (empty) and `vlens`.
    `source` defaults to Neuronpedia's style `"{layer}-vlens-{site kind}"`, `model_id` to the
    model's name. Neuronpedia's `upload_batch` takes at most 128 features a call.

    Example:
        >>> import json, tempfile, torch, vlens, vlens.sae as vs
        >>> from PIL import Image
        >>> from vlens.data import Sample
        >>> vlm = vlens.tiny(words=["a", "red", "square"])
        >>> sae = vs.train(torch.randn(256, vlm.d_model), "paper", d_sae=8, steps=2, batch_size=128, progress=False)
        >>> path = export_features(sae, vlm, [Sample(Image.new("RGB", (32, 32), "red"), caption="a red square")],
        ...                        tempfile.mkdtemp(), layer=2, latents=[0, 1], progress=False)
        >>> doc = json.loads(path.read_text())
        >>> doc["source"], sorted(doc["features"][0])
        ('2-vlens-resid_pre', ['activations', 'bottomLogits', 'density', 'explanations', 'index', 'topLogits', 'vlens'])
    """
    out = Path(out)
    if sae.cfg.d_in != vlm.d_model:
        raise InputError(f"SAE d_in {sae.cfg.d_in} != model d_model {vlm.d_model}: this SAE belongs to another model")
    site = site_of(sae, vlm, layer)
    chosen = [int(i) for i in (latents if latents is not None else choose_latents(sae, n_latents))]
    logits = feature_logits(sae, vlm, chosen, n_logits)
    records = collect(vlm, sae, samples, chosen, layer=site, prompt=prompt, batch_size=batch_size, progress=progress)
    thumbs = out / "thumbnails"
    thumbs.mkdir(parents=True, exist_ok=True)
    written: set[int] = set()
    features = []
    for j, latent in enumerate(chosen):
        peaks = torch.tensor([float(r["acts"][:, j].float().max()) if len(r["tokens"]) else 0.0 for r in records])
        acts = []
        for i in torch.argsort(peaks, descending=True, stable=True)[:top_k].tolist():
            if peaks[i] <= 0:
                break
            r = records[i]
            sample = samples[r["sample"]]
            extra: dict[str, Any] = {"sample": r["sample"], "sample_id": getattr(sample, "id", None)}
            if r["images"]:
                name = f"sample_{r['sample']}.png"
                if r["sample"] not in written:
                    _thumbnail(sample, thumbs / name)
                    written.add(r["sample"])
                extra.update(thumbnail=f"thumbnails/{name}", image_size=list(load_image(sample.image).size),
                             boxes=[None if math.isnan(b[0]) else [round(v, 2) for v in b] for b in r["boxes"].tolist()])
            values = [round(v, 5) for v in r["acts"][:, j].float().tolist()]
            acts.append({"tokens": list(r["tokens"]), "values": values, "quantileMax": None, "quantileMin": None,
                         "quantileFraction": None, "vlens": extra})
        features.append({"index": latent, "density": _density(sae, records, j, latent), "activations": acts,
                         "explanations": [], "topLogits": logits[j]["top"], "bottomLogits": logits[j]["bottom"],
                         "vlens": {"hook_name": site.hook_name, "site": site.name, **_modality_fields(sae, latent)}})
    doc = {"modelId": model_id or vlm.name, "source": source or _source(site), "features": features}
    path = out / "features.json"
    path.write_text(json.dumps(doc))
    return path
