"""LLaVA-OneVision (LlavaOnevisionForConditionalGeneration): anyres tiles, unpadding, newlines, a token budget.

What is specific to LLaVA-OneVision lives here:

- module paths: the same trees as LLaVA-Next (`LAYOUTS`, shared), with a
  SigLIP tower (no CLS token: the 'full' feature strategy) and a Qwen2 LM;
- token geometry (`image_geometry`, following `LlavaOnevisionModel.pack_image_features`
  and `LlavaOnevisionProcessor._get_number_of_features`): a base tile of g×g
  patches (the image stretched to the tower's square), then the high-res
  canvas of its pinpoint grid (up to 6×6 tiles), unpadded as in LLaVA-Next,
  each kept row closed by a newline token. When the unpadded canvas holds more
  than 1.1² times `max_tiles` tiles of features (`vision_aspect_ratio`
  'anyres_max_9'), the model shrinks it bilinearly: each of those tokens then
  mixes up to 2×2 canvas patches, its box is the union of their boxes and its
  tile, row, col name the nearest. In a prompt holding several images (the
  processor groups images by prompt: `batch_num_images`) each image gets only
  a base tile, of the image padded to a square, and one newline;
- the ChatML template of llava-hf/llava-onevision-qwen2-*-ov-hf, images first,
  and a word-level tokenizer with the Qwen2 special tokens (no BOS);
- tiny random builds (`tiny_processor`, `tiny_config`) made offline.

    >>> from vlens.families.llava_onevision import image_geometry, PINPOINTS
    >>> g = image_geometry((384, 384), pinpoints=PINPOINTS, tile_size=384, patch_size=14)
    >>> g.n_tokens, g.count("base"), g.count("newline")
    (1485, 729, 27)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import InputError
from ..tokens import HIGHRES, NEWLINE, ImageGeometry
from . import Family, processor_without_video, register, text_sizes
from .llava import CHAT_WORDS
from .llava import image_geometry as _fixed_grid
from .llava_next import LAYOUTS, patch_local
from .llava_next import image_geometry as _anyres
from .wordlevel import word_tokenizer

if TYPE_CHECKING:
    from transformers import LlavaOnevisionConfig, LlavaOnevisionProcessor

__all__ = [
    "LlavaOnevision", "CHAT_TEMPLATE", "SPECIAL_TOKENS", "PINPOINTS", "pinpoints", "max_tiles",
    "bilinear_weights", "image_geometry", "tiny_processor", "tiny_config",
]

#: ChatML template of llava-hf/llava-onevision-qwen2-*-ov-hf: images first, each on its own line.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: Special tokens of llava-onevision-qwen2's tokenizer (Qwen2's, `<image>`, `<video>`), plus the stand-in's `<unk>`.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>", "<unk>"]


def pinpoints(tile_size: int, max_grid: int = 6) -> list[list[int]]:
    """The anyres canvases (height, width) of LLaVA-OneVision: every grid of 1..`max_grid` tiles a side.

    Example:
        >>> len(pinpoints(384)), pinpoints(384)[:2], pinpoints(32, 2)
        (36, [[384, 384], [384, 768]], [[32, 32], [32, 64], [64, 32], [64, 64]])
    """
    return [[tile_size * i, tile_size * j] for i in range(1, max_grid + 1) for j in range(1, max_grid + 1)]


#: The canvases of llava-onevision-qwen2 checkpoints (384-px tiles, up to 6×6).
PINPOINTS = pinpoints(384)


def max_tiles(vision_aspect_ratio: str) -> int:
    """The tile budget of a `vision_aspect_ratio` such as 'anyres_max_9'.

    Example:
        >>> max_tiles("anyres_max_9")
        9
    """
    text = str(vision_aspect_ratio)
    if not text.startswith("anyres_max_") or not text[len("anyres_max_"):].isdigit():
        raise InputError(f"vision_aspect_ratio must look like 'anyres_max_9', not {vision_aspect_ratio!r}")
    return int(text[len("anyres_max_"):])


def bilinear_weights(n_in: int, n_out: int) -> Float[Tensor, "n_out n_in"]:
    """The weights by which `F.interpolate(mode="bilinear")` makes `n_out` values of `n_in`, per axis.

    Read off the operation itself (align_corners False, on one-hot inputs), so
    which inputs feed an output is exactly what the model computes.

    Example:
        >>> w = bilinear_weights(4, 2)
        >>> w.tolist(), (w > 0).sum(1).tolist()
        ([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]], [2, 2])
    """
    eye = torch.eye(n_in).view(1, n_in, n_in, 1)
    out = torch.nn.functional.interpolate(eye, size=(n_out, 1), mode="bilinear")
    return out[0, :, :, 0].T.contiguous()


def image_geometry(
    size: tuple[int, int],
    *,
    pinpoints: Sequence[Sequence[int]],
    tile_size: int,
    patch_size: int,
    max_tiles: int = 9,
    multi_image: bool = False,
) -> ImageGeometry:
    """Token layout of one image of `size` (height, width) for LLaVA-OneVision.

    `tile_size` is the tower's square input in pixels, `patch_size` its patch
    side, `max_tiles` the budget of 'anyres_max_N'. `multi_image` is the layout
    of an image that shares its prompt with other images: the image padded to
    a square, one base tile and one newline.

    Example:
        >>> pins = pinpoints(32, 3)
        >>> small = image_geometry((40, 40), pinpoints=pins, tile_size=32, patch_size=8, max_tiles=4)
        >>> small.n_tokens, small.tiles                    # 16 base + 8 rows × (8 + 1)
        (88, (2, 2))
        >>> big = image_geometry((96, 96), pinpoints=pins, tile_size=32, patch_size=8, max_tiles=4)
        >>> big.n_tokens, big.count("newline")             # the 12×12 canvas shrunk to 8×8
        (88, 8)
        >>> image_geometry((20, 60), pinpoints=pins, tile_size=32, patch_size=8, multi_image=True).n_tokens
        17
    """
    if multi_image:
        base = _fixed_grid(size, tile_size=tile_size, patch_size=patch_size, resize_to=(tile_size, tile_size),
                           center_crop=False, pad=True)
        return _with_newlines(base, rows=[base.grid - 1], n_cols=0)
    geo = _anyres(size, pinpoints=pinpoints, tile_size=tile_size, patch_size=patch_size, resize_to=tile_size)
    g = geo.grid
    n_rows = geo.count("newline")
    if n_rows == 0:  # an extreme aspect ratio: unpadding kept no canvas row
        return geo
    n_cols = geo.count("highres") // n_rows
    ratio = math.sqrt(n_rows * n_cols / (max_tiles * g * g))
    if ratio <= 1.1:
        return geo
    # The model shrinks the unpadded canvas to int(rows // ratio) × int(cols // ratio), bilinearly.
    hi = geo.kind == HIGHRES
    box = geo.box[hi].view(n_rows, n_cols, 4)
    tile, row, col = (t[hi].view(n_rows, n_cols) for t in (geo.tile, geo.row, geo.col))
    wy, wx = bilinear_weights(n_rows, int(n_rows // ratio)), bilinear_weights(n_cols, int(n_cols // ratio))
    (y_lo, y_hi), (x_lo, x_hi) = _support(wy), _support(wx)
    ny, nx = wy.argmax(1), wx.argmax(1)
    oh, ow = len(ny), len(nx)
    # Canvas boxes are a grid (x from the column, y from the row): a union of 2×2 boxes is one box.
    out_box = torch.stack(
        [
            box[0, x_lo, 0].expand(oh, ow),
            box[y_lo, 0, 1][:, None].expand(oh, ow),
            box[0, x_hi, 2].expand(oh, ow),
            box[y_hi, 0, 3][:, None].expand(oh, ow),
        ],
        -1,
    )
    body = ImageGeometry(
        size=geo.size, canvas=geo.canvas, tiles=geo.tiles, grid=g,
        kind=torch.full((oh * ow,), HIGHRES), tile=tile[ny][:, nx].flatten(), row=row[ny][:, nx].flatten(),
        col=col[ny][:, nx].flatten(), box=out_box.reshape(-1, 4),
    )
    n_base = geo.count("base")
    base = ImageGeometry(size=geo.size, canvas=geo.canvas, tiles=geo.tiles, grid=g, kind=geo.kind[:n_base],
                         tile=geo.tile[:n_base], row=geo.row[:n_base], col=geo.col[:n_base], box=geo.box[:n_base])
    return _with_newlines(base, rows=row[ny, 0].tolist(), n_cols=ow, body=body)


def _support(w: Tensor) -> tuple[Tensor, Tensor]:
    """First and last input with a nonzero weight, per output."""
    nz = w > 0
    idx = torch.arange(w.shape[1]).expand_as(w)
    return idx.masked_fill(~nz, w.shape[1]).amin(1), idx.masked_fill(~nz, -1).amax(1)


def _with_newlines(
    base: ImageGeometry, *, rows: list[int], n_cols: int, body: ImageGeometry | None = None
) -> ImageGeometry:
    """`base` tokens, then each of `len(rows)` rows of `n_cols` `body` tokens closed by a newline token."""
    parts = {k: [getattr(base, k)] for k in ("kind", "tile", "row", "col", "box")}
    for i, r in enumerate(rows):
        if body is not None:
            for k in parts:
                parts[k].append(getattr(body, k)[i * n_cols : (i + 1) * n_cols])
        parts["kind"].append(torch.tensor([NEWLINE]))
        parts["tile"].append(torch.tensor([-1]))
        parts["row"].append(torch.tensor([r]))
        parts["col"].append(torch.tensor([-1]))
        parts["box"].append(torch.full((1, 4), float("nan")))
    return ImageGeometry(
        size=base.size, canvas=(body or base).canvas, tiles=(body or base).tiles, grid=base.grid,
        **{k: torch.cat(v).long() if k != "box" else torch.cat(v).float() for k, v in parts.items()},
    )


def tiny_processor(
    words: Iterable[str] = (),
    *,
    image_size: int = 32,
    patch_size: int = 8,
    image_grid_pinpoints: Sequence[Sequence[int]] | None = None,
    vision_aspect_ratio: str = "anyres_max_4",
) -> "LlavaOnevisionProcessor":
    """A real `LlavaOnevisionProcessor` (with `LlavaOnevisionImageProcessor`) for a tiny SigLIP tower, offline.

    `image_size` is the tile side in pixels, `patch_size` the vision patch
    side; `image_grid_pinpoints` lists the canvases (default: every grid of
    1..3 tiles a side) and `vision_aspect_ratio` the token budget (default
    'anyres_max_4', so a 3×3 canvas is shrunk as 'anyres_max_9' shrinks 6×6).

    Example:
        >>> proc = tiny_processor()
        >>> type(proc).__name__, proc.num_image_tokens, len(proc.image_processor.image_grid_pinpoints)
        ('LlavaOnevisionProcessor', 16, 9)
    """
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    max_tiles(vision_aspect_ratio)
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_grid_pinpoints=[list(p) for p in (image_grid_pinpoints or pinpoints(image_size, 3))],
        image_mean=[0.5, 0.5, 0.5],  # SigLIP's
        image_std=[0.5, 0.5, 0.5],
    )
    return processor_without_video(
        LlavaOnevisionProcessor,
        image_processor=image_processor,
        tokenizer=word_tokenizer([*CHAT_WORDS, *words], specials=SPECIAL_TOKENS, bos=None, eos="<|im_end|>",
                                 pad="<|endoftext|>"),
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=vision_aspect_ratio,
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(
    processor: "LlavaOnevisionProcessor",
    *,
    d_model: int = 64,
    n_layers: int = 4,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_mlp: int | None = None,
    vision_d_model: int = 64,
    vision_layers: int = 2,
    vision_heads: int = 4,
    vision_feature_layer: int = -1,
    patch_size: int | None = None,
    **text_overrides: Any,
) -> "LlavaOnevisionConfig":
    """A `LlavaOnevisionConfig` (SigLIP tower, Qwen2 LM) whose sizes and token ids match `processor`.

    Same size keywords as LLaVA-Next; `vision_layers=0` gives a patch-local
    feature (see `vlens.families.llava_next.patch_local`). `patch_size` is the
    tower's (default: the tile side over the processor's patches per side).

    Example:
        >>> cfg = tiny_config(tiny_processor(), n_layers=2)
        >>> cfg.text_config.model_type, cfg.vision_config.model_type, cfg.vision_feature_select_strategy
        ('qwen2', 'siglip_vision_model', 'full')
    """
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    tok = processor.tokenizer
    ip = processor.image_processor
    side = ip.size["height"]
    layers, feature = patch_local(vision_layers, vision_feature_layer)
    text = Qwen2Config(
        **text_sizes(tok, d_model, n_layers, n_heads, n_kv_heads, d_mlp),
        pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
        **text_overrides,
    )
    vision = SiglipVisionConfig(
        hidden_size=vision_d_model, intermediate_size=4 * vision_d_model, num_hidden_layers=layers,
        num_attention_heads=vision_heads, image_size=side,
        patch_size=patch_size or side // math.isqrt(processor.num_image_tokens), vision_use_head=False,
    )
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=processor.image_token_id,
        video_token_index=processor.video_token_id,
        vision_feature_layer=feature,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=[list(p) for p in ip.image_grid_pinpoints],
        vision_aspect_ratio=processor.vision_aspect_ratio,
        tie_word_embeddings=False,
    )


class LlavaOnevision(Family):
    """LLaVA-OneVision: `LlavaOnevisionForConditionalGeneration`, e.g. llava-hf/llava-onevision-qwen2-7b-ov-hf.

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny(family="llava-onevision")
        >>> b = vlm.prepare(["<image>\\nWhat is shown?"], [Image.new("RGB", (64, 32))])
        >>> g = b.layout.images[0].geometry
        >>> g.n_tokens, g.tiles, g.count("newline")
        (52, (1, 2), 4)
    """

    name = "llava-onevision"
    model_types = ("llava_onevision",)
    layouts = LAYOUTS
    image_inputs = ("pixel_values", "image_sizes", "batch_num_images")

    def geometries(self, processor: Any, config: Any, encoding: Any) -> list[ImageGeometry]:
        vc = config.vision_config
        counts = encoding.get("batch_num_images")
        sizes = encoding["image_sizes"].tolist()
        counts = [1] * len(sizes) if counts is None else [int(n) for n in counts]
        multi = [n != 1 for n in counts for _ in range(n)]
        budget = max_tiles(config.vision_aspect_ratio)
        return [
            image_geometry(tuple(s), pinpoints=config.image_grid_pinpoints, tile_size=vc.image_size,
                           patch_size=vc.patch_size, max_tiles=budget, multi_image=m)
            for s, m in zip(sizes, multi)
        ]

    def tiny(self, seed: int = 0, **sizes: Any) -> tuple[torch.nn.Module, Any]:
        """A random tiny LLaVA-OneVision and its processor (keywords: `tiny_processor`, `tiny_config`)."""
        from transformers import LlavaOnevisionForConditionalGeneration

        if sizes.pop("backbone", "qwen2") != "qwen2":
            raise InputError("LLaVA-OneVision's language model is Qwen2: leave backbone unset (or 'qwen2')")
        proc_keys = ("words", "image_size", "patch_size", "image_grid_pinpoints", "vision_aspect_ratio")
        proc_sizes = {k: sizes.pop(k) for k in proc_keys if k in sizes}
        processor = tiny_processor(**proc_sizes)
        config = tiny_config(processor, patch_size=proc_sizes.get("patch_size"), **sizes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlavaOnevisionForConditionalGeneration(config)
        return model.eval(), processor


LLAVA_ONEVISION = register(LlavaOnevision())
