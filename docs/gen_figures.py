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

from vlens.roles import LAYOUT_KINDS as KINDS, layout_kind_codes as kind_codes
from vlens.viz import TILE_COLOURS, token_layout_figure

ASSETS = Path(__file__).resolve().parent / "assets"

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
    code = kind_codes(layout)
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
