"""Inspect one SAE latent: its top-activating toy images with a patch heatmap over each, and its modality score.

    python examples/inspect_latent.py [--layer 3] [--latent N] [--out latent.png]
"""

import argparse
import tempfile

import torch
from PIL import Image

import vlens
import vlens.sae as vs
import vlens.viz

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--layer", type=int, default=3)
p.add_argument("--latent", type=int, default=None, help="default: the most image-specific frequent latent")
p.add_argument("--out", default="latent.png")
a = p.parse_args()

vlm = vlens.load("toy")
data = vlens.data.toy("train", n=60)
store = vlens.harvest(vlm, data, [a.layer], tokens="image+answer", captions=True, out=tempfile.mkdtemp(),
                      prompt=vlens.toy.CAPTION_PROMPT, progress=False)
sae = vs.train(store, "topk", layer=a.layer, expansion=4, k=16, steps=300, progress=False)

stats = sae.modality
latent = a.latent
if latent is None:
    score = torch.nan_to_num(stats.score, nan=0.0) * (stats.frequency > 0.01)
    latent = int(score.argmax())
print(f"latent {latent}: modality score {float(stats.score[latent]):.2f} (1 = image only), "
      f"firing frequency {float(stats.frequency[latent]):.3f}")

# Top images: encode every image token of a held-out batch inside a trace, keep the max per image.
held = vlens.data.toy("heldout", n=40)
batch = vlm.prepare([vlens.toy.QUESTION] * len(held), [s.image for s in held])
with torch.no_grad(), vlm.trace(batch) as tracer:
    acts = sae.encode(vlm.resid_pre(a.layer))[..., latent].save()
    tracer.stop()
best = acts.masked_fill(~batch.layout.image, 0).amax(1).argsort(descending=True)[:4].tolist()
tiles = []
for i in best:
    span = batch.layout.images[i]
    g = span.geometry
    tiles.append(vlens.viz.heatmap_overlay(held[i].image, g.box, acts[i, span.start:span.end]))
    print(f"  image {i}: {vlens.toy.CLASS_NAMES[held[i].label]!r}, max activation {float(acts[i].max()):.2f}")
sheet = Image.new("RGB", (sum(t.width for t in tiles), max(t.height for t in tiles)), "white")
x = 0
for t in tiles:
    sheet.paste(t, (x, 0))
    x += t.width
sheet.save(a.out)
print(f"wrote {a.out}")
