"""Getting a `VLM`: `load` (the toy model, a hub id or directory, a built pair), `tiny` and `meta` builds.

Loading sits above the model: it knows the families, the toy model and the
known checkpoints, and hands a built module and processor to `VLM.wrap`.

    >>> import vlens
    >>> vlens.load("toy").n_layers, vlens.tiny(n_layers=2).n_layers
    (6, 2)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from . import families
from .errors import CheckpointNotFoundError, InputError, UnsupportedModelError
from .model import VLM, as_dtype

__all__ = ["load", "tiny", "meta", "ModelFacts", "facts", "TINY_PREFIX"]

#: `load("tiny:FAMILY")` is `tiny(family=FAMILY)`: how a command line names a tiny build.
TINY_PREFIX = "tiny:"


def _offline(name: str, error: OSError) -> CheckpointNotFoundError:
    """The one-line error for a checkpoint that is neither cached nor downloadable."""
    from .families.checkpoints import KNOWN

    random = (f"or build its architecture with random weights, offline: load({name!r}, weights='random') "
              "(`--weights random` on the command line; needs the `real` extra: pip install 'vlens[real]')"
              if name in KNOWN else "or use a known checkpoint with weights='random', or 'toy', or 'tiny:FAMILY'")
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return CheckpointNotFoundError(
        f"cannot load {name!r}: its files are not on this machine and cannot be downloaded ({first}). "
        f"Download it where there is a network (huggingface-cli download {name}), {random}"
    )


def tiny(family: str = "llava-next", seed: int = 0, *, backbone: str | None = None, **sizes: Any) -> VLM:
    """A random tiny VLM of a family wrapped as a `VLM`, offline, in well under a second.

    `sizes` go to the family's tiny build (for LLaVA-Next: `d_model`,
    `n_layers`, `vision_layers`, `image_size`, `patch_size`...; see
    `vlens.families.llava_next.tiny_config`). The tokenizer knows the
    prompts' words plus `words`: a list of words or texts, or a data set,
    whose class names and captions it learns (`vlens.data.vocabulary`). `backbone` picks the language
    model ('mistral' or 'llama').

    Example:
        >>> vlm = tiny(backbone="llama", n_layers=3)
        >>> vlm.n_layers, vlm.d_model, vlm.family.name
        (3, 64, 'llava-next')
    """
    return _tiny(family, seed, backbone=backbone, **sizes)


def _tiny(family: str, seed: int, *, backbone: str | None = None, device: Any = None, dtype: Any = None,
          **sizes: Any) -> VLM:
    fam = families.get(family)
    if backbone is not None:
        sizes["backbone"] = backbone
    if "words" in sizes:  # a data set, captions, or words: each text is split the way the tokenizer splits
        from .data import vocabulary

        sizes["words"] = vocabulary(sizes["words"])
    model, processor = fam.tiny(seed=seed, **sizes)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return VLM.wrap(model, processor, name=f"tiny-{family}" + (f"-{backbone}" if backbone else ""))


def meta(name: str = "llava-hf/llava-v1.6-mistral-7b-hf") -> VLM:
    """A weightless `VLM` of a known checkpoint on the meta device, offline: real module tree and image settings.

    Example:
        >>> vlm = meta()
        >>> vlm.n_layers, vlm.d_model, vlm.device.type
        (32, 4096, 'meta')
    """
    return _meta_vlm(name)


def _meta_vlm(name: str) -> VLM:
    from .families.checkpoints import build

    model, processor = build(name, device="meta")
    return VLM.wrap(model, processor, name=f"{name} (meta)")


def load(
    name_or_path: Any,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    lazy: bool = False,
    meta: bool = False,
    weights: str | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> VLM:
    """Load a VLM of a supported family as a `VLM`.

    `name_or_path` is `"toy"` (the embedded toy model, offline), `"toy-gemma"`
    (the toy whose language model is the real Gemma 3 270M: `vlens.toy.gemma`,
    needs the `real-lm` extra), a hub id or
    local directory of a supported family (see `vlens.families`), or a
    `(model, processor)` pair. `device` and `dtype` go to `from_pretrained`
    (e.g. `device="cuda"`, `dtype=torch.float16`). `lazy=True` builds the
    model on the meta device without weights (nnsight's lazy loading; weights
    arrive on the first trace, or stay remote with `trace(..., remote=True)`
    on NDIF). `meta=True` builds a known checkpoint's architecture offline on
    the meta device (see `vlens.loading.meta`), for geometry and module paths only.

    `weights="random"` builds a known checkpoint offline with random weights:
    the real processor, tokenizer and module tree, with widths and depths
    shrunk by the size keywords of `vlens.families.checkpoints.known_config`
    (`d_model`, `n_layers`, `vision_d_model`, `vision_layers`, ...) and `seed`.

    Example:
        >>> import vlens
        >>> vlens.load("toy").n_layers
        6
        >>> vlm = vlens.load("llava-hf/llava-v1.6-mistral-7b-hf", weights="random", d_model=64, n_layers=2,
        ...                  vision_d_model=32, vision_layers=1)
        >>> vlm.n_layers, vlm.vocab_size, vlm.processor.patch_size
        (2, 32064, 14)
    """
    torch_dtype = as_dtype(dtype)
    if isinstance(name_or_path, tuple):
        if len(name_or_path) != 2:
            raise InputError("load takes a (model, processor) pair: a tuple of two")
        model, processor = name_or_path
        if device is not None or torch_dtype is not None:
            model = model.to(device=device, dtype=torch_dtype)
        return VLM.wrap(model, processor, name=kwargs.get("name"))
    if name_or_path == "toy":
        from .toy.model import load_toy

        return load_toy(device=device, dtype=torch_dtype)
    if name_or_path == "toy-gemma":
        from .toy.gemma import load_toy_gemma

        return load_toy_gemma(device=device, dtype=torch_dtype)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise InputError(
            f"load takes 'toy', a hub id, a directory, or a (model, processor) pair; got {type(name_or_path).__name__}"
        )
    name = str(name_or_path)
    if name.startswith(TINY_PREFIX):
        if weights is not None or lazy or meta:
            raise InputError(f"{name!r} is a random tiny build already: drop weights=, lazy= and meta=")
        return _tiny(name[len(TINY_PREFIX):], seed, device=device, dtype=torch_dtype, **kwargs)
    if weights is not None:
        from .families.checkpoints import build

        if lazy or meta:
            raise InputError("weights='random' builds the model itself: drop lazy=/meta= (use device='meta' instead)")
        model, processor = build(name, weights=weights, seed=seed, device=device, dtype=torch_dtype, **kwargs)
        return VLM.wrap(model, processor, name=f"{name} (random weights)")
    if meta:
        from .families.checkpoints import KNOWN

        if name in KNOWN:
            return _meta_vlm(name)
    family = families.get(facts(name).family)  # a missing directory or an unknown family is refused before weights
    from transformers import AutoConfig, AutoModelForImageTextToText

    try:
        config = AutoConfig.from_pretrained(name)
        if lazy:
            return VLM(name, name=name, dtype=torch_dtype, **kwargs)
        if meta:
            with torch.device("meta"):
                model = AutoModelForImageTextToText.from_config(config)
        else:
            model = AutoModelForImageTextToText.from_pretrained(
                name, dtype=torch_dtype or "auto", device_map=device, **kwargs
            )
        processor = family.load_processor(name)
    except OSError as e:
        raise _offline(name, e) from None
    model.eval()
    if not hasattr(processor, "tokenizer"):
        raise UnsupportedModelError(f"{name} has no multimodal processor (got {type(processor).__name__})")
    return VLM.wrap(model, processor, name=name)


@dataclass(frozen=True)
class ModelFacts:
    """What a model is, read from its config alone (no weights): to check arguments before loading it."""

    name: str
    family: str
    n_layers: int
    d_model: int


def facts(name_or_path: str | os.PathLike, **sizes: Any) -> ModelFacts:
    """The family, layer count and width of 'toy', 'tiny:FAMILY', a known checkpoint, a hub id or a directory.

    Read from the config alone (no weights). `sizes` are the size keywords of
    a tiny build or of `load(..., weights="random")` (`d_model`, `n_layers`...).

    Example:
        >>> facts("toy")
        ModelFacts(name='toy', family='llava-next', n_layers=6, d_model=64)
        >>> facts("llava-hf/llava-v1.6-mistral-7b-hf").n_layers, facts("tiny:gemma3", n_layers=3).n_layers
        (32, 3)
    """
    from .families.checkpoints import KNOWN, known_config

    name = str(name_or_path)
    if name.startswith(TINY_PREFIX):
        vlm = _tiny(name[len(TINY_PREFIX):], 0, **sizes)  # a tiny build costs less than reading a config
        return ModelFacts(name, vlm.family.name, vlm.n_layers, vlm.d_model)
    if name == "toy":
        from transformers import AutoConfig

        from .toy.model import CHECKPOINT_DIR

        config = AutoConfig.from_pretrained(CHECKPOINT_DIR)
    elif name == "toy-gemma":
        return ModelFacts(name, "gemma3", 18, 640)  # the real Gemma 3 270M (vlens.toy.gemma), no 1 GB read
    elif name in KNOWN:
        config = known_config(name, **sizes)
    else:
        from transformers import AutoConfig

        if not os.path.isdir(os.path.expanduser(name)) and (name.startswith((".", "/", "~")) or name.count("/") > 1):
            raise InputError(f"no model directory at {name}: check the path (a hub id looks like 'org/name')")
        try:
            config = AutoConfig.from_pretrained(name)
        except OSError as e:
            raise _offline(name, e) from None
    fam = families.of_config(config)
    text = fam.text_config(config)
    return ModelFacts(name, fam.name, int(text.num_hidden_layers), int(text.hidden_size))
