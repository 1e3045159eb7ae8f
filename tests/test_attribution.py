"""Attribution on the toy model, with the faithfulness checks of issue 17."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr

import vlens
from vlens.attribution import (
    Target, activation_patching, answer_target, attribution_patching, direction_target, grad_x_act,
    integrated_gradients, occlusion, occlusion_check, pixel_saliency, probe_target, sae_target, token_target,
)
from vlens.errors import InputError
from vlens.probes import LinearProbe
from vlens.toy.data import render

Q = vlens.toy.QUESTION
OTHER_SHAPE = {"circle": "square", "square": "circle", "triangle": "cross", "cross": "triangle"}


@pytest.fixture(scope="module")
def toy():
    return vlens.load("toy")


@pytest.fixture(scope="module")
def data():
    return vlens.toy.toy_dataset("heldout", n=20)


def pictures(data, i):
    """Sample i of the held-out split drawn three ways with the same pixel noise: as is, with the other shape of the
    pair (circle/square, triangle/cross) and without its shape; plus its class name."""
    m = data[i].meta
    draw = lambda **kw: render({**m, **kw}, 64, data.rng(i))  # noqa: E731
    return draw(), draw(shape=OTHER_SHAPE[m["shape"]]), draw(r=0.0), vlens.toy.CLASS_NAMES[data[i].label]


def test_gradients_flow_through_the_trace_without_changing_the_forward(toy, data):
    clean, _, _, name = pictures(data, 0)
    b = toy.prepare([Q], [clean], answers=[name])
    with torch.no_grad(), toy.trace(b):
        ref = toy.read("logits").save()
    with torch.enable_grad(), toy.trace(b):             # the pattern of vlens.attribution, in plain nnsight
        x = toy.read("resid_pre.3").detach().clone().requires_grad_(True)
        toy.write("resid_pre.3", x)
        logits = toy.read("logits")
        out = logits.detach().save()
        y = logits[0, -2, toy.tokenizer.convert_tokens_to_ids(data[0].meta["shape"])]
        with y.backward(inputs=[x]):
            g = x.grad.save()
    assert torch.equal(out, ref)
    assert g.shape == (*out.shape[:2], toy.d_model) and g.abs().sum() > 0
    assert all(p.grad is None for p in toy._module.parameters())
    target = token_target(data[0].meta["shape"], position=-2)
    a = grad_x_act(toy, b, target, site=3)
    assert float(a.target[0]) == float(ref[0, -2, toy.tokenizer.convert_tokens_to_ids(data[0].meta["shape"])])


def test_integrated_gradients_completeness(toy, data):
    clean, _, blank, name = pictures(data, 1)
    b = toy.prepare([Q], [clean], answers=[name])
    colour = token_target(data[1].meta["colour"], position=-3)
    ig = integrated_gradients(toy, b, colour, site=0, baseline=toy.prepare([Q], [blank], answers=[name]),
                              steps=128, batch_size=65)
    assert float(ig.target - ig.reference) > 10                # removing the shape removes the colour
    assert ig.completeness_error < 0.01
    assert "another image" in ig.note and ig.per_token().shape == (88,)
    mean = integrated_gradients(toy, b, colour, site=3, baseline="mean", steps=16, batch_size=18)
    assert mean.completeness_error < 0.01


def test_attribution_patching_agrees_with_activation_patching(toy, data):
    """Per image, the rank correlation of the two maps over the 80 patch tokens at the middle layer (resid_pre.3),
    for clean / other-shape pairs and the shape word's logit; the mean over the first 8 held-out images."""
    rhos = []
    for i in range(8):
        clean, corrupt, _, name = pictures(data, i)
        b, bc = toy.prepare([Q], [clean], answers=[name]), toy.prepare([Q], [corrupt], answers=[name])
        shape = token_target(data[i].meta["shape"], position=-2)
        atp = attribution_patching(toy, b, bc, shape, site=3, tokens="base+highres")
        true = activation_patching(toy, b, bc, shape, site=3, tokens="base+highres", batch_size=80)
        assert torch.equal(atp.target, true.target) and float(atp.reference) < float(atp.target)
        rhos.append(spearmanr(atp.per_token(), true.per_token()).statistic)
    assert np.mean(rhos) >= 0.8, rhos


def test_occluding_the_most_attributed_patches_hurts_far_more(toy, data):
    tops, randoms = [], []
    for i in range(0, 20, 5):
        clean, _, blank, name = pictures(data, i)
        b = toy.prepare([Q], [clean], answers=[name])
        colour = token_target(data[i].meta["colour"], position=-3)
        ig = integrated_gradients(toy, b, colour, site=0, baseline=toy.prepare([Q], [blank], answers=[name]),
                                  steps=32, batch_size=34)
        r = occlusion_check(toy, Q, clean, colour, ig, k=16, answer=name, fill="median")
        tops.append(r["top"])
        randoms.append(r["random"])
    assert sum(tops) / sum(randoms) > 10, (tops, randoms)


def test_occlusion_and_pixel_saliency_give_patch_maps(toy, data):
    clean, _, _, name = pictures(data, 2)
    colour = token_target(data[2].meta["colour"], position=-3)
    occ = occlusion(toy, Q, clean, colour, answer=name, tokens="base", fill="median")
    assert int(occ.tokens.sum()) == 16 and occ.patch_map(kind="base")[2].shape == (4, 4)
    b = toy.prepare([Q], [clean], answers=[name])
    sal = pixel_saliency(toy, b, colour)
    assert sal.pixels.shape == (5, 32, 32) and "not differentiable" in sal.note
    assert torch.isclose(sal.values[0, b.layout.kind_mask("highres")[0]].sum(), sal.pixels[1:].sum(), rtol=1e-4)
    span, pv = b.layout.images[0], b.inputs["pixel_values"][0].cpu()   # each token's block is its box's pixels
    ip = toy.processor.image_processor
    pixels = (pv * torch.tensor(ip.image_std)[:, None, None] + torch.tensor(ip.image_mean)[:, None, None]) * 255
    g, img = span.geometry, torch.from_numpy(np.array(clean)).permute(2, 0, 1).float()
    for i in (g.kind == 1).nonzero()[:, 0].tolist():
        t, r, c = int(g.tile[i]), int(g.row[i]), int(g.col[i])
        x0, y0, x1, y1 = (int(v) for v in g.box[i])
        assert (pixels[t, :, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8] - img[:, y0:y1, x0:x1]).abs().max() < 1e-3
    assert isinstance(sal.overlay(clean, sign="abs"), Image.Image)
    assert occ.box_scores(torch.tensor([[0.0, 0.0, 64.0, 64.0]]))[0].isclose(occ.per_token().sum())


def test_probe_sae_and_direction_targets(toy, data):
    clean, _, _, name = pictures(data, 3)
    b = toy.prepare([Q], [clean], answers=[name])
    torch.manual_seed(0)
    probe = LinearProbe(torch.randn(3, toy.d_model), torch.zeros(3), "softmax", torch.tensor([0, 4, 7]))

    class SAE:  # duck typing: encode and W_dec
        W_dec = torch.randn(32, toy.d_model)

        def encode(self, x):
            return torch.relu(x @ self.W_dec.T)

    for target in (probe_target(probe, "resid_post.4", label=4), sae_target(SAE(), "resid_post.4", latent=3),
                   direction_target(torch.randn(toy.d_model), "resid_post.4"), answer_target("logit"),
                   Target(lambda vlm, batch: vlm.read("logits")[:, -1, 5], name="custom")):
        a = grad_x_act(toy, b, target, site=2)
        assert a.values.abs().sum() > 0 and a.values[~b.layout.image].abs().sum() == 0, target.name
    with pytest.raises(InputError, match="does not run after"):
        grad_x_act(toy, b, sae_target(SAE(), "resid_post.1", latent=3), site=3)
    with pytest.raises(InputError, match="classes"):
        probe_target(probe, 4, label=2)


def test_bad_inputs_name_the_fix(toy, data):
    clean, _, _, name = pictures(data, 4)
    two = toy.prepare([Q] * 2, [clean] * 2, answers=[name] * 2)
    one = toy.prepare([Q], [clean], answers=[name])
    with pytest.raises(InputError, match="one-row"):
        integrated_gradients(toy, two, answer_target(), baseline="mean")
    with pytest.raises(InputError, match="same tokens"):
        attribution_patching(toy, one, toy.prepare([Q], [clean], answers=["blue square"]), answer_target(), site=2)
    with pytest.raises(InputError, match="baseline must be"):
        integrated_gradients(toy, one, answer_target(), baseline=3.0)
    with pytest.raises(InputError, match="needs answers"):
        grad_x_act(toy, toy.prepare([Q], [clean]), answer_target())


def test_grad_x_act_at_the_heads_equals_torch_autograd_through_hf(toy, data):
    """At z.L (the heads before o_proj) gradient × activation is HF's own: a leaf put in o_proj's input with a plain
    torch pre-hook, the logit's gradient by autograd, summed over heads × d_head."""
    clean, _, _, name = pictures(data, 2)
    b = toy.prepare([Q], [clean], answers=[name])
    tok = toy.tokenizer.convert_tokens_to_ids(data[2].meta["shape"])
    a = grad_x_act(toy, b, token_target(data[2].meta["shape"], position=-2), site="z.2", tokens="image")
    o_proj = toy.hf_model.model.language_model.layers[2].self_attn.o_proj
    leaf = {}

    def pre(mod, args):
        leaf["x"] = args[0].detach().clone().requires_grad_(True)
        return (leaf["x"],)

    handle = o_proj.register_forward_pre_hook(pre)
    try:
        with torch.enable_grad():
            logits = toy.hf_model(**dict(b.inputs)).logits
            g, = torch.autograd.grad(logits[0, -2, tok], leaf["x"])
    finally:
        handle.remove()
    ref = (leaf["x"].detach() * g).sum(-1) * b.layout.image
    torch.testing.assert_close(a.values, ref, rtol=1e-4, atol=1e-6)
    assert float(a.values.abs().sum()) > 0
