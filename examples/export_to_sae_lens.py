"""Train a small SAE on the toy model, export it, and load it back with plain SAE-Lens.

    python examples/export_to_sae_lens.py [--out toy-sae]
"""

import argparse
import subprocess
import sys
import tempfile

import torch

import vlens
import vlens.sae as vs

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--out", default="toy-sae")
p.add_argument("--layer", type=int, default=3)
a = p.parse_args()

vlm = vlens.load("toy")
store = vlens.harvest(vlm, vlens.data.toy("train", n=40), [a.layer], tokens="image+answer", captions=True,
                      out=tempfile.mkdtemp(), progress=False)
sae = vs.train(store, "paper", layer=a.layer, expansion=4, steps=200, progress=False)
path = vs.export(sae, a.out, model_name=vlm.name, hook_name=vlm.hook_name(f"resid_pre.{a.layer}"))
print("exported:", sorted(p.name for p in path.iterdir()))

# Plain SAE-Lens, in a fresh interpreter that never imports vlens:
code = f"""
from sae_lens import SAE
sae = SAE.load_from_disk({str(path)!r})
print(type(sae).__name__, sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.metadata.hook_name)
"""
print(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip())

from sae_lens import SAE  # noqa: E402

x = store.activations(a.layer)[:256].float()
print("identical encodings:", torch.equal(SAE.load_from_disk(str(path)).encode(x), sae.encode(x)))
