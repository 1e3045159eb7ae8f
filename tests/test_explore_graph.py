"""The explorer's graph panel: attribution graphs loaded from a path, produced in the session, or uploaded; what the
panel draws is `vlens.graph_view.view_data` (tested against circuit-tracer's formulas in test_graph_view.py); in
headless Chromium a click on a node paints exactly Python's pixel heat and opens the feature's dashboard. With
`VLENS_DOCS_SCREENSHOTS=1` the browser test also writes docs/assets/explore-graph.png.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import vlens

pytest.importorskip("fastapi", reason="the explore extra is not installed: pip install 'vlens[explore]'")
pytest.importorskip("python_multipart", reason="the explore extra is not installed: pip install 'vlens[explore]'")

from vlens.explorer import Session, create_app, explore  # noqa: E402
from vlens.graph_view import example_graph, view_data  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from browser_utils import chromium, playwright_available  # noqa: E402
from test_graph_view import canvas_alpha, expected_alpha, random_graph  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy():
    return vlens.load("toy")


@pytest.fixture(scope="module")
def transcoders(toy):
    """SAE-Lens transcoders (mlp_in.L -> mlp_out.L), one per layer, for the dashboards of the graphs' features."""
    from vlens.circuits import random_transcoders

    return random_transcoders(toy, d_sae=16)


@pytest.fixture(scope="module")
def session(toy, transcoders, tmp_path_factory):
    path = tmp_path_factory.mktemp("graphs") / "example.json"
    path.write_text(json.dumps(example_graph()))
    return Session(toy, n_train=20, n_pool=2, graphs=[str(path)], transcoders=transcoders)


@pytest.fixture(scope="module")
def client(session):
    from fastapi.testclient import TestClient

    with TestClient(create_app(session)) as c:
        yield c


def test_graphs_from_a_path_the_session_and_an_upload(client, session, toy):
    info = client.get("/api/info").json()
    assert info["graphs"][0]["name"] == "example.json" and info["graphs"][0]["n_nodes"] == 5
    assert info["transcoder_layers"] == list(range(toy.n_layers))
    assert 'id="graph-panel"' in client.get("/").text
    view = client.get("/api/graph/graph-0").json()
    assert {k: view[k] for k in view if k != "dashboards"} == json.loads(json.dumps(view_data(example_graph())))
    assert view["dashboards"] == list(range(toy.n_layers))
    # produced in the session (from Python), then uploaded as a file
    made = session.graphs.add(random_graph(1), "made in python")
    assert client.get(f"/api/graph/{made['id']}").json()["ids"][-1] == "logit"
    up = client.post("/api/graph", files={"file": ("g.json", json.dumps(random_graph(2)).encode(), "application/json")})
    assert up.status_code == 200 and up.json()["name"] == "g.json", up.text
    page = client.get(f"/api/graph/{up.json()['id']}/page.html")
    assert page.status_code == 200 and "vlensGraphView(" in page.text and '"logit"' in page.text


def test_bad_graphs_answer_with_the_fix(client):
    bad = client.post("/api/graph", files={"file": ("notes.json", b"not json", "application/json")})
    assert bad.status_code == 400 and "notes.json is not a graph JSON" in bad.json()["error"]
    half = client.post("/api/graph", files={"file": ("half.json", b'{"nodes": []}', "application/json")})
    assert half.status_code == 400 and "no 'links', 'metadata'" in half.json()["error"]
    assert client.get("/api/graph/graph-99").status_code == 404
    nope = client.post("/api/latent?wait=1", json={"latent": 7, "layer": 30})
    assert nope.status_code == 404 and "no transcoder for layer 30" in nope.json()["error"]
    assert "page" in client.get("/").text  # the server goes on


def test_a_features_dashboard(client):
    r = client.post("/api/latent?wait=1", json={"latent": 7, "layer": 0})
    assert r.status_code == 200, r.text
    html = client.get(r.json()["url"])
    assert html.status_code == 200 and "latent 7" in html.text and "blocks.0.hook_mlp_in" in html.text


def test_explore_takes_graphs_and_refuses_them_beside_a_session(session, toy):
    from vlens.errors import InputError

    with pytest.raises(InputError, match="session.graphs.add"):
        explore(session, graphs=[example_graph()], block=False)
    from vlens.cli import main

    assert main(["explore", "--graph", "/no/such/graph.json"]) == 2


@pytest.mark.browser
@pytest.mark.skipif(chromium() is None, reason="chromium is not on PATH (apt-get install -y chromium)")
@pytest.mark.skipif(not playwright_available(), reason="playwright is not installed (pip install playwright)")
def test_the_graph_panel_in_chromium(session, tmp_path):
    """The first graph draws at once; a click paints Python's heat and opens the feature's dashboard; an uploaded
    graph draws too, and its clicks paint its own heat."""
    from playwright.sync_api import sync_playwright

    uploaded = random_graph(7)
    (tmp_path / "uploaded.json").write_text(json.dumps(uploaded))
    ex = explore(session, block=False, warm=False)
    try:
        with sync_playwright() as p, contextlib.closing(p.chromium.launch(
                executable_path=chromium(), args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                                  "--disable-component-update", "--disable-sync", "--no-first-run"])
        ) as browser:
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.set_default_timeout(90_000)
            page.goto(ex.url)
            page.wait_for_selector("#graph-view .vg-node")
            assert page.eval_on_selector_all("#graph-view .vg-node", "els => els.length") == 5
            assert page.get_attribute("#graph-view", "data-selected") == "logit"
            g = example_graph()
            np.testing.assert_allclose(canvas_alpha(page, "#graph-view-heat-0"), expected_alpha(g, "logit"), atol=1)
            page.click("#graph-view .vg-node[data-id='feat']")
            np.testing.assert_allclose(canvas_alpha(page, "#graph-view-heat-0"), expected_alpha(g, "feat"), atol=1)
            page.wait_for_selector("#graph-dashboard:not([hidden])")
            frame = page.frame_locator("#graph-dashboard")
            assert "latent 7" in frame.locator("body").inner_text().lower()
            assert page.inner_text("#error") == ""
            if os.environ.get("VLENS_DOCS_SCREENSHOTS") == "1":  # the picture of docs/explore-graphs.md
                page.locator("#graph-panel").screenshot(path=str(ROOT / "docs" / "assets" / "explore-graph.png"))
            page.set_input_files("#upload-graph", str(tmp_path / "uploaded.json"))
            page.wait_for_function("document.querySelectorAll('#graph-view .vg-node').length === "
                                   f"{len(uploaded['nodes'])}")
            page.click("#graph-view .vg-node[data-id='2_0_9']")
            np.testing.assert_allclose(canvas_alpha(page, "#graph-view-heat-0"), expected_alpha(uploaded, "2_0_9"),
                                       atol=1)
            assert page.get_attribute("#graph-export", "href").endswith("/page.html")
            page.click("#snippet-graph")
            page.wait_for_function("document.getElementById('snippet').textContent.includes(\"node = '2_0_9'\")")
    finally:
        ex.stop()


def test_the_graph_snippet_prints_what_the_panel_shows(client, session, tmp_path, monkeypatch, capsys):
    from vlens.graph_view import image_share, patch_influence

    g = random_graph(3)
    (tmp_path / "made.json").write_text(json.dumps(g))
    gid = session.graphs.add(str(tmp_path / "made.json"))["id"]
    code = client.get(f"/api/graph/{gid}/snippet", params={"node": "2_1_9"}).json()["code"]
    assert f"read_graph({str(tmp_path / 'made.json')!r})" in code
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    exec(compile(code, "graph_snippet.py", "exec"), {})
    printed = capsys.readouterr().out
    assert f"image share: {round(image_share(g, '2_1_9'), 4)}" in printed
    top = max(patch_influence(g, "2_1_9"), key=lambda p: p["influence"])
    assert f"{top['node_id']} {top['box']} {round(top['influence'], 4)}" in printed
    assert (tmp_path / "heat.png").exists()
    assert client.get(f"/api/graph/{gid}/snippet", params={"node": "nope"}).status_code == 404
