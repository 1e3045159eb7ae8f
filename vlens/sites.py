"""The site table: every point of a VLM that vlens reads or writes, by name, module and SAE-Lens hook.

A *site* is where an activation lives. Its name is what you write, its module
path is where nnsight finds it (per model family, as data: `ModuleLayout`), and
its hook name is what SAE-Lens and TransformerLens call it:

| site           | module (LLaVA-Next, transformers 5)      | value  | SAE-Lens `hook_name`             |
|----------------|------------------------------------------|--------|----------------------------------|
| `resid_pre.L`  | `model.language_model.layers.L`          | input  | `blocks.L.hook_resid_pre`        |
| `resid_post.L` | `model.language_model.layers.L`          | output | `blocks.L.hook_resid_post`       |
| `vision.J`     | `model.vision_tower.encoder.layers.J`    | output | `vision.blocks.J.hook_resid_post`|
| `embed`        | `model.language_model.embed_tokens`      | output | `hook_embed`                     |
| `projector`    | `model.multi_modal_projector`            | output | `hook_projector`                 |
| `final_norm`   | `model.language_model.norm`              | output | `ln_final.hook_normalized`       |
| `logits`       | `lm_head`                                | output | `hook_logits`                    |

`resid_pre.L` is HF `hidden_states[L]`; `resid_post.L` is `hidden_states[L + 1]`
(before the final norm on the last layer). An int `L` anywhere a site is asked
for means `resid_pre.L`, the paper's hook point.

    >>> from vlens.sites import parse, hook_name, from_hook_name
    >>> parse(8), parse("resid_post.3").hook_name
    (Site('resid_pre.8'), 'blocks.3.hook_resid_post')
    >>> from_hook_name("blocks.12.hook_resid_pre")
    Site('resid_pre.12')
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Union

from .errors import SiteError

__all__ = ["Site", "SiteLike", "ModuleLayout", "KINDS", "parse", "resolve", "hook_name", "from_hook_name", "names"]


@dataclass(frozen=True)
class _Kind:
    module: str  # field of ModuleLayout
    value: str  # "input" or "output" of that module
    hook: str  # SAE-Lens hook name, `{i}` for the layer index
    indexed: str | None  # "lm", "vision" or None


#: Site kinds: name -> which module (a `ModuleLayout` field), which value, which hook name, indexed by which layers.
KINDS: dict[str, _Kind] = {
    "resid_pre": _Kind("lm_layers", "input", "blocks.{i}.hook_resid_pre", "lm"),
    "resid_post": _Kind("lm_layers", "output", "blocks.{i}.hook_resid_post", "lm"),
    "vision": _Kind("vision_layers", "output", "vision.blocks.{i}.hook_resid_post", "vision"),
    "embed": _Kind("embed", "output", "hook_embed", None),
    "projector": _Kind("projector", "output", "hook_projector", None),
    "final_norm": _Kind("final_norm", "output", "ln_final.hook_normalized", None),
    "logits": _Kind("lm_head", "output", "hook_logits", None),
}

_NAME = re.compile(r"^([a-z_]+)(?:\.(-?\d+))?$")
_HOOKS = [(re.compile("^" + re.escape(k.hook).replace(r"\{i\}", r"(\d+)") + "$"), name) for name, k in KINDS.items()]


@dataclass(frozen=True)
class ModuleLayout:
    """Where a model family keeps the modules behind the sites: dotted paths from the top module (data, not code).

    Example:
        >>> ModuleLayout().lm_layers
        'model.language_model.layers'
    """

    lm_layers: str = "model.language_model.layers"
    embed: str = "model.language_model.embed_tokens"
    final_norm: str = "model.language_model.norm"
    lm_head: str = "lm_head"
    vision_layers: str = "model.vision_tower.encoder.layers"
    projector: str = "model.multi_modal_projector"


@dataclass(frozen=True)
class Site:
    """One site: a kind from `KINDS` and, for layer sites, a layer index.

    Example:
        >>> s = Site("resid_pre", 3)
        >>> s.name, s.hook_name, str(s)
        ('resid_pre.3', 'blocks.3.hook_resid_pre', 'resid_pre.3')
    """

    kind: str
    index: int | None = None

    def __post_init__(self) -> None:
        spec = KINDS.get(self.kind) if isinstance(self.kind, str) else None
        if spec is None:
            raise SiteError(f"unknown site kind {self.kind!r}: {_HELP}")
        if spec.indexed is None:
            if self.index is not None:
                raise SiteError(f"site {self.kind!r} takes no layer index (got {self.index!r}): {_HELP}")
            return
        try:
            if isinstance(self.index, bool):
                raise TypeError
            index = operator.index(self.index)  # ints, numpy ints and 0-d int tensors; never 1.5 or "3"
        except TypeError:
            raise SiteError(
                f"the layer of {self.kind} must be an int, not {self.index!r} ({type(self.index).__name__}): "
                f"pass an int layer such as 3 (or the site name '{self.kind}.3')"
            ) from None
        object.__setattr__(self, "index", index)

    @property
    def name(self) -> str:
        return self.kind if self.index is None else f"{self.kind}.{self.index}"

    @property
    def hook_name(self) -> str:
        """The SAE-Lens / TransformerLens hook name (negative indices are left as given: `resolve` first)."""
        return KINDS[self.kind].hook.format(i=self.index)

    @property
    def module(self) -> str:
        """The `ModuleLayout` field holding this site's module."""
        return KINDS[self.kind].module

    @property
    def value(self) -> str:
        """'input' or 'output' of the module."""
        return KINDS[self.kind].value

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"Site({self.name!r})"


#: What functions taking a site accept: an int layer (= `resid_pre.L`), a site name, or a `Site`.
SiteLike = Union[int, str, Site]

_HELP = (
    "use an int layer L (= 'resid_pre.L'), 'resid_pre.L', 'resid_post.L', 'vision.J', 'embed', 'projector', "
    "'final_norm' or 'logits'"
)


def parse(site: SiteLike) -> Site:
    """A `Site` from an int layer (the paper's `resid_pre.L`), a site name, or a `Site`. No range check.

    Example:
        >>> parse(8), parse("vision.-1"), parse("logits")
        (Site('resid_pre.8'), Site('vision.-1'), Site('logits'))
    """
    if isinstance(site, Site):
        return site
    if isinstance(site, bool):
        raise SiteError(f"site must be an int layer or a site name, not a bool: {_HELP}")
    if isinstance(site, int):
        return Site("resid_pre", site)
    if not isinstance(site, str):
        raise SiteError(f"site must be an int layer or a site name, not {type(site).__name__}: {_HELP}")
    m = _NAME.match(site.strip())
    kind, idx = (m.group(1), m.group(2)) if m else (None, None)
    if kind not in KINDS or (idx is None) != (KINDS[kind].indexed is None):
        raise SiteError(f"unknown site {site!r}: {_HELP}")
    return Site(kind, None if idx is None else int(idx))


def resolve(site: SiteLike, n_layers: int, n_vision_layers: int | None = None) -> Site:
    """`parse`, then check the layer index against the model and make it non-negative.

    Example:
        >>> resolve(-1, n_layers=4), resolve("vision.1", 4, 2)
        (Site('resid_pre.3'), Site('vision.1'))
        >>> resolve(9, n_layers=4)
        Traceback (most recent call last):
        ...
        vlens.errors.SiteError: resid_pre layer 9 is out of range: this model has layers 0..3 (or -4..-1)
    """
    s = parse(site)
    which = KINDS[s.kind].indexed
    if which is None:
        return s
    n = n_layers if which == "lm" else n_vision_layers
    if n is None:
        raise SiteError(f"site {s.name!r} needs the number of {which} layers")
    if not -n <= s.index < n:  # type: ignore[operator]
        raise SiteError(f"{s.kind} layer {s.index} is out of range: this model has layers 0..{n - 1} (or -{n}..-1)")
    return Site(s.kind, s.index % n)  # type: ignore[operator]


def hook_name(site: SiteLike, n_layers: int | None = None, n_vision_layers: int | None = None) -> str:
    """The SAE-Lens `hook_name` of a site (negative layers resolved when the layer counts are given).

    Example:
        >>> hook_name(3), hook_name("resid_post.-1", n_layers=32), hook_name("projector")
        ('blocks.3.hook_resid_pre', 'blocks.31.hook_resid_post', 'hook_projector')
    """
    s = parse(site)
    if n_layers is not None:
        s = resolve(s, n_layers, n_vision_layers)
    return s.hook_name


def from_hook_name(hook: str) -> Site:
    """The site of a SAE-Lens / TransformerLens hook name (the inverse of `hook_name`).

    Example:
        >>> from_hook_name("blocks.5.hook_resid_post"), from_hook_name("ln_final.hook_normalized")
        (Site('resid_post.5'), Site('final_norm'))
    """
    for pattern, kind in _HOOKS:
        m = pattern.match(str(hook))
        if m:
            return Site(kind, int(m.group(1)) if m.groups() else None)
    known = ", ".join(k.hook.replace("{i}", "L") for k in KINDS.values())
    raise SiteError(f"hook name {hook!r} names no vlens site; known hook names: {known}")


def names(n_layers: int, n_vision_layers: int = 0) -> list[str]:
    """Every site name of a model with these layer counts, in execution order.

    Example:
        >>> names(2, 1)
        ['embed', 'vision.0', 'projector', 'resid_pre.0', 'resid_post.0', 'resid_pre.1', 'resid_post.1', 'final_norm', 'logits']
    """
    out = ["embed"] + [f"vision.{j}" for j in range(n_vision_layers)] + ["projector"]
    for L in range(n_layers):
        out += [f"resid_pre.{L}", f"resid_post.{L}"]
    return out + ["final_norm", "logits"]
