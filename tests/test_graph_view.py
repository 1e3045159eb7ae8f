"""vlens.graph_view: circuit-tracer's influence (its own formulas, and numpy's matrix inverse), patch heat by hand,
and the stand-alone graph page (the data is in it; in headless Chromium it draws and paints what Python computed).

Outside references: `normalize_matrix` and `compute_influence` below are copied from circuit-tracer 0.5.0
(`circuit_tracer/graph.py`; circuit-tracer cannot be installed beside vlens's pins), `numpy.linalg.inv` gives
`(I − A)⁻¹ − I`, and the small graphs' influences are worked out by hand in the comments.
"""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlens.errors import InputError, NotFoundError
from vlens.graph_view import (adjacency, example_graph, export_html, graph_page, image_share, patch_heat,
                              patch_influence, path_influence, read_graph, view_data)
from vlens.viz import image_data_uri

sys.path.insert(0, str(Path(__file__).resolve().parent))
from browser_utils import chromium, playwright_available  # noqa: E402


# -- circuit-tracer 0.5.0, circuit_tracer/graph.py, verbatim --------------------------------------------------
def normalize_matrix(matrix: torch.Tensor) -> torch.Tensor:
    normalized = matrix.abs()
    return normalized / normalized.sum(dim=1, keepdim=True).clamp(min=1e-10)


def compute_influence(A: torch.Tensor, logit_weights: torch.Tensor, max_iter: int = 1000):
    current_influence = logit_weights @ A
    influence = current_influence
    iterations = 0
    while current_influence.any():
        if iterations >= max_iter:
            raise RuntimeError(f"Influence computation failed to converge after {iterations} iterations")
        current_influence = current_influence @ A
        influence += current_influence
        iterations += 1
    return influence
# ---------------------------------------------------------------------------------------------------------------


def _node(node_id, layer, ctx, kind, **extra):
    return {"node_id": node_id, "feature": 0, "layer": str(layer), "ctx_idx": ctx, "feature_type": kind,
            "jsNodeId": node_id, "clerp": "", **extra}


def _graph(nodes, links, images=()):
    meta = {"slug": "t", "scan": "vlens", "transcoder_list": [], "prompt_tokens": ["<image>"] * 8 + ["is", "red"],
            "prompt": "<image> is red", "vlens_images": [image_data_uri(im) for im in images]}
    return {"metadata": meta, "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
                                          "sg_pos": ""}, "nodes": nodes, "links": links}


def random_graph(seed: int, n_layers: int = 3, width: int = 3) -> dict:
    """A random layered graph on a 16×16 picture: a base patch over it all, four quadrant patches, two text tokens,
    error nodes, `width` features per layer, a logit; signed weights, links only from lower rows to higher ones."""
    rng = np.random.default_rng(seed)
    boxes = [[0, 0, 16, 16], [0, 0, 8, 8], [8, 0, 16, 8], [0, 8, 8, 16], [8, 8, 16, 16]]
    rows = [[_node(f"p{k}", "E", k, "embedding", vlens_patch={"image": 0, "box": b, "tile": int(k > 0),
                                                               "row": k // 3, "col": k % 3})
             for k, b in enumerate(boxes)] + [_node(f"t{k}", "E", 8 + k, "embedding") for k in range(2)]]
    for L in range(n_layers):
        rows.append([_node(f"{L}_{j}_{9}", L, 9, "cross layer transcoder", activation=float(rng.random()))
                     for j in range(width)] + [_node(f"err{L}", L, 9, "mlp reconstruction error")])
    rows.append([_node("logit", n_layers + 1, 9, "logit", is_target_logit=True)])
    links = []
    for r in range(1, len(rows)):
        below = [n for row in rows[:r] for n in row]
        for n in rows[r]:
            if "error" in n["feature_type"]:
                continue  # error nodes are inputs, as in circuit-tracer
            for m in below:
                if rng.random() < 0.6:
                    links.append({"source": m["node_id"], "target": n["node_id"], "weight": float(rng.normal())})
    return _graph([n for row in rows for n in row], links, [Image.new("RGB", (16, 16), (90, 90, 90))])


def _dense(graph):
    """A[target, source] built here from the links, independently of vlens."""
    ids = [n["node_id"] for n in graph["nodes"]]
    a = torch.zeros(len(ids), len(ids), dtype=torch.float64)
    for link in graph["links"]:
        a[ids.index(link["target"]), ids.index(link["source"])] += link["weight"]
    return ids, a


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_influence_is_circuit_tracers_and_the_matrix_inverse(seed):
    g = random_graph(seed)
    ids, w = _dense(g)
    A = normalize_matrix(w)
    np.testing.assert_allclose(adjacency(g), A.numpy(), atol=1e-12)
    inverse = np.linalg.inv(np.eye(len(ids)) - A.numpy()) - np.eye(len(ids))
    B = path_influence(g)
    np.testing.assert_allclose(B, inverse, atol=1e-10)
    # circuit-tracer's own loop, seeded with the logit (what prune_graph does) and with a mid-graph feature
    for node in ("logit", "1_0_9"):
        onehot = torch.zeros(len(ids), dtype=torch.float64)
        onehot[ids.index(node)] = 1
        np.testing.assert_allclose(B[ids.index(node)], compute_influence(A, onehot).numpy(), atol=1e-10)
    # a chosen set of sources gives those columns
    np.testing.assert_allclose(path_influence(g, ["p1", "t0"]), inverse[:, [ids.index("p1"), ids.index("t0")]],
                               atol=1e-10)


def test_input_influence_of_a_node_sums_to_one_and_the_image_share_is_the_patches_part():
    g = random_graph(3)
    ids, w = _dense(g)
    inputs = [i for i in range(len(ids)) if not w[i].any()]  # nodes without inputs: embeddings and error nodes
    B = np.linalg.inv(np.eye(len(ids)) - normalize_matrix(w).numpy())
    patches = [ids.index(f"p{k}") for k in range(5)]
    for node in ("logit", "2_1_9", "0_2_9"):
        i = ids.index(node)
        assert B[i, inputs].sum() == pytest.approx(1.0, abs=1e-9)
        assert image_share(g, node) == pytest.approx(B[i, patches].sum(), abs=1e-9)


def test_the_example_graph_by_hand():
    g = example_graph()
    # feat's inputs: |3| and |−1| → 0.75, 0.25; the logit's: feat 4/5 = 0.8, the text token 1/5 = 0.2
    assert [round(p["influence"], 12) for p in patch_influence(g, "feat")] == [0.75, 0.25]
    assert [round(p["influence"], 12) for p in patch_influence(g, "logit")] == [0.6, 0.2]
    assert image_share(g, "logit") == pytest.approx(0.8)
    # a patch node lights up itself
    assert [p["influence"] for p in patch_influence(g, "patch-1")] == [0.0, 1.0]
    assert image_share(g, "patch-1") == 0.0


def test_patch_heat_sums_the_patches_over_each_pixel():
    picture = Image.new("RGB", (8, 8))
    nodes = [_node("base", "E", 0, "embedding", vlens_patch={"image": 0, "box": [0, 0, 8, 8], "tile": 0, "row": 0,
                                                                 "col": 0}),
             _node("hi", "E", 1, "embedding", vlens_patch={"image": 0, "box": [0, 0, 4, 4], "tile": 1, "row": 0,
                                                               "col": 0}),
             _node("f", 0, 2, "cross layer transcoder")]
    g = _graph(nodes, [{"source": "base", "target": "f", "weight": 1.0},
                       {"source": "hi", "target": "f", "weight": -3.0}], [picture])
    heat = patch_heat(g, "f")
    # the base patch has 1/4 of f's influence, the high-res one 3/4: under both, 1; elsewhere 1/4
    expected = np.full((8, 8), 0.25)
    expected[:4, :4] = 1.0
    np.testing.assert_allclose(heat, expected)
    with pytest.raises(InputError, match="picture 1"):
        patch_heat(g, "f", image=1)


def test_view_data_is_the_python_numbers():
    g = random_graph(4)
    v = view_data(g)
    assert v["ids"] == [n["node_id"] for n in g["nodes"]] and len(v["links"]) == len(g["links"])
    i = v["ids"].index("logit")
    exact = [p["influence"] for p in patch_influence(g, "logit")]
    assert [[k, pytest.approx(x, rel=1e-3)] for k, x in enumerate(exact) if x > 0] == v["heat"][i]
    assert v["share"][i] == pytest.approx(image_share(g, "logit"), rel=1e-3)
    assert [n["row"] for n in v["nodes"]][:7] == [0] * 7 and v["nodes"][i]["row"] == 4  # E, L0-L2, then the logit
    assert v["images"][0]["size"] == [16, 16]


def test_bad_graphs_are_refused_with_the_fix(tmp_path):
    g = example_graph()
    with pytest.raises(InputError, match="no 'links'"):
        read_graph({"metadata": {}, "nodes": []})
    with pytest.raises(InputError, match="link 0"):
        read_graph({**g, "links": [{"source": "patch-0", "target": "nope", "weight": 1.0}]})
    bad_box = json.loads(json.dumps(g))
    bad_box["nodes"][0]["vlens_patch"]["box"] = [4, 0, 4, 8]
    with pytest.raises(InputError, match="x1 > x0"):
        read_graph(bad_box)
    with pytest.raises(InputError, match="cycle"):
        path_influence({**g, "links": g["links"] + [{"source": "logit", "target": "feat", "weight": 1.0}]})
    with pytest.raises(NotFoundError, match="no node 'nope'"):
        patch_influence(g, "nope")
    with pytest.raises(NotFoundError, match="no graph file"):
        read_graph(tmp_path / "missing.json")
    (tmp_path / "notes.json").write_text("not json")
    with pytest.raises(InputError, match="is not JSON"):
        read_graph(tmp_path / "notes.json")
    (tmp_path / "g.json").write_text(json.dumps(g))
    assert read_graph(tmp_path / "g.json") == g and read_graph(json.dumps(g)) == g


def test_the_static_page_holds_everything():
    g = random_graph(5)
    html = graph_page(g, title="random graph")
    assert html.startswith("<!doctype html>") and "<title>random graph</title>" in html
    assert g["metadata"]["vlens_images"][0] in html  # the picture, inlined
    assert "vlensGraphView(" in html and "<script src" not in html and "http" not in html.replace(
        'xmlns="http', "").replace("http://www.w3.org/2000/svg", "")  # nothing is fetched
    start = html.index('<script id="graph-data" type="application/json">') + len(
        '<script id="graph-data" type="application/json">')
    data = json.loads(html[start:html.index("</script>", start)])
    assert data == json.loads(json.dumps(view_data(g)))


def canvas_alpha(page, canvas: str) -> np.ndarray:
    """The alpha channel of a canvas of the page, as an array [h, w]."""
    url = page.eval_on_selector(canvas, "c => c.toDataURL('image/png')")
    a = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGBA"))
    return a[..., 3].astype(int)


def expected_alpha(graph, node) -> np.ndarray:
    """What the page must paint: Python's pixel heat, scaled to alpha 170 at its maximum (vlens.viz's red)."""
    heat = patch_heat(graph, node)
    return np.round(170 * heat / heat.max()).astype(int) if heat.max() > 0 else np.zeros(heat.shape, int)


@pytest.mark.browser
@pytest.mark.skipif(chromium() is None, reason="chromium is not on PATH (apt-get install -y chromium)")
@pytest.mark.skipif(not playwright_available(), reason="playwright is not installed (pip install playwright)")
def test_the_static_page_draws_and_paints_the_python_heat(tmp_path):
    from browser_utils import browser_page

    g = random_graph(6)
    path = export_html(g, tmp_path / "graph.html")
    with browser_page((1300, 900)) as page:
        page.goto(Path(path).as_uri())
        page.wait_for_selector("#graph svg .vg-node")
        assert page.eval_on_selector_all("#graph .vg-node", "els => els.length") == len(g["nodes"])
        assert page.eval_on_selector_all("#graph .vg-link", "els => els.length") == len(g["links"])
        assert page.get_attribute("#graph", "data-selected") == "logit"  # the target logit, selected at first
        into_logit = sum(link["target"] == "logit" for link in g["links"])
        assert page.eval_on_selector_all("#graph .vg-link-on", "els => els.length") == into_logit
        np.testing.assert_allclose(canvas_alpha(page, "#graph-heat-0"), expected_alpha(g, "logit"), atol=1)
        for node in ("1_2_9", "p3"):
            page.click(f"#graph .vg-node[data-id='{node}']")
            assert page.get_attribute("#graph", "data-selected") == node
            np.testing.assert_allclose(canvas_alpha(page, "#graph-heat-0"), expected_alpha(g, node), atol=1)
        share = float(page.get_attribute("#graph .vg-info", "data-share"))
        assert share == 0.0  # a patch's own box is not input influence
        assert "image patches: 0.0%" in page.inner_text("#graph .vg-info")


def test_shared_node_ids_are_one_node_with_a_warning():
    """circuit-tracer's ids collide: feature 1 of layer 0 and the layer-1 error node at position 5 are both 0_1_5."""
    from vlens.graph_view import GraphWarning

    nodes = [_node("E_9_5", "E", 5, "embedding", vlens_patch={"image": 0, "box": [0, 0, 8, 8], "tile": 0, "row": 0,
                                                               "col": 0}),
             _node("0_1_5", 1, 5, "mlp reconstruction error"), _node("0_1_5", 0, 5, "cross layer transcoder"),
             _node("3_4_5", 2, 5, "logit", is_target_logit=True)]
    links = [{"source": "E_9_5", "target": "0_1_5", "weight": 2.0}, {"source": "0_1_5", "target": "3_4_5",
                                                                    "weight": 1.0},
             {"source": "E_9_5", "target": "3_4_5", "weight": 0.0}]  # a zero link, as at edge threshold 1.0
    g = _graph(nodes, links, [Image.new("RGB", (8, 8))])
    with pytest.warns(GraphWarning, match="0_1_5"):
        kept = read_graph(g)
    assert [n["feature_type"] for n in kept["nodes"]] == ["embedding", "cross layer transcoder", "logit"]
    with pytest.warns(GraphWarning):
        assert [p["influence"] for p in patch_influence(g, "3_4_5")] == [1.0]  # patch → feature → logit
        assert len(view_data(g)["links"]) == 2  # the zero link is not drawn


def test_graphs_of_vlens_circuits_open_and_their_influence_is_the_exporters():
    """A graph of `vlens.circuits` (tiny model, random transcoders, nothing pruned): the view's patch influence on
    the target logit is the exporter's own circuit-tracer influence (`vlens_influence`, weighted by the logit's
    probability), and the page holds it."""
    from vlens.circuits import attribute, graph_json, random_transcoders
    import vlens

    vlm = vlens.tiny(n_layers=1, words=["red", "blue"])
    picture = Image.new("RGB", (32, 32), "red")
    batch = vlm.prepare(["<image>\nWhat colour?"], [picture])
    graph = attribute(vlm, random_transcoders(vlm, d_sae=8), batch, target="red", images=[picture], progress=False)
    g = json.loads(json.dumps(graph_json(graph, "tiny", node_threshold=1.0, edge_threshold=1.0)))
    ids = [n["node_id"] for n in g["nodes"]]
    assert len(set(ids)) == len(ids)  # one layer: no shared ids (see the test above)
    logit = next(n["node_id"] for n in g["nodes"] if n["is_target_logit"])
    theirs = {n["node_id"]: n["vlens_influence"] / float(graph.logit_probs[0]) for n in g["nodes"]}
    ours = patch_influence(g, logit)
    assert len(ours) == sum("vlens_patch" in n for n in g["nodes"]) > 0
    np.testing.assert_allclose([p["influence"] for p in ours], [theirs[p["node_id"]] for p in ours], rtol=1e-5)
    assert patch_heat(g, logit).shape == (32, 32) and "vlensGraphView(" in graph_page(g)


def test_the_example_and_test_graphs_fit_circuit_tracers_models():
    """The fixtures above are circuit-tracer graphs: its frontend's pydantic models (circuit_tracer/frontend/
    graph_models.py 0.5.0, copied with their fields and defaults) read them; vlens's keys are extra."""
    from pydantic import BaseModel

    class Metadata(BaseModel):
        slug: str
        scan: str
        transcoder_list: list[str]
        prompt_tokens: list[str]
        prompt: str
        node_threshold: float | None = None
        schema_version: int | None = 1

    class QParams(BaseModel):
        pinnedIds: list[str]
        supernodes: list[list[str]]
        linkType: str
        clickedId: str
        sg_pos: str

    class Node(BaseModel):
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

    class Model(BaseModel):
        metadata: Metadata
        qParams: QParams
        nodes: list[Node]
        links: list[dict]

    for g in (example_graph(), random_graph(0)):
        m = Model.model_validate(g)
        assert len(m.nodes) == len(g["nodes"]) and {n.feature_type for n in m.nodes} >= {"embedding", "logit"}


def two_picture_graph() -> dict:
    """Patch a (all of an 8×8 picture) and b (the right half of a 12×6 one) feed f with weights 1 and 3; f the logit."""
    pics = [Image.new("RGB", (8, 8)), Image.new("RGB", (12, 6))]
    nodes = [_node("a", "E", 0, "embedding", vlens_patch={"image": 0, "box": [0, 0, 8, 8], "tile": 0, "row": 0,
                                                           "col": 0}),
             _node("b", "E", 1, "embedding", vlens_patch={"image": 1, "box": [6, 0, 12, 6], "tile": 0, "row": 0,
                                                           "col": 1}),
             _node("f", 0, 2, "cross layer transcoder"), _node("logit", 2, 2, "logit", is_target_logit=True)]
    links = [{"source": "a", "target": "f", "weight": 1.0}, {"source": "b", "target": "f", "weight": 3.0},
             {"source": "f", "target": "logit", "weight": 1.0}]
    return _graph(nodes, links, pics)


def test_two_pictures_each_get_their_patches():
    g = two_picture_graph()
    expected1 = np.zeros((6, 12))
    expected1[:, 6:] = 0.75  # b has 3/4 of f's inputs
    np.testing.assert_allclose(patch_heat(g, "logit", image=1), expected1)
    np.testing.assert_allclose(patch_heat(g, "logit", image=0), np.full((8, 8), 0.25))


@pytest.mark.browser
@pytest.mark.skipif(chromium() is None, reason="chromium is not on PATH (apt-get install -y chromium)")
@pytest.mark.skipif(not playwright_available(), reason="playwright is not installed (pip install playwright)")
def test_the_page_scales_both_pictures_by_one_maximum(tmp_path):
    from browser_utils import browser_page

    g = two_picture_graph()
    with browser_page((1300, 900)) as page:
        page.goto(Path(export_html(g, tmp_path / "two.html")).as_uri())
        page.wait_for_selector("#graph svg .vg-node")
        for j in range(2):
            heat = patch_heat(g, "logit", image=j)
            np.testing.assert_allclose(canvas_alpha(page, f"#graph-heat-{j}"), np.round(170 * heat / 0.75), atol=1)


def test_a_jacobian_graphs_page_says_its_edges_do_not_sum_to_the_logit():
    g = example_graph()
    assert "do not add up to the logit" not in graph_page(g)
    g["metadata"]["vlens_norms"] = "jacobian"
    assert "do not add up to the logit" in graph_page(g)
