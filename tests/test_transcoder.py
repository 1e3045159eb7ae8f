"""Transcoders (mlp_in.L → mlp_out.L): the fused steps against autograd on SAE-Lens's formulas, training from one
streaming pass with bit-identical resume, per-modality evaluation against scikit-learn on HF's own MLP inputs and
outputs, whole-model replacement (with error terms: HF's own logits), and exports loaded by SAE-Lens alone."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from sae_lens.saes.transcoder import SkipTranscoder, SkipTranscoderConfig
from sklearn.metrics import r2_score

import vlens
import vlens.sae as vs
from vlens.data import Sample
from vlens.interventions import splice_transcoder
from vlens.sae.fused import fused_step
from vlens.sae.training.multi import STREAM_FILE, train_many
from vlens.sae.transcoder import TranscoderStepInput, training_transcoder, transcoder_specs

WORDS = ["a", "red", "green", "blue", "square", "circle"]
STREAM = dict(tokens="image+answer", captions=True)


@pytest.fixture(scope="module")
def vlm():
    return vlens.tiny(words=WORDS)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(6):
        pixels = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        out.append(Sample(Image.fromarray(pixels), caption=f"a {WORDS[1 + i % 3]} {WORDS[4 + i % 2]}", id=f"s{i}"))
    return out


def _randomised(tc, g):
    with torch.no_grad():
        for p in tc.parameters():
            if p.ndim:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return tc


@pytest.mark.parametrize("skip", [False, True])
def test_fused_relu_step_is_the_gradient_of_sae_lens_transcoder_loss(skip):
    """Reference: SAE-Lens's `SkipTranscoder.forward` (its x W_skipᵀ) and StandardTrainingSAE's L1 × ||W_dec||, by autograd."""
    g = torch.Generator().manual_seed(1)
    tc = _randomised(training_transcoder("standard", d_in=8, d_out=6, d_sae=32, skip=skip), g)
    x, y, lam = torch.randn(64, 8, generator=g), torch.randn(64, 6, generator=g), 0.7
    stats, grads = fused_step(tc, x, lam, None, y)
    ref = SkipTranscoder(SkipTranscoderConfig(d_in=8, d_out=6, d_sae=32, apply_b_dec_to_input=False))
    ref.load_state_dict({k: v.clone() for k, v in tc.state_dict().items()}, strict=skip)
    f = ref.encode(x)
    loss = (ref(x) - y).pow(2).sum(-1).mean() + lam * (f * ref.W_dec.norm(dim=1)).sum(-1).mean()
    loss.backward()
    names = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["W_skip"] if skip else [])
    assert len(grads) == len(names)
    for name, got in zip(names, grads):
        assert torch.allclose(got, getattr(ref, name).grad, rtol=1e-4, atol=1e-6), name
    assert torch.allclose(stats.mse + stats.l1, loss, rtol=1e-5)


@pytest.mark.parametrize("skip", [False, True])
def test_fused_topk_step_equals_autograd_with_dead_latents(skip):
    """The fused TopK step (AuxK on dead latents, k_aux from the target's width) against SAE-Lens's TopK training pass."""
    g = torch.Generator().manual_seed(2)
    tc = _randomised(training_transcoder("topk", d_in=8, d_out=6, d_sae=64, k=3, skip=skip), g)
    x, y = torch.randn(48, 8, generator=g), torch.randn(48, 6, generator=g)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    stats, grads = fused_step(tc, x, 0.0, dead, y)
    out = tc.training_forward_pass(TranscoderStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                       n_training_steps=0, is_logging_step=False, target=y))
    out.loss.backward()
    assert float(out.losses["auxiliary_reconstruction_loss"].detach()) > 0
    assert torch.allclose(stats.mse + stats.l1, out.loss, rtol=1e-5)
    names = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["W_skip"] if skip else [])
    for name, got in zip(names, grads):
        assert torch.allclose(got, getattr(tc, name).grad, rtol=1e-4, atol=1e-6), name


RESUME = dict(steps=10, batch_size=24, buffer=48, d_sae=48, log_every=1, checkpoint_every=3, progress=False,
              n_norm_batches=2, forward_batch_size=2, stats_tokens=40, **STREAM)
SPECS = {**transcoder_specs(vlens.tiny(words=WORDS), "topk", [1], k=4, skip=True),
         **transcoder_specs(vlens.tiny(words=WORDS), "standard", [2]),
         "jr3": {"site": "mlp_in.3", "target": "mlp_out.3", "preset": "jumprelu", "seed": 3}}


def _same(a, b):
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_transcoders_from_one_pass_resume_bit_identical(vlm, data, tmp_path):
    straight = train_many(vlm, data, SPECS, **RESUME)
    assert {n: type(t).__name__ for n, t in straight.items()} == {
        "transcoder.1": "TopKSkipTranscoder", "transcoder.2": "Transcoder", "jr3": "JumpReLUTranscoder"}
    assert straight["transcoder.2"].cfg.metadata.hook_name_out == "blocks.2.hook_mlp_out"
    mix = straight["jr3"].cfg.metadata.vlens_training["mix"]
    assert mix["image"] > 0 and mix["text"] > 0  # mixed image and text tokens

    def boom(name, step, metrics):
        if name == "transcoder.2" and step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_many(vlm, data, SPECS, checkpoint_dir=tmp_path, callback=boom, **RESUME)
    assert (tmp_path / STREAM_FILE).exists()
    resumed = train_many(vlm, data, SPECS, checkpoint_dir=tmp_path, **RESUME)
    for name in straight:
        _same(resumed[name], straight[name])
    other = {**SPECS, "jr3": {**SPECS["jr3"], "target": "mlp_out.2"}}
    with pytest.raises(vlens.errors.InputError, match="target"):
        train_many(vlm, data, other, checkpoint_dir=tmp_path, **RESUME)


@pytest.fixture(scope="module")
def trained(vlm, data):
    specs = {**transcoder_specs(vlm, "topk", [0, 1], k=4, d_sae=64),
             **transcoder_specs(vlm, "standard", [2], skip=True, d_sae=64),
             **transcoder_specs(vlm, "jumprelu", [3], d_sae=64)}
    return train_many(vlm, data, specs, steps=30, batch_size=32, buffer=64, progress=False, stats_tokens=200, **STREAM)


def _hf_mlp_io(vlm, batch, layers):
    """Every MLP's input and output, read by forward hooks on HF's own modules (no nnsight)."""
    got, handles = {}, []
    for L in layers:
        mlp = vlm.hf_model.model.language_model.layers[L].mlp
        handles.append(mlp.register_forward_hook(lambda m, i, o, L=L: got.__setitem__(L, (i[0], o))))
    try:
        with torch.no_grad():
            logits = vlm.hf_model(**dict(batch.inputs)).logits
    finally:
        for h in handles:
            h.remove()
    return got, logits


def test_evaluation_per_modality_matches_sklearn_on_hf_mlp(vlm, data, trained):
    r = vs.evaluate_transcoders(vlm, trained, data, batch_size=3, progress=False)
    x_in, y_true, y_pred, image = {L: [] for L in range(4)}, {L: [] for L in range(4)}, {L: [] for L in range(4)}, []
    for s in range(0, len(data), 3):
        part = data[s: s + 3]
        batch = vlm.prepare([vlens.prompts.QUESTION] * 3, [x.image for x in part], answers=[x.caption for x in part])
        mask = batch.layout.image | batch.layout.answer
        io, _ = _hf_mlp_io(vlm, batch, range(4))
        image.append(batch.layout.image[mask])
        for L in range(4):
            x_in[L].append(io[L][0][mask])
            y_true[L].append(io[L][1][mask])
    image = torch.cat(image).bool()
    by_layer = {tc.cfg.metadata.hook_name: tc for tc in trained.values()}
    for L in range(4):
        tc = by_layer[f"blocks.{L}.hook_mlp_in"]
        x, y = torch.cat(x_in[L]), torch.cat(y_true[L])
        with torch.no_grad():
            y_hat, f = tc(x), tc.encode(x)
        for group, sel in (("overall", torch.ones_like(image)), ("image", image), ("text", ~image)):
            want = r2_score(y[sel].numpy(), y_hat[sel].numpy(), multioutput="variance_weighted")
            got = r[f"transcoder.{L}"][group]
            assert got["explained_variance"] == pytest.approx(want, abs=1e-4), (L, group)
            assert got["l0"] == pytest.approx(float((f[sel] != 0).sum(-1).float().mean()), abs=1e-5)
            assert got["dead"] == int((~(f[sel] != 0).any(0)).sum())
        assert r[f"transcoder.{L}"]["image"]["n_tokens"] + r[f"transcoder.{L}"]["text"]["n_tokens"] == len(image)


def test_replacement_with_error_terms_is_hf_forward(vlm, data, trained):
    """Every MLP replaced by its transcoder plus the error term gives HF's own logits; without them the CE moves."""
    batch = vlm.prepare([vlens.prompts.QUESTION] * 2, [x.image for x in data[:2]], answers=[x.caption for x in data[:2]])
    _, hf_logits = _hf_mlp_io(vlm, batch, [])
    with torch.no_grad(), vlm.trace(batch):
        for L in range(4):
            tc = next(t for t in trained.values() if t.cfg.metadata.hook_name == f"blocks.{L}.hook_mlp_in")
            splice_transcoder(vlm, tc, batch=batch, tokens="all", error=True)
        logits = vlm.read("logits").save()
    assert torch.allclose(logits, hf_logits, atol=1e-5, rtol=1e-5)
    r = vs.replacement_loss_recovered(vlm, trained, data, batch_size=3, progress=False)
    for g in ("overall", "image", "text"):
        assert r[g]["layers"] == [0, 1, 2, 3]
        assert r[g]["ce_with_error"] == pytest.approx(r[g]["ce_clean"], abs=1e-5)
        assert r[g]["ce_replaced"] != pytest.approx(r[g]["ce_clean"], abs=1e-6)
        want = 1 - (r[g]["ce_replaced"] - r[g]["ce_clean"]) / (r[g]["ce_zero"] - r[g]["ce_clean"])
        assert r[g]["loss_recovered"] == pytest.approx(want)


PLAIN = """
import json, sys, torch
from sae_lens import SAE
out = {}
x = torch.load(sys.argv[1])
for path in sys.argv[2:]:
    sae = SAE.load_from_disk(path)
    out[path] = [type(sae).__name__, sae.cfg.metadata.hook_name, sae.cfg.metadata.hook_name_out, sae(x).tolist(),
                 "vlens" in sys.modules]
print(json.dumps(out))
"""


def test_exports_load_with_plain_sae_lens(trained, tmp_path):
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    torch.save(x, tmp_path / "x.pt")
    paths = {}
    for name in ("transcoder.2", "transcoder.3"):  # skip_transcoder, jumprelu_transcoder
        paths[name] = str(vs.export(trained[name], tmp_path / name))
    tc = training_transcoder("standard", d_in=64, d_sae=32)  # the plain "transcoder" format, finished as vlens does
    plain = _finished(tc)
    paths["plain"] = str(vs.export(plain, tmp_path / "plain", sparsity=torch.full((32,), 0.1)))
    run = subprocess.run([sys.executable, "-c", PLAIN, str(tmp_path / "x.pt"), *paths.values()], capture_output=True,
                         text=True, check=True)
    got = json.loads(run.stdout)
    want = {"transcoder.2": "SkipTranscoder", "transcoder.3": "JumpReLUTranscoder", "plain": "Transcoder"}
    for name, path in paths.items():
        cls, hook_in, hook_out, y, imported_vlens = got[path]
        assert cls == want[name] and not imported_vlens
        model = trained.get(name, plain)
        assert hook_in == model.cfg.metadata.hook_name and hook_out == model.cfg.metadata.hook_name_out
        with torch.no_grad():
            assert torch.allclose(torch.tensor(y), model(x), atol=1e-6)
    back = vs.load(paths["transcoder.2"])
    assert back.modality is not None and torch.equal(back.W_skip, trained["transcoder.2"].W_skip)


def _finished(tc):
    from sae_lens import SAE
    from sae_lens.saes.sae import SAEMetadata

    with torch.no_grad():
        for p in tc.parameters():
            p.normal_(0, 0.2)
    sd = {k: v.detach().clone() for k, v in tc.state_dict().items()}
    tc.process_state_dict_for_saving_inference(sd)
    d = tc.cfg.get_inference_sae_cfg_dict()
    d["metadata"] = SAEMetadata(hook_name="blocks.0.hook_mlp_in", hook_name_out="blocks.0.hook_mlp_out").to_dict()
    out = SAE.from_dict(d)
    out.load_state_dict(sd)
    return out


def test_cli_trains_every_layers_transcoder_from_one_pass(tmp_path, capsys):
    """`vlens train-saes --transcoders`: one transcoder per layer; each export loads in SAE-Lens at mlp_in -> mlp_out."""
    from sae_lens import SAE

    from vlens.cli import main

    argv = ["train-saes", "--transcoders", "--sites", "0,-1", "--skip", "--preset", "standard", "--n", "6",
            "--n-tokens", "512", "--batch-size", "256", "--expansion", "2", "--out", str(tmp_path)]
    assert main(argv) == 0
    for L in (0, 5):  # the toy model has 6 layers
        tc = SAE.load_from_disk(str(tmp_path / f"transcoder.{L}"))
        assert type(tc).__name__ == "SkipTranscoder" and tc.cfg.d_sae == 128
        assert (tc.cfg.metadata.hook_name, tc.cfg.metadata.hook_name_out) == (f"blocks.{L}.hook_mlp_in",
                                                                              f"blocks.{L}.hook_mlp_out")
    assert main(["train-saes", "--sites", "1", "--skip", "--n-tokens", "9", "--out", "x"]) == 2
    assert "--skip is a transcoder option" in capsys.readouterr().err


def test_topk_transcoder_export_loads_through_sae_lens_registry(tmp_path):
    """SAE-Lens 6.54 has no TopK transcoder: vlens registers one, and SAE.load_from_disk reads the export back,
    its latents SAE-Lens's own TopK of the pre-activations."""
    from sae_lens import SAE
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopK

    from vlens.sae.transcoder import TopKSkipTranscoder, TopKSkipTranscoderConfig

    meta = SAEMetadata(hook_name="blocks.0.hook_mlp_in", hook_name_out="blocks.0.hook_mlp_out")
    tc = _randomised(TopKSkipTranscoder(TopKSkipTranscoderConfig(d_in=8, d_sae=16, d_out=8, k=3, metadata=meta)),
                     torch.Generator().manual_seed(4))
    back = SAE.load_from_disk(str(vs.export(tc, tmp_path, sparsity=torch.full((16,), 0.1))))
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        f = TopK(3)(x @ tc.W_enc + tc.b_enc)
        assert torch.allclose(back.encode(x), f)
        assert torch.allclose(back(x), f @ tc.W_dec + tc.b_dec + x @ tc.W_skip.T, atol=1e-6)
    assert type(back).__name__ == "TopKSkipTranscoder" and back.cfg.metadata.hook_name_out == "blocks.0.hook_mlp_out"
