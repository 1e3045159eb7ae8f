"""The local replacement model of "Circuit Tracing" (Ameisen et al. 2025) for one prompt and image.

Every MLP of the language model is replaced by its transcoder plus an *error
node* (the MLP's true output minus the transcoder's prediction, held fixed),
and the attention patterns and normalisation denominators are frozen at their
values in the clean forward. The model is then linear from the residual
stream's sources (token / patch embeddings, transcoder features' decoder
writes, error vectors) to the logits, and with the error nodes included it
reproduces the model's logits exactly.

`LocalReplacement.run` runs the Hugging Face module itself with plain PyTorch
hooks (no nnsight: the attribution needs the autograd graph of one forward,
which nnsight's traces hide), in one of two modes:

* **attribution** (`frozen=None`): values are the clean forward's; gradients
  flow only through the linear paths. Queries and keys are detached (so the
  softmax pattern is a constant), every RMSNorm passes gradient through its
  frozen scale `g / rms(x)` only, each MLP's output is detached except a
  skip transcoder's affine skip `x W_skip` (as circuit-tracer does), and a
  zero *sink* leaf is added at every `mlp_out.L` to read the gradient where
  features and errors write. The layer-0 input (`resid_pre.0`: token and
  patch embeddings) is a leaf.
* **intervention** (`frozen=` a clean `ReplacementState`): queries, keys, norm
  scales and error vectors are *pinned* to the clean run's values, and the
  transcoders' features are recomputed from the live MLP inputs (then passed
  through `edit`). This is the local replacement model run forward on edited
  features; `freeze_features=True` also pins every unedited feature.
  `live=` names parts that are left unfrozen: `"attention"` (queries and keys
  recomputed), `"norms"` (every RMSNorm recomputes its scale), `"mlps"` (the
  real MLPs run, and an edit adds its decoder change `(a' - a) W_dec` to their
  output). With all three (`LIVE`) the run is the real model with the edited
  features' decoder writes changed, the measure of a graph's faithfulness;
  one at a time, they show which mechanism makes the real model depart from
  the graph (`vlens.circuits.steer`).

Norms, two ways (`norms=`): `"frozen"` (circuit-tracer's, the default) holds
each RMSNorm's denominator at its clean value, so the model is exactly
linear and a graph's edges sum to the logit; `"jacobian"` linearises each
norm with its full Jacobian at the clean point, `g (dx / r - x (x . dx) /
(d r^3))`, which also removes the part of a change along the residual
stream's own direction (the real norm divides it out). Edges are then the
model's first-order effects, and their sum no longer equals the logit (a
norm's output does not change when its whole input is scaled). Measured on
the toy (`benchmarks/circuits.py`, docs/tutorials/circuits.md): the frozen
convention credits each feature with its projection on the residual stream
times the whole logit, which the real norms cancel (ablating the top
features: Spearman 0.20 between predicted and real changes, median ratio
-0.005); with the Jacobian, Spearman 0.92 and median ratio 0.94.

Which parts of circuit-tracer (PyPI `circuit-tracer` 0.5.0) are not used, and
why: its `ReplacementModel`s (TransformerLens and nnsight backends) take token
ids and build inputs from `W_E[tokens]`, with no way to feed a VLM's merged
image + text input embeddings, and the package cannot be installed beside
vlens (it pins `transformers<=4.57.3,>=4.56` and `huggingface-hub<1.0`;
vlens runs transformers 5.23 and huggingface-hub 1.x). So the freezing is
re-implemented here on the HF module, following its
`_configure_gradient_flow` / `_configure_skip_connection`. One deliberate
difference: circuit-tracer's error vector is `mlp_out - (Σ a W_dec + skip +
b_dec)` and the decoder bias is then no node; here `b_dec` is folded into the
error node, so the graph's edge sums reproduce the target logit exactly.

Families: the logits are exact in every family's tiny build (tested). Qwen3-VL's
"deepstack" adds visual features into the residual stream after its first
layers; those additions are no node of the graph here (they are constants of
the linear model), so its graphs' edge sums miss them (0.6% of the logit in
the tiny build) and its completeness is not exact.

    >>> import vlens, torch; from PIL import Image
    >>> from vlens.circuits.replacement import LocalReplacement, random_transcoders
    >>> vlm = vlens.tiny(n_layers=2)
    >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
    >>> state = LocalReplacement(vlm, random_transcoders(vlm, d_sae=16)).run(b)
    >>> with torch.no_grad():
    ...     hf = vlm.hf_model(**b.inputs).logits[0]
    >>> bool(torch.allclose(state.logits, hf, atol=1e-5))
    True
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import InputError, UnsupportedModelError
from ..sites import from_hook_name
from ..tokens import Batch
from .clt import CrossLayerTranscoder

if TYPE_CHECKING:
    from ..model import VLM

__all__ = ["ReplacementState", "LocalReplacement", "transcoder_layers", "random_transcoders", "skip_term", "LIVE",
           "NORMS", "LayerCoder", "layer_coders"]

#: A feature edit: layer -> function of that layer's activations [seq, d_sae] returning new activations.
Edits = Mapping[int, Callable[[Tensor], Tensor]]

#: How the norms are linearised: circuit-tracer's frozen denominators (complete graphs), or their Jacobian.
NORMS = ("frozen", "jacobian")

#: The parts an intervention-mode run can leave unfrozen (`LocalReplacement.run(live=...)`); all three: the real model.
LIVE = ("attention", "norms", "mlps")


@dataclass
class ReplacementState:
    """What one forward of the local replacement model recorded (one sequence; batch row 0).

    `mlp_in[L]` keeps its autograd graph in attribution mode; `sinks[L]`
    (zeros added at `mlp_out.L`) and `embed` (`resid_pre.0`) are the leaves
    whose gradients give the edges; `acts[L]` are the transcoder
    activations [seq, d_sae] (after any edit) and `deltas[L]` their change from
    the reference (the clean run's, or the live unedited ones); `errors[L]` the
    error vectors (with `b_dec`).
    """

    logits: Float[Tensor, "seq vocab"]
    final: Float[Tensor, "seq d_model"]
    embed: Float[Tensor, "seq d_model"]
    mlp_in: list[Tensor] = field(default_factory=list)
    mlp_out: list[Tensor] = field(default_factory=list)
    sinks: list[Tensor] = field(default_factory=list)
    acts: list[Tensor] = field(default_factory=list)
    deltas: list[Tensor] = field(default_factory=list)
    errors: list[Tensor] = field(default_factory=list)
    qk: dict[int, Tensor] = field(default_factory=dict)
    rms: dict[int, Tensor] = field(default_factory=dict)
    norm_io: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)


def transcoder_layers(vlm: VLM, transcoders: Sequence[Any] | Mapping[int, Any]) -> dict[int, Any]:
    """Map each LM layer to its transcoder, read from `cfg.metadata.hook_name` (`blocks.L.hook_mlp_in`).

    Every layer needs one: the local replacement model replaces every MLP.

    Example:
        >>> import vlens
        >>> vlm = vlens.tiny(n_layers=2)
        >>> sorted(transcoder_layers(vlm, random_transcoders(vlm, d_sae=8)))
        [0, 1]
    """
    items = transcoders.values() if isinstance(transcoders, Mapping) else transcoders
    out: dict[int, Any] = {}
    for tc in items:
        meta = getattr(getattr(tc, "cfg", None), "metadata", None)
        ins, outs = getattr(meta, "hook_name", None), getattr(meta, "hook_name_out", None)
        if not ins or not outs:
            raise InputError("a transcoder does not say where it reads and writes: set cfg.metadata.hook_name "
                             "('blocks.L.hook_mlp_in') and cfg.metadata.hook_name_out ('blocks.L.hook_mlp_out')")
        s_in, s_out = from_hook_name(ins), from_hook_name(outs)
        if s_in.kind != "mlp_in" or s_out.kind != "mlp_out" or s_in.index != s_out.index:
            raise InputError(f"a transcoder reads {ins!r} and writes {outs!r}: the replacement model needs "
                             "per-layer MLP transcoders, blocks.L.hook_mlp_in -> blocks.L.hook_mlp_out")
        out[int(s_in.index)] = tc
    missing = [L for L in range(vlm.n_layers) if L not in out]
    if missing:
        raise InputError(f"no transcoder for layers {missing}: the local replacement model replaces every MLP "
                         f"(pass one transcoder per layer 0..{vlm.n_layers - 1})")
    return out


def random_transcoders(vlm: VLM, d_sae: int = 32, seed: int = 0, skip: bool = False) -> list[Any]:
    """Randomly initialised SAE-Lens transcoders, one per LM layer (`Transcoder`, or `SkipTranscoder`).

    For tests and docs: SAE-Lens's own initialisation, with hook names set.

    Example:
        >>> import vlens
        >>> tcs = random_transcoders(vlens.tiny(n_layers=2), d_sae=8, skip=True)
        >>> type(tcs[0]).__name__, tcs[1].cfg.metadata.hook_name_out
        ('SkipTranscoder', 'blocks.1.hook_mlp_out')
    """
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.transcoder import SkipTranscoder, SkipTranscoderConfig, Transcoder, TranscoderConfig

    torch.manual_seed(seed)
    cls, cfg_cls = (SkipTranscoder, SkipTranscoderConfig) if skip else (Transcoder, TranscoderConfig)
    out = []
    for L in range(vlm.n_layers):
        meta = SAEMetadata(hook_name=f"blocks.{L}.hook_mlp_in", hook_name_out=f"blocks.{L}.hook_mlp_out")
        tc = cls(cfg_cls(d_in=vlm.d_model, d_sae=d_sae, d_out=vlm.d_model, apply_b_dec_to_input=False,
                         metadata=meta))
        with torch.no_grad():
            tc.b_enc.normal_(0, 0.1)
            tc.b_dec.normal_(0, 0.01)
            if skip:
                tc.W_skip.normal_(0, 0.02)
        out.append(tc)
    return out


def skip_term(tc: Any, x: Tensor) -> Tensor:
    """A skip transcoder's affine skip `x @ W_skip.T` (zero for a plain transcoder).

    Example:
        >>> import vlens
        >>> tc = random_transcoders(vlens.tiny(n_layers=1), d_sae=8)[0]
        >>> float(skip_term(tc, torch.ones(2, 64)).abs().sum())
        0.0
    """
    W = getattr(tc, "W_skip", None)
    return torch.zeros_like(x) if W is None else x @ W.T.to(x.dtype)


@dataclass
class LayerCoder:
    """One layer's features as the replacement model uses them: per-layer and cross-layer transcoders alike.

    `encode` maps the layer's MLP input rows to activations; `W_enc` [d_model,
    d_sae] are the encoder columns (a feature's encoder input is `x @ W_enc[:,
    f]`); `W_dec` [d_sae, n_out, d_model] writes to the MLP outputs of this
    layer and the `n_out - 1` after it (1 for a per-layer transcoder); `skip`
    is a skip transcoder's affine term (zero otherwise).
    """

    encode: Callable[[Tensor], Tensor]
    W_enc: Tensor
    W_dec: Tensor
    skip: Callable[[Tensor], Tensor]
    hook_name: str


def layer_coders(vlm: VLM, transcoders: Any) -> list[LayerCoder]:
    """One `LayerCoder` per LM layer, from per-layer SAE-Lens transcoders or a `CrossLayerTranscoder`.

    Example:
        >>> import vlens
        >>> from vlens.circuits.clt import CrossLayerTranscoder
        >>> vlm = vlens.tiny(n_layers=2)
        >>> [c.W_dec.shape[1] for c in layer_coders(vlm, random_transcoders(vlm, d_sae=8))]
        [1, 1]
        >>> [c.W_dec.shape[1] for c in layer_coders(vlm, CrossLayerTranscoder.random(2, 64, 8))]
        [2, 1]
    """
    if isinstance(transcoders, CrossLayerTranscoder):
        if transcoders.n_layers != vlm.n_layers or transcoders.d_model != vlm.d_model:
            raise InputError(f"the cross-layer transcoder spans {transcoders.n_layers} layers of width "
                             f"{transcoders.d_model}; the language model has {vlm.n_layers} of {vlm.d_model}")
        clt = transcoders
        return [LayerCoder(encode=lambda x, L=L: clt.encode_layer(x, L), W_enc=clt.W_enc[L].T, W_dec=clt.W_dec[L],
                           skip=torch.zeros_like, hook_name=clt.hook_names(L)[0]) for L in range(clt.n_layers)]
    per_layer = transcoder_layers(vlm, transcoders)
    return [LayerCoder(encode=tc.encode, W_enc=tc.W_enc, W_dec=tc.W_dec[:, None], skip=lambda x, tc=tc: skip_term(tc, x),
                       hook_name=str(tc.cfg.metadata.hook_name)) for _, tc in sorted(per_layer.items())]


def _norm_gain(norm: torch.nn.Module, d: int, like: Tensor) -> Tensor:
    """An RMSNorm's per-channel gain, read by running it on ones (Mistral: w; Gemma: 1 + w)."""
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 0.0)))
    with torch.no_grad():
        return norm(torch.ones(d, dtype=like.dtype, device=like.device)).float() * (1 + eps) ** 0.5


def _norm_rms(norm: torch.nn.Module, x: Tensor) -> Tensor:
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 0.0)))
    return x.float().pow(2).mean(-1, keepdim=True).add(eps).sqrt()


def _linear_norm(x: Tensor, x0: Tensor, y0: Tensor, g: Tensor, rms: Tensor, jacobian: bool) -> Tensor:
    """An RMSNorm `y = g x / r(x)` linearised at `x0`: `y0 + g dx / r0`, minus `g x0 (x0 . dx) / (d r0^3)`
    (the change of `r`) with `jacobian`."""
    dx = x.float() - x0.float()
    y = y0.float() + dx * g / rms
    if jacobian:
        y = y - g * x0.float() * (x0.float() * dx).mean(-1, keepdim=True) / rms ** 3
    return y


class LocalReplacement:
    """The local replacement model of a VLM with one transcoder per LM layer (see the module docs).

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny(n_layers=2)
        >>> rm = LocalReplacement(vlm, random_transcoders(vlm, d_sae=16))
        >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
        >>> clean = rm.run(b)
        >>> edited = rm.run(b, frozen=clean, edits={1: lambda a: a * 0})
        >>> clean.acts[1].shape[1], bool((edited.acts[1] == 0).all())
        (16, True)
    """

    def __init__(self, vlm: VLM, transcoders: Any, norms: str = "frozen") -> None:
        if norms not in NORMS:
            raise InputError(f"norms={norms!r}: name one of {list(NORMS)}")
        self.vlm, self.norms_mode = vlm, norms
        self.coders = layer_coders(vlm, transcoders)
        self.layers = [vlm.submodule(f"resid_pre.{L}") for L in range(vlm.n_layers)]
        self.mlps = [vlm.submodule(f"mlp_in.{L}") for L in range(vlm.n_layers)]
        self.mlp_outs = [vlm.submodule(f"mlp_out.{L}") for L in range(vlm.n_layers)]
        self.attns = [vlm.submodule(f"pattern.{L}") for L in range(vlm.n_layers)]
        self.final_norm = vlm.submodule("final_norm")
        for a in self.attns:
            if not (hasattr(a, "q_proj") and hasattr(a, "k_proj")):
                raise UnsupportedModelError(f"attention block {type(a).__name__} has no q_proj/k_proj: the replacement "
                                            "model freezes patterns by pinning queries and keys")
        self.norms = [m for layer in self.layers for m in layer.children() if "Norm" in type(m).__name__]
        self.norms.append(self.final_norm)
        bad = [type(m).__name__ for m in self.norms if "RMS" not in type(m).__name__]
        if bad:
            raise UnsupportedModelError(f"norms {sorted(set(bad))} are not RMSNorms: freezing a LayerNorm's mean is "
                                        "not implemented (every supported family's language model uses RMSNorm)")
        like = torch.empty(0, dtype=vlm.dtype, device=vlm.device)
        self.gains = [_norm_gain(m, vlm.d_model, like) for m in self.norms]

    def run(self, batch: Batch, *, frozen: ReplacementState | None = None, edits: Edits | None = None,
            freeze_features: bool = False, live: Sequence[str] = ()) -> ReplacementState:
        """One forward of the replacement model: attribution mode (`frozen=None`) or intervention mode.

        `live` (intervention mode): the parts of `LIVE` left unfrozen (module docs).

        Example:
            >>> import vlens; from PIL import Image
            >>> vlm = vlens.tiny(n_layers=2)
            >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
            >>> rm = LocalReplacement(vlm, random_transcoders(vlm, d_sae=16))
            >>> s = rm.run(b)
            >>> s.embed.requires_grad, len(s.sinks)
            (True, 2)
            >>> real = rm.run(b, frozen=s, live=LIVE)       # nothing edited: the model's own logits
            >>> bool(torch.allclose(real.logits, s.logits, atol=1e-5))
            True
        """
        if len(batch) != 1:
            raise InputError(f"the replacement model traces one sequence, got a batch of {len(batch)}: "
                             "prepare one prompt and image (batch[i] of a larger batch: vlm.prepare([p], [img]))")
        if (edits or live) and frozen is None:
            raise InputError("feature edits and live parts need the clean state: pass frozen=rm.run(batch) "
                             "(attribution mode cannot take them)")
        unknown = sorted(set(live) - set(LIVE))
        if unknown:
            raise InputError(f"live parts {unknown} are unknown: name some of {list(LIVE)}")
        st = ReplacementState(logits=torch.empty(0), final=torch.empty(0), embed=torch.empty(0))
        ctx = torch.enable_grad() if frozen is None else torch.no_grad()
        with ctx, self._hooks(st, frozen, dict(edits or {}), freeze_features, set(live)):
            out = self.vlm.hf_model(**batch.inputs)
        st.logits = out.logits[0]
        return st

    @contextmanager
    def _hooks(self, st: ReplacementState, frozen: ReplacementState | None, edits: dict,
               freeze_features: bool, live: set[str]) -> Iterator[None]:
        handles = [self.layers[0].register_forward_pre_hook(self._embed_hook(st), with_kwargs=True)]
        pin = {part: None if part in live else frozen for part in LIVE}
        for L, attn in enumerate(self.attns):
            for j, proj in enumerate((attn.q_proj, attn.k_proj)):
                handles.append(proj.register_forward_hook(self._qk_hook(st, pin["attention"], 2 * L + j)))
        for i, norm in enumerate(self.norms):
            handles.append(norm.register_forward_hook(self._norm_hook(st, pin["norms"], i)))
        for L in range(self.vlm.n_layers):
            handles.append(self.mlps[L].register_forward_pre_hook(self._mlp_in_hook(st)))
            handles.append(self.mlp_outs[L].register_forward_hook(
                self._mlp_out_hook(st, frozen, L, edits.get(L), freeze_features, "mlps" in live)))
        handles.append(self.final_norm.register_forward_hook(self._final_hook(st)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _embed_hook(self, st: ReplacementState) -> Callable:
        def hook(module, args, kwargs):
            if args:
                h = args[0]
            else:
                h = kwargs["hidden_states"]
            leaf = h[0].detach().clone().requires_grad_(torch.is_grad_enabled())
            st.embed = leaf
            leaf = leaf[None]
            if args:
                return (leaf, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": leaf}
        return hook

    def _qk_hook(self, st: ReplacementState, frozen: ReplacementState | None, key: int) -> Callable:
        def hook(module, args, out):
            if frozen is not None:
                return frozen.qk[key].to(out.dtype)
            st.qk[key] = out.detach()
            return out.detach()
        return hook

    def _norm_hook(self, st: ReplacementState, frozen: ReplacementState | None, key: int) -> Callable:
        jacobian = self.norms_mode == "jacobian"

        def hook(module, args, out):
            x = args[0]
            g = self.gains[key].to(x.device)
            if frozen is not None:  # the clean output plus the linear change (exact when unchanged)
                x0, y0 = frozen.norm_io[key]
                return _linear_norm(x, x0, y0, g, frozen.rms[key], jacobian).to(out.dtype)
            rms = _norm_rms(module, x).detach()
            st.rms[key] = rms
            st.norm_io[key] = (x.detach(), out.detach())
            return _linear_norm(x, x.detach(), out.detach(), g, rms, jacobian).to(out.dtype)
        return hook

    def _mlp_in_hook(self, st: ReplacementState) -> Callable:
        def hook(module, args):
            st.mlp_in.append(args[0][0])
        return hook

    def _written(self, acts: Sequence[Tensor], layer: int) -> Tensor:
        """What the features of layers <= `layer` (activations `acts[L]`) write to `layer`'s MLP output."""
        out = torch.zeros(())
        for src in range(layer + 1):
            W = self.coders[src].W_dec
            if layer - src < W.shape[1]:
                out = out + acts[src] @ W[:, layer - src]
        return out

    def _mlp_out_hook(self, st: ReplacementState, frozen: ReplacementState | None, L: int,
                      edit: Callable | None, freeze_features: bool, real: bool) -> Callable:
        c = self.coders[L]

        def hook(module, args, out):
            x, y = st.mlp_in[L], out[0]
            dt = c.W_dec.dtype
            acts = c.encode(x.detach().to(dt))
            intervening = frozen is not None and not real
            if intervening and freeze_features:
                acts = frozen.acts[L].clone()
            base = frozen.acts[L] if intervening else acts
            if edit is not None:
                acts = edit(acts.clone())
            st.acts.append(acts.detach())
            st.deltas.append((acts - base).detach())
            if real:  # the real MLP, plus the edits' change of the decoder writes
                base_acts = [a - d for a, d in zip(st.acts, st.deltas)]
                err = y.to(dt) - self._written(base_acts, L) - c.skip(x.to(dt))
                new = y.to(dt) + self._written(st.deltas, L)
            elif frozen is None:
                err = y.detach().to(dt) - self._written(st.acts, L) - c.skip(x.detach().to(dt))
                sink = torch.zeros_like(y, requires_grad=torch.is_grad_enabled())
                st.sinks.append(sink)
                new = y.detach().to(dt) + c.skip(x.to(dt)) - c.skip(x.detach().to(dt)) + sink
            else:  # the clean output plus the change of features and skip (exact when nothing changed)
                err = frozen.errors[L]
                x0 = frozen.mlp_in[L].detach().to(dt)
                new = frozen.mlp_out[L].to(dt) + self._written(st.deltas, L) + c.skip(x.to(dt)) - c.skip(x0)
            new = new.to(y.dtype)
            st.mlp_out.append(new.detach())   # the replacement's MLP output (= the MLP's, unedited)
            st.errors.append(err.detach())
            return new[None]
        return hook

    def _final_hook(self, st: ReplacementState) -> Callable:
        def hook(module, args, out):
            st.final = out[0]
        return hook
