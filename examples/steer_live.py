"""Steer one image live: add k·(mean[target] − mean[source]) at a layer and print the answer for a range of k.

    python examples/steer_live.py [--src "red circle"] [--tgt "blue circle"] [--layer 3]
"""

import argparse

import torch

import vlens
from vlens import steering, toy

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--src", default="red circle")
p.add_argument("--tgt", default="red square")
p.add_argument("--layer", type=int, default=3)
p.add_argument("--ks", default="0,1,2,4,8,16")
a = p.parse_args()

vlm = vlens.load("toy")
names = toy.CLASS_NAMES
train = vlens.data.toy("train", n=200)

# Class means of the mean image-token residual at resid_pre.{layer}: one small harvest.
store = vlens.harvest(vlm, train, [a.layer], tokens="image", pool="mean", progress=False)
means = steering.class_means(*store.pooled(a.layer), n_classes=len(names))
v = means[names.index(a.tgt)] - means[names.index(a.src)]

image = next(s.image for s in vlens.data.toy("heldout", n=100) if names[s.label] == a.src)
batch = vlm.prepare([toy.QUESTION], [image])
for k in [float(x) for x in a.ks.split(",")]:
    # Plain nnsight inside: the vector is added to the image tokens during the prefill only.
    with vlm.generate(batch, max_new_tokens=4, do_sample=False) as tracer:
        vlm.resid_pre(a.layer)[batch.layout.image] += k * v
        ids = tracer.result.save()
    print(f"k={k:>5}: {vlm.decode(ids, batch)[0]!r}")
