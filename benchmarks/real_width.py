"""Benchmark the real llava-v1.6-mistral architecture at full width (d_model 4096, CLIP-L 1024), reduced depth.

Random weights, the real tokenizer and processor (offline: `vlens.load(..., weights="random")`), 2 LM layers and
2 vision layers by default. Measured side by side in one run, repetitions interleaved, medians reported:

- `harvest_overhead_ratio`: `vlens.harvest` of the last LM layer's `resid_post` over the image tokens, stored in
  bf16 (every layer runs; only the LM head is skipped), divided by a bare HF forward of the same batch through the
  same modules (`model.model(**inputs)`: vision tower, projector and LM, no head, no nnsight). Both timed regions
  include `prepare` (tokenising and image processing); the harvest also writes its shards (goal: <= 1.05).
- `harvest_ratio`: the harvest of every layer's `resid_pre` (it stops after the deepest, before the last layer's
  body and the head) divided by the full bare forward `model(**inputs)` with the head: what a user saves.
- `tokens_per_s`: image tokens stored per second by that harvest.
- `bytes_per_token_per_layer`: shard bytes on disk / (stored tokens × layers), next to `2 * d_model` (bf16).
- `steered_generate_ratio`: `vlens.steered_generate` (a vector added at every image token during the prefill) ÷
  plain nnsight-free `model.generate` of the same batch and number of new tokens, greedy (goal: <= 1.15).
- `peak_rss_mb`: peak resident memory of this process.

The machine must be idle: the JSON records the load average before and after and the CPU other processes
used while it ran (`other_cores`, `benchmarks/_idle.py`); `reliable` is false when they used more than 0.3 of
a core (the ratios are then printed but not results). The load average is not judged: it counts this
benchmark's own threads. `--device cuda` runs the same on a GPU.

Usage: `python benchmarks/real_width.py [--layers 2 --vision-layers 2 --images 2 --reps 3 --device cpu]`.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _idle import OtherLoad  # noqa: E402

import vlens  # noqa: E402
from vlens.data import Sample  # noqa: E402
from vlens.families.checkpoints import LLAVA_NEXT_MISTRAL  # noqa: E402
from vlens.tokens import position_ids  # noqa: E402
from vlens.prompts import QUESTION  # noqa: E402


def images(n: int, seed: int = 0):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(336, 336, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(n)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vision-layers", type=int, default=2)
    ap.add_argument("--images", type=int, default=2, help="images per batch (one batch per repeat)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    # Model dtype. float32 on CPU: bf16 matmuls on a CPU without native bf16 units run orders of magnitude slower
    # (measured here: a 1190×4096 @ 4096×4096 product at 49 GFLOPS in fp32 did not finish in minutes in bf16).
    # The harvest stores bf16 either way.
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    load_before = os.getloadavg()
    other = OtherLoad()
    other.start()
    dtype = getattr(torch, a.dtype)
    vlm = vlens.load(LLAVA_NEXT_MISTRAL, weights="random", n_layers=a.layers, vision_layers=a.vision_layers,
                     device=a.device, dtype=dtype)
    ims = images(a.images)
    data = [Sample(im, label=i % 2, id=i) for i, im in enumerate(ims)]
    layers = list(range(vlm.n_layers))

    def forward(module: torch.nn.Module) -> None:
        b = vlm.prepare([QUESTION] * len(ims), ims)
        inputs = {k: v.to(a.device) for k, v in b.inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        inputs["position_ids"] = position_ids(inputs["attention_mask"])
        with torch.inference_mode():
            module(**inputs)
        sync(a.device)

    stores: list[Path] = []

    def harvest(sites: list) -> None:
        out = Path(tempfile.mkdtemp(prefix="vlens-bench-"))
        vlens.harvest(vlm, data, sites, dtype=torch.bfloat16, batch_size=len(data), out=out, progress=False)
        sync(a.device)
        stores.append(out)

    gb = vlm.prepare([QUESTION] * len(ims), ims)
    gb.inputs["pixel_values"] = gb.inputs["pixel_values"].to(dtype)
    v = torch.randn(vlm.d_model)
    kw = dict(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False)

    def plain_generate() -> None:
        inputs = {k: val.to(a.device) for k, val in gb.inputs.items()}
        with torch.no_grad():
            vlm._module.generate(**inputs, **kw, temperature=None, top_p=None, top_k=None)
        sync(a.device)

    def steered() -> None:
        vlens.steered_generate(vlm, gb.to(a.device), v, layer=vlm.n_layers - 1, k=2.0, **kw)
        sync(a.device)

    last = f"resid_post.{vlm.n_layers - 1}"
    cases = {
        "bare": lambda: forward(vlm._module), "harvest": lambda: harvest(layers),
        "bare_no_head": lambda: forward(vlm._module.model), "harvest_full": lambda: harvest([last]),
        "generate": plain_generate, "steered": steered,
    }
    for fn in cases.values():  # warm-up: first-call costs (allocators, nnsight compilation) out of the timings
        fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(a.reps):  # interleaved repeats
        for name, fn in cases.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    every = stores[-2]  # the last all-layers harvest (cases alternate: every layer, then the last layer)
    store = vlens.ActivationStore(every)
    disk = sum(p.stat().st_size for p in every.glob("shard-*.safetensors"))
    n_tok = len(store)
    load_after = os.getloadavg()
    # Idle: other processes' CPU only (this process's own threads raise the load average to about `threads`).
    idle = other.stop()
    busy = a.device == "cpu" and not other.reliable(idle)
    result = {
        "benchmark": "real_width",
        "model": LLAVA_NEXT_MISTRAL + " (random weights)",
        "d_model": vlm.d_model, "vision_d_model": int(vlm.config.vision_config.hidden_size),
        "lm_layers": vlm.n_layers, "vision_layers": vlm.n_vision_layers, "dtype": a.dtype, "device": a.device,
        "images_per_batch": a.images, "image_tokens_per_image": int(gb.layout.image[0].sum()), "reps": a.reps,
        "seconds": {k: round(v, 3) for k, v in med.items()},
        "spread": {k: [round(min(v), 3), round(max(v), 3)] for k, v in times.items()},
        "harvest_overhead_ratio": round(med["harvest_full"] / med["bare_no_head"], 3),
        "harvest_ratio": round(med["harvest"] / med["bare"], 3),
        "tokens_per_s": round(n_tok / med["harvest"], 1),
        "bytes_per_token_per_layer": round(disk / max(n_tok * len(layers), 1), 1),
        "bf16_bytes_per_token_per_layer": 2 * vlm.d_model,
        "steered_generate_ratio": round(med["steered"] / med["generate"], 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "threads": a.threads,
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in load_after],
        "other_cores": idle["other_cores"], "reliable": not busy,
    }
    for k, v in med.items():
        print(f"{k:9} median {v:.3f} s over {a.reps} interleaved repeats", file=sys.stderr)
    if busy:
        print("the machine was busy (other load than this benchmark): these ratios are not results", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
