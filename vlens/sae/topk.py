"""The TopK SAE's training step with hand-written sparse gradients (SAE-Lens's `TopKTrainingSAE` loss).

Loss per batch of B tokens, exactly `TopKTrainingSAE.training_forward_pass`:

    h = (x' W_enc + b_enc) · ||W_dec||        x' = x − b_dec if apply_b_dec_to_input else x
    f = ReLU(TopK_k(h))                       (the k largest of h per token, others 0)
    x̂ = (f / ||W_dec||) W_dec + b_dec
    L = (1/B) Σ_t ||x̂_t − x_t||²  +  AuxK

(`· ||W_dec||` and `/ ||W_dec||` only with `rescale_acts_by_decoder_norm`, SAE-Lens's default
and what vlens trains). AuxK is SAE-Lens's auxiliary loss for dead latents: with D dead
latents and k_aux = d_in // 2, the top min(k_aux, D) dead pre-activations h (not ReLU'd)
reconstruct the detached residual x − x̂ through the decoder without bias,
`aux_coefficient · min(D / k_aux, 1) · (1/B) Σ_t ||ê_t − (x_t − x̂_t)||²`; it is 0 while no
latent is dead.

Why hand-written (measured, `benchmarks/sae_train.py`): with k ≪ d_sae the only dense
[B, d_in] × [d_in, d_sae] product a step needs is the encoder's. Autograd on SAE-Lens's
module scatters f into a dense [B, d_sae] matrix and spends five more products of that
size (the decoder, its two gradients, the encoder weight gradient and the input gradient
that `b_dec` needs). Here the decoder and its weight gradient are `embedding_bag`s over the
B·k firing pairs, the gradient at the pairs is a sampled product
(`torch.sparse.sampled_addmm`, only the B·k entries of g W_decᵀ that are needed), and the
encoder weight gradient is an `embedding_bag` over the pairs sorted by latent. The AuxK
term works on the dead latents' columns only (dense products of width D). Tests check
loss and gradients against autograd on `TopKTrainingSAE`, with and without dead latents.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .standard import StepStats, workspace_buffer


def _pair_dots(g: Float[Tensor, "batch d_in"], W: Float[Tensor, "d_sae d_in"],
               idx: Int[Tensor, "batch k"]) -> Float[Tensor, "batch k"]:
    """⟨g[t], W[idx[t, i]]⟩ for every (t, i): the entries of g Wᵀ at the pairs, nothing else computed."""
    B, k = idx.shape
    crow = torch.arange(0, B * k + 1, k, device=idx.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        pattern = torch.sparse_csr_tensor(crow, idx.reshape(-1), torch.zeros(B * k, dtype=g.dtype, device=g.device),
                                          (B, W.shape[0]), check_invariants=False)
        return torch.sparse.sampled_addmm(pattern, g, W.T, beta=0.0).values().view(B, k)


def _latent_sums(idx: Int[Tensor, "batch k"], weights: Float[Tensor, "batch k"],
                 rows: Float[Tensor, "batch n"], m: int) -> Float[Tensor, "d_sae n"]:
    """out[j] = Σ over pairs (t, i) with idx[t, i] = j of weights[t, i] · rows[t] (an `embedding_bag` by latent)."""
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tokens = torch.div(order, idx.shape[1], rounding_mode="floor")
    counts = torch.bincount(flat, minlength=m)
    return F.embedding_bag(tokens, rows, counts.cumsum(0) - counts, per_sample_weights=weights.reshape(-1)[order],
                           mode="sum")


def fused_topk_step(
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    x: Float[Tensor, "batch d_in"],
    k: int,
    apply_b_dec_to_input: bool,
    rescale_acts_by_decoder_norm: bool = True,
    dead: Bool[Tensor, " d_sae"] | None = None,
    aux_coefficient: float = 1.0,
    workspace: dict | None = None,
    target: Float[Tensor, "batch d_out"] | None = None,
) -> tuple[StepStats, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Loss and gradients of SAE-Lens's TopK training SAE on one batch, without autograd.

    Returns `(stats, (dW_enc, db_enc, dW_dec, db_dec))`; `stats.l1` holds the AuxK loss
    (this architecture's penalty term), `stats.fired` the latents with a non-zero
    activation. `dead` is the [d_sae] bool mask of dead latents (SAE-Lens's
    `dead_neuron_mask`); None or all False means no auxiliary loss. `workspace`: a dict
    kept across steps for the [batch, d_sae] pre-activations (`vlens.sae.standard.workspace_buffer`).
    `target`: what x̂ reconstructs (a transcoder's output rows); default `x`. AuxK's k_aux is
    half the target's width, as SAE-Lens reads it from the reconstruction target.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> W = torch.randn(32, 8, generator=g) * 0.1
        >>> stats, grads = fused_topk_step(W.T.clone(), torch.zeros(32), W, torch.zeros(8),
        ...                                torch.randn(16, 8, generator=g), 4, True)
        >>> [tuple(t.shape) for t in grads], float(stats.l0) <= 4
        ([(8, 32), (32,), (32, 8), (8,)], True)
    """
    B = x.shape[0]
    m = W_dec.shape[0]
    inv_b = 1.0 / B
    rescale = rescale_acts_by_decoder_norm
    # the forward as SAE-Lens writes it (in place, same values), so the top-k picks the same latents
    sae_in = x - b_dec if apply_b_dec_to_input else x  # (x − 0·b_dec is x bit for bit)
    hidden = torch.mm(sae_in, W_enc, out=workspace_buffer(workspace, "pre", (B, m), x))  # the one dense product
    hidden += b_enc
    norm = W_dec.norm(dim=-1)
    inv_norm = 1 / norm
    if rescale:
        hidden *= norm
    v, idx = torch.topk(hidden, k, dim=-1, sorted=False)
    live = v > 0
    a = v.relu()
    c = a * inv_norm[idx] if rescale else a  # decoder coefficients of the k latents
    x_hat = F.embedding_bag(idx, W_dec, per_sample_weights=c, mode="sum") + b_dec
    goal = x if target is None else target
    err = x_hat - goal
    sse = err.pow(2).sum()
    g_xhat = err * (2.0 * inv_b)

    dc = _pair_dots(g_xhat, W_dec, idx)  # d loss / d coefficient at the pairs
    dW_dec = _latent_sums(idx, c, g_xhat, m)
    dv = (dc * inv_norm[idx] if rescale else dc) * live  # d loss / d h at the pairs
    d_norm = torch.zeros_like(norm)
    if rescale:  # through c = a / ||W_dec|| and h = pre · ||W_dec||  (pre = h / ||W_dec||)
        d_norm.index_add_(0, idx.reshape(-1), (dv * v * inv_norm[idx] - dc * a * inv_norm[idx] ** 2).reshape(-1))
        g_pre = dv * norm[idx]
    else:
        g_pre = dv
    dW_enc_t = _latent_sums(idx, g_pre, sae_in, m)
    db_enc = torch.zeros_like(b_enc).index_add_(0, idx.reshape(-1), g_pre.reshape(-1))

    aux = sse.new_zeros(())
    n_dead = int(dead.sum()) if dead is not None else 0
    if n_dead:
        # AuxK on the dead latents' columns: dense products of width n_dead
        k_aux = goal.shape[1] // 2
        scale = min(n_dead / k_aux, 1.0)
        k_aux = min(k_aux, n_dead)
        cols = dead.nonzero().squeeze(1)
        h_dead = hidden.index_select(1, cols)
        av, aj = h_dead.topk(k_aux, sorted=False)
        inv_d, norm_d = inv_norm[cols], norm[cols]
        W_d = W_dec.index_select(0, cols)
        coef = torch.zeros_like(h_dead).scatter_(1, aj, av * inv_d[aj] if rescale else av)
        diff = coef @ W_d + err  # ê − (x − x̂)
        aux = diff.pow(2).sum() * (aux_coefficient * scale * inv_b)
        g_rec = diff * (2.0 * aux_coefficient * scale * inv_b)
        dcoef = (g_rec @ W_d.T).gather(1, aj)
        dW_dec.index_add_(0, cols, coef.T @ g_rec)
        if rescale:
            d_norm.index_add_(0, cols, torch.zeros_like(h_dead).scatter_(
                1, aj, dcoef * inv_d[aj] * av * inv_d[aj] - dcoef * av * inv_d[aj] ** 2).sum(0))
            g_pre_d = torch.zeros_like(h_dead).scatter_(1, aj, dcoef * inv_d[aj] * norm_d[aj])
        else:
            g_pre_d = torch.zeros_like(h_dead).scatter_(1, aj, dcoef)
        dW_enc_t.index_add_(0, cols, g_pre_d.T @ sae_in)
        db_enc.index_add_(0, cols, g_pre_d.sum(0))
    if rescale:  # ||W_dec,j|| → W_dec,j / ||W_dec,j||
        dW_dec += (d_norm * torch.where(norm > 0, inv_norm, torch.zeros_like(norm))).unsqueeze(1) * W_dec
    db_dec = g_xhat.sum(0)
    if apply_b_dec_to_input:
        db_dec = db_dec - db_enc @ W_enc.T
    fired = torch.zeros(m, dtype=torch.bool, device=x.device)
    fired[idx[live]] = True
    stats = StepStats(mse=sse * inv_b, l1=aux, fired=fired, l0=live.sum() * inv_b, sse=sse, n_active=int(idx.numel()),
                      g_out=g_xhat)
    return stats, (dW_enc_t.T, db_enc, dW_dec, db_dec)
