"""The real llava-v1.6-mistral-7b path, offline: its real tokenizer (mistral-common's file), processor, chat
template and module tree, with random weights at small widths. What only a real checkpoint on a GPU can
verify (the weights' behaviour) is out of reach here; everything else runs."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import vlens
from vlens.families.checkpoints import LLAVA_NEXT_MISTRAL

pytest.importorskip("mistral_common", reason="the real tokenizer needs the `real` extra (mistral-common)")

SIZES = dict(d_model=64, n_layers=2, vision_d_model=32, vision_layers=1)
QUESTION = vlens.prompts.QUESTION


@pytest.fixture(scope="module")
def real():
    return vlens.load(LLAVA_NEXT_MISTRAL, weights="random", seed=0, **SIZES)


def _image(size, rgb=(200, 40, 40), seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 40, (size[1], size[0], 3), generator=g)
    return Image.fromarray((torch.tensor(rgb) * 0.8 + noise).clamp(0, 255).to(torch.uint8).numpy())


def test_prompt_opens_with_the_papers_prefix_and_images_sit_at_5_to_1180(real):
    b = real.prepare([QUESTION], [_image((336, 336))])
    ids = b.layout.input_ids[0].tolist()
    assert ids[:5] == [1, 733, 16289, 28793, 28705]  # BOS "[INST] " as hard-coded in the paper's code
    span = b.layout.images[0]
    assert (span.start, span.end, span.geometry.n_tokens) == (5, 1181, 1176)
    assert b.layout.image[0].nonzero().flatten().tolist() == list(range(5, 1181))
    # the paper's [:1183] slice is prefix + image + these two: the newline after <image> and "What"
    assert real.tokenizer.convert_ids_to_tokens(ids[1181:1183]) == ["<0x0A>", "What"]
    text = real.tokenizer.decode([i for i in ids if i != real.image_token_id], skip_special_tokens=True)
    assert text == "[INST] \nWhat is shown in this image? [/INST]"


@pytest.mark.parametrize("size, n", [((336, 336), 1176), ((224, 224), 1176), ((672, 672), 2928),
                                     ((640, 480), 2340), ((1024, 768), 2340)])
def test_image_token_counts_of_the_real_processor(real, size, n):
    b = real.prepare([QUESTION], [_image(size)])
    assert int(b.layout.image.sum()) == n == b.layout.images[0].geometry.n_tokens


def test_module_tree_and_sites_are_the_real_ones(real):
    assert real.vocab_size == 32064 and real.image_token_id == 32000 and real.processor.patch_size == 14
    assert real.module_path(1) == "model.language_model.layers.1.input"
    assert real.config.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    b = real.prepare([QUESTION], [_image((336, 336))])
    with torch.no_grad():
        hs = real._module(**b.inputs, output_hidden_states=True).hidden_states
    pre = []
    with torch.no_grad(), real.trace(b):
        for L in range(real.n_layers):
            pre.append(real.resid_pre(L).save())
    for L in range(real.n_layers):
        torch.testing.assert_close(pre[L], hs[L])


def test_single_token_imagenet_classes():
    from vlens.data import imagenet_class_names
    from vlens.families.checkpoints import real_tokenizer
    from vlens.scoring import single_token_names

    one = single_token_names(real_tokenizer(), imagenet_class_names())
    assert len(one) == 101  # the paper studied 100 such classes; docs/reproduction.md gives this count
    assert "lion" in one and "golden retriever" not in one


def test_multi_token_target_probability_is_the_whole_sequence(real):
    """efficacy's p_target for a name of several tokens is the product of its tokens' conditional probabilities."""
    from vlens.steering import efficacy

    src, tgt = "tabby cat", "golden retriever"
    assert len(real.tokenizer(tgt, add_special_tokens=False)["input_ids"]) == 4
    im = _image((336, 336))
    r = efficacy(real, [im], src, tgt, None, layer=1, k=0.0, generate=False)
    b = real.prepare([vlens.prompts.two_choice_prompt(src, tgt)], [im], answers=[tgt])
    with torch.no_grad():
        logits = real._module(**b.inputs).logits[0].float()
    ids = b.layout.input_ids[0]
    pos = b.layout.answer[0].nonzero().flatten()
    p = torch.softmax(logits[pos - 1], -1)[torch.arange(len(pos)), ids[pos]].prod()
    torch.testing.assert_close(r["p_target"][0], p, rtol=1e-4, atol=1e-9)


def test_the_pipeline_runs(real, tmp_path):
    from vlens.data import ListDataset, Sample
    from vlens.probes import fit_probe
    from vlens.steering import damage, diff_of_means, efficacy, steered_generate

    names = ["tabby cat", "golden retriever"]
    data = ListDataset([Sample(_image((336, 336), rgb, seed=i), label=c, caption=f"a photo of a {names[c]}", id=i)
                        for i, (c, rgb) in enumerate([(0, (200, 40, 40)), (1, (40, 40, 200))] * 3)],
                       class_names=names)
    pooled = vlens.harvest(real, data, layers=[0, 1], pool="mean", batch_size=3, out=tmp_path / "pooled",
                           progress=False)
    X, y = pooled.pooled(1)
    assert fit_probe(X, y).score(X, y) == 1.0
    v = diff_of_means(X, y, src=0, tgt=1)
    b = real.prepare([QUESTION] * 2, [data[0].image, data[2].image])
    assert len(steered_generate(real, b, v, layer=1, k=4.0, max_new_tokens=3)) == 2
    e = efficacy(real, [data[0].image], names[0], names[1], v, layer=1, k=4.0)
    assert 0 <= e["p_target_mean"] <= 1 and len(e["answers"]) == 1
    assert isinstance(damage(real, data[:2], v, layer=1, k=4.0), float)
    tokens = vlens.harvest(real, data, layers=[1], tokens="image+answer", captions=True, text_only=True,
                           prompt=vlens.prompts.CAPTION_PROMPT, batch_size=3, out=tmp_path / "tokens", progress=False)
    sae = vlens.sae.train(tokens, "topk", layer=1, d_sae=128, k=8, steps=20, batch_size=512, progress=False)
    lr = vlens.sae.loss_recovered(real, sae, 1, list(data)[:2], prompt=vlens.prompts.CAPTION_PROMPT, progress=False)
    assert set(lr) == {"overall", "image", "text"}


@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_half_precision_runs_and_matches_float32(dtype, atol, tmp_path):
    from vlens.data import Sample
    from vlens.steering import steered_generate

    ref = vlens.load(LLAVA_NEXT_MISTRAL, weights="random", seed=0, **SIZES)
    half = vlens.load(LLAVA_NEXT_MISTRAL, weights="random", seed=0, dtype=dtype, **SIZES)
    assert half.dtype == dtype
    b = ref.prepare([QUESTION], [_image((336, 336))])
    outs = []
    for vlm in (ref, half):
        batch = vlm.prepare([QUESTION], [_image((336, 336))])
        batch.inputs["pixel_values"] = batch.inputs["pixel_values"].to(vlm.dtype)
        with torch.no_grad(), vlm.trace(batch):
            outs.append(vlm.resid_post(1).save())
    scale = outs[0].abs().max()
    assert float((outs[1].float() - outs[0]).abs().max() / scale) < atol
    store = vlens.harvest(half, [Sample(_image((336, 336)), label=0)] * 2, layers=[1], dtype=torch.bfloat16,
                          out=tmp_path / "bf16", progress=False)
    assert store.dtype == torch.bfloat16 and store.activations(1).tensor().dtype == torch.bfloat16
    hb = half.prepare([QUESTION], [_image((336, 336))])
    hb.inputs["pixel_values"] = hb.inputs["pixel_values"].to(dtype)
    assert len(steered_generate(half, hb, torch.randn(half.d_model), layer=1, k=2.0, max_new_tokens=2)) == 1
    assert b.layout.shape == hb.layout.shape


def test_the_demo_runs_on_the_real_architecture(real, tmp_path):
    """The demo's real-model path end to end: an image folder of real class names, ShareGPT4V captions."""
    from vlens.demo import DemoConfig, run

    names = ["tabby cat", "golden retriever", "lion"]
    records = []
    for c, name in enumerate(names):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(6):
            _image((300 + 20 * i, 336), (60 + 60 * c, 200 - 50 * c, 90), seed=i).save(tmp_path / "imgs" / name / f"{i}.png")
            records.append({"id": f"{c}-{i}", "image": f"imgs/{name}/{i}.png", "conversations": [
                {"from": "human", "value": "<image>\nDescribe the image."},
                {"from": "gpt", "value": f"A photo of a {name}."}]})
    (tmp_path / "caps.json").write_text(json.dumps(records))
    cfg = DemoConfig(n_train=15, n_heldout=3, n_sae_samples=4, sae_steps=10, sae_expansion=2, sae_k=4, steer_images=1,
                     ks=(0.0, 4.0), n_pairs=1, n_dashboards=1, batch_size=3)
    path = run(tmp_path / "out", model=real, data=str(tmp_path / "imgs"), captions=str(tmp_path / "caps.json"),
               config=cfg)
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["model"] == real.name and res["steering"][0]["src"] in names
    assert "Steering" in open(path).read()


def test_byte_tokens_read_as_bytes_on_dashboards(real, tmp_path):
    """A latent whose decoder row is the unembedding of the byte token `<0xE2>` shows that token as `<0xE2>` (the
    real tokenizer's own piece, convert_ids_to_tokens), not as "�", in feature_logits and on its dashboard page;
    a caption with a character the vocabulary spells in bytes (an emoji) shows no "�" in its context either."""
    from sae_lens import StandardSAE, StandardSAEConfig

    import vlens.sae as vs
    from vlens.data import Sample
    from vlens.sae.features import feature_logits

    tok = real.tokenizer
    byte = tok.convert_tokens_to_ids("<0xE2>")
    assert tok.convert_ids_to_tokens([byte]) == ["<0xE2>"] and tok.decode([byte]) == "\ufffd"
    sae = StandardSAE(StandardSAEConfig(d_in=real.d_model, d_sae=4))
    with torch.no_grad():
        sae.W_dec[0] = real._module.get_output_embeddings().weight[byte].float()
        sae.b_enc[0] = 10.0  # fires on every token, so the caption context is shown
    top = feature_logits(sae, real, [0], k=3)[0]["top"]
    assert top[0]["token"] == "<0xE2>"
    caption = "a tall \U0001F992 here"
    assert "<0xF0>" in tok.convert_ids_to_tokens(tok(caption)["input_ids"])  # the emoji is spelled in bytes
    data = [Sample(_image((64, 64)), caption=caption)]
    vs.dashboard(sae, real, data, tmp_path, layer=1, latents=[0], progress=False)
    page = (tmp_path / "latent_0.html").read_text(encoding="utf-8")
    assert "&lt;0xE2&gt;" in page and "\ufffd" not in page
