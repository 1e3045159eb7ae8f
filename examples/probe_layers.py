"""Compare linear-probe accuracy across layers of the toy model, and save the plotly figure.

    python examples/probe_layers.py [--n 200] [--out probes.html]
"""

import argparse

import vlens
from vlens import probes

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--n", type=int, default=200, help="training images")
p.add_argument("--out", default="probes.html")
a = p.parse_args()

vlm = vlens.load("toy")
data = vlens.data.toy("train", n=a.n)
# The paper's probe features: the mean over image tokens of resid_pre.L, for every layer in one pass.
store = vlens.harvest(vlm, data, list(range(vlm.n_layers)), tokens="image", pool="mean", progress=False)
sweep = probes.sweep(store)
for layer, acc in sweep.accuracy.items():
    print(f"layer {layer}: held-out accuracy {acc:.3f}")
print("decodable at ≥ 0.9 (best layer):", [vlens.toy.CLASS_NAMES[c] for c in probes.decodable_classes(sweep, 0.9)])
sweep.figure().write_html(a.out, include_plotlyjs=True)
print(f"wrote {a.out}")
