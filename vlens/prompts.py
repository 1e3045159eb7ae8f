"""Every prompt of the paper's experiments, in one place, with one convention.

**The convention**: a prompt that goes with an image carries its `<image>`
placeholder, where the image goes (here always first, then a newline).
`VLM.prepare` wraps it in the model's chat template, which places the image
as the family requires; never prepend `<image>` by hand to these constants.
`with_image(text)` adds the placeholder to a text that has none.

    >>> from vlens import prompts
    >>> prompts.QUESTION
    '<image>\\nWhat is shown in this image?'
    >>> prompts.two_choice_prompt("cat", "dog")[:29]
    '<image>\\nReply either "cat" or'
    >>> prompts.with_image("Describe the image.") == prompts.CAPTION_PROMPT
    True
"""

from __future__ import annotations

from .errors import InputError

__all__ = [
    "IMAGE", "PROBE_PROMPT", "QUESTION", "CAPTION_PROMPT", "TWO_CHOICE", "COLOUR_QUESTION", "SHAPE_QUESTION",
    "with_image", "two_choice_prompt",
]

#: The image placeholder every family's `prepare` understands.
IMAGE = "<image>"
#: The paper's probe prompt: the image alone (features are the mean over its tokens).
PROBE_PROMPT = IMAGE
#: The question the toy model answers with a class name; vlens's default harvest prompt.
QUESTION = IMAGE + "\nWhat is shown in this image?"
#: The prompt before each caption when a caption is scored or harvested (captions are appended as answers).
CAPTION_PROMPT = IMAGE + "\nDescribe the image."
#: The paper's two-choice efficacy prompt, formatted with the source and target class names.
TWO_CHOICE = (
    IMAGE + '\nReply either "{src}" or "{tgt}" in lowercase depending on what is shown in the image. '
    "Do not output any other text."
)
#: Toy-model questions about one attribute.
COLOUR_QUESTION = IMAGE + "\nWhat colour is the shape?"
SHAPE_QUESTION = IMAGE + "\nWhat shape is it?"


def with_image(text: str) -> str:
    """`text` with the image placeholder in front, unless it already has one (never doubled).

    Example:
        >>> with_image("What is it?"), with_image("<image>\\nWhat is it?")
        ('<image>\\nWhat is it?', '<image>\\nWhat is it?')
    """
    if not isinstance(text, str):
        raise InputError(f"a prompt must be a string, not {type(text).__name__}")
    return text if IMAGE in text else f"{IMAGE}\n{text}"


def two_choice_prompt(src: str, tgt: str) -> str:
    """The paper's two-choice prompt for a source and target class name.

    Example:
        >>> two_choice_prompt("red circle", "blue square").count("<image>")
        1
    """
    return TWO_CHOICE.format(src=src, tgt=tgt)
