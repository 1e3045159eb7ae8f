"""Activation sources for SAE training and evaluation: tensors, iterables, `ActivationStore`s.

Everything the trainer reads goes through `as_source(data)`, which accepts

- a `[N, d]` tensor (or numpy / memory-mapped array), optionally with a `[N]` modality
  tensor (1 = image token, 0 = text token), as `x` or `(x, modality)`;
- an `ActivationStore` (`vlens.activations`) plus a layer (`StoreSource(store, layer)`), reading its
  memory-mapped activations and its `modality` meta column;
- a list of those (concatenated: e.g. image+caption tokens and a text-only caption pass);
- any iterable / iterator of `[batch, d]` tensors or `(x, modality)` pairs.

Indexable sources are shuffled with a permutation that depends only on
`(seed, epoch)`, so batch `i` can be produced directly: that is what makes
resuming bit-identical.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError, StoreError
from ..roles import IMAGE, TEXT



def modality_codes(values: Any) -> Tensor:
    """Per-token modality codes (1 image, 0 text) from strings, bools or ints.

    Example:
        >>> modality_codes(["image", "text", "caption", "image"]).tolist()
        [1, 0, 0, 1]
    """
    if isinstance(values, Tensor):
        return values.to(torch.long).reshape(-1)
    if hasattr(values, "to_numpy"):
        values = values.to_numpy()
    arr = np.asarray(values)
    if arr.dtype.kind in "USO":
        out = np.array([IMAGE if str(v).lower().startswith("im") else TEXT for v in arr.reshape(-1)], dtype=np.int64)
        return torch.from_numpy(out)
    return torch.as_tensor(arr.astype(np.int64)).reshape(-1)


def _rows(x: Any, idx: Tensor) -> Tensor:
    if isinstance(x, Tensor):
        return x[idx]
    if not isinstance(x, np.ndarray):
        out = x[idx]  # e.g. vlens.activations.ActivationRows gathers from its memory-mapped shards
        if isinstance(out, Tensor):
            return out.float()
    out = np.asarray(x[idx.numpy()])
    return torch.from_numpy(np.array(out, dtype=np.float32))


class TensorSource:
    """Rows of a `[N, d]` array, served in shuffled batches by step number.

    Example:
        >>> import torch
        >>> src = TensorSource(torch.randn(10, 4), torch.tensor([1, 0] * 5))
        >>> x, m = src.batch(0, batch_size=4, seed=0)
        >>> x.shape, m.shape
        (torch.Size([4, 4]), torch.Size([4]))
    """

    def __init__(self, x: Any, modality: Any = None) -> None:
        if not hasattr(x, "shape") or len(x.shape) != 2:
            raise InputError(
                f"activations must be a [n_tokens, d_model] array, got shape {getattr(x, 'shape', None)}: "
                "flatten [batch, seq, d] activations with x.reshape(-1, d) after selecting the tokens you want"
            )
        self.x = x
        self.modality = None if modality is None else modality_codes(modality)
        if self.modality is not None and len(self.modality) != x.shape[0]:
            raise InputError(f"{len(self.modality)} modality labels for {x.shape[0]} activation rows")
        self.n, self.d = int(x.shape[0]), int(x.shape[1])
        self._perm_cache: tuple[int, int, Tensor] | None = None

    indexable = True

    def _perm(self, seed: int, epoch: int) -> Tensor:
        if self._perm_cache is None or self._perm_cache[:2] != (seed, epoch):
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            self._perm_cache = (seed, epoch, torch.randperm(self.n, generator=g))
        return self._perm_cache[2]

    def indices(self, step: int, batch_size: int, seed: int, shuffle: bool = True) -> Tensor:
        """Row indices of batch `step` (batches never straddle epochs)."""
        per_epoch = max(self.n // batch_size, 1)
        epoch, k = divmod(step, per_epoch)
        if not shuffle:
            return torch.arange(k * batch_size, min((k + 1) * batch_size, self.n))
        return self._perm(seed, epoch)[k * batch_size : (k + 1) * batch_size]

    def rows(self, idx: Tensor) -> Tensor:
        """Rows `idx` of the activations, as float."""
        return _rows(self.x, idx).float()

    def batch(self, step: int, batch_size: int, seed: int, shuffle: bool = True) -> tuple[Tensor, Tensor | None]:
        idx = self.indices(step, batch_size, seed, shuffle)
        x = self.rows(idx)
        return x, None if self.modality is None else self.modality[idx]

    def sequential(self, batch_size: int, limit: int | None = None) -> Iterator[tuple[Tensor, Tensor | None]]:
        n = self.n if limit is None else min(self.n, limit)
        for s in range(0, n, batch_size):
            idx = torch.arange(s, min(s + batch_size, n))
            yield _rows(self.x, idx).float(), None if self.modality is None else self.modality[idx]


class ConcatSource(TensorSource):
    """Several `TensorSource`s as one (rows concatenated; modality kept per part)."""

    def __init__(self, parts: list[TensorSource]) -> None:
        ds = {p.d for p in parts}
        if len(ds) != 1:
            raise InputError(f"cannot mix activations of widths {sorted(ds)} in one training run")
        self.parts = parts
        self.offsets = torch.tensor([0] + list(itertools.accumulate(p.n for p in parts)))
        self.n, self.d = int(self.offsets[-1]), ds.pop()
        has_mod = [p.modality is not None for p in parts]
        self.modality = torch.cat([p.modality for p in parts]) if all(has_mod) else None  # type: ignore[misc]
        self._perm_cache = None

    def rows(self, idx: Tensor) -> Tensor:
        """Rows `idx` of the concatenated activations, as float."""
        out = torch.empty(len(idx), self.d)
        part = torch.searchsorted(self.offsets, idx, right=True) - 1
        for p in part.unique().tolist():
            sel = (part == p).nonzero().flatten()
            out[sel] = _rows(self.parts[p].x, idx[sel] - self.offsets[p]).float()
        return out

    def batch(self, step: int, batch_size: int, seed: int, shuffle: bool = True) -> tuple[Tensor, Tensor | None]:
        idx = self.indices(step, batch_size, seed, shuffle)
        return self.rows(idx), None if self.modality is None else self.modality[idx]

    def sequential(self, batch_size: int, limit: int | None = None) -> Iterator[tuple[Tensor, Tensor | None]]:
        n = self.n if limit is None else min(self.n, limit)
        for s in range(0, n, batch_size):
            idx = torch.arange(s, min(s + batch_size, n))
            yield self.rows(idx), None if self.modality is None else self.modality[idx]


def StoreSource(store: Any, layer: int, modality: str | None = None) -> TensorSource:
    """A `TensorSource` over one layer of a `vlens.activations.ActivationStore` (memory-mapped).

    `modality` ('image' / 'text') keeps only those tokens. The store's meta
    column `modality` gives the per-token codes.
    """
    layers = list(getattr(store, "layers", []))
    if layers and layer not in layers:
        raise StoreError(f"layer {layer} is not in this store (it holds layers {layers}); harvest it first")
    x = store.activations(layer)
    meta = getattr(store, "meta", None)
    mod = None
    if meta is not None:
        try:
            col = meta["modality"]
        except (KeyError, TypeError, IndexError):
            col = None
        if col is not None:
            mod = modality_codes(col)
    src = TensorSource(x, mod)
    if modality is not None:
        if mod is None:
            raise StoreError("this store has no 'modality' meta column, so it cannot be filtered by modality")
        keep = (mod == (IMAGE if modality == "image" else TEXT)).nonzero().flatten()
        src = TensorSource(_rows(x, keep), mod[keep])
    return src


class IterSource:
    """Batches from any iterable of `[b, d]` tensors or `(x, modality)` pairs.

    Re-iterable inputs (lists, generators-factories, datasets) are restarted and
    fast-forwarded on resume; a one-shot iterator continues from where it is.
    """

    indexable = False

    def __init__(self, data: Iterable[Any], prefetch: int = 2) -> None:
        self.data = data
        self.reiterable = iter(data) is not data  # type: ignore[comparison-overlap]
        self._it: Iterator[Any] | None = None
        self._pending: list[Any] = []
        self.d: int | None = None
        self.prefetch = prefetch

    def start(self, skip: int = 0) -> None:
        self.close()
        self._it = iter(self.data)
        if skip and self.reiterable:
            for _ in itertools.islice(self._it, skip):
                pass
        if self.prefetch:
            self._it = _Prefetcher(self._it, self.prefetch)

    def begin(self, skip: int = 0) -> None:
        """Start iterating, or (a resume of a re-iterable source) restart after `skip` batches, dropping peeked ones."""
        if skip and self.reiterable:
            self._pending.clear()
            self.start(skip=skip)
        elif self._it is None:
            self.start()

    def peek(self, n: int) -> list[tuple[Tensor, Tensor | None]]:
        """The next `n` batches, kept to be served again by `next`."""
        if self._it is None:
            self.start()
        while len(self._pending) < n:
            try:
                self._pending.append(next(self._it))  # type: ignore[arg-type]
            except StopIteration:
                break
        return [_split(b) for b in self._pending[:n]]

    def close(self) -> None:
        """Stop background prefetching (extra prefetched batches of a one-shot iterator are dropped)."""
        if isinstance(self._it, _Prefetcher):
            self._it.close()

    def next(self) -> tuple[Tensor, Tensor | None]:
        if self._it is None:
            self.start()
        if self._pending:
            return _split(self._pending.pop(0))
        try:
            return _split(next(self._it))  # type: ignore[arg-type]
        except StopIteration:
            raise InputError(
                "the activation iterator ran out before the requested number of steps: "
                "pass fewer `steps` / `n_tokens`, or an iterable that yields enough batches"
            ) from None

    def sequential(self, batch_size: int, limit: int | None = None) -> Iterator[tuple[Tensor, Tensor | None]]:
        seen = 0
        it = iter(self.data) if self.reiterable else iter(self._pending)
        for b in it:
            x, m = _split(b)
            yield x, m
            seen += x.shape[0]
            if limit is not None and seen >= limit:
                return


class _Prefetcher:
    """Pull the next batches of an iterator on a background thread (torch ops release the GIL),
    so producing batch i+1 overlaps the training step on batch i. Order is preserved."""

    _END = object()

    def __init__(self, it: Iterator[Any], depth: int) -> None:
        import queue
        import threading

        self._q: Any = queue.Queue(maxsize=depth)
        self._stop = threading.Event()

        def work() -> None:
            try:
                for item in it:
                    while not self._stop.is_set():
                        try:
                            self._q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if self._stop.is_set():
                        return
                self._q.put(self._END)
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
                self._q.put(e)

        self._thread = threading.Thread(target=work, daemon=True)
        self._thread.start()

    def __iter__(self) -> "_Prefetcher":
        return self

    def __next__(self) -> Any:
        item = self._q.get()
        if item is self._END:
            self._q.put(self._END)
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop the worker and wait for it, so nothing draws from the iterator (or the RNG) afterwards."""
        import queue

        self._stop.set()
        while self._thread.is_alive():
            try:
                self._q.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()


def _split(b: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(b, (tuple, list)) and len(b) == 2:
        x, m = b
        return torch.as_tensor(x), None if m is None else modality_codes(m)
    if isinstance(b, dict):
        return torch.as_tensor(b["x"] if "x" in b else b["activations"]), (
            modality_codes(b["modality"]) if b.get("modality") is not None else None
        )
    return torch.as_tensor(b), None


def as_source(data: Any, layer: int | None = None, modality: Any = None) -> TensorSource | IterSource:
    """Normalise anything the trainer accepts into a source (see module docstring).

    Example:
        >>> import torch
        >>> as_source(torch.randn(8, 4)).n
        8
        >>> as_source([torch.randn(2, 4)] * 3).indexable
        False
    """
    if isinstance(data, (TensorSource, IterSource)):
        return data
    if hasattr(data, "activations") and hasattr(data, "layers"):
        if layer is None:
            ls = list(data.layers)
            if len(ls) != 1:
                raise StoreError(f"this store holds layers {ls}: pass layer=... to choose one")
            layer = ls[0]
        return StoreSource(data, layer)
    if isinstance(data, tuple) and len(data) == 2 and hasattr(data[0], "shape") and len(data[0].shape) == 2:
        return TensorSource(data[0], data[1])
    if hasattr(data, "shape") and hasattr(data, "__getitem__") and not isinstance(data, (list, tuple)):
        return TensorSource(data, modality)
    if isinstance(data, list) and data and all(
        isinstance(p, (TensorSource,)) or (hasattr(p, "activations") and hasattr(p, "layers")) for p in data
    ):
        return ConcatSource([as_source(p, layer) for p in data])  # type: ignore[misc]
    if isinstance(data, Iterable):
        return IterSource(data)
    raise InputError(
        f"cannot train on {type(data).__name__}: pass a [n, d] tensor, (tensor, modality), an ActivationStore, "
        "a list of stores, or an iterable of [batch, d] tensors"
    )

