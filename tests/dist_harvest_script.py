"""Run by tests/test_distributed.py under torchrun: a harvest that one rank may be told to die in."""

import os
import signal
import sys

import vlens
from vlens import distributed
from vlens.data import toy
from vlens.activations import harvest

out, n, kill_rank, kill_after = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
env = distributed.init()
vlm = vlens.tiny(words=["red", "green", "blue", "circle", "square"])


def die(info):
    if env.rank == kill_rank and info["done"] >= kill_after:
        os.kill(os.getpid(), signal.SIGKILL)


harvest(vlm, toy("train", n=n), layers=[1, 3], tokens="image+answer", captions=True, batch_size=2, out=out,
        shard_mb=1e-6, progress=False, callback=die if kill_rank >= 0 else None)
distributed.cleanup()
