"""The one `vlens` command line: flags from the library, checks before anything heavy, one-line errors, exit 2."""

from __future__ import annotations

import inspect
import re

import pytest

from vlens.cli import app, main


def _click_default(command: str, option: str, group=None):
    import typer.main

    cmd = typer.main.get_command(app)
    for part in command.split():
        cmd = cmd.commands[part]
    return next(p.default for p in cmd.params if p.name == option)


def test_defaults_come_from_the_library():
    from vlens.activations.harvesting import harvest
    from vlens.demo import run
    from vlens.sae.training import train

    sig = inspect.signature(harvest).parameters
    assert _click_default("harvest", "batch_size") == sig["batch_size"].default
    assert _click_default("harvest", "prompt") == sig["prompt"].default
    assert _click_default("harvest", "tokens") == sig["tokens"].default
    assert _click_default("train-sae", "preset") == inspect.signature(train).parameters["preset"].default
    assert _click_default("demo", "model") == inspect.signature(run).parameters["model"].default
    # config dataclasses become flags: every plain field of the toy trainer's config is an option
    from dataclasses import fields

    from vlens.toy.train import TrainConfig

    import typer.main

    names = {p.name for p in typer.main.get_command(app).commands["toy"].commands["train"].params}
    assert {f.name for f in fields(TrainConfig) if type(f.default) in (int, float, str, bool)} <= names


def test_toy_eval_prints_accuracy_last(capsys):
    assert main(["toy", "eval", "--n", "40"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.fullmatch(r"accuracy: (\d\.\d\d)", last)
    assert m and float(m.group(1)) >= 0.9


def test_harvest_command(tmp_path, capsys):
    from vlens.activations import ActivationStore

    assert main(["harvest", "--model", "toy", "--data", "toy", "--n", "4", "--layers", "1,2", "--pool", "mean",
                 "--batch-size", "4", "--out", str(tmp_path / "cli")]) == 0
    store = ActivationStore(tmp_path / "cli")
    assert store.layers == [1, 2] and len(store) == 4 and store.config["model"] == "toy"
    assert "ActivationStore" in capsys.readouterr().out
    # the paper's text-only pass: every token of the caption alone, BOS included
    assert main(["harvest", "--model", "toy", "--data", "toy", "--n", "2", "--layers", "1", "--tokens", "image+answer",
                 "--captions", "--text-only", "--text-tokens", "all", "--out", str(tmp_path / "text")]) == 0
    text = ActivationStore(tmp_path / "text")
    assert text.config["text_tokens"] == "all" and len(text.filter(text_only=True)) > 0


@pytest.mark.parametrize("argv, message", [
    (["harvest", "--layers", "99", "--out", "x"], r"resid_pre layer 99 is out of range: this model has layers 0\.\.5"),
    (["harvest", "--layers", "1,a", "--out", "x"], "comma-separated ints"),
    (["harvest", "--layers", "1", "--n", "0", "--out", "x"], "--n must be at least 1"),
    (["harvest", "--layers", "1", "--tokens", "pixels", "--out", "x"], "unknown token selection 'pixels'"),
    (["harvest", "--layers", "1", "--text-tokens", "pixels", "--out", "x"], "unknown token selection 'pixels'"),
    (["harvest", "--layers", "1", "--site", "resid_mid", "--out", "x"], "--site is resid_pre or resid_post"),
    (["harvest", "--layers", "1", "--dtype", "float17", "--out", "x"], "unknown dtype 'float17'"),
    (["harvest", "--layers", "1", "--data", "/no/such/folder", "--out", "x"], "--data is 'toy' or an image folder"),
    (["harvest", "--layers", "1", "--model", "./no/such/model", "--out", "x"], "no model directory at"),
    (["toy", "eval", "--n", "0"], "--n must be at least 1"),
    (["train-sae", "--store", "/no/store", "--layer", "1", "--out", "x", "--preset", "nope"], "--preset must be one of"),
    (["train-saes", "--sites", "resid_pre.9", "--n-tokens", "10", "--out", "x"], "out of range"),
    (["train-saes", "--sites", "vision.0", "--n-tokens", "10", "--out", "x"], "takes resid_pre.L and resid_post.L"),
    (["train-saes", "--sites", "1", "--n-tokens", "0", "--out", "x"], "--n-tokens must be at least 1"),
    (["export", "paper", "/no/such/file.pt", "--out", "x"], "no checkpoint at"),
    (["demo", "--model", "some/model"], "needs --data"),
])
def test_user_errors_are_one_line_and_exit_2_before_any_model_loads(argv, message, capsys, monkeypatch):
    import vlens.loading

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(vlens.loading, "load", refuse)
    assert main(argv) == 2
    out = capsys.readouterr().err
    assert out.startswith("vlens: error: ") and len(out.strip().splitlines()) == 1
    assert re.search(message, out), out


def test_train_saes_from_one_pass_exports_each(tmp_path, capsys):
    """`vlens train-saes` trains one SAE per site in one pass; each export loads in plain SAE-Lens at its site."""
    from sae_lens import SAE

    argv = ["train-saes", "--sites", "resid_pre.1,resid_post.2", "--n", "8", "--n-tokens", "1024",
            "--batch-size", "256", "--expansion", "2", "--out", str(tmp_path)]
    assert main(argv) == 0
    for name, hook in (("resid_pre.1", "blocks.1.hook_resid_pre"), ("resid_post.2", "blocks.2.hook_resid_post")):
        sae = SAE.load_from_disk(str(tmp_path / name))
        assert sae.cfg.metadata.hook_name == hook and sae.cfg.d_sae == 128
    assert "resid_post.2: exported to" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys):
    assert main(["frobnicate"]) == 2
    assert "No such command" in capsys.readouterr().err
    assert main(["harvest"]) == 2  # --layers and --out are required


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("demo", "harvest", "train-sae", "train-saes", "export", "explore", "toy"):
        assert command in out


def test_python_dash_m_vlens_toy_is_vlens_toy():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "vlens.toy", "eval", "--n", "0"], capture_output=True, text=True)
    assert r.returncode == 2 and "--n must be at least 1" in r.stderr


def test_demo_on_the_real_lm_toy_needs_no_data_and_takes_its_own_sizes(monkeypatch, tmp_path):
    """`vlens demo --model toy-gemma` generates the toy data itself and runs at `DemoConfig.for_model`'s sizes."""
    import vlens.demo
    from vlens._modelopts import ModelChoice
    from vlens.demo import DemoConfig

    class Loaded:
        name = "toy-gemma"

    class Started(Exception):
        pass

    seen = {}

    def start(model, device, cfg, *rest):
        seen.update(model=model, cfg=cfg)
        raise Started

    monkeypatch.setattr(ModelChoice, "load", lambda self, **kw: Loaded())
    monkeypatch.setattr(vlens.demo, "_start", start)
    with pytest.raises(Started):
        main(["demo", "--model", "toy-gemma", "--fast", "--sae-steps", "7", "--out", str(tmp_path)])
    want = DemoConfig.for_model("toy-gemma", fast=True)
    assert seen["cfg"].sae_expansion == 16 and seen["cfg"].sae_layer_stride == 3 and seen["cfg"].sae_steps == 7
    assert {**vars(seen["cfg"]), "sae_steps": want.sae_steps} == vars(want)
    assert isinstance(seen["model"], Loaded)
