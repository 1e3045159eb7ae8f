"""`train_many`: SAEs at several sites (and several widths or sparsities at one site) from one streaming pass.

The paper trained SAEs at six layers; harvesting six layers of d_model 4096 in float32 for
100M tokens is about 10 TB. `train_many` writes nothing but checkpoints: each forward
(`vlens.activations.read_layers`, reading every site still training and stopping after the
deepest) feeds the new rows into one bounded `ShuffleBuffer` per SAE, and every SAE takes
its training steps from its own buffer, through the same `Stepper` as `vlens.sae.train`.
The idea is SAE-Lens 6's `MultiSAETrainingRunner` (one forward, many SAEs, each with its
own optimiser, schedules and scaler); vlens keeps its own loop for the reasons of
`vlens.sae.training.trainer`, gives every SAE its own batch size, buffer and length, and
makes resumption bit-identical.

The data stream is the harvest's: the same samples, prompt, chat template, captions and
text-only pass (`vlens.harvest`'s arguments of those names), batch after batch, repeated
from the start when the SAEs need more tokens than one pass holds. With shuffling off
(`shuffle=False`) SAE *i* sees, step for step, the batches `vlens.sae.train(store,
layer=..., shuffle=False)` reads from a store harvested from the same data in the same
order; with shuffling on, each step draws its batch at random from the SAE's buffer.

Run length: `steps=` or `n_tokens=` (per SAE; or `total_steps` in a `TrainConfig`).
Activation scale: estimated from the first `n_norm_batches × batch_size` rows of the
stream (as `train` does for an iterable). Modality statistics: one more pass over the
first `stats_tokens` tokens of the data, shared by every SAE (the rows `train` reads
from a store for them).

Checkpoints (`checkpoint_dir`): each SAE's own `checkpoint_dir/<name>/step_NNNNNNNNN/`
(the format of `train`, readable by it), then `checkpoint_dir/stream.safetensors`, written
atomically last: the data position (forwards done), every buffer's rows and generator
state, each SAE's step and the stream's settings. Resuming restores exactly that, so an
interrupted run (Ctrl-C, a kill) ends bit-identical to an uninterrupted one; resuming with
other SAEs, data or stream settings is refused, naming what differs.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sae_lens import SAE
from torch import Tensor
from tqdm.auto import tqdm

from ... import distributed
from ..._durable import atomic_write, deferred_interrupt, json_checksum
# The harvest's own pass over a data set (its checks, batches and sample keys), shared on purpose: a
# single-pass run feeds the SAEs exactly the tokens a harvest of the same data would store.
from ...activations.stream import StreamPlan, load_sample, read_chunk, sample_image, sample_key
from ...errors import InputError, SiteError
from ...prompts import QUESTION
from ...sites import VECTOR_KINDS, Site
from ...tokens import TokenSelection
from ..modality import DEFAULT_SHARED, ModalityAccumulator, as_multimodal
from ..sources import TensorSource
from .buffer import ShuffleBuffer
from .config import TrainConfig
from .resume import PREFIX, load_checkpoint, remove_leftovers, save_checkpoint
from .trainer import Stepper, estimate_scale, finish, resolve_config

if TYPE_CHECKING:
    from ...model import VLM

__all__ = ["train_many", "STREAM_FILE"]

#: The stream state of a `train_many` checkpoint directory (data position, buffers, steps).
STREAM_FILE = "stream.safetensors"
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass
class _Run:
    """One SAE of the run: its name, site, configuration, stepper and buffer."""

    name: str
    site: Site
    cfg: TrainConfig
    stepper: Stepper
    buffer: ShuffleBuffer
    every: int
    scaled: bool = False
    target: Site | None = None  # a transcoder's output site (its buffer rows are [input | target])

    @property
    def done(self) -> bool:
        return self.stepper.state.step >= self.cfg.trainer.total_steps

    @property
    def hold(self) -> int:
        """Rows the buffer must hold before the first step (those that fix the activation scale)."""
        t = self.cfg.trainer
        return t.n_norm_batches * t.batch_size if not self.scaled else 0


def train_many(
    vlm: "VLM",
    data: Sequence[Any],
    saes: Mapping[Any, Any] | Sequence[Any],
    *,
    tokens: TokenSelection = "image",
    prompt: str = QUESTION,
    template: bool = True,
    captions: bool = False,
    text_only: bool = False,
    text_prompt: str = "",
    forward_batch_size: int = 8,
    dtype: torch.dtype | str | None = None,
    buffer: int | None = None,
    steps: int | None = None,
    n_tokens: int | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = True,
    progress: bool = True,
    log_every: int = 50,
    stats_tokens: int = 200_000,
    shared_range: tuple[float, float] = DEFAULT_SHARED,
    device: str = "cpu",
    callback: Callable[[str, int, dict[str, float]], None] | None = None,
    **overrides: Any,
) -> dict[str, SAE]:
    """Train several SAEs from one streaming pass of `vlm` over `data`; return `{name: SAE-Lens SAE}`.

    Args:
        vlm: the model (`vlens.load`, `vlens.tiny`).
        data: a sequence of `vlens.data.Sample`, as for `vlens.harvest`.
        saes: which SAEs. A dict `{site: spec}` (`{"resid_pre.8": "paper", 12: "topk"}`; the
            name is the site's) or `{name: spec}` where the spec names its site
            (`{"l8-wide": {"site": 8, "preset": "topk", "d_sae": 65536, "k": 64}}`), or a list of
            sites / `(site, spec)` pairs (names: the site's, `-1`, `-2`, ... for a site's later SAEs).
            A spec is a preset name, a `TrainConfig`, or a dict with `site`, `preset`, `d_sae`,
            `expansion`, `buffer`, `steps`, `n_tokens` and any training field (`k`, `lr`,
            `batch_size`, `seed`, `shuffle`, ...).
            Sites are `resid_pre.L` (an int L) or any vector site (`resid_post.L`, `mlp_in.L`, ...).
            A spec with a `target` site trains a transcoder that reads `site` and predicts
            `target` (`{"site": "mlp_in.3", "target": "mlp_out.3", "preset": "topk", "skip": True}`;
            `vlens.sae.transcoder_specs` writes one per layer; see `vlens.sae.transcoder`).
        tokens, prompt, template, captions, text_only, text_prompt: the token stream, as for `vlens.harvest`.
        forward_batch_size: samples per forward pass.
        dtype: dtype the activations are read and buffered in (default: the model's).
        buffer: rows each SAE's shuffle buffer holds (default 8 batches); per SAE with `buffer` in its spec.
        steps / n_tokens: training length of every SAE (or `total_steps` in a spec).
        checkpoint_dir / checkpoint_every / resume: checkpoints every `checkpoint_every` steps of
            any SAE (default 10 per run), on Ctrl-C and at the end; see the module docstring.
        progress / log_every: one progress bar over all SAEs' steps; metrics every `log_every` steps.
        stats_tokens / shared_range: tokens and shared range of the per-latent modality statistics.
        device: where the SAEs train (activations are buffered on the CPU).
        callback: `callback(name, step, metrics)` after every logged step of any SAE.
        **overrides: training fields for every SAE (a spec's own fields win), e.g. `batch_size=4096`, `seed=0`.

    Example:
        >>> import vlens
        >>> from PIL import Image
        >>> from vlens.data import Sample
        >>> data = [Sample(Image.new("RGB", (32, 32), (60 * i, 0, 0))) for i in range(4)]
        >>> saes = train_many(vlens.tiny(), data, {1: "paper", "resid_post.2": {"preset": "topk", "k": 8}},
        ...                   steps=3, batch_size=32, buffer=64, d_sae=128, progress=False)
        >>> {name: (sae.cfg.metadata.hook_name, sae.cfg.d_sae) for name, sae in saes.items()}
        {'resid_pre.1': ('blocks.1.hook_resid_pre', 128), 'resid_post.2': ('blocks.2.hook_resid_post', 128)}
    """
    plan = StreamPlan(tokens, prompt, template, captions, text_only, text_prompt, forward_batch_size, dtype).check(
        vlm, data, what="train on", batch_name="forward_batch_size")
    for name, v in (("checkpoint_every", checkpoint_every), ("log_every", log_every)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise InputError(f"{name} must be an int >= 1, not {v!r}")
    if distributed.info().enabled:
        raise InputError("train_many runs in one process (one model, one stream); under torchrun harvest with "
                         "vlens.harvest and train each SAE with vlens.sae.train(store, layer=...)")
    runs = _runs(vlm, saes, plan.dtype, buffer, steps, n_tokens, checkpoint_every, log_every, device, overrides)
    stream = _Stream(vlm, data, plan)
    setup = _setup(vlm, data, plan, runs)

    ckdir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    position = 0
    if ckdir is not None:
        for r in runs:
            remove_leftovers(ckdir / r.name)
        if resume and (ckdir / STREAM_FILE).exists():
            position = _restore(ckdir, runs, setup)

    total = sum(r.cfg.trainer.total_steps for r in runs)
    bar = tqdm(total=total, initial=sum(min(r.stepper.state.step, r.cfg.trainer.total_steps) for r in runs),
               disable=(not progress) or None, desc=f"{len(runs)} SAEs, one pass", dynamic_ncols=True)
    t0 = time.perf_counter()
    empty = 0  # forwards in a row that selected no token
    try:
        while True:
            want_checkpoint = False
            for r in runs:
                while not r.done and r.buffer.ready(r.cfg.trainer.batch_size, r.hold):
                    want_checkpoint |= _step(r, bar, callback)
            if want_checkpoint and ckdir is not None:
                _save(ckdir, runs, position, setup)
            active = [r for r in runs if not r.done]
            if not active:
                break
            acts, mod = stream.read(position, _order(vlm, _sites(active)))
            if mod is None:
                empty += 1
                if empty >= stream.per_epoch:
                    raise InputError(f"token selection {plan.token_description!r} selects no token in any sample of the "
                                     "data: nothing to train on; choose another selection (e.g. tokens='image')")
            with deferred_interrupt():  # the forward's rows join every buffer and the position moves, together
                if mod is not None:
                    empty = 0
                    for r in active:
                        r.buffer.add(_rows(r, acts), mod)
                position += 1  # a Ctrl-C during the forward itself loses nothing: it is read again
    except KeyboardInterrupt:
        if ckdir is not None:
            _save(ckdir, runs, position, setup)
            bar.write(f"interrupted: checkpoint saved to {ckdir}; call train_many(...) again to resume")
        bar.close()
        raise
    bar.close()
    elapsed = time.perf_counter() - t0
    if ckdir is not None:
        _save(ckdir, runs, position, setup)
    for r in runs:
        r.buffer.clear()

    out = {r.name: finish(r.stepper.sae, r.cfg, r.stepper.state, None, r.stepper.metrics, elapsed, 0, shared_range,
                           device, progress) for r in runs}
    for r in runs:  # the shared stream: forwards run for the whole run (this call and those it resumed)
        out[r.name].cfg.metadata.vlens_training["stream"] = {
            "forwards": position, "site": r.site.name, "buffer": r.buffer.capacity, "saes": len(runs),
            **({"target": r.target.name} if r.target is not None else {})}
    if stats_tokens:
        for name, stats in _modality_stats(stream, runs, out, stats_tokens, shared_range).items():
            as_multimodal(out[name], stats)
    return out


def _order(vlm: "VLM", sites: set[Site]) -> list[Site]:
    """`sites` in execution order (a fixed order: the keys of each forward's activations)."""
    names = vlm.sites
    return sorted(sites, key=lambda s: names.index(s.name))


def _sites(runs: list[_Run]) -> set[Site]:
    """Every site the runs read: each one's input, and a transcoder's target."""
    return {r.site for r in runs} | {r.target for r in runs if r.target is not None}


def _rows(r: _Run, acts: dict[Site, Tensor]) -> Tensor:
    """The rows run `r` buffers from one forward: its site's, or a transcoder's [input | target] side by side."""
    return acts[r.site] if r.target is None else torch.cat([acts[r.site], acts[r.target]], dim=1)


def _items(saes: Any) -> list[tuple[str | None, Any, Any]]:
    """(name or None, site or None, spec) per SAE of `saes` (a dict or a list)."""
    if isinstance(saes, Mapping):
        out = []
        for key, spec in saes.items():
            named = isinstance(spec, Mapping) and "site" in spec
            out.append((str(key) if named else None, None if named else key, spec))
        return out
    if isinstance(saes, (list, tuple)):
        out = []
        for item in saes:
            if isinstance(item, tuple) and len(item) == 2:
                out.append((None, item[0], item[1]))
            elif isinstance(item, Mapping):  # {"site": ..., "preset": ..., ...}
                out.append((None, None, item))
            else:
                out.append((None, item, None))
        return out
    raise InputError(f"saes must be a dict {{site: preset or TrainConfig or dict}} or a list of sites / (site, spec) "
                     f"pairs, not {type(saes).__name__}; e.g. saes={{'resid_pre.8': 'paper', 'resid_post.12': 'topk'}}")


def _runs(vlm: "VLM", saes: Any, dtype: torch.dtype, buffer: int | None, steps: int | None, n_tokens: int | None,
          checkpoint_every: int | None, log_every: int, device: str, overrides: dict[str, Any]) -> list[_Run]:
    """Every SAE of the run, configured and checked (names, sites, configurations), before any forward."""
    items = _items(saes)
    if not items:
        raise InputError("saes is empty: name at least one SAE, e.g. saes={'resid_pre.8': 'paper'}")
    specs = []
    for name, site, spec in items:
        if spec is None:
            spec = "paper"
        if isinstance(spec, (str, TrainConfig)):
            preset, extra = spec, {}
        elif isinstance(spec, Mapping):
            extra = dict(spec)
            site = extra.pop("site", site)
            preset = extra.pop("preset", "paper")
        else:
            raise InputError(f"SAE {name or site!r}: a spec is a preset name, a TrainConfig or a dict "
                             f"({{'preset': 'topk', 'k': 32, ...}}), not {type(spec).__name__}")
        if site is None:
            raise InputError(f"SAE spec {spec!r} names no site: add 'site': 'resid_pre.8' (or an int layer) to it")
        target = extra.pop("target", None)
        specs.append((name, _vector_site(vlm, name or site, site),
                      None if target is None else _vector_site(vlm, name or site, target), preset, extra))
    counts: dict[Site, int] = {}
    runs: list[_Run] = []
    for name, s, target, preset, extra in specs:
        if name is None:
            i = counts.get(s, 0)
            counts[s] = i + 1
            name = s.name if i == 0 else f"{s.name}-{i}"
        if not _NAME.match(name):
            raise InputError(f"SAE name {name!r} names a checkpoint folder: use letters, digits, '.', '_' and '-'")
        if any(r.name == name for r in runs):
            raise InputError(f"two SAEs are named {name!r}: give each a distinct name (a dict key with 'site' in its spec)")
        ov = {**overrides, **extra}
        if target is not None:  # a transcoder: b_dec lives in the output space
            ov.update(transcoder=True, d_out=int(vlm.width(target)), apply_b_dec_to_input=False)
        d_sae, expansion = ov.pop("d_sae", None), ov.pop("expansion", None)
        rows = ov.pop("buffer", buffer)
        length = (ov.pop("steps", None), ov.pop("n_tokens", None))
        if length == (None, None):  # the spec's own length wins over the run's
            length = (steps, n_tokens)
        try:
            cfg = resolve_config(int(vlm.width(s)), preset, d_sae, expansion, *length, None, ov)
        except InputError as e:
            raise InputError(f"SAE {name!r}: {e}") from None
        if cfg.trainer.scale_mode != "fixed":
            raise InputError(f"SAE {name!r}: train_many scales with one fixed factor; scale_mode='running' (the "
                             "paper's drifting factor) needs vlens.sae.train on stored activations")
        bs = cfg.trainer.batch_size
        rows = 8 * bs if rows is None else rows
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < bs:
            raise InputError(f"SAE {name!r}: buffer={rows!r} rows cannot hold one batch of {bs}: pass buffer >= "
                             "batch_size (a few batches mix tokens of several images)")
        meta = {"model_name": vlm.name, "hook_name": s.hook_name}
        if target is not None:
            meta["hook_name_out"] = target.hook_name
        stepper = Stepper(cfg, meta, device=device, log_every=log_every)
        width = cfg.sae.d_in + (cfg.sae.d_out if target is not None else 0)
        runs.append(_Run(name, s, cfg, stepper, ShuffleBuffer(width, rows, shuffle=cfg.trainer.shuffle,
                                                              seed=cfg.trainer.seed, dtype=dtype),
                         checkpoint_every or max(cfg.trainer.total_steps // 10, 1), scaled=not cfg.trainer.normalize,
                         target=target))
    return runs


def _vector_site(vlm: "VLM", who: Any, site: Any) -> Site:
    """`site` of `vlm`, checked to be one vector per token (what an SAE reads and a transcoder writes)."""
    try:
        s = vlm.site(site)
    except SiteError as e:
        raise SiteError(f"SAE {who!r}: {e}") from None
    if s.kind not in VECTOR_KINDS:
        raise InputError(f"SAE {who!r}: train_many trains on one vector per token "
                         f"({', '.join(k + '.L' for k in VECTOR_KINDS)}; an int L is resid_pre.L), not {s.name!r}")
    return s


def _step(r: _Run, bar: Any, callback: Callable[[str, int, dict[str, float]], None] | None) -> bool:
    """One training step of run `r` from its buffer; True when a checkpoint is due."""
    st, t = r.stepper, r.cfg.trainer
    d_in = r.cfg.sae.d_in
    if not r.scaled:  # the first step: fix the scale from the first rows of the stream (held in the buffer)
        st.state.scale = estimate_scale(TensorSource(r.buffer.first(r.hold)[:, :d_in]), r.cfg)
        st.begin()
        r.scaled = True
    step = st.state.step
    x, mod = r.buffer.take(t.batch_size)
    logged = st.step(x[:, :d_in], mod, target=None if r.target is None else x[:, d_in:])
    bar.update(1)
    if logged is not None:
        bar.set_postfix_str(f"{r.name}: loss {logged['loss']:.4g} L0 {logged['l0']:.1f} "
                            f"EV {logged['explained_variance']:.3f}", refresh=False)
        if callback is not None:
            callback(r.name, step, dict(logged))
    if r.done:
        r.buffer.clear()
    return st.state.step % r.every == 0 or r.done


class _Stream:
    """The data as forward passes: chunk c is (epoch, pass, first sample) of the harvest's order, repeated."""

    def __init__(self, vlm: "VLM", data: Sequence[Any], plan: StreamPlan) -> None:
        self.vlm, self.data, self.plan = vlm, data, plan
        self.chunks = plan.chunks(len(data))
        self.per_epoch = len(self.chunks)

    def read(self, c: int, sites: list[Site]) -> tuple[dict[Site, Tensor], Tensor | None]:
        """Activations `{site: [rows, d]}` and modality codes of chunk `c` (`mod` None when it selects nothing)."""
        chunk = read_chunk(self.vlm, self.data, self.plan, *self.chunks[c % self.per_epoch])
        acts = chunk.read(self.vlm, sites, dtype=self.plan.dtype)
        if acts is None:
            return {}, None
        image = chunk.batch.layout.image
        return acts, image[chunk.mask.to(image.device)].to(torch.int8).cpu()


def _setup(vlm: "VLM", data: Sequence[Any], plan: StreamPlan, runs: list[_Run]) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: model, data, stream settings, SAEs and buffers."""
    n = len(data)
    probe = sorted({0, n // 2, n - 1})
    return {
        "model": vlm.name, "model_fingerprint": vlm.fingerprint(), "n_samples": n,
        "sample_keys": {str(i): sample_key(load_sample(data, i), sample_image(load_sample(data, i), i)) for i in probe},
        "tokens": plan.token_description, "prompt": plan.prompt, "template": plan.template,
        "captions": plan.captions, "text_only": plan.text_only, "text_prompt": plan.text_prompt,
        "forward_batch_size": plan.batch_size, "dtype": str(plan.dtype).removeprefix("torch."),
        "saes": {r.name: {"site": r.site.name, "buffer": r.buffer.capacity,
                          **({"target": r.target.name} if r.target is not None else {})} for r in runs},
    }


def _save(ckdir: Path, runs: list[_Run], position: int, setup: dict[str, Any]) -> None:
    """Every SAE's checkpoint, then the stream state (atomically, last: it names the SAE steps to resume from)."""
    tensors: dict[str, Tensor] = {}
    for i, r in enumerate(runs):
        save_checkpoint(ckdir / r.name, r.cfg, r.stepper.sae, r.stepper.opt, r.stepper.state)
        for key, v in r.buffer.state_dict().items():
            tensors[f"{i}.{key}"] = v
    meta = {"setup": setup, "position": position, "steps": {r.name: r.stepper.state.step for r in runs},
            "scaled": {r.name: r.scaled for r in runs}}
    meta["checksum"] = json_checksum(meta)
    atomic_write(ckdir / STREAM_FILE, lambda tmp: save_file(tensors, tmp, metadata={"vlens_stream": json.dumps(meta)}))


def _restore(ckdir: Path, runs: list[_Run], setup: dict[str, Any]) -> int:
    """Load the stream state and each SAE's checkpoint of the same moment; return the data position."""
    path = ckdir / STREAM_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["vlens_stream"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any unreadable file reads as damaged
        raise InputError(f"{path} is damaged ({type(e).__name__}: {str(e)[:200]}): pass resume=False to start over, "
                         "or another checkpoint_dir") from None
    if meta.get("checksum") != json_checksum(meta):
        raise InputError(f"{path} does not match its checksum: pass resume=False to start over")
    diffs = [f"{k}: checkpoint has {meta['setup'].get(k)!r}, this run has {v!r}" for k, v in setup.items()
             if meta["setup"].get(k) != v]
    if diffs:
        raise InputError(f"refusing to resume from {ckdir}: it was trained with other SAEs, data or stream settings:\n  "
                         + "\n  ".join(diffs) + "\nUse the same settings, resume=False to start over, or another "
                         "checkpoint_dir.")
    for i, r in enumerate(runs):
        st = r.stepper
        st.state = load_checkpoint(ckdir / r.name / f"{PREFIX}{meta['steps'][r.name]:09d}", r.cfg, st.sae, st.opt)
        r.scaled = bool(meta["scaled"][r.name])
        if r.scaled:
            st.begin()
        r.buffer.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{i}.")})
    return int(meta["position"])


@torch.no_grad()
def _modality_stats(stream: _Stream, runs: list[_Run], saes: dict[str, SAE], n_tokens: int,
                    shared_range: tuple[float, float]) -> dict[str, Any]:
    """Per-latent modality statistics of every SAE over the first `n_tokens` tokens of one pass of the data."""
    accs = {r.name: ModalityAccumulator(r.cfg.sae.d_sae) for r in runs}
    sites = _order(stream.vlm, {r.site for r in runs})
    seen = 0
    for c in range(stream.per_epoch):
        acts, mod = stream.read(c, sites)
        if mod is None:
            continue
        keep = min(len(mod), n_tokens - seen)
        for r in runs:
            sae = saes[r.name]
            accs[r.name].add(sae.encode(acts[r.site][:keep].to(sae.device, sae.dtype)), mod[:keep])
        seen += keep
        if seen >= n_tokens:
            break
    return {name: acc.finish(shared_range) for name, acc in accs.items() if seen}
