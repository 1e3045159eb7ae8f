"""torch.distributed on CPU (gloo, 2 processes): harvest and SAE training match a single process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vlens
from vlens.data import toy
from vlens.activations import ActivationStore, harvest

HERE = Path(__file__).parent
N = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def rows(store: ActivationStore, layer: int):
    """(metadata key per row, activations), sorted by sample, pass and position: order-free comparison."""
    m = store.meta
    key = m["sample"] * 100_000 + m["text_only"].long() * 10_000 + m["position"]
    order = torch.argsort(key)
    return key[order], store.activations(layer).tensor()[order].float()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    vlm = vlens.tiny(words=["red", "green", "blue", "circle", "square"])
    return harvest(vlm, toy("train", n=N), layers=[1, 3], tokens="image+answer", captions=True, batch_size=2,
                   out=out, progress=False)


def _same(a: ActivationStore, b: ActivationStore) -> None:
    assert len(a) == len(b)
    for layer in (1, 3):
        ka, xa = rows(a, layer)
        kb, xb = rows(b, layer)
        assert torch.equal(ka, kb)
        # Different batch partners change padding only; values agree to float rounding.
        assert torch.allclose(xa, xb, atol=1e-5, rtol=1e-5)
    assert a.sample_ids == b.sample_ids


def test_two_rank_harvest_equals_single_process(tmp_path, single):
    out = tmp_path / "dist"
    r = torchrun(str(HERE / "dist_harvest_script.py"), str(out), str(N), "-1", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "rank-000").is_dir() and (out / "rank-001").is_dir()
    store = ActivationStore(out)
    assert store.complete and store.index["world_size"] == 2
    _same(store, single)


def test_killed_rank_resumes_without_loss(tmp_path, single):
    out = tmp_path / "dist"
    r = torchrun(str(HERE / "dist_harvest_script.py"), str(out), str(N), "1", "4")
    assert r.returncode != 0  # rank 1 died with SIGKILL, torchrun stopped the job
    assert not (out / "index.json").exists()
    written = ActivationStore(out / "rank-001").index["progress"]["main"]
    assert 0 < written < (N + 1) // 2
    r = torchrun(str(HERE / "dist_harvest_script.py"), str(out), str(N), "-1", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    _same(ActivationStore(out), single)


def test_shard_is_disjoint_and_complete():
    from vlens.distributed import shard

    parts = [list(shard(11, r, 3)) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(11))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_ddp_sae_training_matches_single_process(tmp_path):
    from safetensors.torch import load_file

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    one = subprocess.run([sys.executable, str(HERE / "dist_sae_script.py"), str(tmp_path / "one.safetensors")],
                         capture_output=True, text=True, timeout=240, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(str(HERE / "dist_sae_script.py"), str(tmp_path / "two.safetensors"))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    # Training moved the decoder rows away from their initial norm of 0.1 (the paper's init).
    assert not torch.allclose(a["W_dec"].norm(dim=1), torch.full((64,), 0.1), atol=1e-3)


def test_train_sae_cli_exports_for_sae_lens(tmp_path, single, capsys):
    from sae_lens import SAE

    from vlens.cli import main

    assert main(["train-sae", "--store", str(single.path), "--layer", "3", "--preset", "topk", "--k", "8",
                 "--steps", "20", "--batch-size", "128", "--out", str(tmp_path / "sae")]) == 0
    assert "SAE exported" in capsys.readouterr().out
    sae = SAE.load_from_disk(str(tmp_path / "sae"))
    assert sae.cfg.d_in == 64 and sae.cfg.metadata.hook_name == "blocks.3.hook_resid_pre"
