"""The toy image generator: coloured shapes with known concepts, deterministic from a seed.

Every image shows one shape (`SHAPES`) in one colour (`COLOURS`) of a random
size and position, on a random dull background with pixel noise. Its class is
"<colour> <shape>" (`CLASS_NAMES`, 20 classes), and its caption says the same
in words, with size and place: "a small red circle on the left on a dark
background". So the concepts appear both in image tokens and in text tokens.

Sample `i` of a split is drawn from its own random stream, seeded by
`(seed, split, i)`: any sample can be made alone, in any order, and the
train and held-out splits never share a stream.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Iterable, Sequence

import numpy as np

from ..data.records import Dataset, Sample
from ..errors import InputError

# The prompts the toy model is trained on are the paper's (one convention: they carry `<image>`).
from ..prompts import CAPTION_PROMPT, COLOUR_QUESTION, QUESTION, SHAPE_QUESTION, two_choice_prompt  # noqa: F401

#: Shapes, in label order (label = colour_index * len(SHAPES) + shape_index).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")

#: Colours and their base RGB, in label order.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 225),
    "yellow": (235, 205, 30),
    "purple": (145, 55, 190),
}

#: Class names "<colour> <shape>", indexed by label.
CLASS_NAMES: list[str] = [f"{c} {s}" for c in COLOURS for s in SHAPES]

#: Size words of captions: a shape is "small" below `SIZE_SPLIT` (fraction of the image side).
SIZES: tuple[str, ...] = ("small", "large")
SIZE_RANGE: tuple[float, float] = (0.28, 0.48)
SIZE_SPLIT: float = 0.38

#: Where shapes are centred (fractions of the side): a 3×3 grid, aligned with the vision patches,
#: so the same shape looks the same to the tiny ViT wherever it is (see docs/toy.md).
GRID: tuple[float, ...] = (0.25, 0.5, 0.75)

#: Background words of captions.
BACKGROUNDS: tuple[str, ...] = ("dark", "light")

#: The split names and their stream ids.
SPLITS: dict[str, int] = {"train": 0, "heldout": 1}

#: Every word the toy model needs beyond `vlens.tiny.BASE_WORDS`.
WORDS: tuple[str, ...] = (*COLOURS, *SHAPES, "background", "dark", "light", "grey")


def label_of(colour: str, shape: str) -> int:
    """The label of a colour and a shape.

    Example:
        >>> CLASS_NAMES[label_of("blue", "square")]
        'blue square'
    """
    return list(COLOURS).index(colour) * len(SHAPES) + SHAPES.index(shape)


def class_pairs(kind: str = "any") -> list[tuple[str, str]]:
    """Ordered (source, target) class-name pairs for steering.

    `kind="colour"`: same shape, other colour ("red circle" -> "blue circle");
    the two names differ in their first word, so the target's first-token
    probability separates them. `kind="shape"`: same colour, other shape.
    `kind="any"`: all ordered pairs of distinct classes (380).

    Example:
        >>> class_pairs("colour")[0]
        ('red circle', 'green circle')
        >>> len(class_pairs("colour")), len(class_pairs("shape")), len(class_pairs())
        (80, 60, 380)
    """
    pairs = []
    for a, b in itertools.permutations(CLASS_NAMES, 2):
        (ca, sa), (cb, sb) = a.split(), b.split()
        if kind == "any" or (kind == "colour" and sa == sb) or (kind == "shape" and ca == cb):
            pairs.append((a, b))
    if kind not in ("any", "colour", "shape"):
        raise InputError(f"kind must be 'any', 'colour' or 'shape', not {kind!r}")
    return pairs


def position_words(cx: float, cy: float) -> str:
    """Where a shape centred at (cx, cy) (fractions of the image side) is, in words.

    Example:
        >>> position_words(0.2, 0.5), position_words(0.5, 0.8), position_words(0.8, 0.2), position_words(0.5, 0.5)
        ('on the left', 'at the bottom', 'at the top right', 'in the center')
    """
    h = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else None
    v = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else None
    if h and v:
        return f"at the {v} {h}"
    if v:
        return f"at the {v}"
    if h:
        return f"on the {h}"
    return "in the center"


def caption_of(meta: dict) -> str:
    """The caption of a sample's metadata.

    Example:
        >>> caption_of(dict(size="small", colour="red", shape="circle", position="on the left", background="dark"))
        'a small red circle on the left on a dark background'
    """
    return f"a {meta['size']} {meta['colour']} {meta['shape']} {meta['position']} on a {meta['background']} background"


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        k = 0.8
    elif shape == "triangle":
        pts = [(np.cos(a), np.sin(a)) for a in np.deg2rad([-90, 30, 150])]
        k = 1.05
        pts = [(x, y + 0.2) for x, y in pts]  # centre the bounding box
    elif shape == "cross":
        t = 0.34
        pts = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t)]
        k = 1.0
    else:  # pragma: no cover - guarded by render
        raise InputError(shape)
    ca, sa = np.cos(angle), np.sin(angle)
    return [(cx + k * r * (x * ca - y * sa), cy + k * r * (x * sa + y * ca)) for x, y in pts]


def render(meta: dict, image_size: int = 64, rng: np.random.Generator | None = None):
    """Draw one toy image from its metadata (a PIL RGB image).

    `meta` holds `shape`, `rgb`, `bg_rgb`, `cx`, `cy`, `r` (fractions of the
    side), `angle` (radians) and `noise` (pixel std). `rng` draws the noise.

    Example:
        >>> im = render(dict(shape="circle", rgb=(215, 35, 35), bg_rgb=(90, 90, 90), cx=0.5, cy=0.5, r=0.2,
        ...                  angle=0.0, noise=0.0))
        >>> im.size, im.getpixel((32, 32))
        ((64, 64), (215, 35, 35))
    """
    from PIL import Image, ImageDraw

    if meta["shape"] not in SHAPES:
        raise InputError(f"unknown shape {meta['shape']!r}; toy shapes are {SHAPES}")
    ss = 4  # supersample for smooth edges
    S = image_size * ss
    im = Image.new("RGB", (S, S), tuple(meta["bg_rgb"]))
    d = ImageDraw.Draw(im)
    cx, cy, r = meta["cx"] * S, meta["cy"] * S, meta["r"] * S
    rgb = tuple(meta["rgb"])
    if meta["shape"] == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    else:
        d.polygon(_polygon(meta["shape"], cx, cy, r, meta["angle"]), fill=rgb)
    im = im.resize((image_size, image_size), Image.Resampling.BOX)
    if meta.get("noise", 0) > 0:
        rng = rng or np.random.default_rng(0)
        arr = np.asarray(im, dtype=np.float32) + rng.normal(0.0, meta["noise"], (image_size, image_size, 3))
        im = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    return im


def sample_meta(rng: np.random.Generator, label: int) -> dict:
    """Draw the random factors of one image of class `label` (everything but the noise pixels).

    Example:
        >>> m = sample_meta(np.random.default_rng(0), label_of("green", "cross"))
        >>> m["colour"], m["shape"], m["size"] in SIZES
        ('green', 'cross', True)
    """
    colour = list(COLOURS)[label // len(SHAPES)]
    shape = SHAPES[label % len(SHAPES)]
    r = float(rng.uniform(*SIZE_RANGE)) / 2  # radius, fraction of the side
    cx, cy = (float(v) for v in rng.choice(GRID, 2))
    base = np.array(COLOURS[colour], dtype=np.float32)
    rgb = tuple(int(v) for v in np.clip(base + rng.uniform(-20, 20, 3), 0, 255))
    background = BACKGROUNDS[int(rng.integers(2))]
    level = rng.uniform(25, 85) if background == "dark" else rng.uniform(165, 235)
    bg = tuple(int(v) for v in np.clip(level + rng.uniform(-15, 15, 3), 0, 255))  # dull: near-grey
    angle = float(rng.uniform(-0.35, 0.35)) if shape != "circle" else 0.0
    return dict(
        colour=colour,
        shape=shape,
        size=SIZES[int(2 * r >= SIZE_SPLIT)],
        position=position_words(cx, cy),
        background=background,
        cx=cx,
        cy=cy,
        r=r,
        angle=angle,
        rgb=rgb,
        bg_rgb=bg,
        noise=float(rng.uniform(2, 12)),
    )


def _split_id(split: str) -> int:
    if split not in SPLITS:
        raise InputError(f"split must be one of {list(SPLITS)}, not {split!r}")
    return SPLITS[split]


class ToyDataset(Dataset):
    """`n` generated toy samples of one split; sample `i` is made on demand, deterministically.

    Labels cycle through the classes (`label = i % 20`), so any prefix of
    `20 k` samples is balanced. `meta` carries `shape`, `colour`, `size`,
    `position`, `background` and the exact drawing parameters.

    Example:
        >>> ds = ToyDataset(40, split="heldout", seed=0)
        >>> s = ds[3]
        >>> ds.class_names[s.label], s.image.size, s.caption.startswith("a ")
        ('red cross', (64, 64), True)
        >>> ds[3].image.tobytes() == s.image.tobytes()   # deterministic
        True
    """

    def __init__(self, n: int, split: str = "train", seed: int = 0, image_size: int = 64) -> None:
        if n < 0:
            raise InputError(f"n must be >= 0, not {n}")
        self.n = int(n)
        self.split = split
        self.split_id = _split_id(split)
        self.seed = int(seed)
        self.image_size = int(image_size)
        self.class_names = list(CLASS_NAMES)

    def __len__(self) -> int:
        return self.n

    def rng(self, i: int) -> np.random.Generator:
        """The random stream of sample `i`."""
        return np.random.default_rng([self.seed, self.split_id, i])

    def _get(self, i: int) -> Sample:
        rng = self.rng(i)
        label = i % len(CLASS_NAMES)
        meta = sample_meta(rng, label)
        image = render(meta, self.image_size, rng)
        meta["split"] = self.split
        return Sample(image=image, label=label, caption=caption_of(meta), id=f"toy-{self.split}-{self.seed}-{i}",
                      meta=meta)

    def __repr__(self) -> str:
        return f"ToyDataset(n={self.n}, split={self.split!r}, seed={self.seed}, image_size={self.image_size})"


def toy_dataset(split: str = "train", n: int = 500, seed: int = 0, image_size: int = 64) -> ToyDataset:
    """The toy data set: `n` samples of `split` ("train" or "heldout") drawn from `seed`.

    Example:
        >>> ds = toy_dataset("heldout", n=20)
        >>> len(ds), len(ds.class_names), ds[0].caption.split()[2:4]
        (20, 20, ['red', 'circle'])
    """
    return ToyDataset(n, split=split, seed=seed, image_size=image_size)


def image_hash(image) -> str:
    """A short content hash of a PIL image (to check splits share no image).

    Example:
        >>> ds = toy_dataset("train", n=2)
        >>> image_hash(ds[0].image) != image_hash(ds[1].image)
        True
    """
    return hashlib.sha1(image.tobytes()).hexdigest()[:16]


def all_words(extra: Iterable[str] = ()) -> list[str]:
    """The toy vocabulary: `WORDS` plus `extra`, without duplicates."""
    out: list[str] = []
    for w in (*WORDS, *extra):
        if w not in out:
            out.append(w)
    return out


def contact_sheet(samples: Sequence[Sample], cols: int = 5, scale: int = 2):
    """Tile sample images into one PIL image (for a quick look).

    Example:
        >>> contact_sheet(toy_dataset(n=4), cols=2, scale=1).size
        (128, 128)
    """
    from PIL import Image

    samples = list(samples)
    w, h = samples[0].image.size
    rows = (len(samples) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * w * scale, rows * h * scale), (255, 255, 255))
    for k, s in enumerate(samples):
        im = s.image.resize((w * scale, h * scale), 0)
        sheet.paste(im, ((k % cols) * w * scale, (k // cols) * h * scale))
    return sheet
