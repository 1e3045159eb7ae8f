"""SAEs on disk: export to and load from SAE-Lens's format, and converters from other formats.

An export directory holds exactly what `sae_lens.SAE.load_from_disk` reads, and what
SAE-Lens's Hub upload copies (`cfg.json`, `sae_weights.safetensors`, `sparsity.safetensors`):

- `cfg.json`: the SAE-Lens config (`architecture` one of SAE-Lens's own) and its metadata:
  `sae_lens_version`, `model_name`, `hook_name`, the run fields downstream tools read
  (`l0`, `num_dead_features`, `context_size`, `prepend_bos`, `dataset_path`, `model_class_name`,
  `hook_head_index`, `model_from_pretrained_kwargs`), plus `vlens_modality` (token counts, shared
  range, fractions) and `vlens_training` when trained here;
- `sae_weights.safetensors`: the state dict, activation scaling already folded in;
- `sparsity.safetensors`: key `sparsity`, log10 firing density per latent (SAE-Lens convention),
  written whenever the density is known, plus vlens's per-latent modality tensors under
  `vlens_modality.*` keys (SAE-Lens reads only `sparsity`, and the file survives the Hub upload);
- `modality.safetensors`: the same modality tensors under vlens 0.2's file name, kept for
  readers of vlens 0.2 until 0.3 (`load` reads `sparsity.safetensors` first).

`export` writes the weights and `cfg.json` with SAE-Lens's own `SAE.save_model` (same
bytes for the weights; the config is written from a copy of `sae.cfg` that carries the
vlens metadata and `device: cpu`, so the caller's SAE is not changed). `load` reads with
`SAE.load_from_disk`, so every architecture SAE-Lens registers loads (standard, topk,
jumprelu, gated, abstopk, matching_pursuit, transcoders...), and attaches the modality
statistics by composition (`vlens.sae.modality.as_multimodal`). The converters are disk
loaders for formats SAE-Lens cannot read as they are: the paper's `fc1`/`fc2` state dicts
and sparsify checkpoints (SAE-Lens's own `sparsify_disk_loader` transposes `W_dec` of
eai-sparsify 1.3 checkpoints).

Which site each format reads (`sae.cfg.metadata.hook_name`, and `site_of` for a VLM):

| format | hook name | site |
|---|---|---|
| vlens export | whatever it was trained on (`vlm.hook_name(site)`) | `resid_pre.L` by default |
| the paper's `fc1`/`fc2` | `blocks.L.hook_resid_pre` (pass it: the file does not say) | `resid_pre.L` |
| sparsify / lmms-lab `layers.L` folder | `blocks.L.hook_resid_post` (they hook module outputs) | `resid_post.L` |
| sparsify `embed_tokens` folder | `hook_embed` | `embed` |
"""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import sae_lens
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from sae_lens import SAE
from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting
from sae_lens.registry import SAE_CLASS_REGISTRY
from sae_lens.saes import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata
from torch import Tensor

from ..errors import InputError, NonFiniteActivations, SiteError
from ..sites import Site, SiteLike, from_hook_name
from ._ondisk import check_config, check_tensors, expected_shapes, read_json
from .modality import ModalityStats, as_multimodal

if TYPE_CHECKING:
    from ..model import VLM

SPARSITY_FILENAME = "sparsity.safetensors"
MODALITY_FILENAME = "modality.safetensors"
MODALITY_KEY = "vlens_modality."
"""Prefix of the modality tensors inside `sparsity.safetensors` (`vlens_modality.freq_image`, ...)."""

RUN_METADATA: dict[str, Any] = {
    "context_size": None, "prepend_bos": True, "dataset_path": None, "model_class_name": None,
    "hook_head_index": None, "model_from_pretrained_kwargs": {},
}
"""SAE-Lens run fields every export carries (downstream tools read them); None where vlens cannot know."""

SPARSIFY_UNIT_NORM_TOL = 1e-4
"""A sparsify decoder whose row norms are all within this of 1 converts with `rescale_acts_by_decoder_norm=True`."""


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


def _folded(sae: SAE, stats: ModalityStats | None) -> tuple[SAE, ModalityStats | None]:
    """A copy of `sae` with unit-norm decoder rows (SAE-Lens's `fold_W_dec_norm`), statistics rescaled to match."""
    if isinstance(sae, TopKSAE) and not getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        raise InputError(
            "folding the decoder norm would change which latents a TopK SAE keeps (it selects on the unscaled "
            "pre-activations); export it unfolded, or retrain it with rescale_acts_by_decoder_norm=True"
        )
    out = copy.deepcopy(sae)
    norms = out.get_W_dec_norm().detach().float().cpu()
    try:
        out.fold_W_dec_norm()
    except NotImplementedError as e:
        raise InputError(f"SAE-Lens cannot fold the decoder norm of a {type(sae).__name__}: {e}") from None
    if stats is not None:  # activations scale by the norm; frequencies and scores do not change
        stats = copy.copy(stats)
        stats.mean_image = stats.mean_image * norms
        stats.mean_text = stats.mean_text * norms
    return out, stats


def _run_metadata(meta: dict[str, Any], stats: ModalityStats | None, d_sae: int) -> None:
    """Fill the SAE-Lens run fields downstream tools read (l0, dead latents, context, dataset...)."""
    final = (meta.get("vlens_training") or {}).get("final_metrics") or {}
    if stats is not None and stats.n_image + stats.n_text > 0:
        meta.setdefault("l0", float(stats.frequency.sum()))
        meta.setdefault("num_dead_features", int(d_sae - int(stats.alive.sum())))
    elif "l0" in final:
        meta.setdefault("l0", float(final["l0"]))
        if "dead" in final:
            meta.setdefault("num_dead_features", int(final["dead"]))
    for key, value in RUN_METADATA.items():
        if meta.get(key) is None:
            meta[key] = copy.deepcopy(value)


def export(
    sae: SAE,
    path: str | Path,
    *,
    model_name: str | None = None,
    hook_name: str | None = None,
    sparsity: Tensor | None = None,
    fold_decoder_norm: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write `sae` as an SAE-Lens directory (see module docstring) and return the path.

    `sparsity` (firing density per latent) defaults to the overall frequency in
    `sae.modality`; it is stored as log10(density + 1e-10) like SAE-Lens's trainer.
    `fold_decoder_norm=True` writes unit-norm decoder rows with the norms folded into the
    encoder (exact for ReLU and JumpReLU SAEs; the paper preset's rows have norm ~0.1,
    which tools assuming unit-norm decoders warn about); the caller's SAE is not changed.
    `metadata` adds or overrides SAE-Lens metadata fields (`context_size`, `dataset_path`, ...).

    Example:
        >>> import tempfile, torch, vlens.sae as vs
        >>> x, mod = torch.randn(512, 8), torch.arange(512) % 2     # activations and modality (1 image, 0 text)
        >>> sae = vs.train((x, mod), "paper", d_sae=16, steps=3, batch_size=128, progress=False)
        >>> d = export(sae, tempfile.mkdtemp(), model_name="tiny", hook_name="blocks.2.hook_resid_pre")
        >>> sorted(p.name for p in d.iterdir())
        ['cfg.json', 'modality.safetensors', 'sae_weights.safetensors', 'sparsity.safetensors']
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
    modality: ModalityStats | None = getattr(sae, "modality", None)
    if sparsity is None:
        sparsity = getattr(sae, "density", None)
    if sparsity is None and modality is not None:
        sparsity = modality.frequency
    if sparsity is None and "vlens_converted_from" not in sae.cfg.metadata:
        warnings.warn(
            "no firing density is known for this SAE, so sparsity.safetensors (which SAE-Lens, sae-dashboard and "
            "Neuronpedia read) is not written: attach one with vlens.sae.as_multimodal(sae, "
            "density=vlens.sae.modality.firing_density(sae, data)), or pass sparsity=", stacklevel=2)
    if fold_decoder_norm:
        sae, modality = _folded(sae, modality)
    meta = sae.cfg.metadata.to_dict()
    meta["sae_lens_version"] = meta.get("sae_lens_version") or sae_lens.__version__
    if model_name is not None:
        meta["model_name"] = model_name
    if hook_name is not None:
        meta["hook_name"] = hook_name
    meta.update(metadata or {})
    if modality is not None:
        meta["vlens_modality"] = {**modality.summary(), "file": SPARSITY_FILENAME}
    if fold_decoder_norm:
        meta["vlens_folded_decoder_norm"] = True
    _run_metadata(meta, modality, sae.cfg.d_sae)
    written = copy.copy(sae.cfg)
    written.metadata = SAEMetadata.from_dict(meta)
    written.device = "cpu"
    own = sae.cfg
    try:  # SAE-Lens's writer, with the copied config
        sae.cfg = written
        sae.save_model(path)
    finally:
        sae.cfg = own
    tensors: dict[str, Tensor] = {}
    if sparsity is not None:
        tensors["sparsity"] = torch.log10(sparsity.float().cpu() + 1e-10).contiguous()
    if modality is not None:
        tensors.update({MODALITY_KEY + k: v for k, v in modality.tensors().items()})
        save_file(modality.tensors(), path / MODALITY_FILENAME)  # vlens 0.2's file, until 0.3
    if tensors:
        save_file(tensors, path / SPARSITY_FILENAME)
    return path


def _modality_from_disk(path: Path, cfg: dict[str, Any]) -> ModalityStats | None:
    """The modality statistics saved with an export: `sparsity.safetensors` keys, else vlens 0.2's file."""
    summary = (cfg.get("metadata") or {}).get("vlens_modality")
    if summary is None:
        return None
    sp = path / SPARSITY_FILENAME
    tensors = _read_safetensors(sp) if sp.exists() else {}
    ours = {k[len(MODALITY_KEY):]: v for k, v in tensors.items() if k.startswith(MODALITY_KEY)}
    if not ours and (path / MODALITY_FILENAME).exists():
        ours = _read_safetensors(path / MODALITY_FILENAME)
    if not ours:
        named = summary.get("file", MODALITY_FILENAME)
        warnings.warn(
            f"{path / 'cfg.json'} says modality statistics were saved in {named}, but {path} has none "
            f"(an upload that copied only SAE-Lens's files?): sae.modality is None; copy {named} next to cfg.json "
            "or recompute them with vlens.sae.modality_stats(sae, data)",
            stacklevel=3,
        )
        return None
    return ModalityStats.from_saved(ours, summary)


def load(path: str | Path, device: str = "cpu") -> SAE:
    """Load any SAE-Lens directory (every registered architecture) with `sae.modality` attached when saved.

    The result is SAE-Lens's own class (`StandardSAE`, `GatedSAE`, ...). Clear errors for a
    missing/unknown architecture and for truncated or corrupt weights; a warning when the
    config names modality statistics that are missing from the directory.

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
    cfg = read_json(cfg_path, "re-export the SAE (vlens.sae.export writes cfg.json)")
    arch = cfg.get("architecture")
    if arch not in SAE_CLASS_REGISTRY:
        raise InputError(
            f"{cfg_path} names architecture {arch!r}, which SAE-Lens {sae_lens.__version__} does not know; "
            f"known: {sorted(SAE_CLASS_REGISTRY)}. Was it written by another library (try the converters)?"
        )
    sae_cls, cfg_cls = SAE_CLASS_REGISTRY[arch]
    check_config(cfg_path, cfg, cfg_cls, arch)
    weights = path / "sae_weights.safetensors"
    tensors = _read_safetensors(weights)  # validates before SAE-Lens touches it
    bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        raise NonFiniteActivations(f"{weights} holds NaN/inf in {', '.join(bad)}: retrain or re-export this SAE")
    try:
        sae = SAE.load_from_disk(path, device=device)
    except RuntimeError:  # torch's "Error(s) in loading state_dict": say which tensor and why
        parsed = cfg_cls.from_dict(handle_config_defaulting(dict(cfg)))
        check_tensors(weights, tensors, expected_shapes(sae_cls, parsed),
                      f"{cfg_path} (a {arch!r} SAE, d_in={cfg['d_in']}, d_sae={cfg['d_sae']})",
                      "Fix d_in / d_sae in cfg.json, or re-export the SAE from its training run.")
        raise
    del tensors
    stats = _modality_from_disk(path, cfg)
    density = None
    if stats is None and (path / SPARSITY_FILENAME).exists():
        log10 = _read_safetensors(path / SPARSITY_FILENAME).get("sparsity")
        density = None if log10 is None else (10 ** log10.double() - 1e-10).clamp_min(0).float()
    return as_multimodal(sae, stats, density=density)


def site_of(sae: SAE, vlm: VLM, layer: SiteLike | None = None) -> Site:
    """The site of `vlm` an SAE reads: from its `cfg.metadata.hook_name`, else `layer`.

    A `layer` that names another site than the SAE's hook name is refused (an SAE applied
    at the wrong site gives meaningless latents); clear `sae.cfg.metadata.hook_name` to apply
    it elsewhere on purpose.

    Example:
        >>> import vlens
        >>> from sae_lens.saes import TopKSAE, TopKSAEConfig
        >>> from sae_lens.saes.sae import SAEMetadata
        >>> vlm = vlens.tiny()
        >>> sae = TopKSAE(TopKSAEConfig(d_in=64, d_sae=8, k=2, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post")))
        >>> site_of(sae, vlm), site_of(sae, vlm, "resid_post.-3")
        (Site('resid_post.1'), Site('resid_post.1'))
    """
    hook = sae.cfg.metadata.hook_name
    own = None
    if hook:
        try:
            own = vlm.site(from_hook_name(hook))
        except SiteError as e:
            if layer is None:
                raise InputError(f"this SAE's hook name {hook!r} names no site of this model ({e}); "
                                 "pass the site to read, e.g. layer='resid_pre.8'") from None
    if layer is None:
        if own is None:
            raise InputError("this SAE does not say where it reads (cfg.metadata.hook_name is not set): "
                             "pass the site, e.g. layer=8 (resid_pre.8) or layer='resid_post.8'")
        return own
    given = vlm.site(layer)
    if own is not None and given != own:
        raise InputError(
            f"this SAE was trained on {own.name} (hook name {hook!r}) but layer={layer!r} names {given.name}: "
            "leave layer out to use the SAE's own site, or clear sae.cfg.metadata.hook_name to apply it elsewhere"
        )
    return given


# -- converters --------------------------------------------------------------------------------


def _dtype(dtype: str | torch.dtype | None, stored: torch.dtype) -> torch.dtype:
    if dtype is None:
        return stored
    out = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if not isinstance(out, torch.dtype) or not out.is_floating_point:
        raise InputError(f"dtype must be a floating dtype such as 'float32' or 'bfloat16' (or None: as stored), "
                         f"not {dtype!r}")
    return out


def _converted_metadata(fmt: dict[str, Any], model_name: str | None, hook_name: str | None) -> SAEMetadata:
    """Metadata of a converted SAE: no SAE-Lens training version (it was never trained by SAE-Lens)."""
    meta = SAEMetadata(vlens_converted_from=fmt, sae_lens_training_version=None)
    if model_name is not None:
        meta.model_name = model_name
    if hook_name is not None:
        meta.hook_name = hook_name
    return meta


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
    dtype: str | torch.dtype | None = "float32",
) -> SAE:
    """Convert the paper's released SAE (plain `fc1`/`fc2` state dict) to a vlens / SAE-Lens SAE.

    The original computes x̂ = fc2(ReLU(fc1(s·x))) / s with s = `input_scale` (8). The scale is
    folded in: W_enc = s·fc1.weightᵀ, b_enc = fc1.bias, W_dec = fc2.weightᵀ/s, b_dec = fc2.bias/s,
    no b_dec subtraction on the input (SAE-Lens `standard`, `apply_b_dec_to_input=False`).
    A `module.` prefix (DataParallel) is stripped. The paper's SAEs read `resid_pre.L`: pass
    `hook_name="blocks.L.hook_resid_pre"`. `dtype=None` keeps the stored dtype. Written to `out` when given.

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
    dt = _dtype(dtype, sd["fc1.weight"].dtype)
    w1, b1, w2, b2 = (sd[k].float() for k in need)
    d_sae, d_in = w1.shape
    if w2.shape != (d_in, d_sae) or b1.shape != (d_sae,) or b2.shape != (d_in,):
        raise InputError(f"inconsistent fc1/fc2 shapes: fc1 {tuple(w1.shape)}, fc2 {tuple(w2.shape)}")
    meta = _converted_metadata({"format": "paper_fc1_fc2", "input_scale": input_scale}, model_name, hook_name)
    cfg = StandardSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=False, dtype=str(dt).removeprefix("torch."),
                            metadata=meta)
    sae = as_multimodal(StandardSAE(cfg))
    state = {"W_enc": w1.T * input_scale, "b_enc": b1, "W_dec": w2.T / input_scale, "b_dec": b2 / input_scale}
    sae.load_state_dict({k: v.to(dt).contiguous() for k, v in state.items()})
    if out is not None:
        export(sae, out)
    return sae


def sparsify_hook_name(folder: str) -> str | None:
    """The SAE-Lens hook name of a sparsify / lmms-lab hookpoint folder (they hook module *outputs*).

    `layers.L` (also `model.layers.L`, `language_model.layers_L`, ...) is `blocks.L.hook_resid_post`,
    `embed_tokens` is `hook_embed` (as SAE-Lens's own sparsify loader reads them); None otherwise.

    Example:
        >>> sparsify_hook_name("layers.12"), sparsify_hook_name("model.language_model.layers.3")
        ('blocks.12.hook_resid_post', 'blocks.3.hook_resid_post')
    """
    if folder.split(".")[-1] == "embed_tokens":
        return "hook_embed"
    m = re.search(r"layers[._](\d+)$", folder)
    return f"blocks.{int(m.group(1))}.hook_resid_post" if m else None


def convert_sparsify_checkpoint(
    src: str | Path,
    out: str | Path | None = None,
    *,
    model_name: str | None = None,
    hook_name: str | None = None,
    dtype: str | torch.dtype | None = "float32",
) -> SAE:
    """Convert a sparsify / lmms-lab TopK checkpoint directory (`cfg.json` + `sae.safetensors`).

    sparsify computes z = TopK(ReLU((x − b_dec)·encoder.weightᵀ + encoder.bias)),
    x̂ = z·W_dec + b_dec, which is SAE-Lens `topk` with `apply_b_dec_to_input=True`,
    W_enc = encoder.weightᵀ, b_enc = encoder.bias, W_dec = W_dec, b_dec = b_dec and k = cfg `k`.

    - Site: `hook_name` defaults to the folder's (`layers.L` → `blocks.L.hook_resid_post`: sparsify
      hooks a layer's output, `sparsify_hook_name`).
    - Unit-norm decoders (sparsify's default `normalize_decoder`) convert with
      `rescale_acts_by_decoder_norm=True`, so SAE-Lens's `fold_W_dec_norm` (which sae-dashboard
      calls) works; the norms are 1 to within float32 rounding, so in float32 the top-k indices
      equal sparsify's and the values and reconstruction agree to about 1e-6 relative (the tests
      use rtol 1e-5, atol 1e-5). Other decoders keep `rescale_acts_by_decoder_norm=False` and are
      bit-exact, but cannot be folded.
    - `multi_topk` only adds a training loss (a second decode with 4k latents): such a checkpoint
      converts to a plain `topk` SAE with its `k`.
    - `dtype` (default float32; None keeps the stored dtype, e.g. bfloat16 for lmms-lab's SAEs, half the size).

    Skip connections, transcoders and non-TopK activations are refused.

    Example:
        >>> import json, tempfile, torch
        >>> from pathlib import Path
        >>> from safetensors.torch import save_file
        >>> d = Path(tempfile.mkdtemp()) / "layers.4"
        >>> d.mkdir()
        >>> _ = (d / "cfg.json").write_text(json.dumps({"d_in": 8, "num_latents": 32, "k": 4}))
        >>> save_file({"encoder.weight": torch.randn(32, 8), "encoder.bias": torch.zeros(32),
        ...            "W_dec": torch.randn(32, 8), "b_dec": torch.zeros(8)}, d / "sae.safetensors")
        >>> sae = convert_sparsify_checkpoint(d)
        >>> sae.cfg.k, sae.cfg.metadata.hook_name, int((sae.encode(torch.randn(2, 8)) > 0).sum(-1).max()) <= 4
        (4, 'blocks.4.hook_resid_post', True)
    """
    src = Path(src)
    cfg_path = src / "cfg.json"
    if not cfg_path.exists():
        raise InputError(f"{cfg_path} not found: a sparsify checkpoint is a folder with cfg.json and sae.safetensors "
                         "(for a run folder of several hookpoints use convert_sparsify_run)")
    fix = "re-download the checkpoint, or write a sparsify cfg.json ({\"d_in\": ..., \"num_latents\": ..., \"k\": ...})"
    c = read_json(cfg_path, fix)
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
    dt = _dtype(dtype, sd["encoder.weight"].dtype)
    w_enc = sd["encoder.weight"].to(dt)
    if w_enc.ndim != 2:
        raise InputError(f"{src / 'sae.safetensors'}: encoder.weight has shape {tuple(w_enc.shape)}, not "
                         "(num_latents, d_in): re-download the checkpoint")
    d_sae, d_in = w_enc.shape
    for key, value in (("d_in", d_in), ("num_latents", d_sae)):
        if c.get(key) not in (None, 0, value):  # sparsify writes num_latents=0 when expansion_factor sets it
            raise InputError(f"{cfg_path} says {key}={c[key]!r} but encoder.weight in sae.safetensors has shape "
                             f"{tuple(w_enc.shape)} (num_latents, d_in): fix {key}, or re-download the checkpoint")
    k = c.get("k")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= d_sae:
        raise InputError(f"{cfg_path} says k={k!r}: a TopK SAE keeps k latents of its {d_sae}, so k must be an int "
                         f"in 1..{d_sae}; fix k in cfg.json")
    check_tensors(src / "sae.safetensors", {k_: sd[k_] for k_ in ("encoder.bias", "W_dec", "b_dec")},
                  {"encoder.bias": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)},
                  f"its encoder.weight {tuple(w_enc.shape)} (num_latents={d_sae}, d_in={d_in})",
                  "Re-download the checkpoint, or convert the folder it came from.")
    w_dec = sd["W_dec"].to(dt)
    unit = bool(((w_dec.float().norm(dim=-1) - 1).abs() <= SPARSIFY_UNIT_NORM_TOL).all())
    hook = hook_name if hook_name is not None else sparsify_hook_name(src.name)
    meta = _converted_metadata({"format": "sparsify", "folder": src.name, "cfg": c}, model_name, hook)
    cfg = TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, apply_b_dec_to_input=True,
                        rescale_acts_by_decoder_norm=unit, dtype=str(dt).removeprefix("torch."), metadata=meta)
    sae = as_multimodal(TopKSAE(cfg))
    sae.load_state_dict({"W_enc": w_enc.T.contiguous(), "b_enc": sd["encoder.bias"].to(dt),
                         "W_dec": w_dec.contiguous(), "b_dec": sd["b_dec"].to(dt)})
    if out is not None:
        export(sae, out)
    return sae


def convert_sparsify_run(
    src: str | Path,
    out: str | Path | None = None,
    *,
    model_name: str | None = None,
    dtype: str | torch.dtype | None = "float32",
) -> dict[str, SAE]:
    """Convert every hookpoint folder of a sparsify run (`layers.0/`, `layers.1/`, ...), each to `out/<folder>`.

    `model_name` defaults to the run's `config.json` `model` when present. Returns {folder: SAE}
    in layer order.

    Example:
        >>> import json, tempfile, torch
        >>> from pathlib import Path
        >>> from safetensors.torch import save_file
        >>> run = Path(tempfile.mkdtemp())
        >>> for L in (0, 1):
        ...     (run / f"layers.{L}").mkdir()
        ...     _ = (run / f"layers.{L}" / "cfg.json").write_text(json.dumps({"d_in": 8, "num_latents": 16, "k": 2}))
        ...     save_file({"encoder.weight": torch.randn(16, 8), "encoder.bias": torch.zeros(16),
        ...                "W_dec": torch.randn(16, 8), "b_dec": torch.zeros(8)}, run / f"layers.{L}" / "sae.safetensors")
        >>> {k: s.cfg.metadata.hook_name for k, s in convert_sparsify_run(run).items()}
        {'layers.0': 'blocks.0.hook_resid_post', 'layers.1': 'blocks.1.hook_resid_post'}
    """
    src = Path(src)
    folders = [p for p in src.iterdir() if (p / "cfg.json").exists() and (p / "sae.safetensors").exists()] \
        if src.is_dir() else []
    if not folders:
        raise InputError(f"{src} holds no sparsify hookpoint folders (each with cfg.json and sae.safetensors)")
    run_cfg = src / "config.json"
    if model_name is None and run_cfg.exists():
        model_name = read_json(run_cfg, "fix or delete it, or pass model_name=").get("model")

    def order(p: Path) -> tuple:
        return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name))

    return {p.name: convert_sparsify_checkpoint(p, None if out is None else Path(out) / p.name,
                                                model_name=model_name, dtype=dtype)
            for p in sorted(folders, key=order)}
