"""Durable files: atomic writes, fsync, and checksums that tell a damaged file from a good one.

Shared by the harvest writer and store reader (`vlens.activations.writer`,
`vlens.activations.store`) and by SAE training checkpoints
(`vlens.sae.training.resume`), so both write and check files one way:

- `atomic_write(path, write)`: write a temporary file, fsync it, rename it over
  `path`, fsync the directory: a reader sees the old file or the new one, never half;
- `fsync_dir(path)`: make a rename (or a new file) in `path` survive a power cut;
- `file_crc32(path)`: CRC-32 of a file's bytes (zlib's; about 1.5 GB/s here), stored
  beside what vlens writes so that truncation and bit flips are detected on read;
- `json_checksum(doc)`: CRC-32 of a JSON document's canonical form (its own
  `"checksum"` entry left out), stored in the document itself;
- `deferred_interrupt()`: a Ctrl-C inside the block is held until the block ends, so a
  state update made of several parts (an optimiser step and the step counter; a forward's
  rows joining every SAE's buffer) is saved whole or not at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["atomic_write", "fsync_dir", "fsync_file", "file_crc32", "json_checksum", "deferred_interrupt"]


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's bytes to the disk.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a"; _ = p.write_text("x"); fsync_file(p)
    """
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (renames, new files) to the disk; a no-op where directories cannot be opened.

    Example:
        >>> import tempfile
        >>> fsync_dir(tempfile.mkdtemp())
    """
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


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write `path` via `write(tmp)`, fsync, rename over `path`, fsync the directory. No partial file survives.

    The temporary file is `path` + `.tmp`; on any error it is removed and the error re-raised.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "index.json"
        >>> atomic_write(p, lambda tmp: tmp.write_text("{}")); p.read_text()
        '{}'
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def file_crc32(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """The CRC-32 of a file's bytes as 8 hex digits.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a"; _ = p.write_bytes(b"vlens")
        >>> file_crc32(p)
        'bd2ec5ad'
    """
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def json_checksum(doc: dict[str, Any]) -> str:
    """The CRC-32 of a JSON document's canonical form (sorted keys), its `"checksum"` entry left out.

    Example:
        >>> json_checksum({"a": 1, "checksum": "ignored"}) == json_checksum({"a": 1})
        True
    """
    body = {k: v for k, v in doc.items() if k != "checksum"}
    return f"{zlib.crc32(json.dumps(body, sort_keys=True, default=str).encode()):08x}"


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold SIGINT (Ctrl-C) while the block runs; raise `KeyboardInterrupt` after it if one came.

    Outside the main thread (where Python cannot set signal handlers) it holds nothing.

    Example:
        >>> import os, signal
        >>> done = []
        >>> try:
        ...     with deferred_interrupt():
        ...         os.kill(os.getpid(), signal.SIGINT)
        ...         done.append("the block finished")
        ... except KeyboardInterrupt:
        ...     done.append("then the interrupt")
        >>> done
        ['the block finished', 'then the interrupt']
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt
