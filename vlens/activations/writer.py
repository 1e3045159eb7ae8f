"""The atomic writer of harvest stores: shards and index replaced whole, never half-written.

Every file is written to a temporary name, fsynced, renamed over its final
name and its directory fsynced (`_atomic_write`). A shard is always written
before the `index.json` that lists it, so an interrupted harvest (Ctrl-C,
`kill -9`, a full disk) leaves a consistent store: at most a temporary file or
an unlisted shard, both removed when the writer opens the store again. A
failing disk raises `vlens.errors.HarvestError`, saying how far the store goes
and how to resume. The format is described in `vlens.activations.store`.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ..errors import HarvestError
from .store import FORMAT, INDEX

__all__: list[str] = []

# Configuration fields that must match for a resume (all but model_fingerprint are user-visible arguments).
_CONFIG_KEYS = (
    "model", "model_fingerprint", "d_model", "layers", "site", "tokens", "pool", "dtype", "prompt", "template",
    "captions", "text_only", "text_prompt", "n_samples", "rank_of",
)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write `path` via `write(tmp)`, fsync, rename over `path`, fsync the directory. No partial file survives."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def _disk_error(e: OSError, what: Path, index: dict) -> HarvestError:
    prog = index["progress"]
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    cause = "the disk is full" if full else f"writing failed ({e})"
    return HarvestError(
        f"{cause} while writing {what}. The store at {what.parent} is consistent: it holds "
        f"{len(index['shards'])} complete shard(s), samples done per pass {prog}. "
        + ("Free some space (or pass a larger disk as out=...) and " if full else "Fix the problem and ")
        + "call harvest again with the same arguments to resume."
    )


class _Writer:
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
        self.failed = False

    @classmethod
    def open(cls, root: Path, config: dict, *, overwrite: bool, hook_names: dict, shard_bytes: int) -> "_Writer":
        root.mkdir(parents=True, exist_ok=True)
        idx_path = root / INDEX
        index = None
        if idx_path.exists():
            try:
                index = json.loads(idx_path.read_text())
            except (OSError, ValueError) as e:
                if not overwrite:
                    raise HarvestError(f"{idx_path} is unreadable ({e}); pass overwrite=True to start this store afresh") from e
            if index is not None:
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
        elif any(root.glob("shard-*.safetensors")) and not overwrite:
            raise HarvestError(f"{root} has shard files but no {INDEX}; pass overwrite=True to replace them")
        if index is None:
            for p in [*root.glob("shard-*.safetensors"), *root.glob("*.tmp"), idx_path]:
                if p.exists():
                    p.unlink()
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
            w._write_index()
        else:
            w = cls(root, index, shard_bytes)
        # Leftovers of an interrupted write: temporary files and shards the index does not list.
        listed = {s["file"] for s in index["shards"]}
        for p in [*root.glob("*.tmp"), *root.glob("shard-*.safetensors")]:
            if p.name not in listed:
                p.unlink()
        return w

    def add(self, pass_name: str, end: int, rows: dict[str, Tensor], n_skipped: int, ids: list) -> None:
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
        if n_rows:
            name = f"shard-{len(index['shards']):05d}.safetensors"
            path = self.root / name
            meta = {"format": FORMAT, "pass": self._buf_pass, "start": str(self._buf_start), "end": str(self._buf_end),
                    "sample_ids": json.dumps(self._buf_ids)}
            try:
                _atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
            except OSError as e:
                self.failed = True
                raise _disk_error(e, path, index) from e
            entry["file"] = name
        else:
            entry["file"] = None
            entry["sample_ids"] = self._buf_ids
        new = json.loads(json.dumps(index))
        new["shards"].append(entry)
        new["progress"][self._buf_pass] = self._buf_end
        new["skipped"][self._buf_pass] += self._buf_skipped
        new["n_rows"] += n_rows
        try:
            self._write_index(new)
        except OSError as e:
            self.failed = True
            raise _disk_error(e, self.root / INDEX, index) from e
        self.index.clear()
        self.index.update(new)
        self.progress = self.index["progress"]
        self._buf, self._buf_bytes, self._buf_pass, self._buf_skipped, self._buf_ids = [], 0, None, 0, []

    def finish(self) -> None:
        if not self.index.get("complete"):
            new = dict(self.index, complete=True)
            self._write_index(new)
            self.index["complete"] = True

    def _write_index(self, index: dict | None = None) -> None:
        text = json.dumps(index if index is not None else self.index, indent=1)
        _atomic_write(self.root / INDEX, lambda tmp: tmp.write_text(text))

