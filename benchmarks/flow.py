"""Where the image reaches the answer in the toy model (vlens.flow), and what reading attention costs.

Quality numbers (held-out toy images, `QUESTION`, teacher-forced exact answers "<colour> <shape></s>"):

* `clean_accuracy`, and `all_layers_accuracy`: with every image → last edge knocked out in every layer (`last`
  = the positions predicting an answer token), against `chance` (1 / 20 classes);
* `sweep`: per group pair (image/base/high-res/newline → last, image → question, question → last) and window of
  `window` consecutive layers, the accuracy and the relative change of the mean answer probability;
  `worst_windows`: per pair, the window that costs the most accuracy;
* `heads`: the heads whose last-position attention puts the most mass on image tokens (mean share), and for each
  the fraction of its image attention inside the shape's pixel box (tokens spread over their own boxes,
  `vlens.lens.box_mass`) against the box's share of the image area;
* `dla_top`: the heads with the largest direct logit attribution to the answer, with their ablation effect.

Timings (only with --time, on an idle machine; ratios measured side by side, interleaved, median of --reps):
* `pattern_overhead`: a forward reading every layer's full `pattern` (all queries) over a plain forward (goal
  <= 1.5x), and `last_row_overhead`: one reading only the last position's row per layer (`queries=[-1]`);
* `instrumented_plain_overhead`: a plain forward of the model once it has read patterns (nnsight has then
  source-instrumented its attention forwards, for good) over a plain forward of a fresh copy that never did; every
  ratio here (the sweep's too) is over the fresh copy's plain forward;
* `eager_recall_overhead`: the first design, kept here only to be measured against: every layer's attention block
  called a second time under eager attention (all queries), over a plain forward (`vlens.attention` says why the
  design changed);
* `sweep_cost`: a knockout sweep (a clean forward, then one forward per window of one pair) over one plain forward
  of the same batch, and over the per-window forwards alone (`knockout` in a loop).

Usage: python benchmarks/flow.py [--n 200] [--window 2] [--time --reps 5]; --tiny checks it runs (seconds).
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

import vlens
from vlens.flow import head_attribution, image_attention, knockout_sweep, last, patch_attention
from vlens.lens import box_mass
from vlens.toy.data import render

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _idle import OtherLoad  # noqa: E402

PAIRS = {
    "image -> last": ("image", last), "base -> last": ("base", last), "high-res -> last": ("highres", last),
    "newline -> last": ("newline", last), "image -> question": ("image", "prompt"),
    "question -> last": ("prompt", last),
}


def shape_box(meta: dict, size: int = 64) -> list[float]:
    """The pixel box of the toy shape: the bounding box of the pixels its noiseless drawing changes."""
    clean = np.asarray(render({**meta, "noise": 0.0}, size)).astype(int)
    ys, xs = np.nonzero(np.abs(clean - np.array(meta["bg_rgb"])).max(-1) > 30)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def batches(vlm, data, bs):
    for s in range(0, len(data), bs):
        samples = [data[i] for i in range(s, min(len(data), s + bs))]
        yield samples, vlm.prepare([vlens.toy.QUESTION] * len(samples), [x.image for x in samples],
                                   answers=[vlens.toy.CLASS_NAMES[x.label] for x in samples], eos=True)


def sweeps(vlm, data, window: int, bs: int) -> dict:
    every, windowed = [], []
    for _, b in batches(vlm, data, bs):
        every.append(knockout_sweep(vlm, b, {"image -> last": PAIRS["image -> last"]}, window=vlm.n_layers))
        windowed.append(knockout_sweep(vlm, b, PAIRS, window=window))
    cat = lambda xs, f: torch.cat([getattr(x, f) for x in xs], -1)  # noqa: E731
    w = windowed[0]
    acc, prob = cat(windowed, "correct").float().mean(-1), cat(windowed, "prob").mean(-1)
    clean_p = cat(windowed, "clean_prob").mean()
    change = (prob - clean_p) / clean_p * 100
    labels = [f"{a}-{b}" for a, b in w.windows]
    return {
        "clean_accuracy": float(cat(windowed, "clean_correct").float().mean()),
        "all_layers_accuracy": float(cat(every, "correct").float().mean()),
        "all_layers_prob_change_pct": float((cat(every, "prob").mean() - clean_p) / clean_p * 100),
        "chance": 1 / len(vlens.toy.CLASS_NAMES),
        "window": window,
        "sweep": {p: {"windows": labels, "accuracy": [round(float(a), 4) for a in acc[i]],
                      "prob_change_pct": [round(float(c), 2) for c in change[i]]} for i, p in enumerate(w.pairs)},
        "worst_windows": {p: labels[int(acc[i].argmin())] for i, p in enumerate(w.pairs)},
    }


def heads(vlm, data, bs: int, top: int = 5) -> dict:
    shares = []
    for _, b in batches(vlm, data, bs):
        shares.append(image_attention(vlm, b) * len(b))
    share = (sum(shares) / len(data))[..., -1]  # [layers, heads]: the whole image
    order = share.flatten().argsort(descending=True)[:top].tolist()
    out = []
    for flat in order:
        L, h = divmod(flat, vlm.n_heads)
        inside, area = [], []
        for samples, b in batches(vlm, data, bs):
            att = patch_attention(vlm, b, L, head=h)
            for r, s in enumerate(samples):
                box = torch.tensor([shape_box(s.meta), [0, 0, 64, 64]])
                mass = box_mass(b.layout, att, box, image=r)
                inside.append(float(mass[0] / mass[1].clamp_min(1e-12)))
                x0, y0, x1, y1 = box[0].tolist()
                area.append((x1 - x0) * (y1 - y0) / 64 ** 2)
        out.append({"layer": L, "head": h, "image_share": round(float(share[L, h]), 4),
                    "in_box_fraction": round(statistics.mean(inside), 4), "box_area_share": round(statistics.mean(area), 4)})
    return {"heads": out}


def dla(vlm, data, bs: int, top: int = 5) -> dict:
    d, a, n = 0, 0, 0
    for samples, b in batches(vlm, data, bs):
        r = head_attribution(vlm, b)
        d, a, n = d + r["dla"] * len(samples), a + r["ablation"] * len(samples), n + len(samples)
    d, a = d / n, a / n
    order = d.flatten().abs().argsort(descending=True)[:top].tolist()
    return {"dla_top": [{"layer": i // vlm.n_heads, "head": i % vlm.n_heads, "dla": round(float(d.flatten()[i]), 3),
                         "ablation_logprob_change": round(float(a.flatten()[i]), 3)} for i in order]}


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def eager_recall_pattern(attn):
    """The first design of `pattern.L`: call the attention block again under eager attention, on the inputs the
    forward gave it, and return its weights (all queries). Kept only so the benchmark measures it side by side."""
    args, kwargs = attn.inputs
    kwargs = dict(kwargs)  # the live call's own dict: never edit it
    hidden = args[0] if args else kwargs["hidden_states"]
    kwargs.pop("hidden_states", None)
    mask, n = kwargs.get("attention_mask"), hidden.shape[-2]
    if mask is None:
        mask = torch.ones(n, n, dtype=torch.bool, device=hidden.device).tril()[None, None]
    if mask.dtype == torch.bool:
        mask = torch.where(mask, 0.0, torch.finfo(hidden.dtype).min).to(hidden.dtype)
    kwargs |= {"attention_mask": mask, "past_key_values": None}
    config = attn._module.config
    before, config._attn_implementation = config._attn_implementation, "eager"
    try:
        return attn(hidden, *args[1:], **kwargs)[1]
    finally:
        config._attn_implementation = before


def timings(vlm, data, window: int, reps: int, bs: int) -> dict:
    _, b = next(batches(vlm, data, bs))
    fresh = vlens.load("toy")  # never reads a pattern: its attention forwards are not source-instrumented

    def plain(model=vlm):
        with torch.no_grad(), model.trace(b):
            model.read("logits").save()

    def patterns(rows=None):
        with torch.no_grad(), vlm.trace(b):
            for L in range(vlm.n_layers):
                vlm.read(f"pattern.{L}", queries=rows).save()

    def eager_recall():
        with torch.no_grad(), vlm.trace(b):
            for L in range(vlm.n_layers):
                eager_recall_pattern(vlm.envoy(f"pattern.{L}")).save()

    from vlens.attention import knockout

    def one_per_window():
        for a in range(vlm.n_layers - window + 1):
            with torch.no_grad(), vlm.trace(b):
                knockout(vlm, b, "image", last, layers=range(a, a + window))
                vlm.read("logits").save()

    with torch.no_grad(), vlm.trace(b):  # both designs read the same probabilities
        old = eager_recall_pattern(vlm.envoy(f"pattern.{vlm.n_layers - 1}")).save()
        new = vlm.read(f"pattern.{vlm.n_layers - 1}").save()
    real = ~b.layout.pad
    assert torch.allclose(old.transpose(1, 2)[real], new.transpose(1, 2)[real], atol=1e-5), "the designs disagree"
    sweep = lambda: knockout_sweep(vlm, b, {"image -> last": PAIRS["image -> last"]}, window=window)  # noqa: E731
    fns = {"plain": lambda: plain(fresh), "plain_instrumented": plain, "patterns": patterns, "last_rows": lambda: patterns([-1]), "eager_recall": eager_recall,
           "sweep": sweep,
           "one_per_window": one_per_window}
    for f in fns.values():
        f()  # warm up
    t = {k: [] for k in fns}
    load = OtherLoad()
    load.start()
    for _ in range(reps):  # interleaved, so load drifts hit every variant alike
        for k, f in fns.items():
            t[k].append(_median_time(f, 1))
    idle = load.stop()
    m = {k: statistics.median(v) for k, v in t.items()}
    return {"idle": idle, "reliable": load.reliable(idle),"pattern_overhead": round(m["patterns"] / m["plain"], 3),
            "last_row_overhead": round(m["last_rows"] / m["plain"], 3),
            "eager_recall_overhead": round(m["eager_recall"] / m["plain"], 3),
            "instrumented_plain_overhead": round(m["plain_instrumented"] / m["plain"], 3),
            "sweep_cost_vs_plain": round(m["sweep"] / m["plain"], 3),
            "sweep_cost_vs_one_per_window": round(m["sweep"] / m["one_per_window"], 3),
            "batch": len(b), "reps": reps, "seconds": {k: round(v, 4) for k, v in m.items()}}


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200, help="held-out images")
    ap.add_argument("--window", type=int, default=2)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--time", action="store_true", help="also time the overheads (idle machine only)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="a few images: check that it runs")
    args = ap.parse_args()
    n = 6 if args.tiny else args.n
    torch.manual_seed(0)
    vlm = vlens.load("toy")
    data = vlens.toy.toy_dataset("heldout", n=n, seed=1)
    out = {"model": "toy", "n": n, "threads": torch.get_num_threads(), "load_avg": os.getloadavg()[0]}
    out |= sweeps(vlm, data, args.window, args.batch)
    out |= heads(vlm, data, args.batch, top=2 if args.tiny else 5)
    out |= dla(vlm, data[:2] if args.tiny else data, args.batch)
    if args.time or args.tiny:
        out |= timings(vlm, data, args.window, 1 if args.tiny else args.reps, min(args.batch, n))
    return out


if __name__ == "__main__":
    print(json.dumps(main()))
