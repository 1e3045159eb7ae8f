"""Headless-Chromium helpers for checking that HTML pages and their plotly figures really render.

Used by tests/test_browser.py (the docs site) and reusable for any other HTML
output, such as the report of `vlens demo`:

    from browser_utils import chromium, render_in_chromium, plotly_drawn, screenshot_stats
    dom, png = render_in_chromium(report_path, tmp_path)   # or a URL; workdir optional
    assert plotly_drawn(dom) >= 3 and screenshot_stats(png).ink > 0.05

Chromium runs with `--headless --no-sandbox --disable-gpu` and no network
side traffic, in a throw-away profile. A test that needs it should skip when
`chromium()` is None (mark it `@pytest.mark.browser`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Flags of every run: headless, no sandbox (root in containers), nothing fetched behind our back.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
]


def chromium() -> str | None:
    """Path of the Chromium binary (`chromium`, else `chromium-browser`), or None when neither is on PATH."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _url(target: str | os.PathLike) -> str:
    s = str(target)
    if "://" in s:
        return s
    path = Path(s).resolve()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: build the page first")
    return path.as_uri()


def _run(args: list[str], profile: Path, timeout: float) -> subprocess.CompletedProcess:
    exe = chromium()
    if exe is None:
        raise RuntimeError("chromium is not on PATH: install it (Debian: `apt-get install -y chromium`)")
    cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def render_in_chromium(
    target: str | os.PathLike,
    workdir: str | os.PathLike | None = None,
    *,
    window: tuple[int, int] = (1280, 1600),
    budget_ms: int = 10_000,
    timeout: float = 120.0,
) -> tuple[str, Path]:
    """Open `target` (a file path or URL) in headless Chromium; return its DOM after load and a screenshot.

    `budget_ms` is Chromium's virtual-time budget: scripts and timers get that
    much (virtual) time to run before the DOM is dumped and the screenshot
    taken. The PNG is written into `workdir` (a new temporary folder when
    None), which also holds the throw-away browser profiles.

    Example:
        >>> dom, png = render_in_chromium("site/index.html")  # doctest: +SKIP
        >>> plotly_drawn(dom), screenshot_stats(png).ink  # doctest: +SKIP
    """
    work = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="vlens-chromium-"))
    work.mkdir(parents=True, exist_ok=True)
    url = _url(target)
    budget = f"--virtual-time-budget={budget_ms}"
    dom_run = _run([budget, "--dump-dom", url], work / "profile-dom", timeout)
    if dom_run.returncode != 0 or "<html" not in dom_run.stdout.lower():
        raise RuntimeError(f"chromium --dump-dom {url} failed (rc {dom_run.returncode}):\n{dom_run.stderr[-2000:]}")
    parts = [p for p in url.split("?")[0].rstrip("/").split("/")[-2:] if p]
    png = work / ("-".join(Path(p).stem for p in parts) or "page").replace(":", "_")
    png = png.with_name(png.name + ".png")
    shot = _run([budget, f"--window-size={window[0]},{window[1]}", f"--screenshot={png}", url],
                work / "profile-shot", timeout)
    if shot.returncode != 0 or not png.exists():
        raise RuntimeError(f"chromium --screenshot {url} failed (rc {shot.returncode}):\n{shot.stderr[-2000:]}")
    return dom_run.stdout, png


def plotly_drawn(dom: str) -> int:
    """Number of plotly figures that drew in a dumped DOM (each draws one `svg.main-svg` pair, counted once)."""
    n_plots = dom.count('class="plot-container plotly"')
    n_svgs = dom.count('class="main-svg"')
    return n_plots if n_svgs >= n_plots else n_svgs


@dataclass
class ScreenshotStats:
    """What a screenshot shows: `ink` is the fraction of pixels that differ from the page background,
    `colours` the number of distinct colours (quantised to 5 bits per channel)."""

    width: int
    height: int
    ink: float
    colours: int


def count_colour(png: str | os.PathLike, rgb: tuple[int, int, int], tol: int = 24) -> int:
    """Number of pixels of `png` within `tol` of `rgb` in every channel."""
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int((np.abs(a - np.array(rgb)).max(-1) <= tol).sum())


def screenshot_stats(png: str | os.PathLike) -> ScreenshotStats:
    """Blankness statistics of a screenshot (the background is the most common colour)."""
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(png).convert("RGB"))
    flat = a.reshape(-1, 3)
    q = (flat >> 3).astype(np.int32)
    keys = (q[:, 0] << 10) | (q[:, 1] << 5) | q[:, 2]
    values, counts = np.unique(keys, return_counts=True)
    background = values[counts.argmax()]
    ink = float((keys != background).mean())
    return ScreenshotStats(width=a.shape[1], height=a.shape[0], ink=ink, colours=int(values.size))


def build_site(dest: str | os.PathLike, *, strict: bool = True, timeout: float = 1200.0,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `mkdocs build` (with this interpreter's mkdocs) into `dest`; return the finished process.

    The build executes every page's Python blocks (docs/hooks.py); `env` adds environment variables,
    e.g. `VLENS_DOCS_RECORD` for the record of what ran.
    """
    cmd = [sys.executable, "-m", "mkdocs", "build", "-f", str(ROOT / "mkdocs.yml"), "-d", str(dest)]
    if strict:
        cmd.append("--strict")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env, check=False)


def playwright_available() -> bool:
    """Whether the Playwright Python package is installed (it drives the system Chromium; no browser download)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def browser_page(window: tuple[int, int] = (1280, 900)):
    """A Playwright page of headless system Chromium with a `window`-sized viewport (for DOM measurements).

    Example:
        >>> with browser_page((1280, 900)) as page:  # doctest: +SKIP
        ...     page.goto(Path("site/index.html").resolve().as_uri())
    """
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"]
    with sync_playwright() as p, contextlib.closing(p.chromium.launch(executable_path=chromium(), args=args)) as br:
        page = br.new_page(viewport={"width": window[0], "height": window[1]})
        page.set_default_timeout(60_000)
        yield page


#: JS: the titles of every plotly figure on the page (figure title, subplot titles) that its toolbar covers.
#: Run after hovering the figure (plotly shows the toolbar on hover).
TITLES_UNDER_TOOLBAR_JS = """() => {
  const box = e => e.getBoundingClientRect();
  const hits = [];
  for (const plot of document.querySelectorAll('.js-plotly-plot')) {
    const bar = plot.querySelector('.modebar');
    if (!bar) continue;
    const m = box(bar);
    if (!m.width) continue;
    for (const t of plot.querySelectorAll('.gtitle, .annotation-text')) {
      const b = box(t);
      if (b.left < m.right && m.left < b.right && b.top < m.bottom && m.top < b.bottom) hits.push(t.textContent);
    }
  }
  return hits;
}"""
