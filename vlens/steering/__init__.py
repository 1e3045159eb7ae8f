"""Steering: vectors, steered generation, and the paper's efficacy / damage evaluation.

* `vlens.steering.vectors`: `diff_of_means` (the paper's vector, from
  `class_means`), `from_probe`, `unembedding_diff`, `random_like` (the control), `normalize`.
* `vlens.steering.generation`: `steered_generate` adds `k · v` at the image
  tokens of layer L during the prefill (the paper) or at every step, then
  decodes with the KV cache.
* `vlens.steering.evaluation`: `efficacy` (the two-choice question: probability
  of the target name, and whether the greedy answer names it), `caption_nll` and
  `damage` (the increase of the mean caption NLL), `sweep` over class pairs,
  coefficients and layers (`SteeringSweep`, with plotly figures).

Every name is importable from `vlens.steering` itself. A vector's sparse
approximation by SAE decoder directions is `vlens.sparsity.sparse_approximation`;
prompts are in `vlens.prompts`; pooled features come from `vlens.read_layers`.

    >>> import torch
    >>> from vlens import steering
    >>> X = torch.tensor([[0.0, 1], [0, 3], [4, 0], [6, 0]]); y = torch.tensor([0, 0, 1, 1])
    >>> steering.diff_of_means(X, y, src=0, tgt=1, normalize=True)
    tensor([ 0.9285, -0.3714])
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Sequence, TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from ..activations.read import read_layers
from ..prompts import PROBE_PROMPT
from .evaluation import SteeringSweep, _images_of, caption_nll, damage, efficacy, sweep
from .generation import steered_generate
from .vectors import class_means, diff_of_means, from_probe, normalize, random_like, unembedding_diff

if TYPE_CHECKING:
    from ..model import VLM

__all__ = [
    "SteeringSweep",
    "caption_nll",
    "class_means",
    "damage",
    "diff_of_means",
    "efficacy",
    "from_probe",
    "normalize",
    "random_like",
    "steered_generate",
    "sweep",
    "unembedding_diff",
]


def pool_features(
    vlm: VLM,
    images: Sequence[Any],
    layers: Iterable[int],
    *,
    prompt: str = PROBE_PROMPT,
    tokens: Any = "image",
    batch_size: int = 16,
) -> dict[int, Float[Tensor, "n d_model"]]:
    """Deprecated: call `vlens.read_layers(vlm, batch, layers, pool="mean")` per batch (or `vlens.harvest`).

    The mean of `resid_pre.L` over the selected tokens, per image, in memory
    (the paper's probe features), through `vlens.activations.read_layers`
    batch by batch. `images` may be a data set of `Sample`s.

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny()
        >>> feats = pool_features(vlm, [Image.new("RGB", (32, 32))] * 3, layers=[1, 3])
        >>> feats[3].shape
        torch.Size([3, 64])
    """
    warnings.warn(
        "vlens.steering.pool_features is deprecated and goes away in vlens 0.3: call "
        "vlens.read_layers(vlm, batch, layers, pool='mean') (vlens.activations.read_layers) per batch, or "
        "vlens.activations.harvest(..., pool='mean') for data that does not fit in memory",
        DeprecationWarning,
        stacklevel=2,
    )
    layers = sorted(set(int(L) for L in layers))
    images = _images_of(images)
    out: dict[int, list[Tensor]] = {L: [] for L in layers}
    for i in tqdm(range(0, len(images), batch_size), desc="pool features", disable=None, leave=False):
        chunk = images[i : i + batch_size]
        batch = vlm.prepare([prompt] * len(chunk), chunk)
        pooled = read_layers(vlm, batch, layers, tokens=tokens, pool="mean", dtype=torch.float32)
        for L in layers:
            out[L].append(pooled[L])
    return {L: torch.cat(v) for L, v in out.items()}


#: vlens 0.1 names of this module that moved: name -> new home (served with a DeprecationWarning until 0.3).
_MOVED = {
    "sparse_approximation": "vlens.sparsity",
    "SparseApproximation": "vlens.sparsity",
    "TWO_CHOICE": "vlens.prompts",
    "CAPTION_PROMPT": "vlens.prompts",
    "two_choice_prompt": "vlens.prompts",
}


def __getattr__(name: str) -> Any:
    """vlens 0.1 names that moved: the sparse approximation to `vlens.sparsity`, prompts to `vlens.prompts`."""
    if name not in _MOVED:
        raise AttributeError(f"module 'vlens.steering' has no attribute {name!r}")
    if _MOVED[name] == "vlens.sparsity":
        from .. import sparsity as home
    else:
        from .. import prompts as home
    warnings.warn(f"vlens.steering.{name} moved to {_MOVED[name]}.{name}; the old path goes away in vlens 0.3",
                  DeprecationWarning, stacklevel=2)
    return getattr(home, name)
