"""Gemma Scope 2 SAEs and transcoders on vlens sites, read by SAE-Lens's own `gemma_3` loader.

Gemma Scope 2 (releases `google/gemma-scope-2-{270m,1b,4b,12b,27b}-{pt,it}`)
stores one folder per SAE: `<kind>/layer_L_width_W_l0_X/` holding
`config.json` (`architecture: "jump_relu"`, `hf_hook_point_in`, for
transcoders `hf_hook_point_out` and `affine_connection`) and
`params.safetensors` (`w_enc [d_in, d_sae]`, `w_dec [d_sae, d_out]`,
`b_enc`, `b_dec`, `threshold`, and `affine_skip_connection [d_in, d_out]`
for affine transcoders). SAE-Lens 6.54's `gemma_3` loader names the sites
from the folder kind:

| folder kind  | SAE-Lens architecture                  | hook name (in → out)                          | vlens site     |
|--------------|----------------------------------------|-----------------------------------------------|----------------|
| `resid_post` | `jumprelu`                             | `blocks.L.hook_resid_post`                    | `resid_post.L` |
| `attn_out`   | `jumprelu`                             | `blocks.L.attn.hook_z` (heads concatenated)   | `z.L`          |
| `mlp_out`    | `jumprelu`                             | `blocks.L.hook_mlp_out`                       | `mlp_out.L`    |
| `transcoder` | `jumprelu_transcoder` / `..._skip_...` | `blocks.L.hook_mlp_in` → `blocks.L.hook_mlp_out` | `mlp_in.L` → `mlp_out.L` |

`load_gemma_scope` runs that loader unchanged; for a local folder (a copy of
the release, or one written in its format) it answers the loader's two Hub
calls (`hf_hub_download`, `get_safetensors_tensor_shapes`) from the disk, so
what loads here is exactly what loads from the Hub. The multimodal Gemma 3
checkpoints have the same language-model layers as the text ones the SAEs
were trained on, so the hook names place them on `vlens.load`'s Gemma 3:
`vlens.interventions.splice_sae` and `splice_transcoder` run them on image
tokens.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any
from unittest import mock

from sae_lens import SAE
from sae_lens.loading import pretrained_sae_loaders as loaders
from sae_lens.util import str_to_dtype
from safetensors import safe_open

from ..errors import InputError

__all__ = ["load_gemma_scope"]


def _local_hub(root: Path) -> dict[str, Any]:
    """Stand-ins for the loader's two Hub calls, reading `root` (a local copy of a release)."""

    def download(repo_id: str, filename: str, subfolder: str | None = None, **_: Any) -> str:
        path = root / (f"{subfolder}/{filename}" if subfolder else filename)
        if not path.exists():
            if filename.endswith("config.json"):
                raise loaders.EntryNotFoundError(f"{path} not found")
            raise InputError(f"{path} not found: a Gemma Scope 2 folder holds params.safetensors (and config.json)")
        return str(path)

    def shapes(repo_id: str, filename: str) -> dict[str, list[int]]:
        with safe_open(str(download(repo_id, filename)), "pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}

    return {"hf_hub_download": download, "get_safetensors_tensor_shapes": shapes}


def load_gemma_scope(source: str | Path, folder: str, device: str = "cpu", dtype: str = "float32") -> SAE:
    """A Gemma Scope 2 SAE or transcoder, from a Hub release or a local folder in its format.

    Args:
        source: a Hub repo id (`"google/gemma-scope-2-4b-it"`) or a local directory holding `folder`.
        folder: the SAE's folder, e.g. `"mlp_out/layer_12_width_16k_l0_medium"` or
            `"transcoder/layer_12_width_16k_l0_medium"` (the layer and kind come from it).

    Example:
        >>> import tempfile, json, torch, pathlib
        >>> from safetensors.torch import save_file
        >>> root = pathlib.Path(tempfile.mkdtemp()); d = root / "mlp_out/layer_1_width_16_l0_small"
        >>> d.mkdir(parents=True)
        >>> _ = (d / "config.json").write_text(json.dumps({"architecture": "jump_relu", "model_name": "gemma-3-1b-pt"}))
        >>> save_file({"w_enc": torch.randn(64, 16), "w_dec": torch.randn(16, 64), "b_enc": torch.zeros(16),
        ...            "b_dec": torch.zeros(64), "threshold": torch.ones(16)}, str(d / "params.safetensors"))
        >>> sae = load_gemma_scope(root, "mlp_out/layer_1_width_16_l0_small")
        >>> type(sae).__name__, sae.cfg.metadata.hook_name
        ('JumpReLUSAE', 'blocks.1.hook_mlp_out')
    """
    local = Path(source)
    patches = _local_hub(local) if local.is_dir() else {}
    with mock.patch.multiple(loaders, **patches) if patches else nullcontext():
        try:
            cfg, state, _ = loaders.gemma_3_sae_huggingface_loader(
                repo_id=str(source), folder_name=folder, device=device, cfg_overrides={"dtype": dtype})
        except ValueError as e:
            raise InputError(f"{source}/{folder} is not a Gemma Scope 2 SAE folder that SAE-Lens reads: {e}") from None
    cfg = loaders.handle_config_defaulting(cfg)
    sae_cfg = SAE.get_sae_config_class_for_architecture(cfg["architecture"]).from_dict(cfg)
    sae = SAE.get_sae_class_for_architecture(sae_cfg.architecture())(sae_cfg)
    sae.process_state_dict_for_loading(state)
    sae.load_state_dict(state)
    return sae.to(dtype=str_to_dtype(dtype), device=device)
