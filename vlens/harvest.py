"""Harvest residual activations at scale: one forward per batch, many layers, streamed to disk.

`harvest` runs the model once per batch, reads every requested layer in
execution order, keeps only the selected tokens (moved to CPU in the chosen
dtype at once) and stops the forward after the deepest requested layer: no
later layer and no LM head ever run. Rows are buffered into shards of bounded
size, each written atomically (temporary file, fsync, rename) before the
JSON index that lists it, so an interrupted harvest (Ctrl-C, `kill -9`, a
full disk) leaves a consistent store, and calling `harvest` again with the
same arguments resumes after the last sample written.

A store directory holds

    index.json                 model, layers, site, token selection, dtype, d_model, shards, progress
    shard-00000.safetensors    act.{L} [rows, d_model] per layer, plus one tensor per metadata column
    shard-00001.safetensors    ...

and `ActivationStore` reads it back: memory-mapped activations per layer,
metadata columns, filters, shuffled batches with bounded RAM, per-sample
means for probes, and an export to SAE-Lens's cached-activation format.

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
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import mmap
import os
import shutil
import struct
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .tokens import KIND_NAMES, TokenLayout

__all__ = ["harvest", "ActivationStore", "ActivationRows", "HarvestError", "export_sae_lens", "selection_figure",
           "selection_grid", "DEFAULT_PROMPT"]

#: The paper's probe prompt (the chat template wraps it).
DEFAULT_PROMPT = "<image>\nWhat is shown in this image?"
FORMAT = "vlens.harvest/1"
INDEX = "index.json"
SITES = ("resid_pre", "resid_post")
ROLE_NAMES = ("image", "prompt", "answer", "bos", "other")
META_COLUMNS = ("sample", "label", "position", "token_id", "modality", "role", "kind", "tile", "row", "col", "text_only")
_MODALITY = {"image": 1, "text": 0}

# Configuration fields that must match for a resume (all but model_fingerprint are user-visible arguments).
_CONFIG_KEYS = (
    "model", "model_fingerprint", "d_model", "layers", "site", "tokens", "pool", "dtype", "prompt", "template",
    "captions", "text_only", "text_prompt", "n_samples", "rank_of",
)


class HarvestError(RuntimeError):
    """A harvest that cannot go on (disk full, a store of another configuration, ...). The message says what to do."""


# =====================================================================================
# harvest
# =====================================================================================


def harvest(
    vlm: Any,
    data: Sequence[Any],
    layers: Sequence[int],
    *,
    tokens: str | Callable[[TokenLayout], Tensor] = "image",
    pool: str | None = None,
    batch_size: int = 8,
    dtype: torch.dtype | str | None = None,
    out: str | os.PathLike | None = None,
    prompt: str = DEFAULT_PROMPT,
    template: bool = True,
    captions: bool = False,
    text_only: bool = False,
    text_prompt: str = "",
    site: str = "resid_pre",
    overwrite: bool = False,
    progress: bool = True,
    shard_mb: float = 128.0,
    callback: Callable[[dict], None] | None = None,
    _indices: Sequence[int] | None = None,
) -> "ActivationStore":
    """Harvest `site` activations of `layers` for every sample of `data` into a store at `out`.

    One forward per batch reads every layer in execution order and stops after
    the deepest one. Only the tokens chosen by `tokens` are kept:

    - a name of `TokenLayout.select`: `"image"`, `"text"`, `"prompt"` (instruction
      and template tokens, BOS excluded), `"answer"` (the appended caption),
      `"all"` (every non-padding token), `"base"` / `"highres"` / `"newline"`,
      or a `+`-joined union such as `"image+answer"`;
    - or a function `layout -> [batch, seq] bool mask`.

    `pool="mean"` stores one row per sample (the mean over its selected tokens:
    the paper's probe features with `tokens="image"`); `pool=None` stores one
    row per token (SAE training data: `tokens="image+answer", captions=True`,
    plus `text_only=True` for a second pass over the captions alone, after
    `text_prompt`, without image or chat template).

    Args:
        vlm: a `VLM` (`vlens.load`, `vlens.tiny`).
        data: a sequence of `vlens.data.Sample` (image, label, caption, id).
        layers: language-model layer indices (negative ones count from the end).
        tokens: the token selection (see above). A batch where it selects nothing
            is skipped and counted, not an error.
        pool: None (per token) or "mean" (per sample).
        batch_size: samples per forward.
        dtype: storage dtype (default: the model's); e.g. `torch.float16`.
        out: the store directory (default: a new temporary directory).
        prompt: the prompt, with `<image>` where the image goes.
        template: wrap `prompt` in the model's chat template.
        captions: append each `Sample.caption` as the answer.
        text_only: also run a text-only pass over the captions.
        text_prompt: what precedes the caption in the text-only pass.
        site: "resid_pre" (entering layer L, HF `hidden_states[L]`) or "resid_post" (leaving it).
        overwrite: replace a store of a different configuration at `out`.
        progress: show a progress bar with images/s and tokens/s.
        shard_mb: target shard size in MB (a shard closes at the first batch past it).
        callback: called after every batch with a dict of counters (for logging; it may raise to stop).

    Under `torchrun` (several processes, see `vlens.distributed`), each rank
    harvests every `world_size`-th sample into `out/rank-RRR/`, resumable on
    its own, and rank 0 then writes `out/index.json` over all of them: the
    store holds the same rows (in another order) as a single-process harvest.

    Returns:
        The `ActivationStore` at `out`. Calling `harvest` again with the same
        arguments resumes an interrupted harvest (or returns at once if complete).

    Example:
        >>> import vlens, tempfile
        >>> from vlens.data import Sample
        >>> from PIL import Image
        >>> vlm = vlens.tiny()
        >>> data = [Sample(Image.new("RGB", (32, 32), (40 * i, 0, 0)), label=i % 2, id=f"img{i}") for i in range(4)]
        >>> store = harvest(vlm, data, layers=[1, 3], pool="mean", out=tempfile.mkdtemp(), progress=False)
        >>> X, y = store.pooled(3)
        >>> tuple(X.shape), y.tolist()
        ((4, 64), [0, 1, 0, 1])
    """
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}: harvest reads 'resid_pre' (entering layer L) or 'resid_post' (leaving it)")
    if pool not in (None, "mean"):
        raise ValueError(f"pool must be None (one row per token) or 'mean' (one row per sample), not {pool!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, not {batch_size!r}")
    layers = _check_layers(layers, vlm.n_layers)
    store_dtype = _as_dtype(dtype) or vlm.dtype
    if not store_dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype (e.g. torch.float16), not {store_dtype}")
    if not isinstance(tokens, str) and not callable(tokens):
        raise TypeError("tokens must be a selection name ('image', 'image+answer', ...) or a function layout -> mask")
    if isinstance(tokens, str):  # validate the name now, not after the first forward
        _probe = TokenLayout(*(torch.zeros(1, 1, dtype=torch.bool) for _ in range(6)))
        _probe.input_ids = torch.zeros(1, 1, dtype=torch.long)
        _probe.select(tokens)
    if getattr(vlm.processor, "image_token", "<image>") not in prompt:
        raise ValueError(f"prompt {prompt!r} has no '<image>' placeholder: write it where the image goes, e.g. {DEFAULT_PROMPT!r}")

    from . import distributed

    env = distributed.info()
    if env.enabled and _indices is None:
        return _harvest_distributed(env, vlm, data, layers, out, overwrite=overwrite, tokens=tokens, pool=pool,
                                    batch_size=batch_size, dtype=dtype, prompt=prompt, template=template,
                                    captions=captions, text_only=text_only, text_prompt=text_prompt, site=site,
                                    progress=progress, shard_mb=shard_mb, callback=callback)

    n = len(data)
    config = {
        "model": vlm.name,
        "model_fingerprint": _fingerprint(vlm),
        "d_model": int(vlm.d_model),
        "layers": layers,
        "site": site,
        "tokens": tokens if isinstance(tokens, str) else f"<function {getattr(tokens, '__qualname__', repr(tokens))}>",
        "pool": pool,
        "dtype": str(store_dtype).removeprefix("torch."),
        "prompt": prompt,
        "template": bool(template),
        "captions": bool(captions),
        "text_only": bool(text_only),
        "text_prompt": text_prompt,
        "n_samples": n,
    }
    if _indices is not None:
        config["rank_of"] = f"{env.rank}/{env.world_size}"
    root = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="vlens-harvest-"))
    writer = _Writer.open(root, config, overwrite=overwrite, hook_names={L: _hook_name(vlm, site, L) for L in layers},
                          shard_bytes=int(shard_mb * 2**20))
    passes = [("main", n)] + ([("text", n)] if text_only else [])
    total = sum(p[1] for p in passes)
    done = sum(writer.progress[p] for p, _ in passes)
    if done >= total:
        writer.finish()
        return ActivationStore(root)

    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=done, unit="img", desc=f"harvest {len(layers)} layer(s)", disable=None if progress else True,
               dynamic_ncols=True)
    t0, n_tok_run, n_img_run = time.perf_counter(), 0, 0
    try:
        for pass_name, n_items in passes:
            start = writer.progress[pass_name]
            for b0 in range(start, n_items, batch_size):
                samples = [data[i] for i in range(b0, min(b0 + batch_size, n_items))]
                batch = _prepare(vlm, samples, b0, pass_name, prompt, template, captions, text_prompt)
                mask = batch.layout.select(tokens)
                kept = mask.any(1)
                rows: dict[str, Tensor] = {}
                if kept.any():
                    acts = _forward(vlm, batch, mask, layers, site, pool, store_dtype)
                    rows = _meta(batch.layout, mask, b0, samples, pass_name == "text", pool)
                    if _indices is not None:  # a rank's slice: store global sample indices
                        rows["meta.sample"] = torch.as_tensor(_indices, dtype=torch.long)[rows["meta.sample"]]
                    rows.update({f"act.{L}": a for L, a in zip(layers, acts)})
                    if pool is not None:  # drop samples that selected nothing
                        rows = {k: v[kept] for k, v in rows.items()}
                n_skip = int((~kept).sum())
                gidx = range(b0, b0 + len(samples)) if _indices is None else [_indices[i] for i in range(b0, b0 + len(samples))]
                writer.add(pass_name, b0 + len(samples), rows, n_skip, [_sid(s, i) for i, s in zip(gidx, samples)])
                n_sel = int(mask.sum())
                n_tok_run += n_sel
                n_img_run += len(samples)
                dt = max(time.perf_counter() - t0, 1e-9)
                bar.update(len(samples))
                bar.set_postfix_str(f"{n_img_run / dt:.1f} img/s, {n_tok_run / dt:,.0f} tok/s", refresh=False)
                if callback is not None:
                    callback({"pass": pass_name, "done": b0 + len(samples), "total": n_items, "tokens": n_sel,
                              "skipped": n_skip, "shards": len(writer.index["shards"])})
        writer.flush()
        writer.finish()
    except BaseException:
        # Keep every complete batch already computed (nothing lost on Ctrl-C or a raising callback),
        # unless the disk itself failed.
        if not writer.failed:
            try:
                writer.flush()
            except Exception:
                pass
        raise
    finally:
        bar.close()
    skipped = writer.index["skipped"]
    if any(skipped.values()):
        what = "sample(s)" if pool else "sample(s) contributed no tokens and were"
        warnings.warn(
            f"token selection {config['tokens']!r} selected nothing in "
            + ", ".join(f"{v} {what} skipped in the {k} pass" for k, v in skipped.items() if v)
            + " (see store.index['skipped'])",
            stacklevel=2,
        )
    return ActivationStore(root)


class _Slice(Sequence):
    """`data[indices]`, lazily."""

    def __init__(self, data: Sequence, indices: Sequence[int]) -> None:
        self.data, self.indices = data, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        return self.data[self.indices[i]]


def _harvest_distributed(env, vlm, data, layers, out, *, overwrite: bool, **kwargs) -> "ActivationStore":
    """One rank's part of a torchrun harvest, then (rank 0) the merged index."""
    from . import distributed

    if out is None:
        raise ValueError("a distributed harvest needs out=: a directory every rank can reach (shared disk)")
    root = Path(out)
    indices = list(distributed.shard(len(data), env.rank, env.world_size))
    sub = root / f"rank-{env.rank:03d}"
    if overwrite and env.is_main and (root / INDEX).exists():
        (root / INDEX).unlink()
    distributed.barrier()
    harvest(vlm, _Slice(data, indices), layers, out=sub, overwrite=overwrite, _indices=indices, **kwargs)
    distributed.barrier()
    if env.is_main:
        _merge_ranks(root, env.world_size, len(data))
    distributed.barrier()
    return ActivationStore(root)


def _merge_ranks(root: Path, world_size: int, n: int) -> None:
    """Write `root/index.json` listing the shards of every `rank-RRR/` sub-store."""
    subs = []
    for r in range(world_size):
        path = root / f"rank-{r:03d}" / INDEX
        if not path.exists():
            raise HarvestError(f"rank {r} left no store at {path.parent}; rerun the same torchrun command to resume")
        subs.append(json.loads(path.read_text()))
    config = {k: v for k, v in subs[0]["config"].items() if k != "rank_of"}
    config["n_samples"] = n
    ids: list = [None] * n
    for r, sub in enumerate(subs):
        local = ActivationStore(root / f"rank-{r:03d}").sample_ids
        for i, sid in zip(range(r, n, world_size), local):
            ids[i] = sid
    index = {
        "format": FORMAT,
        "config": config,
        "hook_names": subs[0]["hook_names"],
        "shards": [dict(e, file=f"rank-{r:03d}/{e['file']}" if e.get("file") else None)
                   for r, sub in enumerate(subs) for e in sub["shards"]],
        "progress": {k: sum(sub["progress"][k] for sub in subs) for k in subs[0]["progress"]},
        "skipped": {k: sum(sub["skipped"][k] for sub in subs) for k in subs[0]["skipped"]},
        "n_rows": sum(sub["n_rows"] for sub in subs),
        "complete": all(sub.get("complete") for sub in subs),
        "world_size": world_size,
        "sample_ids": ids,
    }
    text = json.dumps(index, indent=1)
    _atomic_write(root / INDEX, lambda tmp: tmp.write_text(text))


def _check_layers(layers: Sequence[int] | int, n_layers: int) -> list[int]:
    if isinstance(layers, int):
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise ValueError(f"give at least one layer: layers=[...] with indices in 0..{n_layers - 1}")
    out = []
    for L in layers:
        if not isinstance(L, int) or isinstance(L, bool):
            raise TypeError(f"layers must be ints, got {L!r} ({type(L).__name__})")
        if not -n_layers <= L < n_layers:
            raise IndexError(f"layer {L} is out of range: this model has layers 0..{n_layers - 1} (or -{n_layers}..-1)")
        out.append(L % n_layers)
    dups = sorted({L for L in out if out.count(L) > 1})
    if dups:
        raise ValueError(f"layers {layers} list layer(s) {dups} more than once: give each layer once")
    return sorted(out)


def _as_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    d = getattr(torch, name, None)
    if not isinstance(d, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}: use e.g. torch.float16, 'bfloat16' or 'float32'")
    return d


def _fingerprint(vlm: Any) -> str:
    """A short hash of a few weights, telling apart two models of one name (e.g. two random tiny seeds)."""
    try:
        w = vlm._module.get_input_embeddings().weight
        if w.device.type == "meta":
            return "meta"
        head = w.detach().flatten()[:256].float().cpu().numpy().tobytes()
        return hashlib.sha1(head).hexdigest()[:16]
    except Exception:  # pragma: no cover - exotic modules
        return "unknown"


def _hook_name(vlm: Any, site: str, layer: int) -> str:
    try:
        return vlm.hook_name(f"{site}.{layer}")
    except Exception:  # pragma: no cover
        return f"blocks.{layer}.hook_{site}"


def _sid(sample: Any, i: int) -> Any:
    sid = getattr(sample, "id", None)
    if sid is None:
        return i
    return sid if isinstance(sid, (int, str)) else str(sid)


def _prepare(vlm, samples, b0, pass_name, prompt, template, captions, text_prompt):
    if pass_name == "text" or captions:
        for i, s in enumerate(samples):
            if not getattr(s, "caption", None):
                raise ValueError(
                    f"sample {b0 + i} (id {getattr(s, 'id', None)!r}) has no caption, but captions=True or text_only=True "
                    "needs one per sample: use an image-caption data set or set captions=False, text_only=False"
                )
    if pass_name == "text":
        return vlm.prepare([text_prompt] * len(samples), None, answers=[s.caption for s in samples], template=False)
    for i, s in enumerate(samples):
        if getattr(s, "image", None) is None:
            raise ValueError(f"sample {b0 + i} (id {getattr(s, 'id', None)!r}) has no image")
    answers = [s.caption for s in samples] if captions else None
    return vlm.prepare([prompt] * len(samples), [s.image for s in samples], answers=answers, template=template)


def _forward(vlm, batch, mask, layers, site, pool, dtype) -> list[Tensor]:
    """One forward reading `layers` in order, stopping after the deepest; returns CPU tensors per layer."""
    dev = vlm.device
    m = mask.to(dev)
    if pool is not None:  # weights that sum to 1 per row: a mean that cannot overflow in fp16
        w = (m.float() / m.sum(1, keepdim=True).clamp(min=1)).to(vlm.dtype)
    saved: list[Tensor] = []
    with torch.inference_mode(), vlm.trace(batch.to(dev)) as tracer:
        for L in layers:
            h = vlm.read(f"{site}.{L}")
            if pool is None:
                v = h[m]
            else:
                v = torch.einsum("bsd,bs->bd", h, w.to(h.dtype))
            saved.append(v.to("cpu", dtype).save())
        tracer.stop()
    return saved


def _meta(layout: TokenLayout, mask: Tensor, b0: int, samples, text_only: bool, pool) -> dict[str, Tensor]:
    B, S = layout.shape
    labels = torch.tensor([-1 if getattr(s, "label", None) is None else int(s.label) for s in samples], dtype=torch.long)
    sample = torch.arange(b0, b0 + B, dtype=torch.long)
    if pool is not None:
        n_img = (mask & layout.image).sum(1)
        n_sel = mask.sum(1)
        modality = torch.where(n_img == n_sel, 1, torch.where(n_img == 0, 0, 2)).to(torch.int8)
        neg = torch.full((B,), -1, dtype=torch.int16)
        return {
            "meta.sample": sample, "meta.label": labels, "meta.n_tokens": n_sel.to(torch.int32),
            "meta.modality": modality, "meta.text_only": torch.full((B,), int(text_only), dtype=torch.int8),
            "meta.position": neg.to(torch.int32), "meta.token_id": neg.long(), "meta.role": neg.to(torch.int8),
            "meta.kind": neg.to(torch.int8), "meta.tile": neg, "meta.row": neg, "meta.col": neg,
        }
    bi, si = mask.nonzero(as_tuple=True)
    n_pad = layout.pad.sum(1)
    role = torch.full((B, S), 4, dtype=torch.int8)
    role[layout.answer] = 2
    role[layout.prompt] = 1
    role[layout.bos] = 3
    role[layout.image] = 0
    kind = torch.full((B, S), -1, dtype=torch.int8)
    tile, row, col = (torch.full((B, S), -1, dtype=torch.int16) for _ in range(3))
    if layout.images:
        t = layout.image_token_table()
        kind[layout.image] = t["kind"].to(torch.int8)
        tile[layout.image] = t["tile"].to(torch.int16)
        row[layout.image] = t["row"].to(torch.int16)
        col[layout.image] = t["col"].to(torch.int16)
    return {
        "meta.sample": sample[bi],
        "meta.label": labels[bi],
        "meta.position": (si - n_pad[bi]).to(torch.int32),
        "meta.token_id": layout.input_ids[bi, si].long(),
        "meta.modality": layout.image[bi, si].to(torch.int8),
        "meta.role": role[bi, si],
        "meta.kind": kind[bi, si],
        "meta.tile": tile[bi, si],
        "meta.row": row[bi, si],
        "meta.col": col[bi, si],
        "meta.text_only": torch.full((len(bi),), int(text_only), dtype=torch.int8),
    }


# =====================================================================================
# writing: atomic shards, then the index
# =====================================================================================


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


# =====================================================================================
# reading
# =====================================================================================

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class _Shard:
    """One safetensors shard, memory-mapped: tensors are zero-copy views of the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            self.header = json.loads(f.read(n))
        self.offset = 8 + n
        self.metadata = self.header.pop("__metadata__", {}) or {}
        self._mm: mmap.mmap | None = None

    def tensor(self, key: str) -> Tensor:
        info = self.header[key]
        dtype = _ST_DTYPES[info["dtype"]]
        b0, b1 = info["data_offsets"]
        shape = info["shape"]
        if b1 == b0:
            return torch.empty(shape, dtype=dtype)
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return torch.frombuffer(self._mm, dtype=dtype, count=(b1 - b0) // dtype.itemsize, offset=self.offset + b0).view(shape)

    def __contains__(self, key: str) -> bool:
        return key in self.header


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

    Attributes: `layers`, `d_model`, `dtype`, `site`, `tokens`, `pool`,
    `config` (everything `harvest` was called with), `index` (the raw JSON),
    `meta` (dict of columns, see the module docs), `sample_ids`.

    Example:
        >>> import vlens, tempfile
        >>> from vlens.data import Sample
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

    def __init__(self, path: str | os.PathLike, _rows: Tensor | None = None, _shards: list | None = None) -> None:
        self.path = Path(path)
        idx = self.path / INDEX
        if not idx.exists():
            raise FileNotFoundError(f"{self.path} is not a harvest store (no {INDEX}); create one with vlens.harvest(...)")
        self.index = json.loads(idx.read_text())
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{idx} has format {self.index.get('format')!r}; this vlens reads {FORMAT!r}")
        self.config = self.index["config"]
        self._shards = _shards if _shards is not None else [
            _Shard(self.path / s["file"]) for s in self.index["shards"] if s.get("file")
        ]
        self._rows = _rows
        self._meta: dict[str, Tensor] | None = None

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
    def site(self) -> str:
        return self.config["site"]

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

    def hook_name(self, layer: int) -> str:
        """The SAE-Lens / TransformerLens hook name of a layer of this store ('blocks.L.hook_resid_pre')."""
        self._check_layer(layer)
        return self.index["hook_names"][str(layer)]

    def __len__(self) -> int:
        if self._rows is not None:
            return int(self._rows.numel())
        return sum(int(s.header["meta.sample"]["shape"][0]) for s in self._shards)

    def __repr__(self) -> str:
        c = self.config
        return (f"ActivationStore({str(self.path)!r}: {len(self)} rows × d_model {self.d_model}, layers {self.layers}, "
                f"{c['site']}, tokens={c['tokens']!r}, pool={c['pool']!r}, {c['dtype']}, model {c['model']!r}"
                + ("" if self.complete else ", INCOMPLETE") + ")")

    def _check_layer(self, layer: int) -> None:
        if layer not in self.layers:
            raise KeyError(f"layer {layer} was not harvested: this store holds layers {self.layers}; "
                           f"harvest it with vlens.harvest(vlm, data, layers=[..., {layer}], ...)")

    # -- data --
    def activations(self, layer: int) -> ActivationRows:
        """Layer `layer`'s rows, `[len(store), d_model]`, lazily read from memory-mapped shards."""
        self._check_layer(layer)
        return ActivationRows([s.tensor(f"act.{layer}") for s in self._shards], self._rows, self.d_model, self.dtype)

    @property
    def meta(self) -> dict[str, Tensor]:
        """Metadata columns, one tensor per column, one value per row (see the module docs)."""
        if self._meta is None:
            keys = [k for k in (self._shards[0].header if self._shards else {}) if k.startswith("meta.")]
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
        ids: list = []
        for s in self.index["shards"]:
            if s["pass"] != "main":
                continue
            if s.get("file"):
                ids.extend(json.loads(_Shard(self.path / s["file"]).metadata.get("sample_ids", "[]")))
            else:
                ids.extend(s.get("sample_ids", []))
        return ids

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
            if modality not in _MODALITY:
                raise ValueError(f"modality must be 'image' or 'text', not {modality!r}")
            keep &= m["modality"] == _MODALITY[modality]
        if label is not None:
            labels = torch.as_tensor(label).flatten().long()
            keep &= torch.isin(m["label"], labels)
        if text_only is not None:
            keep &= m["text_only"] == int(bool(text_only))
        if role is not None:
            if role not in ROLE_NAMES:
                raise ValueError(f"role must be one of {ROLE_NAMES}, not {role!r}")
            keep &= m["role"] == ROLE_NAMES.index(role)
        base = torch.arange(len(self)) if self._rows is None else self._rows
        return ActivationStore(self.path, _rows=base[keep], _shards=self._shards)

    def batches(self, layer: int, batch_size: int = 4096, shuffle: bool = True, seed: int = 0,
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
            >>> store = harvest(vlens.tiny(), data, layers=[0], out=tempfile.mkdtemp(), progress=False)
            >>> sum(len(b) for b in store.batches(0, batch_size=50)) == len(store)
            True
        """
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

    def pooled(self, layer: int, modality: str | None = None) -> tuple[Float[Tensor, "n_samples d_model"], Int[Tensor, " n_samples"]]:
        """Per-sample features `X` (float32) and labels `y` of one layer, for probes.

        For a `pool="mean"` store, its rows (image pass); for a per-token store,
        the mean over each sample's stored tokens of the image pass
        (optionally only `modality` 'image' or 'text' tokens).

        Example:
            >>> import vlens, tempfile
            >>> from vlens.data import Sample
            >>> from PIL import Image
            >>> data = [Sample(Image.new("RGB", (32, 32)), label=i % 2) for i in range(4)]
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

    def to_sae_lens(self, layer: int, path: str | os.PathLike, **kwargs: Any) -> dict:
        """Export one layer to SAE-Lens's cached-activation format (see `export_sae_lens`)."""
        return export_sae_lens(self, layer, path, **kwargs)


# =====================================================================================
# SAE-Lens interop
# =====================================================================================


def export_sae_lens(store: ActivationStore, layer: int, path: str | os.PathLike, *, context_size: int = 128,
                    modality: str | None = None, shuffle: bool = True, seed: int = 0,
                    dtype: str = "float32") -> dict:
    """Write one layer of a store as an HF dataset on disk, the format SAE-Lens's trainer reads as cached activations.

    SAE-Lens reads a `datasets.load_from_disk` dataset with one `Array2D`
    column named after the hook (`blocks.L.hook_resid_pre`) of shape
    `[context_size, d_in]` per row, plus `token_ids` `[context_size]`. The
    store's rows (tokens) are grouped `context_size` at a time (rows are
    shuffled first by default, so each pseudo-sequence mixes samples; the last
    incomplete group is dropped). Returns the `LanguageModelSAERunnerConfig`
    fields to use it: `use_cached_activations=True`, `cached_activations_path`,
    `hook_name`, `d_in`, `context_size`, and the number of tokens written.

    Example:
        >>> import vlens, tempfile
        >>> from vlens.data import Sample
        >>> from PIL import Image
        >>> data = [Sample(Image.new("RGB", (32, 32)))] * 2
        >>> store = harvest(vlens.tiny(), data, layers=[1], out=tempfile.mkdtemp(), progress=False)
        >>> cfg = export_sae_lens(store, 1, tempfile.mkdtemp() + "/acts", context_size=16)
        >>> cfg["hook_name"], cfg["d_in"], cfg["n_tokens"] % 16
        ('blocks.1.hook_resid_pre', 64, 0)
    """
    import datasets
    from datasets import Array2D, Features, Sequence as HFSequence, Value

    view = store.filter(modality=modality) if modality is not None else store
    hook = store.hook_name(layer)
    d = store.d_model
    n_seq = len(view) // context_size
    if n_seq == 0:
        raise ValueError(f"the store has {len(view)} rows, fewer than context_size={context_size}: lower context_size")
    features = Features({hook: Array2D(shape=(context_size, d), dtype=dtype),
                         "token_ids": HFSequence(Value("int32"), length=context_size)})
    token_ids = view.meta["token_id"]
    x = view.activations(layer)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(view), generator=g)[: n_seq * context_size] if shuffle else torch.arange(n_seq * context_size)
    np_dtype = getattr(torch, dtype)

    def gen():
        step = max(1, 4096 // context_size)
        for s in range(0, n_seq, step):
            idx = perm[s * context_size : min(s + step, n_seq) * context_size]
            a = x[idx].to(np_dtype).reshape(-1, context_size, d).numpy()
            t = token_ids[idx].to(torch.int32).reshape(-1, context_size).numpy()
            for i in range(len(a)):
                yield {hook: a[i], "token_ids": t[i]}

    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} is not empty: export to a new directory")
    cache = Path(tempfile.mkdtemp(prefix="vlens-sae-lens-"))
    try:
        ds = datasets.Dataset.from_generator(gen, features=features, cache_dir=str(cache))
        ds.save_to_disk(str(path))
        del ds
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return {
        "use_cached_activations": True,
        "cached_activations_path": str(path),
        "hook_name": hook,
        "d_in": d,
        "context_size": context_size,
        "n_tokens": n_seq * context_size,
    }


# =====================================================================================
# what a selection picks, as a picture
# =====================================================================================

#: Selections shown by `selection_figure` by default.
FIGURE_SELECTIONS = ("image", "prompt", "answer", "text", "all", "image+answer")
_ROLE_COLOURS = ("#e8743b", "#4c78a8", "#54a24b", "#b279a2", "#9d9d9d")


def selection_grid(layout: TokenLayout, selections: Sequence[Any] = FIGURE_SELECTIONS, row: int = 0) -> Int[Tensor, "n_selections seq"]:
    """Which tokens of batch row `row` each selection keeps: the token's role code where kept, -1 where not.

    Role codes: 0 image, 1 prompt, 2 answer, 3 BOS, 4 other (`ROLE_NAMES`); padding is dropped.

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny()
        >>> b = vlm.prepare(["<image>\\nWhat is shown?"], [Image.new("RGB", (32, 32))], answers=["a circle"])
        >>> g = selection_grid(b.layout, ["image", "answer"])
        >>> [int((r >= 0).sum()) for r in g] == [int(b.layout.image.sum()), 2]
        True
    """
    role = torch.full(layout.shape, 4, dtype=torch.long)
    role[layout.answer] = 2
    role[layout.prompt] = 1
    role[layout.bos] = 3
    role[layout.image] = 0
    real = ~layout.pad[row]
    rows = []
    for sel in selections:
        m = layout.select(sel)[row]
        rows.append(torch.where(m, role[row], -1)[real])
    return torch.stack(rows)


def selection_figure(vlm: Any, batches: Sequence[Any], selections: Sequence[Any] = FIGURE_SELECTIONS,
                     titles: Sequence[str] | None = None):
    """A plotly figure: for each batch (row 0), which tokens each selection keeps, coloured by role.

    Hover a cell to see the token. Pass e.g. an image+caption batch and a
    text-only caption batch to compare the two passes of an SAE harvest.

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny()
        >>> b = vlm.prepare(["<image>\\nWhat is shown?"], [Image.new("RGB", (32, 32))], answers=["a circle"])
        >>> fig = selection_figure(vlm, [b])
        >>> len(fig.data) >= 1
        True
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    titles = list(titles) if titles is not None else [f"batch {i}" for i in range(len(batches))]
    fig = make_subplots(rows=len(batches), cols=1, subplot_titles=titles, vertical_spacing=0.12)
    names = [s if isinstance(s, str) else getattr(s, "__name__", "mask") for s in selections]
    colourscale = []
    for k, c in enumerate(("#f4f4f4",) + _ROLE_COLOURS):  # -1 .. 4 -> 6 bands
        colourscale += [[k / 6, c], [(k + 1) / 6, c]]
    for i, b in enumerate(batches):
        lay = b.layout
        grid = selection_grid(lay, selections)
        real = ~lay.pad[0]
        ids = lay.input_ids[0][real]
        toks = vlm.tokenizer.convert_ids_to_tokens(ids.tolist())
        kind = torch.full(lay.shape, -1, dtype=torch.long)
        if lay.images:
            kind[lay.image] = lay.image_token_table()["kind"]
        kinds = kind[0][real].tolist()
        labels = [t if k < 0 else f"{t} ({KIND_NAMES[k]})" for t, k in zip(toks, kinds)]
        hover = [[f"{names[r]} | pos {p}: {labels[p]} | " + ("kept, " + ROLE_NAMES[int(v)] if v >= 0 else "dropped")
                  for p, v in enumerate(grid[r].tolist())] for r in range(len(names))]
        fig.add_trace(go.Heatmap(z=grid.tolist(), y=names, x=list(range(len(toks))), zmin=-1.5, zmax=4.5,
                                 colorscale=colourscale, showscale=False, text=hover, hoverinfo="text",
                                 xgap=1, ygap=2), row=i + 1, col=1)
        fig.update_yaxes(autorange="reversed", row=i + 1, col=1)
        fig.update_xaxes(title_text="token position", row=i + 1, col=1)
    for name, c in zip(ROLE_NAMES[:4], _ROLE_COLOURS):  # a legend for the role colours
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", marker=dict(size=12, color=c, symbol="square"),
                                 name=f"kept: {name} token"))
    fig.update_layout(height=260 * len(batches) + 80, template="plotly_white", margin=dict(l=90, r=20, t=60, b=40),
                      legend=dict(orientation="h", y=1.08, x=0))
    return fig


def selection_png(vlm: Any, batches: Sequence[Any], path: str | os.PathLike, selections: Sequence[Any] = FIGURE_SELECTIONS,
                  titles: Sequence[str] | None = None, cell: int = 9) -> None:
    """The picture of `selection_figure` as a PNG drawn with PIL (for places without JavaScript)."""
    from PIL import Image, ImageDraw

    names = [s if isinstance(s, str) else getattr(s, "__name__", "mask") for s in selections]
    titles = list(titles) if titles is not None else [f"batch {i}" for i in range(len(batches))]
    grids = [selection_grid(b.layout, selections) for b in batches]
    left, width = 100, max(g.shape[1] for g in grids) * cell + 110
    block = (len(names) + 1) * (cell + 4) + 26
    img = Image.new("RGB", (width, block * len(batches) + 30), "white")
    d = ImageDraw.Draw(img)
    for k, (name, c) in enumerate(zip(ROLE_NAMES[:4], _ROLE_COLOURS)):
        d.rectangle([left + k * 130, 8, left + k * 130 + 10, 18], fill=c)
        d.text((left + k * 130 + 15, 6), f"kept: {name}", fill="black")
    for i, (g, t) in enumerate(zip(grids, titles)):
        y0 = 30 + i * block
        d.text((left, y0), t, fill="black")
        for r, name in enumerate(names):
            y = y0 + 16 + r * (cell + 4)
            d.text((4, y - 1), name, fill="black")
            for p, v in enumerate(g[r].tolist()):
                x = left + p * cell
                d.rectangle([x, y, x + cell - 2, y + cell], fill=_ROLE_COLOURS[v] if v >= 0 else "#eeeeee")
    img.save(path)


# =====================================================================================
# command line
# =====================================================================================


def main(argv: Sequence[str] | None = None) -> int:
    """`vlens harvest`: harvest a data set's activations to a store directory.

    Example:
        >>> main(["--help"])  # doctest: +SKIP
    """
    import argparse

    p = argparse.ArgumentParser(prog="vlens harvest", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="toy", help="'toy', a llava-hf LLaVA-Next id or directory")
    p.add_argument("--data", default="toy", help="'toy' (the toy image set) or an image folder (class/xxx.jpg)")
    p.add_argument("--n", type=int, default=200, help="number of toy samples")
    p.add_argument("--layers", required=True, help="comma-separated LM layers, e.g. 1,2,3")
    p.add_argument("--tokens", default="image")
    p.add_argument("--pool", default=None, choices=[None, "mean"])
    p.add_argument("--captions", action="store_true")
    p.add_argument("--text-only", action="store_true")
    p.add_argument("--site", default="resid_pre", choices=SITES)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--device", default=None, help="e.g. cuda (under torchrun each rank takes cuda:LOCAL_RANK)")
    a = p.parse_args(list(argv) if argv is not None else None)

    from . import distributed
    from .loading import load

    env = distributed.init()  # joins torchrun's process group; a no-op on one process
    device = a.device
    if device == "cuda" and env.enabled:
        device = f"cuda:{env.local_rank}"
    vlm = load(a.model, device=device)
    if a.data == "toy":
        from .data import toy

        data = toy("train", n=a.n)
    else:
        from .data import image_folder

        data = image_folder(a.data)
    store = harvest(vlm, data, [int(x) for x in a.layers.split(",")], tokens=a.tokens, pool=a.pool,
                    batch_size=a.batch_size, dtype=a.dtype, out=a.out, prompt=a.prompt, captions=a.captions,
                    text_only=a.text_only, site=a.site, overwrite=a.overwrite, progress=env.is_main)
    if env.is_main:
        print(store)
    distributed.cleanup()
    return 0
