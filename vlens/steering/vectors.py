"""Steering vectors: each returns a [d_model] tensor (`normalize=True` makes it unit norm).

* `diff_of_means(X, y, src, tgt)`: mean image activation of `tgt` minus that of `src` (the paper's vector),
  from `class_means(X, y)`;
* `from_probe(probe, tgt, src)`: a probe's weight direction(s) (`vlens.probes`);
* `unembedding_diff(vlm, src_name, tgt_name)`: difference of the class names' rows of the LM head;
* `random_like(v)`: a random control of the same norm;
* `normalize(v)`: `v / ‖v‖`.

A few SAE decoder directions that reproduce a vector: `vlens.sparsity.sparse_approximation`.
"""

from __future__ import annotations

from typing import Any, TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..errors import InputError, NonFiniteActivations
from ..interventions import check_vector

if TYPE_CHECKING:
    from ..model import VLM

__all__ = ["class_means", "diff_of_means", "from_probe", "normalize", "random_like", "unembedding_diff"]


def normalize(v: Float[Tensor, " d"]) -> Float[Tensor, " d"]:
    """`v / ‖v‖`, refusing the zero vector.

    Example:
        >>> normalize(torch.tensor([3.0, 4.0]))
        tensor([0.6000, 0.8000])
    """
    n = v.norm()
    if not torch.isfinite(n) or n == 0:
        raise InputError("cannot normalise a zero or non-finite vector: check how it was built (identical class means?)")
    return v / n


def _maybe_norm(v: Tensor, flag: bool) -> Tensor:
    return normalize(v) if flag else v


def class_means(
    X: Float[Tensor, "n d"], y: Int[Tensor, " n"], n_classes: int | None = None, *, min_count: int = 2
) -> Float[Tensor, "n_classes d"]:
    """Mean feature per class (row c = mean of X[y == c]); classes with fewer than `min_count` examples are NaN.

    Rows labelled -1 ("no label", as a harvest stores a sample without one) are left out.

    Example:
        >>> class_means(torch.tensor([[0.0], [2.0], [5.0], [7.0]]), torch.tensor([0, 0, 1, 1]))
        tensor([[1.],
                [6.]])
    """
    X, y = _xy(X, y)
    X, y = X[y != -1], y[y != -1]
    top = int(y.max()) + 1 if len(y) else 0
    if n_classes is not None and n_classes < top:
        raise InputError(f"labels go up to {top - 1} but n_classes={n_classes}: pass n_classes >= {top} or None")
    C = top if n_classes is None else n_classes
    sums = torch.zeros(C, X.shape[1], dtype=X.dtype, device=X.device).index_add_(0, y.to(X.device), X)
    cnt = torch.bincount(y, minlength=C).to(X.device)
    means = sums / cnt[:, None].clamp(min=1)
    means[cnt < min_count] = float("nan")
    return means


def diff_of_means(
    X: Float[Tensor, "n d"], y: Int[Tensor, " n"], src: int, tgt: int, *, normalize: bool = False
) -> Float[Tensor, " d"]:
    """The paper's steering vector: mean of class `tgt` minus mean of class `src`.

    Example:
        >>> X = torch.tensor([[0.0, 1], [0, 3], [4, 0], [6, 0]]); y = torch.tensor([0, 0, 1, 1])
        >>> diff_of_means(X, y, src=0, tgt=1)
        tensor([ 5., -2.])
    """
    X, y = _xy(X, y)
    for name, c in (("src", src), ("tgt", tgt)):
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise InputError(f"{name}={c!r} is not a class id (an int >= 0; -1 means 'no label')")
    if src == tgt:
        raise InputError(f"src and tgt are the same class ({src}): the difference of its mean with itself is zero")
    for c in (src, tgt):
        n = int((y == c).sum())
        if n < 2:
            raise InputError(
                f"class {c} has {n} example(s); a class mean needs at least two: harvest more images of class {c}"
            )
    rows = (y == src) | (y == tgt)
    bad = ~torch.isfinite(X[rows]).all(1)
    if bool(bad.any()):
        where = rows.nonzero().flatten()[bad][:5].tolist()
        raise NonFiniteActivations(f"rows {where} of X (classes {src}/{tgt}) hold NaN/inf, so the class means would "
                                   "be NaN: drop those rows or check the harvest (e.g. fp16 overflow)")
    m = class_means(X, y, n_classes=max(int(y.max()), src, tgt) + 1)
    return _maybe_norm(m[tgt] - m[src], normalize)


def _xy(X: Any, y: Any) -> tuple[Tensor, Tensor]:
    """Features [n, d] as float and integer labels [n] (>= -1), refusing strings and shapes that do not match."""
    if any(isinstance(v, str) for v in ([y] if isinstance(y, str) else y if isinstance(y, (list, tuple)) else [])) \
            or getattr(getattr(y, "dtype", None), "kind", None) in ("U", "S", "O"):
        raise InputError("labels y must be integer class ids, not strings: map the names to ids, e.g. "
                         "names = sorted(set(y)); y = [names.index(v) for v in y]")
    try:
        X, y = torch.as_tensor(X).float(), torch.as_tensor(y)
    except (TypeError, ValueError, RuntimeError) as e:
        raise InputError(f"need X [n, d] (numbers) and y [n] (class ids): {e}") from e
    if X.dim() != 2 or y.shape != (X.shape[0],):
        raise InputError(f"need X [n, d] and y [n], got {tuple(X.shape)} and {tuple(y.shape)}")
    if y.is_floating_point() and not torch.equal(y, y.round()):
        raise InputError("labels y must be integer class ids")
    y = y.long()
    if bool((y < -1).any()):
        raise InputError(f"labels must be class ids >= 0, or -1 for 'no label'; got {int(y.min())}")
    return X, y


def from_probe(probe: Any, tgt: int, src: int | None = None, *, normalize: bool = False) -> Float[Tensor, " d"]:
    """A probe's direction towards `tgt`: `W[tgt] - W[src]` (or `W[tgt]`) for a multiclass probe,
    the pair's weight for `PairwiseProbes` (needs `src`). Weights are in the raw activation space.

    Example:
        >>> from vlens.probes import fit_probe
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.arange(2).repeat_interleave(30); X = torch.randn(60, 4, generator=g) + 3 * torch.eye(2, 4)[y]
        >>> v = from_probe(fit_probe(X, y), tgt=1, src=0, normalize=True)
        >>> bool(v[1] > 0 > v[0])
        True
    """
    if hasattr(probe, "pairs"):
        if src is None:
            raise InputError("pairwise probes need src: from_probe(pp, tgt, src)")
        v = probe.direction(src, tgt)
    else:
        v = probe.direction(tgt)
        if src is not None:
            v = v - probe.direction(src)
    return _maybe_norm(v.detach().float().cpu(), normalize)


def name_ids(tok: Any, name: str) -> list[int]:
    """The token ids of a class name (no special tokens), refused when empty or holding unknown tokens.

    Example:
        >>> import vlens
        >>> tok = vlens.tiny(words=["red", "circle"]).tokenizer
        >>> len(name_ids(tok, "red circle"))
        2
    """
    ids = tok(name, add_special_tokens=False)["input_ids"]
    if not ids:
        raise InputError(f"class name {name!r} tokenizes to nothing")
    unk = getattr(tok, "unk_token_id", None)
    if unk is not None and unk in ids:
        raise InputError(f"class name {name!r} has unknown tokens for this tokenizer: {tok.convert_ids_to_tokens(ids)}")
    return ids


def unembedding_diff(
    vlm: VLM, src_name: str, tgt_name: str, *, mode: str = "first", normalize: bool = False
) -> Float[Tensor, " d_model"]:
    """Difference of the LM-head rows of two class names: `W_U[tgt] - W_U[src]`.

    Multi-token names: `mode="first"` uses the first position where the two
    names' token ids differ (e.g. "red circle" vs "red square" → "circle" vs
    "square"); `mode="mean"` uses the mean of each name's token rows.

    Example:
        >>> import vlens
        >>> vlm = vlens.tiny(words=["red", "blue", "circle"])
        >>> unembedding_diff(vlm, "red circle", "blue circle").shape
        torch.Size([64])
    """
    tok = vlm.tokenizer
    a, b = name_ids(tok, src_name), name_ids(tok, tgt_name)
    W = vlm.hf_model.get_output_embeddings().weight.detach().float().cpu()
    if mode == "first":
        i = next((i for i, (p, q) in enumerate(zip(a, b)) if p != q), None)
        if i is None:
            if len(a) == len(b):
                raise InputError(f"{src_name!r} and {tgt_name!r} tokenize identically: no unembedding difference")
            i = min(len(a), len(b))
            ra = W[a[i]] if i < len(a) else torch.zeros_like(W[0])
            rb = W[b[i]] if i < len(b) else torch.zeros_like(W[0])
            return _maybe_norm(rb - ra, normalize)
        v = W[b[i]] - W[a[i]]
    elif mode == "mean":
        v = W[b].mean(0) - W[a].mean(0)
    else:
        raise InputError(f"mode must be 'first' or 'mean', not {mode!r}")
    return _maybe_norm(v, normalize)


def random_like(v: Float[Tensor, " d"], seed: int = 0) -> Float[Tensor, " d"]:
    """A random Gaussian direction with the same norm as `v` (the control vector).

    Example:
        >>> v = torch.tensor([3.0, 4.0, 0.0])
        >>> round(float(random_like(v).norm()), 4)
        5.0
    """
    v = check_vector(v, v.shape[-1])
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(v.shape[-1], generator=g, dtype=torch.float32)
    return (r / r.norm() * v.norm()).to(v.dtype)
