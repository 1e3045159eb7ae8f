"""The site table: every point of a VLM that vlens reads or writes, by name, module and SAE-Lens hook.

A *site* is where an activation lives. Its name is what you write, its module
path is where nnsight finds it (per model family, as data: `ModuleLayout`), and
its hook name is what SAE-Lens and TransformerLens call it:

| site           | module (LLaVA-Next, transformers 5)      | value  | SAE-Lens `hook_name`             |
|----------------|------------------------------------------|--------|----------------------------------|
| `resid_pre.L`  | `model.language_model.layers.L`          | input  | `blocks.L.hook_resid_pre`        |
| `resid_post.L` | `model.language_model.layers.L`          | output | `blocks.L.hook_resid_post`       |
| `attn_out.L`   | `….layers.L.self_attn` (Gemma 3: `….layers.L.post_attention_layernorm`) | output | `blocks.L.hook_attn_out` |
| `mlp_in.L`     | `….layers.L.mlp`                         | input  | `blocks.L.hook_mlp_in` (alias `blocks.L.ln2.hook_normalized`) |
| `mlp_out.L`    | `….layers.L.mlp` (Gemma 3: `….layers.L.post_feedforward_layernorm`) | output | `blocks.L.hook_mlp_out` |
| `z.L`          | `….layers.L.self_attn.o_proj`            | input, `[batch, seq, heads, d_head]` | `blocks.L.attn.hook_z` |
| `pattern.L`    | `….layers.L.self_attn` (its attention function's q, k) | `[batch, heads, query, key]` | `blocks.L.attn.hook_pattern` |
| `vision.J`     | `model.vision_tower.encoder.layers.J`    | output | `vision.blocks.J.hook_resid_post`|
| `embed`        | `model.language_model.embed_tokens`      | output | `hook_embed`                     |
| `projector`    | `model.multi_modal_projector`            | output | `hook_projector`                 |
| `final_norm`   | `model.language_model.norm`              | output | `ln_final.hook_normalized`       |
| `logits`       | `lm_head`                                | output | `hook_logits`                    |

`resid_pre.L` is HF `hidden_states[L]`; `resid_post.L` is `hidden_states[L + 1]`
(before the final norm on the last layer). An int `L` anywhere a site is asked
for means `resid_pre.L`, the paper's hook point.

Inside a layer, `attn_out.L` and `mlp_out.L` are what the attention and MLP
blocks ADD to the residual stream, so `resid_post.L == resid_pre.L +
attn_out.L + mlp_out.L` in every family. Gemma 3 norms both blocks' inputs
and outputs: its `attn_out`/`mlp_out` are the post-norms' outputs, its
`mlp_in` is the pre-feedforward norm's output (the MLP's input, as in every
family: `ln2` is `post_attention_layernorm` elsewhere). `z.L` is the heads'
outputs before `o_proj`: `o_proj(z.flatten(-2))` is `attn_out` in every
family except Gemma 3, where it is `attn_out` BEFORE the post-attention norm.
Grouped-query models have `heads` query heads in `z` and `pattern` (the
key/value heads are shared, as HF's `repeat_kv` does). `pattern.L` is
computed from the queries, keys and mask the layer handed its attention
function (see `vlens.attention`), only for the query rows asked for; it is
read-only: block attention edges with `vlens.attention.knockout`. Qwen's
M-RoPE, Gemma's q/k norms, sliding windows and image-bidirectional masks
all come from the model's own code and mask.

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

__all__ = ["Site", "SiteLike", "ModuleLayout", "KINDS", "ALIASES", "IN_LAYER", "VECTOR_KINDS", "RESIDUAL_KINDS", "LAYER_FIELDS", "parse", "resolve", "hook_name", "from_hook_name", "names"]


@dataclass(frozen=True)
class _Kind:
    module: str  # field of ModuleLayout
    value: str  # "input" or "output" of that module
    hook: str  # SAE-Lens hook name, `{i}` for the layer index
    indexed: str | None  # "lm", "vision" or None
    sub: str | None = None  # field of ModuleLayout: a submodule path inside each layer


#: Site kinds: name -> which module (a `ModuleLayout` field), which value, which hook name, indexed by which layers.
KINDS: dict[str, _Kind] = {
    "resid_pre": _Kind("lm_layers", "input", "blocks.{i}.hook_resid_pre", "lm"),
    "resid_post": _Kind("lm_layers", "output", "blocks.{i}.hook_resid_post", "lm"),
    "attn_out": _Kind("lm_layers", "output", "blocks.{i}.hook_attn_out", "lm", "attn_out"),
    "mlp_in": _Kind("lm_layers", "input", "blocks.{i}.hook_mlp_in", "lm", "mlp"),
    "mlp_out": _Kind("lm_layers", "output", "blocks.{i}.hook_mlp_out", "lm", "mlp_out"),
    "z": _Kind("lm_layers", "input", "blocks.{i}.attn.hook_z", "lm", "o_proj"),
    "pattern": _Kind("lm_layers", "recomputed", "blocks.{i}.attn.hook_pattern", "lm", "attn"),
    "vision": _Kind("vision_layers", "output", "vision.blocks.{i}.hook_resid_post", "vision"),
    "embed": _Kind("embed", "output", "hook_embed", None),
    "projector": _Kind("projector", "output", "hook_projector", None),
    "final_norm": _Kind("final_norm", "output", "ln_final.hook_normalized", None),
    "logits": _Kind("lm_head", "output", "hook_logits", None),
}
#: The residual-stream kinds (entering, leaving a layer): what the explorer offers and `vlens harvest --site` takes.
RESIDUAL_KINDS = ("resid_pre", "resid_post")

_NAME = re.compile(r"^([a-z_]+)(?:\.(-?\d+))?$")
#: Other hook names of the same sites (TransformerLens's name of the MLP's normalised input).
ALIASES: dict[str, str] = {"blocks.{i}.ln2.hook_normalized": "mlp_in"}
#: Site kinds with one vector of a fixed width per token in every LM layer: what harvests store and SAEs train on.
VECTOR_KINDS = ("resid_pre", "resid_post", "attn_out", "mlp_in", "mlp_out", "z")
#: Sites inside each LM layer, in the order a layer computes them (between `resid_pre.L` and `resid_post.L`).
IN_LAYER = ("pattern", "z", "attn_out", "mlp_in", "mlp_out")
_HOOKS = [(re.compile("^" + re.escape(h).replace(r"\{i\}", r"(\d+)") + "$"), name)
          for name, h in [(n, k.hook) for n, k in KINDS.items()] + [(n, h) for h, n in ALIASES.items()]]


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
    # paths inside one LM layer (fields named in `LAYER_FIELDS`)
    attn: str = "self_attn"
    o_proj: str = "self_attn.o_proj"
    mlp: str = "mlp"
    attn_out: str = "self_attn"
    mlp_out: str = "mlp"


#: `ModuleLayout` fields that are paths inside one LM layer, not from the top module.
LAYER_FIELDS = ("attn", "o_proj", "mlp", "attn_out", "mlp_out")


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
        """'input' or 'output' of the module ('recomputed' for `pattern`)."""
        return KINDS[self.kind].value

    @property
    def sub(self) -> str | None:
        """The `ModuleLayout` field of the submodule inside the layer, for sites inside a layer."""
        return KINDS[self.kind].sub

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"Site({self.name!r})"


#: What functions taking a site accept: an int layer (= `resid_pre.L`), a site name, or a `Site`.
SiteLike = Union[int, str, Site]

_HELP = (
    "use an int layer L (= 'resid_pre.L'), 'resid_pre.L', 'resid_post.L', 'attn_out.L', 'mlp_in.L', 'mlp_out.L', "
    "'z.L', 'pattern.L', 'vision.J', 'embed', 'projector', 'final_norm' or 'logits'"
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
        >>> from_hook_name("blocks.3.attn.hook_z"), from_hook_name("blocks.3.ln2.hook_normalized")
        (Site('z.3'), Site('mlp_in.3'))
    """
    for pattern, kind in _HOOKS:
        m = pattern.match(str(hook))
        if m:
            return Site(kind, int(m.group(1)) if m.groups() else None)
    known = ", ".join(h.replace("{i}", "L") for h in [k.hook for k in KINDS.values()] + list(ALIASES))
    raise SiteError(f"hook name {hook!r} names no vlens site; known hook names: {known}")


def names(n_layers: int, n_vision_layers: int = 0) -> list[str]:
    """Every site name of a model with these layer counts, in execution order.

    Example:
        >>> names(1, 1)
        ['embed', 'vision.0', 'projector', 'resid_pre.0', 'pattern.0', 'z.0', 'attn_out.0', 'mlp_in.0', 'mlp_out.0', 'resid_post.0', 'final_norm', 'logits']
    """
    out = ["embed"] + [f"vision.{j}" for j in range(n_vision_layers)] + ["projector"]
    for L in range(n_layers):
        out += [f"resid_pre.{L}", *(f"{k}.{L}" for k in IN_LAYER), f"resid_post.{L}"]
    return out + ["final_norm", "logits"]
