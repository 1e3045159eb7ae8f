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
from browser_utils import chromium, count_colour, plotly_drawn, render_in_chromium, screenshot_stats  # noqa: E402

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
