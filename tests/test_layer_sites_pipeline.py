"""The sites inside a layer go through everything that takes a site: read_layers, harvest, train, train_many and
splice_sae (the references: the same trace's reads, and SAE-Lens's own forward)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import vlens
import vlens.sae as vs
from vlens.activations import harvest, read_layers
from vlens.data import Sample
from vlens.interventions import splice_sae
from vlens.sae.training.multi import train_many

WORDS = ["a", "red", "blue", "square", "circle"]


@pytest.fixture(scope="module")
def vlm():
    return vlens.tiny(family="gemma3", words=WORDS, seed=5)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return [Sample(Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()),
                   label=i % 2, id=f"s{i}") for i in range(4)]


def test_read_layers_takes_every_in_layer_site(vlm, data):
    b = vlm.prepare(["<image>\nWhat is it?"] * 2, [s.image for s in data[:2]])
    names = ["z.1", "attn_out.1", "mlp_in.1", "mlp_out.1", "pattern.1"]
    got = read_layers(vlm, b, names, tokens="image", dtype=torch.float32)
    with torch.no_grad(), vlm.trace(b):
        p = vlm.read("pattern.1").save()
        z = vlm.read("z.1").save()
        m = vlm.read("mlp_out.1").save()
    img = b.layout.image
    assert got["z.1"].shape == (int(img.sum()), vlm.n_heads * vlm.d_head)
    torch.testing.assert_close(got["z.1"], z.flatten(-2)[img])
    torch.testing.assert_close(got["mlp_out.1"], m[img])
    torch.testing.assert_close(got["pattern.1"], p.transpose(1, 2)[img])  # each image token's query row
    mean = read_layers(vlm, b, "z.1", tokens="image", pool="mean", dtype=torch.float32)["z.1"]
    torch.testing.assert_close(mean[0], z.flatten(-2)[0][img[0]].mean(0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("site", ["z.2", "mlp_in.1", "mlp_out.1", "attn_out.3"])
def test_harvest_train_and_splice(vlm, data, site, tmp_path):
    store = harvest(vlm, data, layers=[site], out=tmp_path / "s", batch_size=2, progress=False)
    L = vlm.site(site).index
    x = store.activations(L).tensor().float()
    assert store.d_model == vlm.width(site) and store.config["site"] == vlm.site(site).kind
    b = vlm.prepare(["<image>\n" + "What is shown in this image?"], [data[0].image])
    direct = read_layers(vlm, b, site, dtype=torch.float32)[site]
    torch.testing.assert_close(x[: len(direct)], direct)  # the store's first rows are sample 0's image tokens
    sae = vs.train(x, "topk", k=4, d_sae=32, steps=3, batch_size=16, progress=False,
                   hook_name=vlm.hook_name(site), model_name=vlm.name)
    assert vs.site_of(sae, vlm) == vlm.site(site)
    with torch.no_grad(), vlm.trace(b):
        f = splice_sae(vlm, site, sae, batch=b, tokens="image").save()
        after = vlm.vectors(site).save()
    img = b.layout.image
    with torch.no_grad():
        torch.testing.assert_close(f, sae.encode(direct.to(sae.W_dec.dtype)))
        torch.testing.assert_close(after[img], sae.decode(f).to(after.dtype))


def test_train_many_on_in_layer_sites(vlm, data):
    many = train_many(vlm, data, {"z": {"site": "z.1", "preset": "topk", "k": 4},
                                  "mlp": {"site": "mlp_out.2", "preset": "topk", "k": 4}},
                      d_sae=32, steps=2, batch_size=16, forward_batch_size=2, progress=False)
    assert many["z"].cfg.metadata.hook_name == "blocks.1.attn.hook_z"
    assert many["z"].W_dec.shape[-1] == vlm.n_heads * vlm.d_head
    assert many["mlp"].cfg.metadata.hook_name == "blocks.2.hook_mlp_out"


def test_lens_projects_attn_out_and_mlp_out_on_the_vocabulary(vlm, data):
    from vlens.lens import logit_lens

    b = vlm.prepare(["<image>\nWhat is it?"], [data[0].image])
    sites = ["attn_out.1", "mlp_out.2"]
    lens = logit_lens(vlm, b, sites=sites, k=3)
    acts = read_layers(vlm, b, sites, dtype=torch.float32)
    lm = vlm._module
    for i, s in enumerate(sites):
        with torch.no_grad():  # HF's own final norm and unembedding
            ref = lm.lm_head(lm.model.language_model.norm(acts[s])).topk(3).indices
        assert torch.equal(lens.top_ids[i], ref)


@pytest.mark.parametrize("site", ["mlp_out.1", "z.2"])
def test_dashboard_of_an_in_layer_sae_reads_the_hf_module(vlm, data, site, tmp_path):
    """A dashboard of an SAE at an in-layer site finds its site from the hook name, and its top images' peak
    activations are the SAE's encoding of what HF's own module computes there (a torch forward hook)."""
    import re

    b = vlm.prepare(["<image>\nWhat is it?"] * len(data), [s.image for s in data])
    x = read_layers(vlm, b, site, tokens="image", dtype=torch.float32)[site]
    sae = vs.train(x, "topk", k=4, d_sae=16, steps=3, batch_size=16, progress=False,
                   hook_name=vlm.hook_name(site), model_name=vlm.name)
    vs.dashboard(sae, vlm, data, tmp_path, latents=[0, 1, 2, 3], top_k=4, progress=False)
    kind, L = vlm.site(site).kind, vlm.site(site).index
    layer = vlm.hf_model.model.language_model.layers[L]
    caught = {}
    if kind == "z":  # the o_proj input is the heads' outputs, concatenated
        hook = layer.self_attn.o_proj.register_forward_hook(lambda m, i, o: caught.update(x=i[0]))
    else:  # Gemma 3: what the MLP adds to the residual is its post-norm's output
        hook = layer.post_feedforward_layernorm.register_forward_hook(lambda m, i, o: caught.update(x=o))
    peaks = {}
    try:
        for s in data:
            one = vlm.prepare(["<image>\nWhat is it?"], [s.image])
            with torch.no_grad():
                vlm.hf_model(**one.inputs)
                f = sae.encode(caught["x"][0][one.layout.image[0]].float())
            peaks[s.id] = f.max(0).values
    finally:
        hook.remove()
    checked = 0
    for i in range(4):
        page = (tmp_path / f"latent_{i}.html").read_text() if (tmp_path / f"latent_{i}.html").exists() else ""
        shown = [float(v) for v in re.findall(r"<figcaption>max ([0-9.e+-]+)", page)]
        want = sorted((float(p[i]) for p in peaks.values() if p[i] > 0), reverse=True)
        assert shown == pytest.approx(want[: len(shown)], rel=1e-2, abs=1e-3) and len(shown) == min(4, len(want))
        checked += len(shown)
    assert checked > 0
