"""The one set of model options of the `vlens` command line (package-private to `vlens.cli`).

Every command that runs a model takes them: `--model toy | tiny:FAMILY | HUB_ID
| DIR`, `--weights random` with the size options and `--seed`, `--device`,
`--dtype`. `ModelChoice` checks them before anything loads, gives the
model's facts for argument checks, and loads the model.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Optional

import typer

from .errors import InputError

__all__ = ["model_options", "ModelChoice"]

_SIZES = {"d_model": "residual width", "n_layers": "language-model layers", "vision_d_model": "vision-tower width",
          "vision_layers": "vision-tower layers"}


def model_options() -> list[inspect.Parameter]:
    """`--model`, `--weights`, `--seed`, the size options, `--device`, `--dtype`: every command that takes a model.

    Example:
        >>> [p.name for p in model_options()][:3]
        ['model', 'weights', 'seed']
    """

    def option(name: str, annotation: Any, default: Any, help_text: str) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                 default=typer.Option(default, help=help_text, rich_help_panel="Model"))

    return [
        option("model", str, "toy", "'toy' (the embedded toy model), 'tiny:FAMILY' (a random tiny build of llava-next, "
                                    "llava, llava-onevision, qwen2.5-vl, qwen3-vl or gemma3), a hub id or a directory"),
        option("weights", Optional[str], None, "random: a known checkpoint (e.g. llava-hf/llava-v1.6-mistral-7b-hf) "
                                               "with its real tokenizer and processor but random weights, offline "
                                               "(the `real` extra)"),
        option("seed", int, 0, "seed of --weights random and tiny:FAMILY builds"),
        *(option(k, Optional[int], None, f"{what} of a --weights random or tiny:FAMILY build")
          for k, what in _SIZES.items()),
        option("device", Optional[str], None, "e.g. cuda (under torchrun each rank takes cuda:LOCAL_RANK)"),
        option("dtype", Optional[str], None, "model dtype, e.g. bfloat16 (default: the checkpoint's)"),
    ]


@dataclasses.dataclass
class ModelChoice:
    """The model options of one command, checked before anything loads.

    Example:
        >>> m = ModelChoice.pop({"model": "tiny:gemma3", "n_layers": 2, "out": "x"})
        >>> m.facts().n_layers, m.load().family.name
        (2, 'gemma3')
    """

    model: str
    weights: Optional[str]
    seed: int
    sizes: dict
    device: Optional[str]
    dtype: Optional[str]

    @classmethod
    def pop(cls, options: dict) -> "ModelChoice":
        from .loading import TINY_PREFIX
        from .model import as_dtype

        keys = ("model", "weights", "seed", *_SIZES, "device", "dtype")
        given = {k: options.pop(k) for k in keys if k in options}
        sizes = {k: given.pop(k) for k in _SIZES if given.get(k) is not None}
        for k, v in sizes.items():
            if v < (0 if k == "vision_layers" else 1):
                raise InputError(f"--{k.replace('_', '-')} must be at least {0 if k == 'vision_layers' else 1} "
                                 f"(got {v})")
        if given.get("weights") not in (None, "random"):
            raise InputError(f"--weights takes 'random' (or leave it out for the checkpoint's own), not "
                             f"{given['weights']!r}")
        tiny = str(given.get("model", "toy")).startswith(TINY_PREFIX)
        if sizes and not (tiny or given.get("weights")):
            raise InputError(f"--{next(iter(sizes)).replace('_', '-')} sizes a --weights random or tiny:FAMILY build; "
                             f"add --weights random (a known checkpoint) or use --model tiny:FAMILY")
        as_dtype(given.get("dtype"))
        return cls(given.get("model", "toy"), given.get("weights"), given.get("seed", 0), sizes,
                   given.get("device"), given.get("dtype"))

    def facts(self) -> Any:
        from .loading import facts

        return facts(self.model, **self.sizes)

    def load(self, *, words: Any = None, device: Optional[str] = None) -> Any:
        """The model; a tiny build learns `words` (the data set's captions and class names)."""
        from .loading import TINY_PREFIX, load

        extra: dict = dict(self.sizes)
        if self.model.startswith(TINY_PREFIX):
            extra.update(seed=self.seed, **({"words": words} if words is not None else {}))
        elif self.weights is not None:
            extra.update(weights=self.weights, seed=self.seed)
        return load(self.model, device=device or self.device, dtype=self.dtype, **extra)
