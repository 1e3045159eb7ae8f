"""Hard-concrete fits: how few SAE latents carry a class, or reproduce a steering vector?

Both of the paper's sparse experiments put each SAE latent behind a
hard-concrete gate (Louizos et al. 2018; temperature 1/1.5, stretched to
(−0.1, 1.1)) and add an expected-L0 penalty to a loss, for several penalties:

* `sparse_probe(Z, y, penalties)`: a linear probe over SAE latents; held-out
  accuracy against the number of latents used (`SparseProbeResult`).
* `sparse_approximation(v, sae, penalties)`: a few SAE decoder directions whose
  combination points the way `v` does (`SparseApproximation`).

Both run the same gate-fitting loop, `fit_gates`: Adam on
`loss(sampled gates) + penalty · E[L0]`, then the deterministic gates.

`recipe="paper"` runs instead the optimisation of the paper's code
(`probing_approximation/train_sparse_linear_probe.py`, `approximate_steering_vectors.py`):
Adam lr 1e-3, gates from log α = 0 with noise clipped at 1e-4, and one random gate sample
thresholded at 0.5 at the end. The probe: a sigmoid linear probe (BCE) on the raw latents,
1000 epochs of minibatches of 32, `train_test_split(test_size=0.2, random_state=42)`
(`paper_split`). The approximation: coefficients from `randn`, 20 000 steps, no refit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from ._fitdata import check_xy, device_of, labelled, split, standardise
from .errors import InputError
from .interventions import check_vector

RECIPES = ("vlens", "paper")

__all__ = [
    "HardConcrete",
    "SparseApproximation",
    "SparseProbeResult",
    "fit_gates",
    "paper_split",
    "sparse_approximation",
    "sparse_probe",
]


# -- gates and the one loop that fits them ----------------------------------------------------------


class HardConcrete(torch.nn.Module):
    """Hard-concrete gates (Louizos et al. 2018): temperature `beta`, stretched to (`gamma`, `zeta`), clipped to [0, 1].

    Defaults follow the paper: temperature 1/1.5 (beta = 2/3), stretch (-0.1, 1.1).

    Example:
        >>> g = HardConcrete(5)
        >>> g().shape, float(g.expected_l0().detach()) > 4
        (torch.Size([5]), True)
    """

    def __init__(self, n: int, beta: float = 2 / 3, gamma: float = -0.1, zeta: float = 1.1, init: float = 2.0,
                 eps: float = 1e-6):
        super().__init__()
        self.log_alpha = torch.nn.Parameter(torch.full((n,), float(init)))
        self.beta, self.gamma, self.zeta, self.eps = beta, gamma, zeta, eps

    def forward(self) -> Float[Tensor, " n"]:
        """A stochastic gate sample in training mode (uniform noise clipped to [eps, 1 − eps]; the paper's
        code clips at 1e-4), the deterministic gate in eval mode."""
        if self.training:
            u = torch.rand_like(self.log_alpha).clamp(self.eps, 1 - self.eps)
            s = torch.sigmoid((u.log() - (-u).log1p() + self.log_alpha) / self.beta)
        else:
            s = torch.sigmoid(self.log_alpha)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0, 1)

    def expected_l0(self) -> Float[Tensor, ""]:
        """Expected number of non-zero gates."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta)).sum()


def fit_gates(
    n: int,
    loss: Callable[[Float[Tensor, " n"]], Float[Tensor, ""]],
    penalty: float,
    params: Iterable[Tensor] = (),
    *,
    init: float = 2.0,
    steps: int = 300,
    lr: float = 0.05,
    device: Any = None,
) -> Float[Tensor, " n"]:
    """Fit `n` hard-concrete gates: Adam on `loss(gates) + penalty · E[L0]`; return the deterministic gates.

    `loss` maps a gate sample [n] to a scalar; `params` are its other
    parameters, trained jointly with the gates (e.g. probe weights). Each of
    the `steps` steps draws one stochastic gate sample (from torch's global
    RNG: seed it for a reproducible fit). The gates start at `log_alpha = init`
    (2.0: nearly all open; 0.0: half). A gate is open where the returned value is > 0.
    The one loop behind `sparse_probe` and `sparse_approximation`.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> target = torch.zeros(8); target[3] = 1.0
        >>> w = torch.nn.Parameter(torch.ones(8))
        >>> z = fit_gates(8, lambda g: (g * w - target).pow(2).sum(), penalty=0.2, params=[w], steps=300)
        >>> (z > 0).nonzero().flatten().tolist()
        [3]
    """
    gates = HardConcrete(n, init=init)
    if device is not None:
        gates = gates.to(device)
    opt = torch.optim.Adam([*params, *gates.parameters()], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        total = loss(gates()) + penalty * gates.expected_l0()
        total.backward()
        opt.step()
    gates.eval()
    with torch.no_grad():
        return gates()


# -- sparse probes ---------------------------------------------------------------------------------


@dataclass
class SparseProbeResult:
    """Sparse probes at several L0 penalties: one row per penalty with the latents used and held-out accuracy."""

    rows: list[dict] = field(default_factory=list)

    def table(self) -> list[dict]:
        """Rows: penalty, n_latents, test_accuracy, train_accuracy, latents."""
        return self.rows

    def figure(self, title: str = "sparse probe: accuracy vs latents used"):
        """A plotly plot of held-out accuracy against the number of latents used."""
        import plotly.graph_objects as go

        rows = sorted(self.rows, key=lambda r: r["n_latents"])
        fig = go.Figure()
        fig.add_scatter(x=[r["n_latents"] for r in rows], y=[r["test_accuracy"] for r in rows], mode="lines+markers",
                        text=[f"penalty {r['penalty']:g}" for r in rows], name="held-out")
        fig.update_layout(title=title, xaxis_title="latents used (L0)", yaxis_title="accuracy", xaxis_type="log",
                          template="plotly_white")
        return fig

    def __repr__(self) -> str:
        s = ", ".join(f"{r['n_latents']}→{r['test_accuracy']:.2f}" for r in sorted(self.rows, key=lambda r: r["n_latents"]))
        return f"SparseProbeResult(latents→accuracy: {s})"


def sparse_probe(
    Z: Float[Tensor, "n d_sae"],
    y: Int[Tensor, " n"],
    penalties: Sequence[float] = (1e-3, 1e-2, 3e-2, 1e-1),
    *,
    sae: Any = None,
    pair: tuple[int, int] | None = None,
    steps: int = 300,
    lr: float = 0.05,
    test_size: float = 0.2,
    seed: int = 0,
    device: Any = None,
    recipe: str = "vlens",
    epochs: int = 1000,
    batch_size: int = 32,
) -> SparseProbeResult:
    """Probes over SAE latents, each latent behind a hard-concrete gate, with an expected-L0 penalty.

    `Z` are latent activations per example (e.g. the mean over image tokens
    of `sae.encode(h)`); with `sae=` given, `Z` may instead be activations
    [n, d_model] and is encoded first. `pair=(a, b)` keeps only those two
    classes (the paper's binary probes per class pair). For each penalty
    (per expected active latent, added to the mean cross-entropy) a probe is
    trained with Adam (`fit_gates`); the held-out accuracy uses the
    deterministic gates and `n_latents` counts the open ones.

    `recipe="paper"` trains as the paper's `train_sparse_linear_probe.py` (binary pairs
    only; see the module docstring): rows are split in the order given (the paper stacks
    the first class, label 0, then the second, label 1) by `paper_split`, the probe sees the
    raw latents for `epochs` epochs of minibatches of `batch_size`, and the held-out
    accuracy uses one random gate sample thresholded at 0.5 (`steps`, `lr`, `test_size`
    are then unused).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.arange(2).repeat_interleave(50)
        >>> Z = torch.rand(100, 64, generator=g); Z[:, 7] += 2 * y
        >>> r = sparse_probe(Z, y, penalties=[0.05])
        >>> r.rows[0]["test_accuracy"] > 0.9 and 7 in r.rows[0]["latents"] and r.rows[0]["n_latents"] < 10
        True
    """
    Z = torch.as_tensor(Z)
    if sae is not None:
        with torch.no_grad():
            W = getattr(sae, "W_dec", None)
            if W is not None and Z.shape[-1] == W.shape[1] and Z.shape[-1] != W.shape[0]:
                Z = sae.encode(Z.to(W.device, W.dtype)).detach()
    Z, y, _ = labelled(Z, y)  # rows labelled -1 ('no label') are left out, as in every probe
    if pair is not None:
        keep = (y == pair[0]) | (y == pair[1])
        Z, y = Z[keep], y[keep]
        if len(torch.unique(y)) < 2:
            raise InputError(f"pair {pair}: both classes need examples in y")
    if not len(penalties):
        raise InputError("no penalties given: pass penalties=[...] (e.g. [1e-3, 1e-2, 1e-1])")
    _check_recipe(recipe)
    dev = device_of(device, Z)
    classes = torch.unique(y)
    yi = torch.searchsorted(classes, y).to(dev)
    if recipe == "paper":
        return _paper_probes(Z.to(dev, torch.float32), yi, penalties, epochs, batch_size, seed)
    tr, te = split(y, test_size, seed)
    tr, te = tr.to(dev), te.to(dev)
    Zd = Z.to(dev, torch.float32)
    mu, sd = standardise(Zd[tr])
    Zs = (Zd - mu) / sd
    C, n_lat = len(classes), Z.shape[1]
    out = SparseProbeResult()
    torch.manual_seed(seed)
    for lam in tqdm(list(penalties), desc="sparse probes", disable=None, leave=False):
        lin = torch.nn.Linear(n_lat, C).to(dev)
        torch.nn.init.zeros_(lin.weight)
        torch.nn.init.zeros_(lin.bias)
        gz = fit_gates(n_lat, lambda g: F.cross_entropy(lin(Zs[tr] * g), yi[tr]), lam, lin.parameters(),
                       steps=steps, lr=lr, device=dev)
        with torch.no_grad():
            pred = lin(Zs * gz).argmax(-1)
            used = (gz > 0).nonzero().flatten()
            out.rows.append(dict(
                penalty=float(lam),
                n_latents=int(used.numel()),
                latents=used.tolist(),
                test_accuracy=float((pred[te] == yi[te]).float().mean()),
                train_accuracy=float((pred[tr] == yi[tr]).float().mean()),
            ))
    return out


def _check_recipe(recipe: str) -> None:
    if recipe not in RECIPES:
        raise InputError(f"recipe must be 'vlens' (full-batch Adam, deterministic gates) or 'paper' (the paper's "
                         f"code: Adam 1e-3, one random final gate), not {recipe!r}")


def paper_split(n: int, test_size: float = 0.2, random_state: int = 42) -> tuple[Tensor, Tensor]:
    """(train, test) row indices as scikit-learn's `train_test_split(..., random_state=42)` draws them (unstratified).

    The paper's probes split this way; written here so vlens needs no scikit-learn at run time.

    Example:
        >>> tr, te = paper_split(10)
        >>> len(tr), len(te), sorted(tr.tolist() + te.tolist()) == list(range(10))
        (8, 2, True)
    """
    import numpy as np

    n_test = math.ceil(test_size * n)
    perm = np.random.RandomState(random_state).permutation(n)
    return torch.from_numpy(perm[n_test:].copy()), torch.from_numpy(perm[:n_test].copy())


def _paper_probes(Z: Tensor, yi: Tensor, penalties: Sequence[float], epochs: int, batch_size: int,
                  seed: int) -> SparseProbeResult:
    """`train_sparse_linear_probe.py` at each penalty: sigmoid probe, BCE, minibatches, a random final gate."""
    if int(yi.max()) != 1:
        raise InputError("recipe='paper' trains binary probes: give two classes (e.g. pair=(a, b))")
    tr, te = (i.to(Z.device) for i in paper_split(len(yi)))
    y01 = yi.float()[:, None]
    out = SparseProbeResult()
    torch.manual_seed(seed)
    for lam in tqdm(list(penalties), desc="sparse probes (paper)", disable=None, leave=False):
        lin = torch.nn.Linear(Z.shape[1], 1).to(Z.device)
        gates = HardConcrete(Z.shape[1], init=0.0, eps=1e-4).to(Z.device)
        opt = torch.optim.Adam([*lin.parameters(), gates.log_alpha], lr=1e-3)
        for _ in range(epochs):
            perm = torch.randperm(len(tr))
            for i in range(0, len(tr), batch_size):
                rows = tr[perm[i : i + batch_size].to(Z.device)]
                p = torch.sigmoid(lin(Z[rows] * gates()))
                loss = F.binary_cross_entropy(p, y01[rows]) + lam * gates.expected_l0()
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            z = (gates() > 0.5).float()  # one random sample, thresholded: the paper's test-time gate
            pred = torch.round(torch.sigmoid(Z @ (lin.weight[0] * z) + lin.bias))
            used = z.nonzero().flatten()
            out.rows.append(dict(
                penalty=float(lam), n_latents=int(used.numel()), latents=used.tolist(),
                test_accuracy=float((pred[te] == y01[te, 0]).float().mean()),
                train_accuracy=float((pred[tr] == y01[tr, 0]).float().mean()),
            ))
    return out


# -- sparse approximation of a vector ------------------------------------------------------------


@dataclass
class SparseApproximation:
    """`v ≈ Σ coefficients[i] · W_dec[latents[i]]`, one row per penalty (sorted by `n_latents`)."""

    rows: list[dict] = field(default_factory=list)

    def best(self, max_latents: int) -> dict:
        """The highest-cosine row using at most `max_latents` latents."""
        ok = [r for r in self.rows if 0 < r["n_latents"] <= max_latents]
        if not ok:
            raise InputError(f"no approximation uses 1..{max_latents} latents; try smaller penalties")
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
    recipe: str = "vlens",
) -> SparseApproximation:
    """Approximate `v` by a few SAE decoder directions.

    For each penalty λ, maximise `cos(normalise(W_dec^T (c ⊙ z)), v) − λ · E[L0(z)]`
    over coefficients c and hard-concrete gates z (temperature 1/1.5, stretch
    (−0.1, 1.1)) with Adam (`fit_gates`). The open gates give the latents; with
    `refit` the coefficients are then re-solved by least squares on those
    latents, so `coefficients @ W_dec[latents] ≈ v` in scale too. `sae` is
    anything with `W_dec` [d_sae, d_model] (an SAE-Lens SAE) or that matrix itself.

    `recipe="paper"` optimises as the paper's `approximate_steering_vectors.py`: c from
    `randn`, Adam lr 1e-3 for `steps` steps (the paper's 20 000: pass `steps=20000`), and
    the final gates the last training sample thresholded at 0.5; `refit` and `lr` are unused.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> W = torch.nn.functional.normalize(torch.randn(256, 32, generator=g), dim=-1)
        >>> v = 2 * W[3] - W[40]
        >>> r = sparse_approximation(v, W, penalties=[0.01])
        >>> row = r.rows[0]; sorted(row["latents"])[:2] == [3, 40] and row["cosine"] > 0.99
        True
    """
    W = sae if isinstance(sae, Tensor) else getattr(sae, "W_dec", None)
    if W is None:
        raise InputError("sae must have W_dec [d_sae, d_model] (an SAE-Lens SAE) or be that matrix")
    W = W.detach().float()
    v = check_vector(v, W.shape[1]).to(W.device).float()
    if v.norm() == 0:
        raise InputError("cannot approximate the zero vector")
    if not len(penalties):
        raise InputError("no penalties given: pass penalties=[...] (e.g. [1e-3, 1e-2])")
    _check_recipe(recipe)
    vn = v / v.norm()
    torch.manual_seed(seed)
    out = SparseApproximation()
    if recipe == "paper":
        out.rows = sorted((_paper_approximation(W, v, vn, float(lam), steps) for lam in penalties),
                          key=lambda r: r["n_latents"])
        return out
    for lam in tqdm(list(penalties), desc="sparse approximation", disable=None, leave=False):
        c = torch.nn.Parameter((W @ vn).clone())
        z = fit_gates(W.shape[0], lambda g: -F.cosine_similarity((c * g) @ W, vn, dim=0), lam, [c],
                      init=0.0, steps=steps, lr=lr, device=W.device)
        with torch.no_grad():
            idx = (z > 0).nonzero().flatten()
            if idx.numel() == 0:
                out.rows.append(dict(penalty=float(lam), n_latents=0, latents=[], coefficients=[], cosine=0.0))
                continue
            if refit:
                # float64: a float32 solve differed run to run by up to 1e-5 relative (thread-dependent reductions)
                a = torch.linalg.lstsq(W[idx].T.double(), v[:, None].double()).solution[:, 0].to(W.dtype)
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


def _paper_approximation(W: Tensor, v: Tensor, vn: Tensor, lam: float, steps: int) -> dict:
    """`approximate_steering_vectors.py` at one penalty: c ~ randn, Adam 1e-3, the last gate sample > 0.5."""
    gates = HardConcrete(W.shape[0], init=0.0, eps=1e-4).to(W.device)
    c = torch.nn.Parameter(torch.randn(W.shape[0], device=W.device))
    opt = torch.optim.Adam([c, gates.log_alpha], lr=1e-3)
    z = gates.log_alpha.detach()
    for _ in tqdm(range(steps), desc=f"sparse approximation (paper, penalty {lam:g})", disable=None, leave=False):
        z = gates()
        loss = -(F.normalize((c * z) @ W, dim=0) @ vn) + lam * gates.expected_l0()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        idx = (z > 0.5).nonzero().flatten()
        a = c[idx]
        order = a.abs().argsort(descending=True)
        cos = float(F.cosine_similarity(a @ W[idx], v, dim=0)) if idx.numel() else 0.0
        return dict(penalty=lam, n_latents=int(idx.numel()), latents=idx[order].tolist(),
                    coefficients=a[order].tolist(), cosine=cos)
