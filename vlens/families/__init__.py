"""Model families: everything vlens knows about one kind of VLM, behind one small interface.

A family says where its modules live (`ModuleLayout`s, as data), how its
processor lays out the tokens of an image (`geometries`), which encoding keys
carry the image, how a prompt with `<image>` becomes its chat template, and
how to build a tiny random copy offline. `VLM`, `prepare` and `load` ask the
family and nothing else; a new family is one new file here plus its tests.

    >>> from vlens import families
    >>> families.names()
    ['gemma3', 'llava', 'llava-next', 'llava-onevision', 'qwen2.5-vl', 'qwen3-vl']
    >>> families.get("llava-next").model_types
    ('llava_next',)

Add a family by subclassing `Family` in a new module and calling `register`
on an instance at its end (see `llava_next.py` and docs/architecture.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import UnsupportedModelError
from ..sites import ModuleLayout
from ..tokens import position_ids

if TYPE_CHECKING:
    from ..tokens import ImageGeometry

__all__ = ["Family", "register", "get", "names", "of_config", "of_model", "processor_without_video", "text_sizes"]


class Family:
    """The interface of a model family. Subclass it; override what differs.

    Attributes (data):
        name: the name users pass (`vlens.tiny(family=...)`), e.g. 'llava-next'.
        model_types: HF `config.model_type` values of this family.
        layouts: the module layouts the family has had across transformers
            releases, by name, tried in order; the first whose every path exists wins.
        image_inputs: encoding keys that carry images to the model.

    Example:
        >>> from vlens.families import get
        >>> get("llava-next").layouts["transformers>=5.23"].lm_layers
        'model.language_model.layers'
    """

    name: str = ""
    model_types: tuple[str, ...] = ()
    layouts: dict[str, ModuleLayout] = {"transformers>=5": ModuleLayout()}
    image_inputs: tuple[str, ...] = ("pixel_values",)

    # -- config facts --
    def text_config(self, config: Any) -> Any:
        """The language model's config inside the VLM config."""
        return config.text_config

    def image_token_id(self, config: Any) -> int:
        """The id of the image placeholder token."""
        return int(config.image_token_id)

    def image_token(self, processor: Any) -> str:
        """The image placeholder string prompts use."""
        return processor.image_token

    # -- inputs --
    def render(self, processor: Any, prompt: str) -> str:
        """Wrap a prompt (with image placeholders) in the processor's chat template, images first."""
        if not getattr(processor, "chat_template", None):
            return prompt
        token = self.image_token(processor)
        n = prompt.count(token)
        text = prompt.replace(token, "").lstrip("\n").strip()
        content = [{"type": "image"} for _ in range(n)] + [{"type": "text", "text": text}]
        return processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )

    def geometries(self, processor: Any, config: Any, encoding: Any) -> list["ImageGeometry"]:
        """The token geometry of every image of a processed batch, in the order images were given."""
        raise NotImplementedError

    def extra_inputs(self, config: Any, encoding: Any, inputs: dict) -> dict:
        """Family-specific model inputs for a prepared (padded) batch, added to `inputs` (default: none).

        E.g. the token-type ids that mark image tokens for Qwen's M-RoPE or
        Gemma 3's image attention, computed on the final `inputs["input_ids"]`.
        """
        return {}

    def position_ids(self, inputs: dict) -> Tensor | None:
        """Position ids for a left-padded batch (None: the model computes its own, e.g. M-RoPE)."""
        return position_ids(inputs["attention_mask"])

    # -- builds --
    def load_processor(self, name_or_path: Any) -> Any:
        """The processor of a checkpoint (hub id or directory); by default `AutoProcessor.from_pretrained`."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(name_or_path)

    def tiny(self, seed: int = 0, **sizes: Any) -> tuple[torch.nn.Module, Any]:
        """A tiny random `(model, processor)` pair built offline."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"Family({self.name!r})"


def text_sizes(tokenizer: Any, d_model: int, n_layers: int, n_heads: int, n_kv_heads: int,
               d_mlp: int | None) -> dict[str, Any]:
    """The size keywords of a tiny build, as the fields every HF text config of a tiny build shares.

    Example:
        >>> text_sizes(["a", "b", "c"], 64, 2, 4, 2, None)["intermediate_size"]
        256
    """
    return dict(vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=d_mlp or 4 * d_model,
                num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                max_position_embeddings=4096)


def processor_without_video(cls: type, **kwargs: Any) -> Any:
    """Build a processor class that also takes videos (Qwen, LLaVA-OneVision) with no video processor.

    vlens feeds no video.

    transformers 5.23 type-checks even a `None` video processor against a
    class that needs torchvision, which vlens does not depend on; the check
    is skipped for that one argument, the processor is the real class.

    Example:
        >>> import vlens
        >>> vlens.tiny(family="qwen2.5-vl").processor.video_processor is None   # built through this
        True
    """
    from unittest import mock

    check = cls.check_argument_for_proper_class

    def lenient(self: Any, name: str, arg: Any) -> Any:
        return None if name == "video_processor" and arg is None else check(self, name, arg)

    with mock.patch.object(cls, "check_argument_for_proper_class", lenient):
        return cls(video_processor=None, **kwargs)


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family to the registry (by its name and every model type).

    Example:
        >>> from vlens.families import Family, register, get
        >>> class Mine(Family):
        ...     name, model_types = "mine", ("mine_vlm",)
        >>> get(register(Mine()).name).model_types
        ('mine_vlm',)
        >>> _ = _REGISTRY.pop("mine")
    """
    if not family.name or not family.model_types:
        raise UnsupportedModelError("a family needs a name and at least one model_type")
    _REGISTRY[family.name] = family
    return family


#: Modules of this package that hold no family (everything else here is one family file that registers itself).
_NOT_FAMILIES = {"wordlevel", "checkpoints"}


def _load_builtin() -> None:
    # Every module of this package registers its family on import, so a new family is one new file: no list to
    # edit. Importing a module already loaded costs nothing, so this runs every time.
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name not in _NOT_FAMILIES:
            importlib.import_module(f"{__name__}.{info.name}")


def names() -> list[str]:
    """The names of every registered family.

    Example:
        >>> "llava-next" in names()
        True
    """
    _load_builtin()
    return sorted(_REGISTRY)


def get(name: str) -> Family:
    """A family by name.

    Example:
        >>> get("llava-next").name
        'llava-next'
    """
    _load_builtin()
    if name not in _REGISTRY:
        raise UnsupportedModelError(f"unknown model family {name!r}: vlens knows {', '.join(names())}")
    return _REGISTRY[name]


def of_config(config: Any) -> Family:
    """The family of an HF config (by `model_type`).

    Example:
        >>> from vlens.families.checkpoints import known_config
        >>> of_config(known_config("llava-hf/llava-v1.6-mistral-7b-hf")).name
        'llava-next'
    """
    _load_builtin()
    mtype = getattr(config, "model_type", None)
    for fam in _REGISTRY.values():
        if mtype in fam.model_types:
            return fam
    supported = "; ".join(f"{f.name} (model_type {', '.join(f.model_types)})" for f in _REGISTRY.values())
    raise UnsupportedModelError(
        f"vlens has no model family for model_type {mtype!r}; supported: {supported}. "
        "Load a checkpoint of one of these, or build one with vlens.tiny()."
    )


def of_model(model: torch.nn.Module) -> Family:
    """The family of a built model (by its config's `model_type`).

    Example:
        >>> import vlens
        >>> of_model(vlens.tiny().hf_model).name
        'llava-next'
    """
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no HF config: vlens wraps transformers VLMs")
    return of_config(config)

