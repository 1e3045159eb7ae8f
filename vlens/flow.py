"""Where the image reaches the answer: knockout sweeps, attention to the image, and head attribution.

Three views of the flow from image tokens to the answer, each one function:

* `knockout_sweep`: block the attention edges from one token group to another
  (`vlens.attention.knockout`) in a window of layers, for every window and
  group pair, and measure the answer (Zhang et al. 2024, "cross-modal
  information flow"; Geva et al. 2023's attention knockout), one forward per
  window (measured faster than stacking the windows into one forward on CPU;
  see `_knocked_out`). `FlowSweep.figure()` draws the relative change
  in the answer's probability per window, one line per pair.
* `image_attention`: per layer and head, the share of a query group's
  attention that lands on the image's base-tile, high-res and newline tokens;
  `patch_attention` gives one layer's (and head's) attention per image token,
  drawn over the image with `vlens.viz.heatmap_overlay` through the token
  geometry (`vlens.lens.patch_values`).
* `head_attribution`: each head's direct logit attribution (DLA) to the
  answer token at the predicting position, next to the change in the answer's
  log-probability when that head is zero-ablated (`z.L` with a head index).
  DLA freezes every RMSNorm's scale at its value in this forward (the final
  norm, and Gemma 3's post-attention norm), so the heads' DLAs and every
  other block's add up to the answer's logit exactly.

The answer is the batch's `answers` (teacher-forced: every answer token is
predicted at the position before it); without answers, the model's own top
token at the last position.

    >>> import vlens; from PIL import Image
    >>> vlm = vlens.tiny(words=["red", "blue"])
    >>> b = vlm.prepare(["<image>\\nWhat is it?"], [Image.new("RGB", (32, 32))], answers=["red"])
    >>> sweep = knockout_sweep(vlm, b, {"image -> last": ("image", last)}, window=2)
    >>> sweep.windows
    [(0, 1), (1, 2), (2, 3)]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .attention import block_edges, knockout_mask
from .errors import InputError
from .scoring import answer_correct, answer_logprob
from .tokens import Batch, TokenLayout, TokenSelection, select

if TYPE_CHECKING:
    from .model import VLM

__all__ = ["last", "FlowSweep", "knockout_sweep", "image_attention", "patch_attention", "head_attribution",
           "IMAGE_PARTS"]

#: The image-token kinds `image_attention` splits attention by (`TokenLayout.kind_mask`).
IMAGE_PARTS = ("base", "highres", "newline")


def last(layout: TokenLayout) -> Bool[Tensor, "batch seq"]:
    """The positions that predict the answer: the last prompt token and every answer token but the final one.

    Without answers, each row's last position. A token selection (pass it where a `TokenSelection` goes).

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny(words=["red", "blue"])
        >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))], answers=["red blue"])
        >>> last(b.layout).nonzero()[:, 1].tolist() == [b.layout.shape[1] - 3, b.layout.shape[1] - 2]
        True
    """
    ans = layout.answer
    out = torch.zeros_like(ans)
    out[:, :-1] = ans[:, 1:]
    none = ~ans.any(1)
    out[none, -1] = True
    return out


def _answer_ids(vlm: "VLM", batch: Batch, logits: Tensor) -> tuple[Tensor, Tensor]:
    """(input ids with the answer, answer mask): the batch's answers, or the clean top token appended."""
    ids, answer = batch.layout.input_ids.to(logits.device), batch.layout.answer.to(logits.device)
    if answer.any():
        return ids, answer
    top = logits[:, -1].argmax(-1, keepdim=True)
    ids = torch.cat([ids, top], 1)
    return ids, torch.cat([torch.zeros_like(answer), torch.ones_like(top, dtype=torch.bool)], 1)


def _scores(logits: Tensor, ids: Tensor, answer: Tensor) -> tuple[Tensor, Tensor]:
    """(answer probability, exactly-correct) per row; a missing final position is padded with the logits' end."""
    if ids.shape[1] > logits.shape[1]:
        logits = torch.cat([logits, logits[:, -1:]], 1)
    lp, _ = answer_logprob(logits, ids, answer)
    return lp.exp(), answer_correct(logits, ids, answer)


@dataclass
class FlowSweep:
    """A knockout sweep: the answer's probability and accuracy per group pair and layer window.

    `prob` / `correct` are `[pairs, windows, batch]`; `clean_prob` / `clean_correct` are `[batch]`.
    """

    pairs: list[str]
    windows: list[tuple[int, int]]
    prob: Float[Tensor, "pairs windows batch"]
    correct: Bool[Tensor, "pairs windows batch"]
    clean_prob: Float[Tensor, " batch"]
    clean_correct: Bool[Tensor, " batch"]

    def change(self) -> Float[Tensor, "pairs windows"]:
        """Relative change of the mean answer probability, in percent (the information-flow paper's measure).

        Example:
            >>> s = FlowSweep(["a"], [(0, 0)], torch.tensor([[[0.25]]]), torch.tensor([[[True]]]),
            ...               torch.tensor([0.5]), torch.tensor([True]))
            >>> s.change().tolist()
            [[-50.0]]
        """
        base = self.clean_prob.mean().clamp_min(1e-12)
        return (self.prob.mean(-1) - base) / base * 100

    def accuracy(self) -> Float[Tensor, "pairs windows"]:
        """Exact-answer accuracy under each knockout."""
        return self.correct.float().mean(-1)

    def figure(self, title: str = "Attention knockout: change in the answer's probability"):
        """One plotly figure: x the layer window, y the relative change (%), one line per group pair."""
        import plotly.graph_objects as go

        x = [f"{a}–{b}" if a != b else str(a) for a, b in self.windows]
        fig = go.Figure([go.Scatter(x=x, y=row.tolist(), mode="lines+markers", name=name)
                         for name, row in zip(self.pairs, self.change())])
        fig.update_layout(title=title, xaxis_title="layers knocked out", yaxis_title="change in p(answer), %",
                          template="plotly_white", height=360)
        return fig


def _windows(n_layers: int, window: int) -> list[tuple[int, int]]:
    if not 1 <= window <= n_layers:
        raise InputError(f"window={window} must be 1..{n_layers} layers (this model's depth)")
    return [(s, s + window - 1) for s in range(n_layers - window + 1)]


def knockout_sweep(vlm: "VLM", batch: Batch, pairs: Mapping[str, tuple[TokenSelection, TokenSelection]],
                   window: int = 1) -> FlowSweep:
    """The answer under attention knockout of every group pair in every window of `window` layers.

    `pairs` maps a name to `(source, target)`: `target` tokens may not
    attend to `source` tokens (e.g. `{"image -> last": ("image", last)}`).

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny(words=["red", "blue"])
        >>> b = vlm.prepare(["<image>\\nWhat?"], [Image.new("RGB", (32, 32))], answers=["red"])
        >>> s = knockout_sweep(vlm, b, {"q -> last": ("prompt", last)}, window=4)
        >>> tuple(s.prob.shape), s.figure().data[0].name
        ((1, 1, 1), 'q -> last')
    """
    from tqdm.auto import tqdm

    wins = _windows(vlm.n_layers, window)
    batch = batch.to(vlm.device)
    with torch.no_grad(), vlm.trace(batch):
        clean = vlm.read("logits").save()
    ids, answer = _answer_ids(vlm, batch, clean)
    clean_p, clean_ok = _scores(clean, ids, answer)
    probs, oks = [], []
    for source, target in tqdm(pairs.values(), desc="knockout", disable=len(pairs) < 4 or None):
        edges = knockout_mask(batch, source, target)
        p, ok = zip(*(_knocked_out(vlm, batch, edges, a, b, ids, answer) for a, b in wins))
        probs.append(torch.stack(p))
        oks.append(torch.stack(ok))
    return FlowSweep(list(pairs), wins, torch.stack(probs).float().cpu(), torch.stack(oks).cpu(),
                     clean_p.float().cpu(), clean_ok.cpu())


def _knocked_out(vlm: "VLM", batch: Batch, edges: Tensor, first: int, last_layer: int, ids: Tensor,
                 answer: Tensor) -> tuple[Tensor, Tensor]:
    """The answer's probability and exactness with `edges` blocked in layers first..last_layer.

    One forward per window. Stacking every window's copy of the batch into one
    forward was tried and measured slower on CPU: 0.86 s against 0.54 s for
    five windows of a 50-image toy batch (benchmarks/flow.py, idle machine).
    """
    with torch.no_grad(), vlm.trace(batch):
        block_edges(vlm, {L: edges for L in range(first, last_layer + 1)})
        logits = vlm.read("logits").save()
    return _scores(logits, ids, answer)


def image_attention(vlm: "VLM", batch: Batch, queries: TokenSelection = last,
                    layers: Sequence[int] | None = None) -> Float[Tensor, "layers heads parts"]:
    """Per layer and head, the share of the `queries` tokens' attention on each image part (`IMAGE_PARTS`).

    Averaged over the selected query tokens of every row. The last entry of
    the parts axis is the whole image (the sum of the parts).

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny()
        >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
        >>> a = image_attention(vlm, b)
        >>> tuple(a.shape) == (vlm.n_layers, vlm.n_heads, len(IMAGE_PARTS) + 1)
        True
    """
    layers = list(range(vlm.n_layers)) if layers is None else [vlm.site(f"pattern.{L}").index for L in layers]
    q = select(batch, queries, nonempty=True).to(vlm.device)
    if not q.any():
        raise InputError("the query selection picks no token of this batch")
    parts = torch.stack([batch.layout.kind_mask(k) for k in IMAGE_PARTS] + [batch.layout.image], -1).float()
    rows = []
    with torch.no_grad(), vlm.trace(batch.to(vlm.device)):
        for L in sorted(layers):
            p = vlm.read(f"pattern.{L}").float()  # [b, h, q, k]
            share = torch.einsum("bhqk,bkp->bhqp", p, parts.to(p.device))
            rows.append((share * q[:, None, :, None]).sum((0, 2)).div(q.sum()).cpu().save())
    return torch.stack(list(rows))


def patch_attention(vlm: "VLM", batch: Batch, layer: int, head: int | None = None,
                    queries: TokenSelection = last) -> Float[Tensor, "batch seq"]:
    """One layer's attention from the `queries` tokens to every key token (mean over queries; all heads or one).

    Draw it over the image with `vlens.lens.patch_values` and `vlens.viz.heatmap_overlay`.

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny()
        >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
        >>> a = patch_attention(vlm, b, layer=1, head=0)
        >>> a.shape == b.layout.shape, round(float(a.sum()), 4)
        (True, 1.0)
    """
    q = select(batch, queries, nonempty=True).to(vlm.device).float()
    with torch.no_grad(), vlm.trace(batch.to(vlm.device)):
        p = vlm.read(f"pattern.{layer}").float()
        p = p.mean(1) if head is None else p[:, head]
        out = (torch.einsum("bqk,bq->bk", p, q) / q.sum(1, keepdim=True).clamp_min(1)).cpu().save()
    return out


def _eps(norm: Any) -> float:
    """An RMSNorm module's epsilon (HF names it `variance_epsilon` or `eps`)."""
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 0.0)))


def _gain(norm: Any, d: int, like: Tensor) -> Tensor:
    """An RMSNorm's elementwise gain (norm(x) = gain * x / rms(x)), read off the module as norm(ones)·√(1+eps)."""
    with torch.no_grad():
        return norm(torch.ones(d, dtype=like.dtype, device=like.device)).float().detach() * (1 + _eps(norm)) ** 0.5


def _rms(x: Tensor, norm: Any) -> Tensor:
    return x.float().pow(2).mean(-1, keepdim=True).add(_eps(norm)).sqrt()


def head_attribution(vlm: "VLM", batch: Batch, ablate: bool = True) -> dict[str, Tensor]:
    """Each head's direct logit attribution to the answer, and the answer change when the head is zero-ablated.

    Returns `{"dla": [layers, heads], "ablation": [layers, heads]}`, means
    over the rows and answer tokens: DLA in logits of the answer token at its
    predicting position; ablation as the change in the answer's log-prob.
    `ablate=False` skips the `layers × heads` ablation forwards.

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny(words=["red", "blue"])
        >>> b = vlm.prepare(["<image>\\nWhat?"], [Image.new("RGB", (32, 32))], answers=["red"])
        >>> r = head_attribution(vlm, b)
        >>> tuple(r["dla"].shape) == tuple(r["ablation"].shape) == (vlm.n_layers, vlm.n_heads)
        True
    """
    batch = batch.to(vlm.device)
    n, H, dh = vlm.n_layers, vlm.n_heads, vlm.d_head
    zs = []
    with torch.no_grad(), vlm.trace(batch):
        for L in range(n):
            zs.append(vlm.read(f"z.{L}").save())
        final = vlm.read(f"resid_post.{n - 1}").save()
        clean = vlm.read("logits").save()
    ids, answer = _answer_ids(vlm, batch, clean)
    pos = last(batch.layout).to(vlm.device)  # [b, s]: the positions that predict an answer token
    nxt = ids[:, 1:]
    nxt = torch.cat([nxt, torch.zeros_like(nxt[:, :1])], 1) if nxt.shape[1] < pos.shape[1] else nxt
    target = nxt[pos]  # the answer token each of them predicts
    fnorm = vlm.submodule("final_norm")
    W_U = vlm.hf_model.get_output_embeddings().weight.detach()
    unembed = W_U[target].float() * _gain(fnorm, vlm.d_model, final) / _rms(final[pos], fnorm)  # [m, d]
    dla = torch.zeros(n, H)
    for L in range(n):
        W = vlm.submodule(f"z.{L}").weight.detach().float().view(-1, H, dh)  # o_proj: [d, H, dh]
        heads = torch.einsum("mhe,dhe->mhd", zs[L][pos].float(), W)  # each head's write before any post-norm
        post = vlm.submodule(f"attn_out.{L}")
        if post is not vlm.submodule(f"pattern.{L}"):  # Gemma 3: the post-attention norm, its scale frozen
            heads = heads * _gain(post, vlm.d_model, heads) / _rms(heads.sum(1), post)[:, None]
        dla[L] = torch.einsum("mhd,md->h", heads, unembed).cpu() / len(target)
    out = {"dla": dla}
    if ablate:
        out["ablation"] = _ablations(vlm, batch, ids, answer, clean)
    return out


def _ablations(vlm: "VLM", batch: Batch, ids: Tensor, answer: Tensor, clean: Tensor) -> Tensor:
    from tqdm.auto import tqdm

    base, _ = answer_logprob(torch.cat([clean, clean[:, -1:]], 1) if ids.shape[1] > clean.shape[1] else clean,
                             ids, answer)
    n_tokens = answer.sum().clamp_min(1)
    out = torch.zeros(vlm.n_layers, vlm.n_heads)
    for L in tqdm(range(vlm.n_layers), desc="head ablations", disable=None):
        for h in range(vlm.n_heads):
            with torch.no_grad(), vlm.trace(batch):
                vlm.read(f"z.{L}")[:, :, h] = 0.0
                logits = vlm.read("logits").save()
            if ids.shape[1] > logits.shape[1]:
                logits = torch.cat([logits, logits[:, -1:]], 1)
            lp, _ = answer_logprob(logits, ids, answer)
            out[L, h] = float((lp - base).sum() / n_tokens)
    return out
