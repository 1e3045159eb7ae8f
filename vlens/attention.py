"""Attention inside a trace: the `pattern.L` site and attention knockout between token groups.

`pattern.L` is `[batch, heads, query, key]`, the softmax probabilities HF's
eager attention returns as `output_attentions`. The forward itself keeps the
model's own attention implementation (SDPA by default), so reading a pattern
changes no logit. When a trace reads `pattern.L`, the layer's attention block
is called a second time, ad hoc, on the very inputs the forward gave it
(hidden states, rotary embeddings, mask), with `config._attn_implementation`
set to `"eager"` for that one call and the mask turned into eager's additive
form. Every family-specific detail therefore comes from the model's own code:
Qwen's M-RoPE (the position embeddings the model computed), Gemma 3's q/k
norms, query scaling and sliding windows (each layer's own mask), grouped-
query heads (`repeat_kv`), Gemma 3's bidirectional image attention.

Why recompute rather than switch the whole forward to eager: the forward's
numbers stay the model's (bit-identical logits), only the layers read pay, and
nothing has to be set before the trace starts. The cost is one extra attention
block (q/k/v/o projections and an eager softmax) per layer read: about a third
of a layer's compute at toy width, and a transient `heads × seq²` float
tensor per layer (32 × 2,940² fp32 is 1.1 GB at llava-v1.6 width for one
672² image). `queries` keeps only the rows asked for, so a trace that reads
every layer's last-position row holds `layers × heads × seq` floats, not
`layers × heads × seq²`. The overhead is measured by `benchmarks/flow.py`.

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

__all__ = ["pattern", "eager_mask", "knockout_mask", "knockout", "block_edges"]


def _attn_inputs(attn: Any) -> tuple[tuple, dict, Tensor]:
    """The positional args, keyword args and hidden states the attention block was called with."""
    args, kwargs = attn.inputs
    hidden = args[0] if args else kwargs.get("hidden_states")
    if hidden is None:
        raise InputError("the attention block was called without hidden states: this transformers release is not "
                         "supported for pattern sites")
    return tuple(args), dict(kwargs), hidden


def _allowed(mask: Tensor | None, q: int, k: int, device: torch.device) -> Bool[Tensor, "b 1 q k"]:
    """Which key each query may attend to, from the mask a layer received (None: plain causal, as SDPA skips it)."""
    if mask is None:
        return torch.ones(q, k, dtype=torch.bool, device=device).tril(k - q)[None, None]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def eager_mask(mask: Tensor | None, q: int, k: int, dtype: torch.dtype,
               device: torch.device) -> Float[Tensor, "b 1 q k"]:
    """The additive float mask HF's eager attention takes, from the mask a layer received (bool, float or None).

    Example:
        >>> import torch
        >>> eager_mask(None, 2, 2, torch.float32, torch.device("cpu"))[0, 0, 0, 1] == torch.finfo(torch.float32).min
        tensor(True)
    """
    allowed = _allowed(mask, q, k, device)
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def pattern(attn: Any, queries: Sequence[int] | Tensor | None = None) -> Float[Tensor, "batch heads query key"]:
    """Attention probabilities of one layer, recomputed inside a trace from its attention block's inputs.

    `attn` is the nnsight envoy of the layer's attention block (what
    `vlm.read("pattern.L")` passes); `queries` keeps those query rows.

    Example:
        >>> import vlens, torch; from PIL import Image
        >>> vlm = vlens.tiny()
        >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
        >>> with torch.no_grad(), vlm.trace(b):
        ...     p = vlm.read("pattern.1").save()
        >>> tuple(p.shape) == (1, vlm.n_heads, b.layout.shape[1], b.layout.shape[1])
        True
    """
    args, kwargs, hidden = _attn_inputs(attn)
    q = k = hidden.shape[-2]
    kwargs.pop("hidden_states", None)
    kwargs["attention_mask"] = eager_mask(kwargs.get("attention_mask"), q, k, hidden.dtype, hidden.device)
    kwargs["past_key_values"] = None  # never write the trace's KV cache twice
    config = attn._module.config
    before = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        _, weights = attn(hidden, *args[1:], **kwargs)
    finally:
        config._attn_implementation = before
    if queries is None:
        return weights
    idx = torch.as_tensor(queries, dtype=torch.long, device=weights.device).reshape(-1)
    return weights.index_select(2, idx % q)


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
            new = _allowed(mask, q, k, hidden.device) & ~cut
        kwargs["attention_mask"] = new
        attn.inputs = (args, kwargs)
