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

import hashlib
import json
import operator
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TYPE_CHECKING

import torch
from torch import Tensor

from .. import distributed
from ..errors import BadImageError, HarvestError, InputError
from ..model import as_dtype
from ..prepare import load_image
from ..prompts import QUESTION
from ..sites import VECTOR_KINDS, Site, SiteLike
from ..tokens import TokenLayout, TokenSelection, check_selection, select
from .read import POOLS, read_layers
from .shards import FORMAT, INDEX, main_pass_list
from .store import ActivationStore, role_codes
from .writer import _atomic_write, _Writer, index_text

if TYPE_CHECKING:
    from ..model import VLM

__all__ = ["harvest", "KINDS", "main"]

#: The site kinds a store holds (one per store): the residual stream entering (`resid_pre`) or leaving a layer, what
#: the attention and MLP blocks add to it, the MLP's input, or the heads' outputs (`z`, heads concatenated).
KINDS = VECTOR_KINDS


@dataclass(frozen=True)
class _Plan:
    """What one harvest does, checked: everything but the model, the data and the store directory."""

    kind: str
    layers: list[int]
    tokens: Any
    pool: str | None
    batch_size: int
    dtype: torch.dtype
    prompt: str
    template: bool
    captions: bool
    text_only: bool
    text_prompt: str
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
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, not {batch_size!r}")
    store_dtype = as_dtype(dtype) or vlm.dtype
    if not store_dtype.is_floating_point:
        raise InputError(f"dtype must be a floating-point dtype (e.g. torch.float16), not {store_dtype}")
    if out is not None and not str(out).strip():
        raise InputError("out='' is an empty path: pass a directory for the store (a new or an empty one), or "
                         "out=None for a temporary one")
    _check_stream(data, tokens, "harvest")
    if not isinstance(shard_mb, (int, float)) or isinstance(shard_mb, bool) or not shard_mb > 0:
        raise InputError(f"shard_mb must be a positive number of megabytes, not {shard_mb!r}")
    if vlm.family.image_token(vlm.processor) not in prompt:
        raise InputError(f"prompt {prompt!r} has no '<image>' placeholder: write it where the image goes, e.g. {QUESTION!r}")
    plan = _Plan(kind, layer_ints, tokens, pool, batch_size, store_dtype, prompt, bool(template), bool(captions),
                 bool(text_only), text_prompt, int(shard_mb * 2**20), progress, callback)
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
    other = [s.name for s in resolved if s.kind not in KINDS]
    if other:
        raise InputError(f"harvest stores one vector per token ({', '.join(k + '.L' for k in KINDS)}), not {other}: "
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


def _check_stream(data: Any, tokens: Any, what: str) -> None:
    """The data and token selection of a pass over a data set (a harvest, `train_many`), checked before any forward."""
    try:
        n = len(data)
    except TypeError:
        raise InputError(f"data must be a sequence with len() and indexing (a list of vlens.data.Sample or a "
                         f"vlens.data data set), not {type(data).__name__}: wrap an iterator in list(...)") from None
    if n == 0:
        raise InputError(f"data is empty: nothing to {what}; give at least one vlens.data.Sample")
    check_selection(tokens)  # a bad name fails now, not after the first forward
    if isinstance(tokens, Tensor) and tokens.dtype == torch.bool:
        raise InputError("a fixed [batch, seq] mask cannot select tokens in every forward: pass a selection name "
                         "or a function layout -> mask")


def _describe(tokens: Any) -> str:
    """The token selection as the store's config records it."""
    if isinstance(tokens, str):
        return tokens
    if callable(tokens):
        return f"<function {getattr(tokens, '__qualname__', repr(tokens))}>"
    return f"<positions {list(tokens) if isinstance(tokens, (list, tuple, range)) else tokens}>"


def _harvest_run(vlm: VLM, data: Sequence[Any], plan: _Plan, out: Any, overwrite: bool,
                 indices: Sequence[int] | None = None, rank_of: str | None = None) -> ActivationStore:
    """Harvest `data` into the store at `out`; `indices` are the global sample indices of a rank's slice."""
    n = len(data)
    config = {
        "model": vlm.name,
        "model_fingerprint": _fingerprint(vlm),
        "d_model": int(vlm.width(Site(plan.kind, 0))),
        "layers": plan.layers,
        "site": plan.kind,
        "tokens": _describe(plan.tokens),
        "pool": plan.pool,
        "dtype": str(plan.dtype).removeprefix("torch."),
        "prompt": plan.prompt,
        "template": plan.template,
        "captions": plan.captions,
        "text_only": plan.text_only,
        "text_prompt": plan.text_prompt,
        "n_samples": n,
    }
    if rank_of is not None:
        config["rank_of"] = rank_of
    root = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="vlens-harvest-"))
    writer = _Writer.open(root, config, overwrite=overwrite, hook_names={s.index: s.hook_name for s in plan.sites},
                          shard_bytes=plan.shard_bytes)
    at = (lambda i: i) if indices is None else (lambda i: indices[i])  # a sample's index in the caller's data
    try:
        _check_same_data(root, writer.index, data, at)
    except HarvestError:
        if not overwrite:
            raise
        writer = _Writer.open(root, config, overwrite=True, hook_names={s.index: s.hook_name for s in plan.sites},
                              shard_bytes=plan.shard_bytes, fresh=True)
    passes = [("main", n)] + ([("text", n)] if plan.text_only else [])
    total = sum(p[1] for p in passes)
    done = sum(writer.progress[p] for p, _ in passes)
    if done >= total:
        writer.finish()
        return ActivationStore(root)

    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=done, unit="img", desc=f"harvest {len(plan.layers)} layer(s)",
               disable=None if plan.progress else True, dynamic_ncols=True)
    t0, n_tok_run, n_img_run = time.perf_counter(), 0, 0
    try:
        for pass_name, n_items in passes:
            for b0 in range(writer.progress[pass_name], n_items, plan.batch_size):
                span = range(b0, min(b0 + plan.batch_size, n_items))
                samples = [_sample(data, i, at(i)) for i in span]
                images = [_image(s, at(i)) for i, s in zip(span, samples)] if pass_name == "main" else None
                keys = [_key(s, im) for s, im in zip(samples, images)] if images is not None else None
                batch = _prepare(vlm, samples, images, b0, pass_name, plan, at)
                mask = select(batch, plan.tokens)
                kept = mask.any(1)
                rows: dict[str, Tensor] = {}
                if kept.any():
                    acts = read_layers(vlm, batch, plan.sites, tokens=mask, pool=plan.pool, dtype=plan.dtype)
                    rows = _meta(batch.layout, mask, b0, samples, pass_name == "text", plan.pool)
                    if indices is not None:  # a rank's slice: store global sample indices
                        rows["meta.sample"] = torch.as_tensor(indices, dtype=torch.long)[rows["meta.sample"]]
                    rows.update({f"act.{s.index}": acts[s] for s in plan.sites})
                    if plan.pool is not None:  # drop samples that selected nothing
                        rows = {k: v[kept] for k, v in rows.items()}
                n_skip = int((~kept).sum())
                gidx = range(b0, b0 + len(samples)) if indices is None else [indices[i] for i in range(b0, b0 + len(samples))]
                writer.add(pass_name, b0 + len(samples), rows, n_skip, [_sid(s, i) for i, s in zip(gidx, samples)],
                           keys)
                n_sel = int(mask.sum())
                n_tok_run += n_sel
                n_img_run += len(samples)
                dt = max(time.perf_counter() - t0, 1e-9)
                bar.update(len(samples))
                bar.set_postfix_str(f"{n_img_run / dt:.1f} img/s, {n_tok_run / dt:,.0f} tok/s", refresh=False)
                if plan.callback is not None:
                    plan.callback({"pass": pass_name, "done": b0 + len(samples), "total": n_items, "tokens": n_sel,
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
        what = "sample(s)" if plan.pool else "sample(s) contributed no tokens and were"
        warnings.warn(
            f"token selection {config['tokens']!r} selected nothing in "
            + ", ".join(f"{v} {what} skipped in the {k} pass" for k, v in skipped.items() if v)
            + " (see store.index['skipped'])",
            stacklevel=3,
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
    _atomic_write(root / INDEX, lambda tmp: tmp.write_text(text))


def _fingerprint(vlm: VLM) -> str:
    """A short hash of a few weights, telling apart two models of one name (e.g. two random tiny seeds)."""
    try:
        w = vlm._module.get_input_embeddings().weight
        if w.device.type == "meta":
            return "meta"
        head = w.detach().flatten()[:256].float().cpu().numpy().tobytes()
        return hashlib.sha1(head).hexdigest()[:16]
    except Exception:  # pragma: no cover - exotic modules
        return "unknown"


def _sid(sample: Any, i: int) -> Any:
    sid = getattr(sample, "id", None)
    if sid is None:
        return i
    return sid if isinstance(sid, (int, str)) else str(sid)


def _sample(data: Sequence[Any], i: int, where: int) -> Any:
    """`data[i]`, checked: an unreadable image (lazy data sets decode on access) or a bad label names the sample."""
    try:
        s = data[i]
    except BadImageError as e:
        raise BadImageError(f"sample {where}: {e}. {_FIX_IMAGE}") from e
    label = getattr(s, "label", None)
    if label is not None:
        try:
            ok = operator.index(label) >= -1
        except TypeError:
            ok = False
        if not ok:
            raise InputError(f"sample {where} (id {getattr(s, 'id', None)!r}) has label {label!r}: a label is a class "
                             "id (an int >= 0) or None; map class names to ids, e.g. label=class_names.index(name)")
    return s


_FIX_IMAGE = ("Fix or remove that image (vlens.data data sets: ds.verify() drops unreadable ones), then call harvest "
              "again with the same arguments to resume")


def _image(s: Any, where: int):
    """The sample's image as RGB (`vlens.prepare.load_image`), or an error naming the sample."""
    image = getattr(s, "image", None)
    if image is None:
        hint = " (pass vlens.data.Sample(image, ...) objects)" if not hasattr(s, "image") else ""
        raise InputError(f"sample {where} (id {getattr(s, 'id', None)!r}) has no image{hint}: give every sample one")
    try:
        return load_image(image)
    except BadImageError as e:
        raise BadImageError(f"sample {where} (id {getattr(s, 'id', None)!r}): {e}. {_FIX_IMAGE}") from e


def _key(s: Any, image: Any) -> str:
    """A short digest of a sample (id, label, caption, image pixels): tells two data sets apart on resume."""
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps([getattr(s, "id", None), getattr(s, "label", None), getattr(s, "caption", None),
                         image.mode, image.size], default=str).encode())
    h.update(image.tobytes())
    return h.hexdigest()


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
        s = _sample(data, i, at(i))
        now, then = (_key(s, _image(s, at(i))), keys[i]) if keys else (_sid(s, at(i)), ids[i])
        if now != then:
            what = f"id {ids[i]!r} there, {now!r} now" if not keys else "its id, label, caption or image differ"
            raise HarvestError(
                f"{root} holds a harvest of other data: sample {at(i)} differs from the one harvested there ({what}). "
                "Pass the same data in the same order to resume, overwrite=True to replace the store, or choose "
                "another out= directory.")


def _prepare(vlm: VLM, samples: list, images: list | None, b0: int, pass_name: str, plan: _Plan,
             at: Callable[[int], int]):
    if pass_name == "text" or plan.captions:
        for i, s in enumerate(samples):
            cap = getattr(s, "caption", None)
            if not cap or not isinstance(cap, str):
                what = "no caption" if not cap else f"a caption of type {type(cap).__name__}"
                raise InputError(
                    f"sample {at(b0 + i)} (id {getattr(s, 'id', None)!r}) has {what}, but captions=True or "
                    "text_only=True needs a caption string per sample: use an image-caption data set or set "
                    "captions=False, text_only=False"
                )
    if pass_name == "text":
        return vlm.prepare([plan.text_prompt] * len(samples), None, answers=[s.caption for s in samples], template=False)
    answers = [s.caption for s in samples] if plan.captions else None
    return vlm.prepare([plan.prompt] * len(samples), images, answers=answers, template=plan.template)


def _meta(layout: TokenLayout, mask: Tensor, b0: int, samples, text_only: bool, pool) -> dict[str, Tensor]:
    """The metadata columns (`meta.*`, see `vlens.activations.store`) of a batch's selected rows."""
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
