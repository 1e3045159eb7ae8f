"""Attention inside a trace: the `pattern.L` site and attention knockout between token groups.

`pattern.L` is `[batch, heads, query, key]`, the softmax probabilities HF's
eager attention returns as `output_attentions`. The forward itself keeps the
model's own attention implementation (SDPA by default), so reading a pattern
changes no logit. When a trace reads `pattern.L`, vlens reads what the layer
handed its attention function (nnsight's operation-level `source`: the call
`attention_interface(self, query, key, value, mask, scaling=...)` every HF
family makes): the queries and keys AFTER the q/k norms and the rotary
embedding (Qwen's M-RoPE included), the mask the layer really used (causal,
padding, Gemma 3's sliding windows and bidirectional image blocks, any
knockout), and the layer's `scaling` (Gemma 3's `query_pre_attn_scalar`) and
`softcap` when the family passes one. It then computes only the rows asked
for, `softmax(q[rows] · Kᵀ · scaling + mask[rows])`, in float32 as eager does,
with grouped-query keys shared across their heads (HF's `repeat_kv`, done
as a grouped product without copying the keys).

Why this design. The first design called the layer's attention block a
second time under eager attention and cut the requested rows out of the full
pattern: it measured 1.70-1.76x a plain forward for every layer's pattern on
the toy model, against a goal of 1.5x, and paid the q/k/v/o projections, the
value product and a `heads × seq²` tensor per layer even for one row. Reading
the attention function's inputs costs one `rows × seq` product per head and
nothing else: a trace that reads every layer's last-position row holds
`layers × heads × seq` floats (at llava-v1.6 width and one 672² image, 32 ×
2,940 per layer instead of 32 × 2,940², 1.1 GB fp32). Reading the source
makes nnsight instrument that attention module's forward (permanently, inert
outside a trace, a few dictionary look-ups per operation inside one).
`benchmarks/flow.py --time` measures both designs side by side (this one and
the eager re-call, `eager_recall_overhead`), for all queries and for the last
row only.

Attention knockout (Geva et al. 2023; Zhang et al. 2024, "cross-modal
information flow") removes the edges from a group of key tokens to a group of
query tokens in a window of layers by editing the mask each layer's attention
receives (`knockout`). It composes with any other nnsight edit of the same
trace; an empty knockout edits nothing, so the logits stay bit-identical.

    >>> import vlens, torch; from PIL import Image
    >>> vlm = vlens.tiny()
    >>> b = vlm.prepare(["<image>\\nWhat is shown?"], [Image.new("RGB", (32, 32))])
    >>> with torch.no_grad(), vlm.trace(b):
    ...     knockout(vlm, b, "image", [-1], layers=[2])
    ...     p = vlm.read("pattern.2", queries=[-1]).save()
    >>> float(p[0, :, 0][:, b.layout.image[0]].abs().sum())   # the last row sees no image token
    0.0
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .errors import InputError
from .tokens import Batch, TokenLayout, TokenSelection, select

if TYPE_CHECKING:
    from .model import VLM

__all__ = ["pattern", "pattern_rows", "knockout_mask", "knockout", "block_edges"]


def _attn_inputs(attn: Any) -> tuple[tuple, dict, Tensor]:
    """The positional args, keyword args and hidden states the attention block was called with."""
    args, kwargs = attn.inputs
    hidden = args[0] if args else kwargs.get("hidden_states")
    if hidden is None:
        raise InputError("the attention block was called without hidden states: this transformers release is not "
                         "supported for pattern sites")
    return tuple(args), dict(kwargs), hidden


def _interface_call(attn: Any) -> Any:
    """The nnsight handle of the layer's call of its attention function (the last `attention_interface_N`)."""
    source = attn.source
    calls = [n for n in source.names if n.startswith("attention_interface_")]
    if not calls:
        raise InputError(f"{type(attn._module).__name__}.forward calls no `attention_interface`: pattern sites need "
                         "an HF attention module of transformers 5 (LLaVA, Qwen, Gemma 3 and their kin)")
    return getattr(source, calls[-1])


def _rows(idx: Tensor | None, n: int, device: torch.device) -> Tensor | None:
    return None if idx is None else torch.as_tensor(idx, dtype=torch.long, device=device).reshape(-1) % n


def _causal(q: int, k: int, rows: Tensor | None, device: torch.device) -> Bool[Tensor, "rows k"]:
    """SDPA's causal fast path (`mask=None`): query i sees keys up to i + (k - q); only `rows` when given."""
    pos = torch.arange(q, device=device) if rows is None else rows
    return torch.arange(k, device=device)[None, :] <= pos[:, None] + (k - q)


def _mask_scores(scores: Tensor, mask: Tensor | None, rows: Tensor | None, q: int) -> Tensor:
    """Mask the kept rows' scores in place, as HF's eager attention does; `q` is the query count before the cut.

    A float mask is added (eager's `attn_weights + causal_mask`). A bool mask (True attends) and the causal
    case (`mask=None`, SDPA's fast path: query i sees keys up to i + (k - q)) become that float mask first
    (0 or the dtype's minimum): adding it broadcasts over the heads about 5x faster than a bool fill (measured
    on the toy's patterns, 0.24 against 1.38 ms).
    """
    lowest = torch.finfo(scores.dtype).min
    if mask is None:
        mask = _causal(q, scores.shape[-1], rows, scores.device)
    elif rows is not None:
        mask = mask.index_select(-2, rows)
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device).masked_fill_(~mask, lowest)
    return scores.add_(mask)


def pattern_rows(module: torch.nn.Module, query: Float[Tensor, "batch heads q d"],
                 key: Float[Tensor, "batch kv_heads k d"], mask: Tensor | None,
                 queries: Sequence[int] | Tensor | None = None, *, scaling: float | None = None,
                 softcap: float | None = None) -> Float[Tensor, "batch heads rows k"]:
    """Eager attention probabilities of the chosen query rows, from an attention function's own arguments.

    `query`/`key` are what HF passes its attention function (after q/k norms
    and rotary embeddings, key/value heads not yet repeated); `mask` is that
    call's mask (bool: True attends; float: additive; None: causal).

    Example:
        >>> import torch
        >>> attn = torch.nn.Module(); attn.head_dim = 2
        >>> q, k = torch.randn(1, 4, 3, 2), torch.randn(1, 2, 3, 2)  # 4 query heads share 2 key heads
        >>> p = pattern_rows(attn, q, k, None, [-1])
        >>> tuple(p.shape), bool(torch.allclose(p.sum(-1), torch.ones(1, 4, 1)))
        ((1, 4, 1, 3), True)
    """
    b, h, q, d = query.shape
    kv = key.shape[1]
    rows = _rows(queries, q, query.device)
    qr = query if rows is None else query.index_select(2, rows)
    scaling = getattr(module, "head_dim", d) ** -0.5 if scaling is None else scaling
    # [b, kv, group * rows, d] @ [b, kv, d, k]: each key head serves its `group` query heads, as repeat_kv does,
    # without copying the keys. Every step after the product works in place on the one [b, heads, rows, k]
    # tensor: at toy width a full pattern is as large as the layer's own work (benchmarks/flow.py).
    r = qr.shape[2]
    scores = (qr.reshape(b, kv, (h // kv) * r, d) @ key.transpose(-1, -2)).view(b, h, r, -1).mul_(scaling)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap  # out of place: tanh's backward reads its output
    scores = _mask_scores(scores, mask, rows, q)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)


def pattern(attn: Any, queries: Sequence[int] | Tensor | None = None) -> Float[Tensor, "batch heads query key"]:
    """Attention probabilities of one layer inside a trace, from the queries and keys its attention function got.

    `attn` is the nnsight envoy of the layer's attention block (what
    `vlm.read("pattern.L")` passes); `queries` computes only those query rows.

    Example:
        >>> import vlens, torch; from PIL import Image
        >>> vlm = vlens.tiny()
        >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
        >>> with torch.no_grad(), vlm.trace(b):
        ...     p = vlm.read("pattern.1").save()
        >>> tuple(p.shape) == (1, vlm.n_heads, b.layout.shape[1], b.layout.shape[1])
        True
    """
    args, kwargs = _interface_call(attn).inputs
    names = ("module", "query", "key", "value", "attention_mask")
    given = dict(zip(names, args)) | {n: kwargs[n] for n in names if n in kwargs}
    return pattern_rows(given["module"], given["query"], given["key"], given.get("attention_mask"), queries,
                        scaling=kwargs.get("scaling"), softcap=kwargs.get("softcap"))


def knockout_mask(batch: Batch | TokenLayout, source: TokenSelection,
                  target: TokenSelection) -> Bool[Tensor, "batch 1 seq seq"]:
    """The edges a knockout blocks: True where a `target` query would attend to a `source` key.

    A token keeps its edge to itself (a query that saw no key would make NaNs).

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny()
        >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
        >>> m = knockout_mask(b, "image", [-1])
        >>> int(m.sum()) == int(b.layout.image.sum())
        True
    """
    src, dst = select(batch, source), select(batch, target)
    block = dst[:, None, :, None] & src[:, None, None, :]
    return block & ~torch.eye(block.shape[-1], dtype=torch.bool)[None, None]


def knockout(vlm: "VLM", batch: Batch, source: TokenSelection, target: TokenSelection,
             layers: Iterable[int]) -> None:
    """Inside a trace: `target` tokens cannot attend to `source` tokens in `layers` (`knockout_mask`'s edges).

    Edits the attention mask each layer receives (bool for SDPA, additive
    for eager), so it composes with any other edit of the trace. nnsight
    visits layers in order: call it before reading anything at or after the
    window's first layer (to read a pattern inside the window, knock out and
    read one layer at a time). Blocking nothing edits nothing: the logits are
    bit-identical. In `generate` it applies to the prompt's forward.

    Example:
        >>> import vlens, torch; from PIL import Image
        >>> vlm = vlens.tiny()
        >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
        >>> with torch.no_grad(), vlm.trace(b):
        ...     knockout(vlm, b, "image", "text", layers=[0, 1])
        ...     logits = vlm.read("logits").save()
        >>> bool(logits.isfinite().all())
        True
    """
    block = knockout_mask(batch, source, target)
    block_edges(vlm, {L: block for L in layers})


def block_edges(vlm: "VLM", blocks: Mapping[int, Bool[Tensor, "batch 1 seq seq"]]) -> None:
    """Inside a trace: in each layer `L` of `blocks`, block the edges `blocks[L]` (True: query may not see key).

    The general form of `knockout` (a different block per layer, e.g. one
    window per stacked copy of a batch in `vlens.flow.knockout_sweep`).
    Layers whose block is empty are not touched.

    Example:
        >>> import vlens, torch; from PIL import Image
        >>> vlm = vlens.tiny()
        >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
        >>> with torch.no_grad(), vlm.trace(b):
        ...     block_edges(vlm, {1: knockout_mask(b, "image", "text")})
        ...     logits = vlm.read("logits").save()
        >>> bool(logits.isfinite().all())
        True
    """
    todo = {vlm.site(f"pattern.{L}").index: m for L, m in blocks.items() if bool(m.any())}
    for L in sorted(todo):
        attn = vlm.envoy(f"pattern.{L}")
        args, kwargs, hidden = _attn_inputs(attn)
        mask = kwargs.get("attention_mask")
        q = k = hidden.shape[-2]
        cut = todo[L].to(hidden.device)
        if mask is not None and mask.dtype != torch.bool:
            new = mask.masked_fill(cut, torch.finfo(mask.dtype).min)
        else:
            new = (_causal(q, k, None, hidden.device)[None, None] if mask is None else mask) & ~cut
        kwargs["attention_mask"] = new
        attn.inputs = (args, kwargs)
