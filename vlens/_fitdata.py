"""Features and labels for a fit, shared by dense probes (`vlens.probes`) and sparse probes (`vlens.sparsity`).

Input checks (`check_xy`), the stratified held-out split (`split`, public as
`vlens.probes.split`), standardisation on the training rows (`standardise`) and
the device a fit runs on (`device_of`). Private to vlens: one place for what
both kinds of probe do to their inputs, below both, so neither imports the other.
"""

from __future__ import annotations

import warnings

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .errors import InputError

__all__ = ["check_xy", "device_of", "labelled", "split", "standardise"]


def check_xy(X: Any, y: Any) -> tuple[Float[Tensor, "n d"], Int[Tensor, " n"]]:
    """Features `X` [n, d] as a float tensor and integer labels `y` [n], with errors that name the fix.

    Example:
        >>> X, y = check_xy([[1, 2], [3, 4]], [0.0, 1.0])
        >>> X.dtype, y.tolist()
        (torch.float32, [0, 1])
    """
    X = torch.as_tensor(X)
    y = torch.as_tensor(y)
    if X.dim() != 2:
        raise InputError(f"features X must be 2-D [n, d], got shape {tuple(X.shape)}; pool tokens first (e.g. mean over image tokens)")
    if y.dim() != 1 or y.shape[0] != X.shape[0]:
        raise InputError(f"labels y must be 1-D with one label per row of X ({X.shape[0]}), got shape {tuple(y.shape)}")
    if y.is_floating_point():
        if not torch.equal(y, y.round()):
            raise InputError("labels y must be integer class ids")
        y = y.long()
    if not X.is_floating_point():
        X = X.float()
    if not torch.isfinite(X.sum()) and not torch.isfinite(X).all():  # the sum is the fast check
        raise InputError(f"features X have {int((~torch.isfinite(X)).sum())} NaN/inf entries: check the harvest (fp16 overflow?) or drop those rows")
    return X, y.long()


def split(
    y: Int[Tensor, " n"], test_size: float = 0.2, seed: int = 0
) -> tuple[Int[Tensor, " n_train"], Int[Tensor, " n_test"]]:
    """A stratified train/test split of row indices: each class keeps ≥ 1 example on both sides.

    Example:
        >>> tr, te = split(torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 1]), test_size=0.25)
        >>> len(tr), len(te)
        (7, 3)
    """
    y = torch.as_tensor(y)
    if not 0 < test_size < 1:
        raise InputError(f"test_size must be in (0, 1), got {test_size}")
    classes, counts = torch.unique(y, return_counts=True)
    few = classes[counts < 2].tolist()
    if few:
        raise InputError(
            f"classes {few[:10]}{'...' if len(few) > 10 else ''} have fewer than two examples: a held-out split needs "
            "at least two per class; harvest more images of those classes or drop them (e.g. X[mask], y[mask])"
        )
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in classes:
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_test = min(max(1, round(test_size * idx.numel())), idx.numel() - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def device_of(device: Any, X: Tensor) -> torch.device:
    """The device a fit runs on: `device` when given, else where `X` lives.

    Example:
        >>> device_of(None, torch.zeros(1)), device_of("cpu", torch.zeros(1))
        (device(type='cpu'), device(type='cpu'))
    """
    return torch.device(device) if device is not None else X.device


def standardise(X: Float[Tensor, "n d"]) -> tuple[Float[Tensor, " d"], Float[Tensor, " d"]]:
    """Column means and standard deviations of `X` (the latter floored at 1e-6 × the largest).

    Example:
        >>> mu, sd = standardise(torch.tensor([[0.0, 1.0], [2.0, 1.0]]))
        >>> mu.tolist(), [round(s, 4) for s in sd.tolist()]
        ([1.0, 1.0], [1.4142, 0.0])
    """
    mu = X.mean(0)
    var = torch.zeros_like(mu)
    for rows in X.split(2048):  # in row blocks: X.std(0) is four times slower on CPU
        var += (rows - mu).pow_(2).sum(0)
    sd = (var / max(X.shape[0] - 1, 1)).sqrt_()
    return mu, sd.clamp(min=1e-6 * max(float(sd.max()), 1e-12))


def labelled(X: Any, y: Any, *idx: Tensor | None) -> tuple[Tensor, Tensor, list[Tensor | None]]:
    """`check_xy(X, y)` without the rows labelled -1 ("no label"), and row indices `idx` renumbered to match."""
    kind = getattr(getattr(y, "dtype", None), "kind", None)
    vals = [y] if isinstance(y, str) else y if isinstance(y, (list, tuple)) else y.tolist() if kind in ("U", "S", "O") else []
    first = next((v for v in vals if isinstance(v, str)), None)
    if first is not None:
        raise InputError(f"labels y must be integer class ids, not strings such as {first!r}: map the names to ids, "
                         "e.g. names = sorted(set(y)); y = [names.index(v) for v in y]")
    try:
        X, y = check_xy(X, y)
    except InputError:
        raise
    except (TypeError, ValueError, RuntimeError) as e:  # torch.as_tensor on ragged or object data
        raise InputError(f"features X must be a [n, d] array and labels y [n] integer class ids ({e})") from e
    if bool((y < -1).any()):
        raise InputError(f"labels must be class ids >= 0, or -1 for 'no label'; got {int(y.min())}")
    keep = y != -1
    if bool(keep.all()):
        return X, y, list(idx)
    if not bool(keep.any()):
        raise InputError("every label is -1 ('no label'): a probe needs labelled samples; give each "
                         "vlens.data.Sample a label (class id) before harvesting")
    warnings.warn(f"{int((~keep).sum())} of {len(y)} samples have no label (-1) and are left out of the fit",
                  stacklevel=3)
    new_pos = keep.long().cumsum(0) - 1
    out = [None if i is None else new_pos[torch.as_tensor(i)[keep[torch.as_tensor(i)]]] for i in idx]
    return X[keep], y[keep], out
