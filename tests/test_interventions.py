"""Interventions inside traces and generation: each edit does exactly what it says, and they compose."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import vlens
from vlens.errors import SelectionError
from vlens.interventions import ablate, add, check_vector, clamp_latent, project_out, splice_sae
from vlens.tokens import one_image, positions, select, tile
from vlens.steering import steered_generate

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vlm():
    return vlens.tiny(words=["red", "blue", "square"])


@pytest.fixture(scope="module")
def batch(vlm):
    ims = [Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (64, 32), (30, 30, 200))]
    return vlm.prepare(["<image>\nwhat is shown ?", "<image>\nwhat is shown in this image ?"], ims,
                       answers=["red", "a blue square"])


@pytest.fixture(scope="module")
def sae(vlm):
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(0)
    s = StandardSAE(StandardSAEConfig(d_in=vlm.d_model, d_sae=256))
    with torch.no_grad():
        s.b_enc.fill_(0.1)  # make latents fire on random activations
    return s


def run(vlm, batch, edit, layers=(1, 3)):
    """Run the batch with edit() applied, saving resid_pre at the given layers and the logits."""
    out = {}
    with torch.no_grad(), vlm.trace(batch):
        edit()
        for L in layers:
            out[L] = vlm.resid_pre(L).save()
        out["logits"] = vlm.read("logits").save()
    return out


def clean(vlm, batch, layers=(1, 3)):
    return run(vlm, batch, lambda: None, layers)


def test_add_edits_only_selected_tokens_and_never_earlier_positions(vlm, batch):
    v = torch.randn(vlm.d_model)
    c = clean(vlm, batch)
    s = run(vlm, batch, lambda: add(vlm, 1, v, k=2.5, batch=batch, tokens="image"))
    img = batch.layout.image
    assert torch.allclose(s[1][img] - c[1][img], 2.5 * v.expand(int(img.sum()), -1), atol=1e-5)
    assert torch.equal(s[1][~img], c[1][~img])
    # causality: positions before the first image token are untouched at every later layer
    first = min(sp.start for sp in batch.layout.images if sp.batch_index == 0)
    assert torch.allclose(s[3][0, :first], c[3][0, :first], atol=1e-6)
    assert not torch.allclose(s["logits"][0, -1], c["logits"][0, -1])


def test_add_at_named_site_and_answer_tokens(vlm, batch):
    v = torch.randn(vlm.d_model)
    with torch.no_grad(), vlm.trace(batch):
        h0 = vlm.read("resid_post.0").clone().save()
        add(vlm, "resid_post.0", v, k=1.0, batch=batch, tokens="answer")
        h1 = vlm.read("resid_post.0").save()
    ans = batch.layout.answer
    assert torch.allclose(h1[ans] - h0[ans], v.expand(int(ans.sum()), -1), atol=1e-5)
    assert torch.equal(h1[~ans], h0[~ans])


def test_ablate_zero_mean_and_vector(vlm, batch):
    img = batch.layout.image
    s = run(vlm, batch, lambda: ablate(vlm, 1, batch=batch, tokens="image"))
    assert float(s[1][img].abs().max()) == 0.0
    c = clean(vlm, batch)
    s = run(vlm, batch, lambda: ablate(vlm, 1, batch=batch, tokens="image", value="mean"))
    assert torch.allclose(s[1][img], c[1][img].mean(0).expand(int(img.sum()), -1), atol=1e-5)
    m = torch.randn(vlm.d_model)
    s = run(vlm, batch, lambda: ablate(vlm, 1, batch=batch, tokens="text", value=m))
    assert torch.allclose(s[1][batch.layout.text], m.expand(int(batch.layout.text.sum()), -1))
    assert torch.equal(s[1][img], c[1][img])


def test_project_out_one_and_several_directions(vlm, batch):
    U = torch.randn(2, vlm.d_model)
    c = clean(vlm, batch)
    s = run(vlm, batch, lambda: project_out(vlm, 3, U, batch=batch, tokens="all"), layers=(3,))
    keep = ~batch.layout.pad
    assert float((s[3][keep] @ U.T).abs().max()) < 1e-3
    # the orthogonal complement is untouched
    q, _ = torch.linalg.qr(U.T)
    P = torch.eye(vlm.d_model) - q @ q.T
    assert torch.allclose(s[3][keep] @ P, c[3][keep] @ P, atol=1e-4)


def test_edits_compose_across_layers(vlm, batch):
    v, u = torch.randn(vlm.d_model), torch.randn(vlm.d_model)
    un = u / u.norm()
    first = run(vlm, batch, lambda: add(vlm, 1, v, k=3.0, batch=batch))

    def both():
        add(vlm, 1, v, k=3.0, batch=batch)
        project_out(vlm, 3, u, batch=batch, tokens="text")

    s = run(vlm, batch, both, layers=(3,))
    txt = batch.layout.text
    h = first[3][txt]
    assert torch.allclose(s[3][txt], h - (h @ un)[:, None] * un, atol=1e-4)
    assert torch.allclose(s[3][~txt], first[3][~txt], atol=1e-5)


def test_tile_and_one_image_selections(vlm, batch):
    t1 = select(batch, tile(1, image=1), nonempty=True)
    span = batch.layout.images[1]
    assert t1.sum() == int((span.geometry.tile == 1).sum()) > 0
    assert not t1[0].any()
    assert select(batch, one_image(0)).equal(batch.layout.image_mask(0))
    v = torch.randn(vlm.d_model)
    c = clean(vlm, batch)
    s = run(vlm, batch, lambda: add(vlm, 1, v, batch=batch, tokens=tile(0)))
    base = select(batch, "base", nonempty=True)
    assert torch.allclose(s[1][base] - c[1][base], v.expand(int(base.sum()), -1), atol=1e-5)
    assert torch.equal(s[1][~base], c[1][~base])


def test_clamp_latent_changes_only_that_latents_contribution(vlm, batch, sae):
    c = clean(vlm, batch)
    s = run(vlm, batch, lambda: clamp_latent(vlm, 1, sae, latent=[3, 7], value=[5.0, 0.0], batch=batch))
    img = batch.layout.image
    with torch.no_grad():
        f = sae.encode(c[1][img])[:, [3, 7]]
        expected = c[1][img] + (torch.tensor([5.0, 0.0]) - f) @ sae.W_dec[[3, 7]]
    assert torch.allclose(s[1][img], expected, atol=1e-4)
    assert torch.equal(s[1][~img], c[1][~img])


def test_splice_sae_with_and_without_error(vlm, batch, sae):
    c = clean(vlm, batch)
    s = run(vlm, batch, lambda: splice_sae(vlm, 1, sae, batch=batch, tokens="image", error=True))
    assert torch.allclose(s["logits"], c["logits"], atol=1e-4)
    s = run(vlm, batch, lambda: splice_sae(vlm, 1, sae, batch=batch, tokens="image"))
    img = batch.layout.image
    with torch.no_grad():
        assert torch.allclose(s[1][img], sae.decode(sae.encode(c[1][img])), atol=1e-5)
    # an edit of the latents, with the error term: the same as clamping
    def zero7(f):
        f = f.clone()
        f[:, 7] = 0
        return f

    s1 = run(vlm, batch, lambda: splice_sae(vlm, 1, sae, batch=batch, tokens="image", error=True, edit=zero7))
    s2 = run(vlm, batch, lambda: clamp_latent(vlm, 1, sae, 7, 0.0, batch=batch))
    assert torch.allclose(s1[1], s2[1], atol=1e-4)


def test_generate_prefill_only_and_every_step(vlm):
    ims = [Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (32, 32), (30, 30, 200))]
    b = vlm.prepare(["<image>\nwhat is shown ?"] * 2, ims)
    v = torch.randn(vlm.d_model) * 4
    plain = steered_generate(vlm, b, max_new_tokens=6)
    pre, ids = steered_generate(vlm, b, v, layer=2, k=3.0, max_new_tokens=6, return_ids=True)
    every = steered_generate(vlm, b, v, layer=2, k=3.0, max_new_tokens=6, every_step=True)
    assert pre != plain and every != pre
    # prefill-only steering with the KV cache == re-running the whole steered sequence every step
    seq = b.inputs["input_ids"]
    mask = b.inputs["attention_mask"]
    for _ in range(ids.shape[1] - seq.shape[1]):
        with torch.no_grad(), vlm.trace({**b.inputs, "input_ids": seq, "attention_mask": mask}):
            vlm.resid_pre(2)[:, : b.layout.shape[1]][b.layout.image] += 3.0 * v
            nxt = vlm.read("logits")[:, -1].argmax(-1).save()
        seq = torch.cat([seq, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert torch.equal(seq, ids)


def test_generate_with_composed_edits_each_step(vlm):
    b = vlm.prepare(["<image>\nwhat is shown ?"], [Image.new("RGB", (32, 32), (200, 30, 30))])
    seen = []

    def edit(vlm, batch):
        h = vlm.resid_pre(3)
        seen.append(h.shape[1])
        ablate(vlm, 3, batch=batch, tokens="text", new_tokens=True)

    steered_generate(vlm, b, torch.randn(vlm.d_model), layer=1, k=2.0, every_step=True, edit=edit,
                     max_new_tokens=4, min_new_tokens=4)
    assert seen[0] == b.layout.shape[1] and seen[1:] == [1, 1, 1]


def test_bad_inputs_name_the_fix(vlm, batch):
    with pytest.raises(ValueError, match="d_model"):
        check_vector(torch.ones(vlm.d_model + 1), vlm.d_model)
    with pytest.raises(ValueError, match="NaN"):
        check_vector(torch.full((vlm.d_model,), float("nan")), vlm.d_model)
    with pytest.raises(ValueError, match="NaN"):
        run(vlm, batch, lambda: add(vlm, 1, torch.tensor([float("inf")] * vlm.d_model), batch=batch))
    with pytest.raises(SelectionError, match="outside the sequence"):
        select(batch, positions([batch.layout.shape[1] + 5]), nonempty=True)
    with pytest.raises(SelectionError, match=r"mask of the batch's \[batch, seq\]"):
        select(batch, torch.ones(2, 3, dtype=torch.bool), nonempty=True)
    with pytest.raises(SelectionError, match="tile 9 does not exist"):
        select(batch, tile(9), nonempty=True)
    with pytest.raises(ValueError, match="unknown token selection"):
        select(batch, "pictures", nonempty=True)
    with pytest.raises(SelectionError, match="needs the batch"):
        select(None, "image", nonempty=True)
    with pytest.raises(ValueError, match="width"):
        with torch.no_grad(), vlm.trace(batch):
            add(vlm, 1, torch.ones(3), batch=batch)


def test_sampled_steered_generation_is_seeded(vlm):
    b = vlm.prepare(["<image>\nwhat is shown ?"] * 2, [Image.new("RGB", (32, 32), (200, 30, 30))] * 2)
    v = torch.randn(vlm.d_model)
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        outs.append(steered_generate(vlm, b, v, layer=2, k=2.0, do_sample=True, temperature=1.5, max_new_tokens=5))
    assert outs[0] == outs[1] and len(outs[0]) == 2
