"""A self-contained HTML report: headings, prose, plotly figures, images and tables in one file.

plotly.js is inlined once, images are embedded as PNG data URIs, so the
file opens anywhere, offline, and can be mailed around. `vlens demo`
writes one; use it for your own experiment write-ups too.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2rem auto;padding:0 1rem;
color:#1f2328;line-height:1.5}
h1{border-bottom:2px solid #4051b5;padding-bottom:.3rem}h2{margin-top:2.2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:1rem 0;font-size:.9rem}td,th{border:1px solid #ddd;padding:.3rem .6rem;
text-align:left;vertical-align:top}th{background:#f3f4f8}.grid{display:flex;flex-wrap:wrap;gap:.8rem}
.grid figure{margin:0;width:150px;font-size:.8rem}.grid img{width:150px;image-rendering:pixelated;border:1px solid #ccc}
.note{color:#57606a;font-size:.9rem}code{background:#f3f4f8;padding:0 .2rem;border-radius:3px}
nav ul{columns:2}
"""


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


class Report:
    """Build an HTML report section by section, then `save` it.

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
        self.parts: list[str] = [f"<p>{intro}</p>"] if intro else []
        self.sections: list[tuple[str, str]] = []
        self._n_fig = 0

    def section(self, title: str, text: str = "") -> None:
        """Start a section (listed in the table of contents) with optional prose (HTML allowed)."""
        anchor = f"s{len(self.sections)}"
        self.sections.append((anchor, title))
        self.parts.append(f'<h2 id="{anchor}">{html.escape(title)}</h2>')
        if text:
            self.parts.append(f"<p>{text}</p>")

    def text(self, text: str, note: bool = False) -> None:
        """A paragraph (HTML allowed); `note=True` sets it in small grey type."""
        self.parts.append(f'<p class="note">{text}</p>' if note else f"<p>{text}</p>")

    def figure(self, fig: Any, height: int | None = None) -> None:
        """A plotly figure (interactive; plotly.js is inlined once in the file)."""
        self._n_fig += 1
        if height:
            fig.update_layout(height=height)
        self.parts.append(fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig{self._n_fig}"))

    def images(self, items: Iterable[tuple[Any, str]]) -> None:
        """A grid of (PIL image, caption) pairs."""
        cells = [
            f'<figure><img src="{image_data_uri(im)}" alt="{html.escape(cap)}"><figcaption>{html.escape(cap)}'
            "</figcaption></figure>"
            for im, cap in items
        ]
        self.parts.append('<div class="grid">' + "".join(cells) + "</div>")

    def table(self, rows: Sequence[dict], columns: Sequence[str] | None = None, floatfmt: str = ".3f") -> None:
        """A table from a list of dicts (column order from `columns` or the first row)."""
        if not rows:
            self.parts.append('<p class="note">(no rows)</p>')
            return
        cols = list(columns or rows[0].keys())

        def fmt(v: Any) -> str:
            return format(v, floatfmt) if isinstance(v, float) else html.escape(str(v))

        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{fmt(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
        self.parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def link(self, href: str, label: str) -> None:
        """A link, e.g. to feature dashboards written next to the report (relative paths work)."""
        self.parts.append(f'<p><a href="{html.escape(href)}">{html.escape(label)}</a></p>')

    def to_html(self) -> str:
        from plotly.offline import get_plotlyjs

        toc = "".join(f'<li><a href="#{a}">{html.escape(t)}</a></li>' for a, t in self.sections)
        script = f"<script>{get_plotlyjs()}</script>" if self._n_fig else ""
        return (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
            f"<style>{_STYLE}</style>{script}</head><body><h1>{html.escape(self.title)}</h1>"
            + (f"<nav><ul>{toc}</ul></nav>" if toc else "")
            + "\n".join(self.parts)
            + "</body></html>"
        )

    def save(self, path: str | os.PathLike) -> str:
        """Write the report atomically and return its absolute path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_html(), encoding="utf-8")
        os.replace(tmp, path)
        return str(path.resolve())
