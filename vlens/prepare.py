"""Building batches: prompts and images in, one padded `Batch` (model inputs + `TokenLayout`) out.

`prepare` is what `VLM.prepare` calls; `load_image` is the one way vlens turns
anything image-like (a PIL image, a path, bytes, an HF image record, an HWC
array or tensor) into an RGB PIL image, used by `prepare` and by every data
loader in `vlens.data`, so a 16-bit PNG reads the same everywhere.

    >>> import vlens; from PIL import Image
    >>> vlm = vlens.tiny()
    >>> batch = vlm.prepare(["<image>\\nWhat is shown?"], [Image.new("RGB", (32, 32))], answers=["red"])
    >>> batch.layout.shape[0], int(batch.layout.answer.sum())
    (1, 1)
"""

from __future__ import annotations

import io
import os
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .errors import BadImageError, InputError
from .tokens import Batch, ImageSpan, TokenLayout

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from .families import Family

__all__ = ["prepare", "load_image", "UnknownWordsWarning"]


class UnknownWordsWarning(UserWarning):
    """Text that the tokenizer reads as its unknown token (a tiny build's small vocabulary, most often)."""


#: The unknown words already reported, per tokenizer: each is reported once, not once per batch.
_REPORTED: "weakref.WeakKeyDictionary[Any, set[str]]" = weakref.WeakKeyDictionary()


# -- images ---------------------------------------------------------------------------------------


def load_image(source: Any) -> "PILImage.Image":
    """Open anything image-like as an RGB PIL image.

    Accepts a PIL image, a path, bytes, an HF `{"bytes", "path"}` record, or an
    HWC array / tensor (uint8 0..255, or float 0..1). Grayscale, palette and
    CMYK become RGB; transparency is composited on white; 16-bit and float
    images (`I;16`, `I`, `F`) are rescaled from their own min..max. Raises
    `BadImageError` naming the problem (a missing or corrupt file, an empty
    image, a CHW array).

    Example:
        >>> from PIL import Image
        >>> load_image(Image.new("LA", (4, 4))).mode
        'RGB'
        >>> load_image(Image.new("I;16", (4, 4), 60000)).getpixel((0, 0))
        (0, 0, 0)
    """
    from PIL import Image, UnidentifiedImageError

    name = "<image>"
    try:
        if isinstance(source, dict):
            name = source.get("path") or name
            data = source.get("bytes")
            source = io.BytesIO(data) if data is not None else source.get("path")
            if source is None:
                raise BadImageError("an image record with neither bytes nor path")
        if isinstance(source, (bytes, bytearray)):
            source = io.BytesIO(source)
        if isinstance(source, (str, os.PathLike)):
            name = str(source)
            if not os.path.exists(source):
                raise BadImageError(f"image file not found: {name}")
        if isinstance(source, Image.Image):
            return _rgb(source)
        if isinstance(source, torch.Tensor) or hasattr(source, "__array__"):
            return _rgb(_from_array(source))
        if not isinstance(source, (str, os.PathLike)) and not hasattr(source, "read"):
            raise BadImageError(
                f"cannot read an image from a {type(source).__name__}: pass a PIL image, a path, bytes, "
                "or an HWC uint8 array"
            )
        with Image.open(source) as im:
            im.load()
            out = _rgb(im)
            return im.copy() if out is im else out  # detach from the (now closed) file
    except BadImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadImageError(f"cannot decode image {name}: {e}") from e


def _from_array(source: Any) -> "PILImage.Image":
    import numpy as np
    from PIL import Image

    arr = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else np.asarray(source)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        raise BadImageError(
            f"an image array of shape {arr.shape} looks channels-first (CHW): pass it as HWC, "
            "e.g. array.transpose(1, 2, 0) or tensor.permute(1, 2, 0)"
        )
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise BadImageError(f"an image array must be HW or HWC with 1, 3 or 4 channels, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise BadImageError("an image array holds NaN or inf values")
        if arr.min() < 0 or arr.max() > 1:
            raise BadImageError(
                f"a float image array must hold values in 0..1, got {arr.min():g}..{arr.max():g}: "
                "scale it, or pass uint8 0..255"
            )
        arr = np.round(arr * 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise BadImageError(f"an image array must be uint8 (0..255) or float (0..1), not {arr.dtype}")
    return Image.fromarray(np.ascontiguousarray(arr))


def _rgb(im: "PILImage.Image") -> "PILImage.Image":
    from PIL import Image

    if im.width == 0 or im.height == 0:
        raise BadImageError(f"an empty image ({im.width}×{im.height} pixels): every image needs at least one pixel")
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "P", "PA") or "transparency" in im.info:
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        im = Image.fromarray(a.astype("uint8"))
    return im.convert("RGB")


# -- batches --------------------------------------------------------------------------------------


def _as_list(x: Any) -> list:
    if x is None:
        return []
    if isinstance(x, (str, bytes)) or not isinstance(x, (list, tuple)):
        return [x]
    return list(x)


def prepare(
    family: "Family",
    processor: Any,
    config: Any,
    prompts: str | Sequence[str],
    images: Any = None,
    answers: str | Sequence[str] | None = None,
    *,
    template: bool = True,
    eos: bool = False,
) -> Batch:
    """`VLM.prepare` for a bare family, processor and config (see there).

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny()
        >>> b = prepare(vlm.family, vlm.processor, vlm.config, "<image>\\nhi", Image.new("RGB", (8, 8)))
        >>> len(b.layout.images)
        1
    """
    tok = processor.tokenizer
    image_token = family.image_token(processor)
    prompts = _as_list(prompts)
    if not prompts:
        raise InputError("prepare needs at least one prompt")
    if not all(isinstance(p, str) for p in prompts):
        raise InputError(f"prompts must be strings, got {sorted({type(p).__name__ for p in prompts})}")
    images = [load_image(im) for im in _as_list(images)]
    answers_list = _as_list(answers)
    if answers is not None and len(answers_list) != len(prompts):
        raise InputError(f"got {len(answers_list)} answers for {len(prompts)} prompts: give one answer per prompt")
    counts = [p.count(image_token) for p in prompts]
    if sum(counts) != len(images):
        missing = [i for i, c in enumerate(counts) if c == 0]
        hint = (
            f" Prompt(s) {missing} have no {image_token!r} placeholder: write it where the image goes, "
            f"e.g. '{image_token}\\nWhat is shown in this image?'."
            if missing and images
            else ""
        )
        raise InputError(
            f"{len(images)} image(s) but {sum(counts)} {image_token!r} placeholder(s) in the prompts; "
            f"give one image per placeholder, in order.{hint}"
        )

    texts = [family.render(processor, p) if template else p for p in prompts]
    ends = torch.tensor(counts).cumsum(0).tolist()  # images grouped per prompt: what multi-image processors expect
    per_prompt = [images[e - c : e] for c, e in zip(counts, ends)]
    enc = processor(text=texts, images=per_prompt if images else None, return_tensors="pt", padding=True)
    enc["vlens_image_sizes"] = torch.tensor([[im.height, im.width] for im in images], dtype=torch.long).view(-1, 2)
    ids_rows = [row[m.bool()].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"])]

    ans_rows: list[list[int]] = [[] for _ in prompts]
    for i, a in enumerate(answers_list):
        ans_rows[i] = tok(a, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else [])

    B = len(prompts)
    S = max(len(p) + len(a) for p, a in zip(ids_rows, ans_rows))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    attention = torch.zeros((B, S), dtype=torch.long)
    prompt_m = torch.zeros((B, S), dtype=torch.bool)
    answer_m = torch.zeros((B, S), dtype=torch.bool)
    for b, (p, a) in enumerate(zip(ids_rows, ans_rows)):
        n = len(p) + len(a)
        input_ids[b, S - n :] = torch.tensor(p + a, dtype=torch.long)
        attention[b, S - n :] = 1
        prompt_m[b, S - n : S - len(a)] = True
        answer_m[b, S - len(a) :] = True
    pad = attention == 0
    image = input_ids == family.image_token_id(config)
    bos = torch.zeros_like(pad)
    if tok.bos_token_id is not None:
        first = (S - attention.sum(1)).clamp(max=S - 1)
        bos[torch.arange(B), first] = input_ids[torch.arange(B), first] == tok.bos_token_id
    prompt_m &= ~image & ~bos

    spans = _spans(family.geometries(processor, config, enc) if images else [], image, counts)
    inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention}
    if images:
        inputs.update({k: enc[k] for k in family.image_inputs if k in enc})
    inputs.update(family.extra_inputs(config, enc, inputs))
    layout = TokenLayout(input_ids=input_ids, image=image, prompt=prompt_m, answer=answer_m, bos=bos, pad=pad,
                         images=spans)
    _warn_unknown(tok, input_ids[~pad & ~image], [*prompts, *answers_list])
    return Batch(inputs=inputs, layout=layout, prompts=list(prompts))


def _warn_unknown(tok: Any, text_ids: torch.Tensor, texts: Sequence[str]) -> None:
    """Warn, once per tokenizer and new word, when text tokens are the unknown token: the share and the fix."""
    unk = tok.unk_token_id
    n_unk = int((text_ids == unk).sum()) if unk is not None else 0
    if not n_unk:
        return
    from .families.wordlevel import split_words

    words = dict.fromkeys(w for t in texts for w in split_words(t.replace(tok.unk_token, " ")))
    unknown = [w for w in words if not (w.startswith("<") and w.endswith(">"))  # placeholders such as <image>
               and unk in tok(w, add_special_tokens=False)["input_ids"]]
    reported = _REPORTED.setdefault(tok, set())
    if not unknown or set(unknown) <= reported:
        return
    reported.update(unknown)
    warnings.warn(
        f"{n_unk} of {text_ids.numel()} text tokens ({n_unk / text_ids.numel():.0%}) of this batch are "
        f"{tok.unk_token}: the tokenizer does not know {', '.join(map(repr, unknown[:8]))}"
        f"{' ...' if len(unknown) > 8 else ''}, and the model reads them all as one token. A tiny build learns "
        "a data set's words: vlens.tiny(family=..., words=dataset) (its class names and captions); on the "
        "command line, --model tiny:FAMILY learns those of --data",
        UnknownWordsWarning,
        stacklevel=4,  # the caller of VLM.prepare
    )


def _spans(geometries: list, image: torch.Tensor, counts: list[int]) -> list[ImageSpan]:
    """Place each image's geometry on its run of image tokens, checking the processor agrees."""
    spans: list[ImageSpan] = []
    k = 0
    for b, c in enumerate(counts):
        pos = image[b].nonzero().flatten().tolist()
        start = 0
        for _ in range(c):
            geom = geometries[k]
            s0 = pos[start] if start < len(pos) else -1
            s1 = s0 + geom.n_tokens
            if s0 < 0 or pos[start : start + geom.n_tokens] != list(range(s0, s1)):
                raise InputError(
                    f"token geometry of image {k} ({geom.size}) disagrees with the processor: expected "
                    f"{geom.n_tokens} consecutive image tokens at position {s0}. Please report this with "
                    "the processor settings."
                )
            spans.append(ImageSpan(image=k, batch_index=b, start=s0, end=s1, geometry=geom))
            start += geom.n_tokens
            k += 1
        if start != len(pos):
            raise InputError(
                f"row {b} has {len(pos)} image tokens but its images account for {start}: the processor's "
                "image settings do not match the model config (vision_feature_select_strategy, "
                "num_additional_image_tokens, patch_size)."
            )
    return spans
