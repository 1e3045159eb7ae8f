"""The built documentation site opens in headless Chromium and its plotly figures really draw.

Runs only when `chromium` is on PATH (`.ci/run` installs the Debian package);
otherwise skipped. Helpers live in tests/browser_utils.py, for reuse by the
demo-report check.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from browser_utils import (  # noqa: E402
    TITLES_UNDER_TOOLBAR_JS,
    browser_page,
    chromium,
    count_colour,
    playwright_available,
    plotly_drawn,
    render_in_chromium,
    screenshot_stats,
)

needs_playwright = pytest.mark.skipif(not playwright_available(), reason="playwright is not installed")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(chromium() is None, reason="chromium is not on PATH (apt-get install -y chromium)"),
]

# Colours the token-layout figure draws with (docs/gen_figures.py KINDS): base-tile orange, high-res green.
ORANGE, GREEN = (0xF5, 0x85, 0x18), (0x54, 0xA2, 0x4B)


@pytest.fixture(scope="module")
def site(docs_site) -> Path:
    assert docs_site.proc.returncode == 0, f"mkdocs build --strict failed:\n{docs_site.proc.stderr[-4000:]}"
    return docs_site.path


def test_plotly_figure_draws(site, tmp_path):
    """The standalone figure page runs plotly.js (served locally, offline) and draws its traces."""
    dom, png = render_in_chromium(site / "assets" / "token_layout.html", tmp_path, window=(1100, 600))
    assert plotly_drawn(dom) == 1, "plotly did not draw: no rendered .main-svg in the DOM"
    # The heatmap of token kinds and the two image panels were drawn, not just an empty frame.
    assert "heatmaplayer" in dom and dom.count("<image") >= 2
    stats = screenshot_stats(png)
    assert stats.ink > 0.2 and stats.colours > 50, f"screenshot looks blank: {stats}"
    assert count_colour(png, ORANGE) > 500 and count_colour(png, GREEN) > 500


def test_concepts_page_shows_the_figure(site, tmp_path):
    """The concepts page embeds the figure in an iframe, and the screenshot of the page shows it drawn."""
    # The figure is far below the fold: a window as tall as the page captures it.
    dom, png = render_in_chromium(site / "concepts" / "index.html", tmp_path, window=(1280, 6000))
    assert 'src="../assets/token_layout.html"' in dom
    assert "Residual stream names" in dom
    assert count_colour(png, ORANGE) > 500 and count_colour(png, GREEN) > 500, "the embedded plot did not draw"


def test_site_pages_render(site, tmp_path):
    """The home page renders with the Material theme and its search index, offline."""
    dom, png = render_in_chromium(site / "index.html", tmp_path, window=(1280, 900))
    assert 'class="md-header' in dom and "vlens" in dom
    assert (site / "search" / "search_index.json").exists()
    assert screenshot_stats(png).ink > 0.05


def test_tutorial_shows_its_results(site, tmp_path):
    """The probes tutorial shows what its code printed and draws the figures its code showed."""
    dom, png = render_in_chromium(site / "tutorials" / "probes" / "index.html", tmp_path, window=(1280, 9000))
    assert plotly_drawn(dom) == 3, "the three figures of the probes tutorial did not all draw"
    assert dom.count(">Output<") >= 3, "printed results are missing"
    assert screenshot_stats(png).colours > 50


def _titles_under_toolbar(page, png) -> list[str]:
    """Hover each plotly figure of the open page (its toolbar shows) and list the titles the toolbar covers."""
    hits = []
    for i, plot in enumerate(page.query_selector_all(".js-plotly-plot")):
        plot.scroll_into_view_if_needed()
        plot.hover(position={"x": 60, "y": 120})
        page.wait_for_timeout(300)
        hits += page.evaluate(TITLES_UNDER_TOOLBAR_JS)
        plot.screenshot(path=str(png.with_name(f"{png.stem}-{i}.png")))
    return hits


@needs_playwright
def test_figure_titles_clear_of_the_toolbar(tmp_path):
    """Plotly's toolbar (shown on hover, top right) covers no title of the token-layout figure (with a title) nor
    of an SAE dashboard's histogram; the screenshots (tmp_path/*-N.png) show the figures with the toolbar on."""
    import torch
    from PIL import Image

    import vlens
    import vlens.sae as vs
    from vlens.data import Sample
    from vlens.viz import token_layout_figure

    vlm = vlens.tiny(words=["a", "red", "square"])
    pic = Image.new("RGB", (96, 56), (120, 190, 235))
    batch = vlm.prepare("<image>\nWhat is shown?", [pic])
    fig = token_layout_figure(vlm, batch, [pic], height=460, title="llava-next: how one picture became tokens")
    fig.write_html(tmp_path / "layout.html", include_plotlyjs=True)
    sae = vs.train(torch.randn(512, vlm.d_model), "paper", d_sae=16, steps=2, batch_size=256, progress=False)
    data = [Sample(Image.new("RGB", (32, 32), "red"), caption="a red square")]
    vs.dashboard(sae, vlm, data, tmp_path / "dash", layer=2, latents=[0], progress=False)
    with browser_page((1280, 900)) as page:
        for name in ("layout.html", "dash/latent_0.html"):
            page.goto((tmp_path / name).as_uri())
            page.wait_for_selector(".main-svg")
            assert _titles_under_toolbar(page, tmp_path / name.replace("/", "-")) == [], name


@needs_playwright
def test_modality_histogram_fits_a_1280px_page(tmp_path):
    """The per-layer modality histogram of six layers, in a report as the demo writes it, fits a 1280-px window:
    no horizontal scrollbar, every layer's panel inside the window, no title under the toolbar."""
    import torch

    from vlens.sae.modality import ModalityStats, plot_modality_histogram
    from vlens.viz import Report

    g = torch.Generator().manual_seed(0)
    st = ModalityStats.from_activations(torch.rand(200, 64, generator=g) * (torch.rand(200, 64, generator=g) > 0.5),
                                        torch.arange(200) % 2)
    report = Report("modality")
    report.section("Modality sharing by layer")
    report.figure(plot_modality_histogram({layer: st for layer in range(6)}))
    path = report.save(tmp_path / "report.html")
    with browser_page((1280, 900)) as page:
        page.goto(Path(path).as_uri())
        page.wait_for_selector(".main-svg")
        widths = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        assert widths[0] <= widths[1], f"horizontal overflow at 1280 px: scrollWidth {widths[0]} > {widths[1]}"
        right = page.evaluate("""Math.max(...[...document.querySelectorAll('.annotation-text')]
            .filter(t => t.textContent.startsWith('layer')).map(t => t.getBoundingClientRect().right))""")
        assert right <= 1280
        assert _titles_under_toolbar(page, tmp_path / "report.png") == []


@needs_playwright
def test_models_support_table_reads_at_1280px(site, tmp_path):
    """At 1280 px the models page's support section breaks no identifier (class, checkpoint id, family) across
    lines and its table fits the content column; the screenshot is tmp_path/models-support.png."""
    with browser_page((1280, 900)) as page:
        page.goto((site / "models" / "index.html").as_uri())
        page.wait_for_selector("#support")
        found = page.evaluate("""() => {
          const head = document.getElementById('support');
          const parts = [];
          for (let e = head.nextElementSibling; e && e.tagName !== 'H2'; e = e.nextElementSibling) parts.push(e);
          const codes = parts.flatMap(e => [...e.querySelectorAll('code')]);
          const tables = parts.flatMap(e => [...e.querySelectorAll('table')]).map(t => {
            const box = t.closest('.md-typeset__scrollwrap') || t.parentElement;
            return [box.scrollWidth, box.clientWidth];
          });
          return {broken: codes.filter(c => c.getClientRects().length > 1).map(c => c.textContent),
                  n_codes: codes.length, tables};
        }""")
        page.evaluate("document.getElementById('support').scrollIntoView()")
        page.screenshot(path=str(tmp_path / "models-support.png"))
    assert found["n_codes"] >= 18 and found["tables"], found  # six families × (name, class, checkpoint)
    assert found["broken"] == [], f"identifiers broken across lines at 1280 px: {found['broken']}"
    assert all(scroll <= client for scroll, client in found["tables"]), found["tables"]
