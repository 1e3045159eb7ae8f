"""The CUDA branches of vlens, forced on the CPU where torch lets them be: NCCL and the local GPU under
torchrun, the per-rank CUDA device of the CLI, the GPU peak-memory counters, and building off the CPU in
the target dtype (the meta device stands in for a GPU). benchmarks/gpu.py runs the rest on a card."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import vlens
from vlens import cli, distributed
from vlens.families.checkpoints import LLAVA_NEXT_MISTRAL, build
from vlens.planning import PeakMemory


@pytest.mark.parametrize("cuda, backend", [(True, "nccl"), (False, "gloo")])
def test_init_under_torchrun_joins_with_nccl_on_the_local_gpu(cuda, backend, monkeypatch):
    calls: dict = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.setdefault("device", i))
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.setdefault("backend", backend))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    for k, v in dict(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(k, v)
    env = distributed.init()
    assert calls == ({"backend": "nccl", "device": 0} if cuda else {"backend": "gloo"})
    assert env.world_size == 1 and env.local_rank == 0


def test_init_without_torchrun_joins_nothing(monkeypatch):
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: pytest.fail("joined a group"))
    for k in ("WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    assert not distributed.init().enabled


def test_the_cli_gives_each_rank_its_own_gpu():
    assert cli._device("cuda", distributed.DistInfo(rank=3, world_size=4, local_rank=1)) == "cuda:1"
    assert cli._device("cuda", distributed.DistInfo()) == "cuda"
    assert cli._device("cpu", distributed.DistInfo(rank=1, world_size=2, local_rank=1)) == "cpu"


def test_peak_memory_reads_the_cuda_counters(monkeypatch):
    state = {"now": 5_000, "peak": 0}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: state.update(peak=state["now"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: state["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: state["peak"])
    with PeakMemory("cuda:0") as m:
        state["peak"] = 12_000  # what the allocator saw at its highest inside
    assert m.peak == 7_000


def test_builds_off_the_cpu_are_drawn_in_their_dtype():
    """The meta device takes the GPU's branch: parameters are created in bf16, never in float32 first."""
    vlm = vlens.load(LLAVA_NEXT_MISTRAL, weights="random", device="meta", dtype=torch.bfloat16,
                     d_model=64, n_layers=1, vision_d_model=32, vision_layers=1)
    assert {p.dtype for p in vlm._module.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # restored
    cpu, _ = build(d_model=64, n_layers=1, vision_d_model=32, vision_layers=1, dtype=torch.bfloat16)
    ref, _ = build(d_model=64, n_layers=1, vision_d_model=32, vision_layers=1)
    w = "model.language_model.layers.0.mlp.up_proj.weight"
    assert torch.equal(cpu.state_dict()[w], ref.state_dict()[w].to(torch.bfloat16))  # CPU: same seed, same weights
