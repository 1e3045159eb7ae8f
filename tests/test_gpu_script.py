"""benchmarks/gpu.py --tiny: the GPU script's code at tiny sizes on the CPU (bf16), every stage."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("vlens_bench_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_run_passes_every_stage(gpu):
    out = gpu.main(["--tiny"])
    st = out["stages"]
    assert out["failed"] == [], {n: st[n].get("error") for n in out["failed"]}
    assert list(st) == list(gpu.STAGES) and out["device"] == "cpu" and out["dtype"] == "bfloat16"
    assert st["build"]["param_devices_dtypes"] == ["cpu", "torch.bfloat16"]
    assert st["build"]["params"] * 2 == st["build"]["planned_bytes"]
    # left padding: the 336² and 640×480 rows are padded to the 672² row and read what they read alone
    assert st["trace"]["agree"] and st["trace"]["padding"][1] == 0 and min(st["trace"]["padding"]) == 0
    h = st["harvest"]
    assert h["tokens"] == h["images"] * 1176 and h["planned_store_bytes"] <= h["store_bytes"] < 1.01 * h["planned_store_bytes"]
    assert st["ddp"]["agree"] and st["ddp"]["torchrun"] == {"enabled": True, "world_size": 1, "backend": "gloo"}
    assert st["sae"]["ratio_standard"] > 0 and st["train_many"]["forwards"] >= 1
    assert st["attribution"]["image_tokens"] == 1176 and all(s["peak_bytes"] is None for s in st.values())


def test_a_failed_stage_is_recorded_and_the_next_ones_run(gpu):
    out = gpu.main(["--tiny", "--stages", "trace,sae"])  # no build: trace has no model
    assert out["failed"] == ["trace"] and "build stage failed" in out["stages"]["trace"]["error"]
    assert out["stages"]["sae"]["ok"] and out["stages"]["sae"]["d_in"] == 64


def test_stages_scale_down_to_the_free_memory(gpu, monkeypatch):
    """A card with little free memory: the planner cuts the attribution batch, and the JSON says so."""
    import argparse

    r = gpu.Run(argparse.Namespace(tiny=True, device="cuda", dtype="bfloat16"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (3 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    assert r.free() == 3 * 2**30  # the CUDA branch of free(), forced
    monkeypatch.setattr(gpu.Run, "free", lambda self: 10 * 2**20)
    out = gpu.main(["--tiny", "--stages", "build,attribution"])
    a = out["stages"]["attribution"]
    assert a["ok"] and a["ig_batch_size"] == 1 and "attribution: 1 rows instead of 4" in a["scaled_down"][0]
