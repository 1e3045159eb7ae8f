"""Architectures of real LLaVA-Next checkpoints, known offline.

`meta("llava-hf/llava-v1.6-mistral-7b-hf")` builds that model's exact module
tree on the meta device (no weights, no download) with a processor that has
the real image settings, so token geometry, layer counts and module paths of
the real model can be inspected and tested anywhere. The text tokenizer is a
word-level stand-in that keeps the real `<image>` id: prompts tokenize
differently, image tokens do not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .model import VLM

#: Public config facts of llava-hf checkpoints (from their config.json and preprocessor_config.json).
KNOWN: dict[str, dict] = {
    "llava-hf/llava-v1.6-mistral-7b-hf": {
        "text": dict(
            model_type="mistral", vocab_size=32064, hidden_size=4096, intermediate_size=14336,
            num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
            rope_theta=1_000_000.0, max_position_embeddings=32768, sliding_window=None,
        ),
        "vision": dict(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
            image_size=336, patch_size=14, projection_dim=768, vocab_size=32000,
        ),
        "image_token_index": 32000,
        "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "processor": dict(shortest_edge=336, crop=336, patch_size=14),
    },
}


def known_config(name: str):
    """The `LlavaNextConfig` of a known checkpoint, offline.

    Example:
        >>> cfg = known_config("llava-hf/llava-v1.6-mistral-7b-hf")
        >>> cfg.text_config.num_hidden_layers, cfg.text_config.hidden_size
        (32, 4096)
    """
    from transformers import CLIPVisionConfig, LlavaNextConfig, MistralConfig

    if name not in KNOWN:
        raise KeyError(f"no offline config for {name!r}; known: {sorted(KNOWN)}")
    k = KNOWN[name]
    text = dict(k["text"])
    text.pop("model_type")
    return LlavaNextConfig(
        text_config=MistralConfig(**text),
        vision_config=CLIPVisionConfig(**k["vision"]),
        image_token_index=k["image_token_index"],
        image_grid_pinpoints=k["image_grid_pinpoints"],
        projector_hidden_act=k["projector_hidden_act"],
        vision_feature_layer=k["vision_feature_layer"],
        vision_feature_select_strategy=k["vision_feature_select_strategy"],
    )


def meta(name: str = "llava-hf/llava-v1.6-mistral-7b-hf") -> "VLM":
    """A weightless `VLM` of a known checkpoint on the meta device, offline.

    Example:
        >>> vlm = meta()
        >>> vlm.n_layers, vlm.d_model, vlm.device.type
        (32, 4096, 'meta')
    """
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from .model import VLM
    from .tiny import CHAT_TEMPLATE, word_tokenizer

    config = known_config(name)
    p = KNOWN[name]["processor"]
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": p["shortest_edge"]},
            crop_size={"height": p["crop"], "width": p["crop"]},
            image_grid_pinpoints=config.image_grid_pinpoints,
        ),
        tokenizer=word_tokenizer(image_token_id=config.image_token_id),
        patch_size=p["patch_size"],
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(config)
    return VLM.wrap(model, processor, name=f"{name} (meta)")
