"""Steered generation: add `k · v` at the selected tokens of one site, then decode with the KV cache.

`steered_generate` adds the vector during the prefill (the paper: the image
tokens' keys and values carry it into every later step) or, with
`every_step=True`, also to each new token; other edits from
`vlens.interventions` run in the same trace through `edit=`.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import InputError
from ..interventions import add, check_vector
from ..tokens import Batch, select

if TYPE_CHECKING:
    from ..model import VLM

__all__ = ["steered_generate"]


def _edits(vlm: VLM, batch: Batch, vector: Any, layer: Any, k: float, tokens: Any, new_tokens: bool,
           edit: Callable | None) -> None:
    if vector is not None:
        add(vlm, layer, vector, k, batch=batch, tokens=tokens, new_tokens=new_tokens)
    if edit is not None:
        edit(vlm, batch)


def steered_generate(
    vlm: VLM,
    batch: Batch,
    vector: Float[Tensor, " d_model"] | None = None,
    layer: int | str | None = None,
    k: float = 1.0,
    *,
    tokens: Any = "image",
    every_step: bool = False,
    edit: Callable[[Any, Batch], None] | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    return_ids: bool = False,
    **generate_kwargs: Any,
) -> list[str] | tuple[list[str], Tensor]:
    """Generate with `k · vector` added at `layer` (int = `resid_pre.L`) on the selected tokens, using the KV cache.

    By default the vector is added during the prefill only (the paper): the
    image tokens' keys and values carry it into every later step. With
    `every_step=True` it is also added to each newly generated token.
    `edit(vlm, batch)`, if given, is called in the same trace to apply other
    interventions from `vlens.interventions` (with `every_step`, at every
    step; it should pass `new_tokens=True` to edit the new tokens). Greedy by
    default; `do_sample=True` (plus `temperature=`, `top_p=`...) samples.
    Returns the new text per row (and the full ids with `return_ids`).

    Example:
        >>> import vlens, torch; from PIL import Image
        >>> vlm = vlens.tiny()
        >>> b = vlm.prepare(["<image>\\nWhat is shown?"] * 2, [Image.new("RGB", (32, 32))] * 2)
        >>> texts = steered_generate(vlm, b, torch.randn(vlm.d_model), layer=2, k=8.0, max_new_tokens=3)
        >>> len(texts)
        2
    """
    if not isinstance(batch, Batch):
        raise InputError("steered_generate needs a Batch from vlm.prepare(prompts, images)")
    if vector is not None:
        vector = check_vector(vector, vlm.d_model)
        if layer is None:
            raise InputError("give the layer to steer: steered_generate(vlm, batch, v, layer=8, k=...)")
        if tokens is not None:  # None edits every position
            select(batch, tokens, nonempty=True)  # fail early, outside the trace (checks the selection first)
    kw = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, **generate_kwargs)
    if not do_sample:
        kw.setdefault("temperature", None)
        kw.setdefault("top_p", None)
        kw.setdefault("top_k", None)
    with torch.no_grad():
        if not every_step:
            with vlm.generate(batch, **kw) as tracer:
                _edits(vlm, batch, vector, layer, k, tokens, False, edit)
                ids = tracer.result.save()
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*was never reached.*")
                with vlm.generate(**kw) as tracer:
                    with tracer.invoke(*vlm._unbatch((batch,))):
                        for _ in tracer.all():
                            _edits(vlm, batch, vector, layer, k, tokens, True, edit)
                    with tracer.invoke():
                        ids = tracer.result.save()
    texts = vlm.decode(ids, batch)
    return (texts, ids) if return_ids else texts
