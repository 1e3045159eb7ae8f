"""The records every vlens experiment reads: `Sample`, and `Dataset`, an indexable sequence of them.

    >>> from PIL import Image
    >>> ds = ListDataset([Sample(Image.new("RGB", (8, 8)), label=0)], class_names=["black"])
    >>> ds.class_names[ds[0].label]
    'black'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

__all__ = ["Sample", "Dataset", "ListDataset", "vocabulary"]


@dataclass
class Sample:
    """One example: an image (PIL, RGB) and what we know about it.

    `label` indexes the data set's `class_names`; `caption` is a free-text
    description (used as the answer after the prompt, for SAE training and
    damage evaluation); `id` identifies the sample in harvest metadata.
    """

    image: Any = None
    label: int | None = None
    caption: str | None = None
    id: Any = None
    meta: dict = field(default_factory=dict)


class Dataset(Sequence[Sample]):
    """An indexable sequence of `Sample`s with optional `class_names`.

    Subclasses implement `__len__` and `_get(i)`; loading is lazy, so a data
    set over thousands of image files costs nothing until indexed.

    Example:
        >>> from PIL import Image
        >>> ds = ListDataset([Sample(Image.new("RGB", (8, 8)), label=0)], class_names=["black"])
        >>> ds.class_names[ds[0].label]
        'black'
    """

    class_names: list[str] | None = None

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _get(self, i: int) -> Sample:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return ListDataset([self[j] for j in range(*i.indices(len(self)))], class_names=self.class_names)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a data set of {len(self)} samples")
        return self._get(i)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def labels(self) -> list[int | None]:
        """Every sample's label, in order (a folder's are read without opening its images).

        Example:
            >>> ListDataset([Sample(label=1), Sample(label=0)]).labels()
            [1, 0]
        """
        return [s.label for s in self]

    def captions(self) -> list[str | None]:
        """Every sample's caption, in order (a caption file's are read without opening its images).

        Example:
            >>> ListDataset([Sample(caption="a red square"), Sample()]).captions()
            ['a red square', None]
        """
        return [s.caption for s in self]


class ListDataset(Dataset):
    """A `Dataset` over an in-memory list of samples."""

    def __init__(self, samples: Sequence[Sample], class_names: Sequence[str] | None = None) -> None:
        self.samples = list(samples)
        self.class_names = list(class_names) if class_names is not None else None

    def __len__(self) -> int:
        return len(self.samples)

    def _get(self, i: int) -> Sample:
        return self.samples[i]


def vocabulary(data: Iterable[Any]) -> list[str]:
    """The words of a data set, for a tiny build's word-level tokenizer (`vlens.tiny(words=data)`).

    `data` is a data set of `Sample`s (its `class_names` and every caption
    count) or plain strings; words are lower-cased, in first-seen order.

    Example:
        >>> ds = ListDataset([Sample(caption="A circle coloured red.")], class_names=["red circle"])
        >>> vocabulary(ds)
        ['red', 'circle', 'a', 'coloured', '.']
    """
    from ..families.wordlevel import split_words

    texts = [str(name) for name in (getattr(data, "class_names", None) or [])]
    items = data.captions() if isinstance(data, Dataset) else data
    for item in items:
        text = item if isinstance(item, str) or item is None else getattr(item, "caption", None)
        if text:
            texts.append(str(text))
    return list(dict.fromkeys(w.lower() for t in texts for w in split_words(t)))
