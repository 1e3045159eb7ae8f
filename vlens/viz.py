"""HTML pages and figures: the `Report` builder, feature-dashboard pages, the patch-heatmap overlay.

Every page vlens writes is a jinja2 template under `vlens/templates/` (`base.html.j2`
with the one stylesheet `style.css`; `report.html.j2`, `latent.html.j2`,
`dashboard_index.html.j2`; `blocks.html.j2` holds the pieces: tables, image grids...).
Text is escaped by the templates; prose given to `Report.text` / `Report.section` may
hold HTML. Images go in as PNG data URIs (`image_data_uri`); plotly.js ships one way,
`plotly_script`: inlined once in a stand-alone page, or one `plotly.min.js` file next to
a set of pages. Either way the pages open offline.

    >>> r = Report("Notes", "A <b>short</b> write-up.")
    >>> r.section("Numbers"); r.table([{"layer": 2, "accuracy": 0.91234}])
    >>> "<td>0.912</td>" in r.to_html(), "<b>short</b>" in r.to_html()
    (True, True)
"""

from __future__ import annotations

import base64
import io
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import jinja2
import numpy as np
from jaxtyping import Float
from PIL import Image
from torch import Tensor

__all__ = ["Report", "image_data_uri", "heatmap_overlay", "plotly_script", "figure_html", "render", "save_html"]


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("vlens", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render(template: str, **context: Any) -> str:
    """Render one of vlens's page templates (`vlens/templates/<template>`) with `context`.

    Example:
        >>> html = render("dashboard_index.html.j2", title="t", plotly_script="", hook="h <1>", n_samples=3, rows=[])
        >>> "h &lt;1&gt; · 3 samples · 0 latents" in html
        True
    """
    return _env().get_template(template).render(**context)


def save_html(path: str | os.PathLike, html: str) -> str:
    """Write `html` to `path` atomically (a temporary file, then a rename); return the absolute path.

    Example:
        >>> import tempfile, os
        >>> p = save_html(os.path.join(tempfile.mkdtemp(), "a", "page.html"), "<p>hi</p>")
        >>> open(p).read()
        '<p>hi</p>'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, path)
    return str(path.resolve())


def plotly_script(directory: str | os.PathLike | None = None) -> str:
    """The `<script>` that loads plotly.js: inlined (`directory=None`), or `plotly.min.js` written once to `directory`.

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> plotly_script(d), os.path.exists(os.path.join(d, "plotly.min.js"))
        ('<script src="plotly.min.js"></script>', True)
        >>> len(plotly_script()) > 1_000_000
        True
    """
    from plotly.offline import get_plotlyjs

    if directory is None:
        return f"<script>{get_plotlyjs()}</script>"
    js = Path(directory) / "plotly.min.js"
    if not js.exists():
        save_html(js, get_plotlyjs())
    return '<script src="plotly.min.js"></script>'


def figure_html(fig: Any, div_id: str | None = None) -> str:
    """A plotly figure as a `<div>` for a page that loads plotly.js once (`plotly_script`).

    Example:
        >>> import plotly.graph_objects as go
        >>> 'id="f1"' in figure_html(go.Figure(), div_id="f1")
        True
    """
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id)


def image_data_uri(image: Any) -> str:
    """A PIL image as a `data:image/png;base64,...` URI.

    Example:
        >>> from PIL import Image
        >>> image_data_uri(Image.new("RGB", (2, 2))).startswith("data:image/png;base64,")
        True
    """
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def heatmap_overlay(image: Image.Image, boxes: Float[Tensor, "n 4"], acts: Float[Tensor, " n"], vmax: float | None = None,
                    size: int = 160) -> Image.Image:
    """Paint per-token activations over `image` in red, using each token's pixel box (NaN boxes skipped).

    `boxes` are (x0, y0, x1, y1) in original-image pixels (`layout.images[i].geometry.box`);
    where boxes overlap (base tile and high-res tokens) each pixel shows the larger value.
    The result is resized so its longer side is `size`.

    Example:
        >>> import torch
        >>> from PIL import Image
        >>> img = heatmap_overlay(Image.new("RGB", (32, 32)), torch.tensor([[0., 0., 16., 16.]]), torch.tensor([1.0]))
        >>> img.size
        (160, 160)
    """
    image = image.convert("RGB")
    w, h = image.size
    heat = np.zeros((h, w), dtype=np.float32)
    vmax = float(vmax if vmax is not None else (acts.max() if acts.numel() else 0.0)) or 1.0
    for (x0, y0, x1, y1), a in zip(boxes.tolist(), acts.tolist()):
        if any(math.isnan(v) for v in (x0, y0, x1, y1)) or a <= 0:
            continue
        ys, ye, xs, xe = int(y0), max(int(math.ceil(y1)), int(y0) + 1), int(x0), max(int(math.ceil(x1)), int(x0) + 1)
        heat[ys:ye, xs:xe] = np.maximum(heat[ys:ye, xs:xe], a / vmax)
    rgba = np.zeros((h, w, 4), dtype=np.uint8)
    rgba[..., 0] = 230
    rgba[..., 1] = 30
    rgba[..., 2] = 30
    rgba[..., 3] = (np.clip(heat, 0, 1) * 170).astype(np.uint8)
    out = Image.alpha_composite(image.convert("RGBA"), Image.fromarray(rgba, "RGBA")).convert("RGB")
    scale = size / max(w, h)
    return out.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.NEAREST)


class Report:
    """Build a self-contained HTML report section by section, then `save` it (plotly.js inlined once).

    Example:
        >>> import plotly.graph_objects as go, tempfile, os
        >>> r = Report("My experiment")
        >>> r.section("Accuracy", "Probe accuracy by layer.")
        >>> r.figure(go.Figure(go.Scatter(y=[0.5, 0.9])))
        >>> r.table([{"layer": 2, "accuracy": 0.9}])
        >>> path = r.save(os.path.join(tempfile.mkdtemp(), "report.html"))
        >>> os.path.getsize(path) > 1_000_000  # plotly.js is inlined
        True
    """

    def __init__(self, title: str, intro: str = "") -> None:
        self.title = title
        self.blocks: list[dict[str, Any]] = [{"kind": "text", "html": intro, "note": False}] if intro else []
        self.sections: list[tuple[str, str]] = []
        self._n_fig = 0

    def section(self, title: str, text: str = "") -> None:
        """Start a section (listed in the table of contents) with optional prose (HTML allowed)."""
        anchor = f"s{len(self.sections)}"
        self.sections.append((anchor, title))
        self.blocks.append({"kind": "section", "anchor": anchor, "title": title})
        if text:
            self.text(text)

    def text(self, text: str, note: bool = False) -> None:
        """A paragraph (HTML allowed); `note=True` sets it in small grey type."""
        self.blocks.append({"kind": "text", "html": text, "note": note})

    def figure(self, fig: Any, height: int | None = None) -> None:
        """A plotly figure (interactive; plotly.js is inlined once in the file)."""
        self._n_fig += 1
        if height:
            fig.update_layout(height=height)
        self.blocks.append({"kind": "figure", "html": figure_html(fig, div_id=f"fig{self._n_fig}")})

    def images(self, items: Iterable[tuple[Any, str]]) -> None:
        """A grid of (PIL image, caption) pairs."""
        self.blocks.append({"kind": "images", "items": [{"src": image_data_uri(im), "caption": cap} for im, cap in items]})

    def table(self, rows: Sequence[dict], columns: Sequence[str] | None = None, floatfmt: str = ".3f") -> None:
        """A table from a list of dicts (column order from `columns` or the first row)."""
        cols = list(columns or (rows[0].keys() if rows else []))

        def fmt(v: Any) -> str:
            return format(v, floatfmt) if isinstance(v, float) else str(v)

        self.blocks.append({"kind": "table", "columns": [str(c) for c in cols],
                            "rows": [[fmt(r.get(c, "")) for c in cols] for r in rows]})

    def link(self, href: str, label: str) -> None:
        """A link, e.g. to feature dashboards written next to the report (relative paths work)."""
        self.blocks.append({"kind": "link", "href": href, "label": label})

    def to_html(self) -> str:
        """The whole page."""
        return render("report.html.j2", title=self.title, sections=self.sections, blocks=self.blocks,
                      plotly_script=plotly_script() if self._n_fig else "")

    def save(self, path: str | os.PathLike) -> str:
        """Write the report atomically and return its absolute path."""
        return save_html(path, self.to_html())
