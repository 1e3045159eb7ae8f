"""The logit lens on image tokens, and the vocabulary projection of any vector.

`logit_lens` reads the residual stream of chosen tokens at chosen sites (one
forward, `vlens.activations.read.read_layers`) and sends each vector through
the model's own final norm and unembedding (`unembed`): per layer and token,
the top-k tokens and their probabilities, and the probabilities of tokens you
`track`. `project_on_vocab` does the same for directions (an SAE decoder row,
a probe weight, a steering vector): their top and bottom tokens.
`lens_figure` draws the image's patch grid (base tile and high-res tiles, from
each token's pixel box) labelled and coloured by the top token, with a layer
slider. The geometry helpers serve every per-token map (`vlens.attribution`
too): `patch_values` (boxes and values of one image's patch tokens),
`patch_grid` (the [rows, cols] grid), `box_mass` (values summed over pixel
boxes); `region_tokens`, `word_rate` and `first_layer` measure where a concept
becomes readable.

    >>> import vlens; from PIL import Image
    >>> vlm = vlens.tiny()
    >>> b = vlm.prepare(["<image>\\nWhat is shown?"], [Image.new("RGB", (32, 32))])
    >>> lens = logit_lens(vlm, b, k=3)
    >>> lens.top_ids.shape[0] == vlm.n_layers, lens.top_ids.shape[1] == int(b.layout.image.sum())
    (True, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .activations.read import read_layers
from .errors import InputError, NotFoundError
from .sites import SiteLike
from .tokens import KIND_NAMES, Batch, TokenLayout, TokenSelection, select
from .viz import token_strings

if TYPE_CHECKING:
    from .model import VLM

__all__ = [
    "unembed", "logit_lens", "Lens", "project_on_vocab", "VocabProjection", "token_ids", "patch_values", "patch_grid",
    "box_mass",
    "region_tokens", "word_rate", "first_layer", "lens_figure",
]


def unembed(vlm: "VLM", h: Float[Tensor, "... d_model"]) -> Float[Tensor, "... vocab"]:
    """Logits of residual vectors through the model's final norm and unembedding (and logit soft-capping, if any).

    Differentiable; on the model's device and dtype. The last layer's `resid_post` gives the model's logits.

    Example:
        >>> import vlens, torch
        >>> vlm = vlens.tiny()
        >>> unembed(vlm, torch.randn(2, 5, vlm.d_model)).shape[-1] == vlm.vocab_size
        True
    """
    if h.shape[-1] != vlm.d_model:
        raise InputError(f"vectors have width {h.shape[-1]} but the model's residual stream has {vlm.d_model}")
    norm = vlm.hf_model.get_submodule(vlm.modules.final_norm)
    head = vlm.hf_model.get_submodule(vlm.modules.lm_head)
    logits = head(norm(h.to(vlm.device, vlm.dtype)))
    cap = getattr(vlm.family.text_config(vlm.config), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def token_ids(vlm: "VLM", words: str | int | Sequence[str | int]) -> list[int]:
    """Vocabulary ids of words (each must be one token) or ids.

    Example:
        >>> import vlens
        >>> token_ids(vlens.tiny(words=["red"]), ["red", 7]) [1:]
        [7]
    """
    words = [words] if isinstance(words, (str, int)) else list(words)
    out = []
    for w in words:
        if isinstance(w, int):
            if not 0 <= w < vlm.vocab_size:
                raise InputError(f"token id {w} is outside the vocabulary 0..{vlm.vocab_size - 1}")
            out.append(w)
            continue
        ids = vlm.tokenizer(w, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise InputError(f"{w!r} is {len(ids)} tokens under this tokenizer: track single tokens (or pass ids)")
        out.append(int(ids[0]))
    return out


def _vocab(vlm: "VLM") -> list[str]:
    """Every token id decoded alone (readable: no SentencePiece '▁' markers; a lone byte as `<0xE2>`,
    `vlens.viz.token_strings`); ids past the tokenizer's `<id N>`."""
    n = min(len(vlm.tokenizer), vlm.vocab_size)
    return token_strings(vlm.tokenizer, range(n)) + [f"<id {i}>" for i in range(n, vlm.vocab_size)]


@dataclass
class Lens:
    """A logit lens: per site (`sites`, one per layer row) and selected token (`positions`: batch row, sequence
    position), the top-k token ids and probabilities, and the probabilities of the `tracked` ids."""

    sites: list[str]
    positions: Int[Tensor, "n 2"]
    top_ids: Int[Tensor, "layers n k"]
    top_probs: Float[Tensor, "layers n k"]
    track_ids: list[int]
    tracked: Float[Tensor, "layers n t"]
    vocab: list[str]
    layout: TokenLayout

    def top_tokens(self, layer: int) -> list[str]:
        """The top-1 token of every selected token at row `layer` of `sites` (negative counts from the end).

        Example:
            >>> import vlens; from PIL import Image
            >>> vlm = vlens.tiny()
            >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
            >>> len(logit_lens(vlm, b, k=1).top_tokens(-1)) == int(b.layout.image.sum())
            True
        """
        return [self.vocab[i] for i in self.top_ids[layer, :, 0].tolist()]

    def values(self, layer: int, what: str = "top_prob") -> Float[Tensor, "batch seq"]:
        """A [batch, seq] map of one layer row ('top_prob' or 'top_id'; NaN / -1 off the selection), for `patch_grid`.

        Example:
            >>> import vlens; from PIL import Image
            >>> vlm = vlens.tiny()
            >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
            >>> logit_lens(vlm, b, k=1).values(0).shape == b.layout.shape
            True
        """
        if what not in ("top_prob", "top_id"):
            raise InputError(f"what must be 'top_prob' or 'top_id', not {what!r}")
        src = self.top_probs[layer, :, 0] if what == "top_prob" else self.top_ids[layer, :, 0].float()
        out = torch.full(self.layout.shape, float("nan") if what == "top_prob" else -1.0)
        out[self.positions[:, 0], self.positions[:, 1]] = src
        return out

    def __repr__(self) -> str:
        return f"Lens({len(self.sites)} sites × {len(self.positions)} tokens, top-{self.top_ids.shape[-1]})"


def logit_lens(
    vlm: "VLM",
    batch: Batch,
    sites: SiteLike | Sequence[SiteLike] | None = None,
    *,
    tokens: TokenSelection = "image",
    k: int = 5,
    track: Sequence[str | int] = (),
    chunk: int = 4096,
) -> Lens:
    """The logit lens at `sites` (default: every `resid_post.L`) for the selected tokens of `batch`.

    One forward reads every site (`read_layers`); each vector then goes through `unembed`.

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny(words=["red"])
        >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
        >>> lens = logit_lens(vlm, b, [1, "resid_post.3"], k=2, track=["red"])
        >>> lens.sites, tuple(lens.tracked.shape[::2])
        (['resid_pre.1', 'resid_post.3'], (2, 1))
    """
    if k < 1:
        raise InputError(f"k must be at least 1, not {k}")
    if sites is None:
        sites = [f"resid_post.{L}" for L in range(vlm.n_layers)]
    keys = list(sites) if isinstance(sites, (list, tuple)) else [sites]
    heads = [vlm.site(s).name for s in keys if vlm.site(s).kind in ("z", "pattern")]
    if heads:
        raise InputError(f"the logit lens projects vectors of the residual stream, and {', '.join(heads)} are per-head "
                         "values before the output projection: read attn_out.L (the heads through o_proj) instead")
    ids = token_ids(vlm, track)
    mask = select(batch, tokens)
    acts = read_layers(vlm, batch, keys, tokens=mask)
    tops, probs, tracked = [], [], []
    with torch.no_grad():
        for key in keys:
            h = acts[key]
            t_i, t_p, t_t = [], [], []
            for s in range(0, max(len(h), 1), chunk):
                p = unembed(vlm, h[s : s + chunk]).float().softmax(-1)
                top = p.topk(min(k, p.shape[-1]), dim=-1)
                t_i.append(top.indices.cpu())
                t_p.append(top.values.cpu())
                t_t.append(p[:, ids].cpu())
            tops.append(torch.cat(t_i))
            probs.append(torch.cat(t_p))
            tracked.append(torch.cat(t_t))
    return Lens(
        sites=[vlm.site(s).name for s in keys], positions=mask.nonzero(), top_ids=torch.stack(tops),
        top_probs=torch.stack(probs), track_ids=ids, tracked=torch.stack(tracked), vocab=_vocab(vlm),
        layout=batch.layout,
    )


@dataclass
class VocabProjection:
    """Top and bottom tokens of vectors through the unembedding: ids and logits, [n, k] each."""

    top_ids: Int[Tensor, "n k"]
    top_values: Float[Tensor, "n k"]
    bottom_ids: Int[Tensor, "n k"]
    bottom_values: Float[Tensor, "n k"]
    vocab: list[str]

    def top(self, i: int = 0) -> list[tuple[str, float]]:
        """(token, logit) pairs of vector `i`, highest first."""
        return [(self.vocab[t], round(float(v), 4)) for t, v in zip(self.top_ids[i].tolist(), self.top_values[i])]

    def bottom(self, i: int = 0) -> list[tuple[str, float]]:
        """(token, logit) pairs of vector `i`, lowest first."""
        return [(self.vocab[t], round(float(v), 4)) for t, v in zip(self.bottom_ids[i].tolist(), self.bottom_values[i])]

    def __repr__(self) -> str:
        return f"VocabProjection({len(self.top_ids)} vectors; top {[t for t, _ in self.top(0)]})"


def project_on_vocab(
    vlm: "VLM", vectors: Float[Tensor, "*n d_model"], k: int = 10, *, norm: str = "module"
) -> VocabProjection:
    """The top and bottom `k` tokens of each vector's logits (an SAE decoder row, a probe weight, a steering vector).

    `norm` says how the final norm is applied before the unembedding W_U:

    - 'module' (default): the norm module itself, as the logit lens does (values are the logits of the vector
      at unit scale; the ranking of TransformerLens's folded unembedding);
    - 'fold': the norm's gain (and a LayerNorm's centring) without its division by the vector's scale,
      (v ⊙ γ) · W_Uᵀ for an RMSNorm: the logit weights of sae-dashboard and Neuronpedia, which grow with |v|;
    - 'none': v · W_Uᵀ.

    Example:
        >>> import vlens
        >>> vlm = vlens.tiny(words=["red"])
        >>> red = vlm.tokenizer.convert_tokens_to_ids("red")
        >>> v = vlm.hf_model.lm_head.weight[red].detach()     # the unembedding row of "red"
        >>> project_on_vocab(vlm, v, k=3, norm="none").top()[0][0]
        'red'
    """
    if norm not in ("module", "fold", "none"):
        raise InputError(f"norm must be 'module', 'fold' or 'none', not {norm!r}")
    v = torch.as_tensor(vectors)
    v = v[None] if v.dim() == 1 else v
    if v.dim() != 2 or v.shape[-1] != vlm.d_model:
        raise InputError(f"vectors must be [d_model] or [n, d_model] with d_model {vlm.d_model}, got {tuple(v.shape)}")
    final = vlm.hf_model.get_submodule(vlm.modules.final_norm)
    head = vlm.hf_model.get_submodule(vlm.modules.lm_head)
    with torch.no_grad():
        v = v.to(vlm.device, vlm.dtype)
        x = v if norm == "none" else final(v)
        if norm == "fold":  # undo the division: (norm(v) - bias) * sqrt(mean(centred v ** 2) + eps)
            vc = v.float() - v.float().mean(-1, keepdim=True) if isinstance(final, torch.nn.LayerNorm) else v.float()
            eps = float(getattr(final, "variance_epsilon", getattr(final, "eps", 0.0)))
            bias = getattr(final, "bias", None)
            x = (x.float() - (bias.float() if isinstance(bias, Tensor) else 0.0)) * (vc.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        logits = head(x.to(vlm.dtype)).float()
        k = min(k, logits.shape[-1])
        top, bottom = logits.topk(k, dim=-1), logits.topk(k, dim=-1, largest=False)
    return VocabProjection(top.indices.cpu(), top.values.cpu(), bottom.indices.cpu(), bottom.values.cpu(), _vocab(vlm))


# -- geometry: tokens to patches ---------------------------------------------------------------------


def _span(layout: TokenLayout, image: int):
    if not 0 <= image < len(layout.images):
        raise NotFoundError(f"image {image} does not exist: this batch has images 0..{len(layout.images) - 1}")
    return layout.images[image]


def patch_values(
    layout: TokenLayout, values: Float[Tensor, "batch seq"], image: int = 0, kind: str | None = None
) -> tuple[Float[Tensor, "n 4"], Float[Tensor, " n"]]:
    """Pixel boxes and values of one image's patch tokens of `kind` ('base', 'highres'; None: both).

    Example:
        >>> import vlens, torch; from PIL import Image
        >>> vlm = vlens.tiny()
        >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
        >>> boxes, v = patch_values(b.layout, torch.ones(b.layout.shape), kind="base")
        >>> boxes[1].tolist(), len(v)
        ([8.0, 0.0, 16.0, 8.0], 16)
    """
    if kind not in (None, *KIND_NAMES[:2]):
        raise InputError(f"kind must be 'base', 'highres' or None (newline tokens have no pixels), not {kind!r}")
    span = _span(layout, image)
    g = span.geometry
    keep = g.kind != KIND_NAMES.index("newline") if kind is None else g.kind == KIND_NAMES.index(kind)
    if not keep.any():
        raise NotFoundError(f"image {image} has no {kind or 'patch'} tokens: it has " +
                            ", ".join(f"{g.count(n)} {n}" for n in KIND_NAMES))
    return g.box[keep], values[span.batch_index, span.positions()[keep]].float()


def patch_grid(
    layout: TokenLayout, values: Float[Tensor, "batch seq"], image: int = 0, kind: str = "highres"
) -> tuple[Float[Tensor, " cols_plus_1"], Float[Tensor, " rows_plus_1"], Float[Tensor, "rows cols"]]:
    """Per-token values of one image's tokens of one kind ('base' or 'highres') laid out on its patch grid.

    Returns the grid's x and y cell edges in original-image pixels (from the tokens' boxes) and the
    [rows, cols] values (NaN where no token of that kind covers a cell, e.g. unpadded margins).

    Example:
        >>> import vlens, torch; from PIL import Image
        >>> vlm = vlens.tiny()
        >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
        >>> x, y, z = patch_grid(b.layout, torch.ones(b.layout.shape), kind="base")
        >>> tuple(z.shape), x.tolist()
        ((4, 4), [0.0, 8.0, 16.0, 24.0, 32.0])
    """
    if kind is None:
        raise InputError("patch_grid draws one kind of token: kind='base' or 'highres'")
    box, vals = patch_values(layout, values, image, kind)
    xs = torch.unique(torch.cat([box[:, 0], box[:, 2]]))
    ys = torch.unique(torch.cat([box[:, 1], box[:, 3]]))
    z = torch.full((len(ys) - 1, len(xs) - 1), float("nan"))
    for (x0, y0, x1, y1), v in zip(box.tolist(), vals.tolist()):
        c0, c1 = int(torch.searchsorted(xs, x0)), int(torch.searchsorted(xs, x1))
        r0, r1 = int(torch.searchsorted(ys, y0)), int(torch.searchsorted(ys, y1))
        z[r0:r1, c0:c1] = v
    return xs, ys, z


def box_mass(
    layout: TokenLayout, values: Float[Tensor, "batch seq"], boxes: Float[Tensor, "m 4"], image: int = 0
) -> Float[Tensor, " m"]:
    """The mass of per-token values inside each pixel box, every patch token's value spread evenly over its own box.

    Example:
        >>> import vlens, torch; from PIL import Image
        >>> vlm = vlens.tiny()
        >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
        >>> box_mass(b.layout, torch.ones(b.layout.shape), torch.tensor([[0., 0., 8., 8.], [0., 0., 32., 32.]]))
        tensor([ 2., 32.])
    """
    tb, v = patch_values(layout, values, image)
    tb, v, b = tb.double(), v.double(), torch.as_tensor(boxes, dtype=torch.float64)
    w = (torch.minimum(tb[:, None, 2], b[None, :, 2]) - torch.maximum(tb[:, None, 0], b[None, :, 0])).clamp(min=0)
    h = (torch.minimum(tb[:, None, 3], b[None, :, 3]) - torch.maximum(tb[:, None, 1], b[None, :, 1])).clamp(min=0)
    area = ((tb[:, 2] - tb[:, 0]) * (tb[:, 3] - tb[:, 1])).clamp(min=1e-12)
    return ((w * h / area[:, None]) * v[:, None]).sum(0).float()


def region_tokens(
    layout: TokenLayout, region: Bool[Tensor, "height width"], image: int = 0, min_overlap: float = 0.5
) -> Bool[Tensor, "batch seq"]:
    """The image tokens whose pixel box lies at least `min_overlap` inside `region` (a mask of the original image).

    Example:
        >>> import vlens, torch; from PIL import Image
        >>> vlm = vlens.tiny()
        >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
        >>> left = torch.zeros(32, 32, dtype=torch.bool); left[:, :16] = True
        >>> int(region_tokens(b.layout, left).sum())   # half of the 16 base and 16 high-res patches
        16
    """
    span = _span(layout, image)
    g = span.geometry
    region = torch.as_tensor(region, dtype=torch.bool)
    if tuple(region.shape) != (g.size[0], g.size[1]):
        raise InputError(f"region must be the image's [height, width] = {g.size}, got {tuple(region.shape)}")
    out = torch.zeros(layout.shape, dtype=torch.bool)
    integral = torch.nn.functional.pad(region.float().cumsum(0).cumsum(1), (1, 0, 1, 0))
    for i, (x0, y0, x1, y1) in enumerate(g.box.tolist()):
        if np.isnan(x0):
            continue
        c0, r0, c1, r1 = int(x0), int(y0), max(int(np.ceil(x1)), int(x0) + 1), max(int(np.ceil(y1)), int(y0) + 1)
        inside = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
        if inside >= min_overlap * (r1 - r0) * (c1 - c0):
            out[span.batch_index, span.start + i] = True
    return out


def word_rate(
    lens: Lens, words: Sequence[int], tokens: Bool[Tensor, "batch seq"] | None = None, *,
    among: Sequence[int] | None = None,
) -> Float[Tensor, " layers"]:
    """Per site of `lens`, the fraction of its tokens (or of those in the `tokens` mask) that decode to one of `words`.

    "Decode to" means the top-1 token of the whole vocabulary, or, with `among` (ids the lens tracks), the most
    probable of those: a readout restricted to the candidate words (chance is 1 / len(among)).

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny(words=["red", "blue"])
        >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
        >>> red, blue = token_ids(vlm, ["red", "blue"])
        >>> lens = logit_lens(vlm, b, k=1, track=[red, blue])
        >>> float(word_rate(lens, list(range(vlm.vocab_size)))[0]), float(word_rate(lens, [red, blue], among=[red, blue])[0])
        (1.0, 1.0)
    """
    keep = torch.ones(len(lens.positions), dtype=torch.bool)
    if tokens is not None:
        keep = tokens[lens.positions[:, 0], lens.positions[:, 1]]
    if not keep.any():
        raise InputError("the token mask selects none of the lens's tokens: build it from the same batch")
    words_t = torch.as_tensor(list(words), dtype=torch.long)
    if among is None:
        return torch.isin(lens.top_ids[:, keep, 0], words_t).float().mean(1)
    missing = [w for w in among if w not in lens.track_ids]
    if missing:
        raise InputError(f"ids {missing} are not tracked by this lens: pass track=... to logit_lens")
    cols = [lens.track_ids.index(w) for w in among]
    best = torch.as_tensor(list(among))[lens.tracked[:, keep][..., cols].argmax(-1)]
    return torch.isin(best, words_t).float().mean(1)


def first_layer(rate: Float[Tensor, " layers"], threshold: float = 0.5) -> int | None:
    """The first index where `rate` reaches `threshold` (None if it never does).

    Example:
        >>> first_layer(torch.tensor([0.0, 0.2, 0.6, 0.9]))
        2
    """
    hit = (torch.as_tensor(rate) >= threshold).nonzero()
    return int(hit[0, 0]) if len(hit) else None


# -- the figure ------------------------------------------------------------------------------------

_PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#ffe119", "#911eb4", "#f58231", "#42d4f4", "#f032e6", "#bfef45",
            "#fabed4", "#469990", "#dcbeff", "#9a6324", "#800000", "#aaffc3", "#808000", "#000075", "#a9a9a9")


def lens_figure(lens: Lens, picture: Any = None, *, image: int = 0, title: str = "Logit lens on the image tokens"):
    """A plotly figure of one image's patch grid (base tile and high-res tiles side by side), each patch coloured
    and labelled by its top lens token, over the image (`picture`, optional), with a slider over `lens.sites`.

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny()
        >>> pic = Image.new("RGB", (32, 32))
        >>> b = vlm.prepare(["<image>\\nhi"], [pic])
        >>> fig = lens_figure(logit_lens(vlm, b, k=1), pic)
        >>> len(fig.layout.sliders[0].steps) == vlm.n_layers
        True
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    g = _span(lens.layout, image).geometry
    kinds = [n for n in KIND_NAMES[:2] if g.count(n)]
    if not kinds:
        raise NotFoundError(f"image {image} has no patch tokens to draw")
    names = {"base": "base tile", "highres": "high-res tiles"}
    fig = make_subplots(1, len(kinds), subplot_titles=[names[k] for k in kinds], horizontal_spacing=0.04)
    top1 = lens.top_ids[:, :, 0]
    seen = torch.unique(top1).tolist()
    colour = {t: i for i, t in enumerate(seen)}
    n = max(len(seen), 1)
    scale = [[c, _PALETTE[i % len(_PALETTE)]] for i in range(n) for c in (i / n, (i + 1) / n)]
    if picture is not None:
        pic = picture.convert("RGB")
        w = pic.size[0]
        small = pic.copy()
        small.thumbnail((256, 256))
        for col in range(1, len(kinds) + 1):
            d = w / small.size[0]
            fig.add_trace(go.Image(z=np.asarray(small), x0=d / 2, y0=d / 2, dx=d, dy=d, hoverinfo="skip"), 1, col)
    n_fixed = len(fig.data)
    for li, site in enumerate(lens.sites):
        ids = lens.values(li, "top_id").long()
        prob = lens.values(li)
        for col, kind in enumerate(kinds, 1):
            xs, ys, z_id = patch_grid(lens.layout, ids.float(), image, kind)
            _, _, z_p = patch_grid(lens.layout, prob, image, kind)
            text = [[lens.vocab[int(v)] if v == v and v >= 0 else "" for v in row] for row in z_id.tolist()]
            z = [[colour.get(int(v), 0) + 0.5 if v == v and v >= 0 else None for v in row] for row in z_id.tolist()]
            hover = [[f"{t} (p={p:.2f})" if t else "" for t, p in zip(tr, pr)] for tr, pr in zip(text, z_p.tolist())]
            fig.add_trace(go.Heatmap(
                x=xs.tolist(), y=ys.tolist(), z=z, text=text, texttemplate="%{text}", hovertext=hover,
                hoverinfo="text", colorscale=scale, zmin=0, zmax=n, showscale=False, opacity=0.55,
                xgap=1, ygap=1, visible=li == len(lens.sites) - 1, name=f"{site} {kind}"), 1, col)
    per = len(kinds)
    steps = []
    for li, site in enumerate(lens.sites):
        vis = [True] * n_fixed + [li == j for j in range(len(lens.sites)) for _ in range(per)]
        steps.append(dict(method="update", label=site, args=[{"visible": vis}, {"title.text": f"{title}: {site}"}]))
    fig.update_layout(title=f"{title}: {lens.sites[-1]}", height=420, margin=dict(t=70, b=90),
                      sliders=[dict(active=len(steps) - 1, steps=steps, currentvalue=dict(prefix="site: "))])
    fig.update_yaxes(autorange="reversed", scaleanchor="x", showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    return fig
