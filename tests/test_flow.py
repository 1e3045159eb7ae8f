"""vlens.flow against references: HF forwards with a hand-built 4D mask (knockout sweeps), HF's eager
`output_attentions` (attention to the image, patch maps), HF's own modules with plain torch hooks (head ablation) and
the RMSNorm formula written out (direct logit attribution)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import vlens
from vlens.attention import knockout_mask
from vlens.flow import head_attribution, image_attention, knockout_sweep, last, patch_attention
from vlens.scoring import answer_logprob

WORDS = ["red", "blue", "square", "circle"]


def noise(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())


@pytest.fixture(scope="module", params=["llava-next", "gemma3"])
def vlm(request):
    return vlens.tiny(family=request.param, words=WORDS, seed=6)


@pytest.fixture(scope="module")
def batch(vlm):
    return vlm.prepare(["<image>\nWhat is it?", "<image>\nWhat colour?"], [noise(40, 32, 0), noise(32, 48, 1)],
                       answers=["red square", "blue"])


def hf_inputs(vlm, batch, block=None, eager=False):
    inputs = dict(batch.inputs)
    pos = vlm.family.position_ids(inputs)
    if pos is not None:
        inputs["position_ids"] = pos
    if block is not None:
        seq = batch.layout.shape[1]
        allowed = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None] & \
            inputs["attention_mask"].bool()[:, None, None]
        if vlm.family.name == "gemma3":  # Gemma 3's image tokens see each other both ways
            img = batch.layout.image
            allowed = allowed | (img[:, None, :, None] & img[:, None, None, :])
        allowed = allowed & ~block
        inputs["attention_mask"] = allowed if not eager else \
            torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo().min)
    return inputs


def answer_prob(logits, batch):
    lp, _ = answer_logprob(logits, batch.layout.input_ids, batch.layout.answer)
    return lp.exp()


def test_sweep_over_every_layer_equals_a_hand_masked_forward(vlm, batch):
    if vlm.family.name == "gemma3":
        pytest.skip("Gemma 3 builds its own mask from token types; a 4D mask replaces it (checked on llava-next)")
    s = knockout_sweep(vlm, batch, {"image -> last": ("image", last), "q -> last": ("prompt", last)},
                       window=vlm.n_layers)
    with torch.no_grad():
        clean = vlm._module(**hf_inputs(vlm, batch)).logits
        for i, (src, dst) in enumerate([("image", last), ("prompt", last)]):
            ref = vlm._module(**hf_inputs(vlm, batch, knockout_mask(batch, src, dst))).logits
            torch.testing.assert_close(s.prob[i, 0], answer_prob(ref, batch), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(s.clean_prob, answer_prob(clean, batch), rtol=1e-4, atol=1e-6)


def test_sweep_windows_equal_knockout_in_those_layers(vlm, batch):
    s = knockout_sweep(vlm, batch, {"image -> last": ("image", last)}, window=2)
    assert s.windows == [(L, L + 1) for L in range(vlm.n_layers - 1)]
    from vlens.attention import knockout

    for w, (a, b) in enumerate(s.windows):
        with torch.no_grad(), vlm.trace(batch):
            knockout(vlm, batch, "image", last, layers=range(a, b + 1))
            logits = vlm.read("logits").save()
        torch.testing.assert_close(s.prob[0, w], answer_prob(logits, batch), rtol=1e-4, atol=1e-6)
    fig = s.figure()
    assert len(fig.data) == 1 and len(fig.data[0].x) == len(s.windows)


@pytest.fixture(scope="module")
def eager_attentions(vlm, batch):
    model = vlm._module
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(**hf_inputs(vlm, batch), output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")


def test_image_attention_against_hf_eager(vlm, batch, eager_attentions):
    got = image_attention(vlm, batch)
    q = last(batch.layout).float()
    lay = batch.layout
    for L, att in enumerate(eager_attentions):
        for j, mask in enumerate([lay.kind_mask("base"), lay.kind_mask("highres"), lay.kind_mask("newline"),
                                  lay.image]):
            share = (att * mask[:, None, None, :]).sum(-1)  # [b, h, q]
            want = (share * q[:, None, :]).sum((0, 2)) / q.sum()
            torch.testing.assert_close(got[L, :, j], want, rtol=1e-4, atol=1e-5)


def test_patch_attention_against_hf_eager(vlm, batch, eager_attentions):
    L, h = 1, 2
    got = patch_attention(vlm, batch, L, head=h, queries=[-1])
    torch.testing.assert_close(got, eager_attentions[L][:, h, -1], rtol=1e-4, atol=1e-5)
    mean = patch_attention(vlm, batch, L, queries=[-1])
    torch.testing.assert_close(mean, eager_attentions[L][:, :, -1].mean(1), rtol=1e-4, atol=1e-5)


def test_head_ablation_against_a_torch_hook(vlm, batch):
    r = head_attribution(vlm, batch)
    L, h, dh = 1, 1, vlm.d_head
    o_proj = vlm._module.model.language_model.layers[L].self_attn.o_proj

    def zero_head(module, args):
        x = args[0].clone()
        x[..., h * dh:(h + 1) * dh] = 0
        return (x,)

    handle = o_proj.register_forward_pre_hook(zero_head)
    try:
        with torch.no_grad():
            ablated = vlm._module(**hf_inputs(vlm, batch)).logits
    finally:
        handle.remove()
    with torch.no_grad():
        clean = vlm._module(**hf_inputs(vlm, batch)).logits
    ids, ans = batch.layout.input_ids, batch.layout.answer
    delta = (answer_logprob(ablated, ids, ans)[0] - answer_logprob(clean, ids, ans)[0]).sum() / ans.sum()
    torch.testing.assert_close(r["ablation"][L, h], delta.float(), rtol=1e-3, atol=1e-5)


def test_heads_dla_add_up_to_the_attention_block_through_the_frozen_final_norm(vlm, batch):
    """Σ_h DLA(h) at layer L == W_U[answer] · (γ ⊙ attn_out_L / rms(final residual)), γ written out per family."""
    r = head_attribution(vlm, batch, ablate=False)
    n = vlm.n_layers
    outs = []
    with torch.no_grad(), vlm.trace(batch):
        for L in range(n):
            outs.append(vlm.read(f"attn_out.{L}").save())
        final = vlm.read(f"resid_post.{n - 1}").save()
    norm = vlm._module.model.language_model.norm
    gamma = (1 + norm.weight) if vlm.family.name == "gemma3" else norm.weight  # Gemma's RMSNorm scales by 1 + w
    eps = norm.eps if hasattr(norm, "eps") else norm.variance_epsilon
    pos = last(batch.layout)
    target = batch.layout.input_ids[:, 1:][pos[:, :-1]]
    rms = final[pos].pow(2).mean(-1, keepdim=True).add(eps).sqrt()
    u = vlm._module.lm_head.weight[target] * gamma / rms
    for L in range(n):
        want = (outs[L][pos] * u).sum(-1).mean()
        torch.testing.assert_close(r["dla"][L].sum(), want.float(), rtol=1e-4, atol=1e-5)
