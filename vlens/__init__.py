"""vlens: interpretability for vision-language models, LLaVA-Next first.

    import vlens
    vlm = vlens.load("toy")                         # or a hub id, or vlens.tiny()
    batch = vlm.prepare(["<image>\\nWhat is shown in this image?"], [image])
    with vlm.trace(batch):
        h = vlm.resid_pre(3).save()

One module per concept of the paper (docs/architecture.md has the map):
`sites` (the site table), `tokens` (token geometry and selections),
`families` (what each model family needs), `prepare`, `model` (`VLM`),
`loading`, `activations` (read, harvest, stores), `prompts`, `scoring`,
`probes`, `sparsity`, `steering`, `interventions`, `sae` (multimodal SAEs),
`lens`, `attribution`, `viz`, `data`, `toy`, `demo`, `explorer` (`vlens.explore`), `cli`,
`errors`.
"""

from . import (
    data, errors, families, interventions, probes, prompts, scoring, sites, sparsity, steering, tokens, toy,
)
from .activations import ActivationStore, harvest, read_layers
from .errors import VlensError
from .loading import load, tiny
from .model import VLM
from .steering import steered_generate
from .tokens import Batch, TokenLayout

__version__ = "0.3.0"
__all__ = [
    "VLM", "Batch", "TokenLayout", "ActivationStore", "VlensError", "load", "tiny", "harvest", "read_layers",
    "steered_generate", "data", "errors", "families", "interventions", "probes", "prompts", "scoring", "sites",
    "sparsity", "steering", "tokens", "toy",
]


#: Heavier subpackages, imported on first use (`vlens.sae` brings SAE-Lens).
_LAZY = ("sae", "viz", "demo", "cli", "distributed", "explorer", "lens", "attribution")


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    if name == "explore":  # the function; its package is vlens.explorer (the `explore` extra)
        from .explorer import explore

        return explore
    raise AttributeError(f"module 'vlens' has no attribute {name!r}")
