"""Training checkpoints: atomic `step_NNNNNNNNN/` folders that make a resumed run bit-identical.

A checkpoint folder holds

- `sae_weights.safetensors`: the training SAE's state dict (activation scale not folded);
- `trainer_state.safetensors`: Adam's moments and step per parameter (`"{i}.{name}"`), and
  `since_fired` (tokens since each latent last fired: the dead-latent window);
- `trainer.json`: the flat configuration (`TrainConfig.to_dict()`), step, tokens seen,
  activation scale, token mix and the SAE-Lens metadata.

Why not SAE-Lens's trainer checkpoints: vlens's loop (fused sparse step, DDP, modality
bookkeeping) is its own, and exact resumption needs its data position, dead-latent
window and scale, which SAE-Lens's `SAETrainer.save_checkpoint` does not hold. The
format is vlens 0.1's, plus (since 0.2) the CRC-32 of both safetensors files and a
checksum of `trainer.json` itself, so a damaged checkpoint is told from a good one.

Crash safety: a checkpoint is written into `.tmp_step_NNNNNNNNN_PID/`, every file and the
folder fsynced, then renamed to `step_NNNNNNNNN/` and the parent fsynced; the newest
`keep` (2) are kept. A kill mid-write leaves only the temporary folder, which the next run
removes (`remove_leftovers`). Resuming takes the newest checkpoint that is intact and falls
back to the one before when the newest is damaged (`resume`), with a warning naming why.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from sae_lens.saes.sae import TrainingSAE

from ..._durable import file_crc32, fsync_dir, fsync_file, json_checksum
from ...errors import InputError
from .config import ADDED_LATER, LEGACY_LOSS, TrainConfig

PREFIX = "step_"
_STEP = re.compile(r"^step_\d{9}$")
_LEFTOVER = re.compile(r"^\.(tmp|old)_step_\d{9}_\d+$")
_FILES = ("sae_weights.safetensors", "trainer_state.safetensors")


class _Damaged(InputError):
    """A checkpoint folder that cannot be read back (missing, truncated or altered files)."""
_IGNORED_ON_RESUME = ("fused",)


@dataclass
class TrainState:
    """Where a run stands: steps and tokens done, activation scale, token mix, tokens since each latent fired."""

    step: int = 0
    tokens: int = 0
    scale: float = 1.0
    mix: dict[str, int] = field(default_factory=lambda: {"image": 0, "text": 0, "unknown": 0})
    since_fired: torch.Tensor | None = None
    #: scale_mode="running": the sum and count of the row norms read so far.
    norm_sum: float = 0.0
    norm_count: int = 0


def checkpoints(directory: Path) -> list[Path]:
    """The checkpoint folders (`step_NNNNNNNNN`) under `directory`, oldest first.

    Example:
        >>> import tempfile
        >>> checkpoints(Path(tempfile.mkdtemp()))
        []
    """
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and _STEP.match(p.name))


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest checkpoint folder under `directory` that holds a `trainer.json`, or None.

    Example:
        >>> import tempfile
        >>> latest_checkpoint(Path(tempfile.mkdtemp())) is None
        True
    """
    ckpts = [p for p in checkpoints(directory) if (p / "trainer.json").exists()]
    return ckpts[-1] if ckpts else None


def remove_leftovers(directory: Path) -> list[str]:
    """Remove what an interrupted checkpoint write left (`.tmp_step_*`, `.old_step_*` folders); return their names.

    Only those names, which vlens alone writes, are ever removed.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); (d / ".tmp_step_000000010_123").mkdir(); (d / "mine").mkdir()
        >>> remove_leftovers(d), sorted(p.name for p in d.iterdir())
        (['.tmp_step_000000010_123'], ['mine'])
    """
    if not directory.is_dir():
        return []
    gone = sorted(p.name for p in directory.iterdir() if p.is_dir() and _LEFTOVER.match(p.name))
    for name in gone:
        shutil.rmtree(directory / name, ignore_errors=True)
    return gone


def config_difference(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The fields two flat configurations disagree on (`fused` ignored: it does not change the result).

    Example:
        >>> config_difference({"lr": 5e-05, "fused": True}, {"lr": 0.001, "fused": False})
        ['lr: checkpoint has 5e-05, this run has 0.001']
    """
    diffs = []
    for key in sorted(set(saved) | set(now)):
        if key in _IGNORED_ON_RESUME:
            continue
        if saved.get(key) != now.get(key):
            diffs.append(f"{key}: checkpoint has {saved.get(key)!r}, this run has {now.get(key)!r}")
    return diffs


def save_checkpoint(directory: Path, cfg: TrainConfig, sae: TrainingSAE, opt: torch.optim.Optimizer,
                    state: TrainState, keep: int = 2) -> Path:
    """Write a checkpoint atomically (temporary folder, fsync, rename) and keep the newest `keep` (see `load_checkpoint`).

    Example:
        >>> import tempfile
        >>> from vlens.sae.training import TrainConfig, make_training_sae
        >>> cfg = TrainConfig.preset("paper", d_in=4, d_sae=8, total_steps=10)
        >>> sae = make_training_sae(cfg); opt = torch.optim.Adam(sae.parameters())
        >>> save_checkpoint(Path(tempfile.mkdtemp()), cfg, sae, opt, TrainState(step=5)).name
        'step_000000005'
    """
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{PREFIX}{state.step:09d}"
    tmp = directory / f".tmp_{final.name}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file({k: v.detach().contiguous() for k, v in sae.state_dict().items()}, tmp / _FILES[0])
        opt_tensors: dict[str, torch.Tensor] = {}
        for i, st in opt.state_dict()["state"].items():
            for name, value in st.items():
                opt_tensors[f"{i}.{name}"] = torch.as_tensor(value).reshape(-1).contiguous()
        if state.since_fired is not None:
            opt_tensors["since_fired"] = state.since_fired.contiguous()
        save_file(opt_tensors, tmp / _FILES[1])
        meta = {"config": cfg.to_dict(), "step": state.step, "tokens": state.tokens, "scale": state.scale,
                "norm_sum": state.norm_sum, "norm_count": state.norm_count,
                "mix": state.mix, "sae_metadata": sae.cfg.metadata.to_dict(),
                "files": {name: file_crc32(tmp / name) for name in _FILES}}
        meta = json.loads(json.dumps(meta, default=str))
        meta["checksum"] = json_checksum(meta)
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=1))
        for name in (*_FILES, "trainer.json"):
            fsync_file(tmp / name)
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = directory / f".old_{final.name}_{os.getpid()}"
    if final.exists():  # the same step saved twice (an interrupt, then the end): swap, never a moment without it
        final.rename(old)
    tmp.rename(final)
    fsync_dir(directory)
    if old.exists():
        shutil.rmtree(old)
    for p in checkpoints(directory)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def damage(path: Path) -> str | None:
    """What makes checkpoint folder `path` unreadable (missing or altered files), or None if it is intact.

    Example:
        >>> import tempfile
        >>> damage(Path(tempfile.mkdtemp()))
        'trainer.json is missing'
    """
    try:
        meta = json.loads((path / "trainer.json").read_bytes())
    except FileNotFoundError:
        return "trainer.json is missing"
    except (OSError, ValueError) as e:
        return f"trainer.json is unreadable ({e})"
    if not isinstance(meta, dict) or not all(k in meta for k in ("config", "step", "tokens", "scale", "mix")):
        return "trainer.json lacks its fields"
    if "checksum" in meta and meta["checksum"] != json_checksum(meta):
        return "trainer.json does not match its checksum"
    for name in _FILES:
        if not (path / name).is_file():
            return f"{name} is missing"
        want = (meta.get("files") or {}).get(name)
        if want is not None and file_crc32(path / name) != want:
            return f"{name} does not match its checksum (truncated or altered)"
    return None


def load_checkpoint(path: Path, cfg: TrainConfig, sae: TrainingSAE, opt: torch.optim.Optimizer) -> TrainState:
    """Restore `sae` and `opt` from a checkpoint of the same configuration; refuse another one, naming each field.

    Example:
        >>> import tempfile, torch
        >>> from vlens.sae.training import TrainConfig, make_training_sae
        >>> cfg = TrainConfig.preset("paper", d_in=4, d_sae=8, total_steps=10)
        >>> sae = make_training_sae(cfg); opt = torch.optim.Adam(sae.parameters())
        >>> path = save_checkpoint(Path(tempfile.mkdtemp()), cfg, sae, opt, TrainState(step=3, since_fired=torch.zeros(8)))
        >>> path.name, load_checkpoint(path, cfg, sae, opt).step
        ('step_000000003', 3)
    """
    problem = damage(path)
    if problem is not None:
        raise _Damaged(f"checkpoint {path} is damaged: {problem}")
    meta = json.loads((path / "trainer.json").read_text())
    saved = _adopt_legacy_loss(path, {**ADDED_LATER, **meta["config"]}, cfg, sae)
    diffs = config_difference(saved, cfg.to_dict())
    if diffs:
        raise InputError(
            f"refusing to resume from {path}: it was trained with a different configuration:\n  "
            + "\n  ".join(diffs)
            + "\nUse the same settings, resume=False to start over, or another checkpoint_dir."
        )
    try:
        sae.load_state_dict(load_file(path / _FILES[0]))
        tensors = load_file(path / _FILES[1])
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
    except Exception as e:  # a file of a vlens 0.1 checkpoint (no checksums) damaged
        raise _Damaged(f"checkpoint {path} is damaged: {type(e).__name__}: {str(e)[:300]}") from e
    return TrainState(step=meta["step"], tokens=meta["tokens"], scale=meta["scale"], mix=meta["mix"],
                      norm_sum=meta.get("norm_sum", 0.0), norm_count=meta.get("norm_count", 0),
                      since_fired=tensors["since_fired"].clone() if "since_fired" in tensors else None)


def _adopt_legacy_loss(path: Path, saved: dict[str, Any], cfg: TrainConfig, sae: TrainingSAE) -> dict[str, Any]:
    """A checkpoint written before the loss fields existed resumes with the loss it was trained with.

    Its config gets `LEGACY_LOSS` (SAE-Lens's gradient through the decoder norms, λ warmed
    up from λ/W: what every such checkpoint trained with); when that is the only difference
    from `cfg`, `cfg` and `sae.cfg` take those values (with a warning), so the run goes on
    with its own loss rather than switching halfway. Returns the filled-in saved config.
    """
    legacy = {k: v for k, v in LEGACY_LOSS.items() if k not in saved}
    if not legacy:
        return saved
    saved = {**saved, **legacy}
    change = {k: v for k, v in legacy.items() if getattr(cfg, k) != v}
    if change and not config_difference(saved, {**cfg.to_dict(), **change}):
        for k, v in change.items():
            setattr(cfg, k, v)
            if hasattr(sae.cfg, k):
                setattr(sae.cfg, k, v)
        warnings.warn(f"checkpoint {path} was written before vlens recorded which loss trained it: it resumes with "
                      f"the loss it was trained with ({', '.join(f'{k}={v}' for k, v in change.items())}: "
                      "SAE-Lens's penalty gradient through the decoder norms, lambda warmed up from lambda/W), not the "
                      "paper preset's current one. Pass resume=False (or another checkpoint_dir) to train with the "
                      "paper's code loss from the start", stacklevel=4)
    return saved


def resume(directory: Path, cfg: TrainConfig, sae: TrainingSAE, opt: torch.optim.Optimizer) -> TrainState | None:
    """Restore the newest intact checkpoint under `directory` (None if there is none yet).

    A damaged newest checkpoint is skipped with a warning and the one before it is used (two
    are kept); a checkpoint of another configuration is refused (`InputError`, naming each
    field); if every checkpoint is damaged, an `InputError` lists why and how to start over.

    Example:
        >>> import tempfile
        >>> from vlens.sae.training import TrainConfig, make_training_sae
        >>> cfg = TrainConfig.preset("paper", d_in=4, d_sae=8, total_steps=10)
        >>> sae = make_training_sae(cfg); opt = torch.optim.Adam(sae.parameters())
        >>> d = Path(tempfile.mkdtemp()); _ = save_checkpoint(d, cfg, sae, opt, TrainState(step=4))
        >>> _ = save_checkpoint(d, cfg, sae, opt, TrainState(step=8))
        >>> _ = (d / "step_000000008" / "trainer_state.safetensors").write_bytes(b"cut")
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     print(resume(d, cfg, sae, opt).step, "does not match its checksum" in str(caught[0].message))
        4 True
    """
    found = checkpoints(directory)
    problems = []
    for path in reversed(found):
        try:
            state = load_checkpoint(path, cfg, sae, opt)
        except _Damaged as e:
            problems.append(str(e))
            continue
        if problems:
            warnings.warn("; ".join(problems) + f". Resuming from {path.name} instead (the damaged one is replaced "
                          "when training passes its step again)", stacklevel=3)
        return state
    if problems:
        raise InputError("no intact checkpoint to resume from: " + "; ".join(problems) + ". Pass resume=False to "
                         f"start over (those folders are then replaced), or another checkpoint_dir than {directory}")
    return None
