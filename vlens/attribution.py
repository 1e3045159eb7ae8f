"""Attribution of any scalar of a forward pass to image tokens, patches and pixels.

A *target* is a small callable `(vlm, batch) -> [batch]`, run inside a trace: an answer's log-prob or logit
(`answer_target`, `token_target`), a probe's logit (`probe_target`), an SAE latent's activation at chosen tokens
(`sae_target`), a steering vector's projection (`direction_target`), or your own function (wrap it in `Target` to
say which site it reads). Methods return an `Attribution` (per-token values, patch maps, overlays):
`grad_x_act`; `integrated_gradients` from a stated baseline (values sum to f(input) − f(baseline));
`attribution_patching`, the linear estimate (h_corrupt − h_clean)·∇f(clean) of patching each token from a
corrupted image, next to `activation_patching`, which runs every patch; `occlusion` of each token's pixel box, and
`occlusion_check` (the most-attributed patches against as many random ones); `pixel_saliency` on the processed
pixels (HF processors resize and pad in PIL / numpy, which is not differentiable: maps reach the original image
through patch boxes).

Gradients flow through plain nnsight traces: the site's value is replaced by a leaf copy that requires grad (the
same values, so the forward is unchanged) and `with y.sum().backward(inputs=[x])` reads its gradient; model
parameters get no `.grad`.

    >>> import vlens; from PIL import Image
    >>> vlm = vlens.tiny(words=["red"])
    >>> b = vlm.prepare(["<image>\\nWhat is it?"], [Image.new("RGB", (32, 32))], answers=["red"])
    >>> a = grad_x_act(vlm, b, answer_target(), site=1)
    >>> a.per_token().shape[0] == int(b.layout.image.sum())
    True
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float
from PIL import Image
from torch import Tensor

from .activations.read import read_layers
from .errors import InputError, UnsupportedModelError
from .lens import box_mass, patch_grid, patch_values, token_ids
from .scoring import answer_logprob
from .sites import SiteLike
from .tokens import Batch, TokenLayout, TokenSelection, select
from .viz import heatmap_overlay

if TYPE_CHECKING:
    from .model import VLM

__all__ = [
    "Target", "answer_target", "token_target", "probe_target", "sae_target", "direction_target", "Attribution",
    "grad_x_act", "integrated_gradients", "attribution_patching", "activation_patching", "occlusion",
    "occlusion_check", "pixel_saliency",
]


# -- targets -----------------------------------------------------------------------------------------


@dataclass
class Target:
    """A scalar per batch row, computed inside a trace: `fn(vlm, batch) -> [batch]`; `site` is the deepest site it
    reads (attribution sites must run before it)."""

    fn: Callable[["VLM", Batch], Tensor]
    site: SiteLike = "logits"
    name: str = "target"

    def __call__(self, vlm: "VLM", batch: Batch) -> Float[Tensor, " batch"]:
        return self.fn(vlm, batch)


def _check_kind(kind: str) -> None:
    if kind not in ("logprob", "logit"):
        raise InputError(f"kind must be 'logprob' or 'logit', not {kind!r}")


def answer_target(kind: str = "logprob") -> Target:
    """The answer's summed log-prob ('logprob') or summed logit ('logit') given the batch's `answers`.

    Example:
        >>> answer_target("logit").name
        'answer logit'
    """
    _check_kind(kind)

    def fn(vlm: "VLM", batch: Batch) -> Tensor:
        ids = batch.layout.input_ids.to(vlm.device)
        answer = batch.layout.answer.to(vlm.device)
        if not answer.any():
            raise InputError("answer_target needs answers: vlm.prepare(prompts, images, answers=[...])")
        logits = vlm.read("logits")
        if kind == "logprob":
            return answer_logprob(logits, ids, answer)[0]
        picked = logits[:, :-1].float().gather(-1, ids[:, 1:, None])[..., 0]
        return (picked * answer[:, 1:]).sum(1)

    return Target(fn, "logits", f"answer {kind}")


def token_target(token: str | int, position: int = -1, *, kind: str = "logit", minus: str | int | None = None) -> Target:
    """The logit (or log-prob) of one token at a sequence `position`, optionally minus another token's (a logit difference).

    Example:
        >>> token_target("red", minus="blue").name
        "logit('red') - logit('blue') at -1"
    """
    _check_kind(kind)

    def fn(vlm: "VLM", batch: Batch) -> Tensor:
        ids = token_ids(vlm, [token] if minus is None else [token, minus])
        x = vlm.read("logits")[:, position].float()
        x = x.log_softmax(-1) if kind == "logprob" else x
        return x[:, ids[0]] - (x[:, ids[1]] if minus is not None else 0)

    name = f"{kind}({token!r})" + (f" - {kind}({minus!r})" if minus is not None else "") + f" at {position}"
    return Target(fn, "logits", name)


def _pooled(vlm: "VLM", batch: Batch, site: SiteLike, tokens: TokenSelection) -> Tensor:
    h = vlm.vectors(site)
    w = select(batch, tokens).to(h.device, h.dtype)
    return torch.einsum("bsd,bs->bd", h, w / w.sum(1, keepdim=True).clamp(min=1))


def probe_target(probe: Any, site: SiteLike, label: int, *, tokens: TokenSelection = "image") -> Target:
    """The logit of class `label` of a linear probe (anything with `logits(X)` and `classes`, e.g. `LinearProbe`)
    on the mean of the selected tokens' activations at `site`, as probes are fit.

    Example:
        >>> import torch; from vlens.probes import LinearProbe
        >>> p = LinearProbe(torch.zeros(2, 64), torch.zeros(2), "softmax", torch.tensor([0, 1]))
        >>> probe_target(p, 2, label=1).site
        2
    """
    if not (hasattr(probe, "logits") and hasattr(probe, "classes")):
        raise InputError(f"probe must have logits(X) and classes (e.g. a LinearProbe), got {type(probe).__name__}")
    classes = [int(c) for c in probe.classes]
    if label not in classes:
        raise InputError(f"label {label} is not one of the probe's classes {classes[:20]}")
    col = classes.index(label)
    return Target(lambda vlm, batch: probe.logits(_pooled(vlm, batch, site, tokens))[:, col], site,
                  f"probe logit of class {label} at {site}")


def sae_target(sae: Any, site: SiteLike, latent: int, *, tokens: TokenSelection = "image") -> Target:
    """The summed activation of SAE latent `latent` over the selected tokens at `site` (any SAE with `encode`).

    Example:
        >>> import torch
        >>> class Tiny:                       # duck typing: anything with encode (and W_dec)
        ...     W_dec = torch.eye(64)
        ...     def encode(self, x): return torch.relu(x @ self.W_dec.T)
        >>> sae_target(Tiny(), "resid_post.1", latent=3).name
        'SAE latent 3 at resid_post.1'
    """
    if not hasattr(sae, "encode"):
        raise InputError(f"sae must have encode (an SAE-Lens SAE or a vlens.sae class), got {type(sae).__name__}")

    def fn(vlm: "VLM", batch: Batch) -> Tensor:
        h = vlm.vectors(site)
        W = getattr(sae, "W_dec", None)
        f = sae.encode(h.to(W.device, W.dtype) if W is not None else h)[..., latent]
        return (f * select(batch, tokens).to(f.device, f.dtype)).sum(1).to(h.device)

    return Target(fn, site, f"SAE latent {latent} at {site}")


def direction_target(vector: Float[Tensor, " d_model"], site: SiteLike, *, tokens: TokenSelection = "image") -> Target:
    """The mean projection of the selected tokens' activations at `site` on the unit `vector` (a steering direction).

    Example:
        >>> direction_target(torch.ones(64), 3).name
        'projection on a direction at 3'
    """
    v = torch.as_tensor(vector, dtype=torch.float32)
    if v.dim() != 1 or not v.norm() > 0:
        raise InputError(f"vector must be a non-zero [d_model] tensor, got shape {tuple(v.shape)}")
    u = v / v.norm()

    def fn(vlm: "VLM", batch: Batch) -> Tensor:
        return _pooled(vlm, batch, site, tokens).float() @ u.to(vlm.device)

    return Target(fn, site, f"projection on a direction at {site}")


# -- the result ----------------------------------------------------------------------------------


@dataclass
class Attribution:
    """Per-token attributions of a target (`values`, [batch, seq], zero off `tokens`) and how they were made.

    `target` is f(input) per row; `reference` is f at the baseline (integrated gradients), the corrupted run
    (patching) or None; `pixels` holds pixel maps of `pixel_saliency`.
    """

    values: Float[Tensor, "batch seq"]
    tokens: Bool[Tensor, "batch seq"]
    layout: TokenLayout
    method: str
    site: str | None
    target: Float[Tensor, " batch"]
    reference: Float[Tensor, " batch"] | None = None
    note: str = ""
    pixels: Float[Tensor, "tiles height width"] | None = None

    def per_token(self) -> Float[Tensor, " n"]:
        """The attributions of the selected tokens, in row-major order (`values[tokens]`)."""
        return self.values[self.tokens]

    @property
    def completeness_error(self) -> float:
        """|Σ values − (target − reference)| / |target − reference| (integrated gradients: near 0)."""
        if self.reference is None:
            raise InputError(f"{self.method} has no reference value: completeness applies to integrated gradients")
        gap = self.target - self.reference
        return float((self.values.sum(1) - gap).abs().sum() / gap.abs().sum().clamp(min=1e-12))

    def patch_map(self, image: int = 0, kind: str = "highres"):
        """One image's token values on its patch grid: x edges, y edges, [rows, cols] (see `vlens.lens.patch_grid`).

        Example:
            >>> import vlens; from PIL import Image
            >>> vlm = vlens.tiny(words=["red"])
            >>> b = vlm.prepare(["<image>\\nWhat?"], [Image.new("RGB", (32, 32))], answers=["red"])
            >>> tuple(grad_x_act(vlm, b, answer_target()).patch_map(kind="base")[2].shape)
            (4, 4)
        """
        return patch_grid(self.layout, self.values, image, kind)

    def box_scores(self, boxes: Float[Tensor, "m 4"], image: int = 0) -> Float[Tensor, " m"]:
        """Attribution mass inside each pixel box (`vlens.lens.box_mass`: each token's value spread over its box)."""
        return box_mass(self.layout, self.values, boxes, image)

    def overlay(self, picture: Image.Image, image: int = 0, *, kind: str | None = None, sign: str = "positive",
                size: int = 160) -> Image.Image:
        """A heatmap of the attributions over the original `picture` (`vlens.viz.heatmap_overlay`).

        `kind` picks the tokens drawn ('base' or 'highres'; default high-res where there are some); `sign` is
        'positive' (what raises the target), 'negative' or 'abs'.

        Example:
            >>> import vlens; from PIL import Image
            >>> vlm = vlens.tiny(words=["red"])
            >>> pic = Image.new("RGB", (32, 32))
            >>> b = vlm.prepare(["<image>\\nWhat?"], [pic], answers=["red"])
            >>> grad_x_act(vlm, b, answer_target()).overlay(pic, sign="abs").size
            (160, 160)
        """
        if sign not in ("positive", "negative", "abs"):
            raise InputError(f"sign must be 'positive', 'negative' or 'abs', not {sign!r}")
        g = self.layout.images[image].geometry
        boxes, v = patch_values(self.layout, self.values, image, kind or ("highres" if g.count("highres") else "base"))
        return heatmap_overlay(picture, boxes, v.abs() if sign == "abs" else -v if sign == "negative" else v, size=size)

    def __repr__(self) -> str:
        return f"Attribution({self.method} at {self.site}: {int(self.tokens.sum())} tokens, target {self.target.tolist()})"


# -- running -------------------------------------------------------------------------------------


def _check_order(vlm: "VLM", site: SiteLike, target: Callable) -> str:
    s, t = vlm.site(site).name, vlm.site(getattr(target, "site", "logits")).name
    if vlm.sites.index(t) <= vlm.sites.index(s):
        raise InputError(f"the target reads {t}, which does not run after {s}: attribute at an earlier site")
    return s


def _one_row(batch: Batch, what: str) -> None:
    if not isinstance(batch, Batch) or len(batch) != 1:
        raise InputError(f"{what} takes a one-row Batch (one prompt, one image): loop over rows for more")


def _same_tokens(batch: Batch, other: Any, what: str) -> None:
    ids = getattr(getattr(other, "layout", None), "input_ids", None)
    if ids is None or ids.shape != batch.layout.input_ids.shape or not torch.equal(ids, batch.layout.input_ids):
        raise InputError(f"{what} must have the same tokens as the input: the same prompt (and answer) and an image "
                         "of the same size")


def _grad_run(vlm: "VLM", batch: Batch, target: Callable, site: str, edit: Callable[[Tensor], Tensor] | None = None):
    """One forward with a leaf copy of `site` (optionally edited) in place; returns f, the activation, its gradient."""
    with torch.enable_grad(), vlm.trace(batch.to(vlm.device)):
        h = vlm.vectors(site).detach().clone()
        x = (edit(h) if edit is not None else h).requires_grad_(True)
        vlm.write(site, x)
        y = target(vlm, batch)
        ys, xs = y.detach().float().cpu().save(), x.detach().cpu().save()
        with y.sum().backward(inputs=[x]):
            g = x.grad.float().cpu().save()
    return ys, xs, g


def _run(vlm: "VLM", batch: Batch, target: Callable, site: str | None = None,
         edit: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """f per row without gradients, with `edit` applied to the value at `site`."""
    with torch.no_grad(), vlm.trace(batch.to(vlm.device)):
        if edit is not None:
            vlm.write(site, edit(vlm.vectors(site).clone()))
        y = target(vlm, batch).float().cpu().save()
    return y


def _mask(batch: Batch, tokens: TokenSelection) -> Tensor:
    mask = select(batch, tokens, nonempty=True)
    if not mask.any():
        raise InputError("the token selection picks no token of this batch")
    return mask


def grad_x_act(vlm: "VLM", batch: Batch, target: Callable, site: SiteLike = 0, *,
               tokens: TokenSelection = "image") -> Attribution:
    """Gradient × activation at `site` (default `resid_pre.0`: the image tokens as the LM receives them), per token.

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny(words=["red"])
        >>> b = vlm.prepare(["<image>\\nWhat?"], [Image.new("RGB", (32, 32))], answers=["red"])
        >>> grad_x_act(vlm, b, answer_target(), site="resid_post.1").site
        'resid_post.1'
    """
    s = _check_order(vlm, site, target)
    mask = _mask(batch, tokens)
    y, x, g = _grad_run(vlm, batch, target, s)
    values = (x.float() * g).sum(-1) * mask
    return Attribution(values, mask, batch.layout, "gradient × activation", s, y)


def _baseline(vlm: "VLM", batch: Batch, site: str, mask: Tensor, baseline: Any) -> tuple[Tensor, Tensor, str]:
    """The input's activations at the selected tokens, the baseline's, and what the baseline is."""
    x = read_layers(vlm, batch, site, tokens=mask, dtype=torch.float32)[site]
    if isinstance(baseline, str) and baseline in ("zeros", "mean"):
        base = torch.zeros_like(x) if baseline == "zeros" else x.mean(0, keepdim=True).expand_as(x)
        return x, base, "zeros at the selected tokens" if baseline == "zeros" else "the selected tokens' mean"
    if isinstance(baseline, Batch):
        _same_tokens(batch, baseline, "a baseline Batch")
        return x, read_layers(vlm, baseline, site, tokens=mask, dtype=torch.float32)[site], "another image's activations"
    if isinstance(baseline, Tensor) and baseline.shape[-1] == x.shape[-1]:
        return x, baseline.float().expand_as(x).clone(), "a given tensor"
    raise InputError(f"baseline must be 'zeros', 'mean', a Batch (another image) or a [d_model] / [n_tokens, d_model] "
                     f"tensor, not {type(baseline).__name__}")


def integrated_gradients(vlm: "VLM", batch: Batch, target: Callable, site: SiteLike = 0, *, baseline: Any,
                         steps: int = 64, tokens: TokenSelection = "image", batch_size: int = 16) -> Attribution:
    """Integrated gradients at `site` along the straight path from a stated `baseline` to the input, moving only
    the selected tokens.

    `baseline`: 'mean' (every selected token at their mean), a `Batch` of the same prompt with another image
    (e.g. the picture without its object), a tensor, or 'zeros' (steep near zero in RMSNorm models). The integral
    uses `steps` Gauss-Legendre nodes (Captum's default rule); the values sum to `target − reference`
    (completeness), which `Attribution.completeness_error` measures: raise `steps` until it is small (a large
    gap, such as an object removed at the first layer, can need 128).

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny(words=["red"])
        >>> b = vlm.prepare(["<image>\\nWhat?"], [Image.new("RGB", (32, 32))], answers=["red"])
        >>> ig = integrated_gradients(vlm, b, answer_target("logit"), site=1, baseline="mean", steps=8)
        >>> ig.completeness_error < 0.01
        True
    """
    _one_row(batch, "integrated_gradients")
    if steps < 1 or batch_size < 1:
        raise InputError(f"steps and batch_size must be at least 1, got {steps}, {batch_size}")
    s = _check_order(vlm, site, target)
    mask = _mask(batch, tokens)
    x_in, base, how = _baseline(vlm, batch, s, mask, baseline)
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    alphas = torch.tensor(np.concatenate([(nodes + 1) / 2, [0.0, 1.0]]), dtype=torch.float32)
    weights = torch.tensor(np.concatenate([weights / 2, [0.0, 0.0]]), dtype=torch.float32)
    pos = mask[0].nonzero()[:, 0]
    grad_sum, ys = torch.zeros_like(x_in), []
    for c in range(0, len(alphas), batch_size):
        a = alphas[c : c + batch_size]

        def edit(h: Tensor, a: Tensor = a) -> Tensor:
            path = base[None] + a[:, None, None] * (x_in - base)[None]
            h[:, pos.to(h.device)] = path.to(h.device, h.dtype)
            return h

        y, _, g = _grad_run(vlm, batch.repeat(len(a)), target, s, edit)
        grad_sum += (weights[c : c + batch_size, None, None] * g[:, pos]).sum(0)
        ys.append(y)
    y = torch.cat(ys)
    values = torch.zeros(batch.layout.shape)
    values[0, pos] = ((x_in - base) * grad_sum).sum(-1)
    return Attribution(values, mask, batch.layout, "integrated gradients", s, y[-1:], y[-2:-1],
                       note=f"baseline: {how}; {steps} Gauss-Legendre nodes")


def _pair(vlm: "VLM", clean: Batch, corrupt: Batch, site: SiteLike, target: Callable, tokens: TokenSelection):
    _one_row(clean, "patching")
    _same_tokens(clean, corrupt, "the corrupted batch")
    s = _check_order(vlm, site, target)
    mask = _mask(clean, tokens)
    return s, mask, read_layers(vlm, corrupt, s, tokens=mask, dtype=torch.float32)[s]


def attribution_patching(vlm: "VLM", clean: Batch, corrupt: Batch, target: Callable, site: SiteLike, *,
                         tokens: TokenSelection = "image") -> Attribution:
    """The linear estimate of patching each selected token's activation at `site` from `corrupt` into `clean`:
    (h_corrupt − h_clean) · ∇f(clean), one forward and backward for all tokens.

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny(words=["red"])
        >>> q = ["<image>\\nWhat?"]
        >>> clean = vlm.prepare(q, [Image.new("RGB", (32, 32), "red")], answers=["red"])
        >>> corrupt = vlm.prepare(q, [Image.new("RGB", (32, 32), "blue")], answers=["red"])
        >>> atp = attribution_patching(vlm, clean, corrupt, answer_target(), site=2)
        >>> atp.per_token().shape == activation_patching(vlm, clean, corrupt, answer_target(), site=2).per_token().shape
        True
    """
    s, mask, h_cor = _pair(vlm, clean, corrupt, site, target, tokens)
    y, x, g = _grad_run(vlm, clean, target, s)
    values = torch.zeros(clean.layout.shape)
    values[mask] = ((h_cor - x[mask].float()) * g[mask]).sum(-1)
    return Attribution(values, mask, clean.layout, "attribution patching", s, y, _run(vlm, corrupt, target),
                       note="linear estimate of f(clean with the token patched from corrupt) - f(clean)")


def activation_patching(vlm: "VLM", clean: Batch, corrupt: Batch, target: Callable, site: SiteLike, *,
                        tokens: TokenSelection = "image", batch_size: int = 32) -> Attribution:
    """True activation patching: for each selected token, f(clean with that token's activation at `site` taken from
    `corrupt`) − f(clean), `batch_size` patched copies per forward.

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny(words=["red"])
        >>> q = ["<image>\\nWhat?"]
        >>> clean = vlm.prepare(q, [Image.new("RGB", (32, 32), "red")], answers=["red"])
        >>> same = activation_patching(vlm, clean, clean, answer_target(), site=2)
        >>> float(same.values.abs().max())
        0.0
    """
    s, mask, h_cor = _pair(vlm, clean, corrupt, site, target, tokens)
    pos = mask[0].nonzero()[:, 0]
    f_clean = _run(vlm, clean, target)
    effects = []
    for c in range(0, len(pos), batch_size):
        p = pos[c : c + batch_size]

        def edit(h: Tensor, p: Tensor = p, c: int = c) -> Tensor:
            h[torch.arange(len(p), device=h.device), p.to(h.device)] = h_cor[c : c + len(p)].to(h.device, h.dtype)
            return h

        effects.append(_run(vlm, clean.repeat(len(p)), target, s, edit) - f_clean)
    values = torch.zeros(clean.layout.shape)
    values[0, pos] = torch.cat(effects)
    return Attribution(values, mask, clean.layout, "activation patching", s, f_clean, _run(vlm, corrupt, target))


# -- occlusion and pixels ------------------------------------------------------------------------


def _fill(vlm: "VLM", picture: Image.Image, fill: Any) -> tuple[int, ...]:
    """The occlusion colour: an RGB `fill`; 'median', the picture's median colour; None, the processor's
    `image_mean` (zero after normalisation; mid-grey without one)."""
    if isinstance(fill, str) and fill == "median":
        return tuple(int(v) for v in np.median(np.asarray(picture.convert("RGB")).reshape(-1, 3), 0))
    mean = getattr(getattr(vlm.processor, "image_processor", None), "image_mean", None) or (0.5, 0.5, 0.5)
    return tuple(int(v) for v in (fill if fill is not None else [round(255 * m) for m in mean]))


def _occlude(picture: Image.Image, boxes: Sequence[Sequence[float]], fill: tuple[int, ...]) -> Image.Image:
    """`picture` with `boxes` filled with the RGB `fill`."""
    arr = np.array(picture.convert("RGB"))
    for x0, y0, x1, y1 in boxes:
        arr[int(y0) : max(int(np.ceil(y1)), int(y0) + 1), int(x0) : max(int(np.ceil(x1)), int(x0) + 1)] = fill
    return Image.fromarray(arr)


def _scores(vlm: "VLM", prompt: str, pictures: list[Image.Image], answer: str | None, target: Callable,
            batch_size: int) -> Tensor:
    out = []
    for c in range(0, len(pictures), batch_size):
        chunk = pictures[c : c + batch_size]
        b = vlm.prepare([prompt] * len(chunk), chunk, answers=None if answer is None else [answer] * len(chunk))
        out.append(_run(vlm, b, target))
    return torch.cat(out)


def occlusion(vlm: "VLM", prompt: str, picture: Image.Image, target: Callable, *, answer: str | None = None,
              tokens: TokenSelection = "base+highres", fill: Sequence[int] | str | None = None,
              batch_size: int = 16) -> Attribution:
    """Occlusion by patch boxes: for each selected patch token, f(picture) − f(picture with its box filled).

    `fill` is an RGB colour, 'median' (the picture's median colour: its background, when an object covers less
    than half) or None (the processor's `image_mean`, zero after normalisation). Newline tokens have no box.

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny(words=["red"])
        >>> occ = occlusion(vlm, "<image>\\nWhat?", Image.new("RGB", (32, 32), "red"), answer_target(),
        ...                 answer="red", tokens="base")
        >>> int(occ.tokens.sum())
        16
    """
    batch = vlm.prepare([prompt], [picture], answers=None if answer is None else [answer])
    mask = _mask(batch, tokens) & ~batch.layout.kind_mask("newline") & batch.layout.image
    span = batch.layout.images[0]
    idx = mask[0, span.start : span.end].nonzero()[:, 0]
    fill = _fill(vlm, picture, fill)
    pictures = [picture] + [_occlude(picture, [span.geometry.box[i].tolist()], fill) for i in idx.tolist()]
    f = _scores(vlm, prompt, pictures, answer, target, batch_size)
    values = torch.zeros(batch.layout.shape)
    values[0, span.start + idx] = f[0] - f[1:]
    return Attribution(values, mask, batch.layout, "occlusion", None, f[:1],
                       note=f"f(picture) - f(picture with the token's box filled with RGB {fill})")


def occlusion_check(vlm: "VLM", prompt: str, picture: Image.Image, target: Callable, attribution: Attribution, *,
                    k: int = 8, kind: str = "highres", n_random: int = 8, answer: str | None = None,
                    fill: Sequence[int] | str | None = None, seed: int = 0) -> dict[str, float]:
    """Occlude the `k` patches of `kind` with the most attribution mass together, and `n_random` sets of `k` random
    patches; return the drops of f and their ratio (`top / random`, far above 1 for a faithful map).

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm, pic = vlens.tiny(words=["red"]), Image.new("RGB", (32, 32), "red")
        >>> a = grad_x_act(vlm, vlm.prepare(["<image>\\nWhat?"], [pic], answers=["red"]), answer_target())
        >>> sorted(occlusion_check(vlm, "<image>\\nWhat?", pic, answer_target(), a, k=2, answer="red"))
        ['random', 'ratio', 'top']
    """
    boxes, _ = patch_values(attribution.layout, attribution.values, 0, kind)
    if not 0 < k < len(boxes):
        raise InputError(f"k must be between 1 and {len(boxes) - 1} (the image has {len(boxes)} {kind} patches)")
    top = attribution.box_scores(boxes).topk(k).indices
    rng = np.random.default_rng(seed)
    sets = [top.tolist()] + [rng.choice(len(boxes), k, replace=False).tolist() for _ in range(n_random)]
    fill = _fill(vlm, picture, fill)
    pictures = [picture] + [_occlude(picture, boxes[s].tolist(), fill) for s in sets]
    f = _scores(vlm, prompt, pictures, answer, target, 16)
    drop_top, drop_random = float(f[0] - f[1]), float((f[0] - f[2:]).mean())
    return {"top": drop_top, "random": drop_random, "ratio": drop_top / drop_random if drop_random else float("inf")}


def pixel_saliency(vlm: "VLM", batch: Batch, target: Callable, *, tokens: TokenSelection = "base+highres") -> Attribution:
    """Gradient × input on the processed pixels (`pixel_values`), summed over channels, and per patch token.

    The processor's resize, crop and pad run in PIL / numpy, outside autograd, so there is no gradient with
    respect to the original image: `pixels` holds maps on the processed tiles ([tiles, H, W]; tile 0 the base
    tile), and `values` sums each patch token's block, which reaches the original image through its box
    (`patch_map`, `overlay`). Needs `pixel_values` of [batch, tiles, C, H, W] or [batch, C, H, W].

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny(words=["red"])
        >>> b = vlm.prepare(["<image>\\nWhat?"], [Image.new("RGB", (32, 32))], answers=["red"])
        >>> s = pixel_saliency(vlm, b, answer_target())
        >>> s.pixels.shape[-2:] == b.inputs["pixel_values"].shape[-2:], "not differentiable" in s.note
        (True, True)
    """
    _one_row(batch, "pixel_saliency")
    pv = batch.inputs.get("pixel_values")
    if not isinstance(pv, Tensor) or pv.dim() not in (4, 5) or len(batch.layout.images) != 1:
        raise UnsupportedModelError(
            f"pixel saliency needs one image as pixel_values [batch, tiles, C, H, W] or [batch, C, H, W]; "
            f"{vlm.family.name} gives {tuple(getattr(pv, 'shape', ()))}: use grad_x_act(...).patch_map() instead")
    x = pv.detach().to(vlm.device).clone().requires_grad_(True)
    run = replace(batch, inputs={**batch.inputs, "pixel_values": x})
    with torch.enable_grad(), vlm.trace(run):
        y = target(vlm, run)
        ys = y.detach().float().cpu().save()
        with y.sum().backward(inputs=[x]):
            g = x.grad.save()
    sal = (g.float() * x.detach().float()).sum(-3).cpu()
    sal = sal[0] if sal.dim() == 4 else sal
    mask = _mask(batch, tokens) & ~batch.layout.kind_mask("newline") & batch.layout.image
    span = batch.layout.images[0]
    geo = span.geometry
    P = sal.shape[-1] // geo.grid
    values = torch.zeros(batch.layout.shape)
    for i in mask[0, span.start : span.end].nonzero()[:, 0].tolist():
        t, r, c = int(geo.tile[i]), int(geo.row[i]), int(geo.col[i])
        values[0, span.start + i] = sal[t, r * P : (r + 1) * P, c * P : (c + 1) * P].sum()
    return Attribution(values, mask, batch.layout, "pixel saliency", None, ys, pixels=sal,
                       note="gradient × input on the processed tiles; the processor's resize / pad (PIL, numpy) is "
                            "not differentiable, so maps reach the original image through the patch boxes")
