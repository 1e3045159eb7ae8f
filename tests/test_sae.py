"""vlens.sae training: fused step vs autograd, presets, the split config, determinism, resume, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sae_lens import SAE
from sae_lens.saes import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput

import vlens.sae as vs
from vlens.sae.standard import fused_standard_step


@pytest.fixture(scope="module")
def acts():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(64, 16, generator=g)
    codes = (torch.rand(4096, 64, generator=g) < 0.05).float() * torch.rand(4096, 64, generator=g)
    x = codes @ feats + 0.01 * torch.randn(4096, 16, generator=g)
    mod = (torch.arange(4096) % 3 == 0).long()
    return x, mod


@pytest.mark.parametrize("apply_b_dec", [False, True])
@pytest.mark.parametrize("bias", [0.2, -2.5])  # dense and sparse code paths
def test_fused_step_matches_sae_lens_autograd(apply_b_dec, bias):
    torch.manual_seed(0)
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=16, d_sae=128, l1_coefficient=3.0,
                                                        apply_b_dec_to_input=apply_b_dec))
    with torch.no_grad():
        sae.W_enc.data = torch.randn(16, 128) * 0.3
        sae.b_enc.data.fill_(bias)
        sae.b_dec.data = torch.randn(16) * 0.1
    x = torch.randn(256, 16)
    out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={"l1": 3.0}, dead_neuron_mask=None,
                                                   n_training_steps=0, is_logging_step=False))
    out.loss.backward()
    stats, grads = fused_standard_step(sae.W_enc.data, sae.b_enc.data, sae.W_dec.data, sae.b_dec.data, x, 3.0,
                                       apply_b_dec)
    assert torch.allclose(stats.mse + stats.l1, out.loss.detach(), rtol=1e-5)
    for p, g in zip((sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec), grads):
        assert torch.allclose(p.grad, g, atol=1e-6, rtol=1e-4)


def test_schedules_match_sae_lens_to_rounding():
    """vlens keeps closed-form schedules (vlens.sae.training.config says why): SAE-Lens's scheduler and
    coefficient warm-up give the same values up to rounding, not bit for bit."""
    from sae_lens.training.optim import CoefficientScheduler, get_lr_scheduler

    cfg = vs.TrainConfig.preset("paper", total_steps=1000)
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = get_lr_scheduler("constant", opt, 1000, cfg.lr, 0, 200, cfg.lr, 1)
    theirs = []
    for _ in range(1000):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = [cfg.lr_at(s) for s in range(1000)]
    assert ours == pytest.approx(theirs, rel=1e-13, abs=1e-20)
    assert ours != theirs  # hence vlens's own: resumed and fresh runs stay bit-identical without scheduler state
    warm = CoefficientScheduler(50, 5.0)  # SAE-Lens's warm-up starts at λ/W (the paper's at 0)
    sae_lens_warmup = cfg.replace(coefficient_warmup_from_zero=False)
    assert [sae_lens_warmup.coefficient_at(s) for s in range(1000)] == pytest.approx([warm.step() for _ in range(1000)], rel=1e-13)


def test_split_config_and_flat_compatibility(acts):
    cfg = vs.TrainConfig.preset("topk", d_in=16, d_sae=32, k=4, lr=1e-3, batch_size=128)
    assert isinstance(cfg.sae, vs.ArchitectureConfig) and isinstance(cfg.trainer, vs.TrainerConfig)
    assert (cfg.sae.architecture, cfg.sae.k, cfg.trainer.lr, cfg.k, cfg.lr) == ("topk", 4, 1e-3, 4, 1e-3)
    # the flat dict is vlens 0.1's checkpoint / metadata format, field for field
    assert list(cfg.to_dict()) == [
        "architecture", "d_in", "d_sae", "batch_size", "total_steps", "lr", "lr_warmup_steps", "lr_decay_frac",
        "adam_beta1", "adam_beta2", "grad_clip", "l1_coefficient", "coefficient_warmup_frac", "k",
        "aux_loss_coefficient", "l0_coefficient", "jumprelu_init_threshold", "jumprelu_bandwidth",
        "apply_b_dec_to_input", "decoder_init_norm", "normalize", "n_norm_batches", "dead_window_tokens", "seed",
        "shuffle", "fused", "detach_decoder_norm", "coefficient_warmup_from_zero", "steps_per_chunk",
        "scale_mode"]
    assert vs.TrainConfig.from_dict(cfg.to_dict()) == cfg
    # a config saved before the reproduction options reads with their defaults
    older = {k: v for k, v in cfg.to_dict().items() if k not in ("steps_per_chunk", "scale_mode")}
    assert vs.TrainConfig.from_dict(older) == cfg
    assert vs.TrainConfig() == vs.PRESETS["paper"]
    with pytest.raises(ValueError, match="unknown training option"):
        cfg.replace(learning_rate=1.0)
    x, mod = acts
    sae = vs.train((x, mod), cfg.replace(total_steps=3), progress=False)
    assert sae.cfg.k == 4 and sae.cfg.metadata.vlens_training["config"] == cfg.replace(total_steps=3).to_dict()


def test_paper_preset_recipe():
    cfg = vs.TrainConfig.preset("paper", d_in=64, d_sae=512, total_steps=1000)
    assert (cfg.lr, cfg.l1_coefficient, cfg.grad_clip, cfg.apply_b_dec_to_input) == (5e-5, 5.0, 1.0, False)
    assert cfg.lr_at(0) == cfg.lr_at(799) == 5e-5          # constant for 80%
    assert cfg.lr_at(900) == pytest.approx(2.5e-5)          # then linear to 0
    # λ as the paper's code schedules it: np.arange(0, λ, λ/(0.05·E)) then λ (E = 1000 here)
    paper_lambda = list(np.arange(0, 5.0, 5.0 / (0.05 * 1000))) + [5.0] * 1000
    assert [cfg.coefficient_at(s) for s in range(1000)] == pytest.approx(paper_lambda[:1000], abs=1e-12)
    assert cfg.detach_decoder_norm and cfg.coefficient_warmup_from_zero
    sae = vs.make_training_sae(cfg)
    norms = sae.W_dec.norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, 0.1))
    assert torch.equal(sae.W_enc, sae.W_dec.T) and not sae.b_enc.any() and not sae.b_dec.any()


@pytest.mark.parametrize("preset", ["paper", "standard", "topk", "batchtopk", "jumprelu"])
def test_presets_train_and_are_sae_lens_saes(acts, preset):
    x, mod = acts
    sae = vs.train((x, mod), preset, d_sae=64, steps=40, batch_size=256, k=8, progress=False)
    assert isinstance(sae, SAE) and "modality" in vars(sae)  # a plain SAE-Lens SAE, statistics attached
    f = sae.encode(x[:100])
    assert f.shape == (100, 64) and torch.isfinite(sae.decode(f)).all()
    mix = sae.cfg.metadata.vlens_training["mix"]
    assert mix["image"] + mix["text"] == 40 * 256
    assert mix["image_fraction"] == pytest.approx(1 / 3, abs=0.02)
    assert sae.modality is not None and sae.modality.n_image + sae.modality.n_text > 0


def test_paper_sae_learns_and_scaling_is_folded(acts):
    x, mod = acts
    sae = vs.train((x * 37.0, mod), "paper", d_sae=128, steps=300, batch_size=256, lr=3e-3, l1_coefficient=1.0,
                   progress=False)
    ev = vs.evaluate(sae, (x * 37.0, mod))
    assert ev["overall"]["explained_variance"] > 0.7, ev
    assert sae.cfg.normalize_activations == "none"
    assert sae.cfg.metadata.vlens_training["activation_scale"] != 1.0


def test_same_seed_bit_identical(acts):
    x, mod = acts
    kw = dict(d_sae=64, steps=30, batch_size=256, progress=False, lr=1e-3)
    a = vs.train((x, mod), "paper", seed=3, **kw)
    b = vs.train((x, mod), "paper", seed=3, **kw)
    c = vs.train((x, mod), "paper", seed=4, **kw)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert not torch.equal(a.W_enc, c.W_enc)


@pytest.mark.parametrize("preset", ["paper", "topk"])
def test_resume_after_interrupt_is_bit_identical(acts, tmp_path, preset):
    x, mod = acts
    kw = dict(d_sae=64, steps=40, batch_size=256, progress=False, lr=1e-3, k=8, log_every=1)
    straight = vs.train((x, mod), preset, **kw)

    def boom(step, metrics):
        if step == 17:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        vs.train((x, mod), preset, checkpoint_dir=tmp_path, callback=boom, **kw)
    assert any(p.name.startswith("step_") for p in tmp_path.iterdir())
    resumed = vs.train((x, mod), preset, checkpoint_dir=tmp_path, **kw)
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_resume_with_other_config_is_refused(acts, tmp_path):
    x, mod = acts
    vs.train((x, mod), "paper", d_sae=32, steps=4, batch_size=256, progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"lr: checkpoint has 5e-05, this run has 0.001"):
        vs.train((x, mod), "paper", d_sae=32, steps=4, batch_size=256, progress=False, checkpoint_dir=tmp_path,
                 lr=1e-3)


def test_nan_batch_stops_naming_the_batch():
    x = torch.randn(1024, 8)
    batches = [x[i : i + 128] for i in range(0, 1024, 128)]
    batches[5] = batches[5].clone()
    batches[5][3, 2] = float("nan")
    with pytest.raises(vs.NonFiniteActivations, match=r"batch 5 contains NaN"):
        vs.train(batches, "paper", d_sae=16, steps=8, progress=False, normalize=False)


def test_width_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="SAE width must equal"):
        vs.train(torch.randn(256, 8), "paper", d_in=16, d_sae=32, steps=2, progress=False)
    sae = vs.train(torch.randn(256, 8), "paper", d_sae=32, steps=2, batch_size=128, progress=False)
    with pytest.raises(ValueError, match="reads 8-dimensional"):
        sae.encode(torch.randn(3, 16))
    batches = [torch.randn(64, 8), torch.randn(64, 12)]
    with pytest.raises(ValueError, match="batch 1 has width 12"):
        vs.train(batches, "paper", d_sae=16, steps=2, progress=False, normalize=False)


def test_iterable_source_with_modality_pairs():
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(128, 8, generator=g), torch.randint(0, 2, (128,), generator=g)) for _ in range(10)]
    sae = vs.train(batches, "paper", d_sae=16, steps=10, progress=False)
    mix = sae.cfg.metadata.vlens_training["mix"]
    assert mix["image"] + mix["text"] == 1280
    with pytest.raises(ValueError, match="needs a length"):
        vs.train(iter(batches), "paper", d_sae=16, progress=False)


@pytest.mark.slow
def test_toy_middle_layer_quality_and_modality_over_all_layers():
    """Issue 6 quality bar: a middle-layer SAE on the toy model reaches EV >= 0.9 at L0 <= 32 on held-out tokens."""
    import vlens
    from vlens.prompts import CAPTION_PROMPT
    from vlens.toy import toy_dataset

    vlm = vlens.load("toy")
    layers = list(range(vlm.n_layers))

    def acts(split, n):
        store = vlens.harvest(vlm, toy_dataset(split, n=n), layers, tokens="image+answer", captions=True,
                              text_only=True, prompt=CAPTION_PROMPT, progress=False)
        return {L: (store.activations(L)[:], store.meta["modality"]) for L in layers}

    train_acts, held = acts("train", 200), acts("heldout", 50)
    mid = vlm.n_layers // 2
    sae = vs.train(train_acts[mid], "topk", k=32, expansion=8, epochs=10, batch_size=1024, progress=False)
    r = vs.evaluate(sae, held[mid])
    assert r["overall"]["explained_variance"] >= 0.9 and r["overall"]["l0"] <= 32, r
    saes = {L: vs.train(train_acts[L], "paper", expansion=8, epochs=5, batch_size=1024, lr=1e-3, progress=False)
            for L in layers}
    table = vs.sharing_by_layer({L: vs.modality_stats(s, held[L]) for L, s in saes.items()})
    assert sorted(table) == layers


def test_train_from_activation_store(tmp_path):
    """The real harvest store: image + caption tokens and a text-only caption pass, mix reported."""
    from PIL import Image

    import vlens
    from vlens.activations import harvest
    from vlens.data import Sample

    vlm = vlens.tiny(words=["a", "red", "blue", "square", "circle"])
    data = [Sample(Image.new("RGB", (32, 32), c), caption=f"a {c} {s}", id=i)
            for i, (c, s) in enumerate([("red", "square"), ("blue", "circle"), ("red", "circle")])]
    store = harvest(vlm, data, layers=[2], tokens="image+answer", captions=True, text_only=True, out=tmp_path / "st",
                    progress=False)
    mod = store.meta["modality"]
    n = len(mod)
    kw = dict(d_sae=32, steps=6, batch_size=16, progress=False)
    sae = vs.train(store, "paper", layer=2, **kw)
    assert sae.cfg.metadata.hook_name == store.hook_name(2) == vlm.hook_name("resid_pre.2")
    mix = sae.cfg.metadata.vlens_training["mix"]
    assert mix["image"] + mix["text"] == 6 * 16
    assert sae.modality.n_image == int((mod == 1).sum()) and sae.modality.n_text == n - sae.modality.n_image
    again = vs.train(store, "paper", layer=2, **kw)
    assert torch.equal(sae.W_enc, again.W_enc)
    r = vs.evaluate(sae, store, layer=2)
    assert r["overall"]["n_tokens"] == n


def test_nan_in_tensor_names_the_source_row():
    x = torch.randn(512, 8)
    x[300, 1] = float("inf")
    with pytest.raises(vs.NonFiniteActivations, match=r"rows \[300\] of the data"):
        vs.train(x, "paper", d_sae=16, steps=4, batch_size=512, progress=False, normalize=False)


@pytest.mark.slow
def test_benchmark_quick_prints_json():
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "sae_train.py"
    res = subprocess.run([sys.executable, str(script), "--quick", "--samples", "51200", "--eval-samples", "5000", "--speed-pairs", "1"],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert {"samples_per_s_ratio", "mcc_vlens", "mcc_sae_lens", "settings"} <= set(out)
    assert out["samples_per_s_ratio"] > 0 and 0 <= out["mcc_vlens"] <= 1


def test_sae_lens_fed_vlens_batches_trains_vlens_topk_sae():
    """The frontier benchmark's control: SAE-Lens's own `SAETrainer`, fed exactly the batches `vlens.sae.train`
    draws, lands on the SAE the `"topk"` preset trains (same held-out EV), at the benchmark's quick sizes."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sae_quality_toy.py"
    spec = importlib.util.spec_from_file_location("sae_quality_toy", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()  # the script sets its own
    try:
        out = bench.main(["--quick", "--only", "frontier", "--variants", "sae_lens_vlens_order,vlens_topk_preset"])
    finally:
        torch.set_num_threads(threads)
    for row in out["frontier"]:
        assert row["sae_lens_vlens_order"] == pytest.approx(row["vlens_topk_preset"], abs=2e-3)
