"""Interventions: small functions you call inside a `vlm.trace` or `vlm.generate` block.

Each function edits one site of the model in place, at the tokens a
`TokenLayout` selection names, and returns nothing you must keep (those that
compute SAE latents return them, for you to `.save()` if you want them).
They compose: call several in one trace, at any layers, in the model's
execution order (read layer 3 before layer 5, as nnsight requires).

    with torch.no_grad(), vlm.trace(batch):
        add(vlm, 8, v, k=4.0, batch=batch)                      # steer the image tokens
        project_out(vlm, 12, u, batch=batch, tokens="text")     # remove a direction from text tokens
        logits = vlm.read("logits").save()

`site` is an int layer L (the paper's hook point, `resid_pre.L` = HF
`hidden_states[L]`) or any site name of `VLM.read` (`"resid_post.3"`,
`"vision.1"`, `"mlp_out.3"`; `"z.3"` is edited as one vector per token, the
heads concatenated). `tokens` is any token selection of `vlens.tokens.select` ('image', 'text',
'answer', 'base', 'highres', 'newline', 'image+answer', int positions, a
[batch, seq] bool mask, or a function of the layout such as
`vlens.tokens.tile(0)`). `tokens=None` edits every position.

In `generate`, the first forward (the prefill) runs over the whole prompt and
later steps see one new token each. A selection applies where the shapes match
(the prefill); at later steps the edit touches the new token only when
`new_tokens=True`, and is skipped otherwise. To edit every step, call the
function inside `for step in tracer.all():` (see `vlens.steering.steered_generate`,
which does this for you).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence, TYPE_CHECKING

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .errors import InputError
from .sites import SiteLike, from_hook_name
from .tokens import Batch, TokenLayout, TokenSelection, select

if TYPE_CHECKING:
    from .model import VLM

__all__ = ["ablate", "add", "check_vector", "clamp_latent", "project_out", "splice_sae", "splice_transcoder"]


# -- vectors ------------------------------------------------------------


def check_vector(v: Any, d_model: int, what: str = "vector") -> Float[Tensor, " d_model"]:
    """Check that `v` is a finite vector of width `d_model` and return it as a 1-D tensor.

    Example:
        >>> check_vector(torch.ones(4), 4).shape
        torch.Size([4])
        >>> check_vector(torch.ones(3), 4)
        Traceback (most recent call last):
        ...
        vlens.errors.InputError: vector has width 3 but the model's residual stream has d_model 4: build it from activations of this model (same layer width), e.g. vlens.steering.diff_of_means on features harvested from it
    """
    if not isinstance(v, Tensor):
        v = torch.as_tensor(v, dtype=torch.float32)
    if v.dim() == 2 and v.shape[0] == 1:
        v = v[0]
    if v.dim() != 1:
        raise InputError(f"{what} must be 1-D [d_model={d_model}], got shape {tuple(v.shape)}")
    if v.shape[0] != d_model:
        raise InputError(
            f"{what} has width {v.shape[0]} but the model's residual stream has d_model {d_model}: build it from "
            "activations of this model (same layer width), e.g. vlens.steering.diff_of_means on features harvested "
            "from it"
        )
    if not torch.isfinite(v).all():
        bad = int((~torch.isfinite(v)).sum())
        raise InputError(
            f"{what} has {bad} NaN/inf entries: recompute it (a class with no examples gives a NaN mean; "
            "a zero vector normalised gives NaN) or pass torch.nan_to_num(v)"
        )
    return v


# -- the core edit -----------------------------------------------------------------------------


def _edit(
    vlm: VLM,
    site: SiteLike,
    batch: Batch | TokenLayout | None,
    tokens: Any,
    fn: Callable[[Tensor], Tensor],
    new_tokens: bool,
) -> Tensor | None:
    """Apply fn ([n, d] -> [n, d]) to the selected rows of the live activation, in place."""
    h = vlm.vectors(site)
    if tokens is None:
        h[...] = fn(h.reshape(-1, h.shape[-1])).reshape(h.shape)
        return h
    if batch is None:
        raise InputError("a token selection needs the batch: pass batch=<the Batch from vlm.prepare>, or tokens=None")
    mask = select(batch, tokens, nonempty=True)
    if h.dim() == 3 and tuple(h.shape[:2]) == tuple(mask.shape):
        mask = mask.to(h.device)
        h[mask] = fn(h[mask])
        return h
    if h.dim() == 3 and h.shape[0] == mask.shape[0] and h.shape[1] < mask.shape[1]:
        # a decode step of generate (KV cache): only the new token(s) are here
        if new_tokens:
            h[:, -1] = fn(h[:, -1])
        return h
    raise InputError(
        f"site {vlm.site(site).name!r} has shape {tuple(h.shape)}, which a token selection over [batch, seq] = "
        f"{tuple(mask.shape)} cannot index: use tokens=None to edit every position, or a residual site"
    )


def add(
    vlm: VLM,
    site: SiteLike,
    vector: Float[Tensor, " d_model"],
    k: float = 1.0,
    *,
    batch: Batch | TokenLayout | None = None,
    tokens: TokenSelection | None = "image",
    new_tokens: bool = False,
) -> None:
    """Add `k · vector` to the residual stream at `site`, at the selected tokens (the paper's steering).

    Example:
        >>> import vlens, torch; from PIL import Image
        >>> vlm = vlens.tiny()
        >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
        >>> with torch.no_grad(), vlm.trace(b):
        ...     add(vlm, 2, torch.ones(vlm.d_model), k=3.0, batch=b)
        ...     h = vlm.resid_pre(2).save()
        >>> with torch.no_grad(), vlm.trace(b):
        ...     h0 = vlm.resid_pre(2).save()
        >>> round(float((h - h0)[b.layout.image].mean()), 4)
        3.0
    """
    v = check_vector(vector, vlm.width(site))
    if not math.isfinite(float(k)):
        raise InputError(f"k must be a finite number, got {k}")

    def fn(x: Tensor) -> Tensor:
        # in float32, rounded once to the model's dtype: the paper's fp16 round trip
        # (`(h.float() + k·v).half()`, multimodal-saes eval_efficacy.py / steering_rollouts.py)
        return (x.float() + float(k) * v.to(x.device, torch.float32)).to(x.dtype)

    _edit(vlm, site, batch, tokens, fn, new_tokens)


def ablate(
    vlm: VLM,
    site: SiteLike,
    *,
    batch: Batch | TokenLayout | None = None,
    tokens: TokenSelection | None = "image",
    value: str | Tensor = "zero",
    new_tokens: bool = False,
) -> None:
    """Ablate the selected tokens at `site`: `value="zero"`, `"mean"` (mean of the selected tokens of
    this batch) or a given vector (e.g. a data-set mean activation).

    Example:
        >>> import vlens, torch; from PIL import Image
        >>> vlm = vlens.tiny()
        >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
        >>> with torch.no_grad(), vlm.trace(b):
        ...     ablate(vlm, 1, batch=b, tokens="image")
        ...     h = vlm.resid_pre(1).save()
        >>> float(h[b.layout.image].abs().max())
        0.0
    """
    if isinstance(value, str):
        if value not in ("zero", "mean"):
            raise InputError(f"value must be 'zero', 'mean' or a [d_model] vector, not {value!r}")
        if value == "zero":
            fn = lambda x: torch.zeros_like(x)  # noqa: E731
        else:
            fn = lambda x: x.mean(0, keepdim=True).expand_as(x)  # noqa: E731
    else:
        v = check_vector(value, vlm.width(site), "ablation value")
        fn = lambda x: v.to(x.device, x.dtype).expand_as(x).clone()  # noqa: E731
    _edit(vlm, site, batch, tokens, fn, new_tokens)


def _orthonormal(directions: Tensor, d_model: int) -> Tensor:
    d = directions if isinstance(directions, Tensor) else torch.as_tensor(directions, dtype=torch.float32)
    if d.dim() == 1:
        d = check_vector(d, d_model, "direction")[None]
    else:
        for row in d:
            check_vector(row, d_model, "direction")
    if (d.norm(dim=-1) == 0).any():
        raise InputError("a direction to project out is the zero vector: pass non-zero directions")
    q, _ = torch.linalg.qr(d.float().T)  # [d_model, r]
    return q.T  # [r, d_model]


def project_out(
    vlm: VLM,
    site: SiteLike,
    directions: Float[Tensor, "*r d_model"],
    *,
    batch: Batch | TokenLayout | None = None,
    tokens: TokenSelection | None = "image",
    new_tokens: bool = False,
) -> None:
    """Remove the component along one direction (or the span of several rows) at the selected tokens.

    Example:
        >>> import vlens, torch; from PIL import Image
        >>> vlm = vlens.tiny()
        >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
        >>> u = torch.randn(vlm.d_model)
        >>> with torch.no_grad(), vlm.trace(b):
        ...     project_out(vlm, 2, u, batch=b, tokens="all")
        ...     h = vlm.resid_pre(2).save()
        >>> float((h[0] @ u).abs().max()) < 1e-3
        True
    """
    q = _orthonormal(directions, vlm.width(site))

    def fn(x: Tensor) -> Tensor:
        qq = q.to(x.device, x.dtype)
        return x - (x @ qq.T) @ qq

    _edit(vlm, site, batch, tokens, fn, new_tokens)


# -- SAE edits -----------------------------------------------------------------------------------


def _check_sae(sae: Any, d_model: int) -> None:
    if not (hasattr(sae, "encode") and hasattr(sae, "decode")):
        raise InputError(f"sae must have encode/decode (an SAE-Lens SAE or a vlens.sae class), got {type(sae).__name__}")
    W = getattr(sae, "W_dec", None)
    if W is not None and W.shape[-1] != d_model:
        raise InputError(
            f"this SAE decodes to width {W.shape[-1]} but the site has width {d_model}: use an SAE trained on "
            "this model at this site (z.L is heads × d_head wide, the others d_model)"
        )


def _sae_dtype(sae: Any) -> tuple[torch.device, torch.dtype]:
    W = getattr(sae, "W_dec", None)
    if W is None:
        p = next(sae.parameters())
        return p.device, p.dtype
    return W.device, W.dtype


def clamp_latent(
    vlm: VLM,
    site: SiteLike,
    sae: Any,
    latent: int | Sequence[int],
    value: float | Sequence[float],
    *,
    batch: Batch | TokenLayout | None = None,
    tokens: TokenSelection | None = "image",
    new_tokens: bool = False,
) -> None:
    """Clamp SAE latent(s) to `value` at the selected tokens, keeping the SAE's error term.

    The activation becomes `h + Σ_i (value_i - f_i(h)) · W_dec[i]`: only the
    clamped latents' contributions change; what the SAE does not reconstruct
    is left alone.

    Example:
        >>> import vlens, torch; from PIL import Image
        >>> from sae_lens import StandardSAE, StandardSAEConfig
        >>> vlm = vlens.tiny()
        >>> sae = StandardSAE(StandardSAEConfig(d_in=vlm.d_model, d_sae=128))
        >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
        >>> with torch.no_grad(), vlm.trace(b):
        ...     clamp_latent(vlm, 2, sae, latent=5, value=10.0, batch=b)
        ...     f = sae.encode(vlm.resid_pre(2)).save()
        >>> bool((f[b.layout.image][:, 5] > 5).all())
        True
    """
    _check_sae(sae, vlm.width(site))
    latents = [latent] if isinstance(latent, int) else list(latent)
    values = torch.as_tensor([value] * len(latents) if isinstance(value, (int, float)) else list(value),
                             dtype=torch.float32)
    if len(values) != len(latents):
        raise InputError(f"got {len(values)} values for {len(latents)} latents: give one value per latent, or one for all")
    d_sae = sae.W_dec.shape[0]
    bad = [i for i in latents if not 0 <= i < d_sae]
    if bad:
        raise InputError(f"latents {bad} do not exist: this SAE has latents 0..{d_sae - 1}")
    dev, dt = _sae_dtype(sae)

    def fn(x: Tensor) -> Tensor:
        f = sae.encode(x.to(dev, dt))[:, latents]
        delta = (values.to(dev, dt) - f) @ sae.W_dec[latents]
        return x + delta.to(x.device, x.dtype)

    _edit(vlm, site, batch, tokens, fn, new_tokens)


def splice_sae(
    vlm: VLM,
    site: SiteLike,
    sae: Any,
    *,
    batch: Batch | TokenLayout | None = None,
    tokens: TokenSelection | None = "all",
    error: bool = False,
    edit: Callable[[Tensor], Tensor] | None = None,
    new_tokens: bool = True,
) -> Tensor:
    """Replace the selected activations with the SAE's reconstruction; returns the latents [n, d_sae].

    With `error=True` the SAE's error term `h - decode(encode(h))` is added
    back, so the output is unchanged unless `edit` (a function of the latents
    [n, d_sae], returning new latents) changes them. Without it this is the
    splice of "loss recovered".

    Example:
        >>> import vlens, torch; from PIL import Image
        >>> from sae_lens import StandardSAE, StandardSAEConfig
        >>> vlm = vlens.tiny()
        >>> sae = StandardSAE(StandardSAEConfig(d_in=vlm.d_model, d_sae=128))
        >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
        >>> with torch.no_grad(), vlm.trace(b):
        ...     f = splice_sae(vlm, 2, sae, batch=b, tokens="image").save()
        >>> f.shape[1]
        128
    """
    _check_sae(sae, vlm.width(site))
    dev, dt = _sae_dtype(sae)
    out: list[Tensor] = []

    def fn(x: Tensor) -> Tensor:
        xs = x.to(dev, dt)
        f = sae.encode(xs)
        recon = sae.decode(f)
        if edit is not None:
            f2 = edit(f)
            new = sae.decode(f2)
        else:
            f2, new = f, recon
        if error:
            new = new + (xs - recon)
        out.append(f2)
        return new.to(x.device, x.dtype)

    _edit(vlm, site, batch, tokens, fn, new_tokens)
    return out[0] if out else torch.zeros(0, sae.W_dec.shape[0])


def splice_transcoder(
    vlm: VLM,
    transcoder: Any,
    *,
    batch: Batch | TokenLayout | None = None,
    tokens: TokenSelection | None = "all",
    error: bool = False,
    edit: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Replace an MLP's output with a transcoder's prediction from its input; returns the latents [n, d_sae].

    The transcoder reads `mlp_in.L` and writes `mlp_out.L` (its
    `cfg.metadata.hook_name` / `hook_name_out`, e.g. Gemma Scope 2's
    `blocks.L.hook_mlp_in` → `blocks.L.hook_mlp_out`; for Gemma 3 both are
    after the MLP's norms, see `vlens.sites`). With `error=True` the MLP's
    true output minus the prediction is added back, so only `edit` (a
    function of the latents) changes anything.

    Example:
        >>> import vlens, torch; from PIL import Image
        >>> from sae_lens.saes.transcoder import Transcoder, TranscoderConfig
        >>> from sae_lens.saes.sae import SAEMetadata
        >>> vlm = vlens.tiny()
        >>> meta = SAEMetadata(hook_name="blocks.1.hook_mlp_in", hook_name_out="blocks.1.hook_mlp_out")
        >>> tc = Transcoder(TranscoderConfig(d_in=64, d_sae=32, d_out=64, apply_b_dec_to_input=False,
        ...                                  metadata=meta))
        >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
        >>> with torch.no_grad(), vlm.trace(b):
        ...     f = splice_transcoder(vlm, tc, batch=b, tokens="image").save()
        >>> f.shape[1]
        32
    """
    meta = transcoder.cfg.metadata
    ins, outs = getattr(meta, "hook_name", None), getattr(meta, "hook_name_out", None)
    if not ins or not outs:
        raise InputError("this transcoder does not say where it reads and writes: set cfg.metadata.hook_name "
                         "(e.g. 'blocks.3.hook_mlp_in') and cfg.metadata.hook_name_out ('blocks.3.hook_mlp_out')")
    site_in, site_out = vlm.site(from_hook_name(ins)), vlm.site(from_hook_name(outs))
    _check_sae(transcoder, vlm.width(site_out))
    dev, dt = _sae_dtype(transcoder)
    x = vlm.vectors(site_in)
    mask = None if tokens is None else _mask_for(vlm, batch, tokens, x)
    xs = (x.reshape(-1, x.shape[-1]) if mask is None else x[mask]).to(dev, dt)
    f = transcoder.encode(xs)
    recon = transcoder.forward(xs)  # with a skip transcoder's affine term
    f2 = f if edit is None else edit(f)
    new = recon if edit is None else recon - transcoder.decode(f) + transcoder.decode(f2)

    def fn(y: Tensor) -> Tensor:
        out = new + (y.to(dev, dt) - recon) if error else new
        return out.to(y.device, y.dtype)

    _edit(vlm, site_out, batch, tokens, fn, new_tokens=False)
    return f2


def _mask_for(vlm: VLM, batch: Batch | TokenLayout | None, tokens: TokenSelection, h: Tensor) -> Tensor:
    if batch is None:
        raise InputError("a token selection needs the batch: pass batch=<the Batch from vlm.prepare>, or tokens=None")
    return select(batch, tokens, nonempty=True).to(h.device)
