"""Sites inside a layer (attn_out, mlp_in, mlp_out, z, pattern) for every family, checked against HF itself:
the residual identity against HF's hidden states, patterns against HF's eager `output_attentions`, heads through
HF's own `o_proj` and the MLP through HF's own module."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import vlens

FAMILIES = ["llava-next", "llava", "llava-onevision", "qwen2.5-vl", "qwen3-vl", "gemma3"]
IN_LAYER = ["resid_pre", "pattern", "z", "attn_out", "mlp_in", "mlp_out", "resid_post"]
# a long prompt: Gemma 3's tiny build has a 32-token sliding window on its even layers
PROMPTS = ["<image>\nWhat is shown here in this picture, tell me in many many words please now?", "<image>\nhi"]


def noise(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())


@pytest.fixture(scope="module", params=FAMILIES)
def vlm(request):
    return vlens.tiny(family=request.param, seed=2)


@pytest.fixture(scope="module")
def batch(vlm):
    return vlm.prepare(PROMPTS, [noise(40, 32, 0), noise(32, 48, 1)])


def hf_inputs(vlm, batch) -> dict:
    inputs = dict(batch.inputs)
    pos = vlm.family.position_ids(inputs)
    if pos is not None:
        inputs["position_ids"] = pos
    return inputs


def layer(vlm, L):
    return vlm._module.model.language_model.layers[L]


def read_all(vlm, batch):
    got = {}
    with torch.no_grad(), vlm.trace(batch):
        for L in range(vlm.n_layers):
            for k in IN_LAYER:
                got[f"{k}.{L}"] = vlm.read(f"{k}.{L}").save()
    return got


@pytest.fixture(scope="module")
def sites(vlm, batch):
    return read_all(vlm, batch)


def test_residual_identity_against_hf_hidden_states(vlm, batch, sites):
    with torch.no_grad():
        hs = vlm._module(**hf_inputs(vlm, batch), output_hidden_states=True).hidden_states
    n = vlm.n_layers
    for L in range(n):
        total = sites[f"resid_pre.{L}"] + sites[f"attn_out.{L}"] + sites[f"mlp_out.{L}"]
        # HF's last hidden state is after the final norm
        ref = hs[L + 1] if L < n - 1 else sites[f"resid_post.{L}"]
        torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-5)
        # Qwen3-VL adds deepstack visual features to the image tokens between its first layers, after HF records
        # a layer's output: there the next layer's input is not HF's hidden state
        if vlm.family.name != "qwen3-vl":
            torch.testing.assert_close(sites[f"resid_pre.{L}"], hs[L])


@pytest.fixture(scope="module")
def eager(vlm, batch):
    """HF's own eager attention weights (`output_attentions`), per layer."""
    model = vlm._module
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(**hf_inputs(vlm, batch), output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")


def test_pattern_equals_hf_eager_attentions(vlm, batch, sites, eager):
    ref = eager
    keep = ~batch.layout.pad  # left-padded query rows attend to nothing real: compare the real rows
    for L in range(vlm.n_layers):
        p = sites[f"pattern.{L}"]
        assert p.shape == ref[L].shape
        for r in range(len(batch)):
            q = keep[r]
            torch.testing.assert_close(p[r][:, q][:, :, q], ref[L][r][:, q][:, :, q], rtol=1e-4, atol=1e-5)
            rows = p[r][:, q]
            torch.testing.assert_close(rows.sum(-1), torch.ones_like(rows.sum(-1)))
            assert float(rows[..., ~q].abs().sum()) == 0.0  # no weight on padding


def test_chosen_query_rows_equal_hf_eager_rows(vlm, batch, eager):
    """Rows read with queries= (the last position, a middle one, an image token) are HF eager's rows."""
    image_pos = int(batch.layout.image[0].nonzero()[0])
    rows = [-1, batch.layout.shape[1] // 2, image_pos]
    got = []
    with torch.no_grad(), vlm.trace(batch):
        for L in range(vlm.n_layers):
            got.append(vlm.read(f"pattern.{L}", queries=rows).save())
    idx = torch.tensor(rows) % batch.layout.shape[1]
    for L in range(vlm.n_layers):
        assert got[L].shape == (len(batch), vlm.n_heads, len(rows), batch.layout.shape[1])
        torch.testing.assert_close(got[L][0], eager[L][0][:, idx], rtol=1e-4, atol=1e-5)  # row 0 is not padded
        torch.testing.assert_close(got[L][1][:, 0], eager[L][1][:, -1], rtol=1e-4, atol=1e-5)  # the last row


def test_pattern_is_causal_and_windowed(vlm, batch, sites):
    seq = batch.layout.shape[1]
    future = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    image = batch.layout.image
    window = getattr(vlm.family.text_config(vlm.config), "sliding_window", None)
    types = getattr(vlm.family.text_config(vlm.config), "layer_types", None) or []
    for L in range(vlm.n_layers):
        p = sites[f"pattern.{L}"]
        for r in range(len(batch)):
            # Gemma 3 lets image tokens see each other both ways; everything else is causal
            both = image[r][:, None] & image[r][None, :] if vlm.family.name == "gemma3" else torch.zeros_like(future)
            real = ~batch.layout.pad[r][:, None]  # a padding query row sees nothing (eager spreads it evenly)
            assert float(p[r][:, future & ~both & real].abs().sum()) == 0.0
        if window and len(types) > L and types[L] == "sliding_attention" and seq > window:
            far = torch.ones(seq, seq, dtype=torch.bool).tril(-window)
            assert float(p[0][:, far].abs().sum()) == 0.0  # row 0 is not padded


def test_heads_through_o_proj_give_attn_out(vlm, sites):
    for L in range(vlm.n_layers):
        z = sites[f"z.{L}"]
        assert z.shape[-2:] == (vlm.n_heads, vlm.d_head)
        with torch.no_grad():
            out = layer(vlm, L).self_attn.o_proj(z.flatten(-2))
            if vlm.family.name == "gemma3":  # z·W_O is attn_out BEFORE Gemma's post-attention norm
                out = layer(vlm, L).post_attention_layernorm(out)
        torch.testing.assert_close(out, sites[f"attn_out.{L}"])


def test_mlp_in_through_the_mlp_gives_mlp_out(vlm, sites):
    for L in range(vlm.n_layers):
        with torch.no_grad():
            out = layer(vlm, L).mlp(sites[f"mlp_in.{L}"])
            if vlm.family.name == "gemma3":
                out = layer(vlm, L).post_feedforward_layernorm(out)
        torch.testing.assert_close(out, sites[f"mlp_out.{L}"])


def test_one_head_written_through_z(vlm, batch, sites):
    L, h = 1, 2
    with torch.no_grad(), vlm.trace(batch):
        vlm.read(f"z.{L}")[:, :, h] = 0.0
        out = vlm.read(f"attn_out.{L}").save()
        logits = vlm.read("logits").save()
    z = sites[f"z.{L}"].clone()
    z[:, :, h] = 0.0
    with torch.no_grad():
        ref = layer(vlm, L).self_attn.o_proj(z.flatten(-2))
        if vlm.family.name == "gemma3":
            ref = layer(vlm, L).post_attention_layernorm(ref)
    torch.testing.assert_close(out, ref)
    assert logits.isfinite().all()


def test_reading_patterns_leaves_logits_bit_identical(vlm, batch):
    with torch.no_grad(), vlm.trace(batch):
        plain = vlm.read("logits").save()
    rows = []
    with torch.no_grad(), vlm.trace(batch):
        for L in range(vlm.n_layers):
            rows.append(vlm.read(f"pattern.{L}", queries=[-1]).save())
        logits = vlm.read("logits").save()
    assert torch.equal(plain, logits)
    assert rows[0].shape == (len(batch), vlm.n_heads, 1, batch.layout.shape[1])


def test_hook_names_round_trip(vlm):
    from vlens.sites import from_hook_name

    assert vlm.hook_name("z.1") == "blocks.1.attn.hook_z"
    assert from_hook_name("blocks.2.ln2.hook_normalized") == vlm.site("mlp_in.2")
    for k in IN_LAYER:
        assert from_hook_name(vlm.hook_name(f"{k}.1")) == vlm.site(f"{k}.1")


def test_pattern_of_an_unpadded_prompt_equals_hf_eager(vlm):
    """One prompt, no padding: SDPA may get no mask at all (its causal fast path); the pattern is still eager's."""
    one = vlm.prepare([PROMPTS[0]], [noise(40, 32, 0)])
    model = vlm._module
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            ref = model(**hf_inputs(vlm, one), output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    got = []
    with torch.no_grad(), vlm.trace(one):
        for L in range(vlm.n_layers):
            got.append(vlm.read(f"pattern.{L}").save())
    for L in range(vlm.n_layers):
        torch.testing.assert_close(got[L], ref[L], rtol=1e-4, atol=1e-5)
