"""SAEs on disk: export to and load from SAE-Lens's format, and converters from other formats.

An export directory holds exactly what `sae_lens.SAE.load_from_disk` reads:

- `cfg.json`: the SAE-Lens config (`architecture` one of SAE-Lens's own, `metadata.sae_lens_version`,
  `metadata.model_name`, `metadata.hook_name`) plus `metadata.vlens_modality` (token counts,
  shared range, fractions) and `metadata.vlens_training` when trained here;
- `sae_weights.safetensors`: the state dict, activation scaling already folded in;
- `sparsity.safetensors`: key `sparsity`, log10 firing density per latent (SAE-Lens convention);
- `modality.safetensors` (vlens only, ignored by SAE-Lens): per-latent modality statistics.

`export` writes the weights and `cfg.json` with SAE-Lens's own `SAE.save_model` (same
bytes for the weights; the config is written from a copy of `sae.cfg` that carries the
vlens metadata and `device: cpu`, so the caller's SAE is not changed). `load` reads with
`SAE.load_from_disk`, so every architecture SAE-Lens registers loads (standard, topk,
jumprelu, gated, abstopk, matching_pursuit, transcoders...), and attaches the modality
statistics by composition (`vlens.sae.modality.as_multimodal`). The converters are disk
loaders for formats SAE-Lens cannot read as they are: the paper's `fc1`/`fc2` state dicts
and sparsify checkpoints (SAE-Lens's own `sparsify_disk_loader` transposes `W_dec` of
eai-sparsify 1.3 checkpoints).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import sae_lens
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from sae_lens import SAE
from sae_lens.registry import SAE_CLASS_REGISTRY
from sae_lens.saes import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata
from torch import Tensor

from ..errors import InputError
from .modality import ModalityStats, as_multimodal

MODALITY_FILENAME = "modality.safetensors"


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    """Load a safetensors file, turning truncation/corruption into a clear error (never unpickles)."""
    if not path.exists():
        raise InputError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise InputError(
            f"{path} is not a readable safetensors file (truncated or corrupt: {e}). "
            "Re-download or re-export it; vlens never falls back to pickle."
        ) from None


def export(
    sae: SAE,
    path: str | Path,
    *,
    model_name: str | None = None,
    hook_name: str | None = None,
    sparsity: Tensor | None = None,
) -> Path:
    """Write `sae` as an SAE-Lens directory (see module docstring) and return the path.

    `sparsity` (firing density per latent) defaults to the overall frequency in
    `sae.modality`; it is stored as log10(density + 1e-10) like SAE-Lens's trainer.

    Example:
        >>> import tempfile, torch, vlens.sae as vs
        >>> sae = vs.train(torch.randn(512, 8), "paper", d_sae=16, steps=3, batch_size=128, progress=False)
        >>> d = export(sae, tempfile.mkdtemp(), model_name="tiny", hook_name="blocks.2.hook_resid_pre")
        >>> sorted(p.name for p in d.iterdir())
        ['cfg.json', 'sae_weights.safetensors']
        >>> torch.equal(load(d).W_enc, sae.W_enc)
        True
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if sae.cfg.normalize_activations not in ("none", None):
        raise InputError(
            f"this SAE normalises its inputs at run time ({sae.cfg.normalize_activations!r}); fold the scaling "
            "into the weights first (sae.fold_activation_norm_scaling_factor(factor)) so SAE-Lens users get the same maps"
        )
    meta = sae.cfg.metadata.to_dict()
    meta["sae_lens_version"] = meta.get("sae_lens_version") or sae_lens.__version__
    if model_name is not None:
        meta["model_name"] = model_name
    if hook_name is not None:
        meta["hook_name"] = hook_name
    modality: ModalityStats | None = getattr(sae, "modality", None)
    if modality is not None:
        meta["vlens_modality"] = modality.summary()
    written = copy.copy(sae.cfg)
    written.metadata = SAEMetadata.from_dict(meta)
    written.device = "cpu"
    own = sae.cfg
    try:  # SAE-Lens's writer, with the copied config
        sae.cfg = written
        sae.save_model(path)
    finally:
        sae.cfg = own
    if sparsity is None and modality is not None:
        sparsity = modality.frequency
    if sparsity is not None:
        save_file({"sparsity": torch.log10(sparsity.float().cpu() + 1e-10).contiguous()}, path / "sparsity.safetensors")
    if modality is not None:
        save_file(modality.tensors(), path / MODALITY_FILENAME)
    return path


def load(path: str | Path, device: str = "cpu") -> SAE:
    """Load any SAE-Lens directory (every registered architecture) with `sae.modality` attached when saved.

    The result is SAE-Lens's own class (`StandardSAE`, `GatedSAE`, ...). Clear errors for a
    missing/unknown architecture and for truncated or corrupt weights.

    Example:
        >>> import tempfile, torch, vlens.sae as vs
        >>> x, mod = torch.randn(512, 8), torch.arange(512) % 2
        >>> sae = vs.train((x, mod), "paper", d_sae=16, steps=3, batch_size=128, progress=False)
        >>> back = load(export(sae, tempfile.mkdtemp()))
        >>> torch.equal(back.modality.score.nan_to_num(-1), sae.modality.score.nan_to_num(-1))
        True
    """
    path = Path(path)
    cfg_path = path / "cfg.json"
    if not cfg_path.exists():
        raise InputError(
            f"{cfg_path} not found: an SAE-Lens directory has cfg.json and sae_weights.safetensors "
            "(for sparsify checkpoints use convert_sparsify_checkpoint, for the paper's fc1/fc2 files "
            "convert_paper_checkpoint)"
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{cfg_path} is not valid JSON ({e})") from None
    arch = cfg.get("architecture")
    if arch not in SAE_CLASS_REGISTRY:
        raise InputError(
            f"{cfg_path} names architecture {arch!r}, which SAE-Lens {sae_lens.__version__} does not know; "
            f"known: {sorted(SAE_CLASS_REGISTRY)}. Was it written by another library (try the converters)?"
        )
    weights = path / "sae_weights.safetensors"
    _read_safetensors(weights)  # validates before SAE-Lens touches it
    sae = SAE.load_from_disk(path, device=device)
    mpath = path / MODALITY_FILENAME
    summary = (cfg.get("metadata") or {}).get("vlens_modality")
    stats = None
    if mpath.exists() and summary is not None:
        stats = ModalityStats.from_saved(_read_safetensors(mpath), summary)
    return as_multimodal(sae, stats)


def _save_or_return(sae: SAE, out: str | Path | None, model_name: str | None, hook_name: str | None) -> SAE:
    if model_name is not None:
        sae.cfg.metadata.model_name = model_name
    if hook_name is not None:
        sae.cfg.metadata.hook_name = hook_name
    if out is not None:
        export(sae, out)
    return sae


def _read_state_dict(src: str | Path | dict[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(src, dict):
        return dict(src)
    src = Path(src)
    if src.is_dir():
        cands = sorted(src.glob("*.safetensors")) or sorted(src.glob("*.pt")) + sorted(src.glob("*.pth"))
        if not cands:
            raise InputError(f"no .safetensors/.pt/.pth checkpoint in {src}")
        src = cands[0]
    if src.suffix == ".safetensors":
        return _read_safetensors(src)
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)  # restricted unpickler: tensors only
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot read {src} as a tensors-only torch checkpoint ({e}); convert it to safetensors") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise InputError(f"{src} holds a {type(obj).__name__}, not a state dict")
    return obj


def convert_paper_checkpoint(
    src: str | Path | dict[str, Tensor],
    out: str | Path | None = None,
    *,
    input_scale: float = 8.0,
    model_name: str | None = None,
    hook_name: str | None = None,
) -> SAE:
    """Convert the paper's released SAE (plain `fc1`/`fc2` state dict) to a vlens / SAE-Lens SAE.

    The original computes x̂ = fc2(ReLU(fc1(s·x))) / s with s = `input_scale` (8). The scale is
    folded in: W_enc = s·fc1.weightᵀ, b_enc = fc1.bias, W_dec = fc2.weightᵀ/s, b_dec = fc2.bias/s,
    no b_dec subtraction on the input (SAE-Lens `standard`, `apply_b_dec_to_input=False`).
    A `module.` prefix (DataParallel) is stripped. Written to `out` when given.

    Example:
        >>> import torch
        >>> sd = {"module.fc1.weight": torch.randn(32, 8), "module.fc1.bias": torch.zeros(32),
        ...       "module.fc2.weight": torch.randn(8, 32), "module.fc2.bias": torch.zeros(8)}
        >>> sae = convert_paper_checkpoint(sd)
        >>> x = torch.randn(3, 8)
        >>> ref = torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(8 * x, sd["module.fc1.weight"])), sd["module.fc2.weight"]) / 8
        >>> torch.allclose(sae(x), ref, atol=1e-5)
        True
    """
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in _read_state_dict(src).items()}
    need = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise InputError(f"not a paper-style SAE checkpoint: missing {missing}; found keys {sorted(sd)[:8]}")
    w1, b1, w2, b2 = (sd[k].float() for k in need)
    d_sae, d_in = w1.shape
    if w2.shape != (d_in, d_sae) or b1.shape != (d_sae,) or b2.shape != (d_in,):
        raise InputError(f"inconsistent fc1/fc2 shapes: fc1 {tuple(w1.shape)}, fc2 {tuple(w2.shape)}")
    cfg = StandardSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=False,
                            metadata=SAEMetadata(vlens_converted_from={"format": "paper_fc1_fc2",
                                                                       "input_scale": input_scale}))
    sae = as_multimodal(StandardSAE(cfg))
    sae.load_state_dict({"W_enc": (w1.T * input_scale).contiguous(), "b_enc": b1.clone(),
                         "W_dec": (w2.T / input_scale).contiguous(), "b_dec": b2 / input_scale})
    return _save_or_return(sae, out, model_name, hook_name)


def convert_sparsify_checkpoint(
    src: str | Path,
    out: str | Path | None = None,
    *,
    model_name: str | None = None,
    hook_name: str | None = None,
) -> SAE:
    """Convert a sparsify / lmms-lab TopK checkpoint directory (`cfg.json` + `sae.safetensors`).

    sparsify computes z = TopK(ReLU((x − b_dec)·encoder.weightᵀ + encoder.bias)),
    x̂ = z·W_dec + b_dec, which is SAE-Lens `topk` with `apply_b_dec_to_input=True`,
    W_enc = encoder.weightᵀ, b_enc = encoder.bias, W_dec = W_dec, b_dec = b_dec and k = cfg `k`.
    Skip connections, transcoders and non-TopK activations are refused.

    Example:
        >>> import json, tempfile, torch
        >>> from pathlib import Path
        >>> from safetensors.torch import save_file
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "cfg.json").write_text(json.dumps({"d_in": 8, "num_latents": 32, "k": 4}))
        >>> save_file({"encoder.weight": torch.randn(32, 8), "encoder.bias": torch.zeros(32),
        ...            "W_dec": torch.randn(32, 8), "b_dec": torch.zeros(8)}, d / "sae.safetensors")
        >>> sae = convert_sparsify_checkpoint(d)
        >>> sae.cfg.k, int((sae.encode(torch.randn(2, 8)) > 0).sum(-1).max()) <= 4
        (4, True)
    """
    src = Path(src)
    cfg_path = src / "cfg.json"
    if not cfg_path.exists():
        raise InputError(f"{cfg_path} not found: a sparsify checkpoint is a folder with cfg.json and sae.safetensors")
    c = json.loads(cfg_path.read_text())
    if c.get("transcode"):
        raise InputError("this sparsify checkpoint is a transcoder (transcode=true): only SAEs can be converted")
    act = c.get("activation", "topk")
    if act != "topk":
        raise InputError(f"sparsify activation {act!r} is not supported: only 'topk' maps onto SAE-Lens")
    sd = _read_safetensors(src / "sae.safetensors")
    if "W_skip" in sd or c.get("skip_connection"):
        raise InputError("this sparsify checkpoint has a skip connection (W_skip), which SAE-Lens's topk SAE lacks")
    missing = [k for k in ("encoder.weight", "encoder.bias", "W_dec", "b_dec") if k not in sd]
    if missing:
        raise InputError(f"not a sparsify SAE: sae.safetensors lacks {missing} (has {sorted(sd)})")
    w_enc = sd["encoder.weight"].float()
    d_sae, d_in = w_enc.shape
    if "d_in" in c and int(c["d_in"]) != d_in:
        raise InputError(f"cfg.json says d_in={c['d_in']} but encoder.weight has shape {tuple(w_enc.shape)}")
    if "k" not in c:
        raise InputError("sparsify cfg.json has no 'k'")
    cfg = TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=int(c["k"]), apply_b_dec_to_input=True,
                        metadata=SAEMetadata(vlens_converted_from={"format": "sparsify", "cfg": c}))
    sae = as_multimodal(TopKSAE(cfg))
    sae.load_state_dict({"W_enc": w_enc.T.contiguous(), "b_enc": sd["encoder.bias"].float(),
                         "W_dec": sd["W_dec"].float().contiguous(), "b_dec": sd["b_dec"].float()})
    return _save_or_return(sae, out, model_name, hook_name)
