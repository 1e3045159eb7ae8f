"""vlens: interpretability for vision-language models, LLaVA-Next first.

    import vlens
    vlm = vlens.load("toy")                         # or a llava-hf LLaVA-Next id, or vlens.tiny()
    batch = vlm.prepare(["<image>\\nWhat is shown in this image?"], [image])
    with vlm.trace(batch):
        h = vlm.resid_pre(3).save()

Modules, one per concept of the paper: `model` (the `VLM` wrapper), `positions`
(token geometry), `harvest`, `probes`, `steering`, `interventions`, `sae`
(multimodal SAEs), `toy` (the embedded toy model), `data`, `distributed`,
`report`.
"""

from . import data, interventions, probes, steering, toy
from .harvest import ActivationStore, harvest
from .model import VLM, load
from .positions import Batch, TokenLayout, image_geometry
from .steering import steered_generate
from .tiny import tiny

__version__ = "0.1.0"
__all__ = [
    "VLM", "Batch", "TokenLayout", "ActivationStore", "image_geometry", "load", "tiny", "harvest",
    "steered_generate", "data", "interventions", "probes", "steering", "toy",
]
