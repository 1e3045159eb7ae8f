"""What a token selection keeps, as a picture: `selection_grid`, `selection_figure` (plotly), `selection_png`.

Each token of a batch row is coloured by its role (image, prompt, answer, BOS;
`vlens.roles.ROLE_NAMES`) where a selection keeps it, grey where
it drops it: a check of what a harvest will store before running it.
"""

from __future__ import annotations

import os
from typing import Any, Sequence, TYPE_CHECKING

import torch
from jaxtyping import Int
from torch import Tensor

from ..roles import ROLE_COLOURS, ROLE_NAMES, role_codes
from ..tokens import KIND_NAMES, TokenLayout, select

if TYPE_CHECKING:
    from ..model import VLM

__all__ = ["selection_grid", "selection_figure", "selection_png", "FIGURE_SELECTIONS"]

#: Selections shown by `selection_figure` by default.
FIGURE_SELECTIONS = ("image", "prompt", "answer", "text", "all", "image+answer")


def selection_grid(layout: TokenLayout, selections: Sequence[Any] = FIGURE_SELECTIONS, row: int = 0) -> Int[Tensor, "n_selections seq"]:
    """Which tokens of batch row `row` each selection keeps: the token's role code where kept, -1 where not.

    Role codes: 0 image, 1 prompt, 2 answer, 3 BOS, 4 other (`ROLE_NAMES`); padding is dropped.

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny()
        >>> b = vlm.prepare(["<image>\\nWhat is shown?"], [Image.new("RGB", (32, 32))], answers=["a circle"])
        >>> g = selection_grid(b.layout, ["image", "answer"])
        >>> [int((r >= 0).sum()) for r in g] == [int(b.layout.image.sum()), 2]
        True
    """
    role = role_codes(layout).long()
    real = ~layout.pad[row]
    rows = []
    for sel in selections:
        m = select(layout, sel)[row]
        rows.append(torch.where(m, role[row], -1)[real])
    return torch.stack(rows)


def selection_figure(vlm: VLM, batches: Sequence[Any], selections: Sequence[Any] = FIGURE_SELECTIONS,
                     titles: Sequence[str] | None = None):
    """A plotly figure: for each batch (row 0), which tokens each selection keeps, coloured by role.

    Hover a cell to see the token. Pass e.g. an image+caption batch and a
    text-only caption batch to compare the two passes of an SAE harvest.

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny()
        >>> b = vlm.prepare(["<image>\\nWhat is shown?"], [Image.new("RGB", (32, 32))], answers=["a circle"])
        >>> fig = selection_figure(vlm, [b])
        >>> len(fig.data) >= 1
        True
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    titles = list(titles) if titles is not None else [f"batch {i}" for i in range(len(batches))]
    fig = make_subplots(rows=len(batches), cols=1, subplot_titles=titles, vertical_spacing=0.12)
    names = [s if isinstance(s, str) else getattr(s, "__name__", "mask") for s in selections]
    colourscale = []
    for k, c in enumerate(("#f4f4f4",) + ROLE_COLOURS):  # -1 .. 4 -> 6 bands
        colourscale += [[k / 6, c], [(k + 1) / 6, c]]
    for i, b in enumerate(batches):
        lay = b.layout
        grid = selection_grid(lay, selections)
        real = ~lay.pad[0]
        ids = lay.input_ids[0][real]
        toks = vlm.tokenizer.convert_ids_to_tokens(ids.tolist())
        kind = torch.full(lay.shape, -1, dtype=torch.long)
        if lay.images:
            kind[lay.image] = lay.image_token_table()["kind"]
        kinds = kind[0][real].tolist()
        labels = [t if k < 0 else f"{t} ({KIND_NAMES[k]})" for t, k in zip(toks, kinds)]
        hover = [[f"{names[r]} | pos {p}: {labels[p]} | " + ("kept, " + ROLE_NAMES[int(v)] if v >= 0 else "dropped")
                  for p, v in enumerate(grid[r].tolist())] for r in range(len(names))]
        fig.add_trace(go.Heatmap(z=grid.tolist(), y=names, x=list(range(len(toks))), zmin=-1.5, zmax=4.5,
                                 colorscale=colourscale, showscale=False, text=hover, hoverinfo="text",
                                 xgap=1, ygap=2), row=i + 1, col=1)
        fig.update_yaxes(autorange="reversed", row=i + 1, col=1)
        fig.update_xaxes(title_text="token position", row=i + 1, col=1)
    for name, c in zip(ROLE_NAMES[:4], ROLE_COLOURS):  # a legend for the role colours
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", marker=dict(size=12, color=c, symbol="square"),
                                 name=f"kept: {name} token"))
    fig.update_layout(height=260 * len(batches) + 80, template="plotly_white", margin=dict(l=90, r=20, t=60, b=40),
                      legend=dict(orientation="h", y=1.08, x=0))
    return fig


def selection_png(vlm: VLM, batches: Sequence[Any], path: str | os.PathLike, selections: Sequence[Any] = FIGURE_SELECTIONS,
                  titles: Sequence[str] | None = None, cell: int = 9) -> None:
    """The picture of `selection_figure` as a PNG drawn with PIL (for places without JavaScript).

    Example:
        >>> import vlens, tempfile; from PIL import Image
        >>> vlm = vlens.tiny()
        >>> b = vlm.prepare(["<image>\\nWhat is shown?"], [Image.new("RGB", (32, 32))], answers=["a circle"])
        >>> path = tempfile.mkdtemp() + "/selections.png"
        >>> selection_png(vlm, [b], path)
        >>> Image.open(path).size[1] > 0
        True
    """
    from PIL import Image, ImageDraw

    names = [s if isinstance(s, str) else getattr(s, "__name__", "mask") for s in selections]
    titles = list(titles) if titles is not None else [f"batch {i}" for i in range(len(batches))]
    grids = [selection_grid(b.layout, selections) for b in batches]
    left, width = 100, max(g.shape[1] for g in grids) * cell + 110
    block = (len(names) + 1) * (cell + 4) + 26
    img = Image.new("RGB", (width, block * len(batches) + 30), "white")
    d = ImageDraw.Draw(img)
    for k, (name, c) in enumerate(zip(ROLE_NAMES[:4], ROLE_COLOURS)):
        d.rectangle([left + k * 130, 8, left + k * 130 + 10, 18], fill=c)
        d.text((left + k * 130 + 15, 6), f"kept: {name}", fill="black")
    for i, (g, t) in enumerate(zip(grids, titles)):
        y0 = 30 + i * block
        d.text((left, y0), t, fill="black")
        for r, name in enumerate(names):
            y = y0 + 16 + r * (cell + 4)
            d.text((4, y - 1), name, fill="black")
            for p, v in enumerate(g[r].tolist()):
                x = left + p * cell
                d.rectangle([x, y, x + cell - 2, y + cell], fill=ROLE_COLOURS[v] if v >= 0 else "#eeeeee")
    img.save(path)

