"""Gemma-Scope-2-format SAEs and transcoders (folders as SAE-Lens 6.54's `gemma_3` loader reads them) load, land on
the right sites of the tiny Gemma 3 and splice on image tokens; the references are SAE-Lens's own forward and HF's
own modules."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import vlens
from vlens.interventions import splice_sae, splice_transcoder
from vlens.sae.gemma_scope import load_gemma_scope
from vlens.sae.io import site_of

D_SAE = 48


def write_folder(root, folder, d_in, d_out, *, hook_in, hook_out=None, affine=False, seed=0):
    """One Gemma Scope 2 folder: config.json as the release writes it and params.safetensors (w_enc [d_in, d_sae])."""
    g = torch.Generator().manual_seed(seed)
    d = root / folder
    d.mkdir(parents=True)
    cfg = {"architecture": "jump_relu", "model_name": "gemma-v3-1b-pt", "hf_hook_point_in": hook_in}
    if hook_out:
        cfg |= {"hf_hook_point_out": hook_out, "affine_connection": affine}
    (d / "config.json").write_text(json.dumps(cfg))
    params = {"w_enc": torch.randn(d_in, D_SAE, generator=g) / d_in ** 0.5,
              "w_dec": torch.randn(D_SAE, d_out, generator=g) / D_SAE ** 0.5,
              "b_enc": torch.randn(D_SAE, generator=g) * 0.1, "b_dec": torch.randn(d_out, generator=g) * 0.1,
              "threshold": torch.rand(D_SAE, generator=g) * 0.05}
    if affine:
        params["affine_skip_connection"] = torch.randn(d_in, d_out, generator=g) * 0.05
    save_file(params, str(d / "params.safetensors"))
    return params


@pytest.fixture(scope="module")
def vlm():
    return vlens.tiny(family="gemma3", seed=4)


@pytest.fixture(scope="module")
def batch(vlm):
    g = torch.Generator().manual_seed(0)
    img = Image.fromarray((torch.rand(48, 40, 3, generator=g) * 255).to(torch.uint8).numpy())
    return vlm.prepare(["<image>\nWhat is shown?"], [img])


@pytest.fixture(scope="module")
def release(tmp_path_factory, vlm):
    root = tmp_path_factory.mktemp("gemma-scope-2-tiny")
    d, dz = vlm.d_model, vlm.n_heads * vlm.d_head
    L = "model.language_model.layers"
    p = {
        "mlp_out": write_folder(root, "mlp_out/layer_1_width_48_l0_small", d, d,
                                hook_in=f"{L}.1.post_feedforward_layernorm.output"),
        "attn_out": write_folder(root, "attn_out/layer_2_width_48_l0_small", dz, dz,
                                 hook_in=f"{L}.2.self_attn.o_proj.input", seed=1),
        "transcoder": write_folder(root, "transcoder/layer_1_width_48_l0_small", d, d, seed=2,
                                   hook_in=f"{L}.1.pre_feedforward_layernorm.output",
                                   hook_out=f"{L}.1.post_feedforward_layernorm.output"),
        "affine": write_folder(root, "transcoder_all/layer_1_width_48_l0_small_affine", d, d, seed=3, affine=True,
                               hook_in=f"{L}.1.pre_feedforward_layernorm.output",
                               hook_out=f"{L}.1.post_feedforward_layernorm.output"),
    }
    return root, p


def test_folders_load_as_sae_lens_reads_them(vlm, release):
    root, p = release
    sae = load_gemma_scope(root, "mlp_out/layer_1_width_48_l0_small")
    z = load_gemma_scope(root, "attn_out/layer_2_width_48_l0_small")
    tc = load_gemma_scope(root, "transcoder/layer_1_width_48_l0_small")
    skip = load_gemma_scope(root, "transcoder_all/layer_1_width_48_l0_small_affine")
    assert [type(s).__name__ for s in (sae, z, tc, skip)] == \
        ["JumpReLUSAE", "JumpReLUSAE", "JumpReLUTranscoder", "JumpReLUSkipTranscoder"]
    assert site_of(sae, vlm).name == "mlp_out.1" and site_of(z, vlm).name == "z.2"
    assert tc.cfg.metadata.hook_name == "blocks.1.hook_mlp_in"
    assert tc.cfg.metadata.hook_name_out == "blocks.1.hook_mlp_out"
    assert torch.equal(sae.W_enc, p["mlp_out"]["w_enc"]) and torch.equal(sae.threshold, p["mlp_out"]["threshold"])
    assert torch.equal(skip.W_skip, p["affine"]["affine_skip_connection"].T)


def plain(vlm, batch, names):
    out = {}
    with torch.no_grad(), vlm.trace(batch):
        for n in names:
            out[n] = vlm.read(n).save()
    return out


def test_mlp_out_sae_splices_on_image_tokens(vlm, batch, release):
    sae = load_gemma_scope(release[0], "mlp_out/layer_1_width_48_l0_small")
    ref = plain(vlm, batch, ["resid_pre.1", "attn_out.1", "mlp_out.1"])
    img = batch.layout.image
    with torch.no_grad(), vlm.trace(batch):
        f = splice_sae(vlm, "mlp_out.1", sae, batch=batch, tokens="image").save()
        post = vlm.read("resid_post.1").save()
    with torch.no_grad():
        expect_f = sae.encode(ref["mlp_out.1"][img])
        recon = sae(ref["mlp_out.1"][img])
    torch.testing.assert_close(f, expect_f)
    assert 0 < int((f > 0).sum()) < f.numel()  # the JumpReLU thresholds cut some latents, not all
    want = ref["resid_pre.1"] + ref["attn_out.1"] + ref["mlp_out.1"]
    want[img] = (ref["resid_pre.1"] + ref["attn_out.1"])[img] + recon
    torch.testing.assert_close(post, want)


def test_hook_z_sae_splices_on_image_tokens(vlm, batch, release):
    sae = load_gemma_scope(release[0], "attn_out/layer_2_width_48_l0_small")
    ref = plain(vlm, batch, ["z.2"])
    img = batch.layout.image
    with torch.no_grad(), vlm.trace(batch):
        splice_sae(vlm, site_of(sae, vlm), sae, batch=batch, tokens="image")
        out = vlm.read("attn_out.2").save()
    z = ref["z.2"].flatten(-2).clone()
    with torch.no_grad():
        z[img] = sae(z[img])
        layer = vlm._module.model.language_model.layers[2]
        want = layer.post_attention_layernorm(layer.self_attn.o_proj(z))
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("folder", ["transcoder/layer_1_width_48_l0_small",
                                    "transcoder_all/layer_1_width_48_l0_small_affine"])
def test_transcoder_replaces_the_mlp_on_image_tokens(vlm, batch, release, folder):
    tc = load_gemma_scope(release[0], folder)
    ref = plain(vlm, batch, ["resid_pre.1", "attn_out.1", "mlp_in.1", "mlp_out.1", "logits"])
    img = batch.layout.image
    with torch.no_grad(), vlm.trace(batch):
        f = splice_transcoder(vlm, tc, batch=batch, tokens="image").save()
        post = vlm.read("resid_post.1").save()
    with torch.no_grad():
        pred = tc(ref["mlp_in.1"][img])  # SAE-Lens's forward: W_dec·f + b_dec (+ W_skip·x)
    assert f.shape == (int(img.sum()), D_SAE)
    want = ref["resid_pre.1"] + ref["attn_out.1"] + ref["mlp_out.1"]
    want[img] = (ref["resid_pre.1"] + ref["attn_out.1"])[img] + pred
    torch.testing.assert_close(post, want)
    with torch.no_grad(), vlm.trace(batch):
        splice_transcoder(vlm, tc, batch=batch, tokens="image", error=True)
        logits = vlm.read("logits").save()
    torch.testing.assert_close(logits, ref["logits"], rtol=1e-4, atol=1e-5)
