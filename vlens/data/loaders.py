"""Loaders of image-class and image-caption data: image folders, HF `datasets`, ShareGPT4V caption JSON.

Each returns a `Dataset` of `Sample`s, lazily: images are read (through
`vlens.prepare.load_image`, the one conversion path) when indexed. Unreadable
images are skipped with one warning (`on_error="skip"`) or raise
`BadImageError` (`on_error="raise"`).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import BadImageError, InputError, NotFoundError
from ..prepare import load_image
from .records import Dataset, ListDataset, Sample

__all__ = ["IMAGE_EXTENSIONS", "image_folder", "from_hf", "hf_captions", "sharegpt4v", "imagenet_class_names",
           "HFDataset"]


#: File extensions `image_folder` reads (lowercase).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")

_ON_ERROR = ("skip", "raise")


class _MissingPath(InputError, FileNotFoundError):
    """A folder or file argument that does not exist (also a FileNotFoundError, as vlens 0.1 raised)."""


def _check_on_error(on_error: str) -> str:
    if on_error not in _ON_ERROR:
        raise InputError(f"on_error must be 'skip' or 'raise', not {on_error!r}")
    return on_error


class _SkipLog:
    """Collects skipped items and warns once, with the count and the first few paths."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.items: list[tuple[str, str]] = []
        self._warned = 0

    def add(self, path: Any, reason: str) -> None:
        self.items.append((str(path), reason))

    def warn(self, total: int | None = None) -> None:
        new = len(self.items) - self._warned
        if new <= 0:
            return
        self._warned = len(self.items)
        shown = "; ".join(f"{p} ({r})" for p, r in self.items[-new:][:3])
        of = f" of {total}" if total is not None else ""
        warnings.warn(
            f"{self.what}: skipped {new}{of} image(s) that are missing or unreadable, e.g. {shown}. "
            "The full list is in `dataset.skipped`; pass on_error='raise' to stop at the first one.",
            stacklevel=3,
        )


class _SkippingDataset(Dataset):
    """A `Dataset` whose iteration skips unreadable images (unless `on_error="raise"`), logging where they were."""

    on_error: str
    _log: _SkipLog

    def _where(self, i: int) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def __iter__(self) -> Iterator[Sample]:
        try:
            for i in range(len(self)):
                try:
                    yield self._get(i)
                except BadImageError as e:
                    if self.on_error == "raise":
                        raise
                    self._log.add(self._where(i), str(e))
        finally:
            self._log.warn(total=len(self))


class _RecordDataset(_SkippingDataset):
    """A lazy `Dataset` over records `(image source, label, caption, id, meta)`.

    Images decode on access. A file that turns out corrupt on access raises
    `BadImageError` from `ds[i]`; iterating (`for s in ds`) skips it when
    `on_error="skip"`, records it in `skipped` and warns once per pass.
    """

    def __init__(self, records: list[tuple], class_names: Sequence[str] | None, on_error: str, what: str,
                 skipped: _SkipLog | None = None) -> None:
        self.records = records
        self.class_names = list(class_names) if class_names is not None else None
        self.on_error = _check_on_error(on_error)
        self._log = skipped or _SkipLog(what)
        self._log.warn(total=len(records) + len(self._log.items))

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(path, reason) of every image skipped so far (missing at load, or unreadable when read)."""
        return list(self._log.items)

    def __len__(self) -> int:
        return len(self.records)

    def labels(self) -> list[int | None]:
        return [r[1] for r in self.records]

    def captions(self) -> list[str | None]:
        return [r[2] for r in self.records]

    def _get(self, i: int) -> Sample:
        src, label, caption, id_, meta = self.records[i]
        return Sample(image=load_image(src), label=label, caption=caption, id=id_, meta=dict(meta))

    def _where(self, i: int) -> str:
        src = self.records[i][0]
        return src.get("path") if isinstance(src, dict) else src

    def verify(self) -> "_RecordDataset":
        """Decode every image now; drop (or, with on_error="raise", raise on) the unreadable ones.

        Example:
            >>> import tempfile, pathlib
            >>> from PIL import Image
            >>> root = pathlib.Path(tempfile.mkdtemp())
            >>> (root / "cat").mkdir(); Image.new("RGB", (4, 4)).save(root / "cat" / "a.png")
            >>> _ = (root / "cat" / "b.png").write_bytes(b"not a png")
            >>> import warnings; warnings.simplefilter("ignore")
            >>> len(image_folder(root).verify())
            1
        """
        keep = []
        for rec in self.records:
            try:
                load_image(rec[0])
                keep.append(rec)
            except BadImageError as e:
                if self.on_error == "raise":
                    raise
                self._log.add(rec[0].get("path") if isinstance(rec[0], dict) else rec[0], str(e))
        total = len(self.records)
        self.records = keep
        self._log.warn(total=total)
        return self


# -- image-class data -------------------------------------------------------------------


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in standard label order (short names, e.g. "tench", "goldfish").

    Example:
        >>> names = imagenet_class_names()
        >>> len(names), names[0], names[1], names[999]
        (1000, 'tench', 'goldfish', 'toilet tissue')
    """
    path = Path(__file__).parent.parent / "assets" / "imagenet_classes.txt"
    return path.read_text().splitlines()


def image_folder(
    root: str | os.PathLike,
    *,
    class_names: Sequence[str] | dict | None = None,
    per_class: int | None = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    on_error: str = "skip",
) -> Dataset:
    """An image-class data set from a folder tree `root/<class>/<image>` (classes sorted by folder name).

    `class_names` renames the classes: a list in folder order, or a dict
    folder -> name (default: the folder names). `per_class` keeps the first
    n images (sorted by file name) of each class. A text file beside an image,
    with its name and `.txt` (`cat/0.png` and `cat/0.txt`), is its caption. An empty class folder is an
    error; unreadable files are skipped and counted (`on_error="raise"` to stop).

    Example:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> for c in ["dog", "cat"]:
        ...     (root / c).mkdir(); Image.new("L", (8, 8)).save(root / c / "0.png")
        >>> ds = image_folder(root)
        >>> ds.class_names, ds[0].label, ds[0].image.mode
        (['cat', 'dog'], 0, 'RGB')
    """
    root = Path(root)
    if not root.is_dir():
        raise _MissingPath(f"image folder {root} does not exist (expected {root}/<class name>/<image files>)")
    exts = tuple(e.lower() for e in extensions)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise InputError(f"{root} has no class sub-folders: lay images out as {root}/<class name>/<image files>")
    if class_names is None:
        names = [f.name for f in folders]
    elif isinstance(class_names, dict):
        missing = [f.name for f in folders if f.name not in class_names]
        if missing:
            raise InputError(f"class_names has no entry for folder(s) {missing[:5]}")
        names = [class_names[f.name] for f in folders]
    else:
        names = list(class_names)
        if len(names) != len(folders):
            raise InputError(f"{len(names)} class_names for {len(folders)} class folders in {root}")
    records = []
    for label, folder in enumerate(folders):
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in exts)
        if not files:
            raise InputError(
                f"class folder {folder} has no images (looked for {', '.join(exts)}); remove it or add images"
            )
        for f in files[:per_class]:
            side = f.with_suffix(".txt")  # a caption file beside the image
            caption = side.read_text(encoding="utf-8").strip() or None if side.is_file() else None
            records.append((str(f), label, caption, str(f.relative_to(root)), {"path": str(f), "class": folder.name}))
    return _RecordDataset(records, names, on_error, what=f"image_folder({root})")


def _hf_load(dataset: Any, split: str | None, streaming: bool = False, n: int | None = None):
    """The `split` of an HF data set (id, dict or data set); a streaming one is materialised to its first `n` rows."""
    import datasets

    if isinstance(dataset, (str, os.PathLike)):
        ds = datasets.load_dataset(str(dataset), split=split or "train", streaming=streaming)
    elif isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        split = split or "train"
        if split not in dataset:
            raise NotFoundError(f"split {split!r} not in the data set; it has {list(dataset)}")
        ds = dataset[split]
    else:
        ds = dataset
    if isinstance(ds, datasets.IterableDataset):
        if n is None:
            raise InputError("a streaming data set needs n= (how many rows to take)")
        ds = datasets.Dataset.from_list(list(ds.take(n)), features=ds.features)
    return ds


def _need_column(ds: Any, column: str, what: str, param: str) -> None:
    cols = list(ds.column_names or []) if getattr(ds, "column_names", None) is not None else None
    if cols is not None and column not in cols:
        raise NotFoundError(f"no {what} column {column!r}; the data set has columns {cols}: pass {param}=<one of them>")


class HFDataset(_SkippingDataset):
    """A lazy `Dataset` over a Hugging Face `datasets.Dataset` (images decoded on access).

    Built by `from_hf` and `hf_captions`. Unreadable images raise
    `BadImageError` from `ds[i]`; iteration skips and counts them unless
    `on_error="raise"`.
    """

    def __init__(self, ds: Any, image_column: str, label_column: str | None, caption_column: str | None,
                 class_names: Sequence[str] | None, indices: Sequence[int] | None, on_error: str, what: str) -> None:
        import datasets

        if isinstance(ds.features.get(image_column), datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))  # decode ourselves: skip bad files
        self.ds = ds
        self.image_column, self.label_column, self.caption_column = image_column, label_column, caption_column
        self.indices = list(indices) if indices is not None else None
        self.class_names = list(class_names) if class_names is not None else None
        self.on_error = _check_on_error(on_error)
        self._log = _SkipLog(what)

    skipped = _RecordDataset.skipped

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.ds)

    def _row(self, i: int) -> tuple[int, dict]:
        j = self.indices[i] if self.indices is not None else i
        return j, self.ds[j]

    def _get(self, i: int) -> Sample:
        j, row = self._row(i)
        label = row[self.label_column] if self.label_column else None
        caption = _first_text(row[self.caption_column]) if self.caption_column else None
        meta = {k: v for k, v in row.items() if k not in (self.image_column, self.label_column, self.caption_column)
                and isinstance(v, (str, int, float, bool))}
        return Sample(image=load_image(row[self.image_column]), label=None if label is None else int(label),
                      caption=caption, id=row.get("id", j), meta=meta)

    def _where(self, i: int) -> str:
        return f"row {self._row(i)[0]}"


def _first_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):  # several captions per image (COCO style): take the first
        value = value[0] if value else ""
    if isinstance(value, dict):  # e.g. {"raw": ...}
        value = value.get("raw") or value.get("text") or next(iter(value.values()), "")
    return str(value)


def _select_per_class(labels: Sequence[int], classes: Sequence[int] | None, per_class: int | None) -> list[int] | None:
    if classes is None and per_class is None:
        return None
    wanted = None if classes is None else {int(c): k for k, c in enumerate(classes)}
    counts: dict[int, int] = {}
    out = []
    for i, y in enumerate(labels):
        y = int(y)
        if wanted is not None and y not in wanted:
            continue
        if per_class is not None and counts.get(y, 0) >= per_class:
            continue
        counts[y] = counts.get(y, 0) + 1
        out.append(i)
    if wanted is not None:
        empty = [c for c in wanted if c not in counts]
        if empty:
            raise InputError(f"no samples of class(es) {empty[:10]} in the data set")
    return out


def from_hf(
    dataset: Any,
    split: str | None = "train",
    *,
    image_column: str = "image",
    label_column: str = "label",
    class_names: Sequence[str] | None = None,
    classes: Sequence[int] | None = None,
    per_class: int | None = None,
    n: int | None = None,
    on_error: str = "skip",
    streaming: bool = False,
) -> HFDataset:
    """An image-class data set from Hugging Face `datasets` (ImageNet-style `image` / `label` columns).

    `dataset` is a hub name or local path (loaded with
    `datasets.load_dataset(dataset, split=split)`, e.g. `"ILSVRC/imagenet-1k"`,
    `split="validation"`), a `datasets.Dataset`, or a `DatasetDict` (then
    `split` picks one). `class_names` defaults to the label column's
    `ClassLabel` names. `classes` keeps only those labels; `per_class` keeps
    the first n of each; `n` keeps the first n. With `streaming=True` the
    first `n` rows (required) are downloaded and kept.

    Example:
        >>> import datasets; from PIL import Image
        >>> hf = datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4))] * 3, "label": [0, 1, 1]},
        ...     features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}))
        >>> ds = from_hf(hf, per_class=1)
        >>> len(ds), ds.class_names, ds[1].label
        (2, ['a', 'b'], 1)
    """
    import datasets

    ds = _hf_load(dataset, split, streaming, n)
    _need_column(ds, image_column, "image", "image_column")
    _need_column(ds, label_column, "label", "label_column")
    feat = ds.features.get(label_column)
    if class_names is None and isinstance(feat, datasets.ClassLabel):
        class_names = list(feat.names)
    indices = _select_per_class(ds[label_column], classes, per_class)
    if n is not None:
        indices = (indices if indices is not None else list(range(len(ds))))[:n]
    return HFDataset(ds, image_column, label_column, None, class_names, indices, on_error,
                     what=f"from_hf({dataset if isinstance(dataset, str) else type(dataset).__name__})")


# -- image-caption data -----------------------------------------------------------------


def hf_captions(
    dataset: Any,
    split: str | None = "train",
    *,
    image_column: str = "image",
    caption_column: str = "caption",
    n: int | None = None,
    on_error: str = "skip",
    streaming: bool = False,
) -> HFDataset:
    """An image-caption data set from Hugging Face `datasets` (an image column and a caption column).

    A caption cell holding a list (several captions per image) gives its first.

    Example:
        >>> import datasets; from PIL import Image
        >>> hf = datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4))], "text": ["a black square"]})
        >>> hf_captions(hf, caption_column="text")[0].caption
        'a black square'
    """
    ds = _hf_load(dataset, split, streaming, n)
    _need_column(ds, image_column, "image", "image_column")
    _need_column(ds, caption_column, "caption", "caption_column")
    indices = list(range(min(n, len(ds)))) if n is not None else None
    return HFDataset(ds, image_column, None, caption_column, None, indices, on_error,
                     what=f"hf_captions({dataset if isinstance(dataset, str) else type(dataset).__name__})")


def sharegpt4v(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    n: int | None = None,
    on_error: str = "skip",
) -> Dataset:
    """An image-caption data set from ShareGPT4V-style conversation JSON (or JSONL).

    Each record is `{"id", "image", "conversations": [{"from": "human",
    "value": "<image>\\n..."}, {"from": "gpt", "value": caption}, ...]}`;
    the caption is the first "gpt" turn, the human turn's text (without
    `<image>`) is kept as `meta["prompt"]`, and `image` is resolved against
    `image_root` (default: the JSON file's folder). Records whose image file is
    missing are skipped and counted at load (`on_error="raise"` to stop);
    records without an image or a caption are skipped too.

    Example:
        >>> import json, tempfile, pathlib
        >>> from PIL import Image
        >>> root = pathlib.Path(tempfile.mkdtemp()); Image.new("RGB", (4, 4)).save(root / "a.jpg")
        >>> rec = {"id": "1", "image": "a.jpg", "conversations": [
        ...     {"from": "human", "value": "<image>\\nDescribe the image."}, {"from": "gpt", "value": "black"}]}
        >>> _ = (root / "caps.json").write_text(json.dumps([rec]))
        >>> ds = sharegpt4v(root / "caps.json")
        >>> ds[0].caption, ds[0].meta["prompt"]
        ('black', 'Describe the image.')
    """
    _check_on_error(on_error)
    path = Path(path)
    if not path.exists():
        raise _MissingPath(f"caption file {path} does not exist: pass the path of a ShareGPT4V-style JSON or "
                           "JSONL file")
    root = Path(image_root) if image_root is not None else path.parent
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read caption file {path} ({e}): pass a UTF-8 JSON or JSONL file") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise InputError(f"{path} is neither a JSON list nor JSON lines: {e}") from e
    if isinstance(data, dict):
        data = data.get("data") or data.get("annotations") or [data]
    if not isinstance(data, list):
        raise InputError(f"{path} should hold a list of records with 'image' and 'conversations'")
    log = _SkipLog(f"sharegpt4v({path})")
    records = []
    for k, rec in enumerate(data):
        if n is not None and len(records) >= n:
            break
        rec = rec if isinstance(rec, dict) else {"record": rec}
        conv = [t for t in (rec.get("conversations") or []) if isinstance(t, dict)]
        caption = next((t.get("value") for t in conv if t.get("from") in ("gpt", "assistant")), None)
        prompt = next((t.get("value") for t in conv if t.get("from") in ("human", "user")), "")
        image = rec.get("image")
        rid = rec.get("id", k)
        if not isinstance(image, str) or not image or not isinstance(caption, str) or not isinstance(prompt, str):
            if on_error == "raise":
                raise InputError(f"record {rid} of {path} lacks an 'image' or a 'gpt' turn: {str(rec)[:200]}")
            log.add(f"record {rid}", "no image or no caption")
            continue
        file = root / image
        if not file.exists():
            if on_error == "raise":
                raise BadImageError(f"image file not found: {file} (record {rid}; image_root={root})")
            log.add(file, "missing")
            continue
        prompt = prompt.replace("<image>", "").strip()
        records.append((str(file), None, caption.strip(), rid, {"path": str(file), "prompt": prompt}))
    return _RecordDataset(records, None, on_error, what=f"sharegpt4v({path})", skipped=log)
