"""Which SAEs train with a fused step (hand-written gradients, no autograd), and the dispatch to it.

Two fused steps exist, each the exact loss of an SAE-Lens training class with gradients
checked against autograd (`tests/test_sae.py`, `tests/test_sae_fused.py`):

- `vlens.sae.standard.fused_standard_step`: the standard / paper SAE (ReLU, L1 × ||W_dec||,
  the norms detached for the paper's SAE as its code has them);
- `vlens.sae.topk.fused_topk_step`: TopK with its AuxK loss, sparse in the k firing latents.

The TopK step is used only while k ≤ d_sae / 16: it replaces five of six dense products by
work on the B·k firing pairs, which stops paying once k is a sizeable part of d_sae
(measured single-threaded: 2.2× faster than autograd at k = d_sae/32, d_in 128; 9× at
d_sae/128, d_in 512; 0.9× at k = d_sae/8). BatchTopK and JumpReLU train through autograd.
"""

from __future__ import annotations

import weakref
from typing import Any

from jaxtyping import Bool, Float
from torch import Tensor

from ..errors import InputError
from .standard import StepStats, fused_standard_step
from .topk import fused_topk_step

TOPK_MAX_FRACTION = 1 / 16  # the fused TopK step needs k ≤ d_sae · this

_SHARED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # step buffers any live SAE holds


class _Workspace(dict):
    """One SAE's step buffers (`vlens.sae.standard.workspace_buffer`), held as long as the SAE.

    A buffer of the same (name, shape, dtype, device) that another live SAE holds is reused,
    so N SAEs trained side by side in one process (`train_many`) keep one set, not N; steps
    run one after another, and no step returns a buffer. Freed with the last SAE holding it.
    """

    def get(self, key: Any, default: Any = None) -> Any:
        buf = super().get(key)
        if buf is None:
            buf = _SHARED.get(key)
            if buf is not None:
                super().__setitem__(key, buf)
        return default if buf is None else buf

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        _SHARED[key] = value


def has_fused_step(architecture: str, d_sae: int, k: float | None = None) -> bool:
    """Whether an SAE of this architecture and size trains with a fused step.

    Example:
        >>> has_fused_step("standard", 1024), has_fused_step("topk", 1024, 32), has_fused_step("topk", 1024, 512)
        (True, True, False)
    """
    if architecture in ("vlens_paper", "standard"):
        return True
    return architecture == "topk" and k is not None and 0 < k <= d_sae * TOPK_MAX_FRACTION


def fused_step(sae: Any, x: Float[Tensor, "batch d_in"], coefficient: float,
               dead: Bool[Tensor, " d_sae"] | None = None,
               target: Float[Tensor, "batch d_out"] | None = None) -> tuple[StepStats, tuple[Tensor, ...]]:
    """Loss statistics and `(dW_enc, db_enc, dW_dec, db_dec)` of SAE-Lens training SAE `sae` on batch `x`.

    `coefficient` is the L1 coefficient (standard / paper); `dead` the dead-latent mask
    (TopK's AuxK loss). Settings come from `sae.cfg`, as SAE-Lens's own training pass reads them.
    For a transcoder (`vlens.sae.transcoder`) `target` is the output it predicts; a skip
    transcoder's `x W_skipᵀ` is taken off the target first, and `dW_skip` is a fifth gradient.

    Example:
        >>> import torch
        >>> from sae_lens.saes import TopKTrainingSAE, TopKTrainingSAEConfig
        >>> sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=8, d_sae=64, k=4))
        >>> stats, grads = fused_step(sae, torch.randn(16, 8), 0.0)
        >>> float(stats.l0) <= 4, tuple(grads[0].shape)
        (True, (8, 64))
    """
    c = sae.cfg
    # the step's [batch, d_sae] temporaries live as long as the SAE (`workspace_buffer` says why)
    workspace = sae.__dict__.setdefault("_vlens_fused_workspace", _Workspace())
    W_enc, b_enc, W_dec, b_dec = sae.W_enc.data, sae.b_enc.data, sae.W_dec.data, sae.b_dec.data
    W_skip = sae.W_skip.data if hasattr(sae, "W_skip") else None
    goal = target if W_skip is None else (x if target is None else target) - x @ W_skip.T
    arch = c.architecture()
    if arch in ("vlens_paper", "standard"):
        stats, grads = fused_standard_step(W_enc, b_enc, W_dec, b_dec, x, coefficient, c.apply_b_dec_to_input,
                                           workspace, detach_decoder_norm=getattr(c, "detach_decoder_norm", False),
                                           target=goal)
    elif arch == "topk":
        stats, grads = fused_topk_step(W_enc, b_enc, W_dec, b_dec, x, int(c.k), c.apply_b_dec_to_input,
                                       c.rescale_acts_by_decoder_norm, dead, c.aux_loss_coefficient, workspace,
                                       target=goal)
    else:
        raise InputError(f"no fused step for the {arch!r} architecture: train it with fused=False "
                         "(SAE-Lens's autograd training pass); see vlens.sae.fused.has_fused_step")
    if W_skip is not None:
        grads = (*grads, stats.g_out.T @ x)  # type: ignore[union-attr]
    return stats, grads
