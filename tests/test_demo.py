"""`vlens demo --fast` runs every stage on the toy model and writes a report that renders in a browser."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from vlens.cli import main

    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--fast", "--out", str(out)]) == 0
    return out


def test_demo_writes_report_and_results(demo, capsys):
    report = demo / "report.html"
    assert report.exists() and report.stat().st_size > 1_000_000  # plotly.js inlined
    res = json.loads((demo / "results.json").read_text())
    acc = {int(k): v for k, v in res["probe_accuracy"].items()}
    assert len(acc) == 6 and max(acc.values()) >= 0.8  # 20 classes: chance is 0.05
    assert res["sae"]["overall"]["explained_variance"] > 0.5
    assert set(res["sharing"]) == {str(L) for L in range(6)}
    assert (demo / "sae-lens-layer-3" / "cfg.json").exists()
    assert (demo / "dashboards" / "index.html").exists()
    html = report.read_text()
    for section in ("Linear probes", "Steering", "Multimodal SAE", "Modality sharing by layer", "Export"):
        assert section in html


def test_demo_rerun_reuses_finished_stages(demo):
    from vlens.harvest import ActivationStore

    store = ActivationStore(demo / "store-pooled")
    assert store.complete and len(store) == 120


@pytest.mark.browser
def test_demo_report_renders_in_chromium(demo, tmp_path):
    from browser_utils import chromium, plotly_drawn, render_in_chromium, screenshot_stats

    if chromium() is None:
        pytest.skip("chromium is not installed")
    dom, png = render_in_chromium(demo / "report.html", tmp_path)
    assert plotly_drawn(dom) >= 5
    assert screenshot_stats(png).ink > 0.05
