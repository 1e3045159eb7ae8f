"""Attention knockout against references: a hand-masked HF forward (a 4D mask that blocks the same edges) and
HF's eager attention; an empty knockout leaves the logits bit-identical."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import vlens
from vlens.attention import knockout, knockout_mask

PROMPTS = ["<image>\nWhat is shown here in this picture?", "<image>\nhi"]


def noise(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())


@pytest.fixture(scope="module", params=["llava-next", "llava"])
def vlm(request):
    return vlens.tiny(family=request.param, seed=3)


@pytest.fixture(scope="module")
def batch(vlm):
    return vlm.prepare(PROMPTS, [noise(40, 32, 0), noise(32, 48, 1)], answers=["red", "blue"])


def hand_masked_logits(vlm, batch, block):
    """HF's own forward with a 4D bool mask (True = attend): causal, no padding keys, minus the blocked edges."""
    inputs = dict(batch.inputs)
    inputs["position_ids"] = vlm.family.position_ids(inputs)
    seq = batch.layout.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None]
    keys = inputs["attention_mask"].bool()[:, None, None, :]
    inputs["attention_mask"] = causal & keys & ~block
    with torch.no_grad():
        return vlm._module(**inputs).logits


@pytest.mark.parametrize("source,target", [("image", [-1]), ("image", "text"), ("prompt", "answer")])
def test_knockout_in_every_layer_equals_a_hand_masked_forward(vlm, batch, source, target):
    block = knockout_mask(batch, source, target)
    assert block.any()
    with torch.no_grad(), vlm.trace(batch):
        knockout(vlm, batch, source, target, layers=range(vlm.n_layers))
        logits = vlm.read("logits").save()
    real = ~batch.layout.pad
    ref = hand_masked_logits(vlm, batch, block)
    torch.testing.assert_close(logits[real], ref[real], rtol=1e-4, atol=1e-5)
    with torch.no_grad(), vlm.trace(batch):
        plain = vlm.read("logits").save()
    assert not torch.allclose(plain[real], logits[real])


def test_empty_knockout_is_bit_identical(vlm, batch):
    with torch.no_grad(), vlm.trace(batch):
        plain = vlm.read("logits").save()
    empty = torch.zeros(batch.layout.shape, dtype=torch.bool)
    with torch.no_grad(), vlm.trace(batch):
        knockout(vlm, batch, empty, "all", layers=range(vlm.n_layers))
        knockout(vlm, batch, "image", [-1], layers=[])
        logits = vlm.read("logits").save()
    assert torch.equal(plain, logits)


def test_knocked_out_pattern_matches_hf_eager_with_the_same_mask(vlm, batch):
    """Inside the window the pattern puts no weight on blocked keys, and equals HF eager under the 4D mask."""
    L = 1
    block = knockout_mask(batch, "image", [-1])
    with torch.no_grad(), vlm.trace(batch):
        knockout(vlm, batch, "image", [-1], layers=[0])
        knockout(vlm, batch, "image", [-1], layers=[L])
        p = vlm.read(f"pattern.{L}", queries=[-1]).save()
    last_image = p[:, :, 0][batch.layout.image[:, None, :].expand(-1, vlm.n_heads, -1)]
    assert float(last_image.abs().sum()) == 0.0
    torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)))
    model = vlm._module
    inputs = dict(batch.inputs)
    inputs["position_ids"] = vlm.family.position_ids(inputs)
    seq = batch.layout.shape[1]
    allowed = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None] & inputs["attention_mask"].bool()[:, None, None]
    inputs["attention_mask"] = torch.zeros(allowed.shape).masked_fill(~(allowed & ~block), torch.finfo().min)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            ref = model(**inputs, output_attentions=True).attentions[L][:, :, -1:]
    finally:
        model.set_attn_implementation("sdpa")
    torch.testing.assert_close(p, ref, rtol=1e-4, atol=1e-5)
