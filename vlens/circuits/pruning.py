"""Influence, pruning and graph scores of an attribution graph: circuit-tracer's formulas, on a plain adjacency matrix.

A port of `circuit_tracer/graph.py` (circuit-tracer 0.5.0: `normalize_matrix`,
`compute_influence`, `compute_node_influence`, `compute_edge_influence`,
`find_threshold`, `prune_graph`, `compute_graph_scores`), the same arithmetic
on the same node order ([features, errors (layer-major), tokens, logits];
rows are targets, columns sources). Ported, not imported, because
circuit-tracer cannot be installed beside vlens (it pins
`transformers<=4.57.3` and `huggingface-hub<1.0`); `tests/test_circuits.py`
checks the port against circuit-tracer's own functions in a separate
virtual environment when one is present (`VLENS_CIRCUIT_TRACER_PYTHON`).

    >>> A = torch.tensor([[0., 1., 0.], [0., 0., 0.], [3., 1., 0.]])   # feature 0, token 1, logit 2
    >>> node_influence(A, torch.tensor([0., 0., 1.])).tolist()
    [0.75, 1.0, 0.0]
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..errors import InputError

__all__ = ["normalize_matrix", "influence", "node_influence", "edge_influence", "find_threshold", "PruneResult",
           "prune", "graph_scores"]


def normalize_matrix(matrix: Float[Tensor, "n n"]) -> Float[Tensor, "n n"]:
    """|A| with each row scaled to sum to one (circuit-tracer's `normalize_matrix`).

    Example:
        >>> normalize_matrix(torch.tensor([[1., -3.], [0., 0.]])).tolist()
        [[0.25, 0.75], [0.0, 0.0]]
    """
    a = matrix.abs()
    return a / a.sum(dim=1, keepdim=True).clamp(min=1e-10)


def influence(A: Float[Tensor, "n n"], logit_weights: Float[Tensor, " n"], max_iter: int = 1000) -> Float[Tensor, " n"]:
    """`w A + w A² + ...` for a nilpotent (acyclic) A (circuit-tracer's `compute_influence`).

    Example:
        >>> influence(torch.tensor([[0., 1.], [0., 0.]]), torch.tensor([1., 0.])).tolist()
        [0.0, 1.0]
    """
    current = logit_weights @ A
    total = current
    for _ in range(max_iter):
        if not current.any():
            return total
        current = current @ A
        total = total + current
    raise RuntimeError(f"influence did not converge after {max_iter} iterations: is the graph acyclic?")


def node_influence(A: Float[Tensor, "n n"], logit_weights: Float[Tensor, " n"]) -> Float[Tensor, " n"]:
    """Each node's influence on the weighted logits through the normalised graph.

    Example:
        >>> node_influence(torch.tensor([[0., 1.], [0., 0.]]), torch.tensor([1., 0.])).tolist()
        [0.0, 1.0]
    """
    return influence(normalize_matrix(A), logit_weights)


def edge_influence(pruned: Float[Tensor, "n n"], logit_weights: Float[Tensor, " n"]) -> Float[Tensor, "n n"]:
    """Each edge's influence: normalised weight times its target's influence plus logit weight.

    Example:
        >>> edge_influence(torch.tensor([[0., 1.], [0., 0.]]), torch.tensor([1., 0.])).tolist()
        [[0.0, 1.0], [0.0, 0.0]]
    """
    normed = normalize_matrix(pruned)
    infl = influence(normed, logit_weights) + logit_weights
    return normed * infl[:, None]


def find_threshold(scores: Float[Tensor, " n"], threshold: float) -> Tensor:
    """The score above which the top scores hold `threshold` of the total.

    Example:
        >>> float(find_threshold(torch.tensor([5., 3., 1., 1.]), 0.5))
        5.0
    """
    s = torch.sort(scores, descending=True).values
    cum = torch.cumsum(s, dim=0) / torch.sum(s)
    i = min(int(torch.searchsorted(cum, threshold).item()), len(cum) - 1)
    return s[i]


class PruneResult(NamedTuple):
    """Which nodes and edges a pruning keeps, and each node's cumulative influence score."""

    node_mask: Bool[Tensor, " n"]
    edge_mask: Bool[Tensor, "n n"]
    cumulative_scores: Float[Tensor, " n"]


def _check_threshold(name: str, t: float) -> None:
    if not 0.0 <= t <= 1.0:
        raise InputError(f"{name} must be between 0 and 1 (a fraction of total influence), got {t}")


def prune(A: Float[Tensor, "n n"], logit_weights: Float[Tensor, " n"], n_tokens: int, n_logits: int,
          n_features: int, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
    """circuit-tracer's `prune_graph`: keep nodes and edges holding the given fractions of influence.

    Tokens and logits are always kept; features and errors without outgoing
    (features also incoming) edges are dropped until nothing changes.

    Example:
        >>> A = torch.tensor([[0., 0., 2., 0.], [0., 0., 1., 0.], [0., 0., 0., 0.], [3., 1e-4, 0., 0.]])
        >>> prune(A, torch.tensor([0., 0., 0., 1.]), n_tokens=1, n_logits=1, n_features=1).node_mask.tolist()
        [True, False, True, True]
    """
    _check_threshold("node_threshold", node_threshold)
    _check_threshold("edge_threshold", edge_threshold)
    infl = node_influence(A, logit_weights)
    node_mask = infl >= find_threshold(infl, node_threshold)
    node_mask[-n_logits - n_tokens:] = True
    pruned = A.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    scores = edge_influence(pruned, logit_weights)
    edge_mask = scores >= find_threshold(scores.flatten(), edge_threshold)
    inner = slice(None, -n_logits - n_tokens)
    old = node_mask.clone()
    node_mask[inner] &= edge_mask[:, inner].any(0)
    node_mask[:n_features] &= edge_mask[:n_features].any(1)
    while not torch.all(node_mask == old):
        old[:] = node_mask
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[inner] &= edge_mask[:, inner].any(0)
        node_mask[:n_features] &= edge_mask[:n_features].any(1)
    s, order = torch.sort(infl, descending=True)
    cumulative = torch.zeros_like(infl)
    cumulative[order] = torch.cumsum(s, dim=0) / torch.sum(s)
    return PruneResult(node_mask, edge_mask, cumulative)


def graph_scores(A: Float[Tensor, "n n"], logit_weights: Float[Tensor, " n"], n_features: int, n_tokens: int,
                 n_layers: int) -> tuple[float, float]:
    """circuit-tracer's `compute_graph_scores`: (replacement score, completeness score).

    Replacement: the share of token-to-logit influence that reaches the logits
    through features rather than error nodes. Completeness: the
    influence-weighted share of each node's inputs that are not errors.

    Example:
        >>> A = torch.zeros(4, 4); A[0, 2] = 1.; A[3, 0] = 1.   # token -> feature -> logit, one error node
        >>> graph_scores(A, torch.tensor([0., 0., 0., 1.]), n_features=1, n_tokens=1, n_layers=1)
        (1.0, 1.0)
    """
    e0, e1 = n_features, n_features + n_tokens * n_layers
    t1 = e1 + n_tokens
    normed = normalize_matrix(A)
    infl = influence(normed, logit_weights)
    tok, err = infl[e1:t1].sum(), infl[e0:e1].sum()
    replacement = tok / (tok + err)
    non_error = 1 - normed[:, e0:e1].sum(dim=-1)
    out_infl = infl + logit_weights
    completeness = (non_error * out_infl).sum() / out_infl.sum()
    return float(replacement), float(completeness)
