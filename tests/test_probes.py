"""Linear, pairwise and sparse probes; per-layer sweeps; features from a real (tiny) trace; the moved names."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vlens
from vlens import probes, sparsity
from vlens._fitdata import standardise
from vlens._lbfgs import logistic_lbfgs
from vlens.activations import read_layers
from vlens.prompts import PROBE_PROMPT

torch.set_num_threads(1)


def blobs(n_classes=5, per=40, d=24, sep=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, d, generator=g) * sep / np.sqrt(2)
    y = torch.arange(n_classes).repeat_interleave(per)
    X = centres[y] + torch.randn(len(y), d, generator=g)
    return X, y


def test_split_is_stratified_and_disjoint():
    y = torch.arange(4).repeat_interleave(10)
    tr, te = probes.split(y, 0.3, seed=1)
    assert len(set(tr.tolist()) & set(te.tolist())) == 0 and len(tr) + len(te) == 40
    assert torch.bincount(y[te]).tolist() == [3, 3, 3, 3]


@pytest.mark.parametrize("kind", ["softmax", "ovr"])
def test_probe_matches_sklearn(kind):
    from sklearn.linear_model import LogisticRegression

    X, y = blobs(sep=2.0)
    p = probes.fit_probe(X, y, kind)
    tr, te = probes.split(y)
    sk = LogisticRegression(max_iter=1000).fit(((X - X[tr].mean(0)) / X[tr].std(0))[tr].numpy(), y[tr].numpy())
    sk_acc = sk.score(((X - X[tr].mean(0)) / X[tr].std(0))[te].numpy(), y[te].numpy())
    assert p.test_accuracy > 0.8
    assert abs(p.test_accuracy - sk_acc) <= 0.05
    # the folded raw-space weights compute the same predictions as predict()
    assert torch.equal((X @ p.weight.T + p.bias).argmax(-1), p.predict(X))
    assert p.per_class_accuracy.shape == (5,)
    assert p.score(X[te], y[te]) == pytest.approx(p.test_accuracy)


@pytest.mark.parametrize("kind", ["softmax", "ovr"])
def test_solver_reaches_the_optimum_and_stops_by_the_gradient_rule(kind):
    """Converged, the fit is scikit-learn's converged optimum (the problem is convex, so it is unique);
    at the default tolerance it stops at the first point where max |grad| ≤ tol, as scikit-learn does."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    X, y = blobs(n_classes=4, per=30, d=12, sep=1.5)
    tr, te = probes.split(y)
    mu, sd = standardise(X[tr])
    Z, ytr = (X[tr] - mu) / sd, y[tr]
    n = len(ytr)
    W, b, _, it = logistic_lbfgs(Z, ytr, 4, kind, 0.5 / n, max_iter=500, tol=1e-6)
    assert 0 < it < 500
    if kind == "softmax":
        sk = LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit(Z.double().numpy(), ytr.numpy())
        ref_W, ref_b = sk.coef_, sk.intercept_
    else:  # the ovr loss sums the classes' binary losses: each is scikit-learn's binary problem with C = 1
        sk = OneVsRestClassifier(LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000)).fit(Z.double().numpy(), ytr.numpy())
        ref_W = np.stack([e.coef_[0] for e in sk.estimators_])
        ref_b = np.array([e.intercept_[0] for e in sk.estimators_])
    np.testing.assert_allclose(W.numpy(), ref_W, atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(b.numpy(), ref_b, atol=2e-3, rtol=2e-3)

    for tol in (1e-6, 1e-4):
        W, b, z, it = logistic_lbfgs(Z, ytr, 4, kind, 0.5 / n, max_iter=500, tol=tol)
        Wt, bt = W.clone().requires_grad_(), b.clone().requires_grad_()
        logits = Z @ Wt.T + bt
        if kind == "softmax":
            data = torch.nn.functional.cross_entropy(logits, ytr)
        else:
            data = 4 * torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.eye(4)[ytr])
        (data + 0.5 / n * Wt.pow(2).sum()).backward()
        assert max(Wt.grad.abs().max(), bt.grad.abs().max()) <= 1.01 * tol
        torch.testing.assert_close(z, logits.detach(), atol=1e-4, rtol=1e-4)  # the solver's logits are current


def test_probe_labels_need_not_be_contiguous():
    X, y = blobs(n_classes=3)
    y = torch.tensor([10, 20, 30])[y]
    p = probes.fit_probe(X, y)
    assert p.classes.tolist() == [10, 20, 30]
    assert set(p.predict(X).tolist()) <= {10, 20, 30}
    assert p.direction(20).equal(p.weight[1])


def test_pairwise_probes():
    X, y = blobs(n_classes=4, sep=3.0)
    pp = probes.pairwise_probes(X, y)
    assert len(pp.pairs) == 6 and bool((pp.accuracy > 0.85).all())
    # each pair's own fit, alone, agrees with the batched fit
    sub = (y == 0) | (y == 3)
    alone = probes.fit_probe(X[sub], (y[sub] == 3).long())
    assert abs(float(pp.accuracy[pp.pairs.index((0, 3))]) - alone.test_accuracy) <= 0.1
    assert pp.direction(3, 0).equal(-pp.direction(0, 3))


class FakeStore:
    """Duck-typed stand-in for vlens.harvest's ActivationStore."""

    def __init__(self, feats):
        self.feats = feats
        self.layers = sorted(feats)

    def pooled(self, layer):
        return self.feats[layer]


def test_sweep_dict_and_store_figure_and_missing_layer():
    y = torch.arange(4).repeat_interleave(25)
    g = torch.Generator().manual_seed(0)
    feats = {L: (torch.randn(100, 16, generator=g) + L * 1.5 * torch.eye(4, 16)[y], y) for L in (0, 2, 4)}
    s = probes.sweep(feats)
    assert s.layers == [0, 2, 4] and s.accuracy[4] > 0.9 > s.accuracy[0] and s.best_layer == 4
    fig = s.figure()
    assert list(fig.data[0].x) == [0, 2, 4] and fig.data[0].y[2] == s.accuracy[4]
    s2 = probes.sweep(FakeStore(feats), layers=[2, 4])
    assert s2.accuracy[4] == pytest.approx(s.accuracy[4])
    with pytest.raises(KeyError, match="layer 3 was not harvested.*layers=\\[..., 3\\]"):
        probes.sweep(feats, layers=[2, 3])
    with pytest.raises(KeyError, match="not harvested"):
        probes.sweep(FakeStore(feats), layers=[7])


def test_decodable_classes_threshold():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(40)
    X = torch.randn(160, 8, generator=g) + 5 * torch.eye(4, 8)[y.clamp(max=2)]  # classes 2 and 3 look alike
    p = probes.fit_probe(X, y, class_names=["a", "b", "c", "d"])
    assert probes.decodable_classes(p, 0.9) == ["a", "b"]
    assert set(probes.decodable_classes(p, 0.0)) == {"a", "b", "c", "d"}
    assert probes.decodable_classes(probes.sweep({1: (X, y)}), 0.9) == [0, 1]


def test_bad_probe_inputs():
    X, y = blobs(n_classes=3)
    y2 = y.clone()
    y2[0] = 7  # a class with one example
    with pytest.raises(ValueError, match="fewer than two examples.*harvest more"):
        probes.fit_probe(X, y2)
    with pytest.raises(ValueError, match="NaN"):
        probes.fit_probe(X.clone().fill_(float("nan")), y)
    with pytest.raises(ValueError, match="2-D"):
        probes.fit_probe(X[None], y)
    with pytest.raises(ValueError, match="one label per row"):
        probes.fit_probe(X, y[:-1])
    with pytest.raises(ValueError, match="width"):
        probes.fit_probe(X, y).logits(X[:, :3])


def test_hard_concrete_gates():
    g = sparsity.HardConcrete(1000, init=0.0)
    torch.manual_seed(0)
    s = g().detach()
    assert float(s.min()) == 0.0 and float(s.max()) == 1.0  # the stretch makes exact 0s and 1s
    # expected L0 matches the empirical fraction of open gates
    with torch.no_grad():
        emp = torch.stack([(g() > 0).float().mean() for _ in range(50)]).mean()
        assert abs(float(g.expected_l0()) / 1000 - float(emp)) < 0.02
    g.eval()
    assert torch.equal(g(), g())


def test_sparse_probe_finds_the_informative_latents():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(2).repeat_interleave(60)
    Z = torch.relu(torch.randn(120, 200, generator=g))
    Z[:, 11] += 1.5 * y
    Z[:, 42] += 1.5 * (1 - y)
    r = sparsity.sparse_probe(Z, y, penalties=[0.0, 0.03, 0.3])
    rows = {row["penalty"]: row for row in r.rows}
    assert rows[0.03]["test_accuracy"] >= 0.85 and {11, 42} & set(rows[0.03]["latents"])
    assert rows[0.03]["n_latents"] <= 10 < rows[0.0]["n_latents"]
    assert rows[0.3]["n_latents"] <= rows[0.03]["n_latents"]
    fig = r.figure()
    assert len(fig.data[0].x) == 3


def test_sparse_probe_on_sae_lens_latents_of_a_pair():
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=16, d_sae=64))
    X, y = blobs(n_classes=3, d=16, sep=4.0)
    r = sparsity.sparse_probe(X, y, penalties=[0.01], sae=sae, pair=(0, 2), steps=200)
    assert r.rows[0]["test_accuracy"] >= 0.8 and 0 < r.rows[0]["n_latents"] <= 64


def image_features(vlm, ims, layers, batch_size=16):
    """The paper's probe features: mean of resid_pre.L over the image tokens of a bare <image> prompt, per image."""
    parts = [read_layers(vlm, vlm.prepare([PROBE_PROMPT] * len(ims[i : i + batch_size]), ims[i : i + batch_size]),
                         layers, pool="mean", dtype=torch.float32) for i in range(0, len(ims), batch_size)]
    return {L: torch.cat([p[L] for p in parts]) for L in layers}


def test_probe_on_features_from_a_trace():
    """Colour is linearly decodable from the mean image-token residual of a (random) tiny model."""
    vlm = vlens.tiny()
    rng = np.random.default_rng(0)
    ims, labels = [], []
    for i in range(24):
        c = i % 2
        base = np.array([[200, 40, 40], [40, 40, 200]][c])
        arr = np.clip(base + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
        ims.append(Image.fromarray(arr))
        labels.append(c)
    feats = image_features(vlm, ims, [1, 3], batch_size=12)
    y = torch.tensor(labels)
    # the same features, computed by hand: mean of resid_pre(L) over each row's image tokens
    b = vlm.prepare(["<image>"] * 2, ims[:2])
    with torch.no_grad(), vlm.trace(b):
        h = vlm.resid_pre(3).save()
    by_hand = torch.stack([h[i][b.layout.image[i]].mean(0) for i in range(2)])
    assert torch.allclose(feats[3][:2], by_hand, atol=1e-5)
    s = probes.sweep({L: (X, y) for L, X in feats.items()})
    assert max(s.accuracy.values()) >= 0.9


# -- the moved names and the one gate loop ---------------------------------------------------------------


def test_fit_gates_trades_the_loss_against_the_penalty():
    """The one gate loop: a loss that needs gates 2 and 5 keeps them open; a huge penalty closes every gate."""
    target = torch.zeros(10)
    target[[2, 5]] = 1.0

    def fit(penalty):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.ones(10))
        return sparsity.fit_gates(10, lambda g: (g * w - target).pow(2).sum(), penalty, [w], steps=300)

    z = fit(0.2)
    assert z.shape == (10,) and (z > 0).nonzero().flatten().tolist() == [2, 5]
    assert not fit(100.0).any()
    assert bool(((z >= 0) & (z <= 1)).all())


def test_sparse_probe_and_sparse_approximation_share_the_gate_loop(monkeypatch):
    """Both fits go through `fit_gates` (one call per penalty), and their results are what it makes of them."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(2).repeat_interleave(30)
    Z = torch.rand(60, 40, generator=g)
    Z[:, 3] += y
    W = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=-1)
    v = W[1] - 2 * W[7]
    before = (sparsity.sparse_probe(Z, y, penalties=[0.01, 0.1], steps=50).rows,
              sparsity.sparse_approximation(v, W, penalties=[0.01], steps=50).rows)

    calls = []
    real = sparsity.fit_gates

    def spy(n, loss, penalty, params=(), **kw):
        calls.append((n, penalty, kw.get("init", 2.0)))
        return real(n, loss, penalty, params, **kw)

    monkeypatch.setattr(sparsity, "fit_gates", spy)
    after = (sparsity.sparse_probe(Z, y, penalties=[0.01, 0.1], steps=50).rows,
             sparsity.sparse_approximation(v, W, penalties=[0.01], steps=50).rows)
    assert calls == [(40, 0.01, 2.0), (40, 0.1, 2.0), (40, 0.01, 0.0)]
    assert after[0] == before[0]
    # the same gates and (the refit solves in float64) the same coefficients to float32 precision
    (ra,), (rb,) = after[1], before[1]
    assert ra["latents"] == rb["latents"] and ra["coefficients"] == pytest.approx(rb["coefficients"], rel=1e-6)

    # what the loop returns decides the latents: gates forced shut leave no latent in either fit
    monkeypatch.setattr(sparsity, "fit_gates", lambda n, loss, penalty, params=(), **kw: torch.zeros(n))
    assert sparsity.sparse_probe(Z, y, penalties=[0.01], steps=5).rows[0]["n_latents"] == 0
    assert sparsity.sparse_approximation(v, W, penalties=[0.01], steps=5).rows[0]["n_latents"] == 0
