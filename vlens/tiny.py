"""Tiny LLaVA-Next models and processors built in code, offline.

`tiny()` is the test fixture of vlens: a randomly initialised LLaVA-Next
(CLIP tower + Mistral or Llama backbone) with a real `LlavaNextProcessor`
whose tokenizer is a word-level vocabulary made here. It builds in well
under a second and needs no hub access. The embedded toy model
(`vlens.toy`) is built from the same pieces and then trained.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Iterable, Sequence

import torch

if TYPE_CHECKING:
    from transformers import LlavaNextConfig, LlavaNextProcessor, PreTrainedTokenizerFast

    from .model import VLM

#: Special tokens of every vlens-made tokenizer, in id order.
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "[INST]", "[/INST]"]

#: Words every vlens-made vocabulary knows: the prompts of the paper's experiments.
BASE_WORDS = (
    "a an the is of in on to and or what which this that image shown picture photo "
    "reply either lowercase depending do not output any other text describe "
    "it there here with at left right top bottom middle center small large big "
    "yes no color colour shape object . , ? ! : \" '"
).split()

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

_WORD = re.compile(r"<image>|\[/?INST\]|</?s>|<pad>|<unk>|[A-Za-z0-9_\-]+|[^\sA-Za-z0-9_\-]")


def split_words(text: str) -> list[str]:
    """Split text the way vlens word-level tokenizers do.

    Example:
        >>> split_words("[INST] <image>\\nWhat is shown? [/INST]")
        ['[INST]', '<image>', 'What', 'is', 'shown', '?', '[/INST]']
    """
    return _WORD.findall(text)


def word_tokenizer(words: Iterable[str] = (), *, image_token_id: int | None = None) -> "PreTrainedTokenizerFast":
    """A lowercasing word-level tokenizer over `BASE_WORDS` plus `words`.

    Ids: the `SPECIAL_TOKENS` first (`<pad>`=0, `<s>`=1, `</s>`=2, `<unk>`=3,
    `<image>`=4, ...), then the words in first-seen order. A BOS token is
    prepended on encode, like Mistral's tokenizer. `image_token_id` moves
    `<image>` to that id (filling the gap with `<unused_i>` tokens), to stand
    in for a real model's tokenizer.

    Example:
        >>> tok = word_tokenizer(["red", "circle"])
        >>> tok.decode(tok("a red circle")["input_ids"], skip_special_tokens=True)
        'a red circle'
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    specials = [t for t in SPECIAL_TOKENS if image_token_id is None or t != "<image>"]
    for w in [*specials, *BASE_WORDS, *(w.lower() for w in words)]:
        vocab.setdefault(w, len(vocab))
    if image_token_id is not None:
        if image_token_id < len(vocab):
            raise ValueError(f"image_token_id {image_token_id} collides with the {len(vocab)} words of the vocabulary")
        for i in range(len(vocab), image_token_id):
            vocab[f"<unused_{i}>"] = i
        vocab["<image>"] = image_token_id
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(_WORD.pattern), behavior="isolated")]
    )
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<image>", "[INST]", "[/INST]"],
        padding_side="left",
        model_max_length=4096,
    )
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "[INST]", "[/INST]"]})
    return tok


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

    Example:
        >>> cfg = tiny_config(tiny_processor(), "llama", n_layers=3)
        >>> cfg.text_config.model_type, cfg.text_config.num_hidden_layers
        ('llama', 3)
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, MistralConfig

    tok = processor.tokenizer
    ip = processor.image_processor
    text_cls = {"mistral": MistralConfig, "llama": LlamaConfig}.get(backbone)
    if text_cls is None:
        raise ValueError(f"backbone must be 'mistral' or 'llama', not {backbone!r}")
    text = text_cls(
        vocab_size=len(tok),
        hidden_size=d_model,
        intermediate_size=d_mlp or 4 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=4096,
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


def tiny(
    backbone: str = "mistral",
    seed: int = 0,
    *,
    words: Iterable[str] = (),
    image_size: int = 32,
    patch_size: int = 8,
    image_grid_pinpoints: Sequence[Sequence[int]] | None = None,
    **overrides,
) -> "VLM":
    """A random tiny LLaVA-Next wrapped as a `VLM`, offline, in well under a second.

    `overrides` go to `tiny_config` (`d_model`, `n_layers`, `vision_layers`...).

    Example:
        >>> vlm = tiny("llama", n_layers=3)
        >>> vlm.n_layers, vlm.d_model
        (3, 64)
    """
    from transformers import LlavaNextForConditionalGeneration

    from .model import VLM

    processor = tiny_processor(
        words, image_size=image_size, patch_size=patch_size, image_grid_pinpoints=image_grid_pinpoints
    )
    config = tiny_config(processor, backbone, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaNextForConditionalGeneration(config)
    model.eval()
    return VLM.wrap(model, processor, name=f"tiny-{backbone}")
