"""Attribution graphs (vlens.circuits) against outside references: HF's logits, HF module values read by nnsight,
a forward-only finite difference on the HF modules with hand-written freezes, circuit-tracer's own code
(in a separate virtual environment, when present) and circuit-tracer's pydantic graph models."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from pydantic import BaseModel

import vlens
from vlens.circuits import (LIVE, LocalReplacement, attribute, graph_json, intervene, random_transcoders,
                            write_graph_files)
from vlens.interventions import splice_transcoder

CT_PYTHON = os.environ.get("VLENS_CIRCUIT_TRACER_PYTHON", "/tmp/ctvenv/bin/python")


def _has_circuit_tracer() -> bool:
    if not Path(CT_PYTHON).exists():
        return False
    r = subprocess.run([CT_PYTHON, "-c", "import circuit_tracer"], capture_output=True)
    return r.returncode == 0


needs_ct = pytest.mark.skipif(not _has_circuit_tracer(), reason="no circuit-tracer venv (set VLENS_CIRCUIT_TRACER_PYTHON; "
                              "python -m venv /tmp/ctvenv && /tmp/ctvenv/bin/pip install circuit-tracer==0.5.0)")


@pytest.fixture(scope="module")
def case():
    vlm = vlens.tiny(n_layers=2, words=["red", "blue", "what", "colour"])
    img = Image.new("RGB", (32, 32), "white")
    img.paste((255, 0, 0), (8, 8, 24, 24))
    b = vlm.prepare(["<image>\nwhat colour"], [img])
    tcs = random_transcoders(vlm, d_sae=6, seed=3)
    g = attribute(vlm, tcs, b, target="red", images=[img], progress=False)
    return vlm, img, b, tcs, g


@pytest.mark.parametrize("family,skip", [("llava-next", False), ("llava-next", True), ("gemma3", False),
                                         ("llava", False), ("llava-onevision", False), ("qwen2.5-vl", False),
                                         ("qwen3-vl", False)])
def test_replacement_model_reproduces_hf_logits(family, skip):
    vlm = vlens.tiny(family=family, n_layers=2, words=["red"])
    b = vlm.prepare(["<image>\nred"], [Image.new("RGB", (32, 32), "blue")])
    rm = LocalReplacement(vlm, random_transcoders(vlm, d_sae=8, skip=skip))
    with torch.no_grad():
        hf = vlm.hf_model(**b.inputs).logits[0]
    clean = rm.run(b)
    assert torch.allclose(clean.logits.detach(), hf, atol=1e-5, rtol=0)
    pinned = rm.run(b, frozen=clean)   # queries, keys, norm scales, errors pinned; features recomputed
    assert torch.allclose(pinned.logits, hf, atol=1e-5, rtol=0)
    # the transcoders really are in the loop: zeroing a layer's features moves the logits
    zeroed = rm.run(b, frozen=clean, edits={1: lambda a: a * 0})
    assert (zeroed.logits - hf).abs().max() > 1e-3


def test_completeness_logit_and_feature_rows_sum_to_hf_values(case):
    vlm, img, b, tcs, g = case
    with torch.no_grad():
        logits = vlm.hf_model(**b.inputs).logits[0, g.position]
    red = vlm.processor.tokenizer.encode("red", add_special_tokens=False)[0]
    want = float(logits[red] - logits.mean())
    got = float(g.adjacency[g.logit_index(0)].sum())
    assert abs(got - want) <= 0.01 * abs(want) + 1e-6
    with torch.no_grad(), vlm.trace(b):
        m0 = vlm.read("mlp_in.0").save()
        m1 = vlm.read("mlp_in.1").save()
    mlp_in = [m0, m1]
    for j in [0, g.n_features // 2, g.n_features - 1]:
        L, p, f = g.features[j].tolist()
        enc = float(mlp_in[L][0, p] @ tcs[L].W_enc[:, f].detach())   # the feature's encoder input, without b_enc
        assert abs(float(g.adjacency[j].sum()) - enc) <= 0.01 * abs(enc) + 1e-5
    act = tcs[L].encode(mlp_in[L][0, p][None])[0, f]
    assert float(g.activations[-1]) == pytest.approx(float(act), rel=1e-5)


def _frozen_forward(vlm, b, clean, bump, live_norms=False):
    """The HF model with hand-written freezes (no vlens code): queries, keys and RMSNorm scales pinned to the clean
    run's (the norms' scales not, with `live_norms`), every MLP output pinned to its clean value, plus `bump`
    (layer, pos, vector), or a list of them, added at MLP outputs."""
    lm = vlm.hf_model.model.language_model
    bumps = [bump] if isinstance(bump, tuple) else list(bump)
    hooks = []
    for L, layer in enumerate(lm.layers):
        for name in ("q_proj", "k_proj"):
            hooks.append(getattr(layer.self_attn, name).register_forward_hook(
                lambda m, a, o, key=(L, name): clean[key]))
        for name in ("input_layernorm", "post_attention_layernorm")[: 0 if live_norms else 2]:
            norm = getattr(layer, name)
            hooks.append(norm.register_forward_hook(
                lambda m, a, o, key=(L, name): a[0] * m.weight / clean[key]))
        hooks.append(layer.mlp.register_forward_hook(
            lambda m, a, o, L=L: clean[("mlp", L)] + sum((v * (torch.arange(o.shape[1]) == p)[None, :, None]
                                                          for at, p, v in bumps if at == L), torch.zeros(()))))
    if not live_norms:
        hooks.append(lm.norm.register_forward_hook(lambda m, a, o: a[0] * m.weight / clean["final"]))
    try:
        with torch.no_grad():
            return vlm.hf_model(**b.inputs).logits[0]
    finally:
        for h in hooks:
            h.remove()


def _clean_values(vlm, b):
    lm = vlm.hf_model.model.language_model
    clean, hooks = {}, []
    rms = lambda x, m: x.pow(2).mean(-1, keepdim=True).add(m.variance_epsilon).sqrt()  # noqa: E731
    for L, layer in enumerate(lm.layers):
        for name in ("q_proj", "k_proj"):
            hooks.append(getattr(layer.self_attn, name).register_forward_hook(
                lambda m, a, o, key=(L, name): clean.__setitem__(key, o)))
        for name in ("input_layernorm", "post_attention_layernorm"):
            hooks.append(getattr(layer, name).register_forward_hook(
                lambda m, a, o, key=(L, name): clean.__setitem__(key, rms(a[0], m))))
        hooks.append(layer.mlp.register_forward_hook(lambda m, a, o, L=L: clean.__setitem__(("mlp", L), o)))
    hooks.append(lm.norm.register_forward_hook(lambda m, a, o: clean.__setitem__("final", rms(a[0], m))))
    with torch.no_grad():
        vlm.hf_model(**b.inputs)
    for h in hooks:
        h.remove()
    return clean


def test_edge_weights_match_a_finite_difference_on_the_hf_modules(case):
    vlm, img, b, tcs, g = case
    clean = _clean_values(vlm, b)
    base = _frozen_forward(vlm, b, clean, (-1, 0, 0))
    tok = g.logit_targets[0][1]
    target = lambda logits: float(logits[g.position, tok] - logits[g.position].mean())  # noqa: E731
    assert abs(target(base) - float(g.logit_values[0])) < 1e-4
    # the biggest feature -> logit edge and an error -> logit edge, each perturbed by eps of its own vector
    j = int(g.adjacency[g.logit_index(0), : g.n_features].abs().argmax())
    L, p, f = g.features[j].tolist()
    vec = g.activations[j] * tcs[L].W_dec[f].detach()
    eps = 1e-2
    moved = _frozen_forward(vlm, b, clean, (L, p, eps * vec))
    fd = (target(moved) - target(base)) / eps
    assert fd == pytest.approx(float(g.adjacency[g.logit_index(0), j]), rel=1e-3, abs=1e-5)


def test_jacobian_norm_edges_are_derivatives_of_the_model_with_live_norms(case):
    """norms="jacobian": an edge is the central finite difference of the HF model whose norms run unpinned."""
    vlm, img, b, tcs, _ = case
    g = attribute(vlm, tcs, b, target="red", norms="jacobian", progress=False)
    clean = _clean_values(vlm, b)
    tok = g.logit_targets[0][1]
    target = lambda logits: float(logits[g.position, tok] - logits[g.position].mean())  # noqa: E731
    for j in g.adjacency[g.logit_index(0), : g.n_features].abs().argsort(descending=True)[:2].tolist():
        L, p, f = g.features[j].tolist()
        vec = g.activations[j] * tcs[L].W_dec[f].detach()
        eps = 1e-3   # the live norm is far from linear at this scale in the tiny build: eps 1e-2 is 5% off
        up, down = (_frozen_forward(vlm, b, clean, (L, p, s * eps * vec), live_norms=True) for s in (1, -1))
        fd = (target(up) - target(down)) / (2 * eps)
        assert fd == pytest.approx(float(g.adjacency[g.logit_index(0), j]), rel=3e-3, abs=1e-4)
    # the frozen convention's edge differs by the part along the residual stream that the real norm divides out
    assert not torch.allclose(g.adjacency, attribute(vlm, tcs, b, target="red", progress=False).adjacency, atol=1e-4)


def test_feature_to_feature_edge_matches_a_finite_difference(case):
    vlm, img, b, tcs, g = case
    clean = _clean_values(vlm, b)
    rows = g.adjacency[: g.n_features, : g.n_features]
    t, s = divmod(int(rows.abs().argmax()), g.n_features)
    Lt, pt, ft = g.features[t].tolist()
    Ls, ps, fs = g.features[s].tolist()
    assert Ls < Lt
    vec = g.activations[s] * tcs[Ls].W_dec[fs].detach()
    reads = {}
    h = vlm.hf_model.model.language_model.layers[Lt].mlp.register_forward_pre_hook(
        lambda m, a: reads.__setitem__("x", a[0][0, pt]))
    try:
        _frozen_forward(vlm, b, clean, (-1, 0, 0))
        x0 = reads["x"] @ tcs[Lt].W_enc[:, ft]
        _frozen_forward(vlm, b, clean, (Ls, ps, 1e-2 * vec))
        x1 = reads["x"] @ tcs[Lt].W_enc[:, ft]
    finally:
        h.remove()
    assert float((x1 - x0) / 1e-2) == pytest.approx(float(g.adjacency[t, s]), rel=1e-3, abs=1e-5)


# -- circuit-tracer's JSON ---------------------------------------------------------------------------------


class _Metadata(BaseModel, extra="forbid"):  # circuit_tracer/frontend/graph_models.py 0.5.0, + vlens_ keys
    slug: str
    scan: str
    transcoder_list: list[str]
    prompt_tokens: list[str]
    prompt: str
    node_threshold: float | None = None
    schema_version: int | None = 1
    vlens_images: list[str]
    vlens_norms: str


class _Patch(BaseModel, extra="forbid"):
    image: int
    box: list[float]
    tile: int
    row: int
    col: int
    kind: str


class _Node(BaseModel, extra="forbid"):
    node_id: str
    feature: int
    layer: str
    ctx_idx: int
    feature_type: str
    token_prob: float = 0.0
    is_target_logit: bool = False
    run_idx: int = 0
    reverse_ctx_idx: int = 0
    jsNodeId: str
    clerp: str = ""
    influence: float | None = None
    activation: float | None = None
    vlens_influence: float
    vlens_patch: _Patch | None = None


class _Link(BaseModel, extra="forbid"):
    source: str
    target: str
    weight: float


class _QParams(BaseModel, extra="forbid"):
    pinnedIds: list[str]
    supernodes: list[list[str]]
    linkType: str
    clickedId: str
    sg_pos: str


class _Model(BaseModel, extra="forbid"):
    metadata: _Metadata
    qParams: _QParams
    nodes: list[_Node]
    links: list[_Link]


def test_graph_json_fits_circuit_tracers_models_and_carries_patches(case, tmp_path):
    vlm, img, b, tcs, g = case
    path = write_graph_files(g, "red", tmp_path)
    data = json.loads(path.read_text())   # strict JSON: NaN would fail to write (allow_nan=False)
    m = _Model.model_validate(data)
    ids = {n.node_id for n in m.nodes}
    assert len(ids) == len(m.nodes)
    assert all(lk.source in ids and lk.target in ids for lk in m.links)
    assert {n.feature_type for n in m.nodes} <= {"cross layer transcoder", "mlp reconstruction error", "embedding",
                                                 "logit"}
    assert sum(n.is_target_logit for n in m.nodes) == 1
    # every base/high-res image token is a patch node whose box is the token geometry's box
    table = b.layout.image_token_table()
    pos = b.layout.image[0].nonzero()[:, 0]
    patches = {n.ctx_idx: n.vlens_patch for n in m.nodes if n.vlens_patch is not None}
    for k, p in enumerate(pos.tolist()):
        if int(table["kind"][k]) == vlens.tokens.NEWLINE:
            assert p not in patches
            continue
        q = patches[p]
        assert q.box == table["box"][k].tolist()
        assert (q.tile, q.row, q.col) == (int(table["tile"][k]), int(table["row"][k]), int(table["col"][k]))
        x0, y0, x1, y1 = q.box
        assert 0 <= x0 < x1 <= img.width and 0 <= y0 < y1 <= img.height
    url = m.metadata.vlens_images[0]
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert list(decoded.convert("RGB").getdata()) == list(img.getdata())
    index = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert [e["slug"] for e in index["graphs"]] == ["red"]


def test_scores_and_pruning(case):
    vlm, img, b, tcs, g = case
    rep, comp = g.scores()
    assert 0 <= rep <= 1 and 0 <= comp <= 1
    r = g.prune(0.5, 0.9)
    assert r.node_mask[g.token_index(0):].all()
    assert r.node_mask[: g.n_features].sum() < g.n_features
    # without error nodes' inputs, completeness is 1: zero every error column
    A = g.adjacency.clone()
    A[:, g.n_features: g.token_index(0)] = 0
    from vlens.circuits import graph_scores
    assert graph_scores(A, g.logit_weights(), g.n_features, g.n_pos, g.n_layers)[1] == pytest.approx(1.0)


def _run_ct(script: str, tmp_path: Path) -> dict:
    f = tmp_path / "ct_script.py"
    f.write_text(textwrap.dedent(script))
    r = subprocess.run([CT_PYTHON, str(f)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@needs_ct
def test_pruning_scores_and_nodes_match_circuit_tracers_own_code(case, tmp_path):
    vlm, img, b, tcs, g = case
    torch.save({"A": g.adjacency, "feats": g.features, "acts": g.activations, "ids": g.input_ids,
                "targets": g.logit_targets, "probs": g.logit_probs, "n_layers": g.n_layers}, tmp_path / "g.pt")
    out = _run_ct("""
        import json, types, torch
        from circuit_tracer.graph import prune_graph, compute_graph_scores, compute_node_influence
        from circuit_tracer.utils.create_graph_files import create_nodes, create_used_nodes_and_edges
        d = torch.load("g.pt", weights_only=False)
        g = types.SimpleNamespace(adjacency_matrix=d["A"], input_tokens=d["ids"], logit_targets=d["targets"],
            selected_features=torch.arange(len(d["feats"])), active_features=d["feats"], activation_values=d["acts"],
            logit_probabilities=d["probs"], cfg=types.SimpleNamespace(n_layers=d["n_layers"]), n_pos=len(d["ids"]))
        r = prune_graph(g, 0.8, 0.98)
        nodes = create_nodes(g, r.node_mask, None, r.cumulative_scores)
        used, links = create_used_nodes_and_edges(g, nodes, r.edge_mask)
        print(json.dumps({"scores": compute_graph_scores(g), "node_mask": r.node_mask.tolist(),
                          "edges": int(r.edge_mask.sum()), "nodes": [n.model_dump() for n in used], "links": links}))
    """, tmp_path)
    ours = g.prune(0.8, 0.98)
    assert ours.node_mask.tolist() == out["node_mask"]
    assert int(ours.edge_mask.sum()) == out["edges"]
    assert g.scores() == pytest.approx(tuple(out["scores"]), rel=1e-5)
    data = graph_json(g, "red")
    strip = lambda n: {k: v for k, v in n.items() if not k.startswith("vlens_")}  # noqa: E731
    assert len(data["nodes"]) == len(out["nodes"]) and len(data["links"]) == len(out["links"])
    for mine, theirs in zip([strip(n) for n in data["nodes"]] + data["links"], out["nodes"] + out["links"]):
        assert mine.keys() == theirs.keys()
        for k, v in theirs.items():
            assert mine[k] == (pytest.approx(v, rel=1e-5, abs=1e-7) if isinstance(v, float) else v), k


@needs_ct
def test_circuit_tracers_server_serves_the_graph(case, tmp_path):
    vlm, img, b, tcs, g = case
    write_graph_files(g, "red", tmp_path / "graphs")
    out = _run_ct("""
        import json, urllib.request
        from circuit_tracer.frontend.graph_models import Model
        from circuit_tracer.frontend.local_server import serve
        server = serve(data_dir="graphs", port=8046)
        try:
            meta = json.load(urllib.request.urlopen("http://localhost:8046/data/graph-metadata.json"))
            raw = urllib.request.urlopen("http://localhost:8046/graph_data/red.json").read()
            page = urllib.request.urlopen("http://localhost:8046/index.html").status
        finally:
            server.stop()
        m = Model.model_validate_json(raw)
        print(json.dumps({"slugs": [x["slug"] for x in meta["graphs"]], "nodes": len(m.nodes),
                          "links": len(m.links), "page": page}))
    """, tmp_path)
    data = graph_json(g, "red")
    assert out == {"slugs": ["red"], "nodes": len(data["nodes"]), "links": len(data["links"]), "page": 200}


# -- interventions ---------------------------------------------------------------------------------------


def test_interventions_forward_checks(case):
    vlm, img, b, tcs, g = case
    j = int(g.adjacency[g.logit_index(0), : g.n_features].abs().argmax())
    f = tuple(g.features[j].tolist())
    r = intervene(vlm, tcs, b, g, [f])
    # the frozen replacement model, run forward with every other feature pinned, moves the logit by the direct edge
    assert r.replacement_frozen == pytest.approx(r.predicted_direct, rel=1e-3, abs=1e-5)
    assert r.predicted_direct == pytest.approx(-float(g.adjacency[g.logit_index(0), j]), rel=1e-5)
    # setting a feature to its own value changes nothing anywhere, the real model included
    same = intervene(vlm, tcs, b, g, [f], value=float(g.activations[j]))
    assert abs(same.model) < 1e-5 and abs(same.replacement) < 1e-5
    # a small change in the real model moves the logit the way the graph says, to first order
    small = intervene(vlm, tcs, b, g, [f], value=0.99 * float(g.activations[j]))
    assert small.model * small.predicted > 0
    assert set(r.live_alone) == set(LIVE)


@pytest.mark.parametrize("family", ["llava-next", "gemma3"])
def test_all_parts_live_is_the_real_model_with_spliced_decoder_writes(family):
    """The real-model measure against nnsight: `splice_transcoder` (error term kept) edits the same features."""
    vlm = vlens.tiny(family=family, n_layers=3, words=["red"])
    b = vlm.prepare(["<image>\nred"], [Image.new("RGB", (32, 32), "blue")])
    tcs = random_transcoders(vlm, d_sae=8, seed=1)
    rm = LocalReplacement(vlm, tcs)
    with torch.no_grad():
        clean = rm.run(b)
    last = b.layout.shape[1] - 1
    edits = {0: (last, 2), 1: (last - 1, 5)}    # layer: (position, feature) set to 3.0

    def edit_at(p, f):
        def edit(a):
            a[p, f] = 3.0
            return a
        return edit
    got = rm.run(b, frozen=clean, edits={L: edit_at(*pf) for L, pf in edits.items()}, live=LIVE).logits
    with torch.no_grad(), vlm.trace(b):
        for L, (p, f) in edits.items():
            splice_transcoder(vlm, tcs[L], batch=b, tokens=[p], error=True,
                              edit=lambda a, f=f: torch.cat([a[:, :f], torch.full_like(a[:, :1], 3.0), a[:, f + 1:]], 1))
        want = vlm.read("logits").save()
    assert (want[0] - clean.logits.detach()).abs().max() > 1e-3      # the edit does move the model
    assert torch.allclose(got, want[0], atol=1e-4, rtol=1e-4)


def test_max_feature_nodes_keeps_a_subgraph_of_the_full_graph(case):
    vlm, img, b, tcs, g = case
    small = attribute(vlm, tcs, b, target="red", max_feature_nodes=20, chunk=8, progress=False)
    assert small.n_features == 20
    idx = [g.feature_index(*f) for f in small.features.tolist()]
    assert torch.allclose(small.adjacency[:20, :20], g.adjacency[idx][:, idx], atol=1e-6)
    rest = list(range(g.n_features, g.adjacency.shape[0]))
    assert torch.allclose(small.adjacency[20:, 20:], g.adjacency[rest][:, rest], atol=1e-6)
    total = float(small.adjacency[small.logit_index(0)].sum() + small.dropped_logit_effect[0])
    assert total == pytest.approx(float(g.logit_values[0]), rel=1e-3, abs=1e-5)


def test_the_graph_panel_reads_the_json(case, tmp_path):
    from vlens import graph_view

    vlm, img, b, tcs, g = case
    data = graph_view.read_graph(write_graph_files(g, "red", tmp_path))
    logit = next(n["node_id"] for n in data["nodes"] if n["feature_type"] == "logit")
    patches = graph_view.patch_influence(data, logit)
    assert len(patches) == len(g.patch_positions()) - sum(
        int(k) == vlens.tokens.NEWLINE for k in b.layout.image_token_table()["kind"])
    assert all(p["influence"] >= 0 for p in patches)


@pytest.mark.parametrize("family", ["gemma3", "llava", "llava-onevision", "qwen2.5-vl"])
def test_completeness_in_other_families(family):
    vlm = vlens.tiny(family=family, n_layers=2, words=["red"])
    b = vlm.prepare(["<image>\nred"], [Image.new("RGB", (32, 32), "red")])
    g = attribute(vlm, random_transcoders(vlm, d_sae=4), b, target="red", progress=False)
    with torch.no_grad():
        logits = vlm.hf_model(**b.inputs).logits[0, g.position]
    red = vlm.processor.tokenizer.encode("red", add_special_tokens=False)[0]
    want = float(logits[red] - logits.mean())
    assert float(g.adjacency[g.logit_index(0)].sum()) == pytest.approx(want, rel=1e-3, abs=1e-5)
