"""Run by tests/test_distributed.py: train an SAE on a fixed tensor, single process or under torchrun."""

import sys

import torch
from safetensors.torch import save_file

import vlens.sae as vs
from vlens import distributed

out = sys.argv[1]
env = distributed.init()
g = torch.Generator().manual_seed(0)
x = torch.randn(4096, 16, generator=g) @ torch.randn(16, 16, generator=g)
sae = vs.train(x, "paper", d_sae=64, steps=40, batch_size=256, lr=1e-3, fused=False, progress=False, stats_tokens=0)
if env.is_main:
    save_file({k: v.contiguous() for k, v in sae.state_dict().items()}, out)
distributed.cleanup()
