"""A catalogue of bad inputs a researcher meets in the first hour (issue 28): each one raises a `VlensError` whose
message names the argument or file, says what is wrong with it, and what to do; never a raw torch, JSON, nnsight or
SAE-Lens error.

Each case is (what it does, the words its message must hold); the words are the argument or file name, the fault,
and the fix.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from sae_lens.saes import StandardSAE, StandardSAEConfig

import vlens
import vlens.sae as vs
from vlens.errors import VlensError


@pytest.fixture(scope="module")
def vlm():
    return vlens.tiny()


@pytest.fixture(scope="module")
def batch(vlm):
    return vlm.prepare(["<image>\nWhat is shown?"], [Image.new("RGB", (32, 32), "red")])


def _raises(fn, *words: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(VlensError) as info:
            fn()
    msg = str(info.value)
    for w in words:
        assert w.lower() in msg.lower(), f"{w!r} not in {msg!r}"
    return msg


# -- sites inside a trace ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda vlm: vlm.resid_pre(1.5), ["resid_pre", "1.5", "must be an int", "resid_pre.3"]),
        (lambda vlm: vlm.resid_post("2"), ["resid_post", "'2'", "must be an int"]),
        (lambda vlm: vlm.resid_pre(True), ["resid_pre", "True", "must be an int"]),
        (lambda vlm: vlm.resid_pre(9), ["layer 9", "out of range", "0..3"]),
        (lambda vlm: vlm.read("resid_mid.2"), ["resid_mid.2", "resid_pre.L"]),
    ],
    ids=["float layer", "str layer", "bool layer", "layer out of range", "unknown site"],
)
def test_bad_layers_in_a_trace_name_the_layer(vlm, batch, call, words):
    def run():
        with vlm.trace(batch):
            call(vlm)

    _raises(run, *words)


def test_a_site_of_an_unknown_kind_is_refused():
    _raises(lambda: vlens.sites.Site("resid_mid", 2), "resid_mid", "unknown site kind")
    _raises(lambda: vlens.sites.Site("embed", 2), "embed", "takes no layer")


# -- pooled features (vlens.steering.pool_features went away in vlens 0.3: read_layers is the one way) -------------


def test_pooled_features_of_no_images_or_no_layers_say_which(vlm, batch):
    _raises(lambda: vlm.prepare([], []), "at least one prompt")
    _raises(lambda: vlens.read_layers(vlm, batch, [], pool="mean"), "at least one site")
    _raises(lambda: vlens.read_layers(vlm, batch, [1.5], pool="mean"), "not float", "int layer")


# -- vs.load on a damaged SAE folder -------------------------------------------------------------------------------


@pytest.fixture
def sae_dir(tmp_path) -> Path:
    sae = StandardSAE(StandardSAEConfig(d_in=8, d_sae=16))
    return vs.export(sae, tmp_path / "sae", sparsity=torch.full((16,), 0.1))


def _edit_weights(path: Path, edit) -> None:
    tensors = load_file(path / "sae_weights.safetensors")
    edit(tensors)
    save_file(tensors, path / "sae_weights.safetensors")


def _edit_cfg(path: Path, edit) -> None:
    cfg = json.loads((path / "cfg.json").read_text())
    edit(cfg)
    (path / "cfg.json").write_text(json.dumps(cfg))


LOAD_CASES = {
    "W_enc of the wrong shape": (lambda p: _edit_weights(p, lambda t: t.update(W_enc=torch.zeros(8, 12))),
                                 ["sae_weights.safetensors", "W_enc has shape (8, 12), not (8, 16)", "d_in=8",
                                  "re-export"]),
    "W_dec transposed": (lambda p: _edit_weights(p, lambda t: t.update(W_dec=torch.zeros(8, 16))),
                         ["sae_weights.safetensors", "W_dec has shape (8, 16), not (16, 8)"]),
    "no b_dec": (lambda p: _edit_weights(p, lambda t: t.pop("b_dec")),
                 ["sae_weights.safetensors", "missing b_dec", "re-export"]),
    "an extra tensor": (lambda p: _edit_weights(p, lambda t: t.update(W_skip=torch.zeros(8, 8))),
                        ["sae_weights.safetensors", "unexpected W_skip"]),
    "cfg.json without d_in": (lambda p: _edit_cfg(p, lambda c: c.pop("d_in")),
                              ["cfg.json", "lacks ['d_in']", "re-export"]),
    "cfg.json with d_sae 'many'": (lambda p: _edit_cfg(p, lambda c: c.update(d_sae="many")),
                                   ["cfg.json", "d_sae='many'", "positive int"]),
    "corrupt cfg.json": (lambda p: (p / "cfg.json").write_text('{"d_in": 8,'),
                         ["cfg.json", "not valid JSON", "re-export"]),
    "cfg.json holding a list": (lambda p: (p / "cfg.json").write_text("[1, 2]"),
                                ["cfg.json", "JSON list"]),
    "truncated weights": (lambda p: (p / "sae_weights.safetensors").write_bytes(b"\x08\x00"),
                          ["sae_weights.safetensors", "truncated or corrupt"]),
    "no weights": (lambda p: (p / "sae_weights.safetensors").unlink(),
                   ["sae_weights.safetensors", "does not exist"]),
}


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_load_names_the_file_and_the_fault(sae_dir, case):
    damage, words = LOAD_CASES[case]
    damage(sae_dir)
    _raises(lambda: vs.load(sae_dir), *words)


# -- convert_sparsify_checkpoint -----------------------------------------------------------------------------------


def _sparsify(path: Path, d: int = 8, m: int = 32, **cfg) -> Path:
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps({"d_in": d, "num_latents": m, "k": 4, **cfg}))
    save_file({"encoder.weight": torch.randn(m, d), "encoder.bias": torch.zeros(m), "W_dec": torch.randn(m, d),
               "b_dec": torch.zeros(d)}, path / "sae.safetensors")
    return path


def _edit_sparsify(path: Path, **tensors) -> None:
    sd = load_file(path / "sae.safetensors")
    sd.update(tensors)
    save_file(sd, path / "sae.safetensors")


SPARSIFY_CASES = {
    "corrupt cfg.json": (lambda p: (p / "cfg.json").write_text("{'k': 4}"),
                         ["cfg.json", "not valid JSON", "re-download"]),
    "W_dec of the wrong shape": (lambda p: _edit_sparsify(p, W_dec=torch.randn(8, 32)),
                                 ["sae.safetensors", "W_dec has shape (8, 32), not (32, 8)", "re-download"]),
    "b_dec of the wrong width": (lambda p: _edit_sparsify(p, b_dec=torch.zeros(5)),
                                 ["sae.safetensors", "b_dec has shape (5,), not (8,)"]),
    "k above num_latents": (lambda p: (p / "cfg.json").write_text(json.dumps({"d_in": 8, "num_latents": 32, "k": 40})),
                            ["cfg.json", "k=40", "1..32", "fix k"]),
    "k of 0": (lambda p: (p / "cfg.json").write_text(json.dumps({"d_in": 8, "k": 0})), ["k=0", "1..32"]),
    "no k": (lambda p: (p / "cfg.json").write_text(json.dumps({"d_in": 8})), ["cfg.json", "k=None"]),
    "num_latents that disagrees": (lambda p: (p / "cfg.json").write_text(json.dumps({"num_latents": 64, "k": 4})),
                                   ["cfg.json", "num_latents=64", "(32, 8)"]),
    "encoder of one dimension": (lambda p: _edit_sparsify(p, **{"encoder.weight": torch.zeros(32)}),
                                 ["encoder.weight", "(32,)", "(num_latents, d_in)"]),
}


@pytest.mark.parametrize("case", list(SPARSIFY_CASES))
def test_convert_sparsify_names_the_file_and_the_fault(tmp_path, case):
    damage, words = SPARSIFY_CASES[case]
    src = _sparsify(tmp_path / "layers.3")
    damage(src)
    _raises(lambda: vs.convert_sparsify_checkpoint(src), *words)


def test_a_corrupt_sparsify_run_config_is_named(tmp_path):
    _sparsify(tmp_path / "run" / "layers.0")
    (tmp_path / "run" / "config.json").write_text("not json")
    _raises(lambda: vs.io.convert_sparsify_run(tmp_path / "run"), "config.json", "not valid JSON", "model_name=")


def test_a_sparsify_checkpoint_with_num_latents_zero_converts_as_sparsify_writes_it(tmp_path):
    """sparsify writes num_latents=0 when expansion_factor sets the width: not a fault."""
    src = _sparsify(tmp_path / "layers.1", num_latents=0, expansion_factor=4)
    assert vs.convert_sparsify_checkpoint(src).cfg.d_sae == 32
