"""Options of the `vlens` command line (package-private to `vlens.cli`): the model options, flags from the library.

Every command that runs a model takes them: `--model toy | tiny:FAMILY | HUB_ID
| DIR`, `--weights random` with the size options and `--seed`, `--device`,
`--dtype`. `ModelChoice` checks them before anything loads, gives the
model's facts for argument checks, and loads the model. The other options of
a command come from the library's own signatures and config dataclasses
(`config_options`, `with_options`), so each default is written once.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Optional, Sequence

import typer

from .errors import InputError

__all__ = ["model_options", "ModelChoice", "option_default", "config_options", "with_options", "given_fields"]

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


# -- flags from the library: CLI options generated from signatures and config dataclasses ---------


def option_default(func: Callable, name: str) -> Any:
    """The default of `func`'s parameter `name`: CLI defaults are the library's, written once.

    Example:
        >>> option_default(lambda n=3: n, "n")
        3
    """
    return inspect.signature(func).parameters[name].default


def config_options(cls: type, *, skip: Sequence[str] = ()) -> list[inspect.Parameter]:
    """One `--field` option per plain (int / float / str / bool) field of a config dataclass; None = not given.

    Example:
        >>> from vlens.demo import DemoConfig
        >>> [p.name for p in config_options(DemoConfig)][:3]
        ['n_train', 'n_heldout', 'n_sae_samples']
    """
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.name in skip or type(default) not in (int, float, str, bool):
            continue
        typ = type(default)
        help_text = f"{cls.__name__}.{f.name} (default {default})"
        out.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[typ],
                                     default=typer.Option(None, help=help_text, rich_help_panel=cls.__name__)))
    return out


def with_options(*extra: list[inspect.Parameter]) -> Callable[[Callable], Callable]:
    """Add generated keyword options to a command function's signature (typer reads `__signature__`).

    Example:
        >>> import inspect
        >>> from vlens.demo import DemoConfig
        >>> f = with_options(config_options(DemoConfig))(lambda out="x", **kw: None)
        >>> list(inspect.signature(f).parameters)[:2]
        ['out', 'n_train']
    """

    def wrap(func: Callable) -> Callable:
        sig = inspect.signature(func, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        params = own + [p for group in extra for p in group]  # the generated options arrive in **kwargs
        func.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        func.__annotations__ = {**func.__annotations__, **{p.name: p.annotation for group in extra for p in group}}
        return func

    return wrap


def given_fields(cls: type, kwargs: dict) -> dict:
    """The config fields the user gave on the command line.

    Example:
        >>> from vlens.demo import DemoConfig
        >>> given_fields(DemoConfig, {"n_train": 10, "n_heldout": None, "out": "x"})
        {'n_train': 10}
    """
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in kwargs.items() if k in names and v is not None}
