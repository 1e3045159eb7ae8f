"""Benchmark `vlens.sae.train_many`: N SAEs from one streaming pass vs their parts alone, and vs harvest-then-train.

Measured in one run, repetitions interleaved, medians reported:

- `multi_sae_ratio`: wall time of `train_many` training N SAEs from one pass ÷ (the same
  forward passes alone, through the same stream code, + each SAE's training steps timed
  alone by `vlens.sae.train` on the same number of in-memory rows). The issue's goal: ≤ 1.15.
- `harvest_then_train_ratio`: the same `train_many` wall time ÷ (harvest the same tokens to a
  store on disk with `vlens.harvest`, then `vlens.sae.train(store, layer=L)` for each SAE).
  Below 1: one pass is faster than harvesting first.

The JSON also records the load average before and after, the CPU other processes used while
it ran (`other_cores`, `benchmarks/_idle.py`), the thread count and `reliable` (false when other
processes used more than 0.3 of a core: ratios measured on a busy machine swing). Modality statistics are off (`stats_tokens=0`) on every side.

Usage: `python benchmarks/multi_sae.py` (a d_model-512, 8-layer tiny LLaVA-Next, 4 SAEs of 2048 latents,
40 steps of 512 rows; a few minutes on 2 idle cores), `--quick` (the default tiny model, 2 SAEs, seconds), `--threads N`,
`--reps N`, `--device cuda`. The last line printed is one JSON object; `measure(...)` returns it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _idle import OtherLoad  # noqa: E402

LARGE = dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, vision_d_model=128, image_size=64, patch_size=8)


def samples(n: int, size: int):
    from PIL import Image

    from vlens.data import Sample

    g = torch.Generator().manual_seed(0)
    return [Sample(Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()), id=i)
            for i in range(n)]


def measure(quick: bool = False, threads: int | None = None, reps: int | None = None, device: str = "cpu") -> dict:
    """Run the benchmark and return its JSON object (`benchmarks/sae_train.py` can call this for `multi_sae_ratio`)."""
    args = argparse.Namespace(quick=quick, threads=threads, reps=reps, device=device)
    if args.threads:
        torch.set_num_threads(args.threads)
    import vlens
    import vlens.sae as vs
    from vlens.prompts import QUESTION
    from vlens.sae.training.multi import _order, _Stream, _plan

    if args.quick:
        vlm, layers, n_images, size, steps, bs, d_sae, reps = vlens.tiny(), [1, 2], 8, 32, 10, 64, 256, 1
    else:
        vlm, layers, n_images, size, steps, bs, d_sae, reps = vlens.tiny(**LARGE), [1, 3, 5, 7], 16, 128, 40, 512, 2048, 3
    reps = args.reps or reps
    data = samples(n_images, size)
    specs = {L: {"preset": "topk", "k": 32} if i % 2 else "paper" for i, L in enumerate(layers)}
    common = dict(steps=steps, batch_size=bs, d_sae=d_sae, lr=1e-3, n_norm_batches=4, stats_tokens=0, progress=False,
                  device=args.device)
    fb = 4

    load = OtherLoad()
    load.start()

    def multi() -> tuple[float, int]:
        t = time.perf_counter()
        saes = vs.train_many(vlm, data, specs, forward_batch_size=fb, **common)
        return time.perf_counter() - t, next(iter(saes.values())).cfg.metadata.vlens_training["stream"]["forwards"]

    _, forwards = multi()  # warm-up, and how many forwards a run takes
    stream = _Stream(vlm, data, _plan(vlm, data, "image", QUESTION, True, False, False, "", fb, None))
    sites = _order(vlm, {vlm.site(L) for L in layers})

    def forward_alone() -> tuple[float, dict]:
        rows: dict = {s: [] for s in sites}
        t = time.perf_counter()
        for c in range(forwards):
            acts, _ = stream.read(c, sites)
            for s in sites:
                rows[s].append(acts[s])
        return time.perf_counter() - t, {s: torch.cat(v) for s, v in rows.items()}

    def steps_alone(rows: dict) -> float:
        total = 0.0
        for L, spec in specs.items():
            preset, kw = (spec, {}) if isinstance(spec, str) else (spec["preset"], {"k": spec["k"]})
            x = rows[vlm.site(L)].float()
            t = time.perf_counter()
            vs.train(x, preset, **kw, **common)
            total += time.perf_counter() - t
        return total

    def harvest_then_train() -> float:
        n_samples = min(forwards * fb, 10**9)
        rep = [data[i % len(data)] for i in range(n_samples)]
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            store = vlens.harvest(vlm, rep, layers, out=out, batch_size=fb, progress=False)
            for L, spec in specs.items():
                preset, kw = (spec, {}) if isinstance(spec, str) else (spec["preset"], {"k": spec["k"]})
                vs.train(store, preset, layer=L, **kw, **common)
            return time.perf_counter() - t

    t_multi, t_fwd, t_steps, t_h = [], [], [], []
    for _ in range(reps):
        t_multi.append(multi()[0])
        tf, rows = forward_alone()
        t_fwd.append(tf)
        t_steps.append(steps_alone(rows))
        t_h.append(harvest_then_train())
    idle = load.stop()
    med = statistics.median
    alone = [f + s for f, s in zip(t_fwd, t_steps)]
    result = {
        "benchmark": "multi_sae", "quick": args.quick, "device": args.device, "d_model": int(vlm.d_model),
        "n_saes": len(specs), "sites": [vlm.site(L).name for L in layers], "steps": steps, "batch_size": bs,
        "d_sae": d_sae, "forwards": forwards, "reps": reps,
        "t_multi_s": round(med(t_multi), 4), "t_forward_s": round(med(t_fwd), 4), "t_steps_s": round(med(t_steps), 4),
        "t_harvest_then_train_s": round(med(t_h), 4),
        "multi_sae_ratio": round(med(m / a for m, a in zip(t_multi, alone)), 4),
        "multi_sae_ratio_spread": [round(min(m / a for m, a in zip(t_multi, alone)), 4),
                                   round(max(m / a for m, a in zip(t_multi, alone)), 4)],
        "harvest_then_train_ratio": round(med(m / h for m, h in zip(t_multi, t_h)), 4),
        **idle, "threads": torch.get_num_threads(),
        # other processes' CPU, not the load average: this benchmark's own threads raise that
        "reliable": load.reliable(idle),
    }
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 SAEs, few steps (a smoke run)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    print(json.dumps(measure(args.quick, args.threads, args.reps, args.device)))


if __name__ == "__main__":
    sys.exit(main())
