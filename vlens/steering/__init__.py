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

from .evaluation import SteeringSweep, caption_nll, damage, efficacy, sweep
from .generation import steered_generate
from .vectors import class_means, diff_of_means, from_probe, normalize, random_like, unembedding_diff

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

