"""The paper's evaluation of steering: efficacy (does the answer flip?) and damage (do captions suffer?).

* `efficacy`: ask the two-choice question (`vlens.prompts.TWO_CHOICE`) of
  steered images of the source class; read the teacher-forced probability of
  the target name (`vlens.scoring.score_answers`) and whether the greedy
  answer names it (`steered_generate`).
* `caption_nll`, `damage`: the mean caption NLL after `vlens.prompts.CAPTION_PROMPT`,
  steered minus clean.
* `sweep`: both over class pairs × layers × coefficients k, as a `SteeringSweep`
  with the paper's success rate and plotly figures.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import InputError, NotFoundError
from ..interventions import add, check_vector
from ..prompts import CAPTION_PROMPT, TWO_CHOICE
from ..scoring import bos_id, score_answers
from .generation import steered_generate
from .vectors import name_ids, random_like
from .vectors import normalize as _unit

if TYPE_CHECKING:
    from ..model import VLM

__all__ = ["SteeringSweep", "caption_nll", "damage", "efficacy", "sweep"]


def _images_of(data: Any) -> list:
    """The images of a data set of `Sample`s, or the images themselves."""
    return [s.image if hasattr(s, "image") else s for s in data]


def _names(text: str, name: str) -> bool:
    return re.search(r"(?<![a-z0-9])" + re.escape(name.lower()) + r"(?![a-z0-9])", text.lower()) is not None


def efficacy(
    vlm: VLM,
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
    function (src, tgt) -> prompt; default the paper's `vlens.prompts.TWO_CHOICE`.

    Example:
        >>> import vlens, torch; from PIL import Image
        >>> vlm = vlens.tiny(words=["red", "blue"])
        >>> r = efficacy(vlm, [Image.new("RGB", (32, 32))] * 2, "red", "blue", torch.randn(64), layer=2, k=4.0)
        >>> r["p_target"].shape, 0 <= r["flip_rate"] <= 1
        (torch.Size([2]), True)
    """
    images = _images_of(images)
    if not images:
        raise InputError(f"no images of class {src!r} to steer: pass at least one")
    if callable(prompt):
        text = prompt(src, tgt)
    else:
        text = (prompt or TWO_CHOICE).format(src=src, tgt=tgt)
    for name in (src, tgt):
        name_ids(vlm.tokenizer, name)
    if vector is not None:
        vector = check_vector(vector, vlm.d_model)
    n_new = max(len(name_ids(vlm.tokenizer, n)) for n in (src, tgt)) + 2
    p_t, p_s, answers = [], [], []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        n = len(chunk)
        batch = vlm.prepare([text] * (2 * n), chunk + chunk, answers=[tgt] * n + [src] * n)
        edit = (lambda: add(vlm, layer, vector, k, batch=batch, tokens=tokens)) if vector is not None and k else None
        tot, _ = score_answers(vlm, batch, edit)
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
        raise InputError("no captioned samples: damage needs held-out data whose Sample.caption is set")
    return images, captions


def caption_nll(
    vlm: VLM,
    data: Any,
    vector: Float[Tensor, " d_model"] | None = None,
    layer: int | str | None = None,
    k: float = 0.0,
    *,
    prompt: str = CAPTION_PROMPT,
    tokens: Any = "image",
    batch_size: int = 16,
    bos_target: bool = False,
    average: str = "token",
) -> float:
    """Mean per-token NLL of the captions of `data` (teacher-forced after `prompt`), optionally steered.

    `average="token"` pools every caption token of `data`; `"sample"` averages each
    caption's mean NLL (the paper's `F.nll_loss(..., reduction="mean")` per sample, then
    the mean). `bos_target=True` also scores BOS as the paper's code does (its targets are
    `processor(caption).input_ids`, BOS first; `vlens.scoring.lead_logprob`).

    Example:
        >>> import vlens; from PIL import Image
        >>> from vlens.data import Sample
        >>> vlm = vlens.tiny(words=["red", "square"])
        >>> caption_nll(vlm, [Sample(Image.new("RGB", (32, 32)), caption="a red square")]) > 0
        True
    """
    if average not in ("token", "sample"):
        raise InputError(f"average must be 'token' (pool every caption token) or 'sample' (the paper's mean of "
                         f"per-caption means), not {average!r}")
    images, captions = _caption_items(data)
    if vector is not None:
        vector = check_vector(vector, vlm.d_model)
    lead = bos_id(vlm.tokenizer) if bos_target else None
    totals, counts = [], []
    for i in range(0, len(images), batch_size):
        batch = vlm.prepare([prompt] * len(images[i : i + batch_size]), images[i : i + batch_size],
                            answers=captions[i : i + batch_size])
        edit = (lambda: add(vlm, layer, vector, k, batch=batch, tokens=tokens)) if vector is not None and k else None
        s, n = score_answers(vlm, batch, edit, lead_target=lead)
        totals.append(-s)
        counts.append(n)
    if average == "sample":
        return float(torch.cat([t.double() / n.clamp(min=1) for t, n in zip(totals, counts)]).mean())
    return sum(float(t.sum()) for t in totals) / max(sum(int(n.sum()) for n in counts), 1)


def damage(
    vlm: VLM,
    data: Any,
    vector: Float[Tensor, " d_model"],
    layer: int | str,
    k: float,
    *,
    clean: float | None = None,
    **kwargs: Any,
) -> float:
    """The paper's damage: steered minus clean mean caption NLL on held-out captioned data (nats/token).

    Pass `clean=` (from `caption_nll(vlm, data)` with the same options) to reuse the clean NLL.
    `bos_target=True, average="sample"` (passed on to `caption_nll`) score as the paper's code
    does: BOS as one more target, the mean of per-caption means.

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
            raise InputError("metric must be 'flip_rate', 'p_target', 'damage' or 'random_flip_rate'")
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
        raise NotFoundError(f"unknown class {c!r}: use one of {list(names or [])[:20]} or an int label")
    return list(names).index(c)


def sweep(
    vlm: VLM,
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
        raise InputError("the k sweep is empty: pass coefficients, e.g. ks=[0, 2, 4, 8, 16]")
    if not len(pairs):
        raise InputError("no class pairs: pass pairs=[(src, tgt), ...]")
    if not len(layers):
        raise InputError("no layers: pass layers=[...]")
    names = list(class_names or getattr(data, "class_names", None) or [])
    if not names:
        raise InputError("class names are needed for the two-choice prompt: give data.class_names or class_names=")
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
            raise InputError(f"class {names[src]!r} has no images in data to steer")
        if isinstance(vectors, Mapping):
            if L not in vectors:
                raise NotFoundError(f"no class means for layer {L}: vectors holds layers {sorted(vectors)}")
            v = vectors[L][tgt] - vectors[L][src]
        else:
            v = vectors(src, tgt, L)
        v = check_vector(v, vlm.d_model, f"steering vector ({names[src]} → {names[tgt]}, layer {L})")
        if normalize:
            v = _unit(v)
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
