"""The fused TopK step (vlens.sae.topk) against autograd on SAE-Lens's TopKTrainingSAE, and in the trainer."""

from __future__ import annotations

import pytest
import torch
from sae_lens.saes import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput

import vlens.sae as vs
from vlens.errors import InputError
from vlens.sae.fused import fused_step, has_fused_step
from vlens.sae.topk import fused_topk_step


def _topk_sae(d=16, m=128, k=6, apply_b_dec=True, rescale=True, aux=0.5, seed=0):
    torch.manual_seed(seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=m, k=k, apply_b_dec_to_input=apply_b_dec,
                                                rescale_acts_by_decoder_norm=rescale, aux_loss_coefficient=aux))
    with torch.no_grad():  # away from the symmetric init: biases, uneven decoder norms
        sae.W_enc.data = torch.randn(d, m) * 0.3
        sae.b_enc.data = torch.randn(m) * 0.1
        sae.b_dec.data = torch.randn(d) * 0.1
        sae.W_dec.data *= torch.rand(m, 1) * 3 + 0.1
    return sae


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("n_dead", [0, 3, 100])  # none, fewer than k_aux = d_in/2 (scaled AuxK), more
def test_fused_topk_step_matches_sae_lens_autograd(rescale, apply_b_dec, n_dead):
    sae = _topk_sae(apply_b_dec=apply_b_dec, rescale=rescale)
    x = torch.randn(256, 16)
    dead = torch.zeros(128, dtype=torch.bool)
    dead[torch.randperm(128)[:n_dead]] = True
    out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                   n_training_steps=0, is_logging_step=False))
    out.loss.backward()
    stats, grads = fused_topk_step(sae.W_enc.data, sae.b_enc.data, sae.W_dec.data, sae.b_dec.data, x, 6,
                                   apply_b_dec, rescale, dead, 0.5)
    aux = out.losses["auxiliary_reconstruction_loss"].detach()
    assert (float(aux) > 0) == (n_dead > 0)
    assert torch.allclose(stats.l1, aux, rtol=1e-5)
    assert torch.allclose(stats.mse + stats.l1, out.loss.detach(), rtol=1e-5)
    acts = out.feature_acts.detach()
    assert torch.equal(stats.fired, (acts != 0).any(0))
    assert float(stats.l0) == pytest.approx(float((acts != 0).sum(-1).float().mean()))
    for p, g in zip((sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec), grads):
        assert g.shape == p.shape
        assert torch.allclose(p.grad, g, atol=1e-6, rtol=1e-4)


def test_fused_step_dispatch_reads_the_sae_config():
    sae = _topk_sae(aux=0.25)
    x = torch.randn(64, 16)
    dead = torch.ones(128, dtype=torch.bool)
    a, ga = fused_step(sae, x, 0.0, dead)
    b, gb = fused_topk_step(sae.W_enc.data, sae.b_enc.data, sae.W_dec.data, sae.b_dec.data, x, 6, True, True, dead,
                            0.25)
    assert torch.equal(a.l1, b.l1) and all(torch.equal(u, v) for u, v in zip(ga, gb))
    assert has_fused_step("topk", 1024, 64) and not has_fused_step("topk", 1024, 65)
    assert not has_fused_step("batchtopk", 1024, 8) and not has_fused_step("jumprelu", 1024)
    jr = vs.make_training_sae(vs.TrainConfig.preset("jumprelu", d_in=8, d_sae=32))
    with pytest.raises(InputError, match="fused=False"):
        fused_step(jr, torch.randn(4, 8), 1.0)


def test_topk_config_uses_the_fused_step_only_for_small_k():
    cfg = vs.TrainConfig.preset("topk", d_in=16, d_sae=256, k=8)
    assert cfg.uses_fused_step
    assert not cfg.replace(k=64).uses_fused_step
    assert not cfg.replace(fused=False).uses_fused_step


@pytest.mark.parametrize("dead_window", [10**9, 600])  # no dead latents / latents die and AuxK trains them
def test_fused_topk_training_matches_autograd_training(dead_window):
    """Same init, same batches: the fused run's weights equal the autograd run's to float rounding."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(96, 16, generator=g)
    codes = (torch.rand(2048, 96, generator=g) < 0.05).float() * torch.rand(2048, 96, generator=g)
    x = codes @ feats
    kw = dict(d_sae=256, k=8, steps=12, batch_size=128, lr=1e-3, progress=False, stats_tokens=0, shuffle=False,
              dead_window_tokens=dead_window, aux_loss_coefficient=0.5)
    seen = {}

    def record(fused):
        def cb(step, m):
            seen.setdefault(fused, []).append(m["dead"])
        return cb

    fused = vs.train(x, "topk", fused=True, log_every=1, callback=record(True), **kw)
    auto = vs.train(x, "topk", fused=False, log_every=1, callback=record(False), **kw)
    assert seen[True] == seen[False]
    assert (max(seen[True]) > 0) == (dead_window < 10**9)  # the AuxK path really ran
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        a, b = getattr(fused, name).detach(), getattr(auto, name).detach()
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-4), (name, float((a - b).abs().max()))
    assert fused.cfg.metadata.vlens_training["config"]["fused"] is True


def test_step_buffers_are_kept_per_sae_shared_between_saes_and_change_nothing():
    from vlens.sae.standard import fused_standard_step

    a, b = _topk_sae(seed=0), _topk_sae(seed=1)
    x = torch.randn(64, 16)
    sa, ga = fused_step(a, x, 0.0)
    fused_step(b, x, 0.0)
    wa, wb = a.__dict__["_vlens_fused_workspace"], b.__dict__["_vlens_fused_workspace"]
    assert wa and all(wa[k] is wb[k] for k in wa)  # one set of buffers for SAEs trained side by side
    _, gfresh = fused_topk_step(a.W_enc.data, a.b_enc.data, a.W_dec.data, a.b_dec.data, x, 6, True, True, None, 0.5)
    assert all(torch.equal(u, v) for u, v in zip(ga, gfresh))
    W = torch.randn(128, 16) * 0.2  # the standard step: same numbers with a kept workspace, step after step
    args = (W.T.clone(), torch.zeros(128), W, torch.zeros(16))
    ws: dict = {}
    for bias in (0.3, -1.5, 0.3):  # dense, sparse, dense again (buffers reused)
        x = torch.randn(64, 16) + bias
        _, g1 = fused_standard_step(*args, x, 1.0, True)
        _, g2 = fused_standard_step(*args, x, 1.0, True, workspace=ws)
        assert all(torch.equal(u, v) for u, v in zip(g1, g2))
