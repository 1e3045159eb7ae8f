"""Build, save, load and evaluate the toy LLaVA-Next.

The toy model is a real `LlavaNextForConditionalGeneration` (CLIP tower +
Mistral backbone) with the word-level tokenizer and chat template of
`vlens.tiny`, sized to train on CPU in minutes: 64×64 images on a 2×2 tile
canvas of 32-px tiles with 8-px patches give 88 image tokens (16 base + 8
rows × (8 + 1 newline)).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from jaxtyping import Bool
from torch import Tensor

from .. import scoring
from .data import CLASS_NAMES, QUESTION, all_words

if TYPE_CHECKING:
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    from ..model import VLM

#: Where the shipped checkpoint lives.
CHECKPOINT_DIR = Path(__file__).with_name("checkpoint")
#: File with the toy-specific metadata (architecture, vocabulary, training record) of a checkpoint.
META_FILE = "toy.json"


@dataclass
class ToyArch:
    """Sizes of the toy model (the defaults are the shipped model's).

    Example:
        >>> ToyArch().n_layers, ToyArch().vision_layers, ToyArch().image_size
        (6, 3, 64)
    """

    backbone: str = "mistral"
    d_model: int = 64
    n_layers: int = 6
    n_heads: int = 4
    n_kv_heads: int = 2
    d_mlp: int = 256
    vision_d_model: int = 64
    vision_layers: int = 3
    vision_heads: int = 4
    vision_feature_layer: int = -1
    image_size: int = 64  # generated image side
    tile_size: int = 32
    patch_size: int = 8
    words: list[str] = field(default_factory=all_words)

    @classmethod
    def from_dict(cls, d: dict) -> "ToyArch":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def build_processor(arch: ToyArch | None = None) -> "LlavaNextProcessor":
    """The toy processor (word-level tokenizer over the toy vocabulary, 32-px tiles, 2×2 canvas).

    Example:
        >>> proc = build_processor()
        >>> proc.tokenizer.tokenize("red circle")
        ['red', 'circle']
    """
    from ..families.llava_next import tiny_processor

    arch = arch or ToyArch()
    t = arch.tile_size
    return tiny_processor(
        arch.words,
        image_size=t,
        patch_size=arch.patch_size,
        image_grid_pinpoints=[[t, t], [t, 2 * t], [2 * t, t], [2 * t, 2 * t]],
    )


def build_model(arch: ToyArch | None = None, processor: Any = None, seed: int = 0) -> "LlavaNextForConditionalGeneration":
    """A freshly initialised toy LLaVA-Next (seeded, without touching the global RNG).

    Example:
        >>> m = build_model(seed=0)
        >>> m.config.text_config.num_hidden_layers
        6
    """
    from transformers import LlavaNextForConditionalGeneration

    from ..families.llava_next import tiny_config

    arch = arch or ToyArch()
    processor = processor or build_processor(arch)
    config = tiny_config(
        processor,
        arch.backbone,
        d_model=arch.d_model,
        n_layers=arch.n_layers,
        n_heads=arch.n_heads,
        n_kv_heads=arch.n_kv_heads,
        d_mlp=arch.d_mlp,
        vision_d_model=arch.vision_d_model,
        vision_layers=arch.vision_layers,
        vision_heads=arch.vision_heads,
        vision_feature_layer=arch.vision_feature_layer,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaNextForConditionalGeneration(config)
    return model


def save_toy(model: Any, processor: Any, path: str | os.PathLike, meta: dict) -> Path:
    """Write a loadable toy checkpoint directory (atomically: a temp dir renamed into place).

    Files: `model.safetensors`, `config.json` (HF), the processor files
    (`save_pretrained`) and `toy.json` (architecture, vocabulary, training record).
    """
    import shutil

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    for f in tmp.iterdir():
        f.chmod(0o644)
    old = path.with_name(path.name + ".old")
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        path.rename(old)
    tmp.rename(path)
    if old.exists():
        shutil.rmtree(old)
    return path


def load_toy(
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    path: str | os.PathLike | None = None,
) -> "VLM":
    """The embedded trained toy LLaVA-Next as a `VLM` (offline, about a second).

    `path` loads another checkpoint directory written by `vlens toy train`.

    Example:
        >>> vlm = load_toy()
        >>> vlm.name, vlm.n_layers, vlm.d_model
        ('toy', 6, 64)
    """
    from safetensors.torch import load_file
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    from ..model import VLM

    path = Path(path) if path is not None else CHECKPOINT_DIR
    if not (path / "model.safetensors").exists():
        hint = (
            "the shipped toy checkpoint is missing from the package: reinstall vlens, or train one with "
            "`vlens toy train --ship`"
            if path == CHECKPOINT_DIR
            else "train one with `vlens toy train --out DIR`"
        )
        raise FileNotFoundError(f"no toy checkpoint at {path} ({hint})")
    meta = json.loads((path / META_FILE).read_text())
    arch = ToyArch.from_dict(meta["arch"])
    processor = build_processor(arch)
    config = LlavaNextConfig.from_pretrained(path)
    model = LlavaNextForConditionalGeneration(config)  # tiny: initialising it costs milliseconds
    state = _from_saved_keys(load_file(path / "model.safetensors"), set(model.state_dict()))
    if state is None:  # an unknown key layout: let transformers convert it (slower)
        model = LlavaNextForConditionalGeneration.from_pretrained(path)
    else:
        model.load_state_dict(state, strict=True)
    model.eval()
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    vlm = VLM.wrap(model, processor, name="toy")
    vlm.toy_meta = meta
    return vlm


#: How `save_pretrained` renames LLaVA-Next weights (the llava-hf layout) -> this transformers' module names.
_SAVED_PREFIXES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("image_newline", "model.image_newline"),
)


def _from_saved_keys(state: dict, wanted: set) -> dict | None:
    """Rename saved weights to the module's names; None unless every name then matches exactly."""
    if set(state) == wanted:
        return state
    out = {}
    for k, v in state.items():
        for old, new in _SAVED_PREFIXES:
            if k.startswith(old):
                k = new + k[len(old) :]
                break
        out[k] = v
    return out if set(out) == wanted else None


# -- evaluation ----------------------------------------------------------------------------------


@torch.no_grad()
def answer_correct(
    model: torch.nn.Module, inputs: dict, answer_mask: Bool[Tensor, "batch seq"]
) -> Bool[Tensor, " batch"]:
    """Whether greedy decoding would produce each row's answer tokens exactly (`vlens.scoring.answer_correct`).

    Teacher-forced: every answer token (including a closing `</s>`) must be
    the argmax after the tokens before it, which is exactly when greedy
    decoding emits that answer.

    Example:
        >>> import vlens
        >>> vlm = load_toy(); ds = vlens.toy.toy_dataset("heldout", n=2)
        >>> b = vlm.prepare([QUESTION] * 2, [s.image for s in ds], answers=[CLASS_NAMES[s.label] for s in ds], eos=True)
        >>> answer_correct(vlm.hf_model, b.inputs, b.layout.answer).tolist()
        [True, True]
    """
    from ..tokens import position_ids

    kw = dict(inputs)
    kw.setdefault("position_ids", position_ids(kw["attention_mask"]))
    logits = model(**kw).logits
    return scoring.answer_correct(logits, kw["input_ids"], answer_mask)


def evaluate(
    vlm: "VLM",
    n: int = 500,
    seed: int = 0,
    batch_size: int = 50,
    progress: bool = True,
) -> float:
    """Exact-answer accuracy of a toy `VLM` on `n` held-out images for `QUESTION` ("What is shown in this image?").

    The answer must be the class name ("red circle") then `</s>`, as greedy decoding.

    Example:
        >>> evaluate(load_toy(), n=20, progress=False) >= 0.9
        True
    """
    from tqdm.auto import tqdm

    from .data import toy_dataset

    ds = toy_dataset("heldout", n=n, seed=seed)
    model = vlm.hf_model
    was_training = model.training
    model.eval()
    hits = 0
    for start in tqdm(range(0, n, batch_size), desc="toy eval", disable=None if progress else True):
        samples = [ds[i] for i in range(start, min(n, start + batch_size))]
        batch = vlm.prepare(
            [QUESTION] * len(samples),
            [s.image for s in samples],
            answers=[CLASS_NAMES[s.label] for s in samples],
            eos=True,
        )
        inputs = {k: v.to(vlm.device) if isinstance(v, Tensor) else v for k, v in batch.inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(vlm.dtype)
        hits += int(answer_correct(model, inputs, batch.layout.answer.to(vlm.device)).sum())
    model.train(was_training)
    return hits / max(n, 1)
