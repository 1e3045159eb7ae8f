"""Generate the figures of the documentation site from a real `vlens.tiny()` batch.

Run from the repository root after changing token geometry or the figures:

    .venv/bin/python docs/gen_figures.py

It writes, under docs/assets/:

* `token_layout.html`: an interactive plotly figure (the images with their patch
  grids coloured by tile, and the token sequence coloured by kind; hover for
  every token's (tile, row, col) and pixel box). It loads plotly.js from
  `plotly.min.js` next to it, which the site build supplies offline (see
  `docs/hooks.py`), so the page needs no network.
* `token_layout.png`: the same picture drawn with PIL, for readers without
  JavaScript and for the README.

The outputs are committed, so `mkdocs build` never needs to run this script.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parent / "assets"

#: Colours of token kinds in the sequence strip (kind code -> (name, colour)).
KINDS = [
    ("padding", "#e6e6e6"),
    ("BOS", "#222222"),
    ("prompt / template", "#4c78a8"),
    ("image: base tile", "#f58518"),
    ("image: high-res tiles", "#54a24b"),
    ("image: newline", "#e45756"),
    ("answer", "#b279a2"),
]
#: Colours of tiles: tile 0 is the base tile, 1.. the high-res tiles in raster order.
TILE_COLOURS = ["#f58518", "#54a24b", "#72b7b2", "#eeca3b", "#9d755d", "#ff9da6", "#bab0ac", "#4c78a8", "#b279a2"]


def example_image(width: int = 96, height: int = 56):
    """A small wide picture (sky, ground, a red disc, a blue square) that needs unpadding."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height))
    d = ImageDraw.Draw(img)
    for y in range(height):
        t = y / (height - 1)
        d.line([(0, y), (width, y)], fill=(int(120 + 100 * t), int(170 + 60 * t), 235))
    d.rectangle([0, int(height * 0.7), width, height], fill=(70, 140, 60))
    d.ellipse([8, 10, 34, 36], fill=(215, 40, 40))
    d.rectangle([58, 18, 84, 44], fill=(40, 60, 200))
    return img


def example_batch():
    """The batch every figure shows: a wide 96×56 image (unpadded 2×2 canvas) and a 32×32 one, with answers."""
    from PIL import Image

    import vlens

    vlm = vlens.tiny(words=["red", "blue", "disc", "square", "yellow"])
    small = Image.new("RGB", (32, 32), (230, 200, 40))
    images = [example_image(), small]
    prompts = ["<image>\nWhat is shown in this image?", "<image>\nWhat color is it?"]
    batch = vlm.prepare(prompts, images, answers=["a red disc and a blue square", "yellow"])
    return vlm, batch, images


def _kind_codes(layout) -> torch.Tensor:
    """Per [batch, seq] position, the index into `KINDS`."""
    code = torch.zeros(layout.shape, dtype=torch.long)
    code[layout.bos] = 1
    code[layout.prompt & ~layout.bos] = 2
    code[layout.kind_mask("base")] = 3
    code[layout.kind_mask("highres")] = 4
    code[layout.kind_mask("newline")] = 5
    code[layout.answer] = 6
    code[layout.pad] = 0
    return code


def _token_info(vlm, batch) -> list[list[str]]:
    """Hover text per [batch, seq] position: token, kind, and for image tokens (tile, row, col) and box."""
    layout = batch.layout
    ids = layout.input_ids
    code = _kind_codes(layout)
    info = [
        [f"pos {j}: {tok!r}<br>{KINDS[int(code[b, j])][0]}" for j, tok in
         enumerate(vlm.tokenizer.convert_ids_to_tokens(ids[b].tolist()))]
        for b in range(ids.shape[0])
    ]
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


def token_layout_figure(vlm, batch, images):
    """The plotly figure: image 0 with its base-tile and high-res patch grids, then the token sequence."""
    import base64
    import io

    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    layout = batch.layout
    span = layout.images[0]
    g = span.geometry
    img = images[0]
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    n_base, n_hi, n_nl = g.count("base"), g.count("highres"), g.count("newline")
    fig = make_subplots(
        rows=2,
        cols=2,
        specs=[[{}, {}], [{"colspan": 2}, None]],
        row_heights=[0.58, 0.42],
        vertical_spacing=0.16,
        horizontal_spacing=0.07,
        subplot_titles=[
            f"base tile: {n_base} tokens ({g.grid}×{g.grid} patches)",
            f"high-res {g.tiles[0]}×{g.tiles[1]} tiles: {n_hi} + {n_nl} newlines",
            "token sequence by kind (hover a cell)",
        ],
    )
    for col, want in ((1, 0), (2, 1)):
        fig.add_trace(go.Image(source=uri, hoverinfo="skip"), row=1, col=col)
        sel = (g.kind == want) if want == 0 else (g.kind == 1)
        idx = torch.nonzero(sel).flatten().tolist()
        xs, ys, texts, colours = [], [], [], []
        for k in idx:
            x0, y0, x1, y1 = (float(v) for v in g.box[k])
            tile = int(g.tile[k])
            colour = TILE_COLOURS[tile % len(TILE_COLOURS)]
            fig.add_shape(type="rect", x0=x0, y0=y0, x1=x1, y1=y1, line=dict(color=colour, width=2),
                          fillcolor=colour, opacity=0.28, row=1, col=col)
            xs.append((x0 + x1) / 2)
            ys.append((y0 + y1) / 2)
            colours.append(colour)
            texts.append(
                f"seq pos {span.start + k}<br>tile {tile}, row {int(g.row[k])}, col {int(g.col[k])}"
                f"<br>box x {x0:.1f}–{x1:.1f}, y {y0:.1f}–{y1:.1f} px"
            )
        fig.add_trace(
            go.Scatter(x=xs, y=ys, mode="markers", marker=dict(size=7, color=colours, line=dict(width=1, color="white")),
                       hovertext=texts, hoverinfo="text", showlegend=False),
            row=1, col=col,
        )
        fig.update_xaxes(range=[0, img.width], showgrid=False, zeroline=False, row=1, col=col)
        fig.update_yaxes(range=[img.height, 0], showgrid=False, zeroline=False, scaleanchor=f"x{col}", row=1, col=col)

    code = _kind_codes(layout)
    n = len(KINDS)
    scale = []
    for i, (_, colour) in enumerate(KINDS):
        scale += [[i / n, colour], [(i + 1) / n, colour]]
    fig.add_trace(
        go.Heatmap(
            z=code.tolist(),
            zmin=-0.5,
            zmax=n - 0.5,
            colorscale=scale,
            hovertext=_token_info(vlm, batch),
            hoverinfo="text",
            xgap=1,
            ygap=3,
            colorbar=dict(tickvals=list(range(n)), ticktext=[k.replace("image: ", "") for k, _ in KINDS],
                          orientation="h", x=0.5, xanchor="center", y=-0.12, yanchor="top", len=1.0, thickness=12,
                          tickfont=dict(size=11)),
        ),
        row=2, col=1,
    )
    fig.update_yaxes(autorange="reversed", tickvals=list(range(len(batch))),
                     ticktext=[f"row {b}" for b in range(len(batch))], row=2, col=1)
    fig.update_xaxes(title_text="sequence position", title_standoff=4, row=2, col=1)
    fig.update_layout(
        height=560,
        margin=dict(l=50, r=20, t=40, b=70),
        template="plotly_white",
        font=dict(size=12),
    )
    fig.update_annotations(font_size=13)
    return fig


def token_layout_png(vlm, batch, images, path: Path, zoom: int = 5) -> None:
    """The same picture drawn with PIL (no JavaScript): two zoomed image panels and the token strip."""
    from PIL import Image, ImageDraw, ImageFont

    layout = batch.layout
    span = layout.images[0]
    g = span.geometry
    img = images[0]
    W, H = img.width * zoom, img.height * zoom
    cell, pad = 11, 16
    seq = layout.shape[1]
    strip_w = seq * cell
    width = max(2 * W + 3 * pad, strip_w + 2 * pad + 170)
    height = pad + 22 + H + pad + 26 + len(batch) * (cell + 8) + pad + 22 * ((len(KINDS) + 3) // 4) + pad
    canvas = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    big = img.resize((W, H), Image.NEAREST)
    titles = [f"base tile: {g.count('base')} tokens",
              f"high-res {g.tiles[0]}x{g.tiles[1]}: {g.count('highres')} tokens + {g.count('newline')} newlines"]
    for panel, want in enumerate((0, 1)):
        ox, oy = pad + panel * (W + pad), pad + 22
        d.text((ox, pad), titles[panel], fill="black", font=font)
        tile_layer = Image.new("RGBA", (W, H), (0, 0, 0, 0))
        td = ImageDraw.Draw(tile_layer)
        for k in torch.nonzero(g.kind == want).flatten().tolist():
            x0, y0, x1, y1 = (float(v) * zoom for v in g.box[k])
            colour = TILE_COLOURS[int(g.tile[k]) % len(TILE_COLOURS)]
            rgb = tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))
            td.rectangle([x0, y0, x1 - 1, y1 - 1], fill=(*rgb, 70), outline=(*rgb, 255), width=2)
        canvas.paste(Image.alpha_composite(big.convert("RGBA"), tile_layer).convert("RGB"), (ox, oy))
    oy = pad + 22 + H + pad
    d.text((pad, oy), "token sequence of the batch, coloured by kind", fill="black", font=font)
    oy += 24
    code = _kind_codes(layout)
    for b in range(len(batch)):
        y = oy + b * (cell + 8)
        d.text((pad, y - 2), f"row {b}", fill="black", font=font)
        for j in range(seq):
            x = pad + 50 + j * cell
            d.rectangle([x, y, x + cell - 2, y + cell], fill=KINDS[int(code[b, j])][1])
    oy += len(batch) * (cell + 8) + 8
    for i, (name, colour) in enumerate(KINDS):
        x, y = pad + (i % 4) * 200, oy + (i // 4) * 22
        d.rectangle([x, y + 2, x + 14, y + 16], fill=colour, outline="#999999")
        d.text((x + 20, y), name, fill="black", font=font)
    canvas.save(path, optimize=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSETS, help="output folder (default docs/assets)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    vlm, batch, images = example_batch()
    fig = token_layout_figure(vlm, batch, images)
    html = args.out / "token_layout.html"
    # plotly.js is not inlined (4.7 MB per figure): the page loads the copy the site build puts next to it.
    fig.write_html(html, include_plotlyjs="plotly.min.js", full_html=True, config={"displaylogo": False},
                   default_width="100%", default_height="560px")
    png = args.out / "token_layout.png"
    token_layout_png(vlm, batch, images, png)
    print(batch.layout.summary())
    print(f"wrote {html} and {png}")


if __name__ == "__main__":
    main()
