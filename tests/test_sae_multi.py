"""`vlens.sae.train_many`: several SAEs from one streaming pass, checked against harvest-then-train."""

from __future__ import annotations

import pytest
import torch

import vlens
import vlens.sae as vs
from vlens.activations import harvest
from vlens.data import Sample
from vlens.errors import InputError, SiteError
from vlens.sae.evals import evaluate
from vlens.sae.training.buffer import ShuffleBuffer
from vlens.sae.training.multi import STREAM_FILE, train_many

STREAM = dict(tokens="image+answer", captions=True, text_only=True)
WORDS = ["a", "red", "green", "blue", "square", "circle", "big", "small"]


@pytest.fixture(scope="module")
def vlm():
    return vlens.tiny(words=WORDS)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    from PIL import Image

    out = []
    for i in range(6):
        pixels = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        caption = " ".join([WORDS[i % 3 + 1], WORDS[4 + i % 2], WORDS[6 + i % 2]][: 2 + i % 2])
        out.append(Sample(Image.fromarray(pixels), label=i % 2, caption=caption, id=f"s{i}"))
    return out


@pytest.fixture(scope="module")
def store(vlm, data, tmp_path_factory):
    return harvest(vlm, data, layers=[1, 3], out=tmp_path_factory.mktemp("store"), batch_size=4, progress=False,
                   **STREAM)


def _same(a, b, exact=False):
    for k, v in a.state_dict().items():
        w = b.state_dict()[k]
        assert (torch.equal(v, w) if exact else torch.allclose(v, w, rtol=1e-4, atol=1e-5)), k


def test_equals_harvest_then_train_without_shuffling(vlm, data, store):
    n = len(store.activations(1))
    k = next(k for k in range(12, 3, -1) if n % k == 0)  # steps = one epoch, scale from exactly every row
    bs = n // k
    kw = dict(steps=k, batch_size=bs, n_norm_batches=k, shuffle=False, d_sae=96, log_every=1)
    specs = {1: "paper", "l3-topk": {"site": 3, "preset": "topk", "k": 6}}
    many = train_many(vlm, data, specs, forward_batch_size=4, progress=False, **STREAM, **kw)
    assert list(many) == ["resid_pre.1", "l3-topk"]
    single = {"resid_pre.1": vs.train(store, "paper", layer=1, progress=False, **kw),
              "l3-topk": vs.train(store, "topk", layer=3, k=6, progress=False, **kw)}
    for name, sae in many.items():
        ref = single[name]
        _same(sae, ref)
        meta, rmeta = sae.cfg.metadata, ref.cfg.metadata
        assert (meta.hook_name, meta.model_name) == (rmeta.hook_name, vlm.name)
        tr, rtr = meta.vlens_training, rmeta.vlens_training
        assert (tr["steps"], tr["tokens"], tr["mix"]) == (rtr["steps"], rtr["tokens"], rtr["mix"])
        assert tr["activation_scale"] == pytest.approx(rtr["activation_scale"], rel=1e-6)
        assert tr["config"] == rtr["config"]
        m, rm = sae.modality, ref.modality
        assert (m.n_image, m.n_text) == (rm.n_image, rm.n_text) and m.n_text > 0
        for f in ("freq_image", "freq_text", "mean_image", "mean_text"):
            assert torch.allclose(getattr(m, f), getattr(rm, f), atol=1e-5), f


def test_quality_with_shuffling_matches_single_training(vlm, data, store):
    kw = dict(steps=50, batch_size=64, d_sae=192, lr=3e-3)
    many = train_many(vlm, data, {1: "topk"}, k=8, forward_batch_size=6, buffer=256, progress=False, **STREAM, **kw)
    ref = vs.train(store, "topk", layer=1, k=8, progress=False, **kw)
    ev = {name: evaluate(s, store, layer=1)["overall"]["explained_variance"]
          for name, s in (("many", many["resid_pre.1"]), ("single", ref))}
    assert ev["single"] > 0.5
    assert abs(ev["many"] - ev["single"]) < 0.05, ev


RESUME = dict(steps=14, batch_size=24, buffer=72, d_sae=64, log_every=1, checkpoint_every=4, progress=False, n_norm_batches=2,
              forward_batch_size=2, stats_tokens=50, **STREAM)
SPECS = {2: "paper", "wide": {"site": 2, "preset": "topk", "k": 4, "d_sae": 128, "batch_size": 16, "steps": 20},
         "resid_post.3": {"preset": "jumprelu", "seed": 3}}


@pytest.fixture(scope="module")
def straight(vlm, data):
    return train_many(vlm, data, SPECS, **RESUME)


@pytest.mark.parametrize("how", ["ctrl-c", "crash"])
def test_resume_is_bit_identical(vlm, data, tmp_path, how, straight):

    def boom(name, step, metrics):
        if name == "wide" and step == 15:
            raise KeyboardInterrupt if how == "ctrl-c" else RuntimeError("power cut")

    with pytest.raises(KeyboardInterrupt if how == "ctrl-c" else RuntimeError):
        train_many(vlm, data, SPECS, checkpoint_dir=tmp_path, callback=boom, **RESUME)
    assert (tmp_path / STREAM_FILE).exists() and (tmp_path / "wide").is_dir()
    resumed = train_many(vlm, data, SPECS, checkpoint_dir=tmp_path, **RESUME)
    assert list(resumed) == ["resid_pre.2", "wide", "resid_post.3"]
    for name in straight:
        _same(resumed[name], straight[name], exact=True)
        assert resumed[name].cfg.metadata.vlens_training["mix"] == straight[name].cfg.metadata.vlens_training["mix"]
    again = train_many(vlm, data, SPECS, checkpoint_dir=tmp_path, **RESUME)  # finished: returns the same SAEs
    _same(again["wide"], straight["wide"], exact=True)
    with pytest.raises(InputError, match=r"buffer.*72.*80"):
        train_many(vlm, data, SPECS, checkpoint_dir=tmp_path, **{**RESUME, "buffer": 80})
    with pytest.raises(InputError, match=r"sample_keys"):
        train_many(vlm, data[::-1], SPECS, checkpoint_dir=tmp_path, **RESUME)
    with pytest.raises(InputError, match=r"lr: checkpoint has"):
        train_many(vlm, data, SPECS, checkpoint_dir=tmp_path, **{**RESUME, "lr": 0.5})


def test_shuffle_buffer_is_seeded_and_bounded():
    x = torch.arange(400.).reshape(100, 4)

    def draws(seed):
        buf = ShuffleBuffer(d=4, capacity=30, seed=seed)
        got = []
        for i in range(0, 100, 10):
            buf.add(x[i:i + 10], torch.ones(10))
            assert len(buf) < 30 + 10  # capacity + one forward's rows
            while buf.ready(8):
                got.append(buf.take(8)[0][:, 0])
            assert len(buf) < 30
        return torch.cat(got)

    a, b = draws(0), draws(0)
    assert torch.equal(a, b) and not torch.equal(a, draws(1))
    assert len(set(a.tolist())) == len(a)  # drawn without replacement
    assert not torch.equal(a, torch.sort(a).values)


@pytest.mark.parametrize("saes, kw, error, match", [
    ({"resid_mid.3": "paper"}, {}, SiteError, r"resid_mid\.3"),
    ({99: "paper"}, {}, SiteError, r"99"),
    ({"vision.0": "paper"}, {}, InputError, r"one vector per token"),
    ({1: "nope"}, {}, InputError, r"SAE 'resid_pre\.1': unknown preset 'nope'"),
    ({1: {"preset": "topk", "k": 500}}, {}, InputError, r"k=500"),
    ({1: {"preset": "paper", "lr_typo": 1.0}}, {}, InputError, r"lr_typo"),
    ({1: "paper"}, {"steps": None}, InputError, r"steps=\.\.\. or n_tokens="),
    ({1: "paper"}, {"buffer": 10}, InputError, r"buffer=10 rows cannot hold one batch of 32"),
    ([1, (1, "topk"), {"site": 2, "preset": "topk"}], {}, None, None),
    ({"a b": {"site": 1}}, {}, InputError, r"names a checkpoint folder"),
    ({}, {}, InputError, r"saes is empty"),
    ([{"preset": "topk"}], {}, InputError, r"names no site"),
    ({1: "paper"}, {"tokens": "imagez"}, Exception, r"imagez"),
    ({1: "paper"}, {"forward_batch_size": 0}, InputError, r"forward_batch_size"),
    ({1: "paper"}, {"prompt": "no image here"}, InputError, r"<image>"),
])
def test_bad_arguments_fail_before_any_forward(vlm, data, monkeypatch, saes, kw, error, match):
    import vlens.activations.stream as stream  # the pass over the data reads every forward through read_layers

    def no_forward(*a, **k):
        raise AssertionError("a forward ran")

    monkeypatch.setattr(stream, "read_layers", no_forward)
    args = {"steps": 2, "batch_size": 32, "d_sae": 64, "progress": False, **kw}
    if error is None:  # a valid run: the names, then the forward (patched out)
        with pytest.raises(AssertionError, match="a forward ran"):
            train_many(vlm, data, saes, **args)
        return
    with pytest.raises(error, match=match):
        train_many(vlm, data, saes, **args)
    with pytest.raises(InputError, match="saes must be a dict"):
        train_many(vlm, data, "resid_pre.1", steps=2)
