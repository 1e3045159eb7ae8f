"""The embedded toy LLaVA-Next: a tiny model trained in-project on generated shapes, so it truly sees.

    >>> import vlens
    >>> vlm = vlens.load("toy")                      # or vlens.toy.load_toy()
    >>> ds = vlens.toy.toy_dataset("heldout", n=2)   # coloured shapes with captions
    >>> batch = vlm.prepare([vlens.toy.QUESTION] * 2, [s.image for s in ds])

Data (`vlens.toy.data`): 20 classes "<colour> <shape>" (`CLASS_NAMES`),
captions in words, train / held-out splits by seed, steering pairs
(`class_pairs`). Prompts the model was trained on: `QUESTION` (-> class name),
`CAPTION_PROMPT` (-> caption), `two_choice_prompt(src, tgt)` (-> the true one
of the two names), `COLOUR_QUESTION`, `SHAPE_QUESTION`: the paper's prompts
of `vlens.prompts`, each carrying its `<image>` placeholder.

Model (`vlens.toy.model`): CLIP tower (3 layers x 64) + Mistral (6 layers x
64), 64x64 images -> 88 image tokens. Train with `vlens toy train`, score
with `vlens toy eval` (`vlens.toy.train`).
"""

from .data import (
    BACKGROUNDS,
    CAPTION_PROMPT,
    CLASS_NAMES,
    COLOUR_QUESTION,
    COLOURS,
    QUESTION,
    SHAPE_QUESTION,
    SHAPES,
    SIZES,
    ToyDataset,
    caption_of,
    class_pairs,
    label_of,
    render,
    toy_dataset,
    two_choice_prompt,
)
from .model import CHECKPOINT_DIR, ToyArch, build_model, build_processor, evaluate, load_toy

__all__ = [
    "BACKGROUNDS",
    "CAPTION_PROMPT",
    "CHECKPOINT_DIR",
    "CLASS_NAMES",
    "COLOURS",
    "COLOUR_QUESTION",
    "QUESTION",
    "SHAPES",
    "SHAPE_QUESTION",
    "SIZES",
    "ToyArch",
    "ToyDataset",
    "build_model",
    "build_processor",
    "caption_of",
    "class_pairs",
    "evaluate",
    "label_of",
    "load_toy",
    "render",
    "toy_dataset",
    "two_choice_prompt",
]
