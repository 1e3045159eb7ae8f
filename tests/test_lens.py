"""The logit lens on image tokens and the vocabulary projection, on the toy model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vlens
from vlens.errors import InputError, NotFoundError
from vlens.lens import (
    first_layer, lens_figure, logit_lens, patch_grid, patch_values, project_on_vocab, region_tokens, token_ids,
    unembed, word_rate,
)
from vlens.toy.data import COLOURS, SHAPES, render


@pytest.fixture(scope="module")
def toy():
    return vlens.load("toy")


@pytest.fixture(scope="module")
def samples():
    return [vlens.toy.toy_dataset("heldout", n=40)[i] for i in range(40)]


def shape_region(meta: dict) -> torch.Tensor:
    """Pixels of the toy shape: the noiseless drawing differs from its background."""
    clean = np.asarray(render({**meta, "noise": 0.0}, 64)).astype(int)
    return torch.from_numpy(np.abs(clean - np.array(meta["bg_rgb"])).max(-1) > 30)


def test_last_layer_lens_is_the_model_output(toy, samples):
    b = toy.prepare([vlens.toy.QUESTION] * 2, [s.image for s in samples[:2]])
    lens = logit_lens(toy, b, k=3, tokens="image+prompt")
    with torch.no_grad(), toy.trace(b):
        logits = toy.read("logits").save()
    p = logits[b.layout.select("image+prompt")].float().softmax(-1).topk(3)
    assert torch.equal(lens.top_ids[-1], p.indices)
    assert torch.allclose(lens.top_probs[-1], p.values, atol=1e-5)
    assert lens.sites == [f"resid_post.{L}" for L in range(toy.n_layers)]
    assert len(lens.top_tokens(0)) == len(lens.positions) == int(b.layout.select("image+prompt").sum())


def test_unembed_is_differentiable_and_matches_the_head(toy):
    h = torch.randn(3, toy.d_model, requires_grad=True)
    out = unembed(toy, h)
    out[:, 5].sum().backward()
    assert out.shape == (3, toy.vocab_size) and h.grad is not None and h.grad.abs().sum() > 0
    with pytest.raises(InputError, match="width"):
        unembed(toy, torch.randn(2, toy.d_model + 1))


def test_project_on_vocab_finds_the_word_of_an_unembedding_row(toy):
    ids = token_ids(toy, ["red", "circle"])
    rows = toy._module.lm_head.weight[ids].detach()
    for norm in ("none", "module", "fold"):
        proj = project_on_vocab(toy, rows, k=5, norm=norm)
        assert [proj.top(i)[0][0] for i in range(2)] == ["red", "circle"]
        assert proj.top_values.shape == proj.bottom_values.shape == (2, 5)
        assert (proj.bottom_values[:, 0] <= proj.top_values[:, -1]).all()
    with pytest.raises(InputError):
        project_on_vocab(toy, torch.randn(2, 3, toy.d_model))
    with pytest.raises(InputError, match="norm must be"):
        project_on_vocab(toy, rows, norm=True)


def test_folded_projection_is_the_gain_times_the_unembedding(toy):
    """norm='fold' is (v ⊙ γ) · W_Uᵀ for an RMSNorm (sae-dashboard's logit weights); 'module' ranks the same."""
    torch.manual_seed(0)
    v = torch.randn(4, toy.d_model)
    gamma = toy._module.get_submodule(toy.modules.final_norm).weight.detach()
    ref = ((v * gamma) @ toy._module.lm_head.weight.detach().T).topk(6)
    fold, module = project_on_vocab(toy, v, k=6, norm="fold"), project_on_vocab(toy, v, k=6)
    assert torch.equal(fold.top_ids, ref.indices) and torch.allclose(fold.top_values, ref.values, rtol=1e-4, atol=1e-4)
    assert torch.equal(module.top_ids, ref.indices)


def test_tracked_words_and_errors(toy, samples):
    b = toy.prepare([vlens.toy.QUESTION], [samples[0].image])
    lens = logit_lens(toy, b, [0, "resid_post.5"], k=2, track=["red", "blue"])
    assert lens.sites == ["resid_pre.0", "resid_post.5"] and lens.tracked.shape == (2, 88, 2)
    assert torch.all(lens.tracked <= lens.top_probs[..., :1] + 1e-6)
    with pytest.raises(InputError, match="tokens under this tokenizer"):
        logit_lens(toy, b, track=["red circle"])
    with pytest.raises(InputError, match="k must be"):
        logit_lens(toy, b, k=0)
    with pytest.raises(InputError, match="not tracked"):
        word_rate(lens, token_ids(toy, ["red"]), among=token_ids(toy, ["red", "green"]))


def test_patch_geometry_of_the_toy_image(toy, samples):
    b = toy.prepare([vlens.toy.QUESTION], [samples[0].image])
    pos = torch.arange(b.layout.shape[1], dtype=torch.float32).expand(b.layout.shape)
    xs, ys, z = patch_grid(b.layout, pos, kind="base")
    assert z.shape == (4, 4) and xs.tolist() == [0, 16, 32, 48, 64]
    assert z[0].tolist() == [2, 3, 4, 5]                      # the base tile's first row of tokens
    xs, ys, z = patch_grid(b.layout, pos, kind="highres")
    assert z.shape == (8, 8) and not z.isnan().any()
    boxes, v = patch_values(b.layout, pos)
    assert len(v) == 80                                     # 16 base + 64 high-res; newlines have no box
    left = torch.zeros(64, 64, dtype=torch.bool)
    left[:, :32] = True
    assert int(region_tokens(b.layout, left).sum()) == 40
    with pytest.raises(InputError):
        patch_grid(b.layout, pos, kind="newline")
    with pytest.raises(NotFoundError):
        patch_grid(b.layout, pos, image=1)


def test_lens_figure_has_a_slider_and_both_tile_kinds(toy, samples):
    b = toy.prepare([vlens.toy.QUESTION], [samples[3].image])
    lens = logit_lens(toy, b, k=1)
    fig = lens_figure(lens, samples[3].image)
    assert [a.text for a in fig.layout.annotations] == ["base tile", "high-res tiles"]
    assert len(fig.layout.sliders[0].steps) == toy.n_layers
    heat = [t for t in fig.data if t.type == "heatmap"]
    assert len(heat) == 2 * toy.n_layers and sum(bool(t.visible) for t in heat) == 2
    assert set(heat[-1].text[0]) <= set(lens.vocab) | {""}


def test_colour_is_read_on_the_shape_patches_before_the_background(toy, samples):
    """The measurement of the tutorial: restricted to the colour words, shape patches decode to their class colour
    from resid_post.1 on; background patches stay near chance (0.2)."""
    b = toy.prepare([vlens.toy.QUESTION] * len(samples), [s.image for s in samples])
    cols = token_ids(toy, list(COLOURS))
    lens = logit_lens(toy, b, ["resid_pre.0"] + [f"resid_post.{L}" for L in range(toy.n_layers)], k=1,
                      track=cols + token_ids(toy, list(SHAPES)))
    on_shape, on_bg = [], []
    for i, s in enumerate(samples):
        region = shape_region(s.meta)
        word = token_ids(toy, [s.meta["colour"]])
        on_shape.append(word_rate(lens, word, region_tokens(b.layout, region, i, 0.5), among=cols))
        on_bg.append(word_rate(lens, word, region_tokens(b.layout, ~region, i, 1.0), among=cols))
    shape_rate, bg_rate = torch.stack(on_shape).mean(0), torch.stack(on_bg).mean(0)
    assert first_layer(shape_rate, 0.3) == 2                # resid_post.1
    assert first_layer(bg_rate, 0.3) is None
    assert (shape_rate[2:] > bg_rate[2:] + 0.04).all()
