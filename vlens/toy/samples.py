"""Sample toy images with their captions, for the docs (`vlens toy samples`)."""

from __future__ import annotations

import os
from pathlib import Path

from .data import CLASS_NAMES, toy_dataset


def write_samples(out: str | os.PathLike = "docs/assets/toy", n: int = 10, split: str = "heldout", seed: int = 0,
                  scale: int = 2) -> list[Path]:
    """Write `n` toy images (upscaled `scale`x, nearest) as PNGs `toy_00.png`...; `samples_table` captions them.

    Example:
        >>> import tempfile
        >>> paths = write_samples(tempfile.mkdtemp(), n=2)
        >>> [p.name for p in paths]
        ['toy_00.png', 'toy_01.png']
    """
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ds = toy_dataset(split, n=n, seed=seed)
    paths = []
    for i, s in enumerate(ds):
        p = out / f"toy_{i:02d}.png"
        w, h = s.image.size
        s.image.resize((w * scale, h * scale), Image.Resampling.NEAREST).save(p)
        paths.append(p)
    return paths


def samples_table(prefix: str = "assets/toy/", n: int = 10, split: str = "heldout", seed: int = 0) -> str:
    """The Markdown table (image, class, caption) of the images `write_samples` writes.

    Example:
        >>> print(samples_table(n=1).splitlines()[2])
        | ![red circle](assets/toy/toy_00.png) | red circle | a large red circle on the right on a dark background |
    """
    rows = [f"| ![{CLASS_NAMES[s.label]}]({prefix}toy_{i:02d}.png) | {CLASS_NAMES[s.label]} | {s.caption} |"
            for i, s in enumerate(toy_dataset(split, n=n, seed=seed))]
    return "| image | class | caption |\n|---|---|---|\n" + "\n".join(rows) + "\n"
