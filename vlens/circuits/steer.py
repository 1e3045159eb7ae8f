"""Interventions from an attribution graph: set or ablate features, and compare the answer's change with the graph's.

`intervene` sets chosen features (layer, position, feature) to a value
(0 ablates) and reports the change of a logit node's value (its demeaned
logit, or the logit difference) four ways:

* `predicted_direct`: the graph's direct edges from the features to the
  logit, scaled by the change in activation;
* `predicted`: the graph's linear prediction through every path (the change
  propagates along feature → feature edges, each feature assumed to stay
  in its linear regime, as the local replacement model's linearisation);
* `replacement`: measured in the local replacement model (frozen attention,
  norms and error nodes; downstream features recomputed by their
  transcoders), and `replacement_frozen` with every other feature pinned,
  which equals `predicted_direct` (a forward-pass check of the edges);
* `model`: measured in the real model, the features' decoder writes edited
  (the real MLPs' outputs plus the edit's decoder change, as
  `vlens.interventions.splice_transcoder` with its error term), every
  nonlinearity live;
* `live_alone`: measured with one part live and the rest frozen, for each of
  `"attention"`, `"norms"`, `"mlps"` (`LocalReplacement.run(live=...)`):
  where `model` departs from `replacement`, which mechanism moves it
  (re-routed attention, rescaling norms, or downstream MLPs that react
  differently from their transcoders).

    >>> import vlens; from PIL import Image
    >>> from vlens.circuits.replacement import random_transcoders
    >>> from vlens.circuits.graph import attribute
    >>> vlm = vlens.tiny(n_layers=2)
    >>> tcs = random_transcoders(vlm, d_sae=8)
    >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
    >>> g = attribute(vlm, tcs, b, progress=False)
    >>> r = intervene(vlm, tcs, b, g, [tuple(g.features[-1].tolist())])
    >>> abs(r.replacement_frozen - r.predicted_direct) < 1e-4
    True
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import InputError
from ..tokens import Batch
from .graph import Graph
from .replacement import LIVE, LocalReplacement

if TYPE_CHECKING:
    from ..model import VLM

__all__ = ["InterventionResult", "intervene", "predicted_change", "feature_effects"]

Feature = tuple[int, int, int]


@dataclass
class InterventionResult:
    """The change of one logit node's value when features are set, predicted by the graph and measured."""

    features: list[Feature]
    value: float
    predicted_direct: float
    predicted: float
    replacement: float
    replacement_frozen: float
    model: float
    live_alone: dict[str, float]


def _per_unit(graph: Graph) -> Tensor:
    """Edges per unit of source activation: A[:, f] / a_f for feature sources (rows: targets)."""
    M = graph.adjacency[:, : graph.n_features] / graph.activations[None, :].clamp_min(1e-12)
    return M


def predicted_change(graph: Graph, features: Sequence[Feature], value: float = 0.0, logit: int = 0,
                     ) -> tuple[float, float]:
    """(direct, total) change of logit node `logit` that the graph predicts when `features` are set to `value`.

    Example:
        >>> import vlens; from PIL import Image
        >>> from vlens.circuits.replacement import random_transcoders
        >>> from vlens.circuits.graph import attribute
        >>> vlm = vlens.tiny(n_layers=1)
        >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
        >>> g = attribute(vlm, random_transcoders(vlm, d_sae=8), b, progress=False)
        >>> f = tuple(g.features[0].tolist())
        >>> d, t = predicted_change(g, [f])
        >>> abs(d + float(g.adjacency[g.logit_index(0), 0])) < 1e-6 and abs(d - t) < 1e-6   # one layer: direct only
        True
    """
    M = _per_unit(graph)
    idx = [graph.feature_index(*f) for f in features]
    delta0 = torch.zeros(graph.n_features)
    delta0[idx] = float(value) - graph.activations[idx]
    fixed = torch.zeros(graph.n_features, dtype=torch.bool)
    fixed[idx] = True  # set features do not respond to their inputs
    return float(M[graph.logit_index(logit)] @ delta0), float(_total_row(graph, M, logit, fixed) @ delta0)


def feature_effects(graph: Graph, logit: int = 0) -> Float[Tensor, " f"]:
    """The change of logit node `logit` the graph predicts when each active feature alone is ablated (set to 0).

    `predicted_change(graph, [f])[1]` for every feature at once (one pass back
    through the feature → feature edges): the ranking to pick features to
    ablate by.

    Example:
        >>> import vlens; from PIL import Image
        >>> from vlens.circuits.replacement import random_transcoders
        >>> from vlens.circuits.graph import attribute
        >>> vlm = vlens.tiny(n_layers=2)
        >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
        >>> g = attribute(vlm, random_transcoders(vlm, d_sae=8), b, progress=False)
        >>> e = feature_effects(g)
        >>> j = int(e.abs().argmax())
        >>> abs(float(e[j]) - predicted_change(g, [tuple(g.features[j].tolist())])[1]) < 1e-5
        True
    """
    return -graph.activations * _total_row(graph, _per_unit(graph), logit)


def _total_row(graph: Graph, M: Tensor, logit: int, fixed: Tensor | None = None) -> Tensor:
    """Each feature's total effect on logit node `logit` per unit of its activation, along every path of
    feature → feature edges (`M`: `_per_unit`); features in `fixed` do not respond to their inputs."""
    Mff = M[: graph.n_features]
    if fixed is not None:
        Mff = Mff.clone()
        Mff[fixed] = 0
    total = step = M[graph.logit_index(logit)]
    for _ in range(graph.n_layers + 1):  # paths climb the layers: at most n_layers feature → feature steps
        step = step @ Mff
        if not step.any():
            break
        total = total + step
    return total


def _edits(features: Sequence[Feature], value: float) -> dict[int, Callable[[Tensor], Tensor]]:
    by_layer: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for L, p, f in features:
        by_layer[int(L)].append((int(p), int(f)))

    def make(items: list[tuple[int, int]]) -> Callable[[Tensor], Tensor]:
        def edit(a: Tensor) -> Tensor:
            for p, f in items:
                a[p, f] = value
            return a
        return edit
    return {L: make(items) for L, items in by_layer.items()}


def intervene(vlm: VLM, transcoders: Any, batch: Batch, graph: Graph,
              features: Sequence[Feature], value: float = 0.0, logit: int = 0) -> InterventionResult:
    """Set `features` [(layer, position, feature), ...] to `value` and report predicted and measured changes.

    Example:
        >>> import vlens; from PIL import Image
        >>> from vlens.circuits.replacement import random_transcoders
        >>> from vlens.circuits.graph import attribute
        >>> vlm = vlens.tiny(n_layers=1)
        >>> tcs = random_transcoders(vlm, d_sae=8)
        >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
        >>> g = attribute(vlm, tcs, b, progress=False)
        >>> r = intervene(vlm, tcs, b, g, [tuple(g.features[0].tolist())])
        >>> abs(r.replacement - r.predicted) < 1e-4      # one layer: the replacement model is the graph
        True
    """
    if not features:
        raise InputError("name at least one feature: (layer, position, feature) rows of graph.features")
    features = [tuple(int(v) for v in f) for f in features]
    for f in features:
        graph.feature_index(*f)
    rm = LocalReplacement(vlm, transcoders, norms=graph.norms)
    with torch.no_grad():
        clean = rm.run(batch)
    u = graph.logit_directions[logit]
    pos = graph.position

    def measured(freeze: bool = False, live: Sequence[str] = ()) -> float:  # intervention runs are no_grad
        st = rm.run(batch, frozen=clean, edits=_edits(features, value), freeze_features=freeze, live=live)
        return float(st.final[pos].float() @ u) - float(graph.logit_values[logit])

    direct, total = predicted_change(graph, features, value, logit)
    return InterventionResult(features=list(features), value=float(value), predicted_direct=direct, predicted=total,
                              replacement=measured(), replacement_frozen=measured(freeze=True),
                              model=measured(live=LIVE), live_alone={p: measured(live=[p]) for p in LIVE})
