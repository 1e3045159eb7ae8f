"""Gemma 3 (`Gemma3ForConditionalGeneration`, e.g. google/gemma-3-4b-it).

What is specific to Gemma 3 lives here:

- token geometry: the processor stretches every image to the SigLIP tower's
  square input (896 px), the tower sees a g×g patch grid (64×64 of 14 px),
  and the projector average-pools it to `mm_tokens_per_image` soft tokens
  (16×16 = 256), row-major; each soft token's pixel box is its pooled window
  mapped back to the original image (`image_geometry`);
- the prompt carries `<start_of_image>` per image (vlens prompts say
  `<image>`; the chat template places it), which the processor expands to
  `\\n\\n<start_of_image>` + 256 × `<image_soft_token>` + `<end_of_image>\\n\\n`;
  the image mask is the soft tokens, the begin/end-of-image tokens are prompt;
- attention: image tokens attend to each other bidirectionally within their
  image, which the model derives from `token_type_ids` (1 on soft tokens),
  emitted by `prepare` through `extra_inputs` for the padded batch; positions
  come from the attention mask (the base `Family.position_ids`), so a
  left-padded row computes what it does alone;
- pan-and-scan (`do_pan_and_scan=True`) adds crops of wide or tall images,
  each its own run of soft tokens with text between runs: vlens refuses it
  with a clear error (one image must be one run of image tokens);
- sites: `vision.J` is SigLIP encoder layer J (`[images, patches, d]`),
  `projector` the pooled and projected soft tokens (`[images, 256, d_model]`);
  `embed` is the scaled token embedding (Gemma multiplies by √d_model).

    >>> g = image_geometry((100, 200), image_size=896, patch_size=14, tokens_per_image=256)
    >>> g.n_tokens, g.box[1].tolist()
    (256, [12.5, 0.0, 25.0, 6.25])
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable

import torch

from ..errors import InputError
from ..prompts import IMAGE
from ..sites import ModuleLayout
from ..tokens import BASE, ImageGeometry
from . import Family, register, text_sizes
from .wordlevel import word_tokenizer

if TYPE_CHECKING:
    from transformers import Gemma3Config, Gemma3Processor

__all__ = ["Gemma3", "SPECIAL_TOKENS", "CHAT_TEMPLATE", "LAYOUTS", "KNOWN", "image_geometry", "make_processor", "tiny_processor",
           "tiny_config"]

#: Special tokens of the Gemma 3 tokenizer that vlens uses, in their real id order for the first four.
SPECIAL_TOKENS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
    "<image_soft_token>",
]
_NAMED = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}

#: Inside a Gemma 3 layer both blocks are normed before and after: what each block adds to the residual is its
#: post-norm's output (`attn_out`, `mlp_out`); the MLP's input is the pre-feedforward norm's output.
_POST_NORMS = dict(attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm")
#: Module trees across transformers releases, newest first.
LAYOUTS: dict[str, ModuleLayout] = {
    "transformers>=5": ModuleLayout(vision_layers="model.vision_tower.encoder.layers", **_POST_NORMS),
    "transformers>=4.52": ModuleLayout(vision_layers="model.vision_tower.vision_model.encoder.layers", **_POST_NORMS),
    "transformers<4.52": ModuleLayout(
        lm_layers="language_model.model.layers", embed="language_model.model.embed_tokens",
        final_norm="language_model.model.norm", lm_head="language_model.lm_head",
        vision_layers="vision_tower.vision_model.encoder.layers", projector="multi_modal_projector", **_POST_NORMS,
    ),
}

#: The chat template of gemma-3-*-it, reduced to images and text (the assistant's role is 'model').
CHAT_TEMPLATE = (
    "{{ bos_token }}{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}"
    "{%- endif -%}{{ '<start_of_turn>' + role + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

#: Image settings of google/gemma-3-4b-it (config.json, preprocessor_config.json).
KNOWN = {"image_size": 896, "patch_size": 14, "tokens_per_image": 256, "image_mean": [0.5] * 3,
         "image_std": [0.5] * 3, "pan_and_scan_min_crop_size": 256, "pan_and_scan_max_num_crops": 4,
         "pan_and_scan_min_ratio_to_activate": 1.2}


def image_geometry(size: tuple[int, int], *, image_size: int, patch_size: int, tokens_per_image: int) -> ImageGeometry:
    """Token layout of one image of `size` (height, width): a t×t grid of pooled soft tokens, row-major.

    The processor stretches the image to `image_size`², the tower cuts
    `image_size // patch_size` patches per side, the projector average-pools
    k×k patches into each of t² = `tokens_per_image` tokens (k = patches // t).

    Example:
        >>> g = image_geometry((32, 64), image_size=32, patch_size=4, tokens_per_image=16)
        >>> g.n_tokens, g.box[0].tolist()
        (16, [0.0, 0.0, 16.0, 8.0])
    """
    h, w = size
    t = math.isqrt(tokens_per_image)
    if t * t != tokens_per_image:
        raise InputError(f"mm_tokens_per_image must be a square number, not {tokens_per_image}")
    k = (image_size // patch_size) // t
    if k < 1:
        raise InputError(f"{tokens_per_image} tokens per image need at least {t} patches per side")
    share = k * patch_size / image_size  # of the canvas side, per token
    r, c = torch.meshgrid(torch.arange(t), torch.arange(t), indexing="ij")
    r, c = r.flatten(), c.flatten()
    box = torch.stack([c * share * w, r * share * h, (c + 1) * share * w, (r + 1) * share * h], -1).float()
    n = t * t
    return ImageGeometry(
        size=(h, w), canvas=(image_size, image_size), tiles=(1, 1), grid=t,
        kind=torch.full((n,), BASE, dtype=torch.long), tile=torch.zeros(n, dtype=torch.long),
        row=r.long(), col=c.long(), box=box,
    )


def make_processor(tokenizer: Any, *, image_size: int = 896, tokens_per_image: int = 256,
                   chat_template: str = CHAT_TEMPLATE) -> "Gemma3Processor":
    """A `Gemma3Processor` with the real (PIL) image processor of Gemma 3 at `image_size`, around `tokenizer`.

    The image side keeps Gemma 3's resizing (stretch to a square), bilinear
    resampling and normalisation; pan-and-scan off, as in the checkpoints'
    defaults. `tokenizer` must name `boi_token`, `eoi_token` and `image_token`;
    `chat_template` defaults to the -it checkpoints' (`CHAT_TEMPLATE`).

    Example:
        >>> proc = make_processor(tiny_processor().tokenizer, image_size=64, tokens_per_image=4)
        >>> proc.image_seq_length, proc.image_processor.size["height"]
        (4, 64)
    """
    from transformers import Gemma3Processor
    from transformers.image_utils import PILImageResampling
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    image_processor = Gemma3ImageProcessorPil(
        size={"height": image_size, "width": image_size}, resample=PILImageResampling.BILINEAR,
        image_mean=KNOWN["image_mean"], image_std=KNOWN["image_std"], do_pan_and_scan=False,
        pan_and_scan_min_crop_size=max(image_size // 2, 1) if image_size != KNOWN["image_size"]
        else KNOWN["pan_and_scan_min_crop_size"],
        pan_and_scan_max_num_crops=KNOWN["pan_and_scan_max_num_crops"],
        pan_and_scan_min_ratio_to_activate=KNOWN["pan_and_scan_min_ratio_to_activate"],
    )
    return Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
        image_seq_length=tokens_per_image,
    )


def tiny_processor(
    words: Iterable[str] = (), *, image_size: int = 32, tokens_per_image: int = 16
) -> "Gemma3Processor":
    """The real `Gemma3Processor` with its real (PIL) image processor and a word-level tokenizer, offline.

    The image side keeps Gemma 3's resizing (stretch to a square), bilinear
    resampling and normalisation, at a tiny `image_size`; pan-and-scan off,
    as in the checkpoints' defaults.

    Example:
        >>> proc = tiny_processor()
        >>> proc.image_seq_length, proc.tokenizer.image_token, proc.image_processor.size["height"]
        (16, '<image_soft_token>', 32)
    """
    tok = word_tokenizer(["user", "model", *words], specials=SPECIAL_TOKENS, bos="<bos>", eos="<eos>", named=_NAMED)
    return make_processor(tok, image_size=image_size, tokens_per_image=tokens_per_image)


def tiny_config(
    processor: "Gemma3Processor",
    *,
    d_model: int = 64,
    n_layers: int = 4,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_mlp: int | None = None,
    vision_d_model: int = 64,
    vision_layers: int = 2,
    vision_heads: int = 4,
    patch_size: int = 4,
    sliding_window: int = 32,
) -> "Gemma3Config":
    """A `Gemma3Config` whose sizes and token ids match `processor`.

    Layers alternate sliding-window (`sliding_window` tokens) and global
    attention, as Gemma 3 interleaves them. `vision_layers=0` gives a tower
    whose features are patch-local (patch embedding plus position, a per-token
    norm), so each soft token sees only its pooled window.

    Example:
        >>> cfg = tiny_config(tiny_processor(), n_layers=2)
        >>> cfg.text_config.layer_types, cfg.mm_tokens_per_image
        (['sliding_attention', 'full_attention'], 16)
    """
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    tok = processor.tokenizer
    head_dim = d_model // n_heads
    text = Gemma3TextConfig(
        **text_sizes(tok, d_model, n_layers, n_heads, n_kv_heads, d_mlp), head_dim=head_dim,
        query_pre_attn_scalar=head_dim, sliding_window=sliding_window,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)],
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    vision = SiglipVisionConfig(
        hidden_size=vision_d_model, intermediate_size=4 * vision_d_model, num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads, image_size=processor.image_processor.size["height"],
        patch_size=patch_size, vision_use_head=False,
    )
    return Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=processor.image_seq_length,
        image_token_index=tok.image_token_id, boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id,
    )


class Gemma3(Family):
    """The Gemma 3 family: `Gemma3ForConditionalGeneration`.

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny(family="gemma3")
        >>> b = vlm.prepare(["<image>\\nWhat is shown?"], [Image.new("RGB", (64, 32))])
        >>> int(b.layout.image.sum()), sorted(b.inputs)
        (16, ['attention_mask', 'input_ids', 'pixel_values', 'token_type_ids'])
    """

    name = "gemma3"
    model_types = ("gemma3",)
    layouts = LAYOUTS
    image_inputs = ("pixel_values",)

    def image_token(self, processor: Any) -> str:
        return IMAGE  # the chat template writes <start_of_image>

    def render(self, processor: Any, prompt: str) -> str:
        text = super().render(processor, prompt)
        tok = processor.tokenizer
        bos = tok.bos_token
        if bos and text.startswith(bos) and tok("")["input_ids"][:1] == [tok.bos_token_id]:
            text = text[len(bos):]  # the template writes <bos> and the tokenizer adds one: keep one
        return text

    def geometries(self, processor: Any, config: Any, encoding: Any) -> list[ImageGeometry]:
        sizes = encoding["vlens_image_sizes"].tolist()
        if len(encoding["pixel_values"]) != len(sizes):
            raise InputError(
                f"the processor made {len(encoding['pixel_values'])} crops of {len(sizes)} images (pan-and-scan), "
                "which vlens does not map (one image must be one run of image tokens): leave pan-and-scan off "
                "(do_pan_and_scan=False, the Gemma3Processor default)"
            )
        v = config.vision_config
        return [
            image_geometry(tuple(s), image_size=v.image_size, patch_size=v.patch_size,
                           tokens_per_image=config.mm_tokens_per_image)
            for s in sizes
        ]

    def extra_inputs(self, config: Any, encoding: Any, inputs: dict) -> dict:
        return {"token_type_ids": (inputs["input_ids"] == self.image_token_id(config)).long()}

    def tiny(self, seed: int = 0, **sizes: Any) -> tuple[torch.nn.Module, Any]:
        """A random tiny Gemma 3 and its processor (keywords of `tiny_processor` and `tiny_config`)."""
        from transformers import Gemma3ForConditionalGeneration

        proc_keys = ("words", "image_size", "tokens_per_image")
        processor = tiny_processor(**{k: sizes.pop(k) for k in proc_keys if k in sizes})
        config = tiny_config(processor, **sizes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Gemma3ForConditionalGeneration(config)
            # HF initialises the projection to zeros (trained weights replace it): a random build would be blind.
            proj = model.model.multi_modal_projector.mm_input_projection_weight
            with torch.no_grad():
                proj.normal_(0.0, proj.shape[0] ** -0.5)
        return model.eval(), processor


GEMMA3 = register(Gemma3())
