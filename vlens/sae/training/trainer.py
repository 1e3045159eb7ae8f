"""The training loop: batches by step number, the fused sparse step or SAE-Lens's training pass, DDP, checkpoints.

What vlens takes from SAE-Lens: the training SAE classes and their losses
(`training_forward_pass`), the coefficient names (`get_coefficients`), the activation
scaler (`ActivationScaler.scale`), folding the scale into the weights
(`fold_activation_norm_scaling_factor`) and the conversion to an inference SAE
(`process_state_dict_for_saving_inference`, `get_inference_sae_cfg_dict`).

What it keeps, and why:

- one training step, written once (`Stepper`: check and scale the batch, fused step or
  SAE-Lens's training pass, clip, scheduled lr, Adam, dead-latent and token-mix counts),
  driven by `train` here and by `vlens.sae.train_many` (several SAEs from one streaming pass);
- the loop itself, not `SAETrainer`: batch i of an indexable source is a function of
  (seed, i) (`vlens.sae.sources.TensorSource`), so a resumed run is bit-identical; rows are
  split across ranks under DDP; the image/text token mix and the per-latent modality
  statistics are counted on the way; errors name the batch and the source rows;
- the fused sparse steps (`vlens.sae.fused` picks them): the standard / paper SAE
  (`vlens.sae.standard`: the paper's code loss, decoder norms detached in the penalty, or
  SAE-Lens's `StandardTrainingSAE` loss; faster once few latents fire) and TopK while k ≤ d_sae/16 (`vlens.sae.topk`,
  SAE-Lens's `TopKTrainingSAE` loss with AuxK, no dense latent matrix in the backward), both
  with gradients checked against autograd in the tests;
- the scale estimate (`estimate_scale`): SAE-Lens's `ActivationScaler.estimate_scaling_factor`
  averages norms in float64 over consecutive batches, vlens averages float32 norms of
  randomly drawn rows (NaN rows skipped), so the factors differ in the last bits and the
  trained weights would too; `scale_mode="running"` instead refreshes the factor at each
  chunk from every row read so far (`Stepper.observe`: the paper's drifting factor);
- the schedules (see `vlens.sae.training.config`).
"""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from jaxtyping import Float, Int
from sae_lens import SAE
from sae_lens.saes.sae import TrainingSAE, TrainStepInput
from sae_lens.training.activation_scaler import ActivationScaler
from tqdm.auto import tqdm

from ... import distributed
from ..._durable import deferred_interrupt
from ...errors import InputError, NonFiniteActivations
from ...roles import IMAGE
from ..sources import IterSource, TensorSource, as_source
from ..modality import DEFAULT_SHARED, as_multimodal, firing_density, modality_stats_from_source
from ..fused import fused_step
from ..transcoder import TranscoderStepInput
from .resume import TrainState, remove_leftovers, resume as resume_from, save_checkpoint
from .config import PRESETS, TrainConfig, make_training_sae


def _check_batch(x: torch.Tensor, step: int, d_in: int, rows: torch.Tensor | None = None) -> None:
    """Shape, width and finiteness of one batch; errors name the batch (and the source rows when known)."""
    if x.ndim != 2:
        raise InputError(f"batch {step} has shape {tuple(x.shape)}: activation batches must be [batch, d_model]")
    if x.shape[1] != d_in:
        raise InputError(
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


def _fetch(source: TensorSource, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows `rows` of an indexable source, as float, with their modality."""
    x = source.rows(rows)
    return x, None if source.modality is None else source.modality[rows]


def estimate_scale(source: TensorSource | IterSource, cfg: TrainConfig) -> float:
    """The factor that makes the mean activation norm √d_in (see the module docstring for why it is vlens's own).

    A seam of the training loop beside `Stepper`: `train` and `train_many` both call it.

    Example:
        >>> from vlens.sae.sources import TensorSource
        >>> cfg = TrainConfig.preset("topk", d_in=4, d_sae=8, k=2, batch_size=8)
        >>> estimate_scale(TensorSource(torch.full((16, 4), 3.0)), cfg)
        0.3333333333333333
    """
    t = cfg.trainer
    norms = []
    if isinstance(source, TensorSource):
        g = torch.Generator().manual_seed(t.seed + 7919)
        n = min(source.n, t.n_norm_batches * t.batch_size)
        idx = torch.randperm(source.n, generator=g)[:n]
        norms.append(_fetch(source, idx)[0].norm(dim=-1))
    else:
        for x, _ in source.peek(t.n_norm_batches):
            norms.append(x.float().norm(dim=-1))
    allnorms = torch.cat(norms)
    finite = allnorms[torch.isfinite(allnorms)]
    if allnorms.numel() and not finite.numel():
        raise NonFiniteActivations(
            f"all {allnorms.numel()} activation rows sampled to estimate the scale hold NaN/inf: the data is not "
            "usable; check the harvest (e.g. fp16 overflow) or the tensor you passed")
    mean = float(finite.mean()) if finite.numel() else 0.0
    if not mean > 0:
        raise InputError("cannot normalise activations whose mean norm is 0: are the activations all zeros?")
    return math.sqrt(cfg.sae.d_in) / mean


def resolve_config(source: Any, preset: str | TrainConfig, d_sae: int | None, expansion: int | None,
                    steps: int | None, n_tokens: int | None, epochs: float | None, overrides: dict[str, Any]) -> TrainConfig:
    """The run's `TrainConfig`: preset + overrides, d_in from the data, length from steps / tokens / epochs.

    `source` is an activation source or, for a stream of known width
    (`train_many`), that width as an int. A seam beside `Stepper`.

    Example:
        >>> cfg = resolve_config(64, "topk", None, 4, 100, None, None, {"k": 8})
        >>> cfg.sae.d_sae, cfg.trainer.total_steps, cfg.sae.k
        (256, 100, 8)
    """
    for name, v, low in (("steps", steps, 1), ("n_tokens", n_tokens, 1), ("d_sae", d_sae, 1),
                         ("expansion", expansion, 1)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < low):
            raise InputError(f"{name} must be an int >= {low}, not {v!r}")
    if epochs is not None and (not isinstance(epochs, (int, float)) or isinstance(epochs, bool) or not 0 < epochs < 1e9):
        raise InputError(f"epochs must be a number > 0, not {epochs!r}")
    d_in = source if isinstance(source, int) else source.d
    if d_in is None:
        first = source.peek(1)
        if not first:
            raise InputError("the activation iterable is empty: nothing to train on")
        d_in = int(first[0][0].shape[-1]) if first[0][0].ndim else 0
    elif isinstance(source, TensorSource) and source.n == 0:
        raise InputError("no activations to train on: the data has 0 rows (an empty harvest? check the store's "
                         "token selection and that it is complete)")
    base = preset if isinstance(preset, TrainConfig) else TrainConfig.preset(preset)
    if "d_in" in overrides and overrides["d_in"] != d_in:
        raise InputError(
            f"d_in={overrides['d_in']} but the activations have width {d_in}: the SAE width must equal d_model"
        )
    overrides.pop("d_in", None)
    cfg = base.replace(d_in=d_in, **overrides)
    if d_sae is not None:
        cfg = cfg.replace(d_sae=int(d_sae))
    elif not cfg.sae.d_sae:
        cfg = cfg.replace(d_sae=int(d_in * (expansion or 8)))
    t = cfg.trainer
    if not isinstance(t.batch_size, int) or isinstance(t.batch_size, bool) or t.batch_size < 1:
        raise InputError(f"batch_size must be an int >= 1 (rows per step), not {t.batch_size!r}")
    if not t.total_steps:
        if steps is not None:
            total = int(steps)
        elif n_tokens is not None:
            total = math.ceil(n_tokens / t.batch_size)
        elif isinstance(source, TensorSource):
            total = math.ceil((epochs or 1.0) * max(source.n // t.batch_size, 1))
        else:
            raise InputError("training on an iterable needs a length: pass steps=... or n_tokens=...")
        cfg = cfg.replace(total_steps=total)
    if isinstance(source, TensorSource) and source.n < cfg.trainer.batch_size:
        cfg = cfg.replace(batch_size=source.n)
    return cfg.check()


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
    shared_range: tuple[float, float] = DEFAULT_SHARED,
    device: str = "cpu",
    callback: Callable[[int, dict[str, float]], None] | None = None,
    **overrides: Any,
) -> SAE:
    """Train an SAE on activations and return an SAE-Lens inference SAE with `sae.modality` attached.

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
        model_name / hook_name: recorded in SAE-Lens metadata (`vlm.name`, `vlm.hook_name(site)`); a store gives both.
        stats_tokens: tokens used at the end for the per-latent modality statistics.
        callback: called as `callback(step, metrics)` after every logged step.
        **overrides: any field of `ArchitectureConfig` / `TrainerConfig` (lr, l1_coefficient, k, batch_size, seed, ...).

    Progress shows loss, L0, explained variance and dead latents; the token mix (image vs
    text tokens seen) is stored in `sae.cfg.metadata.vlens_training["mix"]` and printed.

    Example:
        >>> import torch
        >>> sae = train(torch.randn(1024, 8), "topk", d_sae=32, k=4, steps=5, batch_size=128, progress=False)
        >>> sae.cfg.architecture(), sae.cfg.k
        ('topk', 4)
    """
    if isinstance(data, (str, bytes, dict)) or data is None:
        raise InputError(f"cannot train on {type(data).__name__}: pass a [n, d] tensor, (tensor, modality), an "
                         "ActivationStore (vlens.activations.ActivationStore(path)), a list of stores, or an "
                         "iterable of [batch, d] tensors")
    source = as_source(data, layer)
    if hook_name is None and hasattr(data, "hook_name") and callable(data.hook_name):
        try:
            hook_name = data.hook_name(layer if layer is not None else list(data.layers)[0])
        except Exception:  # noqa: BLE001 - metadata only
            hook_name = None
    if model_name is None and isinstance(getattr(data, "config", None), dict):
        model_name = data.config.get("model")  # a harvest store records its model
    cfg = resolve_config(source, preset, d_sae, expansion, steps, n_tokens, epochs, overrides)
    if cfg.sae.transcoder:
        raise InputError("a transcoder trains on (input, target) pairs from the model: use vlens.sae.train_many with "
                         "specs that name a target site (vlens.sae.transcoder_specs(vlm, 'topk'))")
    arch, t = cfg.sae, cfg.trainer
    for name, v in (("checkpoint_every", checkpoint_every), ("log_every", log_every)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise InputError(f"{name} must be an int >= 1, not {v!r}")

    metadata = {"model_name": model_name, "hook_name": hook_name}
    stepper = Stepper(cfg, metadata, device=device, log_every=log_every)
    sae, opt = stepper.sae, stepper.opt

    ckdir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    env = distributed.info()
    if ckdir is not None and env.is_main:
        remove_leftovers(ckdir)  # what a kill during a checkpoint write left
    restored = resume_from(ckdir, cfg, sae, opt) if ckdir is not None and resume else None
    if restored is not None:
        stepper.state = restored
    elif t.normalize and t.scale_mode == "fixed":
        stepper.state.scale = estimate_scale(source, cfg)
    state = stepper.state
    if isinstance(source, IterSource):
        source.begin(skip=state.step)
    every = checkpoint_every or max(t.total_steps // 10, 1)

    if env.enabled:
        _distribute(stepper, source, env)
    bar = tqdm(total=t.total_steps, initial=state.step, disable=(not progress) or None,
               desc=f"SAE {arch.architecture} d_sae={arch.d_sae}", dynamic_ncols=True)
    t0 = time.perf_counter()
    stepper.begin()
    pending: list = []  # scale_mode="running": the rest of the chunk, read ahead
    try:
        while state.step < t.total_steps:
            step = state.step
            x, mod, rows = _take_batch(source, stepper, step, env, pending)
            logged = stepper.step(x, mod, rows)
            bar.update(1)
            if logged is not None:
                bar.set_postfix(loss=f"{logged['loss']:.4g}", L0=f"{logged['l0']:.1f}",
                                EV=f"{logged['explained_variance']:.3f}", dead=int(logged["dead"]), refresh=False)
                if callback is not None:
                    callback(step, dict(logged))
            if ckdir is not None and state.step % every == 0 and state.step < t.total_steps:
                if env.is_main:
                    save_checkpoint(ckdir, cfg, sae, opt, state)
                distributed.barrier()
    except KeyboardInterrupt:
        if ckdir is not None and env.is_main:
            path = save_checkpoint(ckdir, cfg, sae, opt, state)
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
            save_checkpoint(ckdir, cfg, sae, opt, state)
        distributed.barrier()

    metrics = stepper.metrics
    return finish(sae, cfg, state, source, metrics, elapsed, stats_tokens, shared_range, device, progress)


def _distribute(stepper: "Stepper", source: Any, env: Any) -> None:
    """DistributedDataParallel: each rank takes its slice of every global batch; gradients are averaged by DDP's
    all-reduce, so training means what it means on one process."""
    t, arch = stepper.cfg.trainer, stepper.cfg.sae
    if not isinstance(source, TensorSource):
        raise InputError("distributed SAE training needs an indexable source (a tensor or an ActivationStore), "
                         "so every rank can read its own slice of each global batch")
    if t.batch_size % env.world_size:
        raise InputError(f"batch_size {t.batch_size} must be divisible by the world size {env.world_size}")
    if arch.architecture == "batchtopk":
        raise InputError("batchtopk picks its top-k over the whole batch, so it cannot be split across ranks; "
                         "use 'topk' or 'jumprelu' with torchrun")
    if t.scale_mode == "running":
        raise InputError("scale_mode='running' reads each rank's rows only, so the ranks' factors would differ; "
                         "use scale_mode='fixed' with torchrun")
    stepper.distribute()


def _next_batch(source: Any, stepper: "Stepper", step: int, env: Any) -> tuple[torch.Tensor, Any, Any]:
    """Batch `step` of the source (under DDP: this rank's slice of it), its modality and its source rows."""
    t = stepper.cfg.trainer
    if not isinstance(source, TensorSource):
        x, mod = source.next()
        return x, mod, None
    rows = source.indices(step, t.batch_size, t.seed, t.shuffle)
    if stepper.ddp is None:
        x, mod = source.batch(step, t.batch_size, t.seed, t.shuffle)
        return x, mod, rows
    rows = rows.chunk(env.world_size)[env.rank]
    x, mod = _fetch(source, rows)
    return x, mod, rows


def _take_batch(source: Any, stepper: "Stepper", step: int, env: Any, pending: list) -> tuple[torch.Tensor, Any, Any]:
    """Batch `step`; with scale_mode="running", its chunk's batches are read ahead and their norms counted first."""
    t = stepper.cfg.trainer
    if t.scale_mode != "running":
        return _next_batch(source, stepper, step, env)
    if not pending:
        n = max(t.steps_per_chunk, 1)
        end = min((step // n + 1) * n, t.total_steps)
        pending.extend(_next_batch(source, stepper, s, env) for s in range(step, end))
        if step % n == 0:  # a run resumed inside a chunk has counted that chunk already
            stepper.observe([x for x, _, _ in pending])
    return pending.pop(0)


class Stepper:
    """One SAE's training step, written once: `train` and `train_many` both drive it.

    Holds the training SAE (`make_training_sae(cfg)`), its Adam optimiser and its
    `TrainState`; `step(x, mod)` checks and scales one batch, takes the fused sparse step or
    SAE-Lens's training pass, clips, applies the scheduled lr, and updates the dead-latent
    window, token count and image/text mix. It returns the metrics on a logging step (every
    `log_every` steps and the last), else None; the last ones stay in `.metrics`.

    Example:
        >>> import torch
        >>> from vlens.sae.training import TrainConfig
        >>> s = Stepper(TrainConfig.preset("topk", d_in=8, d_sae=32, k=4, total_steps=3, batch_size=16))
        >>> s.begin(); logged = [s.step(torch.randn(16, 8)) for _ in range(3)]
        >>> s.state.step, s.state.tokens, [m is not None for m in logged]
        (3, 48, [True, False, True])
    """

    def __init__(self, cfg: TrainConfig, metadata: dict[str, Any] | None = None, *, device: str = "cpu",
                 log_every: int = 50) -> None:
        t = cfg.trainer
        self.cfg, self.device, self.log_every = cfg, device, log_every
        self.sae = make_training_sae(cfg, {k: v for k, v in (metadata or {}).items() if v is not None}).to(device)
        self.params = list(self.sae.parameters())
        self.opt = torch.optim.Adam(self.params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), foreach=True)
        self.state = TrainState(since_fired=torch.zeros(cfg.sae.d_sae, dtype=torch.long))
        self.named = dict(self.sae.named_parameters())
        self.fused = cfg.uses_fused_step
        self.ddp: torch.nn.parallel.DistributedDataParallel | None = None
        self.metrics: dict[str, float] = {}
        self._scaler: ActivationScaler | None = None

    def distribute(self) -> None:
        """Wrap the SAE in DistributedDataParallel (SAE-Lens's training pass; the fused step is single-process)."""
        self.fused = False
        self.ddp = torch.nn.parallel.DistributedDataParallel(_StepModule(self.sae))

    def begin(self) -> None:
        """Fix the activation scale (`state.scale`, estimated or restored) and put the SAE in training mode."""
        self._scaler = ActivationScaler(self.state.scale if self.state.scale != 1.0 else None)
        self.sae.train()

    def observe(self, xs: list[torch.Tensor]) -> None:
        """scale_mode="running": add the rows `xs` to the running mean norm; the factor becomes √d_in / that mean."""
        for x in xs:
            norms = x.float().norm(dim=-1)
            self.state.norm_sum += float(norms.sum())
            self.state.norm_count += norms.numel()
        if self.state.norm_count and self.state.norm_sum > 0:
            self.state.scale = math.sqrt(self.cfg.sae.d_in) / (self.state.norm_sum / self.state.norm_count)
            if self._scaler is not None:
                self._scaler.scaling_factor = self.state.scale

    def step(self, x: Float[torch.Tensor, "batch d_in"], mod: Int[torch.Tensor, " batch"] | None = None,
             rows: torch.Tensor | None = None,
             target: Float[torch.Tensor, "batch d_out"] | None = None) -> dict[str, float] | None:
        """Train on one batch `x` (raw activations; `mod` their modality codes, `rows` their source rows for errors).

        A transcoder (`cfg.sae.transcoder`) also takes `target`, the rows it predicts (scaled
        by the same factor as `x`, so SAE-Lens's fold of the scale stays exact).
        """
        cfg, t, arch, state = self.cfg, self.cfg.trainer, self.cfg.sae, self.state
        if self._scaler is None:
            self.begin()
        step = state.step
        _check_batch(x, step, arch.d_in, rows)
        x = self._scaler.scale(x.to(device=self.device, dtype=torch.float32))  # type: ignore[union-attr]
        if arch.transcoder:
            if target is None:
                raise InputError("a transcoder trains on (input, target) pairs: pass target= (its output rows)")
            _check_batch(target, step, arch.d_out or arch.d_in, rows)
            target = self._scaler.scale(target.to(device=self.device, dtype=torch.float32))  # type: ignore[union-attr]
        ref = x if target is None else target  # what the output reconstructs
        coeff = cfg.coefficient_at(step)
        log_now = (step % self.log_every == 0) or step == t.total_steps - 1
        metrics: dict[str, float] = {}
        if self.fused:
            named = self.named
            dead = state.since_fired > t.dead_window_tokens  # type: ignore[operator]  (TopK's AuxK loss)
            stats, grads = fused_step(self.sae, x, coeff, dead.to(self.device), target)  # vlens.sae.fused
            for name, g in zip(("W_enc", "b_enc", "W_dec", "b_dec", "W_skip"), grads):
                named[name].grad = g
            fired = stats.fired
            if log_now:
                var = (ref - ref.mean(0)).pow(2).sum()
                metrics = {"loss": float(stats.mse + stats.l1), "mse": float(stats.mse), "l0": float(stats.l0),
                           "explained_variance": float(1 - stats.sse / var)}
        else:
            dead = state.since_fired > t.dead_window_tokens  # type: ignore[operator]
            coeff_name = next(iter(self.sae.get_coefficients()), None)
            step_in = (TrainStepInput if target is None else partial(TranscoderStepInput, target=target))(
                sae_in=x, coefficients={coeff_name: coeff} if coeff_name else {},
                dead_neuron_mask=dead.to(self.device), n_training_steps=step, is_logging_step=False)
            out = self.ddp(step_in) if self.ddp is not None else self.sae.training_forward_pass(step_in)
            out.loss.backward()
            fired = (out.feature_acts != 0).any(0)
            if log_now:
                with torch.no_grad():
                    sse = (out.sae_out - ref).pow(2).sum()
                    var = (ref - ref.mean(0)).pow(2).sum()
                    metrics = {"loss": float(out.loss), "mse": float(out.losses["mse_loss"]),
                               "l0": float((out.feature_acts != 0).sum(-1).float().mean()),
                               "explained_variance": float(1 - sse / var)}
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, t.grad_clip, foreach=True)
        lr = t.lr_at(step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        with deferred_interrupt():  # the weights and the step counter move together, or a resume repeats a step
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self._account(x.shape[0], fired, mod)
        if not log_now:
            return None
        metrics["dead"] = float(int((state.since_fired > t.dead_window_tokens).sum()))  # type: ignore[operator]
        metrics["lr"] = lr
        self.metrics = metrics
        return metrics

    def _account(self, n: int, fired: torch.Tensor, mod: torch.Tensor | None) -> None:
        """After an optimiser step: dead-latent counters, tokens seen, the image/text mix, the step counter."""
        t, state = self.cfg.trainer, self.state
        if self.ddp is not None:  # every rank keeps the same dead-latent and token counts
            fired = distributed.all_reduce_sum(fired.to(torch.int32)) > 0
            n = t.batch_size
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


class _StepModule(torch.nn.Module):
    """A training SAE whose `forward` is its training step, so DistributedDataParallel can wrap it."""

    def __init__(self, sae: TrainingSAE) -> None:
        super().__init__()
        self.sae = sae

    def forward(self, step_input: TrainStepInput):  # type: ignore[override]
        return self.sae.training_forward_pass(step_input)


def _gather_all(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-sized tensors of every rank (for token-mix bookkeeping)."""
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def finish(sae: TrainingSAE, cfg: TrainConfig, state: TrainState, source: Any, metrics: dict[str, float],
            elapsed: float, stats_tokens: int, shared_range: tuple[float, float], device: str, progress: bool) -> SAE:
    """Fold the activation scale into the weights, build the SAE-Lens inference SAE, attach modality statistics.

    The end of a run, a seam beside `Stepper` (`train` and `train_many` call it);
    `source` None (a stream) attaches no statistics here.

    Example:
        >>> s = Stepper(TrainConfig.preset("topk", d_in=8, d_sae=32, k=4, total_steps=1, batch_size=16))
        >>> s.begin()
        >>> _ = s.step(torch.randn(16, 8), None)
        >>> sae = finish(s.sae, s.cfg, s.state, None, s.metrics, 0.0, 0, (0.1, 0.9), "cpu", False)
        >>> type(sae).__name__, sae.cfg.metadata.vlens_training["steps"]
        ('TopKSAE', 1)
    """
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
        "config": cfg.to_dict(), "loss": cfg.loss, "tokens": state.tokens, "steps": state.step, "activation_scale": state.scale,
        "mix": mix, "final_metrics": metrics, "seconds": round(elapsed, 3),
    }
    inf = SAE.from_dict(inf_cfg)
    inf.load_state_dict(state_dict)
    inf = as_multimodal(inf.to(device))
    if n_mod and progress:
        hook = inf.cfg.metadata.hook_name
        where = f" at {hook}" if hook else ""
        tqdm.write(f"token mix{where}: {state.mix['image']} image / {state.mix['text']} text tokens "
                   f"(image fraction {mix['image_fraction']:.3f})")
    if n_mod and stats_tokens:
        stats = modality_stats_from_source(inf, source, stats_tokens, shared_range, cfg.trainer.batch_size)
        as_multimodal(inf, stats)
    elif stats_tokens:  # no modality labels: still the firing density that sparsity.safetensors carries
        as_multimodal(inf, density=firing_density(inf, source, stats_tokens, cfg.trainer.batch_size))
    return inf
