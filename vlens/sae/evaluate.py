"""Evaluate SAEs: reconstruction metrics per modality and loss recovered with the SAE spliced into the model.

`evaluate(sae, data)` streams activations (any source `train` accepts) and reports,
overall and on image / text tokens separately:

- `explained_variance` = 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² (x̄: the mean over that group's tokens);
- `l0`: mean number of latents firing per token; `dead`: latents that never fired on the group;
- `mse`: mean over tokens of ‖x − x̂‖².

`loss_recovered(vlm, sae, layer, samples)` runs the model on image+caption batches
and splices the SAE into `resid_pre.{layer}` inside an nnsight trace (read the residual,
`decode(encode(.))`, write it back at the selected positions):

    loss recovered = 1 − (CE_spliced − CE_clean) / (CE_zero − CE_clean)

with CE the mean next-token cross-entropy on the caption (answer) tokens and
CE_zero the same with the residual zero-ablated at those positions. "overall"
splices every image and caption token; "image" only image tokens; "text" only
caption tokens.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from sae_lens import SAE
from torch import Tensor
from tqdm.auto import tqdm

from .base import IMAGE, TEXT
from .data import as_source


class _Group:
    def __init__(self, d_sae: int) -> None:
        self.n = 0
        self.sum_x: Tensor | None = None
        self.sum_sq = 0.0
        self.sse = 0.0
        self.l0 = 0.0
        self.fired = torch.zeros(d_sae, dtype=torch.bool)

    def add(self, x: Tensor, x_hat: Tensor, f: Tensor) -> None:
        if x.shape[0] == 0:
            return
        x64 = x.double()
        self.n += x.shape[0]
        s = x64.sum(0)
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        self.sum_sq += float(x64.pow(2).sum())
        self.sse += float((x_hat.double() - x64).pow(2).sum())
        self.l0 += float((f != 0).sum())
        self.fired |= (f != 0).any(0).cpu()

    def result(self) -> dict[str, float]:
        if self.n == 0:
            return {"n_tokens": 0, "explained_variance": float("nan"), "l0": float("nan"), "dead": float("nan"),
                    "mse": float("nan")}
        assert self.sum_x is not None
        total_var = self.sum_sq - float(self.sum_x.pow(2).sum()) / self.n
        return {
            "n_tokens": self.n,
            "explained_variance": 1.0 - self.sse / total_var if total_var > 0 else float("nan"),
            "l0": self.l0 / self.n,
            "dead": int((~self.fired).sum()),
            "mse": self.sse / self.n,
        }


@torch.no_grad()
def evaluate(sae: SAE, data: Any, *, n_tokens: int | None = None, batch_size: int = 4096,
             layer: int | None = None) -> dict[str, dict[str, float]]:
    """Explained variance, L0, dead latents and MSE, overall and per modality.

    Example:
        >>> import torch, vlens.sae as vs
        >>> x, mod = torch.randn(1024, 8), torch.arange(1024) % 2
        >>> sae = vs.train((x, mod), "paper", d_sae=32, steps=5, batch_size=256, progress=False)
        >>> r = evaluate(sae, (x, mod))
        >>> sorted(r), r["image"]["n_tokens"]
        (['image', 'overall', 'text'], 512)
    """
    source = as_source(data, layer)
    groups = {"overall": _Group(sae.cfg.d_sae), "image": _Group(sae.cfg.d_sae), "text": _Group(sae.cfg.d_sae)}
    sae.eval()
    for x, mod in source.sequential(batch_size, n_tokens):
        x = x.to(sae.device, sae.dtype)
        f = sae.encode(x)
        x_hat = sae.decode(f)
        groups["overall"].add(x, x_hat, f)
        if mod is not None:
            mod = mod.to(x.device)
            for name, code in (("image", IMAGE), ("text", TEXT)):
                sel = mod == code
                groups[name].add(x[sel], x_hat[sel], f[sel])
    return {k: g.result() for k, g in groups.items()}


def _answer_ce(logits: Tensor, ids: Tensor, answer: Tensor) -> Tensor:
    """Sum and count of next-token CE over answer positions (logits at t-1 predict token t)."""
    pred = logits[:, :-1].float()
    target = ids[:, 1:]
    mask = answer[:, 1:]
    ce = F.cross_entropy(pred[mask], target[mask], reduction="sum")
    return torch.stack([ce, mask.sum().to(ce)])


def splice_trace(vlm: Any, batch: Any, site: str, mask: Tensor, fn: Any) -> Tensor:
    """Run `batch`, replace `site` at `mask` positions by `fn(h[mask])`, return the logits.

    Plain nnsight: read the residual, edit a copy, write it back.
    """
    with torch.no_grad(), vlm.trace(batch):
        if fn is not None:
            h = vlm.read(site)
            new = h.clone()
            new[mask] = fn(h[mask]).to(h.dtype)
            vlm.write(site, new)
        logits = vlm.read("logits").save()
    return logits


@torch.no_grad()
def loss_recovered(
    vlm: Any,
    sae: SAE,
    layer: int,
    samples: Sequence[Any],
    *,
    prompt: str = "<image>\nWhat is shown in this image?",
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Loss recovered with `sae` spliced into `resid_pre.{layer}`, overall / image tokens / caption tokens.

    `samples` are `vlens.data.Sample`s with `image` and `caption` (the caption is the answer whose
    cross-entropy is measured).

    Example:
        >>> import torch, vlens, vlens.sae as vs
        >>> from PIL import Image
        >>> from vlens.data import Sample
        >>> vlm = vlens.tiny(words=["a", "red", "square"])
        >>> sae = vs.train(torch.randn(512, vlm.d_model), "paper", d_sae=128, steps=2, batch_size=256, progress=False)
        >>> r = loss_recovered(vlm, sae, 2, [Sample(Image.new("RGB", (32, 32)), caption="a red square")], progress=False)
        >>> sorted(r["overall"])
        ['ce_clean', 'ce_spliced', 'ce_zero', 'loss_recovered', 'n_tokens']
    """
    site = f"resid_pre.{layer}"
    if sae.cfg.d_in != vlm.d_model:
        raise ValueError(f"SAE d_in {sae.cfg.d_in} != model d_model {vlm.d_model}: this SAE belongs to another model")
    missing = [i for i, s in enumerate(samples) if getattr(s, "caption", None) is None or getattr(s, "image", None) is None]
    if missing:
        raise ValueError(f"samples {missing[:5]} lack an image or a caption; loss recovered needs both")
    sae = sae.to(vlm.device)
    groups = ("overall", "image", "text")
    sums = {g: {k: torch.zeros(2) for k in ("clean", "spliced", "zero")} for g in groups}

    def recon(h: Tensor) -> Tensor:
        return sae.decode(sae.encode(h.to(sae.dtype)))

    def zero(h: Tensor) -> Tensor:
        return torch.zeros_like(h)

    chunks = range(0, len(samples), batch_size)
    for s in tqdm(chunks, desc="loss recovered", disable=(not progress) or None):
        part = samples[s : s + batch_size]
        batch = vlm.prepare([prompt] * len(part), [x.image for x in part], answers=[x.caption for x in part])
        lay = batch.layout
        ids = lay.input_ids
        masks = {"overall": lay.image | lay.answer, "image": lay.image, "text": lay.answer}
        clean = _answer_ce(splice_trace(vlm, batch, site, masks["overall"], None).cpu(), ids, lay.answer)
        for g in groups:
            sums[g]["clean"] += clean
            sums[g]["spliced"] += _answer_ce(splice_trace(vlm, batch, site, masks[g], recon).cpu(), ids, lay.answer)
            sums[g]["zero"] += _answer_ce(splice_trace(vlm, batch, site, masks[g], zero).cpu(), ids, lay.answer)
    out: dict[str, dict[str, float]] = {}
    for g in groups:
        ce = {k: float(v[0] / v[1].clamp_min(1)) for k, v in sums[g].items()}
        denom = ce["zero"] - ce["clean"]
        out[g] = {
            "ce_clean": ce["clean"], "ce_spliced": ce["spliced"], "ce_zero": ce["zero"],
            "loss_recovered": 1 - (ce["spliced"] - ce["clean"]) / denom if abs(denom) > 1e-12 else float("nan"),
            "n_tokens": int(sums[g]["clean"][1]),
        }
    return out
