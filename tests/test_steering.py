"""Steering vectors, sparse SAE approximation, efficacy / damage, sweeps, the toy-model check, and the moved names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vlens
from vlens import prompts, sparsity, steering
from vlens.activations import read_layers
from vlens.data import ListDataset, Sample

torch.set_num_threads(1)

WORDS = ["red", "blue", "green", "circle", "square"]


@pytest.fixture(scope="module")
def vlm():
    return vlens.tiny(words=WORDS)


def solid(rgb, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(np.clip(np.array(rgb) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def data():
    cols = {"red": (200, 40, 40), "blue": (40, 40, 200)}
    samples = [Sample(solid(cols[n], i), label=c, caption=f"a {n} square")
               for i in range(6) for c, n in enumerate(cols)]
    return ListDataset(samples, class_names=list(cols))


def test_class_means_and_diff_of_means():
    X = torch.tensor([[0.0, 0], [2, 0], [0, 4], [0, 6], [9, 9]])
    y = torch.tensor([0, 0, 1, 1, 2])
    m = steering.class_means(X, y)
    assert torch.equal(m[:2], torch.tensor([[1.0, 0], [0, 5]])) and torch.isnan(m[2]).all()
    v = steering.diff_of_means(X, y, 0, 1)
    assert torch.equal(v, torch.tensor([-1.0, 5]))
    assert torch.allclose(steering.diff_of_means(X, y, 0, 1, normalize=True).norm(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="class 2 has 1 example.*harvest more"):
        steering.diff_of_means(X, y, 0, 2)


def test_probe_vectors():
    from vlens.probes import fit_probe, pairwise_probes

    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat_interleave(30)
    X = torch.randn(90, 6, generator=g) + 4 * torch.eye(3, 6)[y]
    p = fit_probe(X, y)
    v = steering.from_probe(p, tgt=2, src=0)
    assert torch.allclose(v, p.weight[2] - p.weight[0])
    assert v[2] > 0 > v[0]
    pp = pairwise_probes(X, y, [(0, 2)])
    assert torch.allclose(steering.from_probe(pp, tgt=2, src=0), pp.weight[0])
    with pytest.raises(ValueError, match="need src"):
        steering.from_probe(pp, tgt=2)


def test_unembedding_difference_multi_token(vlm):
    W = vlm._module.lm_head.weight.detach()
    tid = lambda w: vlm.tokenizer.convert_tokens_to_ids(w)  # noqa: E731
    # first differing token: "red circle" vs "red square" -> square - circle
    v = steering.unembedding_diff(vlm, "red circle", "red square")
    assert torch.allclose(v, W[tid("square")] - W[tid("circle")])
    v = steering.unembedding_diff(vlm, "red circle", "blue square", mode="mean")
    assert torch.allclose(v, (W[tid("blue")] + W[tid("square")]) / 2 - (W[tid("red")] + W[tid("circle")]) / 2, atol=1e-6)
    assert torch.allclose(steering.unembedding_diff(vlm, "red", "blue", normalize=True).norm(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="unknown tokens"):
        steering.unembedding_diff(vlm, "red", "zebra")


def test_random_control_same_norm_and_seeded():
    v = torch.randn(64) * 7
    r = steering.random_like(v, seed=3)
    assert torch.allclose(r.norm(), v.norm()) and torch.equal(r, steering.random_like(v, seed=3))
    assert abs(float(torch.nn.functional.cosine_similarity(r, v, dim=0))) < 0.5
    with pytest.raises(ValueError, match="NaN"):
        steering.random_like(torch.tensor([1.0, float("nan")]))


def test_sparse_approximation_with_sae_lens():
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=48, d_sae=384))
    W = sae.W_dec.detach()
    v = 3 * W[10] - 2 * W[200] + W[77]
    r = sparsity.sparse_approximation(v, sae, penalties=[3e-3, 3e-2, 0.3])
    assert [row["n_latents"] for row in r.rows] == sorted(row["n_latents"] for row in r.rows)
    good = r.best(5)
    assert set(good["latents"]) >= {10, 200} and good["cosine"] > 0.9
    # the coefficients reproduce the vector they report the cosine of
    approx = torch.tensor(good["coefficients"]) @ W[good["latents"]]
    assert torch.nn.functional.cosine_similarity(approx, v, dim=0) == pytest.approx(good["cosine"], abs=1e-4)
    assert float((approx - v).norm() / v.norm()) < 0.5
    assert r.figure().data[0].y[-1] == r.rows[-1]["cosine"]
    with pytest.raises(ValueError, match="width"):
        sparsity.sparse_approximation(torch.ones(5), sae)


def test_efficacy_probability_is_the_teacher_forced_name_probability(vlm, data):
    ims = [data[0].image, data[2].image]
    v = torch.randn(vlm.d_model)
    r = steering.efficacy(vlm, ims, "red", "blue", v, layer=2, k=2.0)
    # by hand: steered trace of the two-choice prompt, softmax at the last prompt position
    b = vlm.prepare([prompts.two_choice_prompt("red", "blue")] * 2, ims)
    with torch.no_grad(), vlm.trace(b):
        vlm.resid_pre(2)[b.layout.image] += 2.0 * v
        logits = vlm.read("logits").save()
    p = logits[:, -1].softmax(-1)
    assert torch.allclose(r["p_target"], p[:, vlm.tokenizer.convert_tokens_to_ids("blue")], atol=1e-5)
    assert torch.allclose(r["p_source"], p[:, vlm.tokenizer.convert_tokens_to_ids("red")], atol=1e-5)
    assert len(r["answers"]) == 2 and r["flipped"].dtype == torch.bool
    # two-token names: the product of the two teacher-forced probabilities
    r2 = steering.efficacy(vlm, ims[:1], "red circle", "blue square", None, layer=2, k=0.0, generate=False)
    b = vlm.prepare([prompts.two_choice_prompt("red circle", "blue square")], ims[:1], answers=["blue square"])
    with torch.no_grad(), vlm.trace(b):
        lp = vlm.read("logits").log_softmax(-1).save()
    ids = b.inputs["input_ids"][0]
    expected = lp[0, -3, ids[-2]] + lp[0, -2, ids[-1]]
    assert float(r2["p_target"][0].log()) == pytest.approx(float(expected), abs=1e-4)


def test_damage(vlm, data):
    nll = steering.caption_nll(vlm, data)
    assert nll > 0
    assert steering.damage(vlm, data, torch.zeros(vlm.d_model), 2, 5.0, clean=nll) == pytest.approx(0.0, abs=1e-6)
    big = steering.damage(vlm, data, torch.randn(vlm.d_model), 2, 50.0, clean=nll)
    assert big != 0.0
    with pytest.raises(ValueError, match="caption"):
        steering.caption_nll(vlm, [Sample(data[0].image, label=0)])


def test_sweep_rows_success_and_figures(vlm, data):
    means = {2: torch.randn(2, vlm.d_model), 3: torch.randn(2, vlm.d_model)}
    s = steering.sweep(vlm, [("red", "blue"), (1, 0)], ks=[0, 4], layers=[2, 3], data=data, vectors=means,
                       n_images=2, n_captions=2, random_control=True)
    assert len(s.rows) == 2 * 2 * 2
    assert {(r["src"], r["tgt"]) for r in s.rows} == {("red", "blue"), ("blue", "red")}
    assert all(r["damage"] == 0.0 for r in s.rows if r["k"] == 0)
    assert all(0 <= r["flip_rate"] <= 1 and 0 <= r["random_flip_rate"] <= 1 for r in s.rows)
    succ = s.success(threshold=0.0)
    assert all(x["k"] == 4 for x in succ)  # k=0 never counts as a success
    assert 0.0 <= s.success_rate() <= 1.0
    figs = s.figures()
    assert set(figs) == {"flip_rate", "p_target", "damage"} and len(figs["damage"].data) == 2
    with pytest.raises(ValueError, match="k sweep is empty"):
        steering.sweep(vlm, [("red", "blue")], ks=[], layers=[2], data=data, vectors=means)
    with pytest.raises(KeyError, match="unknown class"):
        steering.sweep(vlm, [("red", "pink")], ks=[1], layers=[2], data=data, vectors=means)
    with pytest.raises(ValueError, match="width"):
        steering.sweep(vlm, [("red", "blue")], ks=[1], layers=[2], data=data, vectors=lambda s, t, L: torch.ones(3))


def image_features(vlm, data, layer, batch_size=16):
    """Mean of resid_pre.layer over the image tokens of a bare <image> prompt, per sample (the paper's features)."""
    ims = [s.image for s in data]
    return torch.cat([read_layers(vlm, vlm.prepare([prompts.PROBE_PROMPT] * len(ims[i : i + batch_size]),
                                                   ims[i : i + batch_size]), layer, pool="mean", dtype=torch.float32)[layer]
                      for i in range(0, len(ims), batch_size)])


# -- the package and the moved names -------------------------------------------------------------------


def test_package_exports_and_submodules():
    import types

    from vlens.steering import evaluation, generation, vectors

    for mod in (vectors, generation, evaluation):
        assert isinstance(getattr(steering, mod.__name__.rsplit(".", 1)[1]), types.ModuleType)
        for name in mod.__all__:
            assert getattr(steering, name) is getattr(mod, name) and name in steering.__all__
    assert not {"vectors", "generation", "evaluation"} & set(steering.__all__)
    assert vlens.steered_generate is generation.steered_generate


def test_steered_generate_checks_the_selection_before_running(vlm, data):
    b = vlm.prepare(["<image>\nWhat is it?"], [data[0].image])
    with pytest.raises(ValueError, match="unknown token selection"):
        steering.steered_generate(vlm, b, torch.ones(vlm.d_model), layer=2, tokens="images")
    with pytest.raises(ValueError, match="selects no token"):
        steering.steered_generate(vlm, b, torch.ones(vlm.d_model), layer=2, tokens="answer")


# -- the toy model ----------------------------------------------------------------------------------

HAS_TOY = (Path(vlens.__file__).parent / "toy" / "checkpoint").exists()


@pytest.mark.skipif(not HAS_TOY, reason="the toy checkpoint (vlens/toy/checkpoint) is not built yet")
def test_toy_steering_flips_answers_and_random_does_not():
    import vlens.toy as toy

    vlm = vlens.load("toy")
    layer = 1  # the toy model reads its image tokens early: steer where the class still lives in them
    train = toy.toy_dataset("train", n=20 * 12)
    held = toy.toy_dataset("heldout", n=20 * 4)
    names = held.class_names
    X = image_features(vlm, train, layer)
    y = torch.tensor([s.label for s in train])
    prompt = prompts.two_choice_prompt  # the image placeholder is in the prompt (vlens.prompts' convention)
    flipped = []
    for src, tgt in [("green square", "green triangle"), ("red circle", "blue circle"),
                     ("blue cross", "blue circle"), ("yellow triangle", "purple triangle")]:
        a, b = names.index(src), names.index(tgt)
        v = steering.diff_of_means(X, y, a, b)
        ims = [s.image for s in held if s.label == a]
        base = steering.efficacy(vlm, ims, src, tgt, None, layer, 0.0, prompt=prompt)
        if base["flip_rate"] > 0.25:
            continue  # the model itself does not tell these two classes apart: nothing to steer
        runs = {k: steering.efficacy(vlm, ims, src, tgt, v, layer, k, prompt=prompt) for k in (2.0, 3.0, 4.0, 6.0, 8.0)}
        k = max(runs, key=lambda k: runs[k]["flip_rate"])
        best = runs[k]
        if best["flip_rate"] < 0.75:
            continue
        flipped.append((src, tgt, k))
        # the control: a random direction of the same norm at the same k does not flip the answer
        rnd = steering.efficacy(vlm, ims, src, tgt, steering.random_like(v, seed=1), layer, k, prompt=prompt)
        assert rnd["flip_rate"] <= 0.25, rnd["answers"]
        assert best["p_target_mean"] > base["p_target_mean"] and best["p_target_mean"] > rnd["p_target_mean"]
    assert len(flipped) >= 2, f"steering flipped only {flipped}"


@pytest.fixture(scope="module")
def toy_red_blue():
    """The steering tutorial's main pair on the toy model: red circle → blue circle, the vector of each layer from
    the class means of the mean image activation of the bare `<image>` prompt (vlens.read_layers, pool="mean")."""
    import vlens.toy as toy

    vlm = vlens.load("toy")
    train = toy.toy_dataset("train", n=20 * 6)
    names = train.class_names
    src, tgt = names.index("red circle"), names.index("blue circle")
    pick = [s for s in train if s.label in (src, tgt)]
    batch = vlm.prepare([prompts.PROBE_PROMPT] * len(pick), [s.image for s in pick])
    feats = read_layers(vlm, batch, [1, 3], pool="mean")
    y = torch.tensor([s.label for s in pick])
    vectors = {L: steering.diff_of_means(feats[L], y, src, tgt) for L in (1, 3)}
    images = [s.image for s in toy.toy_dataset("heldout", n=20 * 4) if s.label == src]
    return vlm, images, vectors


def _flips(toy_red_blue, layer, k, tokens="image"):
    vlm, images, vectors = toy_red_blue
    return steering.efficacy(vlm, images, "red circle", "blue circle", vectors[layer], layer, k,
                             tokens=tokens)["flip_rate"]


def test_toy_steering_flips_in_a_window_of_k(toy_red_blue):
    """What the steering tutorial says of its main pair: at layer 1 the answer flips at k = 2, and at k = 8 the
    vector is so large that the model no longer names the target (efficacy rises, then falls)."""
    assert _flips(toy_red_blue, 1, 0.0) == 0.0
    assert _flips(toy_red_blue, 1, 2.0) >= 0.75
    assert _flips(toy_red_blue, 1, 8.0) == 0.0


def test_toy_colour_vector_lives_on_early_high_res_tokens(toy_red_blue):
    """The tutorial's layer × token-group result: at layer 3 nothing flips (the colour was read in layers 0–1);
    at layer 1 the high-res tiles alone flip it, the base tile alone does not."""
    assert max(_flips(toy_red_blue, 3, k) for k in (2.0, 3.0)) == 0.0
    assert max(_flips(toy_red_blue, 1, k, "highres") for k in (2.0, 3.0)) >= 0.75
    assert max(_flips(toy_red_blue, 1, k, "base") for k in (2.0, 3.0)) == 0.0
