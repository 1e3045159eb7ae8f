"""The paper's SAE: ReLU, biases on both sides, decoder-norm-weighted L1 (a registered SAE-Lens training class).

Loss, per batch of B tokens, as the paper's code computes it (multimodal-saes,
`sae/sae_trainer.py`, `anthropicSAELoss`):

    L = (1/B) Σ_t ||x̂_t − x_t||²  +  λ (1/B) Σ_t Σ_i f_i(x_t) · sg(||W_dec,i||)

(f ≥ 0 after the ReLU, so |f_i| = f_i). `sg` is stop-gradient: the paper reads the norms
from `fc2.weight.data`, so they are constants for the gradient and no gradient of the
sparsity term reaches the decoder. SAE-Lens's `StandardTrainingSAE` has the same value but
backpropagates through the norms (its penalty pulls every firing latent's decoder row
shorter); `detach_decoder_norm=False` selects that form (the `"standard"` preset, and
`vlens_paper` checkpoints written before vlens 0.3 recorded the loss). What else
`PaperTrainingSAE` changes from SAE-Lens's standard training SAE is only what the paper
does differently:

- the encoder does not subtract `b_dec` from its input (`apply_b_dec_to_input=False`):
  f = ReLU(x W_enc + b_enc), x̂ = f W_dec + b_dec;
- initialisation: decoder rows Gaussian then scaled to norm 0.1, W_enc = W_decᵀ, zero biases
  (SAE-Lens draws the rows Kaiming-uniform before rescaling).

It trains, saves and loads through SAE-Lens (`architecture "vlens_paper"`, registered
with `register_sae_training_class`); its inference form is SAE-Lens's plain
`"standard"` architecture, so exported SAEs need no vlens to load.

`fused_standard_step` is the same loss (either form) with hand-written gradients that
use the sparsity of f (gather / `embedding_bag` instead of dense matmuls once few latents
fire); tests check it against autograd, on `StandardTrainingSAE` and on the paper's loss
written out independently (`tests/test_sae_paper_loss.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY, register_sae_training_class
from sae_lens.saes import StandardSAEConfig, StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.sae import SAEConfig, TrainStepInput
from torch import Tensor
from typing_extensions import override

ARCHITECTURE = "vlens_paper"


@dataclass
class PaperTrainingSAEConfig(StandardTrainingSAEConfig):
    """`StandardTrainingSAEConfig` with the paper's defaults (λ = 5, no b_dec on the input).

    Example:
        >>> cfg = PaperTrainingSAEConfig(d_in=64, d_sae=512)
        >>> cfg.l1_coefficient, cfg.apply_b_dec_to_input, cfg.decoder_init_norm, cfg.detach_decoder_norm
        (5.0, False, 0.1, True)
    """

    l1_coefficient: float = 5.0
    apply_b_dec_to_input: bool = False
    detach_decoder_norm: bool = True  # the paper's code; False: SAE-Lens's gradient through the norms

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        return StandardSAEConfig


class PaperTrainingSAE(StandardTrainingSAE):
    """SAE-Lens `StandardTrainingSAE` with the paper's Gaussian initialisation.

    Example:
        >>> import torch
        >>> torch.manual_seed(0) is not None
        True
        >>> sae = PaperTrainingSAE(PaperTrainingSAEConfig(d_in=16, d_sae=64))
        >>> round(float(sae.W_dec.detach().norm(dim=1).mean()), 4), bool(torch.equal(sae.W_enc, sae.W_dec.T))
        (0.1, True)
    """

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        with torch.no_grad():
            w = torch.randn(self.cfg.d_sae, self.cfg.d_in, dtype=self.dtype, device=self.device)
            norm = self.cfg.decoder_init_norm if self.cfg.decoder_init_norm is not None else 0.1
            w = w / w.norm(dim=-1, keepdim=True) * norm
            self.W_dec.data = w
            self.W_enc.data = w.T.clone().contiguous()
            self.b_dec.data.zero_()
            self.b_enc.data.zero_()

    @override
    def calculate_aux_loss(self, step_input: TrainStepInput, feature_acts: Tensor, hidden_pre: Tensor,
                           sae_out: Tensor) -> dict[str, Tensor]:
        """λ · mean_t Σ_i f_ti · ||W_dec,i||, the norms detached unless `cfg.detach_decoder_norm` is False."""
        if not self.cfg.detach_decoder_norm:
            return super().calculate_aux_loss(step_input, feature_acts, hidden_pre, sae_out)
        weighted = feature_acts * self.W_dec.detach().norm(dim=1)
        return {"l1_loss": (step_input.coefficients["l1"] * weighted.abs().sum(dim=-1)).mean()}


def register() -> None:
    """Register `PaperTrainingSAE` with SAE-Lens (idempotent)."""
    if ARCHITECTURE not in SAE_TRAINING_CLASS_REGISTRY:
        register_sae_training_class(ARCHITECTURE, PaperTrainingSAE, PaperTrainingSAEConfig)


register()


@dataclass
class StepStats:
    """Scalars of one fused step (tensors, to avoid syncs; read with `.item()` when logging)."""

    mse: Tensor
    l1: Tensor  # the penalty term: λ-weighted L1 here, the AuxK loss in `vlens.sae.topk`
    fired: Tensor  # [d_sae] bool: latent fired on this batch
    l0: Tensor
    sse: Tensor  # Σ squared error
    n_active: int
    g_out: Tensor | None = None  # [batch, d_out]: d loss / d x̂ of the reconstruction term (a skip term's gradient)


_SPARSE_DENSITY = 0.15  # below this fraction of active (token, latent) pairs, use the sparse kernels


def workspace_buffer(workspace: dict | None, name: str, shape: tuple[int, ...], like: Tensor,
                     dtype: torch.dtype | None = None) -> Tensor:
    """An uninitialised tensor for a step's [batch, d_sae] temporaries, kept in `workspace` for the next step.

    Why: CPU tensors of this size (128 MiB at batch 4096 × 8192 latents) are fresh `mmap`s
    each step, and first-touching them costs ~0.1 s each (measured: filling a fresh one is
    9× slower than refilling a kept one). Writing into kept buffers (`out=`) computes the
    same values with the same kernels. Keys are (name, shape, dtype, device); a new shape
    under a name drops the old buffer. With `workspace=None` a fresh tensor is returned.

    Example:
        >>> import torch
        >>> ws = {}
        >>> a = workspace_buffer(ws, "pre", (4, 8), torch.zeros(1))
        >>> a is workspace_buffer(ws, "pre", (4, 8), torch.zeros(1)), tuple(a.shape), len(ws)
        (True, (4, 8), 1)
    """
    dtype = like.dtype if dtype is None else dtype
    if workspace is None:
        return torch.empty(shape, dtype=dtype, device=like.device)
    key = (name, tuple(shape), dtype, like.device)
    buf = workspace.get(key)
    if buf is None:
        for old in [k for k in workspace if k[0] == name]:
            del workspace[old]
        buf = torch.empty(shape, dtype=dtype, device=like.device)
        workspace[key] = buf
    return buf


def fused_standard_step(
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    x: Float[Tensor, "batch d_in"],
    l1_coefficient: float,
    apply_b_dec_to_input: bool,
    workspace: dict | None = None,
    detach_decoder_norm: bool = False,
    target: Float[Tensor, "batch d_out"] | None = None,
) -> tuple[StepStats, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Loss and gradients of the standard SAE on one batch, without autograd.

    Returns `(stats, (dW_enc, db_enc, dW_dec, db_dec))` for
    L = Σ||x̂ − x||²/B + λ Σ f·||W_dec||/B: with `detach_decoder_norm` the paper's code
    (the norms constants for the gradient), else the loss of SAE-Lens's
    `StandardTrainingSAE.training_forward_pass` (`lp_norm=1`), whose gradient on W_dec
    has the extra term λ/B · (Σ_t f_ti) · W_dec,i/||W_dec,i||. `workspace`: a dict kept
    across steps for the [batch, d_sae] temporaries (`workspace_buffer`); same results.
    `target`: what x̂ reconstructs (a transcoder's output rows, `vlens.sae.transcoder`); default `x`.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> W = torch.randn(8, 4, generator=g) * 0.3
        >>> stats, grads = fused_standard_step(W.T.clone(), torch.zeros(8), W, torch.zeros(4),
        ...                                    torch.randn(16, 4, generator=g), 1.0, False)
        >>> [tuple(t.shape) for t in grads]
        [(4, 8), (8,), (8, 4), (4,)]
    """
    B = x.shape[0]
    sae_in = x - b_dec if apply_b_dec_to_input else x
    goal = x if target is None else target
    m = W_enc.shape[1]
    pre = torch.addmm(b_enc, sae_in, W_enc, out=workspace_buffer(workspace, "pre", (B, m), x))  # [B, m]
    active = torch.gt(pre, 0, out=workspace_buffer(workspace, "active", (B, m), x, torch.bool))
    dec_norm = W_dec.norm(dim=1)  # [m]
    n_active = int(torch.count_nonzero(active))  # 25x faster than active.sum() (no int64 widening)
    inv_b = 1.0 / B
    if n_active <= _SPARSE_DENSITY * pre.numel():
        # (token, latent) pairs that fire, in row order (for decoding) and in latent order (for
        # the weight gradients: a stable sort by latent, the order of the transposed mask's
        # nonzero at a tenth of its cost); values read through flat indices (index_select).
        flat = active.view(-1).nonzero().squeeze(1)
        r = torch.div(flat, m, rounding_mode="floor")
        j = flat - r * m
        vals = pre.view(-1).index_select(0, flat)
        counts_r = torch.bincount(r, minlength=B)
        offs_r = counts_r.cumsum(0) - counts_r
        x_hat = F.embedding_bag(j, W_dec, offs_r, per_sample_weights=vals, mode="sum") + b_dec
        err = x_hat - goal
        g_xhat = err * (2.0 * inv_b)
        order = torch.argsort(j, stable=True)
        flat_o, j_o, r_o = flat[order], j[order], r[order]
        vals_o = vals[order]
        counts_j = torch.bincount(j_o, minlength=W_dec.shape[0])
        offs_j = counts_j.cumsum(0) - counts_j
        # gradient at the firing pairs: <g_xhat[r], W_dec[j]> + λ||W_dec[j]||/B
        dots = torch.mm(g_xhat, W_dec.T, out=workspace_buffer(workspace, "g_pre", (B, m), x))
        g_vals = dots.view(-1).index_select(0, flat_o) + (l1_coefficient * inv_b) * dec_norm[j_o]
        f_sum = torch.zeros_like(b_enc).index_add_(0, j_o, vals_o)
        dW_dec = F.embedding_bag(r_o, g_xhat, offs_j, per_sample_weights=vals_o, mode="sum")
        dW_enc = F.embedding_bag(r_o, sae_in, offs_j, per_sample_weights=g_vals, mode="sum").T
        db_enc = torch.zeros_like(b_enc).index_add_(0, j_o, g_vals)
        l1_sum = (f_sum * dec_norm).sum()
        fired = counts_j > 0
    else:
        f = torch.clamp_min(pre, 0, out=workspace_buffer(workspace, "f", (B, m), x))
        x_hat = torch.addmm(b_dec, f, W_dec)
        err = x_hat - goal
        g_xhat = err * (2.0 * inv_b)
        g_pre = torch.addmm(dec_norm.unsqueeze(0) * (l1_coefficient * inv_b), g_xhat, W_dec.T,
                            out=workspace_buffer(workspace, "g_pre", (B, m), x))
        # = g_pre * active bit for bit, without the bool→float copy
        g_pre.mul_(torch.sign(f, out=workspace_buffer(workspace, "mask", (B, m), x)))
        f_sum = f.sum(0)
        dW_dec = f.T @ g_xhat
        dW_enc = sae_in.T @ g_pre
        db_enc = g_pre.sum(0)
        l1_sum = (f_sum * dec_norm).sum()
        fired = active.any(0)
    if not detach_decoder_norm:  # L1 term's gradient on W_dec: λ/B · (Σ_t f_ti) · W_dec,i / ||W_dec,i||
        dW_dec = dW_dec + (l1_coefficient * inv_b) * (f_sum / dec_norm.clamp_min(1e-12)).unsqueeze(1) * W_dec
    db_dec = g_xhat.sum(0)
    if apply_b_dec_to_input:
        db_dec = db_dec - db_enc @ W_enc.T
    sse = err.pow(2).sum()
    stats = StepStats(
        mse=sse * inv_b,
        l1=l1_sum * (l1_coefficient * inv_b),
        fired=fired,
        l0=torch.tensor(n_active * inv_b),
        sse=sse,
        n_active=n_active,
        g_out=g_xhat,
    )
    return stats, (dW_enc, db_enc, dW_dec, db_dec)
