"""Token roles and modality codes: the one table of what each token of a batch is, as numbers and colours.

Beside the token geometry (`vlens.tokens`): the store's `modality` and `role`
columns, harvest, the SAE statistics, the selection figures and the token-layout
figure (`vlens.viz`) all read their codes, names and colours here.

- **Modality** (`IMAGE` = 1, `TEXT` = 0; a pooled row over both is `MIXED` = 2):
  the store's `modality` column and the labels of SAE training data.
- **Role** (`ROLE_NAMES`, `role_codes`): image, prompt, answer, BOS, other; the
  store's `role` column, coloured by `ROLE_COLOURS` in the selection figures.
- **Layout kind** (`LAYOUT_KINDS`, `layout_kind_codes`): the finer split the
  token-layout figure draws (padding, BOS, prompt, base tile, high-res tiles,
  newline, answer), each with its colour.

This module imports nothing from vlens at run time (the layout is duck-typed),
so every layer may read it.

    >>> import vlens
    >>> from PIL import Image
    >>> b = vlens.tiny().prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
    >>> ROLE_NAMES[int(role_codes(b.layout)[0, 0])], MODALITY["image"] == IMAGE
    ('bos', True)
"""

from __future__ import annotations

from typing import Any, TYPE_CHECKING

import torch
from jaxtyping import Int
from torch import Tensor

if TYPE_CHECKING:
    from .tokens import TokenLayout

__all__ = [
    "IMAGE", "TEXT", "MIXED", "MODALITY", "ROLE_NAMES", "ROLE_COLOURS", "role_codes", "LAYOUT_KINDS",
    "layout_kind_codes",
]

#: Modality codes: 1 = image token, 0 = text token (the store's `modality` column, SAE training labels).
IMAGE, TEXT = 1, 0
#: A pooled row whose selected tokens are of both modalities.
MIXED = 2
#: Modality names -> codes.
MODALITY = {"image": IMAGE, "text": TEXT}

#: Names of the `role` codes 0..4 (the store's `role` column).
ROLE_NAMES = ("image", "prompt", "answer", "bos", "other")
#: Colours of the roles image, prompt, answer, BOS, other (the selection figures).
ROLE_COLOURS = ("#e8743b", "#4c78a8", "#54a24b", "#b279a2", "#9d9d9d")


def role_codes(layout: TokenLayout) -> Int[Tensor, "batch seq"]:
    """The `role` code of every token of a batch: 0 image, 1 prompt, 2 answer, 3 BOS, 4 other (`ROLE_NAMES`).

    Example:
        >>> import vlens; from PIL import Image
        >>> b = vlens.tiny().prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
        >>> codes = role_codes(b.layout)
        >>> int(codes[0, 0]), bool((codes[b.layout.image] == 0).all())
        (3, True)
    """
    role = torch.full(layout.shape, 4, dtype=torch.int8)
    role[layout.answer] = 2
    role[layout.prompt] = 1
    role[layout.bos] = 3
    role[layout.image] = 0
    return role


#: Kinds of tokens the token-layout figure draws, with their colours (index = `layout_kind_codes` value).
LAYOUT_KINDS = [
    ("padding", "#e6e6e6"),
    ("BOS", "#222222"),
    ("prompt / template", "#4c78a8"),
    ("image: base tile", "#f58518"),
    ("image: high-res tiles", "#54a24b"),
    ("image: newline", "#e45756"),
    ("answer", "#b279a2"),
]


def layout_kind_codes(layout: Any) -> Tensor:
    """Per `[batch, seq]` position of a `TokenLayout`, its index into `LAYOUT_KINDS`.

    Example:
        >>> import vlens
        >>> from PIL import Image
        >>> vlm = vlens.tiny()
        >>> b = vlm.prepare("<image>\\nWhat is it?", [Image.new("RGB", (32, 32))])
        >>> codes = layout_kind_codes(b.layout)
        >>> base = b.layout.images[0].geometry.count("base")
        >>> LAYOUT_KINDS[int(codes[0, 0])][0], int((codes == 3).sum()) == base
        ('BOS', True)
    """
    code = torch.zeros(layout.shape, dtype=torch.long)
    code[layout.bos] = 1
    code[layout.prompt & ~layout.bos] = 2
    code[layout.kind_mask("base")] = 3
    code[layout.kind_mask("highres")] = 4
    code[layout.kind_mask("newline")] = 5
    code[layout.answer] = 6
    code[layout.pad] = 0
    return code
