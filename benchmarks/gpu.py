"""vlens at 7B size on one GPU in minutes: every stage timed, with its peak memory, in one JSON line.

Stages (each in its own try: a failing stage records its error and the next ones still run):

1. `build`: llava-v1.6-mistral-7b at full size, random weights, bf16, built on the device
   (`vlens.load(..., weights="random", device=..., dtype=...)`; no CPU copy: `rss_growth_mb`).
2. `trace`: `read_layers` at 4 layers for one batch of mixed real sizes (336², 672², 640×480),
   left-padded, checked against each image run alone (`max_rel_diff`).
3. `harvest`: 64 images × 4 layers to a bf16 store: tokens/s and harvest ÷ bare forward.
4. `steer`: `steered_generate` ÷ plain `generate`, 32 new tokens.
5. `sae`: d_in = d_model, 65,536 latents, batch 4096: vlens 'paper' and 'topk' vs SAE-Lens's
   `SAETrainer` (standard, TopK) on the same in-memory data; samples/s and the fraction of the
   card's measured fp32 / bf16 matmul rate.
6. `train_many`: 4 SAEs from one pass ÷ (the same forwards alone + the 4 SAEs' steps alone).
7. `ddp`: `torchrun --nproc-per-node 1` (NCCL on a GPU, gloo on the CPU): harvest and SAE
   training under the process group agree with the same run in one plain process.
8. `attribution`: integrated gradients (16 steps) and the logit lens on one 672² image.

Batch sizes come from `vlens.planning.plan` and the card's free memory; a stage that cannot fit
at its size scales down and says so (`scaled_down`). Peak memory per stage is
`torch.cuda.max_memory_allocated` above what was allocated at its start (reset per stage); on
the CPU it is null and `planned_bytes` gives the planner's figure.

    python benchmarks/gpu.py                 # the GPU run (~5-8 minutes on an H100)
    python benchmarks/gpu.py --tiny          # the same code at tiny sizes on the CPU (a test)
    python benchmarks/gpu.py --stages build,trace

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

import vlens  # noqa: E402
import vlens.sae as vs  # noqa: E402
from vlens.data import Sample  # noqa: E402
from vlens.families.checkpoints import LLAVA_NEXT_MISTRAL  # noqa: E402
from vlens.planning import PeakMemory, plan, sae_bytes  # noqa: E402
from vlens.prompts import QUESTION  # noqa: E402

HERE = Path(__file__).resolve().parent
MIXED = [(336, 336), (672, 672), (640, 480)]
FULL = dict(sizes={}, layers=[8, 12, 16, 24], harvest_images=64, harvest_size=(336, 336), gen_tokens=32,
            gen_rows=4, d_sae=65536, sae_batch=4096, sae_steps=20, k=64, many_d_sae=16384, many_steps=4,
            many_images=32, ig_steps=16, ig_site=16, attr_size=(672, 672), ddp_sizes=dict(d_model=512, n_layers=2),
            max_rows=16)
TINY = dict(sizes=dict(d_model=64, n_layers=4, vision_d_model=32, vision_layers=1), layers=[0, 1, 2, 3],
            harvest_images=4, harvest_size=(336, 336), gen_tokens=3, gen_rows=2, d_sae=256, sae_batch=128,
            sae_steps=3, k=8, many_d_sae=128, many_steps=2, many_images=4, ig_steps=2, ig_site=2,
            attr_size=(336, 336), ddp_sizes=dict(d_model=32, n_layers=2, vision_d_model=32, vision_layers=1),
            max_rows=4)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def picture(size: tuple[int, int], seed: int):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy())


class Run:
    """What the stages share: the settings, the device, the model once built, and the free memory."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.cfg = TINY if a.tiny else FULL
        self.device, self.dtype, self.tiny = a.device, getattr(torch, a.dtype), a.tiny
        self.vlm = None
        self.layers = self.cfg["layers"]

    def free(self) -> int | None:
        """Bytes the card can still give (None on the CPU: sizes are fixed there)."""
        if not self.device.startswith("cuda"):
            return None
        gc.collect()
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info()[0]

    def rows(self, p, kind: str, want: int, notes: list) -> int:
        """Batch rows of `kind` for plan `p`: `want`, or fewer when the free memory says so (noted)."""
        free = self.free()
        if free is None:
            return want
        fit = int(free * 0.85 // getattr(p, f"{kind}_bytes"))
        if fit < want:
            notes.append(f"{kind}: {max(fit, 1)} rows instead of {want} ({free / 2**30:.1f} GiB free)")
        return max(1, min(want, fit))

    def model(self):
        if self.vlm is None:
            raise RuntimeError("the build stage failed, so there is no model")
        return self.vlm

    def plan(self, size, **kw):
        return plan(self.model(), size, layers=self.layers, dtype=self.dtype, **kw)


def stage_build(r: Run) -> dict:
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    r.vlm = vlens.load(LLAVA_NEXT_MISTRAL, weights="random", device=r.device, dtype=r.dtype, **r.cfg["sizes"])
    sync(r.device)
    seconds = time.perf_counter() - t
    p = r.plan((336, 336))
    params = {str(q.device) for q in r.vlm._module.parameters()} | {str(q.dtype) for q in r.vlm._module.parameters()}
    return {"build_s": round(seconds, 2), "params": sum(q.numel() for q in r.vlm._module.parameters()),
            "param_devices_dtypes": sorted(params), "planned_bytes": p.param_bytes,
            "rss_growth_mb": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024, 1)}


def stage_trace(r: Run) -> dict:
    vlm = r.model()
    pics = [picture(s, i) for i, s in enumerate(MIXED)]
    batch = vlm.prepare([QUESTION] * len(pics), pics)
    p = r.plan((672, 672))
    notes: list = []
    r.rows(p, "harvest", len(pics), notes)
    both = vlens.read_layers(vlm, batch, r.layers)
    worst = 0.0
    for i, pic in enumerate(pics):
        alone = vlens.read_layers(vlm, vlm.prepare([QUESTION], [pic]), r.layers)
        start = int(batch.layout.image[:i].sum())
        for L in r.layers:
            a = alone[L].float()
            b = both[L][start : start + len(a)].float()
            worst = max(worst, float((a - b).abs().max() / a.abs().max().clamp(min=1e-12)))
    return {"images": [list(s) for s in MIXED], "seq_len": int(batch.layout.shape[1]),
            "padding": [int(x) for x in batch.layout.pad.sum(1)], "max_rel_diff": round(worst, 5),
            "agree": worst < (0.05 if r.dtype != torch.float32 else 1e-3), "planned_bytes": 3 * p.harvest_bytes,
            "scaled_down": notes or None}


def stage_harvest(r: Run) -> dict:
    vlm = r.model()
    n, size = r.cfg["harvest_images"], r.cfg["harvest_size"]
    p = r.plan(size)
    notes: list = []
    bs = r.rows(p, "harvest", r.cfg["max_rows"], notes)
    data = [Sample(picture(size, i), label=i % 2, id=i) for i in range(n)]
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        store = vlens.harvest(vlm, data, r.layers, dtype=torch.bfloat16, batch_size=bs, out=out, progress=False)
        sync(r.device)
        t_h = time.perf_counter() - t
        disk = sum(f.stat().st_size for f in Path(out).rglob("*.safetensors"))
        tokens = len(store)
    t = time.perf_counter()
    with torch.inference_mode():
        for c in range(0, n, bs):
            b = vlm.prepare([QUESTION] * len(data[c : c + bs]), [s.image for s in data[c : c + bs]])
            inputs = {k: v.to(r.device) for k, v in b.inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(r.dtype)
            vlm._module.model(**inputs)  # the bare HF forward (no head), prepare included as in the harvest
    sync(r.device)
    t_bare = time.perf_counter() - t
    return {"images": n, "image_size": list(size), "layers": r.layers, "batch_size": bs, "tokens": tokens,
            "harvest_s": round(t_h, 3), "bare_forward_s": round(t_bare, 3), "tokens_per_s": round(tokens / t_h, 1),
            "harvest_over_bare_forward": round(t_h / t_bare, 3), "store_bytes": disk,
            "planned_store_bytes": n * p.store_bytes_per_image, "planned_bytes": bs * p.harvest_bytes,
            "scaled_down": notes or None}


def stage_steer(r: Run) -> dict:
    vlm = r.model()
    p = r.plan((336, 336))
    notes: list = []
    rows = r.rows(p, "generate", r.cfg["gen_rows"], notes)
    b = vlm.prepare([QUESTION] * rows, [picture((336, 336), i) for i in range(rows)])
    n = r.cfg["gen_tokens"]
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)
    v = torch.randn(vlm.d_model)

    def plain() -> float:
        inputs = {k: x.to(r.device) for k, x in b.inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(r.dtype)
        t = time.perf_counter()
        with torch.no_grad():
            vlm._module.generate(**inputs, **kw, temperature=None, top_p=None, top_k=None)
        sync(r.device)
        return time.perf_counter() - t

    def steered() -> float:
        t = time.perf_counter()
        vlens.steered_generate(vlm, b, v, layer=r.layers[len(r.layers) // 2], k=4.0, **kw)
        sync(r.device)
        return time.perf_counter() - t

    if not r.tiny:
        plain(), steered()  # warm-up
    tp, ts = plain(), steered()
    return {"rows": rows, "new_tokens": n, "plain_s": round(tp, 3), "steered_s": round(ts, 3),
            "steered_over_plain": round(ts / tp, 3), "planned_bytes": rows * p.generate_bytes,
            "scaled_down": notes or None}


def matmul_rate(device: str, dtype: torch.dtype, B: int, d: int, m: int) -> float:
    """Measured TFLOP/s of a [B, d] × [d, m] product in `dtype` (best of 3)."""
    x, w = torch.randn(B, d, device=device, dtype=dtype), torch.randn(d, m, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(3):
        sync(device)
        t = time.perf_counter()
        torch.mm(x, w)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * B * d * m / best / 1e12


def stage_sae(r: Run) -> dict:
    sys.path.insert(0, str(HERE))
    import sae_train  # benchmarks/sae_train.py: the same trainers, configured as SAE-Lens's train_toy_sae

    sae_train.DEVICE = r.device
    d = r.vlm.d_model if r.vlm is not None else (64 if r.tiny else 4096)
    m, B, steps, k = r.cfg["d_sae"], r.cfg["sae_batch"], r.cfg["sae_steps"], r.cfg["k"]
    notes: list = []
    free = r.free()
    if free is not None and sae_bytes(d, m, B) + steps * B * d * 4 > 0.85 * free:
        steps = max(2, int((0.85 * free - sae_bytes(d, m, B)) // (B * d * 4)))
        notes.append(f"sae: {steps} steps of data held ({free / 2**30:.1f} GiB free)")
    size = sae_train.Size("gpu", d, m, B, m, 16, steps, 0, ("standard", f"topk{k}"), False)
    data = torch.randn(steps * B, d, generator=torch.Generator().manual_seed(0)).to(r.device)
    out: dict = {"d_in": d, "d_sae": m, "batch_size": B, "steps": steps,
                 "rate": "whole run" if r.tiny else "marginal: (steps - 2) batches / (t(steps) - t(2))"}

    def paper(n: int) -> float:
        t = time.perf_counter()
        vs.train(data[: n * B], "paper", d_sae=m, steps=n, batch_size=B, progress=False, stats_tokens=0,
                 device=r.device)
        sync(r.device)
        return time.perf_counter() - t

    runs = {"vlens_paper": lambda n: paper(n),
            "vlens_standard": lambda n: sae_train.run_vlens(data[: n * B], size, "standard", None, n, 1e-4)[0],
            "sae_lens_standard": lambda n: sae_train.run_sae_lens(data[: n * B], size, "standard", None, n, 1e-4)[0],
            "vlens_topk": lambda n: sae_train.run_vlens(data[: n * B], size, "topk", k, n, 1e-4)[0],
            "sae_lens_topk": lambda n: sae_train.run_sae_lens(data[: n * B], size, "topk", k, n, 1e-4)[0]}
    for name, fn in runs.items():
        # Each call builds its SAE on the CPU first (seconds at 65,536 latents): on a card the rate is the
        # marginal one, (steps - 2) batches over the time a steps-long run takes beyond a 2-step run.
        t2 = fn(2) if not r.tiny and steps > 2 else 0.0
        n = steps - 2 if t2 else steps
        out[f"{name}_samples_per_s"] = round(n * B / max(fn(steps) - t2, 1e-9), 1)
    fp32 = matmul_rate(r.device, torch.float32, B, d, m)
    bf16 = matmul_rate(r.device, torch.bfloat16, B, d, m)
    flops = 12 * d * m  # per sample: encoder + decoder forward, about twice that backward
    out.update(matmul_tflops_fp32=round(fp32, 2), matmul_tflops_bf16=round(bf16, 2),
               fraction_of_fp32={n[:-14]: round(v * flops / (fp32 * 1e12), 3) for n, v in out.items()
                                 if n.endswith("_samples_per_s")},
               fraction_of_bf16={n[:-14]: round(v * flops / (bf16 * 1e12), 3) for n, v in out.items()
                                 if n.endswith("_samples_per_s")},
               ratio_standard=round(out["vlens_standard_samples_per_s"] / out["sae_lens_standard_samples_per_s"], 3),
               ratio_topk=round(out["vlens_topk_samples_per_s"] / out["sae_lens_topk_samples_per_s"], 3),
               planned_bytes=sae_bytes(d, m, B) + steps * B * d * 4, scaled_down=notes or None)
    return out


def stage_train_many(r: Run) -> dict:
    vlm = r.model()
    m, B, steps = r.cfg["many_d_sae"], r.cfg["sae_batch"], r.cfg["many_steps"]
    data = [Sample(picture((336, 336), 100 + i), id=i) for i in range(r.cfg["many_images"])]
    p = r.plan((336, 336))
    notes: list = []
    fb = r.rows(p, "harvest", min(8, r.cfg["max_rows"]), notes)
    specs = {L: ({"preset": "topk", "k": r.cfg["k"]} if i % 2 else "paper") for i, L in enumerate(r.layers)}
    common = dict(steps=steps, batch_size=B, d_sae=m, stats_tokens=0, progress=False, device=r.device)
    t = time.perf_counter()
    saes = vs.train_many(vlm, data, specs, forward_batch_size=fb, buffer=2 * B, **common)
    sync(r.device)
    t_many = time.perf_counter() - t
    forwards = next(iter(saes.values())).cfg.metadata.vlens_training["stream"]["forwards"]
    rows: dict = {L: [] for L in r.layers}
    t = time.perf_counter()
    for c in range(forwards):
        chunk = [data[(c * fb + j) % len(data)] for j in range(fb)]
        acts = vlens.read_layers(vlm, vlm.prepare([QUESTION] * fb, [s.image for s in chunk]), r.layers)
        for L in r.layers:
            rows[L].append(acts[L])
    sync(r.device)
    t_fwd = time.perf_counter() - t
    t_steps = 0.0
    for L, spec in specs.items():
        preset, kw = (spec, {}) if isinstance(spec, str) else (spec["preset"], {"k": spec["k"]})
        x = torch.cat(rows[L]).float()
        t = time.perf_counter()
        vs.train(x, preset, **kw, **common)
        sync(r.device)
        t_steps += time.perf_counter() - t
    return {"saes": len(specs), "d_sae": m, "batch_size": B, "steps": steps, "forwards": forwards,
            "forward_batch_size": fb, "train_many_s": round(t_many, 3), "forwards_alone_s": round(t_fwd, 3),
            "steps_alone_s": round(t_steps, 3), "ratio": round(t_many / (t_fwd + t_steps), 3),
            "planned_bytes": fb * p.harvest_bytes + len(specs) * sae_bytes(vlm.d_model, m, B),
            "scaled_down": notes or None}


def ddp_worker(out: str, device: str, sizes: str) -> None:
    """Under torchrun or alone: harvest 4 images at 2 layers and train an SAE; save both for comparison."""
    from safetensors.torch import save_file

    from vlens import distributed

    env = distributed.init()
    dev = f"cuda:{env.local_rank}" if device.startswith("cuda") else device
    vlm = vlens.load(LLAVA_NEXT_MISTRAL, weights="random", device=dev, **json.loads(sizes))
    data = [Sample(picture((336, 336), i), label=i % 2, id=i) for i in range(4)]
    store = vlens.harvest(vlm, data, [0, 1], batch_size=2, out=Path(out) / "store", progress=False)
    x = torch.randn(2048, 16, generator=torch.Generator().manual_seed(0))
    sae = vs.train(x, "topk", d_sae=64, k=4, steps=8, batch_size=256, progress=False, stats_tokens=0, device=dev)
    if env.is_main:
        key = store.meta["sample"] * 100_000 + store.meta["position"]
        order = torch.argsort(key)
        save_file({"acts": store.activations(1).tensor()[order].float().contiguous(),
                   **{k: v.detach().float().cpu().contiguous() for k, v in sae.state_dict().items()}},
                  str(Path(out) / "result.safetensors"))
        Path(out, "info.json").write_text(json.dumps({"enabled": env.enabled, "world_size": env.world_size,
                                                      "backend": distributed.dist.get_backend()
                                                      if env.enabled else None}))
    distributed.cleanup()


def stage_ddp(r: Run) -> dict:
    from safetensors.torch import load_file

    sizes = json.dumps(r.cfg["ddp_sizes"])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp, "single"), Path(tmp, "torchrun")
        worker = [str(Path(__file__).resolve()), "--ddp-worker"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               *worker, str(b), r.device, sizes]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        if done.returncode:
            raise RuntimeError(f"torchrun exited {done.returncode}: {done.stderr[-1500:]}")
        ddp_worker(str(a), r.device, sizes)  # the same, in this plain process
        ra, rb = load_file(str(a / "result.safetensors")), load_file(str(b / "result.safetensors"))
        info = json.loads((b / "info.json").read_text())
    diff = {k: float((ra[k] - rb[k]).abs().max()) for k in ra}
    return {"torchrun": info, "max_abs_diff": {k: round(v, 7) for k, v in diff.items()},
            "agree": set(ra) == set(rb) and max(diff.values()) < 1e-4, "planned_bytes": None}


def stage_attribution(r: Run) -> dict:
    from vlens.attribution import integrated_gradients, token_target
    from vlens.lens import logit_lens

    vlm = r.model()
    size = r.cfg["attr_size"]
    site = r.cfg["ig_site"]
    p = r.plan(size, site=site)
    notes: list = []
    rows = r.rows(p, "attribution", r.cfg["ig_steps"] + 2, notes)
    b = vlm.prepare([QUESTION], [picture(size, 7)])
    t = time.perf_counter()
    ig = integrated_gradients(vlm, b, token_target(5), site=site, baseline="mean", steps=r.cfg["ig_steps"],
                              batch_size=rows)
    sync(r.device)
    t_ig = time.perf_counter() - t
    t = time.perf_counter()
    lens = logit_lens(vlm, b, r.layers, k=5)
    sync(r.device)
    return {"image_size": list(size), "image_tokens": int(b.layout.image.sum()), "ig_steps": r.cfg["ig_steps"],
            "ig_batch_size": rows, "ig_s": round(t_ig, 3), "completeness_error": round(ig.completeness_error, 4),
            "logit_lens_s": round(time.perf_counter() - t, 3), "lens_sites": lens.sites,
            "planned_bytes": rows * p.attribution_bytes, "scaled_down": notes or None}


STAGES = {"build": stage_build, "trace": stage_trace, "harvest": stage_harvest, "steer": stage_steer,
          "sae": stage_sae, "train_many": stage_train_many, "ddp": stage_ddp, "attribution": stage_attribution}


def run_stage(r: Run, name: str) -> dict:
    t = time.perf_counter()
    cuda = r.device.startswith("cuda")
    try:
        if cuda:
            with PeakMemory(r.device) as m:
                out = STAGES[name](r)
        else:
            out, m = STAGES[name](r), None
        out = {"ok": True, **out}
    except Exception as e:  # noqa: BLE001 - recorded; the next stages still run
        out, m = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000],
                  "traceback": traceback.format_exc()[-3000:]}, None
    out["seconds"] = round(time.perf_counter() - t, 3)
    out["peak_bytes"] = m.peak if m is not None else None
    print(f"[{name}] {'ok' if out['ok'] else 'FAILED: ' + out['error'][:300]} in {out['seconds']} s",
          file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU: the same code, for a test")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    ap.add_argument("--ddp-worker", nargs=3, metavar=("OUT", "DEVICE", "SIZES"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.ddp_worker:
        ddp_worker(*a.ddp_worker)
        return {}
    note = None
    if a.device is None and not a.tiny and not torch.cuda.is_available():
        a.tiny, note = True, "no GPU here: ran --tiny (the full sizes need a card)"
    a.device = a.device or ("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    r = Run(a)
    t0 = time.perf_counter()
    result: dict = {"benchmark": "gpu", "tiny": a.tiny, "device": a.device, "dtype": a.dtype,
                    "card": torch.cuda.get_device_name() if a.device.startswith("cuda") else None,
                    "torch": torch.__version__, "vlens": vlens.__version__, "note": note, "stages": {}}
    for name in a.stages.split(","):
        result["stages"][name] = run_stage(r, name)
    result["total_s"] = round(time.perf_counter() - t0, 2)
    result["failed"] = [n for n, s in result["stages"].items() if not s["ok"]]
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
