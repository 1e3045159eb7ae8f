"""The files of an activation store, read and checked: `index.json` and the safetensors shards.

`read_index(path)` returns a store's index after checking it (JSON, format, its
checksum, the config fields, the shard list: each pass's shards follow each
other from sample 0 and add up to the progress and the row count);
`open_shards(path, index)` opens every listed shard with safetensors'
`safe_open` (which refuses a truncated file or a damaged header) and checks its
tensors against the index (names, shapes, dtype). Each problem is a
`vlens.errors.StoreError` naming the file and the fix: harvesting again with
the same arguments keeps the intact shards before a damaged one and recomputes
the rest (`vlens.activations.writer`). `ActivationStore.verify()` also checks
every shard's bytes against the CRC-32 the index holds for it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from torch import Tensor

from .._durable import json_checksum
from ..errors import StoreError
from ..sites import VECTOR_KINDS

__all__ = ["FORMAT", "INDEX", "OWN_NAMES", "index_problem", "main_pass_list", "open_shards", "read_index"]

#: The `format` field of every store's `index.json` (and of each shard's metadata).
FORMAT = "vlens.harvest/1"
#: The store's index file name.
INDEX = "index.json"

#: Names of the files and folders a harvest writes into a store directory (nothing else is ever deleted there).
OWN_NAMES = re.compile(r"^(index\.json(\.tmp)?|shard-\d{5,}\.safetensors(\.tmp)?|rank-\d{3})$")
DAMAGED_HINT = ("call vlens.harvest again with the same arguments: it keeps the intact shards before it and "
                 "recomputes the rest (or pass overwrite=True to start over)")


class _NoStore(StoreError, FileNotFoundError):
    """No store at this path (also a FileNotFoundError, as vlens 0.1 raised)."""


class _Shard:
    """One safetensors shard, opened by `safe_open`: its tensors are zero-copy, copy-on-write memory maps."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = path
        if not path.is_file():
            raise StoreError(f"shard {path} is missing")
        try:
            self._file = safe_open(str(path), framework="pt")
            self.metadata: dict = self._file.metadata() or {}
            self.keys = list(self._file.keys())
        except Exception as e:  # a truncated, bit-flipped or foreign file
            raise StoreError(f"shard {path} cannot be read ({e})") from e

    def problem(self, entry: dict, config: dict) -> str | None:
        """What is wrong with this shard for its index entry and the store's config, or None."""
        rows, width = entry["rows"], config["d_model"]
        for key in [f"act.{L}" for L in config["layers"]] + ["meta.sample"]:
            if key not in self.keys:
                return f"it has no tensor {key!r}"
        for key in self.keys:
            sl = self._file.get_slice(key)
            shape, want = list(sl.get_shape()), [rows, width] if key.startswith("act.") else [rows]
            if shape != want:
                return f"tensor {key!r} has shape {shape}, the index says {want}"
            if key.startswith("act.") and str(sl.get_dtype()) != _ST_DTYPES.get(config["dtype"]):
                return f"tensor {key!r} has dtype {sl.get_dtype()}, the index says {config['dtype']}"
        return None

    def n_rows(self) -> int:
        return int(self._file.get_slice("meta.sample").get_shape()[0])

    def tensor(self, key: str) -> Tensor:
        return self._file.get_tensor(key)


_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def is_int(x: Any, low: int = 0) -> bool:
    """Whether `x` is an int (not a bool) of at least `low`.

    Example:
        >>> is_int(3), is_int(True), is_int(0, low=1)
        (True, False, False)
    """
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def index_problem(index: Any) -> str | None:
    """What makes `index` (a parsed `index.json`) unusable, or None.

    Example:
        >>> index_problem([1, 2])
        'it holds a JSON list, not a store index'
    """
    if not isinstance(index, dict):
        return f"it holds a JSON {type(index).__name__}, not a store index"
    if index.get("format") != FORMAT:
        return f"its format is {index.get('format')!r}, but this vlens reads {FORMAT!r}"
    if "checksum" in index and index["checksum"] != json_checksum(index):
        return ("its content does not match its checksum (a bit flip or a partial copy; if you edited it on purpose, "
                "delete its \"checksum\" entry)")
    c = index.get("config")
    if not isinstance(c, dict):
        return "it has no config"
    layers = c.get("layers")
    if not isinstance(layers, list) or not layers or not all(is_int(L) for L in layers):
        return f"config layers {layers!r} is not a list of layers"
    checks = [(c.get("site") in VECTOR_KINDS, "site"), (is_int(c.get("d_model"), 1), "d_model"),
              (c.get("dtype") in _ST_DTYPES, "dtype"), (c.get("pool") in (None, "mean"), "pool"),
              (isinstance(c.get("tokens"), str), "tokens"),
              (isinstance(index.get("hook_names"), dict) and all(str(L) in index["hook_names"] for L in layers),
               "hook_names")]
    for ok, key in checks:
        if not ok:
            return f"config {key} {c.get(key, index.get(key))!r} is not valid"
    shards, progress = index.get("shards"), index.get("progress")
    if not isinstance(shards, list) or not isinstance(progress, dict):
        return "it has no shard list or no progress"
    ends: dict[str, int] = {}
    for k, e in enumerate(shards):
        if not (isinstance(e, dict) and e.get("pass") in ("main", "text") and is_int(e.get("rows"))
                and is_int(e.get("start")) and is_int(e.get("end")) and e["start"] <= e["end"]):
            return f"shard entry {k} is not valid: {str(e)[:200]}"
        f = e.get("file")
        if (f is None) != (e["rows"] == 0) or (f is not None and not (isinstance(f, str) and OWN_NAMES.match(
                f.rsplit("/", 1)[-1]) and not f.startswith("/") and ".." not in f)):
            return f"shard entry {k} names file {f!r} for {e['rows']} rows"
        if "world_size" not in index:  # one process: each pass's shards follow each other from sample 0
            if e["start"] != ends.get(e["pass"], 0):
                return f"shard entry {k} starts at sample {e['start']}, after a shard that ended at {ends.get(e['pass'], 0)}"
            ends[e["pass"]] = e["end"]
    if "world_size" not in index and any(progress.get(p, 0) != ends.get(p, 0) for p in ("main", "text")):
        return f"its progress {progress} does not match its shards (which end at {ends})"
    if index.get("n_rows") != sum(e["rows"] for e in shards):
        return f"its row count {index.get('n_rows')!r} does not match its shards ({sum(e['rows'] for e in shards)})"
    return None


def read_index(path: Path) -> dict:
    """The checked `index.json` of the store at `path`, or a StoreError naming what is wrong and the fix.

    Example:
        >>> import tempfile
        >>> try:
        ...     read_index(Path(tempfile.mkdtemp()))
        ... except StoreError as e:
        ...     print(str(e).split("; ")[-1])
        create one with vlens.harvest(..., out=...)
    """
    if not path.exists():
        raise _NoStore(f"no store at {path}: the path does not exist; create one with vlens.harvest(..., out={str(path)!r})")
    if not path.is_dir():
        raise StoreError(f"{path} is a file, not a store directory: pass the folder harvest wrote (its out=)")
    idx = path / INDEX
    if not idx.is_file():
        own = sorted(p.name for p in path.iterdir() if OWN_NAMES.match(p.name))
        if own:
            raise StoreError(f"{path} has no {INDEX} but holds {own[:3]}: its index was lost (or a harvest was "
                             "interrupted before writing it); call vlens.harvest again with overwrite=True")
        raise _NoStore(f"{path} is not a harvest store (no {INDEX}); create one with vlens.harvest(..., out=...)")
    try:
        index = json.loads(idx.read_bytes())
    except OSError as e:
        raise StoreError(f"cannot read {idx} ({e}): check its permissions") from e
    except ValueError as e:
        raise StoreError(f"{idx} is not valid JSON ({e}): the store index is damaged; harvest again with "
                         "overwrite=True") from e
    problem = index_problem(index)
    if problem is not None:
        raise StoreError(f"{idx} is damaged: {problem}. Harvest again with overwrite=True (or another out=)")
    return index


def open_shards(path: Path, index: dict) -> tuple[list[_Shard], int | None, str | None]:
    """Open every listed shard: (the shards before the first damaged one, its entry position or None, what is wrong).

    Example:
        >>> open_shards(Path("."), {"shards": [{"file": "shard-00000.safetensors"}]})[1:]
        (0, 'shard shard-00000.safetensors is missing')
    """
    shards = []
    for k, e in enumerate(index["shards"]):
        if not e.get("file"):
            continue
        try:
            shard = _Shard(path / e["file"])
        except StoreError as err:
            return shards, k, str(err)
        problem = shard.problem(e, index["config"])
        if problem is not None:
            return shards, k, f"shard {shard.path} is damaged: {problem}"
        shards.append(shard)
    return shards, None, None


def main_pass_list(path: Path, index: dict, key: str) -> list:
    """The per-sample list `key` ("sample_ids", "sample_keys") of the main pass, from shard metadata and entries.

    Example:
        >>> main_pass_list(Path("."), {"shards": [{"pass": "main", "file": None, "sample_ids": [0, 1]}]}, "sample_ids")
        [0, 1]
    """
    out: list = []
    for e in index["shards"]:
        if e["pass"] != "main":
            continue
        if e.get("file"):
            try:
                part = json.loads(_Shard(path / e["file"]).metadata.get(key, "[]"))
            except StoreError as err:
                raise StoreError(f"{err}; {DAMAGED_HINT}") from err
            except ValueError as err:
                raise StoreError(f"shard {path / e['file']} has damaged metadata {key!r} ({err}); {DAMAGED_HINT}") from err
        else:
            part = e.get(key, [])
        if not isinstance(part, list):
            raise StoreError(f"shard entry of {path} has {key} {str(part)[:80]!r}, not a list; {DAMAGED_HINT}")
        out.extend(part)
    return out
