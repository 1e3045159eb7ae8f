"""The attribution graph of one answer (Ameisen et al. 2025), from image patches and text tokens to the logits.

`attribute` runs the local replacement model (`vlens.circuits.replacement`)
once and then one backward pass per target node, as circuit-tracer's
`attribute` does: a target (a logit, or an active feature's encoder input)
injects its direction, and the gradient read where each source writes
(the embedding at `resid_pre.0`, each layer's `mlp_out`) dotted with the
source's vector (embedding, activation × decoder row, error vector) is the
*direct* linear effect of that source on that target. The model is linear
under the freezes, so every target's incoming edges sum to its value:
a logit node's to its demeaned logit, a feature's to its encoder input
`x · W_enc` (without `b_enc`).

Nodes, in circuit-tracer's order (its `Graph`): active features
(layer, position, feature), error nodes (layer-major, one per layer and
position), input tokens (image tokens are *patch* nodes, with their pixel
box, tile, row and column from `vlens.tokens`), and logit nodes (the top
tokens, one chosen token, or the difference of two tokens). Positions run
up to the predicting position; later tokens cannot act on it.

    >>> import vlens; from PIL import Image
    >>> from vlens.circuits.replacement import random_transcoders
    >>> vlm = vlens.tiny(n_layers=2, words=["red", "blue"])
    >>> b = vlm.prepare(["<image>\\nWhat colour?"], [Image.new("RGB", (32, 32), "red")])
    >>> g = attribute(vlm, random_transcoders(vlm, d_sae=8), b, target="red", progress=False)
    >>> logit = float(g.adjacency[-1].sum())    # edges into the logit node sum to its demeaned logit
    >>> abs(logit - float(g.logit_values[0])) < 1e-4
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
from jaxtyping import Float, Int
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import InputError
from ..tokens import Batch, TokenLayout
from .pruning import PruneResult, graph_scores, node_influence, prune
from .replacement import LocalReplacement, ReplacementState

if TYPE_CHECKING:
    from ..model import VLM

__all__ = ["Graph", "attribute", "predicting_position", "logit_targets"]


@dataclass
class Graph:
    """An attribution graph: a dense adjacency (rows targets, columns sources) over circuit-tracer's node order.

    `features` [n, 3] holds (layer, position, feature) of every active
    feature, `activations` their values; `logit_targets` (label, vocab index;
    a difference of two tokens gets the virtual index vocab_size + i, as in
    circuit-tracer), `logit_probs` the logit nodes' weights and
    `logit_values` their demeaned logits (`final_norm` at the predicting
    position dotted with `logit_directions`, the demeaned unembedding rows).
    `dropped_logit_effect`: with `max_feature_nodes`, the direct effect on
    each logit node of the active features left out (zero otherwise), so
    `adjacency[logit].sum() + dropped_logit_effect == logit_values`
    (with `norms="frozen"`; see `vlens.circuits.replacement` for `"jacobian"`).
    """

    adjacency: Float[Tensor, "n n"]
    features: Int[Tensor, "f 3"]
    activations: Float[Tensor, " f"]
    input_ids: Int[Tensor, " pos"]
    tokens: list[str]
    logit_targets: list[tuple[str, int]]
    logit_probs: Float[Tensor, " k"]
    logit_values: Float[Tensor, " k"]
    logit_directions: Float[Tensor, "k d_model"]
    n_layers: int
    vocab_size: int
    layout: TokenLayout
    images: list[Image.Image] = field(default_factory=list)
    prompt: str = ""
    scan: str = "vlens"
    transcoder_list: list[str] = field(default_factory=list)
    dropped_logit_effect: Float[Tensor, " k"] | None = None
    norms: str = "frozen"

    @property
    def n_pos(self) -> int:
        return int(self.input_ids.numel())

    @property
    def n_features(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_logits(self) -> int:
        return len(self.logit_targets)

    def error_index(self, layer: int, pos: int) -> int:
        """Node index of the error node of `layer` at `pos`."""
        return self.n_features + layer * self.n_pos + pos

    def token_index(self, pos: int) -> int:
        """Node index of the input token (or patch) at `pos`."""
        return self.n_features + self.n_layers * self.n_pos + pos

    def logit_index(self, i: int = 0) -> int:
        """Node index of logit node `i`."""
        return self.token_index(self.n_pos) + i

    def feature_index(self, layer: int, pos: int, feature: int) -> int:
        """Node index of an active feature (raises `InputError` if it is not active here).

        Example:
            >>> import vlens; from PIL import Image
            >>> from vlens.circuits.replacement import random_transcoders
            >>> vlm = vlens.tiny(n_layers=1)
            >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
            >>> g = attribute(vlm, random_transcoders(vlm, d_sae=8), b, progress=False)
            >>> g.feature_index(*g.features[3].tolist())
            3
        """
        hit = (self.features == torch.tensor([layer, pos, feature])).all(1).nonzero()
        if hit.numel() == 0:
            raise InputError(f"feature {feature} of layer {layer} is not active at position {pos}: pick one of "
                             "graph.features (rows of layer, position, feature)")
        return int(hit[0, 0])

    def logit_weights(self) -> Float[Tensor, " n"]:
        """The weights circuit-tracer gives the logit nodes (their probabilities), zero elsewhere."""
        w = torch.zeros(self.adjacency.shape[0])
        w[-self.n_logits:] = self.logit_probs
        return w

    def influence(self) -> Float[Tensor, " n"]:
        """Each node's influence on the logit nodes (circuit-tracer's `compute_node_influence`)."""
        return node_influence(self.adjacency, self.logit_weights())

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
        """Nodes and edges kept by circuit-tracer's `prune_graph` at these thresholds.

        Example:
            >>> import vlens; from PIL import Image
            >>> from vlens.circuits.replacement import random_transcoders
            >>> vlm = vlens.tiny(n_layers=1)
            >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
            >>> g = attribute(vlm, random_transcoders(vlm, d_sae=8), b, progress=False)
            >>> r = g.prune(0.5)
            >>> bool(r.node_mask[g.token_index(0):].all())    # tokens and logits are always kept
            True
        """
        return prune(self.adjacency, self.logit_weights(), self.n_pos, self.n_logits, self.n_features,
                     node_threshold, edge_threshold)

    def scores(self, pruned: PruneResult | None = None) -> tuple[float, float]:
        """(replacement score, completeness score) of circuit-tracer's `compute_graph_scores`.

        With `pruned`, of the graph restricted to the kept nodes and edges.

        Example:
            >>> import vlens; from PIL import Image
            >>> from vlens.circuits.replacement import random_transcoders
            >>> vlm = vlens.tiny(n_layers=1)
            >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
            >>> rep, comp = attribute(vlm, random_transcoders(vlm, d_sae=8), b, progress=False).scores()
            >>> 0 <= rep <= 1 and 0 <= comp <= 1
            True
        """
        A = self.adjacency
        if pruned is not None:
            A = A * pruned.edge_mask * pruned.node_mask[:, None] * pruned.node_mask[None, :]
        return graph_scores(A, self.logit_weights(), self.n_features, self.n_pos, self.n_layers)

    @property
    def position(self) -> int:
        """The predicting position (the last node position)."""
        return self.n_pos - 1

    def patch_positions(self) -> Int[Tensor, " m"]:
        """Sequence positions of the image tokens in the graph (patch nodes, newline tokens included)."""
        return self.layout.image[0, : self.n_pos].nonzero()[:, 0]


def predicting_position(layout: TokenLayout) -> int:
    """The position whose next-token logits the graph explains: before the first answer token, else the last.

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny(words=["red"])
        >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))], answers=["red"])
        >>> predicting_position(b.layout) == b.layout.shape[1] - 2
        True
    """
    ans = layout.answer[0].nonzero()
    return int(ans[0, 0]) - 1 if ans.numel() else int((~layout.pad[0]).nonzero()[-1, 0])


def _token_id(vlm: VLM, t: str | int) -> int:
    if isinstance(t, int):
        if not 0 <= t < vlm.vocab_size:
            raise InputError(f"token id {t} is outside the vocabulary 0..{vlm.vocab_size - 1}")
        return t
    ids = vlm.processor.tokenizer.encode(t, add_special_tokens=False)
    if len(ids) != 1:
        raise InputError(f"target {t!r} is {len(ids)} tokens: name one token (a word the tokenizer knows, or an id)")
    return int(ids[0])


def logit_targets(vlm: VLM, logits: Float[Tensor, " vocab"], target: Any = None, max_n_logits: int = 10,
                  desired_logit_prob: float = 0.95) -> tuple[list[tuple[str, int]], Tensor, Tensor]:
    """The logit nodes: (label, vocab index) list, their weights, and their demeaned unembedding directions.

    `target=None`: the most likely tokens until their probability reaches
    `desired_logit_prob` (at most `max_n_logits`), as circuit-tracer; a token
    (str or id): that token; a pair `(a, b)`: the logit difference a − b.

    Example:
        >>> import vlens
        >>> vlm = vlens.tiny(words=["red", "blue"])
        >>> labels, w, U = logit_targets(vlm, torch.randn(vlm.vocab_size), ("red", "blue"))
        >>> labels[0][0], U.shape == (1, vlm.d_model)
        ('red − blue', True)
    """
    W_U = vlm.hf_model.get_output_embeddings().weight.detach().float()
    tok = vlm.processor.tokenizer
    probs = torch.softmax(logits.detach().float(), -1)
    if isinstance(target, (tuple, list)) and len(target) == 2:
        a, b = (_token_id(vlm, t) for t in target)
        label = f"{tok.decode([a])} − {tok.decode([b])}"
        return [(label, vlm.vocab_size)], torch.ones(1), (W_U[a] - W_U[b])[None]
    if target is None:
        p, ids = torch.sort(probs, descending=True)
        k = int(torch.searchsorted(torch.cumsum(p, 0), desired_logit_prob).item()) + 1
        ids = ids[: max(1, min(k, max_n_logits))]
    else:
        ids = torch.tensor([_token_id(vlm, target)])
    U = W_U[ids] - W_U.mean(0, keepdim=True)
    return [(tok.decode([int(i)]), int(i)) for i in ids], probs[ids], U


def _active(state: ReplacementState, n_pos: int) -> tuple[Tensor, Tensor]:
    rows, vals = [], []
    for L, a in enumerate(state.acts):
        nz = (a[:n_pos] != 0).nonzero()
        rows.append(torch.cat([torch.full((len(nz), 1), L), nz], 1))
        vals.append(a[nz[:, 0], nz[:, 1]])
    return torch.cat(rows).long(), torch.cat(vals).float()


def _grads(state: ReplacementState, y: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of each target scalar in `y` [k] at every sink and the embedding: [k, layers, seq, d], [k, seq, d]."""
    leaves = [*state.sinks, state.embed]
    k = y.shape[0]
    g = torch.autograd.grad(y, leaves, grad_outputs=torch.eye(k, dtype=y.dtype), is_grads_batched=True,
                            retain_graph=True, allow_unused=True)
    g = [torch.zeros(k, *l.shape, dtype=l.dtype) if gi is None else gi for gi, l in zip(g, leaves)]
    return torch.stack(g[:-1], 1).float(), g[-1].float()


def _rows(state: ReplacementState, y: Tensor, writes: tuple[Tensor, Tensor, Tensor, Tensor], n_f: int,
          errors: Tensor, n_pos: int) -> Tensor:
    """Targets' incoming edges [k, sources]: the gradient where each source writes, dotted with its vector.

    `writes` (feature index, output layer, position, vector × activation): a feature's decoder writes, one per
    output layer (several for a cross-layer transcoder); its edge sums them."""
    gs, ge = _grads(state, y)
    e = (gs[:, :, :n_pos] * errors).sum(-1).flatten(1)
    t = (ge[:, :n_pos] * state.embed[:n_pos].detach().float()).sum(-1)
    return torch.cat([_feature_edges(gs, writes, n_f), e, t], 1)


#: Gathered gradient entries per block of feature writes (2**26 float32: 256 MB).
EDGE_BLOCK = 2 ** 26


def _feature_edges(gs: Tensor, writes: tuple[Tensor, Tensor, Tensor, Tensor], n_f: int) -> Tensor:
    """[k, n_f] feature edges, the writes taken in blocks so the gathered gradients stay near 256 MB
    (all at once they are [k, writes, d_model]: 66 GB for Gemma 3 270M with 400k active features, measured)."""
    idx, layer, pos, vec = writes
    k, d = gs.shape[0], gs.shape[-1]
    out = torch.zeros(k, n_f)
    step = max(1, EDGE_BLOCK // max(k * d, 1))
    for s in range(0, len(idx), step):
        sl = slice(s, s + step)
        out.index_add_(1, idx[sl], torch.einsum("kmd,md->km", gs[:, layer[sl], pos[sl]], vec[sl]))
    return out


def _writes(rm: LocalReplacement, feats: Tensor, acts: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every active feature's decoder writes: (feature index, output layer, position, activation × decoder row)."""
    parts = []
    for L, c in enumerate(rm.coders):
        mine = (feats[:, 0] == L).nonzero()[:, 0]
        n_out = c.W_dec.shape[1]
        W = c.W_dec[feats[mine, 2]].detach().float() * acts[mine, None, None]   # [m, n_out, d_model]
        parts.append((mine.repeat_interleave(n_out), (L + torch.arange(n_out)).repeat(len(mine)),
                      feats[mine, 1].repeat_interleave(n_out), W.reshape(-1, W.shape[-1])))
    idx, layer, pos, vec = (torch.cat(p) for p in zip(*parts))
    return idx, layer, pos, vec


def _visit_order(R: Tensor, row_nodes: Tensor, filled: int, visited: Tensor, probs: Tensor, budget: int,
                 batch: int) -> Tensor:
    """The next features to visit: highest influence on the logits through the rows computed so far
    (circuit-tracer's `compute_partial_influences`: rows [filled, sources], `row_nodes` their node indices)."""
    normed = R[:filled].abs()
    normed = normed / normed.sum(1, keepdim=True).clamp(min=1e-8)
    n_src = R.shape[1]
    prod = torch.zeros(n_src + len(probs))
    prod[n_src:] = probs
    infl = torch.zeros(n_src)
    for _ in range(128):
        step = prod[row_nodes[:filled]] @ normed
        if not step.any():
            break
        infl += step
        prod = torch.cat([step, torch.zeros(len(probs))])
    infl = infl[: len(visited)]
    infl[visited] = -1.0
    return torch.argsort(infl, descending=True)[: min(batch, budget - int(visited.sum()))]


def attribute(vlm: VLM, transcoders: Any, batch: Batch, target: Any = None, *,
              max_n_logits: int = 10, desired_logit_prob: float = 0.95, max_feature_nodes: int | None = None,
              images: Sequence[Image.Image] | None = None, chunk: int = 64, norms: str = "frozen",
              progress: bool = True) -> Graph:
    """The attribution graph of one prompt + image: direct effects between all nodes (see the module docs).

    `target`: None (the top tokens), a token (str or id) or a pair of tokens
    (their logit difference). The graph explains the logits at
    `predicting_position` (before the batch's answer, if it has one).
    `images` (the PIL images given to `vlm.prepare`) are kept for the JSON
    export's `vlens_images`. `chunk` targets share one batched backward pass.
    `max_feature_nodes` keeps only that many features, visited in order of
    their influence on the logits as circuit-tracer does (every 4 chunks the
    order is recomputed); the dropped features' edges are dropped with them,
    so edge sums then fall short of the logit by their direct effects
    (exact completeness needs every feature: the default). `norms`:
    `"frozen"` (circuit-tracer's denominators, edges sum to the logit) or
    `"jacobian"` (first-order effects through the norms; module docs of
    `vlens.circuits.replacement`).

    Example:
        >>> import vlens; from PIL import Image
        >>> from vlens.circuits.replacement import random_transcoders
        >>> vlm = vlens.tiny(n_layers=2, words=["red", "blue"])
        >>> b = vlm.prepare(["<image>\\nWhat colour?"], [Image.new("RGB", (32, 32))], answers=["red"])
        >>> g = attribute(vlm, random_transcoders(vlm, d_sae=8), b, target=("red", "blue"), progress=False)
        >>> g.logit_targets[0][0], g.adjacency.shape[0] == g.logit_index(0) + 1
        ('red − blue', True)
        >>> attribute(vlm, random_transcoders(vlm, d_sae=8), b, max_feature_nodes=10, progress=False).n_features
        10
    """
    rm = LocalReplacement(vlm, transcoders, norms=norms)
    state = rm.run(batch)
    pos = predicting_position(batch.layout)
    n_pos = pos + 1
    labels, probs, U = logit_targets(vlm, state.logits[pos], target, max_n_logits, desired_logit_prob)
    feats, acts = _active(state, n_pos)
    n_f, k = len(feats), len(labels)
    W_enc = [c.W_enc.detach().float() for c in rm.coders]
    writes = _writes(rm, feats, acts)
    errors = torch.stack([e[:n_pos].float() for e in state.errors])
    N = n_f + (vlm.n_layers + 1) * n_pos + k
    budget = n_f if max_feature_nodes is None else min(max_feature_nodes, n_f)
    # rows: logits first, then features in visiting order (circuit-tracer's edge_matrix + row_to_node_index)
    R = torch.zeros(k + budget, N - k)
    row_nodes = torch.zeros(k + budget, dtype=torch.long)
    final = state.final[pos].float()
    R[:k] = _rows(state, final @ U.T, writes, n_f, errors, n_pos)
    row_nodes[:k] = torch.arange(N - k, N)
    visited = torch.zeros(n_f, dtype=torch.bool)
    filled = k
    with tqdm(total=budget, desc="feature edges", disable=not progress) as bar:
        while filled - k < budget:
            todo = _visit_order(R, row_nodes, filled, visited, probs, budget, 4 * chunk) if budget < n_f \
                else torch.arange(n_f)
            for j in range(0, len(todo), chunk):
                idx = todo[j: j + chunk]
                x = torch.stack([state.mlp_in[L][p] for L, p, _ in feats[idx].tolist()]).float()
                enc = torch.stack([W_enc[L][:, f] for L, _, f in feats[idx].tolist()])
                R[filled: filled + len(idx)] = _rows(state, (x * enc).sum(-1), writes, n_f, errors, n_pos)
                row_nodes[filled: filled + len(idx)] = idx
                visited[idx] = True
                filled += len(idx)
                bar.update(len(idx))
    return _assemble(vlm, rm, batch, R, row_nodes, visited, feats, acts, labels, probs, final.detach() @ U.T, U,
                     n_pos, images)


def _assemble(vlm: VLM, rm: LocalReplacement, batch: Batch, R: Tensor, row_nodes: Tensor, visited: Tensor,
              feats: Tensor, acts: Tensor, labels: list, probs: Tensor, values: Tensor, U: Tensor, n_pos: int,
              images: Sequence[Image.Image] | None) -> Graph:
    """The square adjacency over the visited features (sorted) and every other node, rows in node order."""
    n_f, k = len(visited), len(labels)
    chosen = visited.nonzero()[:, 0]
    cols = torch.cat([chosen, torch.arange(n_f, R.shape[1])])
    n = len(cols) + k
    A = torch.zeros(n, n)
    feat_rows = R[k:][torch.argsort(row_nodes[k:])]   # visited features in ascending order
    A[: len(chosen), : n - k] = feat_rows[:, cols]
    A[n - k:, : n - k] = R[:k][:, cols]
    g = _graph(vlm, rm, batch, A, feats[chosen], acts[chosen], labels, probs, values, U, n_pos, images)
    g.dropped_logit_effect = R[:k, :n_f][:, ~visited].sum(1)
    g.norms = rm.norms_mode
    return g


def _graph(vlm: VLM, rm: LocalReplacement, batch: Batch, A: Tensor, feats: Tensor, acts: Tensor, labels: list,
           probs: Tensor, values: Tensor, U: Tensor, n_pos: int, images: Sequence[Image.Image] | None) -> Graph:
    tok = vlm.processor.tokenizer
    ids = batch.layout.input_ids[0, :n_pos]
    return Graph(adjacency=A.detach(), features=feats, activations=acts, input_ids=ids,
                 tokens=[tok.decode([int(i)]) for i in ids], logit_targets=labels, logit_probs=probs.float(),
                 logit_values=values.float(), logit_directions=U, n_layers=vlm.n_layers, vocab_size=vlm.vocab_size,
                 layout=batch.layout, images=list(images or []),
                 prompt=(batch.prompts[0] if batch.prompts else tok.decode(ids)),
                 transcoder_list=[c.hook_name for c in rm.coders])
