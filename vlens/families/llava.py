"""LLaVA-1.5 (LlavaForConditionalGeneration): one fixed grid of patches per image.

What is specific to LLaVA-1.5 lives here:

- module paths: the same trees as LLaVA-Next across transformers releases
  (`LAYOUTS`, shared with `vlens.families.llava_next`);
- token geometry: the image is resized (shortest edge, aspect kept), centre
  cropped to the tower's square input, and becomes g×g patch tokens in raster
  order, the CLIP CLS token dropped (`image_geometry`, following
  `LlavaModel.get_image_features` and `LlavaImageProcessor`); no tiles, no
  newline tokens: 576 tokens per image at 336 px;
- the Vicuna-style chat template of llava-hf/llava-1.5-7b-hf
  (`USER: <image>\\n... ASSISTANT:`);
- tiny random builds (`tiny_processor`, `tiny_config`) made offline: a real
  `LlavaProcessor` with `LlavaImageProcessor`, CLIP tower, Llama language model.

    >>> from vlens.families.llava import image_geometry
    >>> image_geometry((480, 640), tile_size=336, patch_size=14).n_tokens
    576
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Iterable

import torch

from ..errors import InputError, UnsupportedModelError
from ..tokens import BASE, ImageGeometry
from . import Family, register
from .llava_next import LAYOUTS
from .llava_next import patch_local
from .llava_next import tiny_config as _llava_next_config
from .wordlevel import word_tokenizer

if TYPE_CHECKING:
    from transformers import LlavaConfig, LlavaProcessor

__all__ = ["Llava", "CHAT_TEMPLATE", "CHAT_WORDS", "resized_size", "image_geometry",
           "tiny_processor", "tiny_config"]

#: Vicuna-style chat template of llava-hf/llava-1.5-7b-hf: `USER: <image>\n{text} ASSISTANT:`.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

#: Words of the chat templates that tiny vocabularies must know (role names).
CHAT_WORDS = ("user", "assistant", "system")


def resized_size(size: tuple[int, int], resize_to: int | tuple[int, int]) -> tuple[int, int]:
    """The (height, width) an HF image processor resizes an image of `size` (height, width) to.

    An int is the shortest edge (aspect kept, the long side truncated, as
    `transformers.image_transforms.get_resize_output_image_size`); a pair is
    the exact (height, width).

    Example:
        >>> resized_size((480, 640), 336), resized_size((640, 480), 336), resized_size((5, 7), (32, 32))
        ((336, 448), (448, 336), (32, 32))
    """
    if not isinstance(resize_to, int):
        return int(resize_to[0]), int(resize_to[1])
    h, w = size
    if w <= h:
        return int(resize_to * h / w), resize_to
    return resize_to, int(resize_to * w / h)


def image_geometry(
    size: tuple[int, int],
    *,
    tile_size: int,
    patch_size: int,
    resize_to: int | tuple[int, int] | None = None,
    center_crop: bool = True,
    pad: bool = False,
) -> ImageGeometry:
    """Token layout of one image of `size` (height, width) for LLaVA-1.5: g×g base patches, raster order.

    The processor optionally pads the image to a square (`pad`, centred), resizes
    it (`resize_to`: the shortest edge, default `tile_size`, or an exact
    (height, width)), centre crops `tile_size`² (`center_crop`), and the tower
    cuts `patch_size`² patches; the CLS token is dropped. Boxes are each
    patch's pixels in the original image (clamped to it; a patch of pure
    padding has an empty box).

    Example:
        >>> g = image_geometry((100, 200), tile_size=32, patch_size=8)
        >>> g.n_tokens, g.box[0].tolist()          # the crop keeps the middle 100×100 pixels
        (16, [50.0, 0.0, 75.0, 25.0])
    """
    h, w = size
    if h < 1 or w < 1:
        raise InputError(f"an image needs at least one pixel, got size {size}")
    g = tile_size // patch_size
    # Padding to a square (pad_to_square, centred): the image sits at (px, py) in an m×m canvas.
    m_h, m_w, px, py = h, w, 0, 0
    if pad and h != w:
        m = max(h, w)
        px, py = (m - w) // 2 if w < h else 0, (m - h) // 2 if h < w else 0
        m_h = m_w = m
    rh, rw = resized_size((m_h, m_w), resize_to or tile_size)
    # Centre crop of tile_size² out of the resized image (negative offsets: the crop pads).
    top, left = ((rh - tile_size) // 2, (rw - tile_size) // 2) if center_crop else (0, 0)
    r, c = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    r, c = r.flatten().double(), c.flatten().double()
    sx, sy = m_w / rw, m_h / rh
    box = torch.stack(
        [
            (c * patch_size + left) * sx - px,
            (r * patch_size + top) * sy - py,
            ((c + 1) * patch_size + left) * sx - px,
            ((r + 1) * patch_size + top) * sy - py,
        ],
        -1,
    )
    lim = torch.tensor([w, h, w, h], dtype=box.dtype)
    box = torch.minimum(box.clamp(min=0), lim).float()
    return ImageGeometry(
        size=(h, w),
        canvas=(tile_size, tile_size),
        tiles=(1, 1),
        grid=g,
        kind=torch.full((g * g,), BASE, dtype=torch.long),
        tile=torch.zeros(g * g, dtype=torch.long),
        row=r.long(),
        col=c.long(),
        box=box,
    )


def tiny_processor(
    words: Iterable[str] = (),
    *,
    image_size: int = 32,
    patch_size: int = 8,
    pad: bool = False,
) -> "LlavaProcessor":
    """A real `LlavaProcessor` (with `LlavaImageProcessor`) for a tiny CLIP tower, built offline.

    `image_size` is the tower's square input (shortest edge and crop),
    `patch_size` the vision patch side; `pad=True` pads images to a square
    first (as llava-interleave checkpoints do).

    Example:
        >>> proc = tiny_processor(image_size=32, patch_size=8)
        >>> type(proc).__name__, proc.image_processor.crop_size["height"], proc.patch_size
        ('LlavaProcessor', 32, 8)
    """
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_pad=pad,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=word_tokenizer([*CHAT_WORDS, *words]),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token of the CLIP tower
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(processor: "LlavaProcessor", backbone: str = "llama", **sizes: Any) -> "LlavaConfig":
    """A `LlavaConfig` whose sizes and token ids match `processor` (CLIP tower, Llama or Mistral LM).

    The size keywords are LLaVA-Next's (`vlens.families.llava_next.tiny_config`:
    `d_model`, `n_layers`, `n_heads`, `n_kv_heads`, `d_mlp`, `vision_d_model`,
    `vision_layers`, `vision_heads`, `vision_feature_layer`); `vision_layers=0`
    gives a patch-local feature (see `patch_local`).

    Example:
        >>> cfg = tiny_config(tiny_processor(), n_layers=3, vision_layers=0)
        >>> cfg.model_type, cfg.text_config.num_hidden_layers, cfg.vision_config.num_hidden_layers
        ('llava', 3, 1)
        >>> cfg.vision_feature_layer
        -2
    """
    from transformers import LlavaConfig

    ip = processor.image_processor
    side = ip.crop_size["height"]
    layers, feature = patch_local(sizes.pop("vision_layers", 2), sizes.pop("vision_feature_layer", -2))
    # The text and CLIP configs are LLaVA-Next's; only the top config differs (no pinpoints, no newline).
    shim = SimpleNamespace(
        tokenizer=processor.tokenizer, patch_size=processor.patch_size, image_token_id=processor.image_token_id,
        image_processor=SimpleNamespace(crop_size=ip.crop_size, image_grid_pinpoints=[[side, side]]),
    )
    parts = _llava_next_config(shim, backbone, vision_layers=layers, vision_feature_layer=feature, **sizes)
    return LlavaConfig(
        vision_config=parts.vision_config,
        text_config=parts.text_config,
        image_token_index=processor.image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=feature,
        vision_feature_select_strategy="default",
        image_seq_length=(side // processor.patch_size) ** 2,
    )


class Llava(Family):
    """The LLaVA-1.5 family: `LlavaForConditionalGeneration`, e.g. llava-hf/llava-1.5-7b-hf.

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny(family="llava")
        >>> b = vlm.prepare(["<image>\\nWhat is shown?"], [Image.new("RGB", (64, 32))])
        >>> [s.geometry.n_tokens for s in b.layout.images], b.layout.kind_mask("base").sum().item()
        ([16], 16)
    """

    name = "llava"
    model_types = ("llava",)
    layouts = LAYOUTS
    image_inputs = ("pixel_values",)

    def geometries(self, processor: Any, config: Any, encoding: Any) -> list[ImageGeometry]:
        ip = processor.image_processor
        extra = int(getattr(processor, "num_additional_image_tokens", 0) or 0)
        strategy = config.vision_feature_select_strategy
        if extra != (1 if strategy == "default" else 0):
            raise UnsupportedModelError(
                f"vlens maps LLaVA image tokens to patches when the model drops exactly the tower's extra tokens; "
                f"here vision_feature_select_strategy={strategy!r} with num_additional_image_tokens={extra}: use "
                "'default' with a CLS tower (1) or 'full' with a tower without CLS (0)"
            )
        vc = config.vision_config
        size = getattr(ip, "size", None) or {}
        resize_to = size.get("shortest_edge") or (size.get("height"), size.get("width"))
        if "vlens_image_sizes" not in encoding:
            raise InputError("the LLaVA-1.5 processor drops image sizes: build the encoding with vlm.prepare")
        return [
            image_geometry(tuple(s), tile_size=vc.image_size, patch_size=vc.patch_size, resize_to=resize_to,
                           center_crop=bool(getattr(ip, "do_center_crop", True)),
                           pad=bool(getattr(ip, "do_pad", False)))
            for s in encoding["vlens_image_sizes"].tolist()
        ]

    def tiny(self, seed: int = 0, **sizes: Any) -> tuple[torch.nn.Module, Any]:
        """A random tiny LLaVA-1.5 and its processor (keywords: `tiny_processor`, `tiny_config`)."""
        from transformers import LlavaForConditionalGeneration

        proc_keys = ("words", "image_size", "patch_size", "pad")
        processor = tiny_processor(**{k: sizes.pop(k) for k in proc_keys if k in sizes})
        config = tiny_config(processor, **sizes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlavaForConditionalGeneration(config)
        return model.eval(), processor


LLAVA = register(Llava())
