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
format is vlens 0.1's, unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from sae_lens.saes.sae import TrainingSAE

from ...errors import InputError
from .config import TrainConfig

PREFIX = "step_"
_IGNORED_ON_RESUME = ("fused",)


@dataclass
class TrainState:
    """Where a run stands: steps and tokens done, activation scale, token mix, tokens since each latent fired."""

    step: int = 0
    tokens: int = 0
    scale: float = 1.0
    mix: dict[str, int] = field(default_factory=lambda: {"image": 0, "text": 0, "unknown": 0})
    since_fired: torch.Tensor | None = None


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint folder under `directory`, or None.

    Example:
        >>> import tempfile
        >>> latest_checkpoint(Path(tempfile.mkdtemp())) is None
        True
    """
    if not directory.is_dir():
        return None
    ckpts = sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                   and (p / "trainer.json").exists())
    return ckpts[-1] if ckpts else None


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
    """Write a checkpoint atomically (temporary folder, then rename) and keep the newest `keep` (see `load_checkpoint`)."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{PREFIX}{state.step:09d}"
    tmp = directory / f".tmp_{final.name}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().contiguous() for k, v in sae.state_dict().items()}, tmp / "sae_weights.safetensors")
    opt_tensors: dict[str, torch.Tensor] = {}
    for i, st in opt.state_dict()["state"].items():
        for name, value in st.items():
            opt_tensors[f"{i}.{name}"] = torch.as_tensor(value).reshape(-1).contiguous()
    if state.since_fired is not None:
        opt_tensors["since_fired"] = state.since_fired.contiguous()
    save_file(opt_tensors, tmp / "trainer_state.safetensors")
    meta = {"config": cfg.to_dict(), "step": state.step, "tokens": state.tokens, "scale": state.scale,
            "mix": state.mix, "sae_metadata": sae.cfg.metadata.to_dict()}
    (tmp / "trainer.json").write_text(json.dumps(meta, indent=1, default=str))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    old = sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX))
    for p in old[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    return final


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
    meta = json.loads((path / "trainer.json").read_text())
    diffs = config_difference(meta["config"], cfg.to_dict())
    if diffs:
        raise InputError(
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
    return TrainState(step=meta["step"], tokens=meta["tokens"], scale=meta["scale"], mix=meta["mix"],
                      since_fired=tensors["since_fired"].clone() if "since_fired" in tensors else None)
