"""HTML pages and figures: the `Report` builder, feature-dashboard pages, the patch-heatmap overlay, the token-layout figure.

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

from .roles import LAYOUT_KINDS, layout_kind_codes

__all__ = ["Report", "image_data_uri", "heatmap_overlay", "plotly_script", "figure_html", "render", "save_html",
           "TILE_COLOURS", "token_layout_figure", "below_toolbar", "TOOLBAR_PX", "token_strings"]


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


#: Height (px) of the strip at the top of a plotly figure that its toolbar (the modebar, 28 px, shown
#: while the pointer is over the figure) covers: titles go below it (`below_toolbar`).
TOOLBAR_PX = 34
_TITLE_PX, _SUBTITLE_PX = 26, 22  # a 17-px figure title, a 13–16-px subplot title, with their padding


def below_toolbar(fig: Any) -> Any:
    """Move a plotly figure's title and top-row subplot titles below its toolbar; returns `fig`.

    Plotly draws its toolbar in the top-right corner of the figure when the pointer
    is over it, on top of whatever is there. This pins the title to the top of the
    figure, `TOOLBAR_PX` down, and makes the top margin tall enough for it and the
    subplot titles under it. Call it after the title is set.

    Example:
        >>> import plotly.graph_objects as go
        >>> fig = below_toolbar(go.Figure(layout=dict(title="a long title")))
        >>> fig.layout.title.pad.t == TOOLBAR_PX, fig.layout.margin.t
        (True, 66)
    """
    has_title = bool(fig.layout.title.text)
    has_subtitles = any(a.yref == "paper" and a.yanchor == "bottom" and (a.y or 0) >= 0.99
                        for a in fig.layout.annotations)
    top = TOOLBAR_PX + _TITLE_PX * has_title + _SUBTITLE_PX * has_subtitles + 6
    fig.update_layout(margin=dict(t=max(top, fig.layout.margin.t or 0)))
    if has_title:
        fig.update_layout(title=dict(yref="container", y=1, yanchor="top", pad=dict(t=TOOLBAR_PX)))
    return fig


def figure_html(fig: Any, div_id: str | None = None) -> str:
    """A plotly figure as a `<div>` for a page that loads plotly.js once (`plotly_script`).

    The figure's titles are moved below its toolbar first (`below_toolbar`).

    Example:
        >>> import plotly.graph_objects as go
        >>> 'id="f1"' in figure_html(go.Figure(), div_id="f1")
        True
    """
    return below_toolbar(fig).to_html(full_html=False, include_plotlyjs=False, div_id=div_id)


def token_strings(tokenizer: Any, ids: Iterable[int]) -> list[str]:
    """Each token id as a page shows it: its text, or its bytes when it holds only part of a character.

    `tokenizer.decode([id])` of a token that is one byte of a multi-byte UTF-8
    character (a byte-fallback token such as `<0xE2>` of the Llama/Mistral
    tokenizers, or a piece of a byte-level BPE token as in GPT-2 and Qwen) is "�".
    Such a token is shown as its bytes in hex, `<0xE2>`, as the tokenizer's own
    vocabulary writes them; every other token as its decoded text.

    Example:
        >>> import vlens
        >>> token_strings(vlens.tiny().tokenizer, [4, 5])
        ['<image>', '[INST]']
    """
    ids = [int(i) for i in ids]
    texts = tokenizer.batch_decode([[i] for i in ids])
    pieces = tokenizer.convert_ids_to_tokens(ids) if any("\ufffd" in t for t in texts) else None
    return [_as_bytes(pieces[j]) or t if "\ufffd" in t else t for j, t in enumerate(texts)]


def _as_bytes(piece: str) -> str | None:
    """A vocabulary piece that stands for raw bytes, written `<0xE2><0x80>`; None if it is not one."""
    import re

    if re.fullmatch(r"(<0x[0-9A-Fa-f]{2}>)+", piece):
        return piece.upper().replace("<0X", "<0x")
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # the byte-level BPE alphabet (GPT-2)

    decoder = {c: b for b, c in bytes_to_unicode().items()}
    if piece and all(c in decoder for c in piece):
        return "".join(f"<0x{decoder[c]:02X}>" for c in piece)
    return None


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


#: Colours of tiles: tile 0 is the base tile, 1.. the high-res tiles in raster order.
TILE_COLOURS = ["#f58518", "#54a24b", "#72b7b2", "#eeca3b", "#9d755d", "#ff9da6", "#bab0ac", "#4c78a8", "#b279a2"]


def _token_info(tokenizer: Any, layout: Any) -> list[list[str]]:
    """Hover text per [batch, seq] position: token, kind, and for image tokens (tile, row, col) and box."""
    ids = layout.input_ids
    code = layout_kind_codes(layout)
    info = []
    for b in range(ids.shape[0]):
        toks = tokenizer.convert_ids_to_tokens(ids[b].tolist())
        info.append([f"pos {j}: {tok!r}<br>{LAYOUT_KINDS[int(code[b, j])][0]}" for j, tok in enumerate(toks)])
    for span in layout.images:
        g = span.geometry
        for k, pos in enumerate(range(span.start, span.end)):
            if int(g.kind[k]) == 2:
                info[span.batch_index][pos] += f"<br>image {span.image}, newline after row {int(g.row[k])}"
            else:
                x0, y0, x1, y1 = (round(float(v), 1) for v in g.box[k])
                info[span.batch_index][pos] += (
                    f"<br>image {span.image}, tile {int(g.tile[k])}, row {int(g.row[k])}, col {int(g.col[k])}"
                    f"<br>box x {x0}–{x1}, y {y0}–{y1} px"
                )
    return info


def token_layout_figure(vlm: Any, batch: Any, images: Sequence[Any], *, image: int = 0, height: int = 560,
                        title: str | None = None):
    """How images became tokens: image `image` with its patch grids, and the batch's token sequence by kind.

    The top row draws the original picture once per image-token kind it has (the base
    tile; the high-res tiles where the family has them), each token's pixel box coloured
    by its tile; the bottom strip colours every position of the batch by kind (`LAYOUT_KINDS`).
    Hover any box or cell for its sequence position, tile, row, column and pixel box.
    `title` goes above it all, clear of plotly's toolbar (`below_toolbar`; a title set
    later with `fig.update_layout` is not).

    Example:
        >>> import vlens
        >>> from PIL import Image
        >>> vlm = vlens.tiny()
        >>> pic = Image.new("RGB", (96, 56), (200, 30, 30))
        >>> b = vlm.prepare("<image>\\nWhat is it?", [pic])
        >>> fig = token_layout_figure(vlm, b, [pic])
        >>> [a.text.split(":")[0] for a in fig.layout.annotations]
        ['base tile', 'high-res 2×2 tiles', 'token sequence by kind (hover a cell)']
    """
    import plotly.graph_objects as go
    import torch
    from plotly.subplots import make_subplots

    layout = batch.layout
    span = layout.images[image]
    g = span.geometry
    img = images[image] if isinstance(images[image], Image.Image) else Image.open(images[image]).convert("RGB")
    uri = image_data_uri(img)
    n_base, n_hi, n_nl = g.count("base"), g.count("highres"), g.count("newline")
    base = g.kind == 0
    rows, cols = (int(g.row[base].max()) + 1, int(g.col[base].max()) + 1) if n_base else (0, 0)
    panels = [(0, f"base tile: {n_base} tokens ({rows}×{cols})")]
    if n_hi:
        panels.append((1, f"high-res {g.tiles[0]}×{g.tiles[1]} tiles: {n_hi} + {n_nl} newlines"))
    fig = make_subplots(
        rows=2, cols=len(panels), specs=[[{}] * len(panels), [{"colspan": len(panels)}] + [None] * (len(panels) - 1)],
        row_heights=[0.58, 0.42], vertical_spacing=0.16, horizontal_spacing=0.07,
        subplot_titles=[t for _, t in panels] + ["token sequence by kind (hover a cell)"],
    )
    for col, (want, _) in enumerate(panels, start=1):
        fig.add_trace(go.Image(source=uri, hoverinfo="skip"), row=1, col=col)
        xs, ys, texts, colours = [], [], [], []
        for k in torch.nonzero(g.kind == want).flatten().tolist():
            x0, y0, x1, y1 = (float(v) for v in g.box[k])
            tile = int(g.tile[k])
            colour = TILE_COLOURS[tile % len(TILE_COLOURS)]
            fig.add_shape(type="rect", x0=x0, y0=y0, x1=x1, y1=y1, line=dict(color=colour, width=2),
                          fillcolor=colour, opacity=0.28, row=1, col=col)
            xs.append((x0 + x1) / 2)
            ys.append((y0 + y1) / 2)
            colours.append(colour)
            texts.append(f"seq pos {span.start + k}<br>tile {tile}, row {int(g.row[k])}, col {int(g.col[k])}"
                         f"<br>box x {x0:.1f}–{x1:.1f}, y {y0:.1f}–{y1:.1f} px")
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", hovertext=texts, hoverinfo="text", showlegend=False,
                                 marker=dict(size=7, color=colours, line=dict(width=1, color="white"))),
                      row=1, col=col)
        fig.update_xaxes(range=[0, img.width], showgrid=False, zeroline=False, row=1, col=col)
        fig.update_yaxes(range=[img.height, 0], showgrid=False, zeroline=False, scaleanchor=f"x{col if col > 1 else ''}",
                         row=1, col=col)
    n = len(LAYOUT_KINDS)
    scale = []
    for i, (_, colour) in enumerate(LAYOUT_KINDS):
        scale += [[i / n, colour], [(i + 1) / n, colour]]
    fig.add_trace(
        go.Heatmap(z=layout_kind_codes(layout).tolist(), zmin=-0.5, zmax=n - 0.5, colorscale=scale,
                   hovertext=_token_info(vlm.tokenizer, layout), hoverinfo="text", xgap=1, ygap=3,
                   colorbar=dict(tickvals=list(range(n)), ticktext=[k.replace("image: ", "") for k, _ in LAYOUT_KINDS],
                                 orientation="h", x=0.5, xanchor="center", y=-0.12, yanchor="top", len=1.0,
                                 thickness=12, tickfont=dict(size=11))),
        row=2, col=1,
    )
    fig.update_yaxes(autorange="reversed", tickvals=list(range(layout.shape[0])),
                     ticktext=[f"row {b}" for b in range(layout.shape[0])], row=2, col=1)
    fig.update_xaxes(title_text="sequence position", title_standoff=4, row=2, col=1)
    fig.update_layout(height=height, margin=dict(l=50, r=20, b=70), template="plotly_white", font=dict(size=12),
                      title=title)
    fig.update_annotations(font_size=13)
    return below_toolbar(fig)
