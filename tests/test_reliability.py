"""The reliability catalogue (issue 14): bad inputs and faults across the public API, each with its expected outcome.

Every entry of `CASES` is one bad input or fault, as a careless or unlucky user would make it, and says
what must happen:

- `error`: a `vlens.errors.VlensError` subclass whose message names the problem (the regex);
- `result`: a valid edge case (grayscale, CMYK, 1×1 images, negative layer indices, -1 labels, a
  repaired store...) with its documented result, checked by the case itself.

Damaged files are made by truncation and bit flips (some hypothesis-generated, deterministic and few
examples so the catalogue stays fast), disk faults by a failing writer or a real file-size limit.
`test_catalogue_counts` checks the size and that nothing is accepted silently. The SIGKILL trials of
harvests and SAE training (kill mid-run, kill during a checkpoint write) are at the end.

Everything runs on `vlens.tiny()` with a handful of 32-pixel images and SAEs of a few latents.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

import vlens
import vlens.sae as vs
from vlens import probes, steering
from vlens.activations import ActivationStore, harvest
from vlens.data import Sample
from vlens.errors import (
    BadImageError, HarvestError, InputError, NonFiniteActivations, NotFoundError, SelectionError, SiteError,
    StoreError, VlensError,
)
from vlens.prepare import load_image

WORDS = ["red", "blue", "square", "circle"]
CAPTIONS = ["a red square", "a blue circle", "red", "a square", "blue", "a red circle"]
HYP = settings(max_examples=12, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def make_data(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        px = (torch.rand(32, 32 + 8 * (i % 3), 3, generator=g) * 255).to(torch.uint8).numpy()
        out.append(Sample(Image.fromarray(px), label=i % 3, caption=CAPTIONS[i % len(CAPTIONS)], id=f"img-{i}"))
    return out


class Env:
    """What every case may use: a tiny model, data, a complete multi-shard store, activations, an SAE."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.vlm = vlens.tiny(words=WORDS, seed=3)
        self.data = make_data()
        self.kw = dict(layers=[1, 3], tokens="image+answer", captions=True, batch_size=2, shard_mb=0.001,
                       progress=False)
        self.store = harvest(self.vlm, self.data, out=root / "template", **self.kw)
        self.pooled = harvest(self.vlm, self.data, layers=[1, 2], pool="mean", out=root / "pooled", progress=False)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(512, 16, generator=g)
        self.mod = (torch.arange(512) % 2).long()
        self.sae = vs.train((self.x, self.mod), "paper", d_sae=32, steps=3, batch_size=128, progress=False,
                            stats_tokens=256)
        self.shard = root / "template" / self.store.index["shards"][0]["file"]

    def harvest(self, out: Path, data=None, **kw):
        return harvest(self.vlm, self.data if data is None else data, out=out, **{**self.kw, **kw})

    def copy(self, tmp: Path) -> Path:
        """A fresh copy of the complete template store."""
        dst = tmp / "copy"
        shutil.copytree(self.root / "template", dst)
        return dst


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny forwards run fastest on one thread, and do not stall when other processes share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def env(tmp_path_factory, one_thread):
    return Env(tmp_path_factory.mktemp("reliability"))


def same_rows(a: ActivationStore, b: ActivationStore) -> None:
    assert len(a) == len(b) and a.complete and b.complete
    for L in a.layers:
        assert torch.equal(a.activations(L).tensor(), b.activations(L).tensor())
    for k, v in a.meta.items():
        assert torch.equal(v, b.meta[k]), k


def flip(path: Path, byte: int, bit: int = 0) -> None:
    raw = bytearray(path.read_bytes())
    raw[byte] ^= 1 << bit
    path.write_bytes(bytes(raw))


def truncate(path: Path, n: int) -> None:
    path.write_bytes(path.read_bytes()[:n])


def edit_index(store: Path, change: Callable[[dict], Any], keep_checksum: bool = True) -> None:
    """Change `index.json` as a user editing it by hand would (its checksum left as it was, unless told)."""
    p = store / "index.json"
    idx = json.loads(p.read_text())
    change(idx)
    if not keep_checksum and isinstance(idx, dict):
        idx.pop("checksum", None)
    p.write_text(json.dumps(idx))


# -- the catalogue ------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    run: Callable[[Env, Path], Any]
    error: type | None = None  # a VlensError subclass, or None for a documented result
    match: str = ""


CASES: list[Case] = []


def error(id: str, err: type, match: str, run: Callable[[Env, Path], Any]) -> None:
    CASES.append(Case(id, run, err, match))


def result(id: str):
    def deco(fn):
        CASES.append(Case(id, fn))
        return fn
    return deco


def _h(**kw):
    """A harvest into a fresh folder with the template's arguments, changed by `kw`."""
    return lambda e, t: e.harvest(t / "h", **kw)


# A. harvest arguments
error("harvest/layer-out-of-range", SiteError, r"layer 99 is out of range", _h(layers=[99]))
error("harvest/no-layers", InputError, r"at least one layer", _h(layers=[]))
error("harvest/unknown-site", SiteError, r"resid_mid", _h(layers=["resid_mid.1"]))
error("harvest/duplicate-layers", InputError, r"more than once", _h(layers=[1, 1]))
error("harvest/negative-duplicate", InputError, r"more than once", _h(layers=[3, -1]))
error("harvest/mixed-kinds", InputError, r"mix the site kinds", _h(layers=["resid_pre.1", "resid_post.2"]))
error("harvest/vision-site", InputError, r"one vector per token", _h(layers=["vision.0"]))
error("harvest/float-layer", SiteError, r"not float", _h(layers=[1.5]))
error("harvest/pool-max", InputError, r"pool must be None .* or 'mean'", _h(pool="max"))
error("harvest/batch-size-0", InputError, r"batch_size must be a positive int, not 0", _h(batch_size=0))
error("harvest/batch-size-negative", InputError, r"batch_size must be a positive int, not -2", _h(batch_size=-2))
error("harvest/batch-size-float", InputError, r"batch_size must be a positive int, not 2.5", _h(batch_size=2.5))
error("harvest/dtype-int", InputError, r"floating-point", _h(dtype=torch.int64))
error("harvest/dtype-float17", InputError, r"float17", _h(dtype="float17"))
error("harvest/tokens-typo", SelectionError, r"unknown token selection 'imgae'", _h(tokens="imgae"))
error("harvest/prompt-without-image", InputError, r"no '<image>' placeholder", _h(prompt="Describe it."))
error("harvest/shard-mb-0", InputError, r"shard_mb must be a positive", _h(shard_mb=0))
error("harvest/shard-mb-negative", InputError, r"shard_mb must be a positive", _h(shard_mb=-1))
error("harvest/out-empty-string", InputError, r"out='' is an empty path", lambda e, t: e.harvest(""))
error("harvest/out-blank", InputError, r"empty path", lambda e, t: e.harvest("  "))


def _out_is_file(e, t):
    (t / "f").write_text("mine")
    e.harvest(t / "f")


error("harvest/out-is-a-file", InputError, r"is a file: pass a directory", _out_is_file)


def _out_under_file(e, t):
    (t / "f").write_text("mine")
    e.harvest(t / "f" / "store")


error("harvest/out-cannot-be-created", HarvestError, r"cannot create the store directory", _out_under_file)
error("harvest/out-unwritable", HarvestError, r"cannot create the store directory|not writable",
      lambda e, t: e.harvest(Path("/proc/vlens-store")))


def _foreign_folder(e, t):
    (t / "h").mkdir()
    (t / "h" / "notes.tmp").write_text("my notes")
    (t / "h" / "shard-00000.safetensors.bak").write_text("mine")
    try:
        e.harvest(t / "h")
    finally:
        assert (t / "h" / "notes.tmp").read_text() == "my notes"  # nothing of the user's is touched


error("harvest/non-empty-non-store-folder", HarvestError, r"not empty and is not a harvest store .*notes\.tmp",
      _foreign_folder)
error("harvest/data-empty", InputError, r"data is empty", lambda e, t: e.harvest(t / "h", data=[]))
error("harvest/data-generator", InputError, r"must be a sequence .* not generator",
      lambda e, t: e.harvest(t / "h", data=(s for s in e.data)))
error("harvest/data-of-images", InputError, r"sample 0 .* has no image \(pass vlens\.data\.Sample",
      lambda e, t: e.harvest(t / "h", data=[s.image for s in e.data], captions=False))
error("harvest/sample-without-image", InputError, r"sample 1 .* has no image",
      lambda e, t: e.harvest(t / "h", data=[e.data[0], Sample(None, caption="red")]))


def _missing_image(e, t):
    e.harvest(t / "h", data=[e.data[0], e.data[1], Sample(str(t / "gone.png"), caption="red")])


error("harvest/missing-image-file", BadImageError, r"sample 2 .*image file not found: .*gone\.png", _missing_image)


def _corrupt_image(e, t):
    (t / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    e.harvest(t / "h", data=[e.data[0], Sample(str(t / "bad.png"), caption="red", id="b")])


error("harvest/corrupt-image-file", BadImageError, r"sample 1 \(id 'b'\): cannot decode image .*bad\.png",
      _corrupt_image)


def _lazy_corrupt(e, t):
    root = t / "folder"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / c / "0.png")
    (root / "b" / "1.png").write_bytes(b"garbage")
    ds = vlens.data.image_folder(root, on_error="raise")
    e.harvest(t / "h", data=ds, captions=False, tokens="image")


error("harvest/lazy-dataset-corrupt-image", BadImageError, r"sample 2: cannot decode image .*1\.png", _lazy_corrupt)
error("harvest/label-string", InputError, r"sample 0 .* label 'cat'",
      lambda e, t: e.harvest(t / "h", data=[Sample(e.data[0].image, label="cat", caption="red")]))
error("harvest/label-float", InputError, r"label 1\.5",
      lambda e, t: e.harvest(t / "h", data=[Sample(e.data[0].image, label=1.5, caption="red")]))
error("harvest/label-negative", InputError, r"label -3",
      lambda e, t: e.harvest(t / "h", data=[Sample(e.data[0].image, label=-3, caption="red")]))
error("harvest/caption-missing", InputError, r"has no caption, but captions=True",
      lambda e, t: e.harvest(t / "h", data=[Sample(e.data[0].image)]))
error("harvest/caption-list", InputError, r"a caption of type list",
      lambda e, t: e.harvest(t / "h", data=[Sample(e.data[0].image, caption=["a", "b"])]))
error("harvest/text-only-without-captions", InputError, r"no caption",
      lambda e, t: e.harvest(t / "h", data=[Sample(e.data[0].image)], captions=False, text_only=True))


# B. resuming and re-running a store
def _interrupted(e, t, n_done=2):
    """A store at t/'r' whose harvest stopped after `n_done` callback calls (two samples each)."""
    calls = []

    def stop(info):
        calls.append(info)
        if len(calls) == n_done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        e.harvest(t / "r", callback=stop)
    return t / "r"


def _resume_other_data(e, t):
    _interrupted(e, t)
    e.harvest(t / "r", data=make_data(seed=1))


def _resume_other_pixels(e, t):
    _interrupted(e, t)
    other = [Sample(s.image.transpose(Image.FLIP_LEFT_RIGHT), label=s.label, caption=s.caption, id=s.id)
             for s in e.data]
    e.harvest(t / "r", data=other)


def _resume_other_order(e, t):
    _interrupted(e, t)
    e.harvest(t / "r", data=e.data[::-1])


def _resume_no_ids(e, t):
    strip = [Sample(s.image, label=s.label, caption=s.caption) for s in e.data]
    calls = []
    with pytest.raises(KeyboardInterrupt):
        e.harvest(t / "r", data=strip, callback=lambda i: calls.append(i) or (len(calls) == 2 and _raise()))
    e.harvest(t / "r", data=[Sample(s.image, label=(s.label + 1) % 3, caption=s.caption) for s in e.data])


def _raise():
    raise KeyboardInterrupt


error("resume/other-data-same-length", HarvestError, r"harvest of other data: sample \d+ .*same data", _resume_other_data)
error("resume/same-ids-other-images", HarvestError, r"harvest of other data", _resume_other_pixels)
error("resume/same-data-other-order", HarvestError, r"harvest of other data", _resume_other_order)
error("resume/no-ids-other-labels", HarvestError, r"harvest of other data", _resume_no_ids)
error("rerun/complete-store-other-data", HarvestError, r"harvest of other data",
      lambda e, t: (e.harvest(t / "r"), e.harvest(t / "r", data=make_data(seed=2))))
error("resume/other-length", HarvestError, r"n_samples is 6 there but 5 now",
      lambda e, t: (_interrupted(e, t), e.harvest(t / "r", data=e.data[:5])))
error("resume/other-layers", HarvestError, r"layers is \[1, 3\] there but \[1, 2\] now",
      lambda e, t: (_interrupted(e, t), e.harvest(t / "r", layers=[1, 2])))
error("resume/other-model", HarvestError, r"model_fingerprint",
      lambda e, t: (_interrupted(e, t), harvest(vlens.tiny(words=WORDS, seed=4), e.data, out=t / "r", **e.kw)))


def _shards_without_index(e, t):
    shutil.copytree(e.root / "template", t / "r")
    (t / "r" / "index.json").unlink()
    e.harvest(t / "r")


error("resume/shards-without-index", HarvestError, r"shard files but no index\.json; pass overwrite=True",
      _shards_without_index)


@result("resume/same-data-finishes-identically")
def _(e, t):
    _interrupted(e, t)
    part = ActivationStore(t / "r")
    assert not part.complete
    with pytest.warns(UserWarning, match="incomplete.*Call vlens.harvest again"):
        part.activations(1)
    same_rows(e.harvest(t / "r"), e.store)


@result("resume/killed-before-first-index-write")
def _(e, t):
    (t / "r").mkdir()
    (t / "r" / "index.json.tmp").write_text('{"format": "vlens.ha')
    same_rows(e.harvest(t / "r"), e.store)
    assert sorted(p.name for p in (t / "r").iterdir() if p.suffix == ".tmp") == []


@result("rerun/overwrite-keeps-user-files")
def _(e, t):
    e.harvest(t / "r")
    (t / "r" / "mine.tmp").write_text("keep me")
    (t / "r" / "notes").mkdir()
    other = e.harvest(t / "r", layers=[2], overwrite=True)
    assert other.layers == [2] and (t / "r" / "mine.tmp").read_text() == "keep me" and (t / "r" / "notes").is_dir()


@result("rerun/overwrite-replaces-a-store-of-other-data")
def _(e, t):
    e.harvest(t / "r", data=make_data(seed=5))
    same_rows(e.harvest(t / "r", overwrite=True), e.store)


@result("rerun/overwrite-into-foreign-folder")
def _(e, t):
    (t / "r").mkdir()
    (t / "r" / "a.tmp").write_text("x")
    same_rows(e.harvest(t / "r", overwrite=True), e.store)
    assert (t / "r" / "a.tmp").read_text() == "x"


# C. disk faults while writing
def _failing_save(monkeypatch, exc, at=2):
    import safetensors.torch

    real, calls = safetensors.torch.save_file, [0]

    def save(tensors, path, metadata=None):
        calls[0] += 1
        if calls[0] == at:
            Path(path).write_bytes(b"partial")
            raise exc
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save)
    return calls


@pytest.mark.parametrize("exc, match", [
    (None, r"the disk is full while writing .*consistent.*call harvest again"),  # safetensors' own error
    (OSError(errno.ENOSPC, "No space left on device"), r"the disk is full .*Free some space"),
    (OSError(errno.EIO, "Input/output error"), r"writing failed .*Input/output error.*Fix the problem"),
], ids=["safetensors-error", "enospc", "eio"])
def test_disk_fault_during_shard_write(env, tmp_path, monkeypatch, exc, match):
    from safetensors import SafetensorError

    exc = exc or SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    calls = _failing_save(monkeypatch, exc)
    with pytest.raises(HarvestError, match=match):
        env.harvest(tmp_path / "d")
    assert calls[0] == 2  # the failed write is not retried
    left = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert left == ["index.json", "shard-00000.safetensors"]
    assert ActivationStore(tmp_path / "d").index["progress"]["main"] == 2
    monkeypatch.undo()
    same_rows(env.harvest(tmp_path / "d"), env.store)


def test_disk_full_during_index_write(env, tmp_path, monkeypatch):
    import vlens.activations.writer as writer

    real, calls = writer._atomic_write, [0]

    def atomic(path, write):
        if path.name == "index.json":
            calls[0] += 1
            if calls[0] == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, write)

    monkeypatch.setattr(writer, "_atomic_write", atomic)
    with pytest.raises(HarvestError, match=r"the disk is full while writing .*index\.json"):
        env.harvest(tmp_path / "d")
    monkeypatch.undo()
    same_rows(env.harvest(tmp_path / "d"), env.store)


# D. damaged stores
def _open(path_fn):
    return lambda e, t: ActivationStore(path_fn(e, t))


error("store/missing-path", StoreError, r"no store at .*does not exist", lambda e, t: ActivationStore(t / "nope"))
error("store/path-is-a-file", StoreError, r"is a file, not a store directory",
      lambda e, t: ((t / "f").write_text("x"), ActivationStore(t / "f")))
error("store/empty-folder", StoreError, r"is not a harvest store \(no index\.json\)",
      lambda e, t: ActivationStore(t))
error("store/index-deleted", StoreError, r"has no index\.json but holds .*shard-00000",
      lambda e, t: ((e.copy(t) / "index.json").unlink(), ActivationStore(t / "copy")))
error("store/index-is-a-folder", StoreError, r"index\.json",
      lambda e, t: ((e.copy(t) / "index.json").unlink(), (t / "copy" / "index.json").mkdir(),
                    ActivationStore(t / "copy")))


def _index_text(text):
    def run(e, t):
        p = e.copy(t)
        (p / "index.json").write_bytes(text)
        ActivationStore(p)
    return run


for name, text, match in [
    ("garbage", b"\x00\x01 not json", r"not valid JSON"),
    ("empty", b"", r"not valid JSON"),
    ("truncated", None, r"not valid JSON"),
    ("list", b"[1, 2]", r"damaged: it holds a JSON list, not a store index"),
    ("null", b"null", r"JSON NoneType, not a store index"),
    ("number", b"3", r"JSON int, not a store index"),
    ("string", b'"index"', r"JSON str, not a store index"),
    ("empty-object", b"{}", r"format is None"),
    ("latin1", "{\"format\": \"vlens.harvest/1\xe9\"}".encode("latin-1"), r"not valid JSON|format"),
]:
    if text is None:
        def _trunc(e, t):
            p = e.copy(t)
            truncate(p / "index.json", 100)
            ActivationStore(p)
        error(f"store/index-{name}", StoreError, match, _trunc)
    else:
        error(f"store/index-{name}", StoreError, match, _index_text(text))


def _edited(change, match, keep_checksum=False):
    def run(e, t):
        p = e.copy(t)
        edit_index(p, change, keep_checksum)
        ActivationStore(p)
    return run


for name, change, match in [
    ("format-other", lambda i: i.update(format="vlens.harvest/9"), r"format is 'vlens\.harvest/9'"),
    ("no-config", lambda i: i.pop("config"), r"it has no config"),
    ("layers-strings", lambda i: i["config"].update(layers=["a"]), r"config layers \['a'\]"),
    ("layers-empty", lambda i: i["config"].update(layers=[]), r"config layers \[\]"),
    ("site-unknown", lambda i: i["config"].update(site="resid_mid"), r"config site 'resid_mid'"),
    ("d-model-zero", lambda i: i["config"].update(d_model=0), r"config d_model 0"),
    ("dtype-float17", lambda i: i["config"].update(dtype="float17"), r"config dtype 'float17'"),
    ("pool-max", lambda i: i["config"].update(pool="max"), r"config pool 'max'"),
    ("hook-names-missing", lambda i: i.pop("hook_names"), r"hook_names"),
    ("shards-not-list", lambda i: i.update(shards={"a": 1}), r"no shard list"),
    ("shard-entry-no-rows", lambda i: i["shards"][1].pop("rows"), r"shard entry 1 is not valid"),
    ("shard-entry-path-escape", lambda i: i["shards"][0].update(file="../../etc/passwd"), r"names file '\.\./\.\./etc"),
    ("shard-entry-gap", lambda i: i["shards"][1].update(start=99, end=99), r"starts at sample 99"),
    ("progress-ahead", lambda i: i["progress"].update(main=6000), r"progress .* does not match its shards"),
    ("rows-total", lambda i: i.update(n_rows=i["n_rows"] + 1), r"row count \d+ does not match"),
    ("rows-of-a-shard", lambda i: (i["shards"][0].update(rows=i["shards"][0]["rows"] + 1),
                                   i.update(n_rows=i["n_rows"] + 1)), r"shape \[\d+, 64\], the index says"),
    ("d-model-other", lambda i: i["config"].update(d_model=32), r"shape \[\d+, 64\], the index says \[\d+, 32\]"),
    ("layer-not-in-shards", lambda i: (i["config"].update(layers=[1, 2]), i["hook_names"].update({"2": "x"})),
     r"no tensor 'act\.2'"),
    ("dtype-other", lambda i: i["config"].update(dtype="float16"), r"dtype F32, the index says float16"),
]:
    error(f"store/index-{name}", StoreError, match, _edited(change, match))
error("store/index-edited-keeping-checksum", StoreError, r"does not match its checksum .*delete its \"checksum\"",
      _edited(lambda i: i["config"].update(prompt="other"), "", keep_checksum=True))


@result("store/index-edited-on-purpose-checksum-removed")
def _(e, t):
    p = e.copy(t)
    edit_index(p, lambda i: i["config"].update(model="renamed"), keep_checksum=False)
    s = ActivationStore(p)
    assert s.config["model"] == "renamed"
    same_rows(s, e.store)


def _shard(fn):
    def run(e, t):
        p = e.copy(t)
        fn(p / e.shard.name, e, t)
        ActivationStore(p)
    return run


error("store/shard-deleted", StoreError, r"shard .*shard-00000\.safetensors is missing.*harvest again with the same",
      _shard(lambda s, e, t: s.unlink()))
error("store/shard-is-a-folder", StoreError, r"is missing", _shard(lambda s, e, t: (s.unlink(), s.mkdir())))
for n in (0, 3, 8, 100, -1):
    error(f"store/shard-truncated-{n}", StoreError, r"cannot be read .*the store is damaged",
          _shard(lambda s, e, t, n=n: truncate(s, n if n >= 0 else s.stat().st_size - 1)))
error("store/shard-replaced-by-png", StoreError, r"cannot be read",
      _shard(lambda s, e, t: Image.new("RGB", (4, 4)).save(s, format="PNG")))
error("store/shard-from-other-store", StoreError, r"no tensor 'act\.3'",
      _shard(lambda s, e, t: shutil.copy(e.root / "pooled" / "shard-00000.safetensors", s)))
error("store/shards-swapped", StoreError, r"shape \[\d+, 64\], the index says",
      _shard(lambda s, e, t: shutil.copy(s.with_name("shard-00002.safetensors"), s)))
error("store/shard-header-bit-flip", StoreError, r"cannot be read|damaged", _shard(lambda s, e, t: flip(s, 3, 6)))


def _data_flip(e, t):
    p = e.copy(t)
    s = p / e.shard.name
    flip(s, s.stat().st_size - 7, 2)  # inside the tensor bytes: the header still parses
    store = ActivationStore(p)  # the structure is intact...
    store.verify()  # ...the checksum is not


error("store/shard-data-bit-flip-verify", StoreError, r"does not match its checksum .*delete that file", _data_flip)


@result("store/damaged-shard-repaired-by-harvesting-again")
def _(e, t):
    p = e.copy(t)
    truncate(p / "shard-00001.safetensors", 50)
    with pytest.warns(UserWarning, match=r"shard-00001.*cannot be read.*keeping the 1 shard entry before it"):
        same_rows(e.harvest(p), e.store)


@result("store/bit-flipped-shard-deleted-then-repaired")
def _(e, t):
    p = e.copy(t)
    flip(p / "shard-00002.safetensors", 200)
    with pytest.raises(StoreError, match="shard-00002"):
        ActivationStore(p).verify()
    (p / "shard-00002.safetensors").unlink()
    with pytest.warns(UserWarning, match="is missing"):
        same_rows(e.harvest(p), e.store)


error("store/damaged-index-refused-by-harvest", HarvestError, r"index\.json is damaged: .*overwrite=True",
      lambda e, t: (edit_index(e.copy(t), lambda i: i.update(n_rows=-1)), e.harvest(t / "copy")))
error("harvest/foreign-index-json-never-replaced", HarvestError, r"is not the index of a vlens store .*remove that",
      lambda e, t: ((t / "site").mkdir(), (t / "site" / "index.json").write_text('{"pages": []}'),
                    e.harvest(t / "site", overwrite=True)))


@result("store/damaged-index-replaced-with-overwrite")
def _(e, t):
    p = e.copy(t)
    edit_index(p, lambda i: i["config"].update(d_model=0))
    same_rows(e.harvest(p, overwrite=True), e.store)


# E. reading a store
def _s(fn):
    return lambda e, t: fn(e.store)


error("store/batches-0", InputError, r"batch_size must be a positive int, not 0", _s(lambda s: next(s.batches(1, 0))))
error("store/batches-negative", InputError, r"batch_size must be a positive int, not -1",
      _s(lambda s: next(s.batches(1, -1))))
error("store/batches-float", InputError, r"not 1\.5", _s(lambda s: next(s.batches(1, 1.5))))
error("store/batches-buffer-0", InputError, r"buffer_shards must be a positive int",
      _s(lambda s: next(s.batches(1, buffer_shards=0))))
error("store/batches-int-dtype", InputError, r"floating-point torch dtype",
      _s(lambda s: next(s.batches(1, dtype=torch.int32))))
error("store/layer-not-harvested", StoreError, r"layer 7 was not harvested: this store holds layers \[1, 3\]",
      _s(lambda s: s.activations(7)))
error("store/site-of-other-kind", StoreError, r"holds resid_pre sites .* not resid_post\.1",
      _s(lambda s: s.activations("resid_post.1")))
error("store/site-unknown", SiteError, r"bogus", _s(lambda s: s.activations("bogus")))
error("store/layer-none", StoreError, r"layer None was not harvested", _s(lambda s: s.activations(None)))
error("store/filter-modality", InputError, r"modality must be 'image' or 'text'", _s(lambda s: s.filter("audio")))
error("store/filter-role", InputError, r"role must be one of", _s(lambda s: s.filter(role="system")))
error("store/filter-label-string", InputError, r"label must be a class id", _s(lambda s: s.filter(label="cat")))
error("store/pooled-other-layer", StoreError, r"layer 9 was not harvested", _s(lambda s: s.pooled(9)))
error("store/hook-name-other-layer", StoreError, r"layer 2 was not harvested", _s(lambda s: s.hook_name(2)))


@result("store/negative-row-index")
def _(e, t):
    rows = e.store.activations(1)
    assert torch.equal(rows[-1], rows[len(rows) - 1])
    with pytest.raises(IndexError, match="out of range"):  # the sequence protocol, as a tensor
        rows[len(rows)]


@result("store/selection-that-selects-nothing")
def _(e, t):
    with pytest.warns(UserWarning, match="selected nothing in 6 sample"):
        s = e.harvest(t / "n", tokens="answer", captions=False)
    assert len(s) == 0 and s.complete
    with pytest.raises(InputError, match="0 rows"):
        vs.train(s, layer=1, steps=1, progress=False)


def _incomplete(e, t):
    return ActivationStore(_interrupted(e, t))


for name, use in [
    ("pooled", lambda s: s.pooled(1)),
    ("activations", lambda s: s.activations(3)),
    ("batches", lambda s: list(s.batches(1, 8))),
    ("probe-sweep", lambda s: probes.sweep(s, [1])),
    ("sae-train", lambda s: vs.train(s, layer=1, d_sae=8, steps=1, progress=False, stats_tokens=0)),
]:
    def _run(e, t, use=use):
        s = _incomplete(e, t)
        with pytest.warns(UserWarning, match=r"is incomplete: its harvest stopped after 4 of 6 samples.*same arguments"):
            try:
                use(s)
            except InputError:  # e.g. a probe on 2 samples: the warning came first
                pass
    result(f"store/incomplete-{name}-warns")(_run)


# F. SAE training
def _t(data=None, **kw):
    base = dict(d_sae=16, steps=2, batch_size=64, progress=False, stats_tokens=0)
    return lambda e, t: vs.train(e.x if data is None else data(e), **{**base, **kw})


error("train/steps-0", InputError, r"steps must be an int >= 1, not 0", _t(steps=0))
error("train/steps-negative", InputError, r"steps must be an int >= 1, not -3", _t(steps=-3))
error("train/steps-float", InputError, r"steps must be an int >= 1, not 2\.5", _t(steps=2.5))
error("train/n-tokens-0", InputError, r"n_tokens must be an int >= 1", _t(steps=None, n_tokens=0))
error("train/epochs-0", InputError, r"epochs must be a number > 0", _t(steps=None, epochs=0))
error("train/epochs-negative", InputError, r"epochs must be a number > 0", _t(steps=None, epochs=-1.0))
error("train/batch-size-0", InputError, r"batch_size must be an int >= 1", _t(batch_size=0))
error("train/batch-size-negative", InputError, r"batch_size must be an int >= 1", _t(batch_size=-5))
error("train/d-sae-0", InputError, r"d_sae must be an int >= 1", _t(d_sae=0))
error("train/expansion-0", InputError, r"expansion must be an int >= 1", _t(d_sae=None, expansion=0))
error("train/empty-tensor", InputError, r"no activations to train on: the data has 0 rows",
      _t(lambda e: torch.empty(0, 16)))
error("train/empty-iterable", InputError, r"iterable is empty", _t(lambda e: []))
error("train/all-nan", NonFiniteActivations, r"all \d+ activation rows .* hold NaN/inf",
      _t(lambda e: torch.full((256, 16), float("nan"))))
error("train/all-nan-unnormalised", NonFiniteActivations, r"batch 0 contains NaN/inf",
      _t(lambda e: torch.full((256, 16), float("nan")), normalize=False))
error("train/one-nan-row", NonFiniteActivations, r"batch \d+ contains NaN/inf .*rows \[\d+\] of the data",
      _t(lambda e: torch.where(torch.arange(512)[:, None] == 100, float("nan"), e.x), steps=8, shuffle=False))
error("train/inf", NonFiniteActivations, r"NaN/inf",
      _t(lambda e: torch.where(torch.arange(512)[:, None] == 0, float("inf"), e.x), shuffle=False, normalize=False))
error("train/one-dim", InputError, r"\[n_tokens, d_model\] array", _t(lambda e: e.x[:, 0]))
error("train/three-dim", InputError, r"\[n_tokens, d_model\] array", _t(lambda e: e.x.reshape(8, 64, 16)))
error("train/d-in-mismatch", InputError, r"d_in=8 but the activations have width 16", _t(d_in=8))
error("train/unknown-preset", InputError, r"unknown preset 'papr'", lambda e, t: vs.train(e.x, "papr", steps=1))
error("train/unknown-option", InputError, r"unknown training option\(s\) \['learning_rate'\]",
      _t(learning_rate=1e-3))
error("train/lr-negative", InputError, r"lr=-0\.001 \(a learning rate > 0\)", _t(lr=-1e-3))
error("train/lr-nan", InputError, r"lr=nan", _t(lr=float("nan")))
error("train/topk-k-too-large", InputError, r"k=64 .*need 1 <= k <= d_sae", lambda e, t: vs.train(
    e.x, "topk", d_sae=16, k=64, steps=1, progress=False))
error("train/topk-k-0", InputError, r"k=0", lambda e, t: vs.train(e.x, "topk", d_sae=16, k=0, steps=1, progress=False))
error("train/checkpoint-every-0", InputError, r"checkpoint_every must be an int >= 1",
      _t(checkpoint_every=0, checkpoint_dir=None))
error("train/log-every-0", InputError, r"log_every must be an int >= 1", _t(log_every=0))
error("train/string-data", InputError, r"cannot train on str", _t(lambda e: "activations.pt"))
error("train/none-data", InputError, r"cannot train on NoneType", _t(lambda e: None))
error("train/modality-length", InputError, r"256 modality labels for 512 activation rows",
      _t(lambda e: (e.x, e.mod[:256])))
error("train/store-two-layers-no-layer", StoreError, r"holds layers \[1, 3\]: pass layer=",
      lambda e, t: vs.train(e.store, steps=1, progress=False))
error("train/store-other-layer", StoreError, r"layer 9 is not in this store",
      lambda e, t: vs.train(e.store, layer=9, steps=1, progress=False))


def _ck(e, t, **kw):
    base = dict(d_sae=16, steps=6, batch_size=64, progress=False, stats_tokens=0, lr=1e-3, checkpoint_every=2,
                checkpoint_dir=t / "ck")
    return vs.train((e.x, e.mod), "paper", **{**base, **kw})


def _interrupted_training(e, t, at=4):
    def stop(step, metrics):
        if step == at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _ck(e, t, callback=stop, log_every=1)
    return sorted(p.name for p in (t / "ck").iterdir())


def _same_sae(a, b):
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def _straight(e, t):
    return _ck(e, t, checkpoint_dir=None)


for name, damage, match in [
    ("weights-truncated", lambda p: truncate(p / "sae_weights.safetensors", 40), "sae_weights.*checksum"),
    ("state-bit-flip", lambda p: flip(p / "trainer_state.safetensors", 300, 4), "trainer_state.*checksum"),
    ("trainer-json-garbage", lambda p: (p / "trainer.json").write_text("{"), "trainer.json is unreadable"),
    ("trainer-json-edited", lambda p: (p / "trainer.json").write_text(
        (p / "trainer.json").read_text().replace('"step": 5', '"step": 4')), "trainer.json does not match"),
    ("weights-deleted", lambda p: (p / "sae_weights.safetensors").unlink(), "sae_weights.safetensors is missing"),
]:
    @result(f"checkpoint/latest-{name}-falls-back")
    def _(e, t, damage=damage, match=match):
        names = _interrupted_training(e, t)
        assert names == ["step_000000004", "step_000000005"], names
        damage(t / "ck" / "step_000000005")
        with pytest.warns(UserWarning, match=rf"{match}.*Resuming from step_000000004"):
            resumed = _ck(e, t)
        _same_sae(resumed, _straight(e, t))


def _all_damaged(e, t):
    _interrupted_training(e, t)
    for p in (t / "ck").iterdir():
        truncate(p / "trainer_state.safetensors", 10)
    _ck(e, t)


error("checkpoint/all-damaged", InputError, r"no intact checkpoint to resume from: .*resume=False", _all_damaged)
error("checkpoint/other-config", InputError, r"lr: checkpoint has 0\.001, this run has 0\.002",
      lambda e, t: (_interrupted_training(e, t), _ck(e, t, lr=2e-3)))


@result("checkpoint/all-damaged-resume-false-starts-over")
def _(e, t):
    _interrupted_training(e, t)
    for p in (t / "ck").iterdir():
        (p / "trainer.json").write_text("x")
    _same_sae(_ck(e, t, resume=False), _straight(e, t))


@result("checkpoint/leftovers-removed-user-files-kept")
def _(e, t):
    (t / "ck").mkdir()
    for name in (".tmp_step_000000004_999", ".old_step_000000002_999", "my_notes", ".tmp_step_mine"):
        (t / "ck" / name).mkdir()
    (t / "ck" / "readme.txt").write_text("mine")
    _ck(e, t)
    assert sorted(p.name for p in (t / "ck").iterdir()) == [
        ".tmp_step_mine", "my_notes", "readme.txt", "step_000000004", "step_000000006"]


# G. SAE evaluation
def _nan_sae(e):
    sae = vs.train(e.x, "paper", d_sae=16, steps=1, batch_size=64, progress=False, stats_tokens=0)
    with torch.no_grad():
        sae.W_enc[0, 3] = float("nan")
    return sae


error("evaluate/nan-activations", NonFiniteActivations, r"activations hold NaN/inf values \(row\(s\) \[100\]",
      lambda e, t: vs.evaluate(e.sae, torch.where(torch.arange(512)[:, None] == 100, float("nan"), e.x)))
error("evaluate/inf-activations", NonFiniteActivations, r"row\(s\) \[0\]",
      lambda e, t: vs.evaluate(e.sae, torch.where(torch.arange(512)[:, None] == 0, float("inf"), e.x)))
error("evaluate/nan-weights", NonFiniteActivations, r"SAE gives NaN/inf latents .*weights hold NaN",
      lambda e, t: vs.evaluate(_nan_sae(e), e.x))
error("evaluate/width-mismatch", InputError, r"width 8 but the SAE reads d_in = 16",
      lambda e, t: vs.evaluate(e.sae, e.x[:, :8]))
error("evaluate/batch-size-0", InputError, r"batch_size must be an int >= 1",
      lambda e, t: vs.evaluate(e.sae, e.x, batch_size=0))
error("evaluate/n-tokens-0", InputError, r"n_tokens must be an int >= 1",
      lambda e, t: vs.evaluate(e.sae, e.x, n_tokens=0))
error("evaluate/empty", InputError, r"no activations to evaluate",
      lambda e, t: vs.evaluate(e.sae, torch.empty(0, 16)))


# H. probes
def _xy(n_per=10, classes=3, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per)
    return torch.randn(len(y), d, generator=g) + 3 * torch.eye(classes, d)[y], y


@result("probe/no-label-rows-left-out")
def _(e, t):
    X, y = _xy()
    y2 = y.clone()
    y2[::7] = -1
    with pytest.warns(UserWarning, match=r"5 of 30 samples have no label \(-1\) and are left out"):
        p = probes.fit_probe(X, y2)
    assert p.classes.tolist() == [0, 1, 2]


@result("probe/pairwise-no-label-rows-left-out")
def _(e, t):
    X, y = _xy()
    y[0] = -1
    with pytest.warns(UserWarning, match="no label"):
        pp = probes.pairwise_probes(X, y)
    assert pp.pairs == [(0, 1), (0, 2), (1, 2)]


@result("probe/sweep-store-with-unlabelled-samples")
def _(e, t):
    data = [Sample(s.image, label=None if i == 0 else i % 2, id=i) for i, s in enumerate(make_data(8))]
    s = harvest(e.vlm, data, layers=[1], pool="mean", out=t / "p", progress=False)
    assert s.pooled(1)[1].tolist()[0] == -1
    with pytest.warns(UserWarning, match="1 of 8 samples have no label"):
        sw = probes.sweep(s, [1])
    assert sw.probes[1].classes.tolist() == [0, 1]


error("probe/all-unlabelled", InputError, r"every label is -1",
      lambda e, t: probes.fit_probe(_xy()[0], torch.full((30,), -1)))
error("probe/string-labels", InputError, r"not strings such as 'cat'",
      lambda e, t: probes.fit_probe(_xy()[0], ["cat", "dog", "fox"] * 10))
error("probe/numpy-string-labels", InputError, r"not strings",
      lambda e, t: probes.fit_probe(_xy()[0], np.array(["cat", "dog", "fox"] * 10)))
error("probe/float-labels", InputError, r"integer class ids",
      lambda e, t: probes.fit_probe(_xy()[0], torch.linspace(0, 1, 30)))
error("probe/label-minus-2", InputError, r"class ids >= 0, or -1 for 'no label'; got -2",
      lambda e, t: probes.fit_probe(_xy()[0], torch.tensor([-2] + [0, 1] * 14 + [1])))
error("probe/one-class", InputError, r"at least two classes",
      lambda e, t: probes.fit_probe(_xy()[0], torch.zeros(30, dtype=torch.long)))
error("probe/class-with-one-example", InputError, r"fewer than two examples",
      lambda e, t: probes.fit_probe(_xy()[0], torch.tensor([0] * 15 + [1] * 14 + [2])))
error("probe/x-one-dim", InputError, r"must be 2-D", lambda e, t: probes.fit_probe(torch.randn(30), _xy()[1]))
error("probe/x-three-dim", InputError, r"must be 2-D", lambda e, t: probes.fit_probe(torch.randn(30, 2, 4), _xy()[1]))
error("probe/x-nan", InputError, r"NaN/inf entries",
      lambda e, t: probes.fit_probe(torch.where(torch.arange(30)[:, None] == 3, float("nan"), _xy()[0]), _xy()[1]))
error("probe/y-wrong-length", InputError, r"one label per row", lambda e, t: probes.fit_probe(_xy()[0], _xy()[1][:20]))
error("probe/ragged-x", InputError, r"\[n, d\]", lambda e, t: probes.fit_probe([[1.0, 2.0], [3.0]], [0, 1]))
error("probe/kind-unknown", InputError, r"kind must be 'softmax' or 'ovr'", lambda e, t: probes.fit_probe(*_xy(), "svm"))
error("probe/test-size-0", InputError, r"test_size must be in \(0, 1\)",
      lambda e, t: probes.fit_probe(*_xy(), test_size=0))
error("probe/test-size-over-1", InputError, r"test_size must be in \(0, 1\)",
      lambda e, t: probes.fit_probe(*_xy(), test_size=1.5))
error("probe/pairwise-missing-class", InputError, r"classes \[7\] have no examples",
      lambda e, t: probes.pairwise_probes(*_xy(), [(0, 7)]))
error("probe/sweep-layer-not-harvested", NotFoundError, r"layer 5 was not harvested",
      lambda e, t: probes.sweep(e.pooled, [5]))
error("probe/decodable-threshold", InputError, r"threshold is an accuracy in \[0, 1\]",
      lambda e, t: probes.decodable_classes(probes.fit_probe(*_xy()), 2.0))
error("probe/direction-unknown-class", NotFoundError, r"class 9 is not one of",
      lambda e, t: probes.fit_probe(*_xy()).direction(9))
error("probe/logits-wrong-width", InputError, r"width 4 but the probe was fit on width 8",
      lambda e, t: probes.fit_probe(*_xy()).logits(torch.randn(2, 4)))


# I. steering vectors and interventions
@result("steer/diff-of-means-ignores-no-label-rows")
def _(e, t):
    X, y = _xy()
    y2 = torch.cat([y, torch.tensor([-1, -1])])
    X2 = torch.cat([X, torch.full((2, 8), 100.0)])
    assert torch.equal(steering.diff_of_means(X2, y2, 0, 1), steering.diff_of_means(X, y, 0, 1))
    assert torch.equal(steering.class_means(X2, y2), steering.class_means(X, y))


error("steer/diff-of-means-nan", NonFiniteActivations, r"rows \[3\] of X .*hold NaN/inf",
      lambda e, t: steering.diff_of_means(torch.where(torch.arange(30)[:, None] == 3, float("nan"), _xy()[0]),
                                          _xy()[1], 0, 1))
error("steer/diff-of-means-src-no-label", InputError, r"src=-1 is not a class id",
      lambda e, t: steering.diff_of_means(*_xy(), -1, 1))
error("steer/diff-of-means-same-class", InputError, r"src and tgt are the same class",
      lambda e, t: steering.diff_of_means(*_xy(), 1, 1))
error("steer/diff-of-means-strings", InputError, r"not strings",
      lambda e, t: steering.diff_of_means(_xy()[0], ["a", "b", "c"] * 10, 0, 1))
error("steer/diff-of-means-one-example", InputError, r"class 2 has 1 example",
      lambda e, t: steering.diff_of_means(_xy()[0], torch.tensor([0] * 15 + [1] * 14 + [2]), 0, 2))
error("steer/diff-of-means-absent-class", InputError, r"class 5 has 0 example",
      lambda e, t: steering.diff_of_means(*_xy(), 0, 5))
error("steer/class-means-strings", InputError, r"not strings",
      lambda e, t: steering.class_means(_xy()[0], np.array(["a"] * 30)))
error("steer/normalize-zero", InputError, r"cannot normalise a zero", lambda e, t: steering.normalize(torch.zeros(4)))
error("steer/from-probe-missing-class", NotFoundError, r"class 7",
      lambda e, t: steering.from_probe(probes.fit_probe(*_xy()), 7))
error("steer/from-pairwise-without-src", InputError, r"pairwise probes need src",
      lambda e, t: steering.from_probe(probes.pairwise_probes(*_xy()), 1))
error("steer/random-like-nan", InputError, r"NaN/inf entries",
      lambda e, t: steering.random_like(torch.tensor([1.0, float("nan")])))


def _trace_add(vector, k=1.0):
    def run(e, t):
        b = e.vlm.prepare(["<image>\nhi"], [Image.new("RGB", (32, 32))])
        with torch.no_grad(), e.vlm.trace(b):
            vlens.interventions.add(e.vlm, 1, vector(e), k, batch=b)
    return run


error("intervene/nan-vector", InputError, r"1 NaN/inf entries",
      _trace_add(lambda e: torch.where(torch.arange(64) == 5, float("nan"), torch.ones(64))))
error("intervene/wrong-width", InputError, r"width 32 but the model's residual stream has d_model 64",
      _trace_add(lambda e: torch.ones(32)))
error("intervene/k-inf", InputError, r"k must be a finite number", _trace_add(lambda e: torch.ones(64), float("inf")))


# J. images
def _gradient(mode, lo, hi):
    a = np.linspace(lo, hi, 64).reshape(8, 8)
    im = Image.fromarray(a.astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
    assert im.mode == mode
    return im


for mode in ("L", "LA", "RGBA", "P", "PA", "CMYK", "1", "YCbCr", "HSV", "I;16", "I", "F"):
    @result(f"image/mode-{mode}")
    def _(e, t, mode=mode):
        if mode in ("I;16", "I", "F"):
            im = _gradient(mode, 0, 60000 if mode != "F" else 1.0)
        else:
            im = Image.new(mode, (8, 8))
        out = load_image(im)
        assert out.mode == "RGB" and out.size == (8, 8)
        if mode in ("I;16", "I", "F"):  # rescaled from its own range: dark to bright, not clipped white or black
            px = np.asarray(out)[..., 0]
            assert px.min() == 0 and px.max() == 255, (px.min(), px.max())


for w, h in [(1, 1), (1, 400), (400, 1), (2000, 3)]:
    @result(f"image/size-{w}x{h}-through-prepare")
    def _(e, t, w=w, h=h):
        b = e.vlm.prepare(["<image>\nhi"], [Image.new("RGB", (w, h), (200, 10, 10))])
        assert int(b.layout.image.sum()) > 0


@result("image/grayscale-path-through-harvest")
def _(e, t):
    Image.new("L", (20, 30), 128).save(t / "g.png")
    s = harvest(e.vlm, [Sample(str(t / "g.png"), label=0)], layers=[1], pool="mean", out=t / "h", progress=False)
    assert len(s) == 1


error("image/empty-array", BadImageError, r"empty image", lambda e, t: load_image(np.zeros((0, 0, 3), np.uint8)))
error("image/chw-array", BadImageError, r"channels-first \(CHW\)",
      lambda e, t: load_image(np.zeros((3, 32, 32), np.uint8)))
error("image/chw-tensor", BadImageError, r"channels-first", lambda e, t: load_image(torch.zeros(3, 32, 32)))
error("image/float-out-of-range", BadImageError, r"0\.\.1|range", lambda e, t: load_image(np.full((4, 4, 3), 5.0)))
error("image/four-dim-array", BadImageError, r"shape \(1, 4, 4, 3\)|batch|dimension",
      lambda e, t: load_image(np.zeros((1, 4, 4, 3), np.uint8)))
error("image/missing-path", BadImageError, r"image file not found", lambda e, t: load_image(t / "nope.png"))
error("image/directory-path", BadImageError, r"cannot decode image|directory", lambda e, t: load_image(t))
error("image/corrupt-bytes", BadImageError, r"cannot decode image", lambda e, t: load_image(b"not an image"))
error("image/empty-bytes", BadImageError, r"cannot decode image", lambda e, t: load_image(b""))
error("image/none", BadImageError, r"cannot read an image from a NoneType", lambda e, t: load_image(None))
error("image/int", BadImageError, r"cannot read an image from a int", lambda e, t: load_image(7))
error("image/record-without-bytes-or-path", BadImageError, r"neither bytes nor path", lambda e, t: load_image({}))


def _png_bytes():
    import io

    buf = io.BytesIO()
    Image.fromarray((np.arange(16 * 16 * 3) % 251).astype(np.uint8).reshape(16, 16, 3)).save(buf, format="PNG")
    return buf.getvalue()


for n in (8, 33, 60):
    error(f"image/truncated-png-{n}", BadImageError, r"cannot decode image", lambda e, t, n=n: load_image(_png_bytes()[:n]))


# K. model, sites, loading
def _write_wrong_shape(e, t):
    b = e.vlm.prepare(["<image>\nhi"], [Image.new("RGB", (32, 32))])
    with torch.no_grad(), e.vlm.trace(b):
        e.vlm.write("resid_pre.1", torch.zeros(1, 3, 64))


error("model/write-wrong-shape", InputError, r"cannot write a value of shape \(1, 3, 64\) to resid_pre\.1",
      _write_wrong_shape)
error("model/site-out-of-range", SiteError, r"out of range", lambda e, t: e.vlm.site(99))
error("model/site-too-negative", SiteError, r"out of range", lambda e, t: e.vlm.site(-99))
error("model/site-unknown", SiteError, r"bogus", lambda e, t: e.vlm.site("bogus.1"))
error("model/vision-site-out-of-range", SiteError, r"out of range", lambda e, t: e.vlm.hook_name("vision.99"))
error("model/prepare-prompt-not-string", InputError, r"prompts must be strings",
      lambda e, t: e.vlm.prepare([3], [Image.new("RGB", (8, 8))]))
error("model/prepare-answers-count", InputError, r"2 answers for 1 prompts",
      lambda e, t: e.vlm.prepare(["<image>\nhi"], [Image.new("RGB", (8, 8))], answers=["a", "b"]))


@result("model/negative-layer-counts-from-the-end")
def _(e, t):
    assert e.vlm.site(-1).name == "resid_pre.3" and e.vlm.site("resid_post.-1").name == "resid_post.3"
    assert e.vlm.hook_name(-2) == "blocks.2.hook_resid_pre"


@result("harvest/negative-layers-count-from-the-end")
def _(e, t):
    s = e.harvest(t / "h", layers=[-1, -3])
    assert s.layers == [1, 3]
    same_rows(s, e.store)


error("load/dtype-float17", InputError, r"float17", lambda e, t: vlens.load("toy", dtype="float17"))
error("load/missing-local-directory", VlensError, r"does not exist|not found|no model",
      lambda e, t: vlens.load(str(t / "no-such-model")))


# L. data loaders
def _folder(t):
    root = t / "imgs"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 90, 0, 0)).save(root / c / f"{i}.png")
    return root


error("data/image-folder-missing", InputError, r"image folder .* does not exist",
      lambda e, t: vlens.data.image_folder(t / "nope"))
error("data/image-folder-empty-class", InputError, r"class folder .*empty has no images",
      lambda e, t: ((_folder(t) / "empty").mkdir(), vlens.data.image_folder(t / "imgs")))
error("data/image-folder-flat", InputError, r"no class sub-folders",
      lambda e, t: (Image.new("RGB", (4, 4)).save(t / "x.png"), vlens.data.image_folder(t)))
error("data/on-error-unknown", InputError, r"on_error must be 'skip' or 'raise'",
      lambda e, t: vlens.data.image_folder(_folder(t), on_error="ignore"))
error("data/corrupt-file-on-access", BadImageError, r"cannot decode image .*1\.png",
      lambda e, t: ((_folder(t) / "dog" / "1.png").write_bytes(b"xx"), vlens.data.image_folder(t / "imgs")[3]))
error("data/sharegpt4v-missing", InputError, r"caption file .* does not exist",
      lambda e, t: vlens.data.sharegpt4v(t / "caps.json"))
error("data/sharegpt4v-bad-json", InputError, r"neither a JSON list nor JSON lines",
      lambda e, t: ((t / "c.json").write_text("{oops"), vlens.data.sharegpt4v(t / "c.json")))
error("data/sharegpt4v-directory", InputError, r"cannot read caption file",
      lambda e, t: vlens.data.sharegpt4v(t))
error("data/sharegpt4v-not-utf8", InputError, r"cannot read caption file .*UTF-8",
      lambda e, t: ((t / "c.json").write_bytes(b"\xff\xfe[\x00"), vlens.data.sharegpt4v(t / "c.json")))
error("data/sharegpt4v-records-not-objects-raise", InputError, r"record 0 .* lacks an 'image'",
      lambda e, t: ((t / "c.json").write_text('["a", "b"]'), vlens.data.sharegpt4v(t / "c.json", on_error="raise")))


@result("data/sharegpt4v-records-not-objects-skipped")
def _(e, t):
    (t / "c.json").write_text('["a", {"image": 3, "conversations": "x"}]')
    with pytest.warns(UserWarning, match="skipped 2"):
        ds = vlens.data.sharegpt4v(t / "c.json")
    assert len(ds) == 0 and len(ds.skipped) == 2


@result("data/missing-folder-is-also-file-not-found")
def _(e, t):
    with pytest.raises(FileNotFoundError):  # as vlens 0.1 raised: old except clauses keep working
        vlens.data.image_folder(t / "nope")


@result("data/verify-drops-corrupt-images")
def _(e, t):
    (_folder(t) / "dog" / "1.png").write_bytes(b"xx")
    with pytest.warns(UserWarning, match="skipped 1 of 4"):
        assert len(vlens.data.image_folder(t / "imgs").verify()) == 3


# M. the command line
for name, argv, match in [
    ("harvest-layer-out-of-range", ["harvest", "--model", "toy", "--data", "toy", "--n", "2", "--layers", "99",
                                    "--out", "{t}/h"], r"layer|99"),
    ("harvest-n-0", ["harvest", "--model", "toy", "--data", "toy", "--n", "0", "--layers", "1", "--out", "{t}/h"],
     r"--n|n must|at least"),
    ("toy-eval-n-0", ["toy", "eval", "--n", "0"], r"--n|n must|at least"),
    ("train-sae-not-a-store", ["train-sae", "--store", "{t}/nope", "--layer", "1", "--out", "{t}/sae"],
     r"no store at .*nope"),
]:
    @result(f"cli/{name}")
    def _(e, t, argv=argv, match=match):
        import io
        from contextlib import redirect_stderr

        from vlens.cli import main

        err = io.StringIO()
        with redirect_stderr(err):
            code = main([a.replace("{t}", str(t)) for a in argv])
        text = err.getvalue()
        assert code == 2, text
        assert text.startswith("vlens: error: ") and len(text.strip().splitlines()) == 1, text
        assert "Traceback" not in text
        import re

        assert re.search(match, text), text


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_catalogue(case, env, tmp_path):
    if case.error is None:
        case.run(env, tmp_path)
        return
    assert issubclass(case.error, VlensError)
    with pytest.raises(case.error, match=case.match) as info:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            case.run(env, tmp_path)
    assert isinstance(info.value, VlensError)


# -- hypothesis: damaged files, found wherever the damage is ----------------------------------------------

HYPOTHESIS: dict[str, str] = {}  # test name -> "error" (always a clear VlensError) or "result" (documented result)


def hypothesis_case(kind):
    def deco(fn):
        HYPOTHESIS[fn.__name__] = kind
        return fn
    return deco


@hypothesis_case("error")
@HYP
@given(data=st.data())
def test_truncated_shard_is_refused(env, data):
    size = env.shard.stat().st_size
    n = data.draw(st.integers(0, size - 1))
    with tempfile.TemporaryDirectory() as d:
        p = env.copy(Path(d))
        truncate(p / env.shard.name, n)
        with pytest.raises(StoreError, match=r"shard-00000\.safetensors.*(cannot be read|damaged)"):
            ActivationStore(p)


@hypothesis_case("error")
@HYP
@given(data=st.data())
def test_bit_flip_in_a_shard_is_found(env, data):
    size = env.shard.stat().st_size
    byte, bit = data.draw(st.integers(0, size - 1)), data.draw(st.integers(0, 7))
    with tempfile.TemporaryDirectory() as d:
        p = env.copy(Path(d))
        flip(p / env.shard.name, byte, bit)
        with pytest.raises(StoreError, match=r"shard-00000\.safetensors"):
            ActivationStore(p).verify()


@hypothesis_case("error")
@HYP
@given(data=st.data())
def test_bit_flip_in_the_index_is_found_or_harmless(env, data):
    text = (env.root / "template" / "index.json").read_bytes()
    byte, bit = data.draw(st.integers(0, len(text) - 1)), data.draw(st.integers(0, 7))
    with tempfile.TemporaryDirectory() as d:
        p = env.copy(Path(d))
        flip(p / "index.json", byte, bit)
        try:
            s = ActivationStore(p)
        except StoreError as e:
            assert "index.json" in str(e) or "shard" in str(e)
            return
        # only a flip in the name of the "checksum" entry itself leaves a readable index: its data is intact
        assert "checksum" not in s.index
        same_rows(s, env.store)


@hypothesis_case("error")
@HYP
@given(data=st.data())
def test_truncated_index_is_refused(env, data):
    text = (env.root / "template" / "index.json").read_bytes()
    n = data.draw(st.integers(0, len(text) - 2))
    with tempfile.TemporaryDirectory() as d:
        p = env.copy(Path(d))
        truncate(p / "index.json", n)
        with pytest.raises(StoreError, match=r"index\.json"):
            ActivationStore(p)


@hypothesis_case("result")
@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_bit_flip_in_the_latest_checkpoint_falls_back(env, data):
    with tempfile.TemporaryDirectory() as d:
        t = Path(d)
        _interrupted_training(env, t)
        latest = t / "ck" / "step_000000005"
        name = data.draw(st.sampled_from(["sae_weights.safetensors", "trainer_state.safetensors", "trainer.json"]))
        size = (latest / name).stat().st_size
        flip(latest / name, data.draw(st.integers(0, size - 1)), data.draw(st.integers(0, 7)))
        with pytest.warns(UserWarning, match="Resuming from step_000000004"):
            resumed = _ck(env, t)
        _same_sae(resumed, _straight(env, t))


@hypothesis_case("error")
@HYP
@given(data=st.data())
def test_truncated_png_is_refused(env, data):
    """A cut inside the pixel data is refused. A cut that leaves every pixel and removes only the stream's
    checksums (the zlib adler32, the last IDAT CRC; the last 12 bytes are the IEND chunk, which PIL does
    not need) may decode: then the pixels must be exactly the whole file's (PIL 13 decodes cuts at
    bytes 103-111 of this 124-byte file so, pixel for pixel)."""
    raw = _png_bytes()
    n = data.draw(st.integers(0, len(raw) - 13))
    try:
        im = load_image(raw[:n])
    except BadImageError as e:
        assert "cannot decode image" in str(e)
        return
    assert n >= len(raw) - 12 - 4 - 4 - 2, f"a cut at byte {n} of {len(raw)} cuts pixel data, yet decoded"
    assert np.array_equal(np.asarray(im), np.asarray(load_image(raw)))


@hypothesis_case("result")
@HYP
@given(w=st.integers(1, 300), h=st.integers(1, 300), mode=st.sampled_from(["L", "RGBA", "CMYK", "P", "I;16", "F"]))
def test_any_size_and_mode_prepares(env, w, h, mode):
    im = Image.new(mode, (w, h))
    b = env.vlm.prepare(["<image>\nhi"], [im])
    assert int(b.layout.image.sum()) > 0


def test_catalogue_counts():
    """The catalogue's size and outcome: nothing is accepted silently (every entry above asserts its outcome)."""
    fault_tests = {"error": 5, "result": 3}  # disk faults (3 + index write + real size limit); SIGKILL trials
    n_error = sum(c.error is not None for c in CASES) + sum(k == "error" for k in HYPOTHESIS.values()) + fault_tests["error"]
    n_result = sum(c.error is None for c in CASES) + sum(k == "result" for k in HYPOTHESIS.values()) + fault_tests["result"]
    print(f"\ncatalogue: {n_error + n_result} bad inputs and faults: {n_error} clear vlens errors, {n_result} "
          f"documented results, 0 accepted silently ({len(HYPOTHESIS)} entries are hypothesis-generated families)")
    assert n_error + n_result >= 150
    assert len({c.id for c in CASES}) == len(CASES)


# -- SIGKILL trials and a real write failure --------------------------------------------------------------
#
# One subprocess imports vlens once (with OMP_NUM_THREADS=1, so forking it is safe), then forks one child per
# trial: each child dies by SIGKILL at a chosen moment (or meets a real file-size limit) and the test, back in
# this process, runs the same call again and checks that nothing is lost and nothing is left behind.

TRIALS = r"""
import json, os, resource, signal, sys
import safetensors.torch
import torch
import vlens, vlens.sae as vs
import vlens.sae.training.resume as ck
from vlens.activations import harvest
from vlens.data import Sample
from vlens.errors import HarvestError
from PIL import Image
WORDS, CAPTIONS = {words!r}, {captions!r}
{make_data}
root = {root!r}
vlm = vlens.tiny(words=WORDS, seed=3)
KW = dict(layers=[1, 3], tokens="image+answer", captions=True, batch_size=2, shard_mb=0.001, progress=False)
g = torch.Generator().manual_seed(0)
x = torch.randn(512, 16, generator=g); mod = (torch.arange(512) % 2).long()

def kill_on_save(module, at):
    real, n = module.save_file, [0]
    def save(tensors, path, metadata=None):
        n[0] += 1
        real(tensors, path, metadata=metadata)
        if n[0] == at:  # the file is whole in its temporary place, not yet renamed or listed: die here
            os.kill(os.getpid(), signal.SIGKILL)
    module.save_file = save

def train(ckdir):
    vs.train((x, mod), "paper", d_sae=16, steps=6, batch_size=64, progress=False, stats_tokens=0, lr=1e-3,
             checkpoint_every=2, checkpoint_dir=ckdir)

def harvest_kill():
    kill_on_save(safetensors.torch, 3)
    harvest(vlm, make_data(), out=root + "/harvest-kill", **KW)

def harvest_fsize():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (30000, resource.RLIM_INFINITY))
    try:
        harvest(vlm, make_data(), out=root + "/harvest-fsize", **KW)
    except HarvestError as e:
        print("HarvestError:", e, flush=True)

def checkpoint_kill():
    kill_on_save(ck, 3)  # the second file of the second checkpoint (step 4)
    train(root + "/checkpoint-kill")

def step_kill():
    kill_on_save(ck, 6)  # inside the third checkpoint's write (step 6 of 6, the final save)
    train(root + "/step-kill")

results = {{}}
for trial in (harvest_kill, harvest_fsize, checkpoint_kill, step_kill):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r); os.dup2(w, 1)
        try:
            trial()
        finally:
            os._exit(0)
    os.close(w)
    out = os.fdopen(r).read()
    _, status = os.waitpid(pid, 0)
    results[trial.__name__] = {{"killed": os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL,
                                "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None, "out": out}}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def trials(tmp_path_factory):
    import inspect

    root = tmp_path_factory.mktemp("trials")
    script = root / "trials.py"
    script.write_text(TRIALS.format(words=WORDS, captions=CAPTIONS, make_data=inspect.getsource(make_data),
                                    root=str(root)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, json.loads(proc.stdout.strip().splitlines()[-1])


def test_kill_during_a_shard_write_leaves_nothing_after_the_next_run(env, trials):
    root, res = trials
    assert res["harvest_kill"]["killed"], res
    out = root / "harvest-kill"
    assert list(out.glob("*.tmp"))  # the half-done write is there...
    same_rows(env.harvest(out), env.store)  # ...the next run loses nothing...
    assert not list(out.glob("*.tmp"))  # ...and leaves nothing behind


def test_real_write_failure_file_size_limit(env, trials):
    """A real failing write (RLIMIT_FSIZE: the kernel refuses to grow a file) through safetensors' own writer."""
    root, res = trials
    r = res["harvest_fsize"]
    assert r["code"] == 0 and "HarvestError: writing failed" in r["out"] and "call harvest again" in r["out"], r
    assert not list((root / "harvest-fsize").glob("*.tmp"))
    same_rows(env.harvest(root / "harvest-fsize"), env.store)


def test_kill_during_a_checkpoint_write_leaves_nothing_after_the_next_run(env, trials):
    root, res = trials
    assert res["checkpoint_kill"]["killed"], res
    ckdir = root / "checkpoint-kill"
    left = sorted(p.name for p in ckdir.iterdir())
    assert left[0].startswith(".tmp_step_000000004_") and left[1:] == ["step_000000002"], left
    resumed = _ck(env, root, checkpoint_dir=ckdir)
    assert sorted(p.name for p in ckdir.iterdir()) == ["step_000000004", "step_000000006"]
    _same_sae(resumed, _straight(env, root))


def test_kill_at_the_final_checkpoint_resumes_bit_identically(env, trials):
    root, res = trials
    assert res["step_kill"]["killed"], res
    ckdir = root / "step-kill"
    resumed = _ck(env, root, checkpoint_dir=ckdir)
    assert not [p for p in ckdir.iterdir() if p.name.startswith(".")]
    _same_sae(resumed, _straight(env, root))


def test_nan_inputs_and_nan_weights_are_refused_by_the_sae(tmp_path):
    """NaN activations never reach an SAE's latents, and an SAE file with NaN weights is refused on load."""
    from safetensors.torch import load_file, save_file
    from sae_lens import StandardSAE, StandardSAEConfig

    import vlens.sae as vs
    from vlens.errors import NonFiniteActivations

    sae = vs.as_multimodal(StandardSAE(StandardSAEConfig(d_in=8, d_sae=16)))
    x = torch.randn(4, 8)
    x[1, 2] = float("nan")
    with pytest.raises(NonFiniteActivations, match="1 input row"):
        sae.encode(x)
    with pytest.warns(UserWarning, match="no firing density"):
        vs.export(sae, tmp_path / "s")
    w = load_file(tmp_path / "s" / "sae_weights.safetensors")
    w["W_dec"][:] = float("nan")
    save_file(w, tmp_path / "s" / "sae_weights.safetensors")
    with pytest.raises(NonFiniteActivations, match="W_dec"):
        vs.load(tmp_path / "s")


def test_sparse_probe_leaves_unlabelled_rows_out_like_every_probe():
    from vlens.errors import InputError
    from vlens.sparsity import sparse_probe

    g = torch.Generator().manual_seed(0)
    y = torch.arange(2).repeat_interleave(30)
    Z = torch.rand(60, 8, generator=g)
    Z[:, 3] += y
    y_missing = torch.cat([y, torch.full((5,), -1)])
    Z_missing = torch.cat([Z, torch.rand(5, 8, generator=g)])
    with pytest.warns(UserWarning, match="5 of 65 samples have no label"):
        rows = sparse_probe(Z_missing, y_missing, penalties=[0.01], steps=20).rows
    assert rows == sparse_probe(Z, y, penalties=[0.01], steps=20).rows
    with pytest.raises(InputError, match="strings"):
        sparse_probe(Z, ["a"] * 60, penalties=[0.01], steps=5)


def test_ctrl_c_right_after_the_optimiser_step_resumes_bit_identically(tmp_path, monkeypatch):
    """A SIGINT between the weight update and the step counter is held until both moved: the resume repeats nothing."""
    import vlens.sae as vs

    x = torch.randn(2048, 16, generator=torch.Generator().manual_seed(0))
    kw = dict(d_sae=32, steps=12, batch_size=128, progress=False)
    ref = vs.train(x, "paper", checkpoint_dir=tmp_path / "ref", **kw)
    original = torch.optim.Adam.step
    calls = {"n": 0}

    def step_then_ctrl_c(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)  # lands after the update, before the counters move
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        vs.train(x, "paper", checkpoint_dir=tmp_path / "ck", **kw)
    monkeypatch.setattr(torch.optim.Adam, "step", original)
    again = vs.train(x, "paper", checkpoint_dir=tmp_path / "ck", **kw)
    assert calls["n"] == 5
    assert torch.equal(again.W_dec, ref.W_dec) and torch.equal(again.W_enc, ref.W_enc)
