"""`vlens demo --fast` runs every stage on the toy model and writes a report that renders in a browser."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from vlens.cli import main

    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--fast", "--sae-layer-stride", "2", "--out", str(out)]) == 0
    return out


def test_demo_writes_report_and_results(demo, capsys):
    report = demo / "report.html"
    assert report.exists() and report.stat().st_size > 1_000_000  # plotly.js inlined
    res = json.loads((demo / "results.json").read_text())
    acc = {int(k): v for k, v in res["probe_accuracy"].items()}
    assert len(acc) == 6 and max(acc.values()) >= 0.8  # 20 classes: chance is 0.05
    assert res["sae"]["overall"]["explained_variance"] > 0.5
    assert set(res["sharing"]) == {"0", "2", "3", "4", "5"}  # every 2nd layer, the middle (3) and the last
    assert (demo / "sae-lens-layer-3" / "cfg.json").exists()
    assert (demo / "dashboards" / "index.html").exists()
    html = report.read_text()
    for section in ("Linear probes", "Steering", "Multimodal SAE", "Modality sharing by layer", "Export"):
        assert section in html
    assert "probe looks: gradient × activation" in html and html.count(">attribution</figcaption>") == 6
    latent_pages = sorted((demo / "dashboards").glob("latent_*.html"))
    assert latent_pages and all('class="attr"' in p.read_text() for p in latent_pages[:3])


def test_demo_rerun_reuses_finished_stages(demo):
    from vlens.activations import ActivationStore

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


@pytest.mark.browser
def test_demo_report_fits_a_1280px_window(demo, tmp_path):
    """At 1280 px the report has no horizontal scrollbar: the per-layer modality histogram (six layers) wraps
    into the page instead of running off its right edge. The screenshot is tmp_path/report-1280.png."""
    from browser_utils import browser_page, chromium, playwright_available

    if chromium() is None or not playwright_available():
        pytest.skip("chromium or playwright is not installed")
    with browser_page((1280, 900)) as page:
        page.goto((demo / "report.html").resolve().as_uri())
        page.wait_for_selector(".main-svg")
        scroll, client = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        layers = page.locator(".annotation-text", has_text="layer 5")
        layers.first.scroll_into_view_if_needed()
        page.screenshot(path=str(tmp_path / "report-1280.png"))
        right = layers.first.bounding_box()
    assert scroll <= client, f"the report is {scroll} px wide in a {client}-px window"
    assert right is not None and right["x"] + right["width"] <= client


def _write_real_style_data(root):
    """An image folder (class/xxx.png) and a ShareGPT4V-style caption JSON, as a user of a real model has them."""
    from PIL import Image

    colours = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
    records = []
    for name, rgb in colours.items():
        (root / "classes" / name).mkdir(parents=True)
        for i in range(8):
            im = Image.new("RGB", (32 + 8 * i, 32), tuple(max(0, c - 9 * i) for c in rgb))
            im.save(root / "classes" / name / f"{i}.png")
            records.append({"id": f"{name}-{i}", "image": f"classes/{name}/{i}.png", "conversations": [
                {"from": "human", "value": "<image>\nDescribe the image."},
                {"from": "gpt", "value": f"a {name} square"}]})
    (root / "captions.json").write_text(json.dumps(records))
    return list(colours)


def test_demo_runs_on_a_non_toy_model_with_image_folder_and_captions(tmp_path):
    """The real-model path of the demo (no toy data): an image folder, caption JSON, a VLM passed in, one prompt
    convention (this path once doubled the `<image>` placeholder at its steering stage)."""
    import vlens
    from vlens.demo import DemoConfig, run

    names = _write_real_style_data(tmp_path)
    vlm = vlens.tiny(words=[*names, "square"], n_layers=2)
    cfg = DemoConfig(n_train=15, n_heldout=9, n_sae_samples=12, sae_steps=20, sae_expansion=2, sae_k=4,
                     steer_images=2, ks=(0.0, 2.0), n_pairs=1, n_dashboards=1, batch_size=8)
    path = run(tmp_path / "out", model=vlm, data=str(tmp_path / "classes"), captions=str(tmp_path / "captions.json"),
               config=cfg)
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["model"] == vlm.name and set(res["probe_accuracy"]) == {"0", "1"}
    assert res["steering"] and res["steering"][0]["src"] in names
    assert (tmp_path / "out" / "sae-lens-layer-1" / "cfg.json").exists()
    assert "Steering" in open(path).read()


def test_demo_without_data_for_a_non_toy_model_names_the_fix():
    import vlens
    from vlens.demo import run
    from vlens.errors import InputError

    with pytest.raises(InputError, match="--data"):
        run("/nonexistent-never-written", model=vlens.tiny(), fast=True)
