"""Linear probes on pooled activations: is the image class linearly decodable at layer L?

Probes take plain tensors: features `X` [n, d] (e.g. the mean over image
tokens of `resid_pre.L`, as `vlens.activations.harvest` stores them:
`store.pooled(L)`) and integer labels `y` [n]. Every fit holds out a
stratified split and reports held-out accuracy.

* `fit_probe(X, y, kind="softmax" | "ovr")`: multiclass softmax or one-vs-rest
  logistic regression, full-batch L-BFGS in torch (CPU or GPU; the solver is
  `vlens._lbfgs`, hand-rolled for the measured reason stated there).
* `pairwise_probes(X, y, pairs)`: one binary probe per class pair, all fit at once.
* `sweep(features, layers)`: a probe per layer, accuracies and a plotly figure.
* `decodable_classes(probe, threshold)`: the classes a probe decodes above a threshold.

Sparse probes over SAE latents (hard-concrete gates) live in `vlens.sparsity`.

Labels are class ids >= 0; `-1` means "no label" (what a harvest stores for a
sample without one): those rows are left out of every fit, with a warning that
counts them. String labels are refused (map names to ids first).

Weights are reported in the raw feature space (the standardisation used for
training is folded in), so `probe.weight[c]` is a direction of the residual
stream that can serve as a steering vector (`vlens.steering.from_probe`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from ._fitdata import check_xy, device_of, labelled, split, standardise
from ._lbfgs import logistic_lbfgs
from .errors import InputError, NotFoundError

__all__ = [
    "LinearProbe",
    "PairwiseProbes",
    "ProbeSweep",
    "decodable_classes",
    "fit_probe",
    "pairwise_probes",
    "split",
    "sweep",
]


# -- solvers ----------------------------------------------------------------------------------------


def _torch_lbfgs(params: list[Tensor], closure_loss, max_iter: int, tol: float = 1e-4) -> None:
    """`torch.optim.LBFGS` with a strong-Wolfe line search, stopping when max |grad| <= tol (scikit-learn's rule)."""
    opt = torch.optim.LBFGS(params, lr=1, max_iter=max_iter, history_size=10, tolerance_grad=tol,
                            tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = closure_loss()
        loss.backward()
        return loss

    opt.step(closure)


# -- linear probes -------------------------------------------------------------------------------------


@dataclass
class LinearProbe:
    """A fitted linear probe: `logits = X @ weight.T + bias`, in the raw feature space.

    `classes[i]` is the label of output i; `class_names` their names when
    known. Accuracies are held-out unless named `train_`; `per_class_accuracy`
    is the held-out recall of each class (softmax) or the balanced accuracy of
    each one-vs-rest probe (ovr); `n_iter` is how many L-BFGS iterations the fit took.
    """

    weight: Float[Tensor, "n_classes d"]
    bias: Float[Tensor, " n_classes"]
    kind: str
    classes: Int[Tensor, " n_classes"]
    test_accuracy: float = float("nan")
    train_accuracy: float = float("nan")
    per_class_accuracy: Float[Tensor, " n_classes"] | None = None
    class_names: list[str] | None = None
    layer: int | None = None
    n_iter: int = 0

    def logits(self, X: Float[Tensor, "n d"]) -> Float[Tensor, "n n_classes"]:
        """Probe logits for features X."""
        X = torch.as_tensor(X).to(self.weight)
        if X.shape[-1] != self.weight.shape[1]:
            raise InputError(f"features have width {X.shape[-1]} but the probe was fit on width {self.weight.shape[1]}")
        return F.linear(X, self.weight, self.bias)

    def predict(self, X: Float[Tensor, "n d"]) -> Int[Tensor, " n"]:
        """Predicted labels (values of `classes`)."""
        return self.classes.to(self.weight.device)[self.logits(X).argmax(-1)]

    def predict_proba(self, X: Float[Tensor, "n d"]) -> Float[Tensor, "n n_classes"]:
        """Class probabilities (softmax; independent sigmoids for ovr)."""
        z = self.logits(X)
        return z.sigmoid() if self.kind == "ovr" else z.softmax(-1)

    def score(self, X: Float[Tensor, "n d"], y: Int[Tensor, " n"]) -> float:
        """Accuracy on (X, y)."""
        return float((self.predict(X).cpu() == torch.as_tensor(y).cpu()).float().mean())

    def direction(self, c: int) -> Float[Tensor, " d"]:
        """The weight row of label `c`."""
        i = (self.classes == c).nonzero()
        if i.numel() == 0:
            raise NotFoundError(f"class {c} is not one of this probe's classes {self.classes.tolist()[:20]}")
        return self.weight[int(i[0, 0])]

    def __repr__(self) -> str:
        where = f" at layer {self.layer}" if self.layer is not None else ""
        return (f"LinearProbe({self.kind}{where}: {len(self.classes)} classes × d {self.weight.shape[1]}, "
                f"held-out accuracy {self.test_accuracy:.3f}, train {self.train_accuracy:.3f})")


def _fold(W: Tensor, b: Tensor, mu: Tensor, sd: Tensor) -> tuple[Tensor, Tensor]:
    Wr = W / sd
    return Wr, b - Wr @ mu


def fit_probe(
    X: Float[Tensor, "n d"],
    y: Int[Tensor, " n"],
    kind: str = "softmax",
    *,
    test_size: float = 0.2,
    l2: float | None = None,
    max_iter: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    device: Any = None,
    class_names: Sequence[str] | None = None,
    train_idx: Tensor | None = None,
    test_idx: Tensor | None = None,
) -> LinearProbe:
    """Fit a multiclass (`"softmax"`) or one-vs-rest (`"ovr"`) logistic probe with a held-out split.

    Features are standardised on the training split; the loss is the mean
    cross-entropy (softmax) or the sum over classes of each binary probe's mean
    cross-entropy (ovr), plus `l2 · ‖W‖²` on the standardised weights (default
    `0.5 / n_train`: scikit-learn's `C=1`, for ovr that of each binary problem).
    The fit is full-batch L-BFGS in float32 on `device` (default: where X lives)
    with its line search done on the logits, at most `max_iter` iterations,
    stopping when the largest gradient entry is below `tol` (scikit-learn's rule;
    `probe.n_iter` says how many it took). It holds two `n_train × n_classes`
    float32 buffers. Pass `train_idx`/`test_idx` to fix the split.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.arange(3).repeat_interleave(40)
        >>> X = torch.randn(120, 16, generator=g) + 4 * torch.eye(3, 16)[y]
        >>> probe = fit_probe(X, y)
        >>> probe.test_accuracy > 0.9
        True
    """
    X, y, (train_idx, test_idx) = labelled(X, y, train_idx, test_idx)
    if kind not in ("softmax", "ovr"):
        raise InputError(f"kind must be 'softmax' or 'ovr', not {kind!r} (for class pairs use pairwise_probes)")
    if train_idx is None or test_idx is None:
        train_idx, test_idx = split(y, test_size, seed)
    dev = device_of(device, X)
    classes = torch.unique(y)
    if len(classes) < 2:
        raise InputError(f"a probe needs at least two classes, got only {classes.tolist()}")
    yi = torch.searchsorted(classes, y)
    Xtr, ytr = X[train_idx].to(dev, torch.float32), yi[train_idx].to(dev)
    mu, sd = standardise(Xtr)
    Z = Xtr.sub_(mu).div_(sd)  # X[train_idx] is a copy
    l2 = 0.5 / Z.shape[0] if l2 is None else l2
    C = len(classes)
    W, b, z, n_iter = logistic_lbfgs(Z, ytr, C, kind, l2, max_iter, tol)
    Wr, br = _fold(W, b, mu, sd)
    probe = LinearProbe(weight=Wr, bias=br, kind=kind, classes=classes.to(dev), n_iter=n_iter,
                        class_names=list(class_names) if class_names is not None else None)
    with torch.no_grad():
        probe.train_accuracy = float((z.argmax(1) == ytr).float().mean())  # the solver's final logits
        yte = yi[test_idx].to(dev)
        z = probe.logits(X[test_idx])
        pred = z.argmax(-1)
        probe.test_accuracy = float((pred == yte).float().mean())
        if kind == "softmax":
            hits = yte[pred == yte]
            per = torch.bincount(hits, minlength=C) / torch.bincount(yte, minlength=C).clamp(min=1)
        else:
            pos = F.one_hot(yte, C).bool()
            hit = (z > 0) == pos
            tpr = (hit & pos).sum(0) / pos.sum(0).clamp(min=1)
            tnr = (hit & ~pos).sum(0) / (~pos).sum(0).clamp(min=1)
            per = (tpr + tnr) / 2
        probe.per_class_accuracy = per.float()
    return probe


@dataclass
class PairwiseProbes:
    """Binary probes for class pairs: `logit_p = X @ weight[p] + bias[p]` > 0 means `pairs[p][1]`.

    `accuracy[p]` is the held-out accuracy of pair p on the examples of its two classes.
    """

    pairs: list[tuple[int, int]]
    weight: Float[Tensor, "n_pairs d"]
    bias: Float[Tensor, " n_pairs"]
    accuracy: Float[Tensor, " n_pairs"]
    train_accuracy: Float[Tensor, " n_pairs"]

    def direction(self, src: int, tgt: int) -> Float[Tensor, " d"]:
        """The weight pointing from `src` to `tgt` (negated if the pair was fit as (tgt, src))."""
        for p, (a, b) in enumerate(self.pairs):
            if (a, b) == (src, tgt):
                return self.weight[p]
            if (a, b) == (tgt, src):
                return -self.weight[p]
        raise NotFoundError(f"pair ({src}, {tgt}) was not fit; fit pairs {self.pairs[:10]}")

    def __repr__(self) -> str:
        return (f"PairwiseProbes({len(self.pairs)} pairs × d {self.weight.shape[1]}, mean held-out accuracy "
                f"{float(self.accuracy.mean()):.3f})")


def pairwise_probes(
    X: Float[Tensor, "n d"],
    y: Int[Tensor, " n"],
    pairs: Sequence[tuple[int, int]] | None = None,
    *,
    test_size: float = 0.2,
    l2: float | None = None,
    max_iter: int = 100,
    seed: int = 0,
    device: Any = None,
) -> PairwiseProbes:
    """One binary logistic probe per class pair (a, b) (label 1 = b), all fit in one batched L-BFGS.

    `pairs` defaults to every unordered pair of classes present.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.arange(3).repeat_interleave(30)
        >>> X = torch.randn(90, 8, generator=g) + 3 * torch.eye(3, 8)[y]
        >>> pp = pairwise_probes(X, y, [(0, 1), (1, 2)])
        >>> bool((pp.accuracy > 0.8).all())
        True
    """
    X, y, _ = labelled(X, y)
    present = torch.unique(y).tolist()
    if pairs is None:
        pairs = [(a, b) for i, a in enumerate(present) for b in present[i + 1 :]]
    pairs = [(int(a), int(b)) for a, b in pairs]
    if not pairs:
        raise InputError("no class pairs given: pass pairs=[(src, tgt), ...]")
    missing = sorted({c for p in pairs for c in p} - set(present))
    if missing:
        raise InputError(f"classes {missing} have no examples in y: fix the pairs or harvest those classes")
    train_idx, test_idx = split(y, test_size, seed)
    dev = device_of(device, X)
    Xd = X.to(dev, torch.float32)
    mu, sd = standardise(Xd[train_idx])
    Z = (Xd - mu) / sd
    yd = y.to(dev)
    A = torch.tensor([a for a, _ in pairs], device=dev)
    B = torch.tensor([b for _, b in pairs], device=dev)
    member = (yd[:, None] == A) | (yd[:, None] == B)  # [n, P]
    target = (yd[:, None] == B).float()
    is_train = torch.zeros(len(y), dtype=torch.bool, device=dev)
    is_train[train_idx.to(dev)] = True
    m_tr = member & is_train[:, None]
    m_te = member & ~is_train[:, None]
    P, d = len(pairs), X.shape[1]
    W = torch.zeros(P, d, device=dev, requires_grad=True)
    b = torch.zeros(P, device=dev, requires_grad=True)
    rows = m_tr.any(1)
    Ztr, Ttr, Mtr = Z[rows], target[rows], m_tr[rows].float()
    cnt = Mtr.sum(0).clamp(min=1)
    l2 = 0.5 / float(cnt.mean()) if l2 is None else l2

    def loss():
        z = torch.addmm(b, Ztr, W.T)
        bce = F.binary_cross_entropy_with_logits(z, Ttr, reduction="none")
        return ((bce * Mtr).sum(0) / cnt).mean() + l2 * W.pow(2).sum() / P

    _torch_lbfgs([W, b], loss, max_iter)
    Wr, br = _fold(W.detach(), b.detach(), mu, sd)
    with torch.no_grad():
        hit = ((Xd @ Wr.T + br > 0).float() == target).float()
        acc_te = (hit * m_te).sum(0) / m_te.sum(0).clamp(min=1)
        acc_tr = (hit * m_tr).sum(0) / m_tr.sum(0).clamp(min=1)
    return PairwiseProbes(pairs=list(pairs), weight=Wr, bias=br, accuracy=acc_te, train_accuracy=acc_tr)


# -- per-layer sweep ---------------------------------------------------------------------------------


def _features(features: Any, layer: int) -> tuple[Tensor, Tensor]:
    if isinstance(features, Mapping):
        if layer not in features:
            raise NotFoundError(
                f"layer {layer} was not harvested: features hold layers {sorted(features)}; harvest it "
                f"(vlens.harvest(vlm, data, layers=[..., {layer}], ...)) or sweep only those layers"
            )
        X, y = features[layer]
        return X, y
    if hasattr(features, "pooled"):
        have = getattr(features, "layers", None)
        if have is not None and layer not in list(have):
            raise NotFoundError(
                f"layer {layer} was not harvested: this store holds layers {list(have)}; re-run "
                f"vlens.harvest(vlm, data, layers=[..., {layer}], ...) or sweep only those layers"
            )
        X, y = features.pooled(layer)
        return X, y
    raise InputError("features must be a dict layer -> (X, y) or an ActivationStore from vlens.harvest")


def _default_layers(features: Any) -> list[int]:
    if isinstance(features, Mapping):
        return sorted(features)
    have = getattr(features, "layers", None)
    if have is None:
        raise InputError("this store does not list its layers: pass layers=[...] to sweep")
    return sorted(have)


@dataclass
class ProbeSweep:
    """Probes fit layer by layer: `probes[L]`, `accuracy[L]` (held-out), `figure()`."""

    probes: dict[int, LinearProbe]

    @property
    def layers(self) -> list[int]:
        return sorted(self.probes)

    @property
    def accuracy(self) -> dict[int, float]:
        """Held-out accuracy per layer."""
        return {L: self.probes[L].test_accuracy for L in self.layers}

    @property
    def best_layer(self) -> int:
        return max(self.layers, key=lambda L: self.probes[L].test_accuracy)

    def figure(self, title: str | None = None):
        """A plotly line plot of held-out (and train) accuracy by layer, with the chance level."""
        import plotly.graph_objects as go

        Ls = self.layers
        fig = go.Figure()
        fig.add_scatter(x=Ls, y=[self.probes[L].test_accuracy for L in Ls], mode="lines+markers", name="held-out")
        fig.add_scatter(x=Ls, y=[self.probes[L].train_accuracy for L in Ls], mode="lines+markers", name="train",
                        line=dict(dash="dot"))
        n_classes = len(self.probes[Ls[0]].classes)
        fig.add_hline(y=1 / n_classes, line_dash="dash", line_color="grey", annotation_text="chance")
        kind = self.probes[Ls[0]].kind
        fig.update_layout(title=title or f"{kind} probe accuracy by layer ({n_classes} classes)",
                          xaxis_title="layer (resid_pre)", yaxis_title="accuracy", yaxis_range=[0, 1.02],
                          template="plotly_white")
        return fig

    def __repr__(self) -> str:
        acc = ", ".join(f"{L}: {a:.3f}" for L, a in self.accuracy.items())
        return f"ProbeSweep({{{acc}}})"


def sweep(
    features: Mapping[int, tuple[Tensor, Tensor]] | Any,
    layers: Iterable[int] | None = None,
    kind: str = "softmax",
    **fit_kwargs: Any,
) -> ProbeSweep:
    """Fit one probe per layer on `features` (a dict layer -> (X, y), or a harvest store with `pooled(layer)`).

    The same stratified split is used at every layer. `fit_kwargs` go to `fit_probe`.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.arange(4).repeat_interleave(20)
        >>> feats = {L: (torch.randn(80, 8, generator=g) + L * torch.eye(4, 8)[y], y) for L in range(3)}
        >>> s = sweep(feats)
        >>> s.accuracy[2] > s.accuracy[0]
        True
    """
    layers = _default_layers(features) if layers is None else list(layers)
    if not layers:
        raise InputError("no layers to sweep: pass layers=[...]")
    probes: dict[int, LinearProbe] = {}
    split_idx = None
    for L in tqdm(layers, desc="probe sweep", disable=None, leave=False):
        X, y = _features(features, L)
        X, y, _ = labelled(X, y)
        if split_idx is None:
            split_idx = split(y, fit_kwargs.pop("test_size", 0.2), fit_kwargs.pop("seed", 0))
        p = fit_probe(X, y, kind, train_idx=split_idx[0], test_idx=split_idx[1], **fit_kwargs)
        p.layer = L
        probes[L] = p
    return ProbeSweep(probes)


def decodable_classes(
    probe: LinearProbe | ProbeSweep, threshold: float = 0.9, layer: int | None = None
) -> list:
    """The classes whose held-out per-class accuracy is at least `threshold` (names when known).

    For a `ProbeSweep`, uses `layer` (default: the best layer).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.arange(4).repeat_interleave(40)
        >>> X = torch.randn(160, 8, generator=g) + 5 * torch.eye(4, 8)[y.clamp(max=2)]  # 2 and 3 look alike
        >>> decodable_classes(fit_probe(X, y, class_names=["cat", "dog", "wolf", "husky"]), 0.9)
        ['cat', 'dog']
    """
    if isinstance(probe, ProbeSweep):
        L = probe.best_layer if layer is None else layer
        if L not in probe.probes:
            raise NotFoundError(f"layer {L} was not swept: swept layers {probe.layers}")
        probe = probe.probes[L]
    if not 0 <= threshold <= 1:
        raise InputError(f"threshold is an accuracy in [0, 1], got {threshold}")
    keep = (probe.per_class_accuracy >= threshold).nonzero().flatten().tolist()
    labels = [int(probe.classes[i]) for i in keep]
    if probe.class_names is not None:
        return [probe.class_names[c] for c in labels]
    return labels

