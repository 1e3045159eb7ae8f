"""LLaVA-Next (LlavaNextForConditionalGeneration): the first model family of vlens.

What is specific to LLaVA-Next lives here and nowhere else:

- module paths (`LAYOUTS`: transformers 5, and the tree of releases before 4.52);
- token geometry: an image becomes a base tile of g×g patches (CLS dropped),
  then the unpadded high-res canvas, each kept row closed by a newline token
  (`image_geometry`, following `LlavaNextModel.pack_image_features`);
- the Mistral-style chat template of llava-v1.6-mistral, images first;
- tiny random builds (`tiny_processor`, `tiny_config`) made offline (the real
  checkpoints' facts, tokenizer and random-weight builds are in `vlens.families.checkpoints`).

    >>> from vlens.families.llava_next import image_geometry, PINPOINTS
    >>> image_geometry((336, 336), pinpoints=PINPOINTS, tile_size=336, patch_size=14).n_tokens
    1176
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch

from ..errors import InputError
from ..sites import ModuleLayout
from ..tokens import BASE, HIGHRES, NEWLINE, ImageGeometry
from . import Family, register, text_sizes
from .wordlevel import word_tokenizer

if TYPE_CHECKING:
    from transformers import LlavaNextConfig, LlavaNextProcessor

__all__ = [
    "LlavaNext", "PINPOINTS", "patch_local", "CHAT_TEMPLATE", "LAYOUTS", "select_best_resolution", "image_geometry", "tiny_processor", "tiny_config",
]

#: Module trees of LLaVA-Next across transformers releases, newest first.
_OLD = ModuleLayout(  # before 4.52: the LM is a CausalLM on the top module, decoder layers return tuples
    lm_layers="language_model.model.layers",
    embed="language_model.model.embed_tokens",
    final_norm="language_model.model.norm",
    lm_head="language_model.lm_head",
    vision_layers="vision_tower.vision_model.encoder.layers",
    projector="multi_modal_projector",
)
LAYOUTS: dict[str, ModuleLayout] = {
    "transformers>=5.23": ModuleLayout(),
    "transformers>=4.52": ModuleLayout(vision_layers="model.vision_tower.vision_model.encoder.layers"),
    "transformers<4.52": _OLD,
    "transformers<4.52 (bare CLIP encoder)": replace(_OLD, vision_layers="vision_tower.encoder.layers"),
}

#: The high-res canvases (height, width) of llava-v1.6 checkpoints.
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

#: Mistral-style chat template of llava-v1.6-mistral: images first, then text.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{ ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '</s>' }}"
    "{% endif %}{% endfor %}"
)


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
    if best is None:
        raise InputError("image_grid_pinpoints is empty: the processor needs at least one canvas")
    return best


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

    base = _base_tile(h, w, g, tile_size, patch_size, resize_to)
    kinds, tiles, rows, cols, boxes = ([part] for part in base)

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
    nan4 = torch.full((1, 4), float("nan"))

    def start(i: Any) -> Any:  # canvas pixel where patch i begins: tiles abut; a tile's last pixels may have no patch
        return (i // g) * tile_size + (i % g) * patch_size

    for R in range(r0, r1):
        C = torch.arange(c0, c1)
        n = C.numel()
        kinds.append(torch.full((n,), HIGHRES))
        tiles.append(1 + (R // g) * ntw + C // g)
        rows.append(torch.full((n,), R % g))
        cols.append(C % g)
        x0 = (start(C) - px) * kx
        x1 = (start(C) + patch_size - px) * kx
        y0 = torch.full((n,), (start(R) - py) * ky)
        y1 = torch.full((n,), (start(R) + patch_size - py) * ky)
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




def _base_tile(h: int, w: int, g: int, tile_size: int, patch_size: int, resize_to: int) -> tuple[torch.Tensor, ...]:
    """(kind, tile, row, col, box) of the base tile's g² tokens: the whole image stretched to resize_to²,
    centre-cropped to tile_size²."""
    off = (resize_to - tile_size) / 2
    sx, sy = w / resize_to, h / resize_to
    r, c = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    r, c = r.flatten(), c.flatten()
    box = torch.stack(
        [
            (c * patch_size + off) * sx,
            (r * patch_size + off) * sy,
            ((c + 1) * patch_size + off) * sx,
            ((r + 1) * patch_size + off) * sy,
        ],
        -1,
    ).float()
    return torch.full((g * g,), BASE), torch.zeros(g * g, dtype=torch.long), r, c, box

def tiny_processor(
    words: Iterable[str] = (),
    *,
    image_size: int = 32,
    patch_size: int = 8,
    image_grid_pinpoints: Sequence[Sequence[int]] | None = None,
) -> "LlavaNextProcessor":
    """A real `LlavaNextProcessor` for a tiny CLIP tower, built offline.

    `image_size` is the tile side in pixels, `patch_size` the vision patch
    side; `image_grid_pinpoints` lists the high-res canvases (height, width),
    by default 1×1, 1×2, 2×1 and 2×2 tiles.

    Example:
        >>> proc = tiny_processor(image_size=32, patch_size=8)
        >>> proc.image_processor.crop_size["height"], proc.patch_size
        (32, 8)
    """
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil as LlavaNextImageProcessor,
    )

    if image_grid_pinpoints is None:
        s = image_size
        image_grid_pinpoints = [[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=[list(p) for p in image_grid_pinpoints],
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=word_tokenizer(words),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token of the CLIP tower
        chat_template=CHAT_TEMPLATE,
    )


def patch_local(vision_layers: int, vision_feature_layer: int) -> tuple[int, int]:
    """Tower depth and feature layer for a tiny build; `vision_layers=0` asks for a patch-local feature.

    A tower with no layer cannot be run by transformers (the feature is read
    from the captured hidden states, and there are none), so 0 layers become
    one layer whose *input*, the patch embeddings, is the feature
    (`vision_feature_layer=-2`): each image token then depends on its own
    patch only, which is what the pixel-box tests need. That layer is still
    there (site `vision.0`) but the language model never sees its output.

    A feature layer the tower does not have is refused here, at build time,
    not on the first forward.

    Example:
        >>> patch_local(0, -2), patch_local(2, -2)
        ((1, -2), (2, -2))
    """
    if vision_layers < 0:
        raise InputError(f"vision_layers must be 0 or more, not {vision_layers}")
    if vision_layers == 0:
        return 1, -2
    if not -(vision_layers + 1) <= vision_feature_layer <= vision_layers:
        raise InputError(
            f"vision_feature_layer {vision_feature_layer} does not exist in a tower of {vision_layers} layers "
            f"(its hidden states are {-(vision_layers + 1)}..{vision_layers}): pick one of those, or "
            "vision_layers=0 for the patch embeddings"
        )
    return vision_layers, vision_feature_layer


def tiny_config(
    processor: "LlavaNextProcessor",
    backbone: str = "mistral",
    *,
    d_model: int = 64,
    n_layers: int = 4,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_mlp: int | None = None,
    vision_d_model: int = 64,
    vision_layers: int = 2,
    vision_heads: int = 4,
    vision_feature_layer: int = -2,
    **text_overrides,
) -> "LlavaNextConfig":
    """A `LlavaNextConfig` whose sizes and token ids match `processor`.

    `vision_layers=0` gives a patch-local feature (see `patch_local`): the
    language model reads the patch embeddings.

    Example:
        >>> cfg = tiny_config(tiny_processor(), "llama", n_layers=3)
        >>> cfg.text_config.model_type, cfg.text_config.num_hidden_layers
        ('llama', 3)
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, MistralConfig

    tok = processor.tokenizer
    ip = processor.image_processor
    vision_layers, vision_feature_layer = patch_local(vision_layers, vision_feature_layer)
    text_cls = {"mistral": MistralConfig, "llama": LlamaConfig}.get(backbone)
    if text_cls is None:
        raise InputError(f"backbone must be 'mistral' or 'llama', not {backbone!r}")
    text = text_cls(
        **text_sizes(tok, d_model, n_layers, n_heads, n_kv_heads, d_mlp),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
        **text_overrides,
    )
    vision = CLIPVisionConfig(
        hidden_size=vision_d_model,
        intermediate_size=4 * vision_d_model,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=ip.crop_size["height"],
        patch_size=processor.patch_size,
        projection_dim=vision_d_model,
    )
    return LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=processor.image_token_id,
        image_grid_pinpoints=[list(p) for p in ip.image_grid_pinpoints],
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
        image_seq_length=(ip.crop_size["height"] // processor.patch_size) ** 2,
    )




class LlavaNext(Family):
    """The LLaVA-Next family: `LlavaNextForConditionalGeneration`, e.g. llava-hf/llava-v1.6-mistral-7b-hf.

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny()
        >>> fam = vlm.family
        >>> enc = vlm.processor(text=["<image>"], images=[Image.new("RGB", (32, 64))], return_tensors="pt")
        >>> [g.n_tokens for g in fam.geometries(vlm.processor, vlm.config, enc)]
        [56]
    """

    name = "llava-next"
    model_types = ("llava_next",)
    layouts = LAYOUTS
    image_inputs = ("pixel_values", "image_sizes")

    def geometries(self, processor: Any, config: Any, encoding: Any) -> list[ImageGeometry]:
        ip = processor.image_processor
        tile = ip.crop_size["height"]
        resize_to = ip.size.get("shortest_edge") or ip.size.get("height") or tile
        return [
            image_geometry(tuple(size), pinpoints=config.image_grid_pinpoints, tile_size=tile,
                           patch_size=processor.patch_size, resize_to=resize_to)
            for size in encoding["image_sizes"].tolist()
        ]

    def tiny(self, seed: int = 0, **sizes: Any) -> tuple[torch.nn.Module, Any]:
        """A random tiny LLaVA-Next and its processor (see `tiny_processor` and `tiny_config` for the keywords)."""
        from transformers import LlavaNextForConditionalGeneration

        proc_keys = ("words", "image_size", "patch_size", "image_grid_pinpoints")
        processor = tiny_processor(**{k: sizes.pop(k) for k in proc_keys if k in sizes})
        config = tiny_config(processor, **sizes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlavaNextForConditionalGeneration(config)
        return model.eval(), processor


LLAVA_NEXT = register(LlavaNext())
