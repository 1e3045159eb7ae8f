"""Evaluate SAEs: reconstruction metrics per modality and loss recovered with the SAE spliced into the model.

`evaluate(sae, data)` streams activations (any source `train` accepts) and reports,
overall and on image / text tokens separately:

- `explained_variance` = 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² (x̄: the mean over that group's tokens);
- `l0`: mean number of latents firing per token; `dead`: latents that never fired on the group;
- `mse`: mean over tokens of ‖x − x̂‖².

`loss_recovered(vlm, sae, layer, samples)` runs the model on image+caption batches
and splices the SAE into `resid_pre.{layer}` with `vlens.interventions.splice_sae` (the
residual at the selected positions replaced by `decode(encode(.))`):

    loss recovered = 1 − (CE_spliced − CE_clean) / (CE_zero − CE_clean)

with CE the mean next-token cross-entropy on the caption (answer) tokens, scored by
`vlens.scoring.score_answers`, and CE_zero the same with the residual zero-ablated at
those positions (`vlens.interventions.ablate`). "overall" splices every image and caption
token; "image" only image tokens; "text" only caption tokens.

Why not SAE-Lens's `sae_lens.evals`: it runs a TransformerLens `HookedTransformer` on text
token batches; a VLM runs through nnsight with images, and the metrics here are split by
modality.
"""

from __future__ import annotations

from typing import Any, Sequence, TYPE_CHECKING

import torch
from sae_lens import SAE
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import InputError
from ..interventions import ablate, splice_sae
from ..prompts import QUESTION
from ..scoring import score_answers
from ..sites import SiteLike
from .data import IMAGE, TEXT, as_source

if TYPE_CHECKING:
    from ..model import VLM


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
        if self.n == 0 or self.sum_x is None:
            return {"n_tokens": 0, "explained_variance": float("nan"), "l0": float("nan"), "dead": float("nan"),
                    "mse": float("nan")}
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


@torch.no_grad()
def loss_recovered(
    vlm: VLM,
    sae: SAE,
    layer: SiteLike,
    samples: Sequence[Any],
    *,
    prompt: str = QUESTION,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Loss recovered with `sae` spliced into `layer` (an int L is `resid_pre.L`; any site name works), by token group.

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
    if sae.cfg.d_in != vlm.d_model:
        raise InputError(f"SAE d_in {sae.cfg.d_in} != model d_model {vlm.d_model}: this SAE belongs to another model")
    missing = [i for i, s in enumerate(samples) if getattr(s, "caption", None) is None or getattr(s, "image", None) is None]
    if missing:
        raise InputError(f"samples {missing[:5]} lack an image or a caption; loss recovered needs both")
    sae = sae.to(vlm.device)
    groups = ("overall", "image", "text")
    sums = {g: {k: [0.0, 0] for k in ("clean", "spliced", "zero")} for g in groups}  # [Σ CE, answer tokens]

    def ce(batch: Any, edit: Any = None) -> tuple[float, int]:
        """Σ CE over the answer tokens and their count, with `edit()` applied in the trace."""
        logprob, count = score_answers(vlm, batch, edit)
        return -float(logprob.sum()), int(count.sum())

    chunks = range(0, len(samples), batch_size)
    for s in tqdm(chunks, desc="loss recovered", disable=(not progress) or None):
        part = samples[s : s + batch_size]
        batch = vlm.prepare([prompt] * len(part), [x.image for x in part], answers=[x.caption for x in part])
        lay = batch.layout
        masks = {"overall": lay.image | lay.answer, "image": lay.image, "text": lay.answer}
        clean = ce(batch)
        for g in groups:
            mask = masks[g]
            runs = {"clean": clean,
                    "spliced": ce(batch, lambda: splice_sae(vlm, layer, sae, batch=batch, tokens=mask)),
                    "zero": ce(batch, lambda: ablate(vlm, layer, batch=batch, tokens=mask))}
            for k, (total, count) in runs.items():
                sums[g][k][0] += total
                sums[g][k][1] += count
    out: dict[str, dict[str, float]] = {}
    for g in groups:
        mean = {k: v[0] / max(v[1], 1) for k, v in sums[g].items()}
        denom = mean["zero"] - mean["clean"]
        out[g] = {
            "ce_clean": mean["clean"], "ce_spliced": mean["spliced"], "ce_zero": mean["zero"],
            "loss_recovered": 1 - (mean["spliced"] - mean["clean"]) / denom if abs(denom) > 1e-12 else float("nan"),
            "n_tokens": sums[g]["clean"][1],
        }
    return out
