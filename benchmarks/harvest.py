"""Benchmark `vlens.harvest`: hook overhead, early stop, and memory that does not grow with the data.

Measured side by side in one run, repetitions interleaved, medians reported:

- `overhead_ratio`: harvest of 6 layers (`resid_pre`, the deepest being the last layer) ÷ a bare HF
  forward of the same batches (`model(**inputs)`, no hooks, no nnsight), both including `prepare`.
  Harvest stops before the last layer and skips the LM head, so it also reports
  `overhead_ratio_full_depth`: the same 6 layers read at `resid_post` (every layer runs; only the head is skipped).
- `early_stop_ratio`: harvest of the first quarter of the layers ÷ harvest of all layers
  (`lm_fraction_run` says how many of the LM layers the short harvest runs, for comparison).
- `peak_rss_mb_small` / `peak_rss_mb_large`: peak RSS of a harvest of N and 4N images,
  each in a fresh subprocess (streamed to small shards: they should be equal within noise).

Usage: `python benchmarks/harvest.py` (about 2-3 minutes on 2 cores). The last line is one JSON object.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

LARGE = dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, vision_d_model=128, image_size=64, patch_size=8)
LARGE_IMAGE = 128  # px: a 2×2-tile canvas -> 64 base + 16 rows × (16 + 1) = 336 image tokens
N_IMAGES = int(os.environ.get("VLENS_BENCH_N", 4))
BATCH = 4
REPS = int(os.environ.get("VLENS_BENCH_REPS", 3))


def images(n: int, size: int, seed: int = 0):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(n)]


def samples(n: int, size: int):
    from vlens.data import Sample

    return [Sample(im, label=i % 4, id=i) for i, im in enumerate(images(n, size))]


def large_model():
    import vlens

    return vlens.tiny(**LARGE)


def small_model():
    import vlens

    try:
        return vlens.load("toy"), "toy"
    except Exception:  # the toy checkpoint not built yet
        return vlens.tiny(), "tiny"


def bare_forward(vlm, data, batch_size):
    from vlens.tokens import position_ids
    from vlens.prompts import QUESTION

    for b0 in range(0, len(data), batch_size):
        chunk = data[b0 : b0 + batch_size]
        batch = vlm.prepare([QUESTION] * len(chunk), [s.image for s in chunk])
        inputs = dict(batch.inputs, position_ids=position_ids(batch.inputs["attention_mask"]))
        with torch.inference_mode():
            vlm.hf_model(**inputs)


def run_harvest(vlm, data, layers, site="resid_pre", **kw):
    from vlens.activations import harvest

    with tempfile.TemporaryDirectory() as d:
        harvest(vlm, data, layers=[f"{site}.{L}" for L in layers], batch_size=BATCH, out=d, progress=False, **kw)


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): CPU time is less sensitive to other load on the machine."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def compare(vlm, data) -> dict:
    n = vlm.n_layers
    six = list(range(n - 6, n)) if n >= 6 else list(range(n))
    quarter = list(range(max(1, n // 4)))
    cases = {
        "bare": lambda: bare_forward(vlm, data, BATCH),
        "harvest6": lambda: run_harvest(vlm, data, six),
        "harvest6_post": lambda: run_harvest(vlm, data, six, site="resid_post"),
        "quarter": lambda: run_harvest(vlm, data, quarter),
        "all": lambda: run_harvest(vlm, data, list(range(n))),
    }
    for f in cases.values():  # warm up
        f()
    times: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    names = list(cases)
    for r in range(REPS):
        for k in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order each repetition
            w, c = timed(cases[k])
            times[k].append(w)
            cpu[k].append(c)
    med = {k: statistics.median(v) for k, v in times.items()}
    mcpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {
        "overhead_ratio_cpu": mcpu["harvest6"] / mcpu["bare"],
        "overhead_ratio_full_depth_cpu": mcpu["harvest6_post"] / mcpu["bare"],
        "early_stop_ratio_cpu": mcpu["quarter"] / mcpu["all"],
        "overhead_ratio": med["harvest6"] / med["bare"],
        "overhead_ratio_full_depth": med["harvest6_post"] / med["bare"],
        "early_stop_ratio": med["quarter"] / med["all"],
        "lm_fraction_run": (quarter[-1]) / max(n - 1, 1),  # resid_pre.q needs layers 0..q-1; all-layers needs 0..n-2
        "layers_6": six,
        "layers_quarter": quarter,
        "seconds": {k: round(v, 4) for k, v in med.items()},
    }


RSS_CHILD = r"""
import os, resource, sys, tempfile, json
sys.path.insert(0, {here!r})
import torch
torch.set_num_threads({threads})
import harvest as bench
from vlens.activations import harvest
vlm = bench.large_model()
data = bench.samples({n}, {size})
with tempfile.TemporaryDirectory() as d:
    store = harvest(vlm, data, layers=[1, 3, 5, 7], tokens="all", batch_size={batch}, out=d, progress=False, shard_mb=4)
    rows = len(store)
print(json.dumps({{"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rows": rows}}))
"""


def peak_rss(n: int) -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    code = RSS_CHILD.format(here=here, threads=torch.get_num_threads(), n=n, size=LARGE_IMAGE // 2, batch=BATCH)
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(code)
    try:
        out = subprocess.run([sys.executable, f.name], capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> dict:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t0 = time.perf_counter()
    small, small_name = small_model()
    small_size = 64 if small_name == "toy" else 32
    res_small = compare(small, samples(N_IMAGES, small_size))
    print(f"{small_name} model: {json.dumps(res_small)}", flush=True)

    large = large_model()
    data = samples(N_IMAGES, LARGE_IMAGE)
    n_tok = int(large.prepare(["<image>"], [data[0].image]).layout.image.sum())
    res_large = compare(large, data)
    print(f"large tiny model ({LARGE}, {n_tok} image tokens per image): {json.dumps(res_large)}", flush=True)

    rss_small = peak_rss(N_IMAGES)
    rss_large = peak_rss(4 * N_IMAGES)
    print(f"peak RSS: {N_IMAGES} images {rss_small}, {4 * N_IMAGES} images {rss_large}", flush=True)
    result = {
        "overhead_ratio": round(res_large["overhead_ratio"], 4),
        "overhead_ratio_full_depth": round(res_large["overhead_ratio_full_depth"], 4),
        "early_stop_ratio": round(res_large["early_stop_ratio"], 4),
        "lm_fraction_run": round(res_large["lm_fraction_run"], 4),
        "overhead_ratio_cpu": round(res_large["overhead_ratio_cpu"], 4),
        "overhead_ratio_full_depth_cpu": round(res_large["overhead_ratio_full_depth_cpu"], 4),
        "early_stop_ratio_cpu": round(res_large["early_stop_ratio_cpu"], 4),
        "overhead_ratio_small": round(res_small["overhead_ratio"], 4),
        "early_stop_ratio_small": round(res_small["early_stop_ratio"], 4),
        "small_model": small_name,
        "peak_rss_mb_small": round(rss_small["peak_rss_mb"], 1),
        "peak_rss_mb_large": round(rss_large["peak_rss_mb"], 1),
        "rss_rows_small": rss_small["rows"],
        "rss_rows_large": rss_large["rows"],
        "image_tokens_per_image": n_tok,
        "n_images": N_IMAGES,
        "reps": REPS,
        "threads": torch.get_num_threads(),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    return result


if __name__ == "__main__":
    print(json.dumps(main()))
