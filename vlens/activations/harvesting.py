"""Harvest residual activations at scale: one forward per batch, many layers, streamed to disk.

`harvest` runs the model once per batch through `read_layers`: every requested
site is read in execution order, only the selected tokens are kept (moved to
the CPU in the chosen dtype at once) and the forward stops after the deepest
site, so no later layer and no LM head ever run. Rows are buffered into shards
of bounded size, each written atomically (`vlens.activations.writer`) before
the JSON index that lists it, so an interrupted harvest (Ctrl-C, `kill -9`, a
full disk) leaves a consistent store, and calling `harvest` again with the
same arguments resumes after the last sample written. `ActivationStore`
(`vlens.activations.store`, which describes the format and the metadata
columns) reads it back.

A store holds one site kind: `layers=[8, 16]` harvests `resid_pre.8` and
`resid_pre.16` (an int L is `resid_pre.L` everywhere in vlens);
`layers=["resid_post.8", "resid_post.16"]` the stream leaving those layers.

    >>> import vlens, tempfile
    >>> from vlens.data import Sample
    >>> from PIL import Image
    >>> data = [Sample(Image.new("RGB", (32, 32)), label=i % 2) for i in range(2)]
    >>> store = harvest(vlens.tiny(), data, layers=["resid_post.0", "resid_post.2"], out=tempfile.mkdtemp(),
    ...                 progress=False)
    >>> store.sites, store.hook_name(2)
    (['resid_post.0', 'resid_post.2'], 'blocks.2.hook_resid_post')
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence, TYPE_CHECKING

import torch
from torch import Tensor

from .. import distributed
from .._durable import atomic_write
from ..errors import HarvestError, InputError
from ..prompts import QUESTION
from ..roles import IMAGE, MIXED, TEXT, role_codes
from ..sites import VECTOR_KINDS, Site, SiteLike
from ..tokens import TokenLayout, TokenSelection
from .read import POOLS
from .shards import FORMAT, INDEX, main_pass_list
from .store import ActivationStore
from .stream import Chunk, StreamPlan, batches, load_sample, sample_id, sample_image, sample_key
from .writer import ShardWriter, index_text

if TYPE_CHECKING:
    from ..model import VLM

__all__ = ["harvest"]


@dataclass(frozen=True)
class _Plan:
    """What one harvest does, checked: everything but the model, the data and the store directory."""

    kind: str
    layers: list[int]
    pool: str | None
    stream: StreamPlan
    shard_bytes: int
    progress: bool
    callback: Callable[[dict], None] | None

    @property
    def sites(self) -> list[Site]:
        return [Site(self.kind, L) for L in self.layers]


def harvest(
    vlm: VLM,
    data: Sequence[Any],
    layers: SiteLike | Sequence[SiteLike],
    *,
    tokens: TokenSelection = "image",
    pool: str | None = None,
    batch_size: int = 8,
    dtype: torch.dtype | str | None = None,
    out: str | os.PathLike | None = None,
    prompt: str = QUESTION,
    template: bool = True,
    captions: bool = False,
    text_only: bool = False,
    text_prompt: str = "",
    text_tokens: TokenSelection | None = None,
    overwrite: bool = False,
    progress: bool = True,
    shard_mb: float = 128.0,
    callback: Callable[[dict], None] | None = None,
) -> ActivationStore:
    """Harvest the activations at `layers` for every sample of `data` into a store at `out`.

    One forward per batch reads every site in execution order and stops after
    the deepest one. Only the tokens chosen by `tokens` are kept:

    - a name of `vlens.tokens.select`: `"image"`, `"text"`, `"prompt"` (instruction
      and template tokens, BOS excluded), `"answer"` (the appended caption),
      `"all"` (every non-padding token), `"base"` / `"highres"` / `"newline"`,
      or a `+`-joined union such as `"image+answer"`;
    - int positions (the same in every row), or a function `layout -> [batch, seq] bool mask`.

    `pool="mean"` stores one row per sample (the mean over its selected tokens:
    the paper's probe features with `prompt="<image>", template=False, tokens="all"`,
    every position of the bare prompt, BOS included); `pool=None` stores one
    row per token (SAE training data: `tokens="image+answer", captions=True`,
    plus `text_only=True` for a second pass over the captions alone, after
    `text_prompt`, without image or chat template).

    Args:
        vlm: a `VLM` (`vlens.load`, `vlens.tiny`).
        data: a sequence of `vlens.data.Sample` (image, label, caption, id).
        layers: the sites to read, all of one kind: ints L (`resid_pre.L`, the
            stream entering layer L, HF `hidden_states[L]`) or names
            `"resid_post.L"` (leaving it, `hidden_states[L + 1]`); negative layers
            count from the end.
        tokens: the token selection (see above). A batch where it selects nothing
            is skipped and counted, not an error.
        pool: None (per token) or "mean" (per sample).
        batch_size: samples per forward.
        dtype: storage dtype (default: the model's); e.g. `torch.float16`.
        out: the store directory (default: a new temporary directory).
        prompt: the prompt, with `<image>` where the image goes (default `vlens.prompts.QUESTION`).
        template: wrap `prompt` in the model's chat template.
        captions: append each `Sample.caption` as the answer.
        text_only: also run a text-only pass over the captions.
        text_prompt: what precedes the caption in the text-only pass.
        text_tokens: the selection kept in the text-only pass (default: `tokens`, which keeps the
            caption tokens); `"all"` keeps every token, BOS included: the paper's pass over
            `processor(caption)` (with `text_prompt=""`).
        overwrite: replace a store of another configuration or other data at `out`, or write into a
            non-empty folder that is not a store (vlens deletes only its own files there).
        progress: show a progress bar with images/s and tokens/s.
        shard_mb: target shard size in MB (a shard closes at the first batch past it).
        callback: called after every batch with a dict of counters (for logging; it may raise to stop).

    Under `torchrun` (several processes, see `vlens.distributed`), each rank
    harvests every `world_size`-th sample into `out/rank-RRR/`, resumable on
    its own, and rank 0 then writes `out/index.json` over all of them: the
    store holds the same rows (in another order) as a single-process harvest.

    Returns:
        The `ActivationStore` at `out`. Calling `harvest` again with the same
        arguments resumes an interrupted harvest (or returns at once if complete),
        after checking that the data is the same (a digest of up to 17 of the samples
        done: id, label, caption, pixels); a damaged shard and those after it are
        harvested again. An unreadable image raises `BadImageError` naming the sample.
        See the "Errors and recovery" docs page.

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
    kind, layer_ints = _resolve_layers(vlm, layers)
    if pool not in POOLS:
        raise InputError(f"pool must be None (one row per token) or 'mean' (one row per sample), not {pool!r}")
    if out is not None and not str(out).strip():
        raise InputError("out='' is an empty path: pass a directory for the store (a new or an empty one), or "
                         "out=None for a temporary one")
    if not isinstance(shard_mb, (int, float)) or isinstance(shard_mb, bool) or not shard_mb > 0:
        raise InputError(f"shard_mb must be a positive number of megabytes, not {shard_mb!r}")
    stream = StreamPlan(tokens, prompt, template, captions, text_only, text_prompt, batch_size, dtype,
                        text_tokens=text_tokens)
    plan = _Plan(kind, layer_ints, pool, stream.check(vlm, data, what="harvest"), int(shard_mb * 2**20), progress,
                 callback)
    env = distributed.info()
    if env.enabled:
        return _harvest_distributed(env, vlm, data, plan, out, overwrite)
    return _harvest_run(vlm, data, plan, out, overwrite)


def _resolve_layers(vlm: VLM, layers: Any) -> tuple[str, list[int]]:
    """(site kind, sorted non-negative layers) of `layers`."""
    items = [layers] if isinstance(layers, (int, str, Site)) else list(layers)
    if not items:
        raise InputError(f"give at least one layer: layers=[...] with layers 0..{vlm.n_layers - 1} "
                         "(resid_pre) or sites such as 'resid_post.3'")
    resolved = [vlm.site(x) for x in items]  # SiteError for unknown names and layers out of range
    other = [s.name for s in resolved if s.kind not in VECTOR_KINDS]
    if other:
        raise InputError(f"harvest stores one vector per token ({', '.join(k + '.L' for k in VECTOR_KINDS)}), not {other}: "
                         "read other sites with vlens.activations.read_layers")
    kinds = sorted({s.kind for s in resolved})
    if len(kinds) > 1:
        raise InputError(f"layers {items} mix the site kinds {kinds}: a store holds one kind; harvest each kind "
                         "into its own store (its own out=)")
    ints = [s.index for s in resolved]
    dups = sorted({L for L in ints if ints.count(L) > 1})
    if dups:
        raise InputError(f"layers {items} list layer(s) {dups} more than once: give each layer once")
    return kinds[0], sorted(ints)


def _config(vlm: VLM, plan: _Plan, n: int, rank_of: str | None) -> dict[str, Any]:
    """The store's configuration: what a resume must agree on (`vlens.activations.writer`)."""
    st = plan.stream
    config = {
        "model": vlm.name,
        "model_fingerprint": vlm.fingerprint(),
        "d_model": int(vlm.width(Site(plan.kind, 0))),
        "layers": plan.layers,
        "site": plan.kind,
        "tokens": st.token_description,
        "pool": plan.pool,
        "dtype": str(st.dtype).removeprefix("torch."),
        "prompt": st.prompt,
        "template": st.template,
        "captions": st.captions,
        "text_only": st.text_only,
        "text_prompt": st.text_prompt,
        "n_samples": n,
    }
    if st.text_tokens is not None:  # recorded only when set, so stores written before it still resume
        config["text_tokens"] = replace(st, tokens=st.text_tokens).token_description
    if rank_of is not None:
        config["rank_of"] = rank_of
    return config


def _open_writer(root: Path, config: dict, plan: _Plan, data: Sequence[Any], overwrite: bool,
                 at: Callable[[int], int]) -> ShardWriter:
    """The store's writer at `root`: resuming a harvest of the same data, or fresh (`overwrite`)."""
    hooks = {s.index: s.hook_name for s in plan.sites}
    writer = ShardWriter.open(root, config, overwrite=overwrite, hook_names=hooks, shard_bytes=plan.shard_bytes)
    try:
        _check_same_data(root, writer.index, data, at)
    except HarvestError:
        if not overwrite:
            raise
        writer = ShardWriter.open(root, config, overwrite=True, hook_names=hooks, shard_bytes=plan.shard_bytes,
                                  fresh=True)
    return writer


def _harvest_run(vlm: VLM, data: Sequence[Any], plan: _Plan, out: Any, overwrite: bool,
                 indices: Sequence[int] | None = None, rank_of: str | None = None) -> ActivationStore:
    """Harvest `data` into the store at `out`; `indices` are the global sample indices of a rank's slice."""
    n = len(data)
    config = _config(vlm, plan, n, rank_of)
    root = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="vlens-harvest-"))
    at = (lambda i: i) if indices is None else (lambda i: indices[i])  # a sample's index in the caller's data
    writer = _open_writer(root, config, plan, data, overwrite, at)
    passes = plan.stream.passes
    total = n * len(passes)
    done = sum(writer.progress[p] for p in passes)
    if done >= total:
        writer.finish()
        return ActivationStore(root)

    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=done, unit="img", desc=f"harvest {len(plan.layers)} layer(s)",
               disable=None if plan.progress else True, dynamic_ncols=True)
    t0, n_tok_run, n_img_run = time.perf_counter(), 0, 0
    try:
        for chunk in batches(vlm, data, plan.stream, start=writer.progress, at=at):
            n_sel, n_skip = _write_chunk(vlm, chunk, plan, writer, indices)
            n_tok_run += n_sel
            n_img_run += len(chunk.samples)
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.update(len(chunk.samples))
            bar.set_postfix_str(f"{n_img_run / dt:.1f} img/s, {n_tok_run / dt:,.0f} tok/s", refresh=False)
            if plan.callback is not None:
                plan.callback({"pass": chunk.pass_name, "done": chunk.b0 + len(chunk.samples), "total": n,
                               "tokens": n_sel, "skipped": n_skip, "shards": len(writer.index["shards"])})
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
    _warn_skipped(writer.index["skipped"], config["tokens"], plan.pool)
    return ActivationStore(root)


def _write_chunk(vlm: VLM, chunk: Chunk, plan: _Plan, writer: ShardWriter,
                 indices: Sequence[int] | None) -> tuple[int, int]:
    """Read one chunk's activations and hand its rows to the writer; (tokens selected, samples skipped)."""
    b0, samples = chunk.b0, chunk.samples
    kept = chunk.mask.any(1)
    rows: dict[str, Tensor] = {}
    acts = chunk.read(vlm, plan.sites, pool=plan.pool, dtype=plan.stream.dtype)
    if acts is not None:
        rows = _meta(chunk.batch.layout, chunk.mask, b0, samples, chunk.text_only, plan.pool)
        if indices is not None:  # a rank's slice: store global sample indices
            rows["meta.sample"] = torch.as_tensor(indices, dtype=torch.long)[rows["meta.sample"]]
        rows.update({f"act.{s.index}": acts[s] for s in plan.sites})
        if plan.pool is not None:  # drop samples that selected nothing
            rows = {k: v[kept] for k, v in rows.items()}
    n_skip = int((~kept).sum())
    gidx = range(b0, b0 + len(samples)) if indices is None else [indices[i] for i in range(b0, b0 + len(samples))]
    writer.add(chunk.pass_name, b0 + len(samples), rows, n_skip, [sample_id(s, i) for i, s in zip(gidx, samples)],
               chunk.keys())
    return int(chunk.mask.sum()), n_skip


def _warn_skipped(skipped: dict[str, int], tokens: str, pool: str | None) -> None:
    if any(skipped.values()):
        what = "sample(s)" if pool else "sample(s) contributed no tokens and were"
        warnings.warn(
            f"token selection {tokens!r} selected nothing in "
            + ", ".join(f"{v} {what} skipped in the {k} pass" for k, v in skipped.items() if v)
            + " (see store.index['skipped'])",
            stacklevel=4,
        )


class _Slice(Sequence):
    """`data[indices]`, lazily."""

    def __init__(self, data: Sequence, indices: Sequence[int]) -> None:
        self.data, self.indices = data, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        return self.data[self.indices[i]]


def _harvest_distributed(env: Any, vlm: VLM, data: Sequence[Any], plan: _Plan, out: Any,
                         overwrite: bool) -> ActivationStore:
    """One rank's part of a torchrun harvest, then (rank 0) the merged index."""
    if out is None:
        raise InputError("a distributed harvest needs out=: a directory every rank can reach (shared disk)")
    root = Path(out)
    indices = list(distributed.shard(len(data), env.rank, env.world_size))
    sub = root / f"rank-{env.rank:03d}"
    if overwrite and env.is_main and (root / INDEX).exists():
        (root / INDEX).unlink()
    distributed.barrier()
    _harvest_run(vlm, _Slice(data, indices), plan, sub, overwrite, indices=indices,
                 rank_of=f"{env.rank}/{env.world_size}")
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
    text = index_text(index)
    atomic_write(root / INDEX, lambda tmp: tmp.write_text(text))


def _check_same_data(root: Path, index: dict, data: Sequence[Any], at: Callable[[int], int]) -> None:
    """Refuse to resume (or return) a store harvested from other data: up to 17 of its samples are compared."""
    done = index["progress"]["main"]
    if not done:
        return
    keys = main_pass_list(root, index, "sample_keys")
    ids = main_pass_list(root, index, "sample_ids") if len(keys) != done else []
    if len(keys) != done and len(ids) != done:  # a store of vlens 0.1 without ids: nothing to compare
        return
    for i in sorted({round(k * (done - 1) / 15) for k in range(16)} | {done - 1}):
        s = load_sample(data, i, at(i))
        now, then = (sample_key(s, sample_image(s, at(i))), keys[i]) if keys else (sample_id(s, at(i)), ids[i])
        if now != then:
            what = f"id {ids[i]!r} there, {now!r} now" if not keys else "its id, label, caption or image differ"
            raise HarvestError(
                f"{root} holds a harvest of other data: sample {at(i)} differs from the one harvested there ({what}). "
                "Pass the same data in the same order to resume, overwrite=True to replace the store, or choose "
                "another out= directory.")


def _meta(layout: TokenLayout, mask: Tensor, b0: int, samples, text_only: bool, pool) -> dict[str, Tensor]:
    """The metadata columns (`meta.*`, see `vlens.activations.store`) of a batch's selected rows."""
    B, S = layout.shape
    labels = torch.tensor([-1 if getattr(s, "label", None) is None else int(s.label) for s in samples], dtype=torch.long)
    sample = torch.arange(b0, b0 + B, dtype=torch.long)
    if pool is not None:
        n_img = (mask & layout.image).sum(1)
        n_sel = mask.sum(1)
        modality = torch.where(n_img == n_sel, IMAGE, torch.where(n_img == 0, TEXT, MIXED)).to(torch.int8)
        neg = torch.full((B,), -1, dtype=torch.int16)
        return {
            "meta.sample": sample, "meta.label": labels, "meta.n_tokens": n_sel.to(torch.int32),
            "meta.modality": modality, "meta.text_only": torch.full((B,), int(text_only), dtype=torch.int8),
            "meta.position": neg.to(torch.int32), "meta.token_id": neg.long(), "meta.role": neg.to(torch.int8),
            "meta.kind": neg.to(torch.int8), "meta.tile": neg, "meta.row": neg, "meta.col": neg,
        }
    bi, si = mask.nonzero(as_tuple=True)
    n_pad = layout.pad.sum(1)
    role = role_codes(layout)
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
