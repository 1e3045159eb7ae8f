"""The atomic writer of harvest stores: shards and index replaced whole, never half-written.

Every file is written to a temporary name, fsynced, renamed over its final
name and its directory fsynced (`vlens._durable.atomic_write`). A shard is
always written before the `index.json` that lists it, with the CRC-32 of its
bytes, so an interrupted harvest (Ctrl-C, `kill -9`, a full disk) leaves a
consistent store: at most a temporary file or an unlisted shard, both removed
when the writer opens the store again. Reopening also checks the listed shards
(`vlens.activations.shards.open_shards`): a missing, truncated or damaged shard
is dropped with every shard after it, and the harvest recomputes from there.

The writer deletes only names it writes itself (`shards.OWN_NAMES`:
`index.json`, `shard-NNNNN.safetensors` and their `.tmp` files), and refuses a
non-empty folder that is not a store unless `overwrite=True`. A failing disk
raises `vlens.errors.HarvestError`, saying how far the store goes and how to
resume; the failed write is not retried. The format is described in
`vlens.activations.store`.
"""

from __future__ import annotations

import errno
import json
import warnings
from pathlib import Path

import torch
from torch import Tensor

from .._durable import atomic_write as _atomic_write, file_crc32, json_checksum
from ..errors import HarvestError, InputError
from .shards import FORMAT, INDEX, OWN_NAMES, index_problem, open_shards

__all__ = ["ShardWriter", "index_text"]

# Configuration fields that must match for a resume (all but model_fingerprint are user-visible arguments).
_CONFIG_KEYS = (
    "model", "model_fingerprint", "d_model", "layers", "site", "tokens", "pool", "dtype", "prompt", "template",
    "captions", "text_only", "text_prompt", "n_samples", "rank_of",
)
_FULL = ("No space left", "os error 28", "Disk quota", "os error 122")


def index_text(index: dict) -> str:
    """`index` as the JSON text of an `index.json`, with its checksum (`vlens._durable.json_checksum`).

    Example:
        >>> json.loads(index_text({"n_rows": 0}))["checksum"]
        '72317184'
    """
    doc = dict(index)
    doc["checksum"] = json_checksum(doc)
    return json.dumps(doc, indent=1)


def _disk_error(e: BaseException, what: Path, index: dict) -> HarvestError:
    prog = index["progress"]
    full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or any(s in str(e) for s in _FULL)
    cause = "the disk is full" if full else f"writing failed ({e})"
    return HarvestError(
        f"{cause} while writing {what}. The store at {what.parent} is consistent: it holds "
        f"{len(index['shards'])} complete shard(s), samples done per pass {prog}. "
        + ("Free some space (or pass a larger disk as out=...) and " if full else "Fix the problem and ")
        + "call harvest again with the same arguments to resume."
    )


def _truncated(index: dict, k: int) -> dict:
    """`index` keeping only its first `k` shard entries (progress, skipped and row counts follow)."""
    kept = index["shards"][:k]
    new = dict(index, shards=kept, complete=False, n_rows=sum(e["rows"] for e in kept))
    new["progress"] = {p: max([e["end"] for e in kept if e["pass"] == p], default=0) for p in ("main", "text")}
    new["skipped"] = {p: sum(e.get("skipped", 0) for e in kept if e["pass"] == p) for p in ("main", "text")}
    return new


class ShardWriter:
    """Buffers a harvest's rows and writes them as shards of about `shard_bytes`, each listed in the index once whole."""

    def __init__(self, root: Path, index: dict, shard_bytes: int) -> None:
        self.root = root
        self.index = index
        self.shard_bytes = max(int(shard_bytes), 1)
        self.progress = index["progress"]
        self._buf: list[dict[str, Tensor]] = []
        self._buf_bytes = 0
        self._buf_pass: str | None = None
        self._buf_start = 0
        self._buf_end = 0
        self._buf_skipped = 0
        self._buf_ids: list = []
        self._buf_keys: list = []
        self.failed = False

    @classmethod
    def open(cls, root: Path, config: dict, *, overwrite: bool, hook_names: dict, shard_bytes: int,
             fresh: bool = False) -> "ShardWriter":
        """The writer of the store at `root`: resumed if it holds this configuration, else new (`fresh`: always new)."""
        if root.exists() and not root.is_dir():
            raise InputError(f"out={str(root)!r} is a file: pass a directory for the store (a new or an empty one)")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise HarvestError(f"cannot create the store directory {root} ({e}): choose a writable out=") from e
        idx_path = root / INDEX
        index = None
        if idx_path.exists() and not fresh:
            try:
                index = json.loads(idx_path.read_bytes())
                problem = index_problem(index)
            except (OSError, ValueError) as e:
                index, problem = None, f"it is unreadable ({e})"
            if not (isinstance(index, dict) and str(index.get("format", "")).startswith("vlens.harvest")):
                raise HarvestError(f"{idx_path} is not the index of a vlens store ({problem}): vlens did not write it "
                                   "(or it is damaged beyond recognition) and will not replace it; choose another "
                                   "out=, or remove that file yourself")
            if problem is not None:
                if not overwrite:
                    raise HarvestError(f"{idx_path} is damaged: {problem}. Pass overwrite=True to start this store "
                                       "afresh (or choose another out=)")
                index = None
            else:
                old = index.get("config", {})
                diff = [k for k in _CONFIG_KEYS if old.get(k) != config.get(k)]
                if diff and not overwrite:
                    k = diff[0]
                    raise HarvestError(
                        f"{root} holds a harvest of another configuration: {k} is {old.get(k)!r} there but {config.get(k)!r} "
                        f"now (differing: {', '.join(diff)}). Pass overwrite=True to replace it, or choose another out= directory."
                    )
                if diff:
                    index = None
        elif not overwrite and not fresh:
            foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir() if not OWN_NAMES.match(p.name))
            if foreign:
                raise HarvestError(
                    f"{root} is not empty and is not a harvest store (it holds {', '.join(foreign[:5])}"
                    + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "") + "): choose a new or empty "
                    "folder for out=, or pass overwrite=True to write the store beside those files (vlens deletes "
                    "only its own: index.json, shard-NNNNN.safetensors and their .tmp files)")
            if any(root.glob("shard-*.safetensors")):
                raise HarvestError(f"{root} has shard files but no {INDEX}; pass overwrite=True to replace them")
        if index is None:
            cls._remove_own(root, keep=set())
            index = {
                "format": FORMAT,
                "config": config,
                "hook_names": {str(k): v for k, v in hook_names.items()},
                "shards": [],
                "progress": {"main": 0, "text": 0},
                "skipped": {"main": 0, "text": 0},
                "n_rows": 0,
                "complete": False,
            }
            w = cls(root, index, shard_bytes)
            w._write_index(what=f"{root} is not writable")
        else:
            _, bad, problem = open_shards(root, index)
            w = cls(root, index if bad is None else _truncated(index, bad), shard_bytes)
            if bad is not None:
                warnings.warn(f"{problem}: keeping the {bad} shard entr{'y' if bad == 1 else 'ies'} before it and "
                              "harvesting the rest again", stacklevel=4)
                w._write_index(what=f"{root} is not writable")
        # Leftovers of an interrupted write: temporary files and shards the index does not list.
        cls._remove_own(root, keep={s["file"] for s in w.index["shards"] if s.get("file")} | {INDEX})
        return w

    @staticmethod
    def _remove_own(root: Path, keep: set) -> None:
        """Delete the files vlens writes in a store folder (`OWN_NAMES`), but those in `keep`; nothing else."""
        for p in root.iterdir():
            if OWN_NAMES.match(p.name) and p.name not in keep and p.is_file():
                try:
                    p.unlink()
                except OSError:  # a read-only store: leftovers stay, harmless
                    pass

    def add(self, pass_name: str, end: int, rows: dict[str, Tensor], n_skipped: int, ids: list,
            keys: list | None = None) -> None:
        if self._buf_pass is not None and self._buf_pass != pass_name:
            self.flush()
        if self._buf_pass is None:
            self._buf_pass, self._buf_start = pass_name, self.progress[pass_name]
        if rows:
            self._buf.append(rows)
            self._buf_bytes += sum(v.numel() * v.element_size() for v in rows.values())
        self._buf_end = end
        self._buf_skipped += n_skipped
        self._buf_ids.extend(ids)
        self._buf_keys.extend(keys or [])
        if self._buf_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if self._buf_pass is None:
            return
        from safetensors.torch import save_file

        index = self.index
        tensors = {k: torch.cat([r[k] for r in self._buf]).contiguous() for k in self._buf[0]} if self._buf else {}
        n_rows = int(tensors["meta.sample"].shape[0]) if tensors else 0
        entry = {"pass": self._buf_pass, "start": self._buf_start, "end": self._buf_end, "rows": n_rows,
                 "skipped": self._buf_skipped}
        keys = {"sample_keys": self._buf_keys} if self._buf_keys else {}
        if n_rows:
            name = f"shard-{len(index['shards']):05d}.safetensors"
            path = self.root / name
            meta = {"format": FORMAT, "pass": self._buf_pass, "start": str(self._buf_start), "end": str(self._buf_end),
                    "sample_ids": json.dumps(self._buf_ids), **{k: json.dumps(v) for k, v in keys.items()}}
            crc: list[str] = []

            def write(tmp: Path) -> None:
                save_file(tensors, str(tmp), metadata=meta)
                crc.append(file_crc32(tmp))

            try:
                _atomic_write(path, write)
            except Exception as e:  # OSError, or safetensors' own SafetensorError for a failed write
                self.failed = True
                raise _disk_error(e, path, index) from e
            entry["file"] = name
            entry["crc32"] = crc[0]
        else:
            entry["file"] = None
            entry["sample_ids"] = self._buf_ids
            entry.update(keys)
        new = json.loads(json.dumps(index))
        new["shards"].append(entry)
        new["progress"][self._buf_pass] = self._buf_end
        new["skipped"][self._buf_pass] += self._buf_skipped
        new["n_rows"] += n_rows
        self._write_index(new)
        self.index.clear()
        self.index.update(new)
        self.progress = self.index["progress"]
        self._buf, self._buf_bytes, self._buf_pass, self._buf_skipped, self._buf_ids = [], 0, None, 0, []
        self._buf_keys = []

    def finish(self) -> None:
        if not self.index.get("complete"):
            new = dict(self.index, complete=True)
            self._write_index(new)
            self.index["complete"] = True

    def _write_index(self, index: dict | None = None, what: str | None = None) -> None:
        text = index_text(index if index is not None else self.index)
        try:
            _atomic_write(self.root / INDEX, lambda tmp: tmp.write_text(text))
        except OSError as e:
            self.failed = True
            if what is not None:
                raise HarvestError(f"{what} ({e}): choose a writable out= (or fix its permissions)") from e
            raise _disk_error(e, self.root / INDEX, self.index) from e
