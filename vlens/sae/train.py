"""Train multimodal SAEs: the paper's recipe as a preset, modern presets through SAE-Lens classes.

    >>> import torch, vlens.sae as vs
    >>> x = torch.randn(2048, 16); mod = torch.arange(2048) % 2
    >>> sae = vs.train((x, mod), preset="paper", d_sae=64, steps=20, batch_size=256, progress=False)
    >>> sae.cfg.d_sae, sae.modality is not None
    (64, True)

Presets (`PRESETS`, override any field by keyword):

- `"paper"`: the paper's multimodal SAE. ReLU, biases both sides (`PaperTrainingSAE`);
  decoder rows Gaussian with norm 0.1, encoder = decoderᵀ, zero biases; loss Σ squared
  error + λ Σ f_i ||W_dec,i|| with λ = 5 warmed up linearly over the first 5% of steps;
  Adam(β 0.9, 0.999), lr 5e-5 constant for 80% of steps then linear decay to 0; gradient
  norm clipped at 1; activations scaled by one constant so their mean norm is √d_model
  (folded into the weights at the end). Trained with a fused sparse step (no autograd).
- `"standard"`: SAE-Lens's `StandardTrainingSAE` (b_dec subtracted from the input,
  Kaiming-uniform init), λ = 1, lr 3e-4, same schedule shape.
- `"topk"`, `"batchtopk"`, `"jumprelu"`: SAE-Lens's training classes, lr 3e-4 with the
  same schedule shape, normalised activations; BatchTopK and JumpReLU end as
  SAE-Lens `jumprelu` inference SAEs, TopK as `topk`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from sae_lens import SAE
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import SAEMetadata, TrainingSAE, TrainStepInput
from tqdm.auto import tqdm

from . import standard as _standard  # registers "vlens_paper"
from .base import IMAGE, TEXT, ModalityStats, _Accumulator, as_multimodal
from .data import IterSource, TensorSource, as_source
from .standard import fused_standard_step

_TRAINING_ARCHS = ("vlens_paper", "standard", "topk", "batchtopk", "jumprelu")


@dataclass
class TrainConfig:
    """Everything that determines a training run (compared field by field on resume).

    Example:
        >>> cfg = TrainConfig.preset("paper", d_in=64, d_sae=512, total_steps=1000)
        >>> cfg.lr, cfg.l1_coefficient, cfg.lr_at(0), round(cfg.lr_at(999), 12), cfg.coefficient_at(0)
        (5e-05, 5.0, 5e-05, 2.5e-07, 0.1)
    """

    architecture: str = "vlens_paper"
    d_in: int = 0
    d_sae: int = 0
    batch_size: int = 4096
    total_steps: int = 0
    lr: float = 5e-5
    lr_warmup_steps: int = 0
    lr_decay_frac: float = 0.2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0
    l1_coefficient: float = 5.0
    coefficient_warmup_frac: float = 0.05
    k: float = 32
    aux_loss_coefficient: float = 1.0 / 32
    l0_coefficient: float = 1.0
    jumprelu_init_threshold: float = 0.01
    jumprelu_bandwidth: float = 0.05
    apply_b_dec_to_input: bool = False
    decoder_init_norm: float = 0.1
    normalize: bool = True
    n_norm_batches: int = 16
    dead_window_tokens: int = 1_000_000
    seed: int = 0
    shuffle: bool = True
    fused: bool = True

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "TrainConfig":
        """A preset by name ('paper', 'standard', 'topk', 'batchtopk', 'jumprelu') with overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
        bad = set(overrides) - {f.name for f in fields(cls)}
        if bad:
            raise TypeError(f"unknown training option(s) {sorted(bad)}; valid: {sorted(f.name for f in fields(cls))}")
        return replace(PRESETS[name], **overrides)

    def lr_at(self, step: int) -> float:
        """Learning rate at `step`: linear warm-up, constant, then linear decay to 0 over the last `lr_decay_frac`."""
        lr = self.lr
        if self.lr_warmup_steps and step < self.lr_warmup_steps:
            lr *= (step + 1) / self.lr_warmup_steps
        decay_steps = int(round(self.lr_decay_frac * self.total_steps))
        start = self.total_steps - decay_steps
        if decay_steps > 0 and step >= start:
            lr *= (self.total_steps - step) / decay_steps
        return lr

    def coefficient_at(self, step: int) -> float:
        """Sparsity coefficient (λ for L1, or the L0 coefficient) at `step`, warmed up linearly from λ/W."""
        final = self.l0_coefficient if self.architecture == "jumprelu" else self.l1_coefficient
        warm = int(round(self.coefficient_warmup_frac * self.total_steps))
        if warm > 0 and step < warm:
            return final * (step + 1) / warm
        return final

    @property
    def uses_fused_step(self) -> bool:
        return self.fused and self.architecture in ("vlens_paper", "standard")


PRESETS: dict[str, TrainConfig] = {
    "paper": TrainConfig(),
    "standard": TrainConfig(architecture="standard", lr=3e-4, l1_coefficient=1.0, apply_b_dec_to_input=True,
                            coefficient_warmup_frac=0.0, normalize=False),
    "topk": TrainConfig(architecture="topk", lr=3e-4, k=32, apply_b_dec_to_input=True, coefficient_warmup_frac=0.0),
    "batchtopk": TrainConfig(architecture="batchtopk", lr=3e-4, k=32, apply_b_dec_to_input=True,
                             coefficient_warmup_frac=0.0),
    "jumprelu": TrainConfig(architecture="jumprelu", lr=3e-4, l0_coefficient=1.0, apply_b_dec_to_input=True),
}


def make_training_sae(cfg: TrainConfig, metadata: dict[str, Any] | None = None) -> TrainingSAE:
    """The SAE-Lens training SAE for `cfg`, initialised deterministically from `cfg.seed`.

    Example:
        >>> sae = make_training_sae(TrainConfig.preset("topk", d_in=8, d_sae=32, k=4))
        >>> type(sae).__name__, sae.cfg.k
        ('TopKTrainingSAE', 4)
    """
    if cfg.architecture not in _TRAINING_ARCHS:
        raise ValueError(f"unknown architecture {cfg.architecture!r}: use one of {_TRAINING_ARCHS}")
    sae_cls, cfg_cls = get_sae_training_class(cfg.architecture)
    names = {f.name for f in fields(cfg_cls)}
    kwargs = {k: v for k, v in asdict(cfg).items() if k in names and k not in ("metadata",)}
    kwargs["d_in"], kwargs["d_sae"] = cfg.d_in, cfg.d_sae
    if "k" in names and cfg.architecture == "topk":
        kwargs["k"] = int(cfg.k)
    sae_cfg = cfg_cls(**kwargs)
    sae_cfg.metadata = SAEMetadata(**(metadata or {}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return sae_cls(sae_cfg)


# ---------------------------------------------------------------------------------------------
# checkpoints


_CKPT_PREFIX = "step_"
_IGNORED_ON_RESUME = ("fused",)


def _latest_checkpoint(directory: Path) -> Path | None:
    if not directory.is_dir():
        return None
    ckpts = sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith(_CKPT_PREFIX)
                   and (p / "trainer.json").exists())
    return ckpts[-1] if ckpts else None


def _config_difference(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    diffs = []
    for key in sorted(set(saved) | set(now)):
        if key in _IGNORED_ON_RESUME:
            continue
        if saved.get(key) != now.get(key):
            diffs.append(f"{key}: checkpoint has {saved.get(key)!r}, this run has {now.get(key)!r}")
    return diffs


@dataclass
class _State:
    step: int = 0
    tokens: int = 0
    scale: float = 1.0
    mix: dict[str, int] = field(default_factory=lambda: {"image": 0, "text": 0, "unknown": 0})
    since_fired: torch.Tensor | None = None  # tokens since each latent last fired


def _save_checkpoint(directory: Path, cfg: TrainConfig, sae: TrainingSAE, opt: torch.optim.Optimizer,
                     state: _State, keep: int = 2) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{_CKPT_PREFIX}{state.step:09d}"
    tmp = directory / f".tmp_{final.name}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().contiguous() for k, v in sae.state_dict().items()}, tmp / "sae_weights.safetensors")
    opt_tensors: dict[str, torch.Tensor] = {}
    for i, st in opt.state_dict()["state"].items():
        for name, value in st.items():
            opt_tensors[f"{i}.{name}"] = torch.as_tensor(value).reshape(-1).contiguous()
    assert state.since_fired is not None
    opt_tensors["since_fired"] = state.since_fired.contiguous()
    save_file(opt_tensors, tmp / "trainer_state.safetensors")
    meta = {"config": asdict(cfg), "step": state.step, "tokens": state.tokens, "scale": state.scale,
            "mix": state.mix, "sae_metadata": sae.cfg.metadata.to_dict()}
    (tmp / "trainer.json").write_text(json.dumps(meta, indent=1, default=str))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    old = sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith(_CKPT_PREFIX))
    for p in old[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def _load_checkpoint(path: Path, cfg: TrainConfig, sae: TrainingSAE, opt: torch.optim.Optimizer) -> _State:
    meta = json.loads((path / "trainer.json").read_text())
    diffs = _config_difference(meta["config"], asdict(cfg))
    if diffs:
        raise ValueError(
            f"refusing to resume from {path}: it was trained with a different configuration:\n  "
            + "\n  ".join(diffs)
            + "\nUse the same settings, resume=False to start over, or another checkpoint_dir."
        )
    sae.load_state_dict(load_file(path / "sae_weights.safetensors"))
    tensors = load_file(path / "trainer_state.safetensors")
    opt_sd = opt.state_dict()
    new_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key == "since_fired":
            continue
        i, name = key.split(".", 1)
        ref = value.reshape(()) if name == "step" else value.reshape(opt.param_groups[0]["params"][int(i)].shape)
        new_state.setdefault(int(i), {})[name] = ref.clone()
    opt_sd["state"] = new_state
    opt.load_state_dict(opt_sd)
    return _State(step=meta["step"], tokens=meta["tokens"], scale=meta["scale"], mix=meta["mix"],
                  since_fired=tensors["since_fired"].clone())


# ---------------------------------------------------------------------------------------------
# training


class NonFiniteActivations(ValueError):
    """Raised when a batch of activations holds NaN or inf."""


def _check_batch(x: torch.Tensor, step: int, d_in: int, rows: torch.Tensor | None = None) -> None:
    """Shape, width and finiteness of one batch; errors name the batch (and the source rows when known)."""
    if x.ndim != 2:
        raise ValueError(f"batch {step} has shape {tuple(x.shape)}: activation batches must be [batch, d_model]")
    if x.shape[1] != d_in:
        raise ValueError(
            f"batch {step} has width {x.shape[1]} but the SAE reads d_in = {d_in}: the SAE width must equal the "
            "model's d_model at this site (check the layer/site, or pass d_in matching your activations)"
        )
    finite = torch.isfinite(x).all(dim=1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()[:5]
        where = f"; rows {rows[bad].tolist()} of the data" if rows is not None else ""
        raise NonFiniteActivations(
            f"batch {step} contains NaN/inf activations (rows {bad.tolist()} of the batch{where}); training stopped. "
            "Check the harvest (e.g. fp16 overflow) or drop those tokens."
        )


def _estimate_scale(source: TensorSource | IterSource, cfg: TrainConfig) -> float:
    norms = []
    if isinstance(source, TensorSource):
        g = torch.Generator().manual_seed(cfg.seed + 7919)
        n = min(source.n, cfg.n_norm_batches * cfg.batch_size)
        idx = torch.randperm(source.n, generator=g)[:n]
        from .data import _rows

        x = _rows(source.x, idx).float() if not hasattr(source, "_gather") else source._gather(idx)  # type: ignore[attr-defined]
        norms.append(x.norm(dim=-1))
    else:
        for x, _ in source.peek(cfg.n_norm_batches):
            norms.append(x.float().norm(dim=-1))
    allnorms = torch.cat(norms)
    allnorms = allnorms[torch.isfinite(allnorms)]
    mean = float(allnorms.mean()) if allnorms.numel() else 0.0
    if not mean > 0:
        raise ValueError("cannot normalise activations whose mean norm is 0: are the activations all zeros?")
    return math.sqrt(cfg.d_in) / mean


def train(
    data: Any,
    preset: str | TrainConfig = "paper",
    *,
    layer: int | None = None,
    d_sae: int | None = None,
    expansion: int | None = None,
    steps: int | None = None,
    n_tokens: int | None = None,
    epochs: float | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = True,
    progress: bool = True,
    log_every: int = 50,
    model_name: str | None = None,
    hook_name: str | None = None,
    stats_tokens: int = 200_000,
    shared_range: tuple[float, float] = (0.2, 0.8),
    device: str = "cpu",
    callback: Callable[[int, dict[str, float]], None] | None = None,
    **overrides: Any,
) -> SAE:
    """Train an SAE on activations and return a vlens multimodal SAE (an SAE-Lens inference SAE).

    Args:
        data: a `[N, d]` tensor, `(tensor, modality)`, an `ActivationStore` (with `layer`),
            a list of stores (concatenated, e.g. image+caption tokens plus a text-only caption
            pass), or any iterable of `[batch, d]` tensors / `(x, modality)` pairs.
        preset: 'paper' (default), 'standard', 'topk', 'batchtopk', 'jumprelu', or a `TrainConfig`.
        d_sae / expansion: dictionary size (default: expansion 8 × d_model).
        steps / n_tokens / epochs: training length (one is needed for iterables; indexable
            sources default to one epoch).
        checkpoint_dir: where periodic checkpoints go (every `checkpoint_every` steps, default
            10 per run, and on Ctrl-C); with `resume=True` a run restarts from the latest one,
            bit-identically for indexable sources. A checkpoint of another configuration is refused.
        model_name / hook_name: recorded in SAE-Lens metadata (`vlm.name`, `vlm.hook_name(site)`).
        stats_tokens: tokens used at the end for the per-latent modality statistics.
        callback: called as `callback(step, metrics)` after every logged step.
        **overrides: any `TrainConfig` field (lr, l1_coefficient, k, batch_size, seed, ...).

    Progress shows loss, L0, explained variance and dead latents; the token mix (image vs
    text tokens seen) is stored in `sae.cfg.metadata.vlens_training["mix"]` and printed.

    Example:
        >>> import torch
        >>> sae = train(torch.randn(1024, 8), "topk", d_sae=32, k=4, steps=5, batch_size=128, progress=False)
        >>> sae.cfg.architecture(), sae.cfg.k
        ('topk', 4)
    """
    source = as_source(data, layer)
    if hook_name is None and hasattr(data, "hook_name") and callable(data.hook_name):
        try:
            hook_name = data.hook_name(layer if layer is not None else list(data.layers)[0])
        except Exception:  # noqa: BLE001 - metadata only
            hook_name = None
    d_in = source.d
    if d_in is None:
        first = source.peek(1)  # type: ignore[union-attr]
        if not first:
            raise ValueError("the activation iterable is empty")
        d_in = int(first[0][0].shape[-1])
    base = preset if isinstance(preset, TrainConfig) else TrainConfig.preset(preset)
    if "d_in" in overrides and overrides["d_in"] != d_in:
        raise ValueError(
            f"d_in={overrides['d_in']} but the activations have width {d_in}: the SAE width must equal d_model"
        )
    overrides.pop("d_in", None)
    bad = set(overrides) - {f.name for f in fields(TrainConfig)}
    if bad:
        raise TypeError(f"unknown training option(s) {sorted(bad)}; valid: {sorted(f.name for f in fields(TrainConfig))}")
    cfg = replace(base, d_in=d_in, **overrides)
    if d_sae is not None:
        cfg = replace(cfg, d_sae=int(d_sae))
    elif not cfg.d_sae:
        cfg = replace(cfg, d_sae=int(d_in * (expansion or 8)))
    if not cfg.total_steps:
        if steps is not None:
            total = int(steps)
        elif n_tokens is not None:
            total = math.ceil(n_tokens / cfg.batch_size)
        elif isinstance(source, TensorSource):
            total = math.ceil((epochs or 1.0) * max(source.n // cfg.batch_size, 1))
        else:
            raise ValueError("training on an iterable needs a length: pass steps=... or n_tokens=...")
        cfg = replace(cfg, total_steps=total)
    if isinstance(source, TensorSource) and source.n < cfg.batch_size:
        cfg = replace(cfg, batch_size=source.n)

    metadata = {"model_name": model_name, "hook_name": hook_name}
    sae = make_training_sae(cfg, {k: v for k, v in metadata.items() if v is not None}).to(device)
    params = [p for p in sae.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), foreach=True)

    ckdir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    state = _State(since_fired=torch.zeros(cfg.d_sae, dtype=torch.long))
    if ckdir is not None and resume and (latest := _latest_checkpoint(ckdir)) is not None:
        state = _load_checkpoint(latest, cfg, sae, opt)
    elif cfg.normalize:
        state.scale = _estimate_scale(source, cfg)
    if isinstance(source, IterSource):
        if state.step and source.reiterable:
            source._pending.clear()
            source.start(skip=state.step)
        elif source._it is None:
            source.start()
    every = checkpoint_every or max(cfg.total_steps // 10, 1)

    named = dict(sae.named_parameters())
    fused = cfg.uses_fused_step
    from .. import distributed

    env = distributed.info()
    ddp = None
    if env.enabled:
        # DistributedDataParallel: each rank takes its slice of every global batch; gradients are
        # averaged by DDP's all-reduce, so training means what it means on one process.
        if not isinstance(source, TensorSource):
            raise ValueError("distributed SAE training needs an indexable source (a tensor or an ActivationStore), "
                             "so every rank can read its own slice of each global batch")
        if cfg.batch_size % env.world_size:
            raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the world size {env.world_size}")
        if cfg.architecture == "batchtopk":
            raise ValueError("batchtopk picks its top-k over the whole batch, so it cannot be split across ranks; "
                             "use 'topk' or 'jumprelu' with torchrun")
        fused = False
        ddp = torch.nn.parallel.DistributedDataParallel(_StepModule(sae))
    bar = tqdm(total=cfg.total_steps, initial=state.step, disable=(not progress) or None,
               desc=f"SAE {cfg.architecture} d_sae={cfg.d_sae}", dynamic_ncols=True)
    metrics: dict[str, float] = {}
    t0 = time.perf_counter()
    sae.train()
    try:
        while state.step < cfg.total_steps:
            step = state.step
            rows = None
            if isinstance(source, TensorSource):
                rows = source.indices(step, cfg.batch_size, cfg.seed, cfg.shuffle)
                if ddp is not None:
                    rows = rows.chunk(env.world_size)[env.rank]
                    x, mod = _fetch(source, rows)
                else:
                    x, mod = source.batch(step, cfg.batch_size, cfg.seed, cfg.shuffle)
            else:
                x, mod = source.next()
            _check_batch(x, step, cfg.d_in, rows)
            x = x.to(device=device, dtype=torch.float32)
            if state.scale != 1.0:
                x = x * state.scale
            coeff = cfg.coefficient_at(step)
            log_now = (step % log_every == 0) or step == cfg.total_steps - 1
            if fused:
                stats, grads = fused_standard_step(named["W_enc"].data, named["b_enc"].data, named["W_dec"].data,
                                                   named["b_dec"].data, x, coeff, cfg.apply_b_dec_to_input)
                for name, g in zip(("W_enc", "b_enc", "W_dec", "b_dec"), grads):
                    named[name].grad = g
                fired = stats.fired
                if log_now:
                    var = (x - x.mean(0)).pow(2).sum()
                    metrics = {"loss": float(stats.mse + stats.l1), "mse": float(stats.mse), "l0": float(stats.l0),
                               "explained_variance": float(1 - stats.sse / var)}
            else:
                dead = state.since_fired > cfg.dead_window_tokens  # type: ignore[operator]
                coeff_name = next(iter(sae.get_coefficients()), None)
                step_in = TrainStepInput(
                    sae_in=x, coefficients={coeff_name: coeff} if coeff_name else {},
                    dead_neuron_mask=dead.to(device), n_training_steps=step, is_logging_step=False)
                out = ddp(step_in) if ddp is not None else sae.training_forward_pass(step_in)
                out.loss.backward()
                fired = (out.feature_acts != 0).any(0)
                if log_now:
                    with torch.no_grad():
                        sse = (out.sae_out - x).pow(2).sum()
                        var = (x - x.mean(0)).pow(2).sum()
                        metrics = {"loss": float(out.loss), "mse": float(out.losses["mse_loss"]),
                                   "l0": float((out.feature_acts != 0).sum(-1).float().mean()),
                                   "explained_variance": float(1 - sse / var)}
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
            lr = cfg.lr_at(step)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
            opt.zero_grad(set_to_none=True)

            n = x.shape[0]
            if ddp is not None:  # every rank keeps the same dead-latent and token counts
                fired = distributed.all_reduce_sum(fired.to(torch.int32)) > 0
                n = cfg.batch_size
                if mod is not None:
                    mod = _gather_all(mod)
            state.since_fired += n  # type: ignore[operator]
            state.since_fired[fired.cpu()] = 0  # type: ignore[index]
            state.tokens += n
            if mod is None:
                state.mix["unknown"] += n
            else:
                k_img = int((mod == IMAGE).sum())
                state.mix["image"] += k_img
                state.mix["text"] += n - k_img
            state.step += 1
            bar.update(1)
            if log_now:
                metrics["dead"] = float(int((state.since_fired > cfg.dead_window_tokens).sum()))  # type: ignore[operator]
                metrics["lr"] = lr
                bar.set_postfix(loss=f"{metrics['loss']:.4g}", L0=f"{metrics['l0']:.1f}",
                                EV=f"{metrics['explained_variance']:.3f}", dead=int(metrics["dead"]), refresh=False)
                if callback is not None:
                    callback(step, dict(metrics))
            if ckdir is not None and state.step % every == 0 and state.step < cfg.total_steps:
                if env.is_main:
                    _save_checkpoint(ckdir, cfg, sae, opt, state)
                distributed.barrier()
    except KeyboardInterrupt:
        if ckdir is not None and env.is_main:
            path = _save_checkpoint(ckdir, cfg, sae, opt, state)
            bar.write(f"interrupted at step {state.step}: checkpoint saved to {path}; call train(...) again to resume")
        bar.close()
        raise
    finally:
        if isinstance(source, IterSource):
            source.close()
    bar.close()
    elapsed = time.perf_counter() - t0
    if ckdir is not None:
        if env.is_main:
            _save_checkpoint(ckdir, cfg, sae, opt, state)
        distributed.barrier()

    return _finish(sae, cfg, state, source, metrics, elapsed, stats_tokens, shared_range, device, progress)


class _StepModule(torch.nn.Module):
    """A training SAE whose `forward` is its training step, so DistributedDataParallel can wrap it."""

    def __init__(self, sae: TrainingSAE) -> None:
        super().__init__()
        self.sae = sae

    def forward(self, step_input: TrainStepInput):  # type: ignore[override]
        return self.sae.training_forward_pass(step_input)


def _fetch(source: TensorSource, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows `rows` of an indexable source, as float, with their modality."""
    from .data import ConcatSource, _rows

    x = source._gather(rows) if isinstance(source, ConcatSource) else _rows(source.x, rows).float()
    return x, None if source.modality is None else source.modality[rows]


def _gather_all(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-sized tensors of every rank (for token-mix bookkeeping)."""
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _finish(sae: TrainingSAE, cfg: TrainConfig, state: _State, source: Any, metrics: dict[str, float],
            elapsed: float, stats_tokens: int, shared_range: tuple[float, float], device: str, progress: bool) -> SAE:
    """Fold the activation scale into the weights and convert to the vlens inference class."""
    sae.eval()
    with torch.no_grad():
        if state.scale != 1.0:
            sae.fold_activation_norm_scaling_factor(state.scale)
        state_dict = {k: v.detach().clone() for k, v in sae.state_dict().items()}
        sae.process_state_dict_for_saving_inference(state_dict)
        inf_cfg = sae.cfg.get_inference_sae_cfg_dict()
    n_mod = state.mix["image"] + state.mix["text"]
    mix = dict(state.mix)
    mix["image_fraction"] = state.mix["image"] / n_mod if n_mod else None
    inf_cfg["metadata"]["vlens_training"] = {
        "config": asdict(cfg), "tokens": state.tokens, "steps": state.step, "activation_scale": state.scale,
        "mix": mix, "final_metrics": metrics, "seconds": round(elapsed, 3),
    }
    inf = SAE.from_dict(inf_cfg)
    inf.load_state_dict(state_dict)
    inf = as_multimodal(inf.to(device))
    if n_mod and progress:
        tqdm.write(f"token mix: {state.mix['image']} image / {state.mix['text']} text tokens "
                   f"(image fraction {mix['image_fraction']:.3f})")
    if n_mod and stats_tokens:
        inf.modality = modality_stats_from_source(inf, source, stats_tokens, shared_range, cfg.batch_size)  # type: ignore[attr-defined]
    return inf


@torch.no_grad()
def modality_stats_from_source(sae: SAE, source: Any, n_tokens: int = 200_000,
                               shared_range: tuple[float, float] = (0.2, 0.8),
                               batch_size: int = 4096) -> ModalityStats | None:
    """Per-latent `ModalityStats` of `sae` over up to `n_tokens` tokens of `source` (None without modality labels).

    Example:
        >>> import torch, vlens.sae as vs
        >>> sae = vs.train(torch.randn(512, 8), "topk", d_sae=16, k=2, steps=2, batch_size=128, progress=False)
        >>> st = modality_stats_from_source(sae, (torch.randn(100, 8), torch.arange(100) % 2))
        >>> st.n_image, st.n_text
        (50, 50)
    """
    source = as_source(source)
    acc = _Accumulator(sae.cfg.d_sae)
    seen = 0
    for x, mod in source.sequential(batch_size, n_tokens):
        if mod is None:
            return None
        acc.add(sae.encode(x.to(sae.device, sae.dtype)), mod)
        seen += x.shape[0]
        if seen >= n_tokens:
            break
    if seen == 0:
        return None
    return acc.finish(shared_range)


def main(argv: list[str] | None = None) -> int:
    """`vlens train-sae`: train an SAE on one layer of a harvest store and export it in SAE-Lens format.

    Runs on one process, or on many under `torchrun --nproc-per-node N -m vlens train-sae ...`
    (DistributedDataParallel: each rank reads its slice of every global batch).

    Example:
        >>> main(["--help"])  # doctest: +SKIP
    """
    import argparse

    from .. import distributed
    from ..harvest import ActivationStore
    from .export import export

    p = argparse.ArgumentParser(prog="vlens train-sae", description=main.__doc__.split("\n")[0])
    p.add_argument("--store", required=True, help="a harvest directory (vlens harvest ... --out DIR)")
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--k", type=int, default=None, help="active latents (topk / batchtopk)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="global batch (split across ranks)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--checkpoint-dir", default=None, help="periodic checkpoints; rerun to resume")
    p.add_argument("--out", required=True, help="export directory (SAE-Lens format)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    a = p.parse_args(argv)

    env = distributed.init()
    device = f"cuda:{env.local_rank}" if a.device == "cuda" and env.enabled else a.device
    store = ActivationStore(a.store)
    overrides = {k: v for k, v in dict(k=a.k, batch_size=a.batch_size, lr=a.lr, seed=a.seed).items() if v is not None}
    sae = train(store, a.preset, layer=a.layer, expansion=a.expansion, steps=a.steps, checkpoint_dir=a.checkpoint_dir,
                progress=env.is_main, model_name=store.config.get("model"), device=device, **overrides)
    if env.is_main:
        path = export(sae, a.out, model_name=store.config.get("model"), hook_name=store.hook_name(a.layer))
        print(f"SAE exported to {path}")
    distributed.cleanup()
    return 0
