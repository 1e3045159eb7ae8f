"""Faithfulness of vlens.attribution, and where the logit lens reads the toy's concepts, on the toy model.

These are quality numbers, not timings (the machine's load average is recorded anyway). For held-out
toy images, each drawn three ways with the same pixel noise (as is; with the other shape of its pair,
circle/square and triangle/cross; without its shape):

* `ig_completeness_rel_error`: integrated gradients at resid_pre.0 (the image tokens as the LM receives
  them) of the colour word's logit, from the shape-less picture's activations, 128 Gauss-Legendre nodes:
  the largest |Σ attributions − (f(input) − f(baseline))| / |f(input) − f(baseline)| over the images;
* `attribution_patching_spearman`: at the middle layer (resid_pre.3), the rank correlation over the 80
  patch tokens of attribution patching and true activation patching from the other-shape picture, of the
  shape word's logit; the mean over the images (also the median and minimum);
* `occlusion_top_vs_random_ratio`: the drop of the colour word's logit when the 16 high-res patches with the
  most IG mass are filled with the picture's median colour (its background), over the mean drop for 8
  sets of 16 random patches, summed over the images (pooled);
* the logit lens (`lens_*`): restricted to the five colour words (chance 0.2), the fraction of patches
  covering the shape (>= half inside) and of background patches (fully outside) whose most probable colour
  is the class's colour, per site (resid_pre.0, resid_post.0..5), and the first site where it reaches 0.3;
  the same for the four shape words (chance 0.25, threshold 0.375).

Usage: python benchmarks/attribution.py [--n 20] [--lens-n 100]
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from scipy.stats import spearmanr

import vlens
from vlens.attribution import activation_patching, attribution_patching, integrated_gradients, occlusion_check, token_target
from vlens.lens import first_layer, logit_lens, region_tokens, token_ids, word_rate
from vlens.toy.data import COLOURS, SHAPES, render

Q = vlens.toy.QUESTION
OTHER_SHAPE = {"circle": "square", "square": "circle", "triangle": "cross", "cross": "triangle"}


def pictures(data, i):
    """Sample i as is, with the other shape of its pair, and without its shape (same noise); its class name."""
    m = data[i].meta
    draw = lambda **kw: render({**m, **kw}, 64, data.rng(i))  # noqa: E731
    return draw(), draw(shape=OTHER_SHAPE[m["shape"]]), draw(r=0.0), vlens.toy.CLASS_NAMES[data[i].label]


def shape_region(meta: dict) -> torch.Tensor:
    """Pixels of the toy shape: the noiseless drawing differs from its background."""
    clean = np.asarray(render({**meta, "noise": 0.0}, 64)).astype(int)
    return torch.from_numpy(np.abs(clean - np.array(meta["bg_rgb"])).max(-1) > 30)


def faithfulness(vlm, data, n: int) -> dict:
    ig_err, rhos, tops, randoms = [], [], [], []
    for i in range(n):
        clean, other, blank, name = pictures(data, i)
        b, bo = vlm.prepare([Q], [clean], answers=[name]), vlm.prepare([Q], [other], answers=[name])
        colour = token_target(data[i].meta["colour"], position=-3)
        shape = token_target(data[i].meta["shape"], position=-2)
        ig = integrated_gradients(vlm, b, colour, site=0, baseline=vlm.prepare([Q], [blank], answers=[name]),
                                  steps=128, batch_size=65)
        ig_err.append(ig.completeness_error)
        atp = attribution_patching(vlm, b, bo, shape, site=3, tokens="base+highres")
        true = activation_patching(vlm, b, bo, shape, site=3, tokens="base+highres", batch_size=80)
        rhos.append(float(spearmanr(atp.per_token(), true.per_token()).statistic))
        occ = occlusion_check(vlm, Q, clean, colour, ig, k=16, answer=name, fill="median")
        tops.append(occ["top"])
        randoms.append(occ["random"])
    return {
        "ig_completeness_rel_error": max(ig_err),
        "attribution_patching_spearman": float(np.mean(rhos)),
        "attribution_patching_spearman_median": float(np.median(rhos)),
        "attribution_patching_spearman_min": float(np.min(rhos)),
        "occlusion_top_vs_random_ratio": sum(tops) / sum(randoms),
        "occlusion_drop_top_mean": float(np.mean(tops)),
        "occlusion_drop_random_mean": float(np.mean(randoms)),
    }


def lens_onset(vlm, data, n: int) -> dict:
    samples = [data[i] for i in range(n)]
    b = vlm.prepare([Q] * n, [s.image for s in samples])
    sites = ["resid_pre.0"] + [f"resid_post.{L}" for L in range(vlm.n_layers)]
    groups = {"colour": (list(COLOURS), 0.3), "shape": (list(SHAPES), 0.375)}
    ids = {g: token_ids(vlm, words) for g, (words, _) in groups.items()}
    lens = logit_lens(vlm, b, sites, k=1, track=ids["colour"] + ids["shape"])
    out: dict = {"lens_sites": sites}
    for g, (words, threshold) in groups.items():
        on_shape, on_bg = [], []
        for i, s in enumerate(samples):
            region = shape_region(s.meta)
            word = token_ids(vlm, [s.meta[g]])
            on_shape.append(word_rate(lens, word, region_tokens(b.layout, region, i, 0.5), among=ids[g]))
            on_bg.append(word_rate(lens, word, region_tokens(b.layout, ~region, i, 1.0), among=ids[g]))
        for where, rates in (("shape_patches", on_shape), ("background_patches", on_bg)):
            rate = torch.stack(rates).mean(0)
            out[f"lens_{g}_{where}"] = [round(float(r), 3) for r in rate]
            first = first_layer(rate, threshold)
            out[f"lens_{g}_{where}_first_site"] = None if first is None else sites[first]
    return out


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20, help="held-out images for the faithfulness checks")
    ap.add_argument("--lens-n", type=int, default=100, help="held-out images for the logit-lens onset")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    vlm = vlens.load("toy")
    data = vlens.toy.toy_dataset("heldout", n=max(args.n, args.lens_n))
    out = {"model": "toy", "n_images": args.n, **faithfulness(vlm, data, args.n), "lens_n_images": args.lens_n,
           **lens_onset(vlm, data, args.lens_n)}
    out.update(seconds=round(time.time() - t0, 1), load_average=[round(x, 2) for x in os.getloadavg()],
               threads=torch.get_num_threads())
    return out


if __name__ == "__main__":
    print(json.dumps(main()))
