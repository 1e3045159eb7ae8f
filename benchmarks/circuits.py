"""Attribution graphs (vlens.circuits) on the toy model: completeness, graph scores, pixels, faithfulness, cost.

Transcoders: `--transcoders DIR` loads SAE-Lens transcoders (one sub-folder per layer, `SAE.load_from_disk`);
`--clt DIR` a cross-layer transcoder (`vlens.circuits.CrossLayerTranscoder`), fitted here with `fit_clt` on
`--fit-images` training pictures and saved to DIR when DIR holds none (its explained variance and L0 per
layer on 50 held-out pictures go in `clt_fit`); otherwise quick ReLU transcoders are fitted here on training
toy pictures (SAE-Lens `Transcoder` objects, Adam on MSE + L1, `--fit-steps`), stated in the output as
`transcoders: "quick fit"`.

For `--n` held-out toy pictures, the colour word of `COLOUR_QUESTION` and the shape word of `SHAPE_QUESTION`:

* `completeness_rel_error`: the largest |Σ edges into the logit node − demeaned logit| / |demeaned logit|
  (with error nodes; the issue asks for < 1%); with `--max-features` below the number of active features,
  the left-out features' direct effects (`Graph.dropped_logit_effect`) are added to the edge sum;
* `kept_feature_share`: |kept features' direct effects on the logit| / (that + |the left-out features' summed direct effect|);
* `replacement_score` / `completeness_score`: circuit-tracer's `compute_graph_scores`, unpruned and pruned
  (node 0.8, edge 0.98), means;
* `patch_influence_in_box` vs `box_area_share`: the share of the image tokens' influence on the logit
  (circuit-tracer's node influence, each patch's value spread over its pixel box, `vlens.lens.box_mass`)
  that falls inside the shape's bounding box, against the box's share of the picture; `margin` = mean
  difference;
* faithfulness: the `--k` features with the largest graph-predicted effect (`feature_effects`), each ablated
  (set to 0) in the local replacement model and in the real model (`vlens.circuits.intervene`): Spearman rank
  correlation of predicted and measured changes, the fraction of features whose measured change is at least
  the predicted one (same sign, |measured| >= |predicted| - tol, tol = 10% of |predicted| + 0.01), the
  fraction with measured / predicted >= 0.9 (`at_least_90pct`), and the median and 10th percentile of
  measured / predicted (every feature's numbers in `singles`, with `radial_cos`: the cosine of its decoder
  row with the final norm's input at its position); the same with one part of the real model live at a
  time (`live_alone`: attention, norms, mlps); and the k features ablated together (`joint_*`);
* both norm conventions (`--norms`): circuit-tracer's frozen denominators (complete graphs) and the norms'
  Jacobian (first-order; completeness is not expected, the edge sum is reported as `edge_sum_share`);
* cost: seconds for one graph at two image sizes (32x32 = 36 image tokens, 64x64 = 88) with the numbers of
  nodes and active features, medians of `--reps` interleaved repeats; only meaningful on an idle machine
  (other processes' CPU and the load average recorded).

Usage: python benchmarks/circuits.py [--n 10] [--k 10] [--transcoders DIR | --clt DIR] [--norms frozen,jacobian]
[--tiny]
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from scipy.stats import spearmanr

import vlens
from vlens.circuits import LIVE, LocalReplacement, attribute, feature_effects, intervene
from vlens.lens import box_mass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _idle import OtherLoad  # noqa: E402

MAX_FEATURES = [None]
QUESTIONS = {"colour": vlens.toy.COLOUR_QUESTION, "shape": vlens.toy.SHAPE_QUESTION}


def harvest(vlm, images, layers):
    """mlp_in / mlp_out rows of every non-padding token, per layer, from both questions."""
    ins = {L: [] for L in layers}
    outs = {L: [] for L in layers}
    for q in QUESTIONS.values():
        b = vlm.prepare([q] * len(images), images)
        sites = [f"mlp_in.{L}" for L in layers] + [f"mlp_out.{L}" for L in layers]
        acts = vlens.activations.read_layers(vlm, b, sites, tokens="all", dtype=torch.float32)
        for L in layers:
            ins[L].append(acts[f"mlp_in.{L}"])
            outs[L].append(acts[f"mlp_out.{L}"])
    return {L: torch.cat(ins[L]) for L in layers}, {L: torch.cat(outs[L]) for L in layers}


def fit_transcoders(vlm, images, d_sae: int, steps: int, l1: float = 1e-3, seed: int = 0):
    """Quick SAE-Lens ReLU transcoders mlp_in.L -> mlp_out.L (Adam, MSE + l1 * sum |f| * ||W_dec||)."""
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.transcoder import Transcoder, TranscoderConfig

    torch.manual_seed(seed)
    layers = list(range(vlm.n_layers))
    X, Y = harvest(vlm, images, layers)
    out = []
    for L in layers:
        meta = SAEMetadata(hook_name=f"blocks.{L}.hook_mlp_in", hook_name_out=f"blocks.{L}.hook_mlp_out")
        tc = Transcoder(TranscoderConfig(d_in=vlm.d_model, d_sae=d_sae, d_out=vlm.d_model,
                                         apply_b_dec_to_input=False, metadata=meta))
        opt = torch.optim.Adam(tc.parameters(), lr=3e-3)
        x, y = X[L], Y[L]
        for _ in range(steps):
            i = torch.randint(0, len(x), (min(1024, len(x)),))
            f = tc.encode(x[i])
            loss = (tc.decode(f) - y[i]).pow(2).sum(-1).mean() + l1 * (f * tc.W_dec.norm(dim=1)).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        tc.eval()
        out.append(tc)
    return out


def clt_for(vlm, path, images, steps: int, l1: float):
    """The cross-layer transcoder saved at `path`, or one fitted on `images` and saved there; its fit on held-out rows."""
    from vlens.circuits import CrossLayerTranscoder, fit_clt

    layers = list(range(vlm.n_layers))
    if os.path.exists(os.path.join(path, "W_enc_0.safetensors")):
        clt = CrossLayerTranscoder.load(path)
    else:
        X, Y = harvest(vlm, images, layers)
        clt = fit_clt(torch.stack([X[L] for L in layers], 1), torch.stack([Y[L] for L in layers], 1), d_sae=256,
                      steps=steps, l1=l1)
        clt.save(path)
    X, Y = harvest(vlm, [s.image for s in vlens.toy.toy_dataset("heldout", n=50, seed=7)], layers)
    with torch.no_grad():
        acts = [clt.encode_layer(X[L], L) for L in layers]
        pred = clt.decode(acts)
    ev = [float(1 - (pred[L] - Y[L]).pow(2).sum() / (Y[L] - Y[L].mean(0)).pow(2).sum()) for L in layers]
    return clt, {"explained_variance": ev, "l0": [float((a > 0).float().sum(-1).mean()) for a in acts],
                 "d_sae": clt.d_sae, "l1": l1, "steps": steps}


def load_transcoders(path):
    from sae_lens import SAE

    import vlens.sae  # noqa: F401  registers `topk_transcoder` with SAE-Lens (SAE-Lens 6.54 has no TopK transcoder)

    dirs = sorted(os.path.join(path, d) for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    return [SAE.load_from_disk(d) for d in dirs]


def box_share(g, meta, size: int = 64):
    """Share of the image tokens' influence on the logit inside the shape's box, and the box's area share."""
    infl = g.influence()
    values = torch.zeros(g.layout.shape)
    pos = g.patch_positions()
    values[0, pos] = infl[[g.token_index(int(p)) for p in pos]]
    cx, cy, r = meta["cx"] * size, meta["cy"] * size, meta["r"] * size
    box = torch.tensor([[max(cx - r, 0), max(cy - r, 0), min(cx + r, size), min(cy + r, size)],
                        [0.0, 0.0, float(size), float(size)]])
    inside, total = box_mass(g.layout, values, box).tolist()
    area = float((box[0, 2] - box[0, 0]) * (box[0, 3] - box[0, 1])) / size ** 2
    return inside / max(total, 1e-12), area


def kept_share(g):
    kept = float(g.adjacency[g.logit_index(0), : g.n_features].abs().sum())
    return kept / max(kept + abs(float(g.dropped_logit_effect[0])), 1e-12)


MEASURES = ("replacement", "model", *LIVE)


def _row(r):
    return {"predicted": r.predicted, "replacement": r.replacement, "model": r.model, **r.live_alone}


def faithfulness(vlm, tcs, b, g, k: int):
    """The k features of largest predicted effect, each ablated alone, and all k together.

    `radial_cos`: the cosine between a feature's (first) decoder row and the final norm's input at its position
    (how much of its write lies along the residual stream that the norm divides out)."""
    top = [tuple(g.features[j].tolist()) for j in feature_effects(g).abs().argsort(descending=True)[:k].tolist()]
    rm = LocalReplacement(vlm, tcs)
    with torch.no_grad():
        resid = rm.run(b).norm_io[len(rm.norms) - 1][0][0].float()
    singles = []
    for L, p, f in top:
        w = rm.coders[L].W_dec[f, 0].detach().float()
        cos = float(w @ resid[p] / (w.norm() * resid[p].norm()).clamp_min(1e-12))
        singles.append({**_row(intervene(vlm, tcs, b, g, [(L, p, f)])), "radial_cos": cos})
    return singles, _row(intervene(vlm, tcs, b, g, top))


def at_least(pred: float, meas: float) -> bool:
    tol = 0.1 * abs(pred) + 0.01
    return (np.sign(pred) == np.sign(meas) or abs(pred) < tol) and abs(meas) >= abs(pred) - tol


def one_graph(vlm, tcs, img, word, kind, norms="frozen"):
    b = vlm.prepare([QUESTIONS[kind]], [img])
    t = time.perf_counter()
    g = attribute(vlm, tcs, b, target=word, images=[img], max_feature_nodes=MAX_FEATURES[0], norms=norms,
                  progress=False)
    return b, g, time.perf_counter() - t


def agreement(rows, name):
    """Spearman, at-least fraction and measured/predicted quantiles of one measure over rows."""
    pred = np.array([r["predicted"] for r in rows])
    meas = np.array([r[name] for r in rows])
    ratio = meas / np.where(np.abs(pred) > 1e-12, pred, np.nan)
    return {"spearman": float(spearmanr(pred, meas).statistic) if len(pred) > 2 else float("nan"),
            "at_least": float(np.mean([at_least(p, m) for p, m in zip(pred, meas)])),
            "at_least_90pct": float(np.mean(ratio >= 0.9)),
            "ratio_median": float(np.nanmedian(ratio)), "ratio_p10": float(np.nanpercentile(ratio, 10))}


def summarise(per, singles, joints):
    out = {"completeness_rel_error": float(max(p["completeness_rel_error"] for p in per))}
    for key in ("edge_sum_share", "replacement_score", "completeness_score", "replacement_score_pruned",
                "completeness_score_pruned", "patch_influence_in_box", "box_area_share", "kept_feature_share"):
        out[key] = float(np.mean([p[key] for p in per]))
    out["margin"] = out["patch_influence_in_box"] - out["box_area_share"]
    out["box_beats_area_fraction"] = float(np.mean([p["patch_influence_in_box"] > p["box_area_share"] for p in per]))
    out["mean_abs_predicted"] = float(np.mean([abs(r["predicted"]) for r in singles]))
    out["faithfulness"] = {name: agreement(singles, name) for name in MEASURES}
    out["median_abs_radial_cos"] = float(np.median([abs(r["radial_cos"]) for r in singles]))
    cols = ("predicted", *MEASURES, "radial_cos")
    out["singles"] = {"columns": list(cols), "rows": [[round(r[c], 6) for c in cols] for r in singles]}
    out["joint"] = {"mean_predicted": float(np.mean([r["predicted"] for r in joints])),
                    **{f"mean_{name}": float(np.mean([r[name] for r in joints])) for name in MEASURES},
                    "model": agreement(joints, "model")}
    return out


def measure(vlm, tcs, data, args, norms):
    """Every graph of one norm convention: per-graph numbers, single and joint ablations, graph seconds."""
    per, singles, joints, times = [], [], [], []
    for s in data:
        for kind in ("colour", "shape"):
            b, g, secs = one_graph(vlm, tcs, s.image, s.meta[kind], kind, norms)
            times.append(secs)
            pruned = g.prune(0.8, 0.98)
            logit = float(g.logit_values[0])
            inside, area = box_share(g, s.meta)
            edges = float(g.adjacency[g.logit_index(0)].sum() + g.dropped_logit_effect[0])
            per.append({"completeness_rel_error": abs(edges - logit) / max(abs(logit), 1e-9),
                        "edge_sum_share": edges / logit,
                        **dict(zip(("replacement_score", "completeness_score"), g.scores())),
                        **dict(zip(("replacement_score_pruned", "completeness_score_pruned"), g.scores(pruned))),
                        "patch_influence_in_box": inside, "box_area_share": area,
                        "kept_feature_share": kept_share(g)})
            if kind == "colour" or args.tiny:
                one, joint = faithfulness(vlm, tcs, b, g, args.k)
                singles += one
                joints.append(joint)
    return {**summarise(per, singles, joints), "n_graphs": len(per),
            "mean_seconds_per_graph": float(np.mean(times))}


def cost(vlm, tcs, sample, reps: int):
    """One graph's seconds at 32x32 and 64x64 (median of interleaved repeats), with its sizes."""
    sizes = {"32x32": sample.image.resize((32, 32)), "64x64": sample.image}
    secs = {k: [] for k in sizes}
    out = {}
    for _ in range(reps):
        for key, img in sizes.items():
            _, g, t = one_graph(vlm, tcs, img, sample.meta["colour"], "colour")
            secs[key].append(t)
            out[key] = {"image_tokens": int(g.patch_positions().numel()), "positions": g.n_pos,
                        "feature_nodes": g.n_features, "nodes": int(g.adjacency.shape[0])}
    for key in sizes:
        out[key]["seconds"] = float(np.median(secs[key]))
        out[key]["seconds_all"] = secs[key]
    out["ratio_64_over_32"] = out["64x64"]["seconds"] / out["32x32"]["seconds"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--d-sae", type=int, default=256)
    ap.add_argument("--fit-steps", type=int, default=1500)
    ap.add_argument("--fit-images", type=int, default=200)
    ap.add_argument("--transcoders", default=None)
    ap.add_argument("--clt", default=None, help="a cross-layer transcoder's folder (fitted and saved there if empty)")
    ap.add_argument("--clt-steps", type=int, default=3000)
    ap.add_argument("--clt-l1", type=float, default=3e-2)
    ap.add_argument("--max-features", type=int, default=1500, help="feature nodes per graph (circuit-tracer's "
                    "max_feature_nodes; the dropped features' direct effects are added back in the completeness check)")
    ap.add_argument("--norms", default="frozen,jacobian", help="norm conventions to measure, comma-separated")
    ap.add_argument("--reps", type=int, default=5, help="interleaved repeats of the cost graphs")
    ap.add_argument("--tiny", action="store_true", help="smoke mode: 1 picture, 2 features, a short fit")
    args = ap.parse_args()
    if args.tiny:
        args.n, args.k, args.fit_steps, args.fit_images, args.d_sae, args.max_features = 1, 3, 30, 8, 32, 64
        args.reps, args.clt_steps = 1, 30
    MAX_FEATURES[0] = args.max_features
    vlm = vlens.load("toy")
    extra = {}
    if args.transcoders:
        tcs, how = load_transcoders(args.transcoders), args.transcoders
    elif args.clt:
        train = vlens.toy.toy_dataset("train", n=args.fit_images, seed=1)
        tcs, extra["clt_fit"] = clt_for(vlm, args.clt, [s.image for s in train], args.clt_steps, args.clt_l1)
        how = f"cross-layer transcoder ({args.clt})"
    else:
        train = vlens.toy.toy_dataset("train", n=args.fit_images, seed=1)
        tcs, how = fit_transcoders(vlm, [s.image for s in train], args.d_sae, args.fit_steps), "quick fit"
    data = vlens.toy.toy_dataset("heldout", n=args.n)
    result = {"transcoders": how, **extra, "k": args.k, "max_feature_nodes": args.max_features,
              **{norms: measure(vlm, tcs, data, args, norms) for norms in args.norms.split(",")}}
    load = OtherLoad()
    load.start()
    result["cost"] = cost(vlm, tcs, data[0], args.reps)
    idle = load.stop()
    result.update({"idle": idle, "reliable": load.reliable(idle), "tiny": bool(args.tiny)})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
