"""Known checkpoints, offline: their config facts, their real tokenizer and processor, random-weight builds.

No weights or hub files can be downloaded here, yet the path a researcher
takes with `llava-hf/llava-v1.6-mistral-7b-hf` can run: its config is public
facts (`KNOWN`), its tokenizer is the sentencepiece model of
Mistral-7B-Instruct-v0.2 that the PyPI package `mistral-common` ships
(`tokenizer.model.v1`; llava-hf adds `<image>` = 32000 and `<pad>` = 32001 and
pads the embedding to 32064), and its image processor is settings. So
`build(name, weights="random", d_model=..., n_layers=...)` gives the real
module tree, tokenizer, image settings, patch size, pinpoints and image-token
id with random weights: small widths and depths for tests, the real sizes on
the meta device or a GPU.

    >>> from vlens.families.checkpoints import real_tokenizer
    >>> tok = real_tokenizer()
    >>> tok("[INST] ")["input_ids"]          # the prefix hard-coded in the paper's code
    [1, 733, 16289, 28793, 28705]

Install the tokenizer's package with the `real` extra: `pip install 'vlens[real]'`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError, UnsupportedModelError
from . import gemma3_real
from .llava_next import CHAT_TEMPLATE, PINPOINTS

if TYPE_CHECKING:
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor

__all__ = ["KNOWN", "LLAVA_NEXT_MISTRAL", "known_config", "real_tokenizer", "real_processor", "build"]

#: The checkpoint of the paper.
LLAVA_NEXT_MISTRAL = "llava-hf/llava-v1.6-mistral-7b-hf"

#: Public config facts of llava-hf checkpoints (from their config.json, preprocessor_config.json and tokenizer files).
KNOWN: dict[str, dict] = {
    LLAVA_NEXT_MISTRAL: {
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
        "image_grid_pinpoints": PINPOINTS,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "processor": dict(shortest_edge=336, crop=336, patch_size=14),
        # mistral-common's file of Mistral-7B-Instruct-v0.2, plus the tokens llava-hf adds (in id order).
        "tokenizer": dict(package="mistral_common", file="data/tokenizer.model.v1", added=["<image>", "<pad>"]),
    },
}

# google/gemma-3-4b-it: config facts, the real tokenizer and processor from the `real-lm` extra
# (Gemma 3's shared vocabulary, converted from the Gemma 3 270M GGUF; `vlens.families.gemma3_real`).
KNOWN[gemma3_real.GEMMA3_4B] = {"family": "gemma3", "extra": gemma3_real.EXTRA}

#: Size keywords of `build` / `known_config`: what they shrink (widths and depths only).
SIZE_KEYWORDS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_mlp", "vision_d_model", "vision_layers",
                 "vision_heads")


def _known(name: str) -> dict:
    if name not in KNOWN:
        raise UnsupportedModelError(f"no offline facts for {name!r}; known checkpoints: {', '.join(sorted(KNOWN))}")
    return KNOWN[name]


def known_config(name: str = LLAVA_NEXT_MISTRAL, **sizes: int) -> "LlavaNextConfig":
    """The `LlavaNextConfig` of a known checkpoint, offline; size keywords shrink widths and depths only.

    `d_model`, `n_layers`, `n_heads`, `n_kv_heads`, `d_mlp` (language model) and
    `vision_d_model`, `vision_layers`, `vision_heads` (CLIP tower). Unset heads
    and MLP widths follow the real ratios. Vocabulary, image size, patch size,
    pinpoints, image-token id and feature layer stay real.

    Example:
        >>> cfg = known_config()
        >>> cfg.text_config.num_hidden_layers, cfg.text_config.hidden_size
        (32, 4096)
        >>> small = known_config(d_model=64, n_layers=2, vision_d_model=32, vision_layers=1)
        >>> small.text_config.vocab_size, small.vision_config.image_size, small.text_config.num_attention_heads
        (32064, 336, 1)
    """
    from transformers import CLIPVisionConfig, LlavaNextConfig, MistralConfig

    bad = sorted(set(sizes) - set(SIZE_KEYWORDS))
    if bad:
        raise InputError(f"unknown size keyword(s) {bad}: use {', '.join(SIZE_KEYWORDS)}")
    for key, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"{key} must be a positive int, not {value!r}")
    k = _known(name)
    if k.get("family") == "gemma3":
        return gemma3_real.gemma3_4b_config(**sizes)
    text, vision = dict(k["text"]), dict(k["vision"])
    text.pop("model_type")
    if "d_model" in sizes:
        d = sizes["d_model"]
        scale = d / text["hidden_size"]
        heads = sizes.get("n_heads", max(1, round(text["num_attention_heads"] * scale)))
        text.update(hidden_size=d, intermediate_size=sizes.get("d_mlp", max(1, round(text["intermediate_size"] * scale))),
                    num_attention_heads=heads,
                    num_key_value_heads=sizes.get("n_kv_heads", max(1, heads * text["num_key_value_heads"]
                                                                 // text["num_attention_heads"])))
    for key, field in (("n_layers", "num_hidden_layers"), ("n_heads", "num_attention_heads"),
                       ("n_kv_heads", "num_key_value_heads"), ("d_mlp", "intermediate_size")):
        if key in sizes:
            text[field] = sizes[key]
    if "vision_d_model" in sizes:
        vd = sizes["vision_d_model"]
        scale = vd / vision["hidden_size"]
        vision.update(hidden_size=vd, intermediate_size=max(1, round(vision["intermediate_size"] * scale)),
                      num_attention_heads=sizes.get("vision_heads", max(1, round(vision["num_attention_heads"] * scale))),
                      projection_dim=vd)
    for key, field in (("vision_layers", "num_hidden_layers"), ("vision_heads", "num_attention_heads")):
        if key in sizes:
            vision[field] = sizes[key]
    if text["hidden_size"] % text["num_attention_heads"] or text["num_attention_heads"] % text["num_key_value_heads"]:
        raise InputError(
            f"d_model {text['hidden_size']} with {text['num_attention_heads']} heads and "
            f"{text['num_key_value_heads']} KV heads does not divide evenly: pick n_heads / n_kv_heads that do"
        )
    return LlavaNextConfig(
        text_config=MistralConfig(**text),
        vision_config=CLIPVisionConfig(**vision),
        image_token_index=k["image_token_index"],
        image_grid_pinpoints=k["image_grid_pinpoints"],
        projector_hidden_act=k["projector_hidden_act"],
        vision_feature_layer=k["vision_feature_layer"],
        vision_feature_select_strategy=k["vision_feature_select_strategy"],
    )


@functools.lru_cache(maxsize=None)
def real_tokenizer(name: str = LLAVA_NEXT_MISTRAL) -> Any:
    """The real tokenizer of a known checkpoint, built offline from a package's file (once per process: cached).

    For llava-v1.6-mistral: Mistral-7B-Instruct-v0.2's sentencepiece model from
    `mistral-common`, converted by transformers, BOS prepended on encode, plus
    `<image>` (32000) and `<pad>` (32001) as llava-hf adds them.

    Example:
        >>> tok = real_tokenizer()
        >>> tok.convert_tokens_to_ids(["<image>", "<pad>"]), tok.padding_side
        ([32000, 32001], 'left')
    """
    from transformers import LlamaTokenizer

    if _known(name).get("family") == "gemma3":
        return gemma3_real.tokenizer()
    spec = _known(name)["tokenizer"]
    found = importlib.util.find_spec(spec["package"])  # finds the package without importing it
    if found is None or not found.submodule_search_locations:
        raise InputError(
            f"the real tokenizer of {name} comes from the package {spec['package'].replace('_', '-')}, which is not "
            "installed: pip install 'vlens[real]' (or pip install --no-deps mistral-common)"
        )
    src = os.path.join(found.submodule_search_locations[0], *spec["file"].split("/"))
    if not os.path.isfile(src):
        raise InputError(f"{src} is missing from the installed {spec['package']}: reinstall it (pip install 'vlens[real]')")
    tmp = tempfile.mkdtemp(prefix="vlens-tokenizer-")
    try:  # transformers converts a sentencepiece file named *.model
        model = os.path.join(tmp, "tokenizer.model")
        shutil.copyfile(src, model)
        kwargs = LlamaTokenizer.convert_to_native_format(vocab_file=model, legacy=False)
        tok = LlamaTokenizer(**kwargs, add_bos_token=True, add_eos_token=False, padding_side="left")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    added = spec["added"]
    tok.add_special_tokens({"additional_special_tokens": added[:1]})
    tok.add_special_tokens({"pad_token": added[1]})
    want = list(range(len(tok) - len(added), len(tok)))
    if tok.convert_tokens_to_ids(added) != want:  # pragma: no cover - a changed tokenizer file
        raise UnsupportedModelError(f"the added tokens of {name} did not get ids {want}: the tokenizer file changed")
    return tok


def real_processor(name: str = LLAVA_NEXT_MISTRAL, tokenizer: Any = None) -> "LlavaNextProcessor":
    """The `LlavaNextProcessor` of a known checkpoint, offline: its image settings, chat template and tokenizer.

    The tokenizer is the checkpoint's real one (`real_tokenizer`) unless you pass another.

    Example:
        >>> proc = real_processor()
        >>> proc.patch_size, proc.image_processor.crop_size["height"], proc.tokenizer.convert_tokens_to_ids("<image>")
        (14, 336, 32000)
    """
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    k = _known(name)
    if k.get("family") == "gemma3":
        from .gemma3 import KNOWN as IMAGE, make_processor

        tok = tokenizer if tokenizer is not None else gemma3_real.tokenizer()
        return make_processor(tok, image_size=IMAGE["image_size"], tokens_per_image=IMAGE["tokens_per_image"])
    p = k["processor"]
    return LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": p["shortest_edge"]},
            crop_size={"height": p["crop"], "width": p["crop"]},
            image_grid_pinpoints=[list(x) for x in k["image_grid_pinpoints"]],
        ),
        tokenizer=tokenizer if tokenizer is not None else real_tokenizer(name),
        patch_size=p["patch_size"],
        vision_feature_select_strategy=k["vision_feature_select_strategy"],
        num_additional_image_tokens=1,  # the CLS token of the CLIP tower
        chat_template=CHAT_TEMPLATE,
    )


def build(
    name: str = LLAVA_NEXT_MISTRAL,
    *,
    weights: str = "random",
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **sizes: int,
) -> tuple["LlavaNextForConditionalGeneration", "LlavaNextProcessor"]:
    """The real architecture of a known checkpoint with random weights, and its real processor, offline.

    `weights="random"` is the only kind that needs no download. Size keywords
    (see `known_config`) shrink widths and depths; without them the sizes are
    the real ones (7B parameters: use `device="meta"` to inspect the tree, or a GPU).

    Example:
        >>> model, proc = build(d_model=64, n_layers=2, vision_d_model=32, vision_layers=1)
        >>> type(model).__name__, model.config.text_config.vocab_size, len(model.model.language_model.layers)
        ('LlavaNextForConditionalGeneration', 32064, 2)
    """
    import transformers

    if weights != "random":
        raise InputError(f"weights={weights!r}: offline builds have weights='random'; real weights load by hub id")
    config = known_config(name, **sizes)
    processor = real_processor(name)
    where = torch.device(device or "cpu")
    # On the CPU the weights are drawn in float32 and then cast, so a seed gives the same
    # weights in every dtype. Elsewhere (a GPU, the meta device) they are built in `dtype`
    # directly: a 7B model drawn in float32 first would need 30 GB before the cast.
    direct = dtype if dtype is not None and where.type != "cpu" else None
    with torch.random.fork_rng(devices=[]), where, _default_dtype(direct):
        torch.manual_seed(seed)
        model = getattr(transformers, config.architectures[0] if config.architectures else _CLASS[config.model_type])(config)
        proj = getattr(model.model.multi_modal_projector, "mm_input_projection_weight", None)
        if proj is not None and where.type != "meta":  # HF zero-initialises Gemma 3's projection: a blind model
            with torch.no_grad():
                proj.normal_(0.0, proj.shape[0] ** -0.5)
    if dtype is not None and direct is None:
        model = model.to(dtype=dtype)
    return model.eval(), processor


#: The model class of each known checkpoint's config type.
_CLASS = {"llava_next": "LlavaNextForConditionalGeneration", "gemma3": "Gemma3ForConditionalGeneration"}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Parameters created inside are `dtype` (a floating dtype; None: unchanged)."""
    if dtype is None:
        yield
        return
    if not dtype.is_floating_point:
        raise InputError(f"dtype must be a floating dtype such as torch.bfloat16, not {dtype}")
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)
