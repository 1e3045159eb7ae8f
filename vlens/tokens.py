"""Token geometry of a processed batch: which token is image, text or prompt, which tile, row and column, which pixels.

A model family turns one image into a run of image tokens; for LLaVA-Next

    [ base tile: g×g patches, row-major ]
    [ high-res canvas, unpadded: for each kept row, its kept patches, then one newline token ]

Each family computes its runs as `ImageGeometry` (see `vlens.families`), and
`TokenLayout` holds them for a whole batch, next to boolean masks of every
kind of token. `VLM.prepare` builds both, in a `Batch`.

A *token selection* names tokens of a batch. `select` resolves one to a
`[batch, seq]` bool mask, the same way everywhere in vlens (harvests,
interventions, steering, SAE data):

- a name: 'image', 'text', 'prompt', 'answer', 'bos', 'pad', 'all' (every
  non-padding token), 'base', 'highres', 'newline', or a '+'-joined union
  such as 'image+answer';
- a `[batch, seq]` bool tensor;
- int positions (an int, a list of ints, a 1-D int tensor; negative counts from the end);
- a function `layout -> mask`, such as `positions`, `one_image` and `tile` below.

    >>> import vlens; from PIL import Image
    >>> from vlens.tokens import select, tile
    >>> vlm = vlens.tiny()
    >>> b = vlm.prepare(["<image>\\nWhat is shown?"], [Image.new("RGB", (32, 32))], answers=["red"])
    >>> int(select(b, "answer").sum()), int(select(b, tile(0)).sum())
    (1, 16)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence, Union

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .errors import SelectionError

__all__ = [
    "BASE", "HIGHRES", "NEWLINE", "KIND_NAMES", "SELECTION_NAMES", "ImageGeometry", "ImageSpan", "TokenLayout",
    "Batch", "TokenSelection", "select", "check_selection", "positions", "one_image", "tile", "position_ids",
]

#: Kinds of image token, as stored in `ImageGeometry.kind`.
BASE, HIGHRES, NEWLINE = 0, 1, 2
KIND_NAMES = ("base", "highres", "newline")
_MASK_NAMES = ("image", "text", "prompt", "answer", "bos", "pad")
#: Every name a token selection may use (and '+'-joined unions of them).
SELECTION_NAMES = (*_MASK_NAMES, "all", *KIND_NAMES)

#: What `select` accepts (see the module docs).
TokenSelection = Union[str, int, Sequence[int], Tensor, Callable[["TokenLayout"], Tensor]]


@dataclass
class ImageGeometry:
    """Where each token of one image's run comes from.

    All per-token tensors have one entry per image token, in sequence order.
    `tile` is 0 for the base tile and 1.. for high-res tiles in raster order
    (-1 for newline tokens); `row`, `col` index the patch inside its tile;
    `box` is (x0, y0, x1, y1) in pixels of the original image (NaN for
    newline tokens).
    """

    size: tuple[int, int]
    canvas: tuple[int, int]
    tiles: tuple[int, int]
    grid: int
    kind: Int[Tensor, " n"]
    tile: Int[Tensor, " n"]
    row: Int[Tensor, " n"]
    col: Int[Tensor, " n"]
    box: Float[Tensor, "n 4"]

    @property
    def n_tokens(self) -> int:
        return int(self.kind.numel())

    def count(self, kind: str) -> int:
        """Number of tokens of a kind ('base', 'highres' or 'newline')."""
        return int((self.kind == KIND_NAMES.index(kind)).sum())


@dataclass
class ImageSpan:
    """One image inside a batch: its row, the [start, end) of its token run, its geometry."""

    image: int
    batch_index: int
    start: int
    end: int
    geometry: ImageGeometry

    def positions(self, kind: str | None = None) -> Int[Tensor, " n"]:
        """Sequence positions of this image's tokens, optionally of one kind ('base', 'highres', 'newline')."""
        pos = torch.arange(self.start, self.end)
        if kind is None:
            return pos
        return pos[self.geometry.kind == KIND_NAMES.index(kind)]


@dataclass
class TokenLayout:
    """Which token is what, for one processed batch.

    Masks are boolean [batch, seq]: `image`, `text` (= `prompt` | `answer`),
    `prompt` (instruction and template tokens), `answer` (appended answers
    or captions), `bos`, `pad`. `images` lists an `ImageSpan` per image.

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny()
        >>> batch = vlm.prepare(["<image>\\nWhat is shown?"], [Image.new("RGB", (32, 32))])
        >>> int(batch.layout.image.sum()) == batch.layout.images[0].geometry.n_tokens
        True
    """

    input_ids: Int[Tensor, "batch seq"]
    image: Bool[Tensor, "batch seq"]
    prompt: Bool[Tensor, "batch seq"]
    answer: Bool[Tensor, "batch seq"]
    bos: Bool[Tensor, "batch seq"]
    pad: Bool[Tensor, "batch seq"]
    images: list[ImageSpan] = field(default_factory=list)

    @property
    def text(self) -> Bool[Tensor, "batch seq"]:
        return self.prompt | self.answer

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)  # type: ignore[return-value]

    def kind_mask(self, kind: str) -> Bool[Tensor, "batch seq"]:
        """Mask of image tokens of one kind: 'base', 'highres' or 'newline'."""
        m = torch.zeros(self.shape, dtype=torch.bool)
        for span in self.images:
            m[span.batch_index, span.positions(kind)] = True
        return m

    def image_mask(self, image: int) -> Bool[Tensor, "batch seq"]:
        """Mask of the tokens of image number `image` (in the order images were given)."""
        span = self.images[image]
        m = torch.zeros(self.shape, dtype=torch.bool)
        m[span.batch_index, span.start : span.end] = True
        return m

    def select(self, tokens: TokenSelection) -> Bool[Tensor, "batch seq"]:
        """A [batch, seq] mask from a token selection (see `vlens.tokens.select`).

        Example:
            >>> import vlens; from PIL import Image
            >>> vlm = vlens.tiny()
            >>> b = vlm.prepare(["<image>\\nWhat is shown?"], [Image.new("RGB", (32, 32))], answers=["red"])
            >>> int(b.layout.select("answer").sum())
            1
        """
        return select(self, tokens)

    def image_token_table(self) -> dict[str, Tensor]:
        """Per image token, in `input_ids[image]` order: image index, kind, tile, row, col, box.

        Example:
            >>> import vlens; from PIL import Image
            >>> vlm = vlens.tiny()
            >>> t = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))]).layout.image_token_table()
            >>> sorted(t)
            ['box', 'col', 'image', 'kind', 'row', 'tile']
        """
        spans = sorted(self.images, key=lambda s: (s.batch_index, s.start))
        return {
            "image": torch.cat([torch.full((s.geometry.n_tokens,), s.image) for s in spans]),
            "kind": torch.cat([s.geometry.kind for s in spans]),
            "tile": torch.cat([s.geometry.tile for s in spans]),
            "row": torch.cat([s.geometry.row for s in spans]),
            "col": torch.cat([s.geometry.col for s in spans]),
            "box": torch.cat([s.geometry.box for s in spans]),
        }

    def summary(self) -> str:
        """A few lines describing the batch, for printing."""
        lines = [f"batch of {self.shape[0]} sequences × {self.shape[1]} tokens"]
        for b in range(self.shape[0]):
            counts = {k: int(getattr(self, k)[b].sum()) for k in ("image", "prompt", "answer", "bos", "pad")}
            lines.append(f"  row {b}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        for s in self.images:
            g = s.geometry
            lines.append(
                f"  image {s.image} (row {s.batch_index}, {g.size[1]}×{g.size[0]} px, canvas "
                f"{g.canvas[1]}×{g.canvas[0]}, {g.tiles[0]}×{g.tiles[1]} tiles): tokens {s.start}..{s.end} = "
                f"{g.count('base')} base + {g.count('highres')} high-res + {g.count('newline')} newline"
            )
        return "\n".join(lines)


@dataclass
class Batch:
    """A processed batch: model `inputs` (pass to `VLM.trace` / `VLM.generate`) and its `layout`."""

    inputs: dict
    layout: TokenLayout
    prompts: list[str] = field(default_factory=list)

    def to(self, device) -> "Batch":
        """Move the model inputs to `device`."""
        self.inputs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in self.inputs.items()}
        return self

    def __len__(self) -> int:
        return self.layout.shape[0]

    def repeat(self, n: int) -> "Batch":
        """`n` copies of this batch stacked along the rows (every tensor input repeated along its first axis).

        Example:
            >>> import vlens; from PIL import Image
            >>> b = vlens.tiny().prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
            >>> b3 = b.repeat(3)
            >>> len(b3), [s.batch_index for s in b3.layout.images]
            (3, [0, 1, 2])
        """
        L = self.layout
        rep = lambda t: t.repeat(n, *[1] * (t.dim() - 1))  # noqa: E731
        rows = L.shape[0]
        spans = [ImageSpan(c * len(L.images) + s.image, c * rows + s.batch_index, s.start, s.end, s.geometry)
                 for c in range(n) for s in L.images]
        layout = replace(L, input_ids=rep(L.input_ids), image=rep(L.image), prompt=rep(L.prompt),
                         answer=rep(L.answer), bos=rep(L.bos), pad=rep(L.pad), images=spans)
        inputs = {k: rep(v) if isinstance(v, Tensor) else v for k, v in self.inputs.items()}
        return Batch(inputs, layout, list(self.prompts) * n)


# -- resolving selections ------------------------------------------------------------------------------

_HELP = (
    "use one of " + ", ".join(repr(n) for n in SELECTION_NAMES) + ", a '+'-joined union, int positions, "
    "a [batch, seq] bool tensor, or a function layout -> mask"
)


def _layout_of(batch: Any) -> TokenLayout:
    if isinstance(batch, TokenLayout):
        return batch
    if isinstance(batch, Batch):
        return batch.layout
    raise SelectionError(
        f"a token selection needs the batch: pass the Batch from vlm.prepare (or its .layout), not {type(batch).__name__}"
    )


def check_selection(tokens: Any) -> None:
    """Fail early on a selection that can never resolve (an unknown name, a wrong type), before any model runs.

    Example:
        >>> check_selection("image+answer")
        >>> check_selection("images")
        Traceback (most recent call last):
        ...
        vlens.errors.SelectionError: unknown token selection 'images': use one of 'image', 'text', 'prompt', 'answer', 'bos', 'pad', 'all', 'base', 'highres', 'newline', a '+'-joined union, int positions, a [batch, seq] bool tensor, or a function layout -> mask
    """
    if isinstance(tokens, str):
        for part in tokens.split("+"):
            if part.strip() not in SELECTION_NAMES:
                raise SelectionError(f"unknown token selection {tokens!r}: {_HELP}")
    elif isinstance(tokens, bool) or not (
        isinstance(tokens, (int, Tensor, list, tuple, range)) or callable(tokens)
    ):
        raise SelectionError(f"a token selection cannot be a {type(tokens).__name__}: {_HELP}")


def _is_positions(tokens: Any) -> bool:
    if isinstance(tokens, bool):
        return False
    if isinstance(tokens, int):
        return True
    if isinstance(tokens, (list, tuple, range)):
        return all(isinstance(t, int) and not isinstance(t, bool) for t in tokens)
    return isinstance(tokens, Tensor) and tokens.dtype != torch.bool and tokens.dim() <= 1


def select(batch: "Batch | TokenLayout", tokens: TokenSelection, *, nonempty: bool = False) -> Bool[Tensor, "batch seq"]:
    """Resolve a token selection to a [batch, seq] bool mask, with clear errors. The one resolver of vlens.

    `nonempty=True` refuses a named selection that picks no token of this
    batch (an intervention on 'answer' in a batch without answers is a
    mistake; a harvest batch that selects nothing is merely skipped).

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny()
        >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
        >>> select(b, "image").equal(b.layout.image), int(select(b, [-1, -2]).sum())
        (True, 2)
    """
    layout = _layout_of(batch)
    check_selection(tokens)
    if _is_positions(tokens):
        pos = tokens.tolist() if isinstance(tokens, Tensor) else tokens
        mask = positions(pos)(layout)
    elif isinstance(tokens, Tensor):
        mask = tokens
    elif isinstance(tokens, str):
        mask = torch.zeros(layout.shape, dtype=torch.bool)
        for part in (p.strip() for p in tokens.split("+")):
            if part == "all":
                mask = mask | ~layout.pad
            elif part in KIND_NAMES:
                mask = mask | layout.kind_mask(part)
            else:
                mask = mask | getattr(layout, part)
    else:
        mask = tokens(layout)
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != layout.shape:
        raise SelectionError(
            f"a token selection must give a bool mask of the batch's [batch, seq] = {layout.shape}, got "
            f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}: build it from this "
            "batch's layout (e.g. batch.layout.image & ...)"
        )
    if nonempty and isinstance(tokens, str) and not mask.any():
        raise SelectionError(f"token selection {tokens!r} selects no token in this batch (is there an image / answer?)")
    return mask


def positions(pos: int | Sequence[int] | range) -> Callable[[TokenLayout], Bool[Tensor, "batch seq"]]:
    """Select sequence positions (the same in every row; negative counts from the end).

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny()
        >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
        >>> int(select(b, positions([-1, -2])).sum())
        2
    """
    pos = [pos] if isinstance(pos, int) else list(pos)

    def select_positions(layout: TokenLayout) -> Tensor:
        S = layout.shape[1]
        bad = [p for p in pos if not -S <= p < S]
        if bad:
            raise SelectionError(
                f"token positions {bad} are outside the sequence of length {S}: use positions in "
                f"[-{S}, {S}) (e.g. from batch.layout.images[i].start/end)"
            )
        m = torch.zeros(layout.shape, dtype=torch.bool)
        m[:, [p % S for p in pos]] = True
        return m

    return select_positions


def one_image(image: int) -> Callable[[TokenLayout], Bool[Tensor, "batch seq"]]:
    """Select the tokens of one image (its index in the order images were given to `prepare`).

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny()
        >>> b = vlm.prepare(["<image>\\nhi"] * 2, [Image.new("RGB", (32, 32))] * 2)
        >>> int(select(b, one_image(1))[0].sum())
        0
    """

    def select_image(layout: TokenLayout) -> Tensor:
        if not 0 <= image < len(layout.images):
            raise SelectionError(f"image {image} does not exist: this batch has images 0..{len(layout.images) - 1}")
        return layout.image_mask(image)

    return select_image


def tile(index: int, image: int | None = None) -> Callable[[TokenLayout], Bool[Tensor, "batch seq"]]:
    """Select the patch tokens of one tile: 0 is the base (global) tile, 1.. the high-res tiles in raster order.

    `image` restricts to one image; by default every image's tile `index`.

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny()
        >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
        >>> int(select(b, tile(0)).sum())   # 4×4 patches in the base tile
        16
    """

    def select_tile(layout: TokenLayout) -> Tensor:
        m = torch.zeros(layout.shape, dtype=torch.bool)
        spans = layout.images if image is None else [layout.images[image]]
        found = False
        for s in spans:
            pos = s.positions()[s.geometry.tile == index]
            found |= pos.numel() > 0
            m[s.batch_index, pos] = True
        if not found:
            n = max((int(s.geometry.tile.max()) for s in spans), default=-1)
            raise SelectionError(f"tile {index} does not exist: the selected image(s) have tiles 0..{n} (0 = base tile)")
        return m

    return select_tile


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: 0 at each row's first real token.

    Example:
        >>> position_ids(torch.tensor([[0, 1, 1], [1, 1, 1]])).tolist()
        [[0, 0, 1], [0, 1, 2]]
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
