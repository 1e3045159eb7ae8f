"""`ActivationStore`: read a harvest directory back, memory-mapped, with metadata, filters and batches.

A store directory (written by `vlens.activations.harvest`) holds

    index.json                 model, layers, site kind, token selection, dtype, d_model, shards, progress
    shard-00000.safetensors    act.{L} [rows, d_model] per layer, plus one tensor per metadata column
    shard-00001.safetensors    ...

(a distributed harvest adds `rank-RRR/` sub-stores, listed by the top
`index.json`). `index.json`'s config keeps the layers as ints and the site
kind (`"resid_pre"` or `"resid_post"`) apart, as every store since vlens 0.1
did; `store.sites` gives the full site names.

Metadata columns (one value per row; -1 where a field does not apply):

| column      | meaning                                                                   |
|-------------|---------------------------------------------------------------------------|
| `sample`    | index of the sample in `data` (`store.sample_ids[sample]` is its `Sample.id`) |
| `label`     | `Sample.label` (-1 if none)                                               |
| `position`  | token position in its own sequence (0 = first real token, i.e. BOS)      |
| `token_id`  | input id of the token                                                     |
| `modality`  | 1 image token, 0 text token (pooled rows: 1 all image, 0 all text, 2 mixed) |
| `role`      | 0 image, 1 prompt (instruction / template), 2 answer (caption), 3 BOS, 4 other |
| `kind`      | image-token kind: 0 base tile, 1 high-res, 2 newline                      |
| `tile`, `row`, `col` | tile index (0 base, 1.. high-res) and patch row / column in it   |
| `text_only` | 1 for rows of the text-only caption pass                                  |
| `n_tokens`  | pooled stores only: how many tokens the mean is over                      |

Shards are read with safetensors' own `safe_open`, whose tensors are
copy-on-write memory maps of the file: measured here (safetensors 0.8, a
256 MB shard), opening it and gathering 4096 random rows costs about 10 ms and
2 MB of anonymous memory, the same as a hand-rolled `mmap` reader, so nothing
is hand-rolled.

    >>> import vlens, tempfile
    >>> from vlens.data import Sample
    >>> from vlens.activations import harvest, ActivationStore
    >>> from PIL import Image
    >>> data = [Sample(Image.new("RGB", (32, 32)), label=i % 2) for i in range(2)]
    >>> out = tempfile.mkdtemp()
    >>> _ = harvest(vlens.tiny(), data, layers=["resid_post.1"], out=out, progress=False)
    >>> ActivationStore(out).sites
    ['resid_post.1']
"""

from __future__ import annotations

import operator
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .._durable import file_crc32
from ..errors import InputError, StoreError
from ..roles import MODALITY, ROLE_NAMES
from ..sites import Site, parse
from .shards import DAMAGED_HINT, FORMAT, INDEX, is_int, main_pass_list, open_shards, read_index

__all__ = ["ActivationStore", "ActivationRows", "FORMAT", "INDEX", "META_COLUMNS"]

#: Metadata columns of a per-token store (pooled stores add `n_tokens`).
META_COLUMNS = ("sample", "label", "position", "token_id", "modality", "role", "kind", "tile", "row", "col", "text_only")


class ActivationRows:
    """The `[n_rows, d_model]` activations of one layer, across shards, read lazily from memory maps.

    Index it like a tensor (`rows[i]`, `rows[a:b]`, `rows[index_tensor]`,
    `rows[bool_mask]`) to get a real tensor of just those rows;
    `rows.tensor()` (or `torch.as_tensor(rows)`, `np.asarray(rows)`) loads them all.

    Example:
        >>> import vlens, tempfile
        >>> from vlens.data import Sample
        >>> from PIL import Image
        >>> data = [Sample(Image.new("RGB", (32, 32)), label=0)] * 2
        >>> from vlens.activations import harvest
        >>> store = harvest(vlens.tiny(), data, layers=[0], out=tempfile.mkdtemp(), progress=False)
        >>> x = store.activations(0)
        >>> x.shape == (len(store), 64), tuple(x[:3].shape)
        (True, (3, 64))
    """

    def __init__(self, parts: list[Tensor], index: Tensor | None, d_model: int, dtype: torch.dtype) -> None:
        self.parts = parts
        self.offsets = torch.tensor([0] + [int(p.shape[0]) for p in parts]).cumsum(0)
        self.index = index
        self.d_model = d_model
        self.dtype = dtype

    @property
    def shape(self) -> torch.Size:
        n = int(self.offsets[-1]) if self.index is None else int(self.index.numel())
        return torch.Size((n, self.d_model))

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return 2

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def _gather(self, idx: Tensor) -> Tensor:
        out = torch.empty((idx.numel(), self.d_model), dtype=self.dtype)
        if idx.numel() == 0:
            return out
        part = torch.searchsorted(self.offsets, idx.contiguous(), right=True) - 1
        for p in part.unique().tolist():
            sel = (part == p).nonzero().flatten()
            out[sel] = self.parts[p][idx[sel] - self.offsets[p]]
        return out

    def __getitem__(self, key: Any) -> Tensor:
        n = len(self)
        if isinstance(key, tuple):
            rows, rest = key[0], key[1:]
            return self[rows][(slice(None), *rest)]
        if isinstance(key, int):
            if not -n <= key < n:
                raise IndexError(f"row {key} out of range for {n} rows")
            return self[torch.tensor([key % n])][0]
        if isinstance(key, slice):
            idx = torch.arange(n)[key]
            if self.index is None and key.step in (None, 1) and len(idx):
                return self._contiguous(int(idx[0]), int(idx[-1]) + 1)
        else:
            idx = torch.as_tensor(key)
            if idx.dtype == torch.bool:
                if idx.shape != (n,):
                    raise IndexError(f"a boolean row mask must have shape ({n},), got {tuple(idx.shape)}")
                idx = idx.nonzero().flatten()
            idx = idx.long()
            if idx.numel() and (idx.max() >= n or idx.min() < -n):
                raise IndexError(f"row index out of range for {n} rows")
            idx = idx % max(n, 1)
        shape = idx.shape
        if self.index is not None:
            idx = self.index[idx.flatten()]
        return self._gather(idx.flatten()).reshape(*shape, self.d_model)

    def _contiguous(self, a: int, b: int) -> Tensor:
        chunks = []
        for p, part in enumerate(self.parts):
            lo, hi = int(self.offsets[p]), int(self.offsets[p + 1])
            if hi <= a or lo >= b:
                continue
            chunks.append(part[max(a, lo) - lo : min(b, hi) - lo])
        return torch.cat(chunks) if len(chunks) != 1 else chunks[0].clone()

    def tensor(self) -> Float[Tensor, "n d_model"]:
        """All rows as one in-memory tensor."""
        return self[:] if len(self) else torch.empty((0, self.d_model), dtype=self.dtype)

    def __array__(self, dtype=None, copy=None):
        t = self.tensor()
        if t.dtype == torch.bfloat16:
            t = t.float()
        a = t.numpy()
        return a.astype(dtype) if dtype is not None else a

    def float(self) -> Tensor:
        """All rows as float32."""
        return self.tensor().float()

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"ActivationRows(shape={tuple(self.shape)}, dtype={self.dtype}, shards={len(self.parts)})"



class ActivationStore:
    """A harvest directory: per-layer activations (memory-mapped), metadata columns, batches, exports.

    Attributes: `layers` (ints), `sites` (full site names, e.g. `resid_pre.3`),
    `d_model`, `dtype`, `tokens`, `pool`, `config` (everything `harvest` was
    called with), `index` (the raw JSON), `meta` (dict of columns, see the
    module docs), `sample_ids`. Methods taking a `layer` accept a layer of the
    store (an int) or its site name (`"resid_post.3"` in a `resid_post` store).

    Example:
        >>> import vlens, tempfile
        >>> from vlens.data import Sample
        >>> from vlens.activations import harvest
        >>> from PIL import Image
        >>> data = [Sample(Image.new("RGB", (32, 32)), label=i, caption="a red square", id=i) for i in range(3)]
        >>> store = harvest(vlens.tiny(words=["red", "square"]), data, layers=[1, 2], tokens="image+answer",
        ...                 captions=True, out=tempfile.mkdtemp(), progress=False)
        >>> store.layers, store.d_model
        ([1, 2], 64)
        >>> n_img = len(store.filter(modality="image")); n_txt = len(store.filter(modality="text"))
        >>> n_img + n_txt == len(store), n_txt        # 3 captions × 3 tokens
        (True, 9)
    """

    def __init__(self, path: str | os.PathLike, _rows: Tensor | None = None, _shards: list | None = None,
                 _warned: list | None = None) -> None:
        self.path = Path(path)
        self.index = read_index(self.path)
        self.config = self.index["config"]
        if _shards is None:
            _shards, bad, problem = open_shards(self.path, self.index)
            if bad is not None:
                raise StoreError(f"{problem}: the store is damaged; {DAMAGED_HINT}")
        self._shards = _shards
        self._rows = _rows
        self._meta: dict[str, Tensor] | None = None
        self._warned = _warned if _warned is not None else [False]

    # -- facts --
    @property
    def layers(self) -> list[int]:
        return list(self.config["layers"])

    @property
    def d_model(self) -> int:
        return int(self.config["d_model"])

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.config["dtype"])

    @property
    def sites(self) -> list[str]:
        """The full site names of the stored layers, e.g. `['resid_pre.1', 'resid_pre.3']`."""
        return [Site(self.config["site"], L).name for L in self.layers]

    @property
    def tokens(self) -> str:
        return self.config["tokens"]

    @property
    def pool(self) -> str | None:
        return self.config["pool"]

    @property
    def complete(self) -> bool:
        """Whether the harvest finished (else call `harvest` again with the same arguments to resume)."""
        return bool(self.index.get("complete"))

    def hook_name(self, layer: int | str | Site) -> str:
        """The SAE-Lens / TransformerLens hook name of a layer of this store ('blocks.L.hook_resid_pre')."""
        return self.index["hook_names"][str(self._layer(layer))]

    def __len__(self) -> int:
        if self._rows is not None:
            return int(self._rows.numel())
        return sum(s.n_rows() for s in self._shards)

    def __repr__(self) -> str:
        c = self.config
        return (f"ActivationStore({str(self.path)!r}: {len(self)} rows × d_model {self.d_model}, layers {self.layers}, "
                f"{c['site']}, tokens={c['tokens']!r}, pool={c['pool']!r}, {c['dtype']}, model {c.get('model')!r}"
                + ("" if self.complete else ", INCOMPLETE") + ")")

    def _layer(self, layer: int | str | Site) -> int:
        """The layer int of a layer or site name of this store, or a StoreError naming what it holds."""
        kind = self.config["site"]
        if isinstance(layer, (str, Site)):
            site = parse(layer)
            if site.kind != kind:
                raise StoreError(f"this store holds {kind} sites {self.sites}, not {site.name}: harvest "
                                 f"{site.name} into its own store (harvest(vlm, data, layers=[{site.name!r}], ...))")
            layer = site.index
        if isinstance(layer, bool) or layer not in self.layers:
            raise StoreError(f"layer {layer} was not harvested: this store holds layers {self.layers} ({kind}); "
                             f"harvest it with vlens.harvest(vlm, data, layers=[..., {layer}], ...)")
        return int(layer)

    # -- data --
    def activations(self, layer: int | str | Site) -> ActivationRows:
        """Layer `layer`'s rows, `[len(store), d_model]`, lazily read from memory-mapped shards."""
        layer = self._layer(layer)
        if not self.complete and not self._warned[0]:
            self._warned[0] = True
            prog, n = self.index["progress"], self.config.get("n_samples", "?")
            warnings.warn(
                f"the store at {self.path} is incomplete: its harvest stopped after {prog['main']} of {n} samples "
                + (f"(and {prog['text']} of the text-only pass) " if self.config.get("text_only") else "")
                + "and these rows cover only those. Call vlens.harvest again with the same arguments to finish it.",
                stacklevel=2)
        return ActivationRows([s.tensor(f"act.{layer}") for s in self._shards], self._rows, self.d_model, self.dtype)

    @property
    def meta(self) -> dict[str, Tensor]:
        """Metadata columns, one tensor per column, one value per row (see the module docs)."""
        if self._meta is None:
            keys = [k for k in (self._shards[0].keys if self._shards else []) if k.startswith("meta.")]
            full = {k[5:]: torch.cat([s.tensor(k) for s in self._shards]) for k in keys}
            if not self._shards:
                full = {k: torch.empty(0, dtype=torch.long) for k in META_COLUMNS}
            self._meta = full if self._rows is None else {k: v[self._rows] for k, v in full.items()}
        return self._meta

    @property
    def sample_ids(self) -> list:
        """`Sample.id` of every sample of the main pass, by sample index (`store.meta['sample']`)."""
        if "sample_ids" in self.index:  # merged from the ranks of a distributed harvest
            return list(self.index["sample_ids"])
        return main_pass_list(self.path, self.index, "sample_ids")

    def filter(self, modality: str | None = None, label: int | Sequence[int] | None = None,
               text_only: bool | None = None, role: str | None = None) -> "ActivationStore":
        """A view of the rows matching every given condition (same API as the store).

        `modality` 'image' or 'text'; `label` a class or list of classes;
        `text_only` True for the text-only caption pass, False for the image pass;
        `role` one of 'image', 'prompt', 'answer', 'bos'.
        """
        m = self.meta
        keep = torch.ones(len(self), dtype=torch.bool)
        if modality is not None:
            if modality not in MODALITY:
                raise InputError(f"modality must be 'image' or 'text', not {modality!r}")
            keep &= m["modality"] == MODALITY[modality]
        if label is not None:
            many = not isinstance(label, (int, str)) and getattr(label, "ndim", 1) != 0
            try:
                labels = torch.as_tensor([operator.index(v) for v in (label if many else [label])], dtype=torch.long)
            except TypeError:
                raise InputError(f"label must be a class id or a list of them (ints), not {label!r}") from None
            keep &= torch.isin(m["label"], labels)
        if text_only is not None:
            keep &= m["text_only"] == int(bool(text_only))
        if role is not None:
            if role not in ROLE_NAMES:
                raise InputError(f"role must be one of {ROLE_NAMES}, not {role!r}")
            keep &= m["role"] == ROLE_NAMES.index(role)
        base = torch.arange(len(self)) if self._rows is None else self._rows
        return ActivationStore(self.path, _rows=base[keep], _shards=self._shards, _warned=self._warned)

    def batches(self, layer: int | str | Site, batch_size: int = 4096, shuffle: bool = True, seed: int = 0,
                modality: str | None = None, buffer_shards: int = 4, drop_last: bool = False,
                dtype: torch.dtype | None = None) -> Iterator[Float[Tensor, "batch d_model"]]:
        """Batches of one layer's rows, with RAM bounded by `buffer_shards` shards.

        With `shuffle`, shards are visited in a seeded random order and rows are
        shuffled within a buffer of `buffer_shards` shards (plus the carried-over
        remainder), like a shuffle buffer. Every row is served exactly once.

        Example:
            >>> import vlens, tempfile
            >>> from vlens.data import Sample
            >>> from PIL import Image
            >>> data = [Sample(Image.new("RGB", (32, 32)))] * 2
            >>> from vlens.activations import harvest
            >>> store = harvest(vlens.tiny(), data, layers=[0], out=tempfile.mkdtemp(), progress=False)
            >>> sum(len(b) for b in store.batches(0, batch_size=50)) == len(store)
            True
        """
        for name, v in (("batch_size", batch_size), ("buffer_shards", buffer_shards)):
            if not is_int(v, 1):
                raise InputError(f"{name} must be a positive int, not {v!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise InputError(f"dtype must be a floating-point torch dtype (e.g. torch.float32), not {dtype!r}")
        view = self.filter(modality=modality) if modality is not None else self
        rows = view.activations(layer)
        g = torch.Generator().manual_seed(seed)
        # Group this view's row indices by shard.
        idx = torch.arange(len(rows)) if view._rows is None else view._rows
        shard_of = torch.searchsorted(rows.offsets, idx.contiguous(), right=True) - 1
        order = torch.randperm(len(rows.parts), generator=g).tolist() if shuffle else list(range(len(rows.parts)))
        carry = torch.empty((0, self.d_model), dtype=dtype or self.dtype)
        for k in range(0, len(order), max(1, buffer_shards)):
            group = order[k : k + buffer_shards]
            chunks = [carry]
            for p in group:
                local = idx[shard_of == p] - rows.offsets[p]
                if local.numel():
                    chunks.append(rows.parts[p][local].to(dtype or self.dtype))
            buf = torch.cat(chunks)
            if shuffle:
                buf = buf[torch.randperm(len(buf), generator=g)]
            n_full = len(buf) // batch_size * batch_size
            for s in range(0, n_full, batch_size):
                yield buf[s : s + batch_size]
            carry = buf[n_full:]
        if len(carry) and not drop_last:
            yield carry

    def pooled(self, layer: int | str | Site, modality: str | None = None) -> tuple[Float[Tensor, "n_samples d_model"], Int[Tensor, " n_samples"]]:
        """Per-sample features `X` (float32) and labels `y` of one layer, for probes.

        For a `pool="mean"` store, its rows (image pass); for a per-token store,
        the mean over each sample's stored tokens of the image pass
        (optionally only `modality` 'image' or 'text' tokens).

        Example:
            >>> import vlens, tempfile
            >>> from vlens.data import Sample
            >>> from PIL import Image
            >>> data = [Sample(Image.new("RGB", (32, 32)), label=i % 2) for i in range(4)]
            >>> from vlens.activations import harvest
            >>> store = harvest(vlens.tiny(), data, layers=[2], out=tempfile.mkdtemp(), progress=False)
            >>> X, y = store.pooled(2)
            >>> tuple(X.shape), y.tolist()
            ((4, 64), [0, 1, 0, 1])
        """
        view = self.filter(text_only=False, modality=modality)
        m = view.meta
        x = view.activations(layer)
        if self.pool == "mean":
            return x.float(), m["label"].clone()
        samples, inverse = torch.unique(m["sample"], return_inverse=True)
        X = torch.zeros((len(samples), self.d_model), dtype=torch.float32)
        count = torch.zeros(len(samples), dtype=torch.float32)
        step = 65536
        for s in range(0, len(x), step):  # bounded RAM
            part = x[s : s + step].float()
            X.index_add_(0, inverse[s : s + step], part)
            count.index_add_(0, inverse[s : s + step], torch.ones(len(part)))
        X /= count.clamp(min=1)[:, None]
        y = torch.full((len(samples),), -1, dtype=torch.long)
        y[inverse] = m["label"]
        return X, y

    def verify(self) -> "ActivationStore":
        """Read every shard and check it against the checksum the index holds for it (stores since vlens 0.2).

        Opening a store checks its structure (index, shard headers, shapes); a bit flip inside the
        data is found only by reading it all, which this does (about 1.5 GB/s). Raises `StoreError`
        naming the first damaged shard; returns the store otherwise.

        Example:
            >>> import vlens, tempfile
            >>> from vlens.data import Sample
            >>> from vlens.activations import harvest
            >>> from PIL import Image
            >>> store = harvest(vlens.tiny(), [Sample(Image.new("RGB", (32, 32)))], layers=[0], out=tempfile.mkdtemp(),
            ...                 progress=False)
            >>> store.verify() is store
            True
        """
        for e in self.index["shards"]:
            if e.get("file") and e.get("crc32") and file_crc32(self.path / e["file"]) != e["crc32"]:
                raise StoreError(f"shard {self.path / e['file']} does not match its checksum (a bit flip or a partial "
                                 f"copy): delete that file, then {DAMAGED_HINT}")
        return self

