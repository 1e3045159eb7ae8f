"""Qwen2.5-VL and Qwen3-VL (`Qwen2_5_VLForConditionalGeneration`, `Qwen3VLForConditionalGeneration`).

Both share what vlens needs to know; what differs is data (`KNOWN`):

- dynamic resolution: the processor resizes each image to the nearest multiple
  of `patch_size × merge_size` pixels per side with its area within
  `[min_pixels, max_pixels]` (`smart_resize`), cuts it into patches (14 px for
  Qwen2.5-VL, 16 px for Qwen3-VL) and the patch merger turns every 2×2 block
  of patches into one LM token; `image_grid_thw` gives each image's patch grid;
- the prompt carries `<|vision_start|><|image_pad|><|vision_end|>` per image
  (vlens prompts say `<image>`; the chat template places it), and the
  processor repeats `<|image_pad|>` once per merged token;
- M-RoPE: text and image tokens get 3-D (time, row, column) positions, which
  the model computes itself from `mm_token_type_ids` (emitted by `prepare`
  through `extra_inputs`) and the attention mask, row by row, so a left-padded
  row computes exactly what it does alone;
- sites: `vision.J` is block J of the vision tower, whose rows are the
  patches of every image of the batch, flattened (`[patches, d]`, in the
  processor's 2×2 merge-block order; Qwen2.5-VL reorders them into attention
  windows of `window_size` pixels before the blocks); `projector` is the patch
  merger (`[merged tokens, d_model]`, in the same order as its input);
- Qwen3-VL's DeepStack: the vision blocks in `deepstack_visual_indexes` feed
  their own small mergers, whose outputs the LM *adds to the image tokens after
  each of its first layers*, outside the decoder layers. So `resid_post.L`
  (= HF `hidden_states[L + 1]`) is the layer output before that addition and
  `resid_pre.L+1` the input of the next layer, after it: for the first
  `len(deepstack_visual_indexes)` layers the two differ on image tokens.

    >>> from vlens.families.qwen_vl import image_geometry
    >>> g = image_geometry((100, 200), (1, 4, 8), patch_size=14, merge_size=2)
    >>> g.n_tokens, g.canvas, g.box[1].tolist()
    (8, (56, 112), [50.0, 0.0, 100.0, 50.0])
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch

from ..errors import InputError
from ..prompts import IMAGE
from ..sites import ModuleLayout
from ..tokens import BASE, ImageGeometry
from . import Family, processor_without_video, register, text_sizes
from .wordlevel import word_tokenizer

if TYPE_CHECKING:
    from transformers import ProcessorMixin

__all__ = [
    "QwenVL", "Qwen25VL", "Qwen3VL", "KNOWN", "SPECIAL_TOKENS", "CHAT_TEMPLATES", "LAYOUTS", "smart_resize",
    "image_geometry", "load_processor", "tiny_processor", "tiny_config",
]

#: Special tokens of the Qwen2 / Qwen3 tokenizers that vlens uses (the word-level stand-in keeps them, plus `<unk>`).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<unk>",
]

_LAYOUT = ModuleLayout(
    lm_layers="model.language_model.layers",
    embed="model.language_model.embed_tokens",
    final_norm="model.language_model.norm",
    lm_head="lm_head",
    vision_layers="model.visual.blocks",
    projector="model.visual.merger",
)
#: Module trees across transformers releases, newest first (before 4.52: text model `model`, tower `visual`).
LAYOUTS: dict[str, ModuleLayout] = {
    "transformers>=4.52": _LAYOUT,
    "transformers<4.52": ModuleLayout(
        lm_layers="model.layers", embed="model.embed_tokens", final_norm="model.norm", lm_head="lm_head",
        vision_layers="visual.blocks", projector="visual.merger",
    ),
}

_USER_CONTENT = (
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' -%}{%- set image_count.value = image_count.value + 1 -%}"
    "{%- if add_vision_id -%}Picture {{ image_count.value }}: {% endif -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content['type'] == 'text' -%}{{- content['text'] -}}{%- endif -%}{%- endfor -%}{%- endif -%}"
)
#: Chat templates of the Instruct checkpoints, reduced to images and text (no tools, no video).
CHAT_TEMPLATES = {
    "qwen2.5-vl": (  # a default system prompt when the first message is not one
        "{%- set image_count = namespace(value=0) -%}{%- for message in messages -%}"
        "{%- if loop.first and message['role'] != 'system' -%}"
        "{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' -}}{%- endif -%}"
        "{{- '<|im_start|>' + message['role'] + '\n' -}}" + _USER_CONTENT + "{{- '<|im_end|>\n' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
    ),
    "qwen3-vl": (
        "{%- set image_count = namespace(value=0) -%}{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\n' -}}" + _USER_CONTENT + "{{- '<|im_end|>\n' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
    ),
}
_CHAT_WORDS = ["system", "you", "are", "helpful", "assistant", "user", "picture"]

#: Per version: the real image settings (preprocessor_config.json of the Instruct checkpoints) and the classes.
KNOWN: dict[str, dict[str, Any]] = {
    "qwen2.5-vl": dict(
        patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=3136, max_pixels=12845056,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
        processor="Qwen2_5_VLProcessor", model="Qwen2_5_VLForConditionalGeneration", model_type="qwen2_5_vl",
    ),
    "qwen3-vl": dict(
        patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=65536, max_pixels=16777216,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        processor="Qwen3VLProcessor", model="Qwen3VLForConditionalGeneration", model_type="qwen3_vl",
    ),
}


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The (height, width) the Qwen image processor resizes an image to (transformers' rule, for reading).

    Both sides become multiples of `factor` (= patch size × merge size), the
    area stays within `[min_pixels, max_pixels]`, the aspect ratio as close as
    that allows. `prepare` reads the real result from `image_grid_thw`.

    Example:
        >>> smart_resize(100, 200, 28, 56 * 56, 28 * 28 * 16)
        (56, 140)
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    return hf_smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def image_geometry(
    size: tuple[int, int], grid_thw: Sequence[int], *, patch_size: int, merge_size: int = 2
) -> ImageGeometry:
    """Token layout of one image of `size` (height, width) with patch grid `grid_thw` (from `image_grid_thw`).

    One token per `merge_size`² block of patches, row-major over the merged
    grid (the order of the patch merger's output after the model undoes its
    window order). The processor stretches the image to the resized canvas,
    so a token's pixel box is its share of the canvas mapped back to the
    original image.

    Example:
        >>> g = image_geometry((28, 56), (1, 2, 4), patch_size=14)
        >>> g.n_tokens, g.row.tolist(), g.col.tolist()
        (2, [0, 0], [0, 1])
    """
    h, w = size
    t, gh, gw = (int(v) for v in grid_thw)
    if gh % merge_size or gw % merge_size:
        raise InputError(f"patch grid {gh}×{gw} is not a multiple of the merge size {merge_size}")
    rows, cols = gh // merge_size, gw // merge_size
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    r, c = r.flatten().repeat(t), c.flatten().repeat(t)
    sx, sy = w / cols, h / rows
    box = torch.stack([c * sx, r * sy, (c + 1) * sx, (r + 1) * sy], -1).float()
    n = r.numel()
    return ImageGeometry(
        size=(h, w),
        canvas=(gh * patch_size, gw * patch_size),
        tiles=(1, 1),
        grid=cols,
        kind=torch.full((n,), BASE, dtype=torch.long),
        tile=torch.zeros(n, dtype=torch.long),
        row=r.long(),
        col=c.long(),
        box=box,
    )


def tiny_processor(
    version: str = "qwen2.5-vl",
    words: Iterable[str] = (),
    *,
    image_size: int | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    patch_size: int | None = None,
    merge_size: int = 2,
) -> "ProcessorMixin":
    """The real Qwen processor of `version` with its real image processor, and a word-level tokenizer, offline.

    The image side keeps the checkpoint's patch size, normalisation and
    resizing rule; only the pixel budget is small: by default at most
    `image_size`² pixels (`image_size` defaults to 4 merged tokens per side),
    at least one merged token.

    Example:
        >>> proc = tiny_processor("qwen3-vl")
        >>> type(proc).__name__, proc.image_processor.patch_size, proc.image_token
        ('Qwen3VLProcessor', 16, '<|image_pad|>')
    """
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    v = _version(version)
    patch = patch_size or v["patch_size"]
    factor = patch * merge_size
    image_size = image_size or 4 * factor
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch,
        merge_size=merge_size,
        temporal_patch_size=v["temporal_patch_size"],
        min_pixels=min_pixels or factor * factor,
        max_pixels=max_pixels or image_size * image_size,
        image_mean=v["image_mean"],
        image_std=v["image_std"],
    )
    tok = word_tokenizer(
        [*_CHAT_WORDS, *words], specials=SPECIAL_TOKENS, bos=None, eos="<|im_end|>", pad="<|endoftext|>"
    )
    return processor_without_video(getattr(transformers, v["processor"]), image_processor=image_processor, tokenizer=tok,
                          chat_template=CHAT_TEMPLATES[version])


def load_processor(name_or_path: str | os.PathLike) -> "ProcessorMixin":
    """The real processor of a Qwen2.5-VL / Qwen3-VL checkpoint (hub id or directory), without torchvision.

    transformers 5.23's `AutoProcessor` also builds the checkpoint's video
    processor, which needs torchvision. vlens feeds no video, so this builds
    the same processor class from the checkpoint's image settings (PIL
    backend), tokenizer and chat template, with no video processor.

    Example:
        >>> import tempfile
        >>> proc = tiny_processor("qwen3-vl")
        >>> d = tempfile.mkdtemp()
        >>> _ = proc.image_processor.save_pretrained(d), proc.tokenizer.save_pretrained(d)
        >>> _ = open(f"{d}/chat_template.jinja", "w").write(proc.chat_template)
        >>> _ = open(f"{d}/config.json", "w").write('{"model_type": "qwen3_vl"}')
        >>> back = load_processor(d)
        >>> type(back).__name__, back.image_processor.patch_size, back.chat_template == proc.chat_template
        ('Qwen3VLProcessor', 16, True)
    """
    import json

    import transformers
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.utils import cached_file

    mtype = AutoConfig.from_pretrained(name_or_path).model_type
    v = next((v for v in KNOWN.values() if v["model_type"] == mtype), None)
    if v is None:
        raise InputError(f"{name_or_path} is a {mtype!r} checkpoint, not Qwen2.5-VL or Qwen3-VL")
    tok = AutoTokenizer.from_pretrained(name_or_path)
    template = tok.chat_template
    for fname in ("chat_template.jinja", "chat_template.json"):
        path = None if template else cached_file(name_or_path, fname, _raise_exceptions_for_missing_entries=False)
        if path:
            text = Path(path).read_text()
            template = json.loads(text)["chat_template"] if fname.endswith(".json") else text
    return processor_without_video(getattr(transformers, v["processor"]), tokenizer=tok, chat_template=template,
                          image_processor=Qwen2VLImageProcessorPil.from_pretrained(name_or_path))


def _version(version: str) -> dict[str, Any]:
    if version not in KNOWN:
        raise InputError(f"unknown Qwen-VL version {version!r}: use one of {sorted(KNOWN)}")
    return KNOWN[version]


def _mrope_section(head_dim: int, interleaved: bool) -> list[int]:
    """(time, height, width) split of the rotary half-dimension, in the real checkpoints' proportions."""
    half = head_dim // 2
    if interleaved:  # Qwen3-VL: [24, 20, 20] of 64
        hw = (half * 5) // 16
        return [half - 2 * hw, hw, hw]
    hw = (half * 3) // 8  # Qwen2.5-VL: [16, 24, 24] of 64
    return [half - 2 * hw, hw, hw]


def tiny_config(
    processor: Any,
    version: str = "qwen2.5-vl",
    *,
    d_model: int = 64,
    n_layers: int = 4,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_mlp: int | None = None,
    vision_d_model: int = 64,
    vision_layers: int = 2,
    vision_heads: int = 4,
    window_size: int | None = None,
    deepstack: Sequence[int] | None = None,
) -> Any:
    """A Qwen2.5-VL / Qwen3-VL config whose sizes and token ids match `processor`.

    `vision_layers=0` gives a tower whose features are patch-local (patch
    embedding, then the merger over each 2×2 block). Qwen2.5-VL: attention
    windows of `window_size` pixels (default 2×2 merged tokens), the last block
    full attention. Qwen3-VL: `deepstack` lists the vision blocks feeding
    DeepStack (default: the blocks before the last, at most 3).

    Example:
        >>> cfg = tiny_config(tiny_processor("qwen3-vl"), "qwen3-vl", vision_layers=3)
        >>> cfg.model_type, list(cfg.vision_config.deepstack_visual_indexes)
        ('qwen3_vl', [0, 1])
    """
    import transformers

    v = _version(version)
    tok = processor.tokenizer
    ip = processor.image_processor
    head_dim = d_model // n_heads
    qwen3 = version == "qwen3-vl"
    text = dict(
        **text_sizes(tok, d_model, n_layers, n_heads, n_kv_heads, d_mlp),
        pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=tok.eos_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0,
                         "mrope_section": _mrope_section(head_dim, qwen3)},
    )
    vision = dict(
        depth=vision_layers, hidden_size=vision_d_model, intermediate_size=4 * vision_d_model,
        num_heads=vision_heads, patch_size=ip.patch_size, spatial_merge_size=ip.merge_size,
        temporal_patch_size=ip.temporal_patch_size, out_hidden_size=d_model,
    )
    if qwen3:
        text["head_dim"] = head_dim
        text["rope_parameters"]["mrope_interleaved"] = True
        side = math.isqrt(ip.size["longest_edge"]) // ip.patch_size
        vision["num_position_embeddings"] = max(side, 2) ** 2  # the learned grid, interpolated to each image
        stack = list(range(max(vision_layers - 1, 0))[:3] if deepstack is None else deepstack)
        if len(stack) > n_layers:
            raise InputError(f"{len(stack)} DeepStack features need at least as many LM layers, not {n_layers}")
        vision["deepstack_visual_indexes"] = stack
    else:
        vision["window_size"] = window_size or 2 * ip.merge_size * ip.patch_size
        vision["fullatt_block_indexes"] = [vision_layers - 1] if vision_layers else []
    cls = getattr(transformers, v["model"]).config_class
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    return cls(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


class QwenVL(Family):
    """What Qwen2.5-VL and Qwen3-VL share; `version` picks the data of `KNOWN`.

    Example:
        >>> import vlens
        >>> vlm = vlens.tiny(family="qwen2.5-vl")
        >>> vlm.family.name, vlm.modules.projector, vlm.family.image_token(vlm.processor)
        ('qwen2.5-vl', 'model.visual.merger', '<image>')
    """

    version = ""
    layouts = LAYOUTS
    image_inputs = ("pixel_values", "image_grid_thw")

    def image_token(self, processor: Any) -> str:
        return IMAGE  # the chat template writes <|vision_start|><|image_pad|><|vision_end|>

    def load_processor(self, name_or_path: Any) -> Any:
        return load_processor(name_or_path)  # AutoProcessor would need torchvision for the video processor

    def geometries(self, processor: Any, config: Any, encoding: Any) -> list[ImageGeometry]:
        ip = processor.image_processor
        return [
            image_geometry(tuple(size), grid, patch_size=ip.patch_size, merge_size=ip.merge_size)
            for size, grid in zip(encoding["vlens_image_sizes"].tolist(), encoding["image_grid_thw"].tolist())
        ]

    def position_ids(self, inputs: dict) -> None:
        return None  # M-RoPE: the model computes them from mm_token_type_ids and the attention mask

    def extra_inputs(self, config: Any, encoding: Any, inputs: dict) -> dict:
        return {"mm_token_type_ids": (inputs["input_ids"] == self.image_token_id(config)).int()}

    def tiny(self, seed: int = 0, **sizes: Any) -> tuple[torch.nn.Module, Any]:
        """A random tiny model and its processor (keywords of `tiny_processor` and `tiny_config`)."""
        import transformers

        proc_keys = ("words", "image_size", "min_pixels", "max_pixels", "patch_size", "merge_size")
        processor = tiny_processor(self.version, **{k: sizes.pop(k) for k in proc_keys if k in sizes})
        config = tiny_config(processor, self.version, **sizes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = getattr(transformers, KNOWN[self.version]["model"])(config)
        return model.eval(), processor


class Qwen25VL(QwenVL):
    """Qwen2.5-VL, e.g. Qwen/Qwen2.5-VL-7B-Instruct: 14-px patches, windowed vision attention."""

    name = version = "qwen2.5-vl"
    model_types = ("qwen2_5_vl",)


class Qwen3VL(QwenVL):
    """Qwen3-VL, e.g. Qwen/Qwen3-VL-4B-Instruct: 16-px patches, DeepStack features into the first LM layers."""

    name = version = "qwen3-vl"
    model_types = ("qwen3_vl",)
    layouts = {"transformers>=4.57": _LAYOUT}


QWEN25_VL = register(Qwen25VL())
QWEN3_VL = register(Qwen3VL())
