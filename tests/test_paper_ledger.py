"""Rows of docs/reproduction.md's ledger, each against the paper's code written out here (multimodal-saes).

References are plain transformers calls with forward hooks (as the paper's baukit `Trace` edits
a layer's output), never vlens itself.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import vlens
from vlens.activations import harvest
from vlens.data import Sample


@pytest.fixture(scope="module")
def vlm():
    return vlens.load("toy")


def images(n: int) -> list[Image.Image]:
    g = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]


def hf_inputs(vlm, text: str, image: Image.Image) -> dict:
    return dict(vlm.processor(text=text, images=image, return_tensors="pt"))


def test_probe_features_mean_every_position_of_the_bare_image_prompt(vlm, tmp_path):
    """compute_image_activations.py: `processor('<image>', image)`, `torch.mean(layers[L].input[0], dim=0)`:
    the mean over every position of the bare prompt (BOS and image tokens), no chat template."""
    ims = images(2)
    store = harvest(vlm, [Sample(im) for im in ims], [2], tokens="all", pool="mean", prompt="<image>",
                    template=False, out=tmp_path / "s", progress=False)
    ours = store.activations(2).float()
    with torch.no_grad():
        want = torch.stack([vlm._module(**hf_inputs(vlm, "<image>", im), output_hidden_states=True)
                            .hidden_states[2][0].float().mean(0) for im in ims])
    ids = vlm.processor(text="<image>", images=ims[0], return_tensors="pt")["input_ids"][0]
    assert int(ids[0]) == vlm.tokenizer.bos_token_id  # BOS is part of the paper's mean
    assert torch.allclose(ours, want, atol=2e-2 * want.abs().max()), (ours - want).abs().max()  # stored in bf16


def paper_steered_generate(vlm, inputs: dict, vec: torch.Tensor, layer: int, k: float, n_pos: int, new: int):
    """steering_rollouts.py: edit the output of layers[layer-1] at positions [:n_pos] (`meow[:1183] += k*vec`, in
    float, back to the model's dtype) in the prefill only, then greedy decoding from the KV cache."""
    module = vlm._module
    layers = module.model.language_model.layers

    def hook(mod, args, output):
        h = output[0] if isinstance(output, tuple) else output
        if h.shape[1] > 1:  # the prefill; decode steps see one new token
            edited = h.float()
            edited[0, :n_pos] += k * vec
            h.copy_(edited.to(h.dtype))
        return output

    handle = layers[layer - 1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = module.generate(**inputs, max_new_tokens=new, do_sample=False)
    finally:
        handle.remove()
    return out[0, inputs["input_ids"].shape[1]:]


def test_steering_positions_prefill_only_greedy_kv_cache(vlm):
    """The paper's `[:1183]` slice is reachable as `tokens=range(n)`; vlens's default edits the image tokens."""
    im = images(1)[0]
    batch = vlm.prepare([vlens.prompts.QUESTION], [im])
    layer, k = 3, 6.0
    vec = torch.randn(vlm.d_model, generator=torch.Generator().manual_seed(1))
    n_pos = int(batch.layout.images[0].end) + 2  # as 1183 = 5 prefix + 1176 image tokens + 2
    inputs = dict(batch.inputs)
    want = paper_steered_generate(vlm, inputs, vec, layer, k, n_pos, 6)
    _, ids = vlens.steered_generate(vlm, batch, vec, layer, k, tokens=range(n_pos), max_new_tokens=6,
                                    return_ids=True)
    ours = ids[0, inputs["input_ids"].shape[1]:]
    assert ours[: len(want)].tolist() == want.tolist() and len(want) >= 2
    plain = paper_steered_generate(vlm, inputs, vec, layer, 0.0, n_pos, 6)
    assert plain.tolist() != want.tolist()  # the edit changes the answer: the comparison means something


def test_steering_edit_is_the_papers_fp16_round_trip(tmp_path):
    """eval_efficacy.py `intervene`: `(h.float() + k*vec).half()`, one rounding to fp16."""
    vlm = vlens.load("toy", dtype=torch.float16)
    batch = vlm.prepare([vlens.prompts.QUESTION], images(1))
    vec = torch.randn(vlm.d_model, generator=torch.Generator().manual_seed(2)) / 3
    k = 2.7
    with torch.no_grad(), vlm.trace(batch):
        h0 = vlm.resid_pre(2).clone().save()
        vlens.interventions.add(vlm, 2, vec, k=k, batch=batch, tokens="all")
        h1 = vlm.resid_pre(2).save()
    assert h1.dtype == torch.float16
    assert torch.equal(h1, (h0.float() + k * vec).half())


def paper_caption_nll(vlm, inputs: dict, caption: str, edit=None, layer: int = 0) -> float:
    """eval_damage.py `compute_loss`: `logits[0][-(len(inp2)+1):-1]` against `inp2 = processor(caption).input_ids`
    (BOS first), `F.nll_loss(log_softmax, ·, reduction='mean')`; `edit(h)` edits the output of layers[layer-1]."""
    module = vlm._module
    handle = None
    if edit is not None:
        def hook(mod, args, output):
            h = output[0] if isinstance(output, tuple) else output
            h.copy_(edit(h))
            return output
        handle = module.model.language_model.layers[layer - 1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = module(**inputs).logits
    finally:
        if handle is not None:
            handle.remove()
    targets = vlm.processor.tokenizer(caption, return_tensors="pt")["input_ids"][0]
    sl = logits[0][-(len(targets) + 1):-1]
    return float(torch.nn.functional.nll_loss(torch.log_softmax(sl.float(), 1), targets, reduction="mean"))


def test_damage_scores_the_papers_bos_target_per_sample(vlm):
    """eval_damage.py: per sample, mean NLL over BOS + the caption tokens, steered − clean; then the mean over samples.
    Reachable as `damage(..., bos_target=True, average="sample")`."""
    ims = images(3)
    caps = ["a red square", "a blue circle on the left", "green"]
    data = [Sample(im, caption=c) for im, c in zip(ims, caps)]
    layer, k = 3, 4.0
    vec = torch.randn(vlm.d_model, generator=torch.Generator().manual_seed(5))
    want = []
    for im, cap in zip(ims, caps):
        batch = vlm.prepare([vlens.prompts.CAPTION_PROMPT], [im], answers=[cap])
        inputs, image = dict(batch.inputs), batch.layout.image[0]
        ids = vlm.processor.tokenizer(cap, add_special_tokens=False)["input_ids"]
        assert batch.layout.input_ids[0, -len(ids):].tolist() == ids  # the caption closes the sequence, as in the paper

        def steer(h, image=image):
            out = h.float()
            out[0, image] += k * vec
            return out.to(h.dtype)

        want.append(paper_caption_nll(vlm, inputs, cap, steer, layer) - paper_caption_nll(vlm, inputs, cap))
    ours = vlens.steering.damage(vlm, data, vec, layer, k, bos_target=True, average="sample", batch_size=2)
    assert ours == pytest.approx(sum(want) / len(want), rel=1e-4, abs=1e-5)
    # each option matters: vlens's default (caption tokens only, pooled over tokens) and either option alone differ
    for kw in ({}, {"bos_target": True}, {"average": "sample"}):
        other = vlens.steering.damage(vlm, data, vec, layer, k, batch_size=2, **kw)
        assert abs(other - ours) > 1e-2, (kw, other, ours)


def test_loss_recovered_every_position_per_sample_with_bos(vlm):
    """eval_sae_damage.py: the output of layers[L-1] replaced by `sae(h*8)/8` at every position (the released fc1/fc2
    checkpoint), or zeroed at every position; CE as in damage (BOS target, mean per sample); then
    `1 - (CE_sae - CE_clean)/(CE_zero - CE_clean)` per sample, averaged. Reachable as
    `loss_recovered(..., positions="all", average="sample", bos_target=True)` on the converted checkpoint."""
    g = torch.Generator().manual_seed(7)
    d, m, layer = vlm.d_model, 4 * vlm.d_model, 3
    sd = {"module.fc1.weight": torch.randn(m, d, generator=g) * 0.05, "module.fc1.bias": torch.randn(m, generator=g) * 0.01,
          "module.fc2.weight": torch.randn(d, m, generator=g) * 0.05, "module.fc2.bias": torch.zeros(d)}
    sae = vlens.sae.convert_paper_checkpoint(sd, hook_name=f"blocks.{layer}.hook_resid_pre")

    def paper_sae(h):  # fc2(relu(fc1(h*8)))/8, in float, back to the model's dtype
        x = h.float() * 8
        f = torch.relu(x @ sd["module.fc1.weight"].T + sd["module.fc1.bias"])
        return ((f @ sd["module.fc2.weight"].T + sd["module.fc2.bias"]) / 8).to(h.dtype)

    ims = images(3)
    caps = ["a red square", "a blue circle on the left", "green"]
    want = []
    for im, cap in zip(ims, caps):
        inputs = dict(vlm.prepare([vlens.prompts.QUESTION], [im], answers=[cap]).inputs)
        clean = paper_caption_nll(vlm, inputs, cap)
        spliced = paper_caption_nll(vlm, inputs, cap, paper_sae, layer)
        zero = paper_caption_nll(vlm, inputs, cap, lambda h: h * 0.0, layer)
        want.append(1 - (spliced - clean) / (zero - clean))
    data = [Sample(im, caption=c) for im, c in zip(ims, caps)]
    r = vlens.sae.loss_recovered(vlm, sae, None, data, positions="all", average="sample", bos_target=True,
                                 batch_size=2, progress=False)
    assert list(r) == ["all"]
    assert r["all"]["loss_recovered"] == pytest.approx(sum(want) / len(want), rel=1e-4, abs=1e-5)
    # vlens's default (image + caption tokens, pooled CEs, no BOS target) is another number
    default = vlens.sae.loss_recovered(vlm, sae, None, data, batch_size=2, progress=False)["overall"]
    assert abs(default["loss_recovered"] - r["all"]["loss_recovered"]) > 1e-3


def test_text_only_pass_keeps_every_token_of_processor_caption(vlm, tmp_path):
    """sae_trainer.py `compute_activations`: after the image pass, `processor(caption)` alone through the model, and
    every row of `layers[L].input` kept, BOS included. Reachable as `harvest(..., text_only=True, text_tokens="all")`."""
    caps = ["a red square", "a blue circle on the left"]
    data = [Sample(im, caption=c) for im, c in zip(images(2), caps)]
    layer = 2
    store = harvest(vlm, data, [layer], tokens="image+answer", captions=True, text_only=True, text_tokens="all",
                    batch_size=2, out=tmp_path / "s", progress=False)
    txt = store.filter(text_only=True)
    for i, cap in enumerate(caps):
        inp = vlm.processor.tokenizer(cap, return_tensors="pt")
        assert int(inp["input_ids"][0, 0]) == vlm.tokenizer.bos_token_id
        with torch.no_grad():
            want = vlm._module(**inp, output_hidden_states=True).hidden_states[layer][0]
        ours = txt.activations(layer)[txt.meta["sample"] == i].float()
        assert ours.shape == want.shape  # BOS + the caption tokens: every token
        assert torch.allclose(ours, want.float(), atol=1e-5), (ours - want).abs().max()
    # vlens's default text pass keeps the caption tokens only: one row fewer per caption (BOS)
    default = harvest(vlm, data, [layer], tokens="image+answer", captions=True, text_only=True, batch_size=2,
                      out=tmp_path / "d", progress=False).filter(text_only=True)
    assert len(txt) - len(default) == len(caps)


# -- hard-concrete probes and approximations (probing_approximation/*.py), written out -----------------


def paper_gate(mask: torch.Tensor) -> torch.Tensor:
    """The gate sample of both scripts: u clipped to [1e-4, 0.9999], s = σ(1.5 (log(u/(1−u)) + log α)),
    z = clip(1.2 s − 0.1, 0, 1)."""
    u = torch.clip(torch.rand(mask.shape[0]), 0.0001, 0.9999)
    s = torch.sigmoid(1.5 * ((u / (1 - u)).log() + mask))
    return torch.clip(s * 1.2 - 0.1, 0, 1)


def paper_l0(mask: torch.Tensor) -> torch.Tensor:
    return torch.sum(torch.sigmoid(mask - np.log(0.1 / 1.1) / 1.5))


def test_paper_split_is_sklearns_train_test_split():
    from sklearn.model_selection import train_test_split

    for n in (10, 37, 1000):
        tr, te = vlens.sparsity.paper_split(n)
        want_tr, want_te = train_test_split(np.arange(n), test_size=0.2, random_state=42)
        assert tr.tolist() == want_tr.tolist() and te.tolist() == want_te.tolist()


def test_sparse_probe_paper_recipe_is_the_papers_loop():
    """train_sparse_linear_probe.py: stacked classes (0 then 1), `train_test_split(test_size=0.2,
    random_state=42)`, sigmoid probe + BCE + λ Σ σ(log α − log(0.1/1.1)/1.5), Adam 1e-3 on minibatches of 32
    (`randperm` per epoch), log α from 0; at test time one random gate sample > 0.5 multiplies the weights."""
    from sklearn.model_selection import train_test_split

    g = torch.Generator().manual_seed(11)
    n, d, lam, epochs = 60, 24, 0.005, 3
    y = torch.arange(2).repeat_interleave(n // 2)
    Z = torch.rand(n, d, generator=g) + 0.5 * y[:, None] * (torch.arange(d) < 3)
    torch.manual_seed(0)
    X_train, X_test, y_train, y_test = (torch.as_tensor(a) for a in train_test_split(
        Z.numpy(), y.float()[:, None].numpy(), test_size=0.2, random_state=42))
    linear = nn.Linear(d, 1)
    mask = torch.zeros(d, requires_grad=True)
    opt = torch.optim.Adam(list(linear.parameters()) + [mask], lr=0.001)
    for _ in range(epochs):
        permutation = torch.randperm(X_train.size()[0])
        for i in range(0, X_train.size()[0], 32):
            idx = permutation[i:i + 32]
            loss = nn.BCELoss()(torch.sigmoid(linear(X_train[idx] * paper_gate(mask))), y_train[idx])
            loss = loss + lam * paper_l0(mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        z = 1.0 * (paper_gate(mask) > 0.5)
        linear.weight.data *= z
        accuracy = float((torch.round(torch.sigmoid(linear(X_test))) == y_test).float().mean())
    row = vlens.sparsity.sparse_probe(Z, y, [lam], recipe="paper", epochs=epochs, seed=0).rows[0]
    assert row["latents"] == z.nonzero().flatten().tolist() and 0 < row["n_latents"] < d
    assert row["test_accuracy"] == pytest.approx(accuracy)


def test_sparse_approximation_paper_recipe_is_the_papers_loop():
    """approximate_steering_vectors.py: c ~ randn, log α = 0, loss −⟨normalise(W_dec (c ⊙ z)), v̂⟩ + λ Σ σ(·),
    Adam 1e-3; the final gates are the last training sample thresholded at 0.5 (no refit)."""
    g = torch.Generator().manual_seed(12)
    W = torch.randn(64, 16, generator=g)  # vlens's W_dec [d_sae, d_model]; the paper's fc2.weight is its transpose
    v = 2 * W[3] - W[40] + 0.1 * torch.randn(16, generator=g)
    lam, steps = 1e-3, 40
    torch.manual_seed(0)
    target = torch.nn.functional.normalize(v, dim=0)
    mask = torch.zeros(64, requires_grad=True)
    coefs = torch.randn_like(mask, requires_grad=True)
    opt = torch.optim.Adam([coefs, mask], lr=0.001)
    for _ in range(steps):
        z = paper_gate(mask)
        out = torch.nn.functional.normalize(torch.matmul(W.T, coefs * z), dim=0)
        loss = -torch.dot(out, target) + lam * paper_l0(mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    z = 1.0 * (z > 0.5)
    want = torch.dot(torch.nn.functional.normalize(torch.matmul(W.T, coefs * z), dim=0), target).item()
    row = vlens.sparsity.sparse_approximation(v, W, [lam], steps=steps, seed=0, recipe="paper").rows[0]
    assert sorted(row["latents"]) == z.nonzero().flatten().tolist() and 0 < row["n_latents"] < 64
    assert row["cosine"] == pytest.approx(want, rel=1e-5)
