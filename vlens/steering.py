"""Steering vectors, steered generation, and the paper's efficacy / damage evaluation.

Vectors (all return a [d_model] tensor; `normalize=True` makes it unit norm):

* `diff_of_means(X, y, src, tgt)`: mean image activation of `tgt` minus that of `src` (the paper's vector);
* `from_probe(probe, tgt, src)`: a probe's weight direction(s);
* `unembedding_diff(vlm, src_name, tgt_name)`: difference of the class names' rows of the LM head;
* `random_like(v)`: a random control of the same norm;
* `sparse_approximation(v, sae)`: a few SAE decoder directions that reproduce `v`'s direction.

Running: `steered_generate` adds `k · v` at the image tokens of layer L during
the prefill (the paper) or at every step, then decodes with the KV cache.

Evaluation (the paper's): `efficacy` asks the two-choice question and reads the
probability of the target class name and whether the greedy answer names it;
`damage` is the increase of the mean caption NLL; `sweep` runs both over class
pairs, coefficients and layers, with plotly figures.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from .interventions import add, check_vector
from .tokens import Batch

__all__ = [
    "CAPTION_PROMPT",
    "SparseApproximation",
    "SteeringSweep",
    "TWO_CHOICE",
    "caption_nll",
    "class_means",
    "damage",
    "diff_of_means",
    "efficacy",
    "from_probe",
    "normalize",
    "pool_features",
    "random_like",
    "sparse_approximation",
    "steered_generate",
    "sweep",
    "two_choice_prompt",
    "unembedding_diff",
]

#: The paper's two-choice efficacy prompt (formatted with the source and target class names).
TWO_CHOICE = (
    '<image>\nReply either "{src}" or "{tgt}" in lowercase depending on what is shown in the image. '
    "Do not output any other text."
)
#: The prompt before each caption when measuring damage (captions are appended as answers).
CAPTION_PROMPT = "<image>\nDescribe the image."


def two_choice_prompt(src: str, tgt: str) -> str:
    """The paper's two-choice prompt for a source and target class name.

    Example:
        >>> two_choice_prompt("cat", "dog")[:29]
        '<image>\\nReply either "cat" or'
    """
    return TWO_CHOICE.format(src=src, tgt=tgt)


# -- vectors ----------------------------------------------------------------------------------------


def normalize(v: Float[Tensor, " d"]) -> Float[Tensor, " d"]:
    """`v / ‖v‖`, refusing the zero vector.

    Example:
        >>> normalize(torch.tensor([3.0, 4.0]))
        tensor([0.6000, 0.8000])
    """
    n = v.norm()
    if not torch.isfinite(n) or n == 0:
        raise ValueError("cannot normalise a zero or non-finite vector: check how it was built (identical class means?)")
    return v / n


def _maybe_norm(v: Tensor, flag: bool) -> Tensor:
    return normalize(v) if flag else v


def class_means(
    X: Float[Tensor, "n d"], y: Int[Tensor, " n"], n_classes: int | None = None, *, min_count: int = 2
) -> Float[Tensor, "n_classes d"]:
    """Mean feature per class (row c = mean of X[y == c]); classes with fewer than `min_count` examples are NaN.

    Example:
        >>> class_means(torch.tensor([[0.0], [2.0], [5.0], [7.0]]), torch.tensor([0, 0, 1, 1]))
        tensor([[1.],
                [6.]])
    """
    X = torch.as_tensor(X).float()
    y = torch.as_tensor(y).long()
    if X.dim() != 2 or y.shape != (X.shape[0],):
        raise ValueError(f"need X [n, d] and y [n], got {tuple(X.shape)} and {tuple(y.shape)}")
    C = int(y.max()) + 1 if n_classes is None else n_classes
    sums = torch.zeros(C, X.shape[1], dtype=X.dtype, device=X.device).index_add_(0, y.to(X.device), X)
    cnt = torch.bincount(y, minlength=C).to(X.device)
    means = sums / cnt[:, None].clamp(min=1)
    means[cnt < min_count] = float("nan")
    return means


def diff_of_means(
    X: Float[Tensor, "n d"], y: Int[Tensor, " n"], src: int, tgt: int, *, normalize: bool = False
) -> Float[Tensor, " d"]:
    """The paper's steering vector: mean of class `tgt` minus mean of class `src`.

    Example:
        >>> X = torch.tensor([[0.0, 1], [0, 3], [4, 0], [6, 0]]); y = torch.tensor([0, 0, 1, 1])
        >>> diff_of_means(X, y, src=0, tgt=1)
        tensor([ 5., -2.])
    """
    y = torch.as_tensor(y)
    for c in (src, tgt):
        n = int((y == c).sum())
        if n < 2:
            raise ValueError(
                f"class {c} has {n} example(s); a class mean needs at least two: harvest more images of class {c}"
            )
    m = class_means(X, y, n_classes=max(int(y.max()), src, tgt) + 1)
    return _maybe_norm(m[tgt] - m[src], normalize)


def from_probe(probe: Any, tgt: int, src: int | None = None, *, normalize: bool = False) -> Float[Tensor, " d"]:
    """A probe's direction towards `tgt`: `W[tgt] - W[src]` (or `W[tgt]`) for a multiclass probe,
    the pair's weight for `PairwiseProbes` (needs `src`). Weights are in the raw activation space.

    Example:
        >>> from vlens.probes import fit_probe
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.arange(2).repeat_interleave(30); X = torch.randn(60, 4, generator=g) + 3 * torch.eye(2, 4)[y]
        >>> v = from_probe(fit_probe(X, y), tgt=1, src=0, normalize=True)
        >>> bool(v[1] > 0 > v[0])
        True
    """
    if hasattr(probe, "pairs"):
        if src is None:
            raise ValueError("pairwise probes need src: from_probe(pp, tgt, src)")
        v = probe.direction(src, tgt)
    else:
        v = probe.direction(tgt)
        if src is not None:
            v = v - probe.direction(src)
    return _maybe_norm(v.detach().float().cpu(), normalize)


def _name_ids(tok: Any, name: str) -> list[int]:
    ids = tok(name, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"class name {name!r} tokenizes to nothing")
    unk = getattr(tok, "unk_token_id", None)
    if unk is not None and unk in ids:
        raise ValueError(f"class name {name!r} has unknown tokens for this tokenizer: {tok.convert_ids_to_tokens(ids)}")
    return ids


def unembedding_diff(
    vlm: Any, src_name: str, tgt_name: str, *, mode: str = "first", normalize: bool = False
) -> Float[Tensor, " d_model"]:
    """Difference of the LM-head rows of two class names: `W_U[tgt] - W_U[src]`.

    Multi-token names: `mode="first"` uses the first position where the two
    names' token ids differ (e.g. "red circle" vs "red square" → "circle" vs
    "square"); `mode="mean"` uses the mean of each name's token rows.

    Example:
        >>> import vlens
        >>> vlm = vlens.tiny(words=["red", "blue", "circle"])
        >>> unembedding_diff(vlm, "red circle", "blue circle").shape
        torch.Size([64])
    """
    tok = vlm.tokenizer
    a, b = _name_ids(tok, src_name), _name_ids(tok, tgt_name)
    W = vlm._module.get_output_embeddings().weight.detach().float().cpu()
    if mode == "first":
        i = next((i for i, (p, q) in enumerate(zip(a, b)) if p != q), None)
        if i is None:
            if len(a) == len(b):
                raise ValueError(f"{src_name!r} and {tgt_name!r} tokenize identically: no unembedding difference")
            i = min(len(a), len(b))
            ra = W[a[i]] if i < len(a) else torch.zeros_like(W[0])
            rb = W[b[i]] if i < len(b) else torch.zeros_like(W[0])
            return _maybe_norm(rb - ra, normalize)
        v = W[b[i]] - W[a[i]]
    elif mode == "mean":
        v = W[b].mean(0) - W[a].mean(0)
    else:
        raise ValueError(f"mode must be 'first' or 'mean', not {mode!r}")
    return _maybe_norm(v, normalize)


def random_like(v: Float[Tensor, " d"], seed: int = 0) -> Float[Tensor, " d"]:
    """A random Gaussian direction with the same norm as `v` (the control vector).

    Example:
        >>> v = torch.tensor([3.0, 4.0, 0.0])
        >>> round(float(random_like(v).norm()), 4)
        5.0
    """
    v = check_vector(v, v.shape[-1])
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(v.shape[-1], generator=g, dtype=torch.float32)
    return (r / r.norm() * v.norm()).to(v.dtype)


# -- sparse SAE approximation -------------------------------------------------------------------


@dataclass
class SparseApproximation:
    """`v ≈ Σ coefficients[i] · W_dec[latents[i]]`, one row per penalty (sorted by `n_latents`)."""

    rows: list[dict] = field(default_factory=list)

    def best(self, max_latents: int) -> dict:
        """The highest-cosine row using at most `max_latents` latents."""
        ok = [r for r in self.rows if 0 < r["n_latents"] <= max_latents]
        if not ok:
            raise ValueError(f"no approximation uses 1..{max_latents} latents; try smaller penalties")
        return max(ok, key=lambda r: r["cosine"])

    def figure(self, title: str = "sparse SAE approximation of a steering vector"):
        """Cosine against the number of SAE latents used (plotly)."""
        import plotly.graph_objects as go

        fig = go.Figure()
        fig.add_scatter(x=[r["n_latents"] for r in self.rows], y=[r["cosine"] for r in self.rows],
                        mode="lines+markers", text=[f"penalty {r['penalty']:g}" for r in self.rows])
        fig.update_layout(title=title, xaxis_title="SAE latents used", yaxis_title="cosine with v",
                          xaxis_type="log", yaxis_range=[0, 1.02], template="plotly_white")
        return fig

    def __repr__(self) -> str:
        return "SparseApproximation(" + ", ".join(f"{r['n_latents']} latents: cos {r['cosine']:.3f}" for r in self.rows) + ")"


def sparse_approximation(
    v: Float[Tensor, " d_model"],
    sae: Any,
    penalties: Sequence[float] = (1e-3, 3e-3, 1e-2, 3e-2),
    *,
    steps: int = 400,
    lr: float = 0.05,
    refit: bool = True,
    seed: int = 0,
) -> SparseApproximation:
    """Approximate `v` by a few SAE decoder directions.

    For each penalty λ, maximise `cos(normalise(W_dec^T (c ⊙ z)), v) − λ · E[L0(z)]`
    over coefficients c and hard-concrete gates z (temperature 1/1.5, stretch
    (−0.1, 1.1)) with Adam. The open gates give the latents; with `refit` the
    coefficients are then re-solved by least squares on those latents, so
    `coefficients @ W_dec[latents] ≈ v` in scale too. `sae` is anything with
    `W_dec` [d_sae, d_model] (an SAE-Lens SAE) or that matrix itself.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> W = torch.nn.functional.normalize(torch.randn(256, 32, generator=g), dim=-1)
        >>> v = 2 * W[3] - W[40]
        >>> r = sparse_approximation(v, W, penalties=[0.01])
        >>> row = r.rows[0]; sorted(row["latents"])[:2] == [3, 40] and row["cosine"] > 0.99
        True
    """
    from .probes import HardConcrete

    W = sae if isinstance(sae, Tensor) else getattr(sae, "W_dec", None)
    if W is None:
        raise TypeError("sae must have W_dec [d_sae, d_model] (an SAE-Lens SAE) or be that matrix")
    W = W.detach().float()
    v = check_vector(v, W.shape[1]).to(W.device).float()
    if v.norm() == 0:
        raise ValueError("cannot approximate the zero vector")
    if not len(penalties):
        raise ValueError("no penalties given: pass penalties=[...] (e.g. [1e-3, 1e-2])")
    vn = v / v.norm()
    torch.manual_seed(seed)
    out = SparseApproximation()
    for lam in tqdm(list(penalties), desc="sparse approximation", disable=None, leave=False):
        gates = HardConcrete(W.shape[0], init=0.0).to(W.device)
        c = torch.nn.Parameter((W @ vn).clone())
        opt = torch.optim.Adam([c, *gates.parameters()], lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            u = (c * gates()) @ W
            loss = -F.cosine_similarity(u, vn, dim=0) + lam * gates.expected_l0()
            loss.backward()
            opt.step()
        gates.eval()
        with torch.no_grad():
            z = gates()
            idx = (z > 0).nonzero().flatten()
            if idx.numel() == 0:
                out.rows.append(dict(penalty=float(lam), n_latents=0, latents=[], coefficients=[], cosine=0.0))
                continue
            if refit:
                a = torch.linalg.lstsq(W[idx].T, v[:, None]).solution[:, 0]
            else:
                a = (c * z)[idx]
                u = a @ W[idx]
                a = a * (u @ v) / (u @ u).clamp(min=1e-12)
            approx = a @ W[idx]
            order = a.abs().argsort(descending=True)
            out.rows.append(dict(
                penalty=float(lam),
                n_latents=int(idx.numel()),
                latents=idx[order].tolist(),
                coefficients=a[order].tolist(),
                cosine=float(F.cosine_similarity(approx, v, dim=0)),
            ))
    out.rows.sort(key=lambda r: r["n_latents"])
    return out


# -- features for means / probes ----------------------------------------------------------------


def _images_of(data: Any) -> list:
    return [s.image if hasattr(s, "image") else s for s in data]


def pool_features(
    vlm: Any,
    images: Sequence[Any],
    layers: Iterable[int],
    *,
    prompt: str = "<image>",
    tokens: Any = "image",
    batch_size: int = 16,
) -> dict[int, Float[Tensor, "n d_model"]]:
    """Mean of `resid_pre.L` over the selected tokens, per image, in memory (the paper's probe features).

    For data sets that do not fit in memory, use `vlens.harvest`, which
    streams the same features to disk. `images` may be a data set of `Sample`s.

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny()
        >>> feats = pool_features(vlm, [Image.new("RGB", (32, 32))] * 3, layers=[1, 3])
        >>> feats[3].shape
        torch.Size([3, 64])
    """
    from .harvest import _forward  # the harvest's own pooled forward, without the store
    from .interventions import token_mask

    layers = sorted(set(int(L) for L in layers))
    for L in layers:
        vlm._check_layer(L, vlm.n_layers, "language-model")
    images = _images_of(images)
    out: dict[int, list[Tensor]] = {L: [] for L in layers}
    for i in tqdm(range(0, len(images), batch_size), desc="pool features", disable=None, leave=False):
        chunk = images[i : i + batch_size]
        batch = vlm.prepare([prompt] * len(chunk), chunk)
        pooled = _forward(vlm, batch, token_mask(batch, tokens), layers, "resid_pre", "mean", torch.float32)
        for L, v in zip(layers, pooled):
            out[L].append(v)
    return {L: torch.cat(v) for L, v in out.items()}


# -- steered runs -------------------------------------------------------------------------------


def _edits(vlm: Any, batch: Batch, vector: Any, layer: Any, k: float, tokens: Any, new_tokens: bool,
           edit: Callable | None) -> None:
    if vector is not None:
        add(vlm, layer, vector, k, batch=batch, tokens=tokens, new_tokens=new_tokens)
    if edit is not None:
        edit(vlm, batch)


def steered_generate(
    vlm: Any,
    batch: Batch,
    vector: Float[Tensor, " d_model"] | None = None,
    layer: int | str | None = None,
    k: float = 1.0,
    *,
    tokens: Any = "image",
    every_step: bool = False,
    edit: Callable[[Any, Batch], None] | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    return_ids: bool = False,
    **generate_kwargs: Any,
) -> list[str] | tuple[list[str], Tensor]:
    """Generate with `k · vector` added at `layer` (int = `resid_pre.L`) on the selected tokens, using the KV cache.

    By default the vector is added during the prefill only (the paper): the
    image tokens' keys and values carry it into every later step. With
    `every_step=True` it is also added to each newly generated token.
    `edit(vlm, batch)`, if given, is called in the same trace to apply other
    interventions from `vlens.interventions` (with `every_step`, at every
    step; it should pass `new_tokens=True` to edit the new tokens). Greedy by
    default; `do_sample=True` (plus `temperature=`, `top_p=`...) samples.
    Returns the new text per row (and the full ids with `return_ids`).

    Example:
        >>> import vlens, torch; from PIL import Image
        >>> vlm = vlens.tiny()
        >>> b = vlm.prepare(["<image>\\nWhat is shown?"] * 2, [Image.new("RGB", (32, 32))] * 2)
        >>> texts = steered_generate(vlm, b, torch.randn(vlm.d_model), layer=2, k=8.0, max_new_tokens=3)
        >>> len(texts)
        2
    """
    if not isinstance(batch, Batch):
        raise TypeError("steered_generate needs a Batch from vlm.prepare(prompts, images)")
    if vector is not None:
        vector = check_vector(vector, vlm.d_model)
        if layer is None:
            raise ValueError("give the layer to steer: steered_generate(vlm, batch, v, layer=8, k=...)")
    token_check = tokens if vector is not None else None
    if token_check is not None:
        from .interventions import token_mask

        token_mask(batch, token_check)  # fail early, outside the trace
    kw = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, **generate_kwargs)
    if not do_sample:
        kw.setdefault("temperature", None)
        kw.setdefault("top_p", None)
        kw.setdefault("top_k", None)
    with torch.no_grad():
        if not every_step:
            with vlm.generate(batch, **kw) as tracer:
                _edits(vlm, batch, vector, layer, k, tokens, False, edit)
                ids = tracer.result.save()
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*was never reached.*")
                with vlm.generate(**kw) as tracer:
                    with tracer.invoke(*vlm._unbatch((batch,))):
                        for _ in tracer.all():
                            _edits(vlm, batch, vector, layer, k, tokens, True, edit)
                    with tracer.invoke():
                        ids = tracer.result.save()
    texts = vlm.decode(ids, batch)
    return (texts, ids) if return_ids else texts


def _answer_logprobs(vlm: Any, batch: Batch, edit: Callable[[], None] | None) -> Tensor:
    """Sum and count of log p(answer tokens) per row, teacher-forced, with `edit()` applied in the trace."""
    ans = batch.layout.answer.to(vlm.device)
    ids = batch.inputs["input_ids"].to(vlm.device)
    with torch.no_grad(), vlm.trace(batch):
        if edit is not None:
            edit()
        logits = vlm.read("logits")
        lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        tot = (lp * ans[:, 1:]).sum(1).cpu().save()
    return tot, batch.layout.answer.sum(1)


def _names(text: str, name: str) -> bool:
    return re.search(r"(?<![a-z0-9])" + re.escape(name.lower()) + r"(?![a-z0-9])", text.lower()) is not None


def efficacy(
    vlm: Any,
    images: Sequence[Any],
    src: str,
    tgt: str,
    vector: Float[Tensor, " d_model"] | None,
    layer: int | str,
    k: float,
    *,
    prompt: str | Callable[[str, str], str] | None = None,
    tokens: Any = "image",
    generate: bool = True,
    batch_size: int = 16,
) -> dict:
    """The paper's efficacy: steer images of class `src` towards `tgt` and ask the two-choice question.

    Returns per-image `p_target` and `p_source` (teacher-forced probability of
    the class name's full token sequence after the prompt; for one-token
    names, the paper's token probability), `answers` (greedy, prefill-only
    steering, KV cache), `flipped` (the answer names `tgt` and not `src`), and
    their means `p_target_mean`, `flip_rate`. `vector=None` or `k=0` is the
    unsteered baseline. `prompt` is a format string with `{src}`/`{tgt}` or a
    function (src, tgt) -> prompt; default the paper's `TWO_CHOICE`.

    Example:
        >>> import vlens, torch; from PIL import Image
        >>> vlm = vlens.tiny(words=["red", "blue"])
        >>> r = efficacy(vlm, [Image.new("RGB", (32, 32))] * 2, "red", "blue", torch.randn(64), layer=2, k=4.0)
        >>> r["p_target"].shape, 0 <= r["flip_rate"] <= 1
        (torch.Size([2]), True)
    """
    images = _images_of(images)
    if not images:
        raise ValueError(f"no images of class {src!r} to steer: pass at least one")
    if callable(prompt):
        text = prompt(src, tgt)
    else:
        text = (prompt or TWO_CHOICE).format(src=src, tgt=tgt)
    for name in (src, tgt):
        _name_ids(vlm.tokenizer, name)
    if vector is not None:
        vector = check_vector(vector, vlm.d_model)
    n_new = max(len(_name_ids(vlm.tokenizer, n)) for n in (src, tgt)) + 2
    p_t, p_s, answers = [], [], []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        n = len(chunk)
        batch = vlm.prepare([text] * (2 * n), chunk + chunk, answers=[tgt] * n + [src] * n)
        edit = (lambda: add(vlm, layer, vector, k, batch=batch, tokens=tokens)) if vector is not None and k else None
        tot, _ = _answer_logprobs(vlm, batch, edit)
        p_t.append(tot[:n].exp())
        p_s.append(tot[n:].exp())
        if generate:
            gb = vlm.prepare([text] * n, chunk)
            answers += steered_generate(vlm, gb, vector if k else None, layer, k, tokens=tokens, max_new_tokens=n_new)
    flipped = torch.tensor([_names(a, tgt) and not _names(a, src) for a in answers], dtype=torch.bool)
    p_target, p_source = torch.cat(p_t), torch.cat(p_s)
    return dict(
        p_target=p_target, p_source=p_source, answers=answers, flipped=flipped,
        p_target_mean=float(p_target.mean()),
        flip_rate=float(flipped.float().mean()) if generate else float("nan"),
    )


def _caption_items(data: Any) -> tuple[list, list[str]]:
    images, captions = [], []
    for s in data:
        if getattr(s, "caption", None):
            images.append(s.image)
            captions.append(s.caption)
    if not captions:
        raise ValueError("no captioned samples: damage needs held-out data whose Sample.caption is set")
    return images, captions


def caption_nll(
    vlm: Any,
    data: Any,
    vector: Float[Tensor, " d_model"] | None = None,
    layer: int | str | None = None,
    k: float = 0.0,
    *,
    prompt: str = CAPTION_PROMPT,
    tokens: Any = "image",
    batch_size: int = 16,
) -> float:
    """Mean per-token NLL of the captions of `data` (teacher-forced after `prompt`), optionally steered.

    Example:
        >>> import vlens; from PIL import Image
        >>> from vlens.data import Sample
        >>> vlm = vlens.tiny(words=["red", "square"])
        >>> caption_nll(vlm, [Sample(Image.new("RGB", (32, 32)), caption="a red square")]) > 0
        True
    """
    images, captions = _caption_items(data)
    if vector is not None:
        vector = check_vector(vector, vlm.d_model)
    tot, cnt = 0.0, 0
    for i in range(0, len(images), batch_size):
        batch = vlm.prepare([prompt] * len(images[i : i + batch_size]), images[i : i + batch_size],
                            answers=captions[i : i + batch_size])
        edit = (lambda: add(vlm, layer, vector, k, batch=batch, tokens=tokens)) if vector is not None and k else None
        s, n = _answer_logprobs(vlm, batch, edit)
        tot -= float(s.sum())
        cnt += int(n.sum())
    return tot / max(cnt, 1)


def damage(
    vlm: Any,
    data: Any,
    vector: Float[Tensor, " d_model"],
    layer: int | str,
    k: float,
    *,
    clean: float | None = None,
    **kwargs: Any,
) -> float:
    """The paper's damage: steered minus clean mean caption NLL on held-out captioned data (nats/token).

    Pass `clean=` (from `caption_nll(vlm, data)`) to reuse the clean NLL.

    Example:
        >>> import vlens, torch; from PIL import Image
        >>> from vlens.data import Sample
        >>> vlm = vlens.tiny(words=["red", "square"])
        >>> data = [Sample(Image.new("RGB", (32, 32)), caption="a red square")]
        >>> damage(vlm, data, torch.zeros(64), layer=2, k=1.0)
        0.0
    """
    if clean is None:
        clean = caption_nll(vlm, data, **kwargs)
    return caption_nll(vlm, data, vector, layer, k, **kwargs) - clean


# -- sweeps -------------------------------------------------------------------------------------


@dataclass
class SteeringSweep:
    """Rows of a steering sweep: src, tgt, layer, k, p_target, flip_rate, damage (and a random control when run)."""

    rows: list[dict]
    threshold: float = 0.9

    def success(self, threshold: float | None = None) -> list[dict]:
        """Per (pair, layer): the smallest k whose flip rate reaches `threshold` (None if none) and its damage."""
        thr = self.threshold if threshold is None else threshold
        out: dict[tuple, dict] = {}
        for r in sorted(self.rows, key=lambda r: (r["src"], r["tgt"], r["layer"], r["k"])):
            key = (r["src"], r["tgt"], r["layer"])
            o = out.setdefault(key, dict(src=r["src"], tgt=r["tgt"], layer=r["layer"], k=None, damage=None,
                                         flip_rate=None))
            if o["k"] is None and r["flip_rate"] >= thr and r["k"] != 0:
                o.update(k=r["k"], damage=r["damage"], flip_rate=r["flip_rate"])
        return list(out.values())

    def success_rate(self, layer: int | None = None, threshold: float | None = None) -> float:
        """Fraction of class pairs with some k that flips ≥ `threshold` of the images (at `layer`, or any layer)."""
        by_pair: dict[tuple, bool] = {}
        for s in self.success(threshold):
            if layer is None or s["layer"] == layer:
                by_pair[(s["src"], s["tgt"])] = by_pair.get((s["src"], s["tgt"]), False) or s["k"] is not None
        return sum(by_pair.values()) / max(len(by_pair), 1)

    def figure(self, metric: str = "flip_rate", title: str | None = None):
        """Plotly figure of `metric` ('flip_rate', 'p_target', 'damage') against k: mean over pairs, one line per layer."""
        import plotly.graph_objects as go

        if metric not in ("flip_rate", "p_target", "damage", "random_flip_rate"):
            raise ValueError("metric must be 'flip_rate', 'p_target', 'damage' or 'random_flip_rate'")
        fig = go.Figure()
        for L in sorted({r["layer"] for r in self.rows}, key=str):
            ks = sorted({r["k"] for r in self.rows if r["layer"] == L})
            ys = []
            for k in ks:
                vals = [r[metric] for r in self.rows if r["layer"] == L and r["k"] == k and r.get(metric) is not None]
                ys.append(sum(vals) / len(vals) if vals else None)
            fig.add_scatter(x=ks, y=ys, mode="lines+markers", name=f"layer {L}")
        label = {"flip_rate": "answers flipped to target", "p_target": "p(target)", "damage": "Δ caption NLL (nats/token)",
                 "random_flip_rate": "flipped by random vector"}[metric]
        fig.update_layout(title=title or f"steering: {label} vs k (mean over {len({(r['src'], r['tgt']) for r in self.rows})} pairs)",
                          xaxis_title="k", yaxis_title=label, template="plotly_white")
        return fig

    def figures(self) -> dict:
        """The efficacy (flip rate, p(target)) and damage figures."""
        return {m: self.figure(m) for m in ("flip_rate", "p_target", "damage")}

    def __repr__(self) -> str:
        return f"SteeringSweep({len(self.rows)} rows, success rate {self.success_rate():.2f} at flip ≥ {self.threshold})"


def _class_index(names: Sequence[str] | None, c: Any) -> int:
    if isinstance(c, int):
        return c
    if names is None or c not in names:
        raise KeyError(f"unknown class {c!r}: use one of {list(names or [])[:20]} or an int label")
    return list(names).index(c)


def sweep(
    vlm: Any,
    pairs: Sequence[tuple[Any, Any]],
    ks: Sequence[float],
    layers: Sequence[int],
    *,
    data: Any,
    vectors: Callable[[int, int, int], Tensor] | Mapping[int, Tensor],
    captions: Any = None,
    class_names: Sequence[str] | None = None,
    n_images: int = 16,
    n_captions: int = 16,
    prompt: str | Callable[[str, str], str] | None = None,
    caption_prompt: str = CAPTION_PROMPT,
    tokens: Any = "image",
    normalize: bool = False,
    random_control: bool = False,
    generate: bool = True,
    threshold: float = 0.9,
) -> SteeringSweep:
    """Efficacy and damage over class pairs × layers × coefficients k.

    `data` is a held-out class data set (`Sample(image, label)`, with
    `class_names`); the first `n_images` images of each source class are
    steered. `vectors` is either a function `(src, tgt, layer) -> [d_model]`
    or a dict `layer -> class means [n_classes, d_model]` (then
    `v = means[tgt] - means[src]`, the paper's vector). `captions` (held-out
    captioned data, default `data`) gives the damage on `n_captions` samples,
    each caption after `caption_prompt`.
    With `random_control`, a random vector of the same norm is also evaluated
    (`random_flip_rate`).

    Example:
        >>> import vlens, torch; from PIL import Image
        >>> from vlens.data import ListDataset, Sample
        >>> vlm = vlens.tiny(words=["red", "blue", "square"])
        >>> data = ListDataset([Sample(Image.new("RGB", (32, 32), c), label=i, caption=f"a {n} square")
        ...                     for i, (c, n) in enumerate([((255, 0, 0), "red"), ((0, 0, 255), "blue")])] * 2,
        ...                    class_names=["red", "blue"])
        >>> s = sweep(vlm, [("red", "blue")], ks=[0, 4], layers=[2], data=data,
        ...           vectors={2: torch.randn(2, 64)}, generate=False)
        >>> [r["k"] for r in s.rows]
        [0, 4]
    """
    ks = list(ks)
    if not ks:
        raise ValueError("the k sweep is empty: pass coefficients, e.g. ks=[0, 2, 4, 8, 16]")
    if not len(pairs):
        raise ValueError("no class pairs: pass pairs=[(src, tgt), ...]")
    if not len(layers):
        raise ValueError("no layers: pass layers=[...]")
    names = list(class_names or getattr(data, "class_names", None) or [])
    if not names:
        raise ValueError("class names are needed for the two-choice prompt: give data.class_names or class_names=")
    captions = data if captions is None else captions
    cap_items = [s for s in captions if getattr(s, "caption", None)][:n_captions]
    by_class: dict[int, list] = {}
    for s in data:
        if s.label is not None and len(by_class.setdefault(int(s.label), [])) < n_images:
            by_class[int(s.label)].append(s.image)
    clean: dict = {}
    rows: list[dict] = []
    jobs = [(p, L, k) for p in pairs for L in layers for k in ks]
    for (src_c, tgt_c), L, k in tqdm(jobs, desc="steering sweep", disable=None):
        src, tgt = _class_index(names, src_c), _class_index(names, tgt_c)
        if src not in by_class:
            raise ValueError(f"class {names[src]!r} has no images in data to steer")
        if isinstance(vectors, Mapping):
            if L not in vectors:
                raise KeyError(f"no class means for layer {L}: vectors holds layers {sorted(vectors)}")
            v = vectors[L][tgt] - vectors[L][src]
        else:
            v = vectors(src, tgt, L)
        v = check_vector(v, vlm.d_model, f"steering vector ({names[src]} → {names[tgt]}, layer {L})")
        if normalize:
            v = globals()["normalize"](v)
        e = efficacy(vlm, by_class[src], names[src], names[tgt], v, L, k, prompt=prompt, tokens=tokens,
                     generate=generate)
        row = dict(src=names[src], tgt=names[tgt], layer=L, k=k, p_target=e["p_target_mean"], flip_rate=e["flip_rate"],
                   damage=None)
        if cap_items:
            if "nll" not in clean:
                clean["nll"] = caption_nll(vlm, cap_items, prompt=caption_prompt, tokens=tokens)
            row["damage"] = 0.0 if k == 0 else caption_nll(vlm, cap_items, v, L, k, prompt=caption_prompt,
                                                           tokens=tokens) - clean["nll"]
        if random_control:
            r = efficacy(vlm, by_class[src], names[src], names[tgt], random_like(v, seed=src * 1000 + tgt), L, k,
                         prompt=prompt, tokens=tokens, generate=generate)
            row["random_flip_rate"] = r["flip_rate"]
            row["random_p_target"] = r["p_target_mean"]
        rows.append(row)
    return SteeringSweep(rows, threshold)
