"""Every command that takes a model takes every model (issue 28): one set of model options, tiny builds of every
family, random-weight real checkpoints, a one-line error for a checkpoint that is not here; `vlens probe` and
`vlens dashboard`; `vlens train-sae` reports the SAE's quality; `vs.dashboard` and `vs.export` without the
arguments a first user leaves out."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import typer.main

import vlens
import vlens.sae as vs
from vlens.activations import ActivationStore
from vlens.cli import app, main

MODEL_OPTIONS = {"model", "weights", "seed", "d_model", "n_layers", "vision_d_model", "vision_layers", "device",
                 "dtype"}


@pytest.mark.parametrize("command", ["demo", "harvest", "train-saes", "dashboard", "explore"])
def test_every_model_command_takes_the_one_set_of_model_options(command):
    params = {p.name for p in typer.main.get_command(app).commands[command].params}
    assert MODEL_OPTIONS <= params, MODEL_OPTIONS - params


def test_help_lists_probe_and_dashboard(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\bprobe\b", out) and re.search(r"\bdashboard\b", out)


def test_harvest_a_tiny_build_of_another_family_equals_its_hidden_states(tmp_path):
    """`--model tiny:gemma3` harvests the tiny Gemma 3 (seeded), pooled rows equal to HF's own hidden states."""
    argv = ["harvest", "--model", "tiny:gemma3", "--n-layers", "2", "--seed", "3", "--data", "toy", "--n", "3",
            "--layers", "1", "--pool", "mean", "--out", str(tmp_path / "s")]
    assert main(argv) == 0
    store = ActivationStore(tmp_path / "s")
    X, _ = store.pooled(1)
    data = vlens.data.toy("train", n=3)
    vlm = vlens.tiny(family="gemma3", n_layers=2, seed=3, words=data)
    batch = vlm.prepare([store.config["prompt"]] * 3, [s.image for s in data])
    inputs = dict(batch.inputs)
    with torch.no_grad():
        hs = vlm._module(**inputs, output_hidden_states=True).hidden_states[1]
    mask = batch.layout.image
    ref = torch.stack([hs[i][mask[i]].mean(0) for i in range(3)])
    torch.testing.assert_close(X.float(), ref, rtol=1e-4, atol=1e-4)


def test_harvest_takes_random_weights_of_the_real_checkpoint(tmp_path):
    pytest.importorskip("mistral_common")
    argv = ["harvest", "--model", "llava-hf/llava-v1.6-mistral-7b-hf", "--weights", "random", "--d-model", "32",
            "--n-layers", "2", "--vision-d-model", "16", "--vision-layers", "1", "--data", "toy", "--n", "2",
            "--layers", "1", "--pool", "mean", "--out", str(tmp_path / "s")]
    assert main(argv) == 0
    store = ActivationStore(tmp_path / "s")
    assert store.d_model == 32 and "random weights" in store.config["model"]


def test_a_checkpoint_that_is_not_here_is_one_line_naming_random_weights(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["harvest", "--model", "llava-hf/llava-v1.6-mistral-7b-hf", "--layers", "1", "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlens: error: ") and len(err.splitlines()) == 1, err
    assert "--weights random" in err and "real" in err


@pytest.mark.parametrize("argv, message", [
    (["harvest", "--layers", "1", "--out", "x", "--d-model", "32"], "--d-model sizes a --weights random"),
    (["harvest", "--layers", "1", "--out", "x", "--weights", "pretrained"], "--weights takes 'random'"),
    (["harvest", "--layers", "1", "--out", "x", "--model", "tiny:nope"], "nope"),
    (["harvest", "--layers", "5", "--out", "x", "--model", "tiny:qwen2.5-vl", "--n-layers", "2"], "out of range"),
])
def test_bad_model_options_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlens: error: ") and len(err.strip().splitlines()) == 1 and message in err, err


@pytest.fixture(scope="module")
def image_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "s"
    assert main(["harvest", "--data", "toy", "--n", "12", "--layers", "2", "--tokens", "image+answer", "--captions",
                 "--out", str(out)]) == 0
    return ActivationStore(out)


def test_train_sae_prints_explained_variance_l0_and_dead_latents(image_store, tmp_path, capsys):
    """The printed quality is SAE-Lens's own SAE on the store's rows, by the formula written out here."""
    from sae_lens import SAE

    assert main(["train-sae", "--store", str(image_store.path), "--layer", "2", "--out", str(tmp_path / "sae"),
                 "--steps", "30", "--expansion", "2"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"overall: explained variance (-?[\d.]+), L0 ([\d.]+), dead latents (\d+) of (\d+)", out)
    assert m, out
    sae = SAE.load_from_disk(str(tmp_path / "sae"))
    x = image_store.activations(2)[:].float().numpy()
    with torch.no_grad():
        z = sae.encode(torch.from_numpy(x))
        xh = sae.decode(z).numpy()
    ev = 1 - ((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert float(m.group(1)) == pytest.approx(ev, abs=2e-3)
    assert float(m.group(2)) == pytest.approx((z > 0).sum(1).float().mean().item(), abs=0.05)
    assert int(m.group(3)) == int(((z > 0).sum(0) == 0).sum()) and int(m.group(4)) == sae.cfg.d_sae
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["metadata"]["model_name"] == "toy"


def test_probe_command_prints_each_layers_held_out_accuracy(tmp_path, capsys):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    assert main(["harvest", "--data", "toy", "--n", "100", "--layers", "1,3", "--pool", "mean",
                 "--out", str(tmp_path / "p")]) == 0
    capsys.readouterr()
    assert main(["probe", "--store", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    acc = {int(L): float(a) for L, a in re.findall(r"layer (\d+): held-out accuracy ([\d.]+)", out)}
    assert sorted(acc) == [1, 3] and "20 classes" in out
    # scikit-learn's held-out accuracy on the same rows (5-fold, stratified) agrees within the noise of 20 test rows
    X, y = ActivationStore(tmp_path / "p").pooled(3)
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    ref = cross_val_score(LogisticRegression(max_iter=3000), X.float().numpy(), y.numpy(), cv=folds).mean()
    assert abs(acc[3] - ref) < 0.25, (acc, ref)


def test_dashboard_needs_no_layer_and_the_command_writes_pages(tmp_path, capsys):
    vlm = vlens.load("toy")
    x = torch.randn(512, vlm.d_model)
    sae = vs.train(x, "paper", d_sae=16, steps=2, batch_size=256, progress=False, hook_name="blocks.2.hook_resid_pre")
    samples = list(vlens.data.toy("heldout", n=3))
    index = vs.dashboard(sae, vlm, samples, tmp_path / "py", latents=[0], progress=False)  # layer is a keyword now
    assert index.exists()
    vs.export(sae, tmp_path / "sae", sparsity=torch.full((16,), 0.1))
    assert main(["dashboard", "--sae", str(tmp_path / "sae"), "--data", "toy", "--n", "3", "--n-latents", "2",
                 "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "index.html").exists() and "dashboards:" in capsys.readouterr().out


def test_export_fills_model_name_from_the_store(image_store, tmp_path):
    sae = vs.train(image_store, "paper", layer=2, expansion=2, steps=3, progress=False)
    cfg = json.loads((vs.export(sae, tmp_path / "e") / "cfg.json").read_text())
    assert cfg["metadata"]["model_name"] == "toy" and cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_pre"


def test_load_names_a_tiny_build():
    vlm = vlens.load("tiny:qwen2.5-vl", n_layers=2, words=["circle"])
    assert vlm.family.name == "qwen2.5-vl" and vlm.n_layers == 2
    assert "circle" in vlm.processor.tokenizer.get_vocab()
    assert np.isclose(vlens.loading.facts("tiny:qwen2.5-vl", n_layers=2).n_layers, 2)
