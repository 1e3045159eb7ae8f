"""`read_layers`: the one way vlens reads activations out of a forward pass.

Harvests, probe features, SAE data, dashboards and the demo all call it;
`pool_features` is the in-memory pass over a small data set built on it (one
row per sample, the mean over its selected tokens), the one home of that loop. One
forward reads every requested site in execution order, keeps only the
selected tokens (or their mean per row), moves them to the CPU in the asked
dtype at once, and stops the forward after the deepest site: no later layer
and no LM head run.

    >>> import vlens; from PIL import Image
    >>> from vlens.activations import read_layers
    >>> vlm = vlens.tiny()
    >>> b = vlm.prepare(["<image>\\nWhat is shown?"] * 2, [Image.new("RGB", (32, 32))] * 2)
    >>> acts = read_layers(vlm, b, [1, "resid_post.2"], pool="mean")
    >>> {k: tuple(v.shape) for k, v in acts.items()}
    {1: (2, 64), 'resid_post.2': (2, 64)}
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import InputError
from ..prompts import QUESTION
from ..sites import Site, SiteLike
from ..tokens import Batch, TokenSelection, select

if TYPE_CHECKING:
    from ..model import VLM

__all__ = ["read_layers", "pool_features", "POOLS"]

#: What `pool` accepts: None (one row per selected token) or "mean" (one row per batch row).
POOLS = (None, "mean")


def read_layers(
    vlm: "VLM",
    batch: Batch,
    sites: SiteLike | Sequence[SiteLike],
    *,
    tokens: TokenSelection = "image",
    pool: str | None = None,
    dtype: torch.dtype | None = None,
) -> dict[Any, Float[Tensor, "rows d"]]:
    """Activations at `sites` for the selected tokens of `batch`, from one forward that stops early.

    Args:
        vlm: the model.
        batch: a `Batch` from `vlm.prepare`.
        sites: one site or several (an int L is `resid_pre.L`; any name of `vlm.sites`).
            `z.L` gives the heads concatenated (`[rows, heads × d_head]`, as
            SAE-Lens's hook_z SAEs read it); `pattern.L` gives the selected
            tokens' query rows, `[rows, heads, seq]`.
        tokens: a token selection (`vlens.tokens.select`); default the image tokens.
        pool: None keeps one row per selected token, in row-major order
            (`h[mask]`); "mean" gives one row per batch row, the mean over its
            selected tokens (zeros where it selects none).
        dtype: dtype of the returned CPU tensors (default: the model's).

    Returns:
        A dict from each given site (as given) to a CPU tensor `[rows, d]`.

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny()
        >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
        >>> h = read_layers(vlm, b, 2, tokens="image")[2]
        >>> h.shape[0] == int(b.layout.image.sum())
        True
    """
    if not isinstance(batch, Batch):
        raise InputError(f"read_layers needs a Batch from vlm.prepare(prompts, images), not {type(batch).__name__}")
    if pool not in POOLS:
        raise InputError(f"pool must be None (one row per token) or 'mean' (one row per batch row), not {pool!r}")
    keys = list(sites) if isinstance(sites, (list, tuple)) else [sites]
    if not keys:
        raise InputError("give at least one site to read, e.g. read_layers(vlm, batch, [8])")
    resolved = {k: vlm.site(k) for k in keys}
    order = {name: i for i, name in enumerate(vlm.sites)}
    keys.sort(key=lambda k: order[resolved[k].name])
    out_dtype = dtype or vlm.dtype
    mask = select(batch, tokens).to(vlm.device)
    if pool == "mean":  # weights that sum to 1 per row: a mean that cannot overflow in fp16
        weights = (mask.float() / mask.sum(1, keepdim=True).clamp(min=1)).to(vlm.dtype)
    saved: dict[Any, Tensor] = {}
    with torch.inference_mode(), vlm.trace(batch.to(vlm.device)) as tracer:
        for k in keys:
            h = _tokens_first(vlm, resolved[k])
            v = h[mask] if pool is None else einops.einsum(h, weights.to(h.dtype), "b s ..., b s -> b ...")
            saved[k] = v.to("cpu", out_dtype).save()
        tracer.stop()
    return saved


def _tokens_first(vlm: "VLM", site: Site) -> Tensor:
    """The site's value with the token axes first: `[batch, seq, ...]` (a pattern's queries moved before its heads)."""
    if site.kind == "pattern":
        return vlm.read(site).transpose(1, 2)
    return vlm.vectors(site)
def pool_features(
    vlm: "VLM",
    samples: Sequence[Any],
    sites: SiteLike | Sequence[SiteLike],
    *,
    prompt: str = QUESTION,
    tokens: TokenSelection = "image",
    batch_size: int = 8,
    callback: Callable[[int, int], None] | None = None,
) -> dict[Any, Float[Tensor, "n d"]]:
    """Mean activations per sample at `sites`, in memory: `read_layers(..., pool="mean")` batch by batch.

    For data sets small enough to hold (probe features, the explorer); larger
    ones go to disk with `vlens.harvest(..., pool="mean")`. `samples` are
    `vlens.data.Sample`s (or PIL images); `callback(done, n)` is called before
    each batch (it may raise to stop).

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny()
        >>> feats = pool_features(vlm, [Image.new("RGB", (32, 32))] * 3, [1, 3], batch_size=2)
        >>> {k: tuple(v.shape) for k, v in feats.items()}
        {1: (3, 64), 3: (3, 64)}
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, not {batch_size!r}")
    keys = list(sites) if isinstance(sites, (list, tuple)) else [sites]
    out: dict[Any, list[Tensor]] = {k: [] for k in keys}
    n = len(samples)
    for i in range(0, n, batch_size):
        if callback is not None:
            callback(i, n)
        part = [getattr(s, "image", s) for s in samples[i : i + batch_size]]
        feats = read_layers(vlm, vlm.prepare([prompt] * len(part), part), keys, tokens=tokens, pool="mean",
                            dtype=torch.float32)
        for k in keys:
            out[k].append(feats[k])
    return {k: torch.cat(v) if v else torch.zeros(0, vlm.d_model) for k, v in out.items()}
