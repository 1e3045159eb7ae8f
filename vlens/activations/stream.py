"""The pass over a data set: its plan, checked once, and its batches (sample → image → prepare → select).

`vlens.harvest` (to disk) and `vlens.sae.train_many` (into SAEs, nothing on
disk) read the same token stream: the same samples, prompt, chat template,
captions and text-only pass, batch after batch. This module is that stream.

- `StreamPlan`: the stream's settings; `plan.check(vlm, data)` is the one
  check of them that harvest, `train_many` and the command line call (the
  command line before the model loads: `plan.check()`).
- `read_chunk` / `batches`: one batch of the stream as a `Chunk` (samples,
  images, the prepared `Batch` and the token mask); `chunk.read(vlm, sites)`
  reads its activations through `read_layers`.
- `load_sample`, `sample_image`, `sample_key`, `sample_id`: one sample, checked,
  and what a resumed pass compares to know the data is the same.

    >>> import vlens
    >>> from PIL import Image
    >>> from vlens.data import Sample
    >>> vlm = vlens.tiny()
    >>> data = [Sample(Image.new("RGB", (32, 32)), caption="a red square") for _ in range(3)]
    >>> plan = StreamPlan(tokens="image+answer", captions=True, text_only=True, batch_size=2).check(vlm, data)
    >>> [(c.pass_name, c.b0, len(c.samples)) for c in batches(vlm, data, plan)]
    [('main', 0, 2), ('main', 2, 1), ('text', 0, 2), ('text', 2, 1)]
"""

from __future__ import annotations

import hashlib
import json
import operator
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Sequence, TYPE_CHECKING

import torch
from jaxtyping import Bool
from torch import Tensor

from ..errors import BadImageError, InputError
from ..model import as_dtype
from ..prepare import load_image
from ..prompts import QUESTION
from ..sites import SiteLike
from ..tokens import Batch, check_selection, select
from .read import read_layers

if TYPE_CHECKING:
    from ..model import VLM

__all__ = ["StreamPlan", "Chunk", "read_chunk", "batches", "load_sample", "sample_image", "sample_key", "sample_id",
           "PASSES"]

#: The passes of a stream, in order: the image pass, then (with `text_only`) the captions alone.
PASSES = ("main", "text")

_FIX_IMAGE = ("Fix or remove that image (vlens.data data sets: ds.verify() drops unreadable ones), then call harvest "
              "again with the same arguments to resume")


@dataclass(frozen=True)
class StreamPlan:
    """The settings of a pass over a data set: the token stream harvest and `train_many` share.

    Fields as `vlens.harvest` names them: `tokens` (the selection kept), `prompt`
    (with `<image>`), `template`, `captions` (append each caption as the answer),
    `text_only` (a second pass over the captions alone, after `text_prompt`),
    `batch_size` (samples per forward), `dtype` (of the activations read;
    `check(vlm)` resolves None to the model's) and `text_tokens` (the selection kept in
    the text-only pass; None: `tokens`; `"all"` keeps every token, BOS included, as the
    paper's pass over `processor(caption)` does).

    Example:
        >>> from vlens.errors import SelectionError
        >>> try:
        ...     StreamPlan(tokens="imgae").check()
        ... except SelectionError as e:
        ...     print(str(e)[:32])
        unknown token selection 'imgae':
    """

    tokens: Any = "image"
    prompt: str = QUESTION
    template: bool = True
    captions: bool = False
    text_only: bool = False
    text_prompt: str = ""
    batch_size: int = 8
    dtype: Any = None
    text_tokens: Any = None

    def check(self, vlm: "VLM | None" = None, data: Any = None, *, what: str = "harvest",
              batch_name: str = "batch_size") -> "StreamPlan":
        """The plan checked before any forward; with `vlm`, its dtype resolved. Errors name the argument.

        Without `vlm` and `data` (the command line, before the model loads) the
        checks that need neither run: batch size, token selection, dtype.

        Example:
            >>> import vlens
            >>> StreamPlan(batch_size=4).check(vlens.tiny()).dtype
            torch.float32
        """
        b = self.batch_size
        if not isinstance(b, int) or isinstance(b, bool) or b < 1:
            raise InputError(f"{batch_name} must be a positive int, not {b!r} (samples per forward)")
        dtype = as_dtype(self.dtype) or (vlm.dtype if vlm is not None else None)
        if dtype is not None and not dtype.is_floating_point:
            raise InputError(f"dtype must be a floating-point dtype (e.g. torch.float16), not {dtype}")
        if data is not None:
            _check_data(data, what)
        check_selection(self.tokens)  # a bad name fails now, not after the first forward
        if self.text_tokens is not None:
            check_selection(self.text_tokens)
        if any(isinstance(t, Tensor) and t.dtype == torch.bool for t in (self.tokens, self.text_tokens)):
            raise InputError("a fixed [batch, seq] mask cannot select tokens in every forward: pass a selection name "
                             "or a function layout -> mask")
        if vlm is not None and vlm.family.image_token(vlm.processor) not in self.prompt:
            raise InputError(f"prompt {self.prompt!r} has no '<image>' placeholder: write it where the image goes, "
                             f"e.g. {QUESTION!r}")
        return replace(self, template=bool(self.template), captions=bool(self.captions),
                       text_only=bool(self.text_only), dtype=dtype)

    @property
    def passes(self) -> tuple[str, ...]:
        """The passes this plan runs: `("main",)`, or `("main", "text")` with `text_only`."""
        return PASSES if self.text_only else PASSES[:1]

    @property
    def token_description(self) -> str:
        """The token selection as a store's config and a checkpoint record it."""
        t = self.tokens
        if isinstance(t, str):
            return t
        if callable(t):
            return f"<function {getattr(t, '__qualname__', repr(t))}>"
        return f"<positions {list(t) if isinstance(t, (list, tuple, range)) else t}>"

    def chunks(self, n: int) -> list[tuple[str, int]]:
        """(pass, first sample) of every forward of one pass over `n` samples, in order."""
        return [(p, b0) for p in self.passes for b0 in range(0, n, self.batch_size)]


def _check_data(data: Any, what: str) -> None:
    try:
        n = len(data)
    except TypeError:
        raise InputError(f"data must be a sequence with len() and indexing (a list of vlens.data.Sample or a "
                         f"vlens.data data set), not {type(data).__name__}: wrap an iterator in list(...)") from None
    if n == 0:
        raise InputError(f"data is empty: nothing to {what}; give at least one vlens.data.Sample")


@dataclass
class Chunk:
    """One forward of the stream: its samples (and images, in the main pass), the `Batch` and the token mask."""

    pass_name: str
    b0: int
    samples: list
    images: list | None
    batch: Batch
    mask: Bool[Tensor, "batch seq"]

    @property
    def text_only(self) -> bool:
        """Whether this chunk is of the text-only pass."""
        return self.pass_name == "text"

    def keys(self) -> list[str] | None:
        """`sample_key` of every sample (None in the text-only pass): what a resumed pass compares."""
        if self.images is None:
            return None
        return [sample_key(s, im) for s, im in zip(self.samples, self.images)]

    def read(self, vlm: "VLM", sites: Sequence[SiteLike], pool: str | None = None,
             dtype: torch.dtype | None = None) -> dict[Any, Tensor] | None:
        """`read_layers` at `sites` for the selected tokens; None (no forward) when the chunk selects none."""
        if not bool(self.mask.any()):
            return None
        return read_layers(vlm, self.batch, list(sites), tokens=self.mask, pool=pool, dtype=dtype)


def read_chunk(vlm: "VLM", data: Sequence[Any], plan: StreamPlan, pass_name: str, b0: int,
               at: Callable[[int], int] | None = None) -> Chunk:
    """The chunk of `pass_name` starting at sample `b0`: samples checked, images loaded, batch prepared, tokens selected.

    `at(i)` is sample i's index in the caller's data (a rank's slice); errors name it.

    Example:
        >>> import vlens
        >>> from PIL import Image
        >>> from vlens.data import Sample
        >>> vlm = vlens.tiny()
        >>> data = [Sample(Image.new("RGB", (32, 32)))] * 3
        >>> c = read_chunk(vlm, data, StreamPlan(batch_size=2).check(vlm), "main", 2)
        >>> len(c.samples), int(c.mask.sum()) == int(c.batch.layout.image.sum())
        (1, True)
    """
    at = at or (lambda i: i)
    span = range(b0, min(b0 + plan.batch_size, len(data)))
    samples = [load_sample(data, i, at(i)) for i in span]
    images = [sample_image(s, at(i)) for i, s in zip(span, samples)] if pass_name == "main" else None
    batch = _prepare(vlm, samples, images, b0, pass_name, plan, at)
    tokens = plan.text_tokens if pass_name == "text" and plan.text_tokens is not None else plan.tokens
    return Chunk(pass_name, b0, samples, images, batch, select(batch, tokens))


def batches(vlm: "VLM", data: Sequence[Any], plan: StreamPlan, start: dict[str, int] | None = None,
            at: Callable[[int], int] | None = None) -> Iterator[Chunk]:
    """The stream's chunks in order, each pass from its `start` sample (resuming) to the end of the data.

    Example:
        >>> import vlens
        >>> from PIL import Image
        >>> from vlens.data import Sample
        >>> vlm = vlens.tiny()
        >>> plan = StreamPlan(batch_size=2).check(vlm)
        >>> [c.b0 for c in batches(vlm, [Sample(Image.new("RGB", (32, 32)))] * 5, plan, start={"main": 2})]
        [2, 4]
    """
    start = start or {}
    for pass_name in plan.passes:
        for b0 in range(start.get(pass_name, 0), len(data), plan.batch_size):
            yield read_chunk(vlm, data, plan, pass_name, b0, at)


def _prepare(vlm: "VLM", samples: list, images: list | None, b0: int, pass_name: str, plan: StreamPlan,
             at: Callable[[int], int]) -> Batch:
    if pass_name == "text" or plan.captions:
        for i, s in enumerate(samples):
            cap = getattr(s, "caption", None)
            if not cap or not isinstance(cap, str):
                what = "no caption" if not cap else f"a caption of type {type(cap).__name__}"
                raise InputError(
                    f"sample {at(b0 + i)} (id {getattr(s, 'id', None)!r}) has {what}, but captions=True or "
                    "text_only=True needs a caption string per sample: use an image-caption data set or set "
                    "captions=False, text_only=False"
                )
    if pass_name == "text":
        return vlm.prepare([plan.text_prompt] * len(samples), None, answers=[s.caption for s in samples], template=False)
    answers = [s.caption for s in samples] if plan.captions else None
    return vlm.prepare([plan.prompt] * len(samples), images, answers=answers, template=plan.template)


def load_sample(data: Sequence[Any], i: int, where: int | None = None) -> Any:
    """`data[i]`, checked: an unreadable image (lazy data sets decode on access) or a bad label names the sample.

    Example:
        >>> from vlens.data import Sample
        >>> from vlens.errors import InputError
        >>> try:
        ...     load_sample([Sample(None, label="cat")], 0)
        ... except InputError as e:
        ...     print(str(e)[:36])
        sample 0 (id None) has label 'cat':
    """
    where = i if where is None else where
    try:
        s = data[i]
    except BadImageError as e:
        raise BadImageError(f"sample {where}: {e}. {_FIX_IMAGE}") from e
    label = getattr(s, "label", None)
    if label is not None:
        try:
            ok = operator.index(label) >= -1
        except TypeError:
            ok = False
        if not ok:
            raise InputError(f"sample {where} (id {getattr(s, 'id', None)!r}) has label {label!r}: a label is a class "
                             "id (an int >= 0) or None; map class names to ids, e.g. label=class_names.index(name)")
    return s


def sample_image(s: Any, where: int) -> Any:
    """The sample's image as RGB (`vlens.prepare.load_image`), or an error naming the sample.

    Example:
        >>> from PIL import Image
        >>> from vlens.data import Sample
        >>> sample_image(Sample(Image.new("L", (4, 4))), 0).mode
        'RGB'
    """
    image = getattr(s, "image", None)
    if image is None:
        hint = " (pass vlens.data.Sample(image, ...) objects)" if not hasattr(s, "image") else ""
        raise InputError(f"sample {where} (id {getattr(s, 'id', None)!r}) has no image{hint}: give every sample one")
    try:
        return load_image(image)
    except BadImageError as e:
        raise BadImageError(f"sample {where} (id {getattr(s, 'id', None)!r}): {e}. {_FIX_IMAGE}") from e


def sample_key(s: Any, image: Any) -> str:
    """A short digest of a sample (id, label, caption, image pixels): tells two data sets apart on resume.

    Example:
        >>> from PIL import Image
        >>> from vlens.data import Sample
        >>> a, b = Image.new("RGB", (4, 4)), Image.new("RGB", (4, 4), (1, 0, 0))
        >>> sample_key(Sample(a), a) == sample_key(Sample(b), b)
        False
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps([getattr(s, "id", None), getattr(s, "label", None), getattr(s, "caption", None),
                         image.mode, image.size], default=str).encode())
    h.update(image.tobytes())
    return h.hexdigest()


def sample_id(sample: Any, i: int) -> Any:
    """The id a store records for a sample: its `id` (an int or str), else its index `i`.

    Example:
        >>> from vlens.data import Sample
        >>> sample_id(Sample(None, id="img-3"), 3), sample_id(Sample(None), 3)
        ('img-3', 3)
    """
    sid = getattr(sample, "id", None)
    if sid is None:
        return i
    return sid if isinstance(sid, (int, str)) else str(sid)
