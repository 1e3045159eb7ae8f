"""Token geometry of a processed LLaVA-Next batch.

LLaVA-Next turns one image into a run of image tokens laid out as

    [ base tile: g×g patches, row-major ]
    [ high-res canvas, unpadded: for each kept row, its kept patches, then one newline token ]

where g = tile side / patch side (24 for the real model), the canvas is the
best pinpoint resolution cut into tiles, and "unpadded" drops the rows (or
columns) that only covered the letterbox padding. `image_geometry` computes
that layout from the image size and the processor settings alone, and
`TokenLayout` holds it for a whole batch, next to boolean masks of every
kind of token. `VLM.prepare` builds both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence, Union

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

#: Kinds of image token, as stored in `ImageGeometry.kind`.
BASE, HIGHRES, NEWLINE = 0, 1, 2
KIND_NAMES = ("base", "highres", "newline")

#: What `TokenLayout.select` accepts: a name or a function of the layout returning a [batch, seq] mask.
TokenSelection = Union[str, Callable[["TokenLayout"], Tensor], Tensor]


def select_best_resolution(size: tuple[int, int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The pinpoint canvas (height, width) LLaVA-Next picks for an image of `size` (height, width).

    Same rule as transformers: most effective resolution, then least waste.

    Example:
        >>> select_best_resolution((480, 640), [[336, 672], [672, 336], [672, 672]])
        (672, 672)
    """
    h, w = size
    best, best_eff, best_waste = None, 0, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)
        eff = min(int(w * scale) * int(h * scale), w * h)
        waste = ph * pw - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(ph), int(pw)), eff, waste
    assert best is not None, "image_grid_pinpoints is empty"
    return best


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


def image_geometry(
    size: tuple[int, int],
    *,
    pinpoints: Sequence[Sequence[int]],
    tile_size: int,
    patch_size: int,
    resize_to: int | None = None,
) -> ImageGeometry:
    """Token layout of one image of `size` (height, width) for LLaVA-Next.

    `tile_size` is the vision tower's input side (the processor's crop size),
    `patch_size` the vision patch side, `resize_to` the processor's shortest
    edge (defaults to `tile_size`). Follows `LlavaNextModel.pack_image_features`
    with the "default" feature strategy (CLS dropped).

    Example:
        >>> pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        >>> image_geometry((336, 336), pinpoints=pins, tile_size=336, patch_size=14).n_tokens
        1176
    """
    h, w = size
    g = tile_size // patch_size
    resize_to = resize_to or tile_size
    ch, cw = select_best_resolution(size, pinpoints)
    nth, ntw = ch // tile_size, cw // tile_size

    kinds, tiles, rows, cols, boxes = [], [], [], [], []

    # Base tile: the whole image stretched to resize_to², centre-cropped to tile_size².
    off = (resize_to - tile_size) / 2
    sx, sy = w / resize_to, h / resize_to
    r, c = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    r, c = r.flatten(), c.flatten()
    kinds.append(torch.full((g * g,), BASE))
    tiles.append(torch.zeros(g * g, dtype=torch.long))
    rows.append(r)
    cols.append(c)
    boxes.append(
        torch.stack(
            [
                (c * patch_size + off) * sx,
                (r * patch_size + off) * sy,
                ((c + 1) * patch_size + off) * sx,
                ((r + 1) * patch_size + off) * sy,
            ],
            -1,
        ).float()
    )

    # High-res canvas: rows × cols of patches, unpadded like transformers' unpad_image.
    H, W = nth * g, ntw * g
    r0, r1, c0, c1 = 0, H, 0, W
    if w / h > W / H:
        new_h = int(round(h * (W / w), 7))
        pad = (H - new_h) // 2
        r0, r1 = pad, H - pad
    else:
        new_w = int(round(w * (H / h), 7))
        pad = (W - new_w) // 2
        c0, c1 = pad, W - pad
    # Pixel mapping: the processor resizes keeping aspect ratio, then pads to the canvas, centred.
    if cw / w < ch / h:
        rw, rh = cw, min(math.ceil(h * cw / w), ch)
    else:
        rh, rw = ch, min(math.ceil(w * ch / h), cw)
    px, py = (cw - rw) // 2, (ch - rh) // 2
    kx, ky = w / rw, h / rh
    px_per_patch = tile_size / g
    nan4 = torch.full((1, 4), float("nan"))
    for R in range(r0, r1):
        C = torch.arange(c0, c1)
        n = C.numel()
        kinds.append(torch.full((n,), HIGHRES))
        tiles.append(1 + (R // g) * ntw + C // g)
        rows.append(torch.full((n,), R % g))
        cols.append(C % g)
        x0 = (C * px_per_patch - px) * kx
        x1 = ((C + 1) * px_per_patch - px) * kx
        y0 = torch.full((n,), (R * px_per_patch - py) * ky)
        y1 = torch.full((n,), ((R + 1) * px_per_patch - py) * ky)
        boxes.append(torch.stack([x0, y0, x1, y1], -1).float())
        kinds.append(torch.tensor([NEWLINE]))
        tiles.append(torch.tensor([-1]))
        rows.append(torch.tensor([R % g]))
        cols.append(torch.tensor([-1]))
        boxes.append(nan4)

    box = torch.cat(boxes)
    lim = torch.tensor([w, h, w, h], dtype=box.dtype)
    box = torch.minimum(box.clamp(min=0), lim)
    return ImageGeometry(
        size=(h, w),
        canvas=(ch, cw),
        tiles=(nth, ntw),
        grid=g,
        kind=torch.cat(kinds).long(),
        tile=torch.cat(tiles).long(),
        row=torch.cat(rows).long(),
        col=torch.cat(cols).long(),
        box=box,
    )


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
        """A [batch, seq] mask from a selection.

        Names: 'image', 'text', 'prompt', 'answer', 'bos', 'pad', 'all' (every
        non-padding token), 'base', 'highres', 'newline', 'image+answer' (any
        '+'-joined union). Or a boolean tensor, or a function of the layout.

        Example:
            >>> import vlens; from PIL import Image
            >>> vlm = vlens.tiny()
            >>> b = vlm.prepare(["<image>\\nWhat is shown?"], [Image.new("RGB", (32, 32))], answers=["red"])
            >>> int(b.layout.select("answer").sum())
            1
        """
        if isinstance(tokens, Tensor):
            mask = tokens
        elif callable(tokens):
            mask = tokens(self)
        elif isinstance(tokens, str) and "+" in tokens:
            mask = torch.zeros(self.shape, dtype=torch.bool)
            for part in tokens.split("+"):
                mask = mask | self.select(part.strip())
        elif tokens == "all":
            mask = ~self.pad
        elif tokens in ("image", "text", "prompt", "answer", "bos", "pad"):
            mask = getattr(self, tokens)
        elif tokens in KIND_NAMES:
            mask = self.kind_mask(tokens)
        else:
            raise ValueError(
                f"unknown token selection {tokens!r}: use one of 'image', 'text', 'prompt', 'answer', "
                "'bos', 'pad', 'all', 'base', 'highres', 'newline', a '+'-joined union, "
                "a [batch, seq] bool tensor, or a function layout -> mask"
            )
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != self.shape:
            raise ValueError(
                f"a token selection must give a bool mask of shape {self.shape}, "
                f"got {getattr(mask, 'dtype', type(mask))} {tuple(getattr(mask, 'shape', ()))}"
            )
        return mask

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
