"""Cross-layer transcoders (vlens.circuits.clt) in the replacement model and the graph, against HF's logits, a
finite difference on the HF modules with hand-written freezes, and circuit-tracer's own `load_clt` (in its own
virtual environment, when present)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import vlens
from vlens.circuits import LIVE, LocalReplacement, attribute, intervene
from vlens.circuits.clt import CrossLayerTranscoder, fit_clt

from test_circuits import _clean_values, _frozen_forward, _run_ct, needs_ct


def _setup(family="llava-next", n_layers=3):
    vlm = vlens.tiny(family=family, n_layers=n_layers, words=["red", "blue", "what", "colour"])
    img = Image.new("RGB", (32, 32), "white")
    img.paste((255, 0, 0), (8, 8, 24, 24))
    b = vlm.prepare(["<image>\nwhat colour"], [img])
    return vlm, b, CrossLayerTranscoder.random(vlm.n_layers, vlm.d_model, 8, seed=2)


@pytest.fixture(scope="module")
def case():
    vlm, b, clt = _setup()
    return vlm, b, clt, attribute(vlm, clt, b, target="red", progress=False)


@pytest.mark.parametrize("family", ["llava-next", "gemma3"])
def test_replacement_with_a_clt_reproduces_hf_logits(family):
    vlm, b, clt = _setup(family)
    rm = LocalReplacement(vlm, clt)
    with torch.no_grad():
        hf = vlm.hf_model(**b.inputs).logits[0]
    clean = rm.run(b)
    assert torch.allclose(clean.logits.detach(), hf, atol=1e-5, rtol=0)
    assert torch.allclose(rm.run(b, frozen=clean).logits, hf, atol=1e-5, rtol=0)
    assert torch.allclose(rm.run(b, frozen=clean, live=LIVE).logits, hf, atol=1e-5, rtol=0)
    # layer 0's features write to every later MLP output: zeroing them moves layer 2's output
    zeroed = rm.run(b, frozen=clean, edits={0: lambda a: a * 0}, freeze_features=True)
    w = clt.W_dec[0][:, 2]
    assert torch.allclose(zeroed.mlp_out[2] - clean.mlp_out[2], -clean.acts[0] @ w, atol=1e-5)


def test_clt_graph_is_complete(case):
    vlm, b, clt, g = case
    with torch.no_grad():
        logits = vlm.hf_model(**b.inputs).logits[0, g.position]
    red = vlm.processor.tokenizer.encode("red", add_special_tokens=False)[0]
    want = float(logits[red] - logits.mean())
    assert float(g.adjacency[g.logit_index(0)].sum()) == pytest.approx(want, rel=1e-3, abs=1e-5)
    assert g.transcoder_list == [f"blocks.{L}.hook_mlp_in" for L in range(3)]


def test_a_cross_layer_edge_is_a_finite_difference_of_all_its_writes(case):
    """A layer-0 feature's edge to the logit: its decoder rows added at MLP outputs 0, 1 and 2 of the frozen HF model."""
    vlm, b, clt, g = case
    clean = _clean_values(vlm, b)
    tok = g.logit_targets[0][1]
    target = lambda logits: float(logits[g.position, tok] - logits[g.position].mean())  # noqa: E731
    layer0 = (g.features[:, 0] == 0).nonzero()[:, 0]
    j = int(layer0[g.adjacency[g.logit_index(0), layer0].abs().argmax()])
    _, p, f = g.features[j].tolist()
    eps = 1e-2
    writes = [(out, p, eps * g.activations[j] * clt.W_dec[0][f, out].detach()) for out in range(3)]
    fd = (target(_frozen_forward(vlm, b, clean, writes)) - target(_frozen_forward(vlm, b, clean, (-1, 0, 0)))) / eps
    assert fd == pytest.approx(float(g.adjacency[g.logit_index(0), j]), rel=1e-3, abs=1e-5)
    # and the first write alone is not the edge: the later layers' writes matter
    only0 = (target(_frozen_forward(vlm, b, clean, writes[:1])) - target(_frozen_forward(vlm, b, clean, (-1, 0, 0))))
    assert abs(only0 / eps - fd) > 1e-3


def test_feature_edges_taken_in_blocks_are_the_same(case, monkeypatch):
    """The writes go through the gradients in blocks (memory); blocks of 3 writes give the same graph."""
    import vlens.circuits.graph as graph_module

    vlm, b, clt, g = case
    monkeypatch.setattr(graph_module, "EDGE_BLOCK", 3 * 64 * vlm.d_model)   # 3 writes per block at chunk 64
    small = attribute(vlm, clt, b, target="red", progress=False)
    assert torch.allclose(small.adjacency, g.adjacency, atol=1e-6)


def test_clt_interventions_run_through_every_layer(case):
    vlm, b, clt, g = case
    j = int(g.adjacency[g.logit_index(0), : g.n_features].abs().argmax())
    r = intervene(vlm, clt, b, g, [tuple(g.features[j].tolist())])
    assert r.replacement_frozen == pytest.approx(r.predicted_direct, rel=1e-3, abs=1e-5)


def test_fit_clt_learns_a_cross_layer_map():
    """Layer 1's output depends on layer 0's input only: a cross-layer feature can carry it."""
    torch.manual_seed(0)
    x = torch.randn(2048, 2, 16)
    y = torch.stack([torch.relu(x[:, 0]), torch.relu(x[:, 0]) * 2], 1)
    clt = fit_clt(x, y, d_sae=32, steps=400, lr=1e-2, l1=0.0, progress=False)
    with torch.no_grad():
        pred = clt(x.transpose(0, 1)).transpose(0, 1)
    ev = 1 - (pred - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    assert ev > 0.9
    assert clt.W_dec[0][:, 1].norm() > clt.W_dec[1][:, 0].norm()   # layer 1's output is written from layer 0


@needs_ct
def test_circuit_tracers_load_clt_reads_the_files(tmp_path):
    clt = CrossLayerTranscoder.random(3, 16, 8, seed=1)
    clt.save(tmp_path / "clt")
    x = torch.randn(3, 5, 16)
    torch.save(x, tmp_path / "x.pt")
    out = _run_ct("""
        import json, torch
        from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
        clt = load_clt("clt", device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)
        x = torch.load("x.pt")
        print(json.dumps({"acts": clt.encode(x).tolist(), "out": clt.forward(x).tolist()}))
    """, tmp_path)
    with torch.no_grad():
        acts = torch.stack([clt.encode_layer(x[L], L) for L in range(3)])
        assert torch.allclose(torch.tensor(out["acts"]), acts, atol=1e-5)
        assert torch.allclose(torch.tensor(out["out"]), clt(x), atol=1e-5)
