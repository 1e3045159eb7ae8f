"""vlens.sae evaluation, modality analysis, dashboards and the in-trace splice on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

import vlens
import vlens.sae as vs
from vlens.activations import read_layers
from vlens.data import Sample
from vlens.errors import InputError
from vlens.prompts import QUESTION
from vlens.viz import heatmap_overlay

WORDS = ["a", "red", "green", "blue", "square", "circle", "on", "white"]


@pytest.fixture(scope="module")
def vlm():
    return vlens.tiny(words=WORDS)


@pytest.fixture(scope="module")
def samples():
    out = []
    for i, (color, shape) in enumerate([("red", "square"), ("green", "circle"), ("blue", "square"), ("red", "circle")]):
        img = Image.new("RGB", (32 + 8 * i, 32), color)
        out.append(Sample(img, caption=f"a {color} {shape} on white", id=i))
    return out


def _harvest(vlm, samples, layer):
    """Image + caption tokens at resid_pre.layer with modality codes (instruction tokens and BOS excluded)."""
    batch = vlm.prepare([QUESTION] * len(samples), [s.image for s in samples], answers=[s.caption for s in samples])
    sel = batch.layout.select("image+answer")
    return read_layers(vlm, batch, layer, tokens=sel, dtype=torch.float32)[layer], batch.layout.image[sel].long()


def test_evaluate_per_modality(vlm, samples):
    x, mod = _harvest(vlm, samples, 2)
    sae = vs.train((x, mod), "paper", d_sae=128, steps=30, batch_size=64, lr=1e-3, progress=False)
    r = vs.evaluate(sae, (x, mod))
    assert r["image"]["n_tokens"] == int(mod.sum()) and r["text"]["n_tokens"] == int((mod == 0).sum())
    assert r["overall"]["n_tokens"] == len(x)
    for g in ("overall", "image", "text"):
        assert math.isfinite(r[g]["explained_variance"]) and r[g]["l0"] >= 0 and 0 <= r[g]["dead"] <= 128
    # a perfect "SAE" explains everything: check the metric itself on a lossless identity-like map
    with torch.no_grad():
        f = sae.encode(x)
        ev_manual = 1 - (sae.decode(f) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert r["overall"]["explained_variance"] == pytest.approx(float(ev_manual), rel=1e-4)


def test_loss_recovered_identity_and_zero(vlm, samples):
    """An SAE that reconstructs exactly recovers 100%; one that outputs zeros recovers 0%."""
    from sae_lens.saes import StandardSAE, StandardSAEConfig

    d = vlm.d_model
    exact = StandardSAE(StandardSAEConfig(d_in=d, d_sae=2 * d, apply_b_dec_to_input=False))  # any SAE-Lens SAE
    with torch.no_grad():  # f = relu([x, -x]), x_hat = f_+ - f_- = x
        exact.W_enc.data = torch.cat([torch.eye(d), -torch.eye(d)], 1)
        exact.b_enc.data.zero_()
        exact.W_dec.data = torch.cat([torch.eye(d), -torch.eye(d)], 0)
        exact.b_dec.data.zero_()
    r = vs.loss_recovered(vlm, exact, 2, samples, progress=False, batch_size=2)
    for g in ("overall", "image", "text"):
        assert r[g]["loss_recovered"] == pytest.approx(1.0, abs=1e-4), r
        assert r[g]["ce_zero"] != pytest.approx(r[g]["ce_clean"])
    dead = StandardSAE(StandardSAEConfig(d_in=d, d_sae=8))
    with torch.no_grad():
        for p in dead.parameters():
            p.zero_()
    r0 = vs.loss_recovered(vlm, dead, 2, samples, progress=False)
    assert r0["overall"]["loss_recovered"] == pytest.approx(0.0, abs=1e-4)
    assert r0["overall"]["n_tokens"] == sum(len(s.caption.split()) for s in samples)


def test_modality_analysis_over_layers(vlm, samples):
    saes = {}
    for layer in range(vlm.n_layers):
        x, mod = _harvest(vlm, samples, layer)
        saes[layer] = vs.train((x, mod), "paper", d_sae=64, steps=10, batch_size=64, progress=False)
    table = vs.sharing_by_layer(saes)
    assert sorted(table) == list(range(vlm.n_layers))
    for fr in table.values():
        assert fr["image"] + fr["text"] + fr["shared"] == pytest.approx(1.0) or fr["dead"] == 1.0
    fig = vs.plot_sharing_by_layer(saes)
    assert list(fig.data[0].x) == list(range(vlm.n_layers))
    assert list(fig.data[0].y) == [table[layer]["shared"] for layer in range(vlm.n_layers)]
    hist = vs.plot_modality_histogram(saes)
    assert len(hist.data) == vlm.n_layers
    rows = vs.modality_table(saes[1])
    assert len(rows) == 64 and {r["kind"] for r in rows} <= {"image", "text", "shared", "dead"}


def test_modality_score_definition():
    acts = torch.tensor([[2.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 3.0, 1.0, 0.0], [0.0, 0.0, 3.0, 0.0]])
    mod = torch.tensor([1, 1, 0, 0])
    st = vs.ModalityStats.from_activations(acts, mod)
    assert st.freq_image.tolist() == [0.5, 0.0, 1.0, 0.0]
    assert st.mean_text.tolist() == [0.0, 1.5, 2.0, 0.0]
    assert st.score[0] == 1.0 and st.score[1] == 0.0 and st.score[2] == pytest.approx(1 / 3)
    assert math.isnan(st.score[3])
    assert st.kind() == ["image", "text", "shared", "dead"]
    assert st.fractions() == {"image": 1 / 3, "text": 1 / 3, "shared": 1 / 3, "dead": 0.25}


def test_dashboard_pages(vlm, samples, tmp_path):
    x, mod = _harvest(vlm, samples, 2)
    sae = vs.train((x, mod), "paper", d_sae=32, steps=10, batch_size=64, progress=False)
    alive = sae.modality.alive.nonzero().flatten()[:3].tolist()
    index = vs.dashboard(sae, vlm, samples, tmp_path, layer=2, latents=alive, top_k=3, progress=False)
    text = index.read_text()
    for i in alive:
        assert f"latent_{i}.html" in text
        page = (tmp_path / f"latent_{i}.html").read_text()
        assert "modality score" in page and "Top images" in page and "plotly" in page.lower()
    assert (tmp_path / "plotly.min.js").exists()
    img = heatmap_overlay(Image.new("RGB", (40, 20)), torch.tensor([[0.0, 0.0, 20.0, 20.0], [float("nan")] * 4]),
                             torch.tensor([2.0, 5.0]), vmax=2.0)
    px = img.resize((40, 20)).getpixel((5, 5))
    assert px[0] > 100 and img.resize((40, 20)).getpixel((35, 5)) == (0, 0, 0)


def test_dashboard_attribution_maps(vlm, samples, tmp_path):
    """With `attribution`, every top image also shows gradient × activation of the latent at the earlier site."""
    x, mod = _harvest(vlm, samples, 2)
    sae = vs.train((x, mod), "paper", d_sae=32, steps=10, batch_size=64, progress=False,
                   hook_name=vlm.hook_name("resid_pre.2"))
    alive = sae.modality.alive.nonzero().flatten()[:2].tolist()
    vs.dashboard(sae, vlm, samples, tmp_path, latents=alive, top_k=3, attribution="resid_pre.0", progress=False)
    for i in alive:
        page = (tmp_path / f"latent_{i}.html").read_text()
        assert page.count('class="attr"') == page.count("<figcaption>max") > 0
        assert "gradient × activation at <code>resid_pre.0</code>" in page
    with pytest.raises(InputError, match="must come before"):
        vs.dashboard(sae, vlm, samples, tmp_path, latents=alive, attribution="resid_post.2", progress=False)


def test_sae_inside_a_trace(vlm, samples):
    """encode/decode on a residual read inside an nnsight trace, written back at the image positions."""
    x, mod = _harvest(vlm, samples, 1)
    sae = vs.train((x, mod), "paper", d_sae=64, steps=5, batch_size=64, progress=False)
    batch = vlm.prepare([QUESTION], [samples[0].image])
    with torch.no_grad(), vlm.trace(batch):
        h = vlm.resid_pre(1)
        feats = sae.encode(h[batch.layout.image]).save()
        new = h.clone()
        new[batch.layout.image] = sae.decode(feats)
        vlm.write("resid_pre.1", new)
        out = vlm.read("logits").save()
    assert feats.shape == (int(batch.layout.image.sum()), 64) and torch.isfinite(out).all()
