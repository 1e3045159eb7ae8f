"""vlens: interpretability for vision-language models, LLaVA-Next first."""

from .model import VLM, load
from .positions import Batch, TokenLayout, image_geometry
from .tiny import tiny

__version__ = "0.1.0"
__all__ = ["VLM", "Batch", "TokenLayout", "image_geometry", "load", "tiny"]
