"""Benchmark: the vlens SAE trainer vs SAE-Lens's `SAETrainer`, on the same in-memory synthetic data.

What is timed, and what is not:

- NOT timed: generating the data. Per setting, SAE-Lens's synthetic `FeatureDictionary` /
  `ActivationGenerator` (fixed seeds) produce `steps × batch` training rows once, kept in
  memory; both trainers read the identical tensor, batch i = rows [i·B, (i+1)·B) (vlens
  with `shuffle=False`; SAE-Lens's `SAETrainer` from an iterator over the same batches).
  Held-out evaluation, the matmul roofline and the init check are not timed either.
- Timed: one whole training call each, from building the SAE to the trained SAE:
  `vlens.sae.train(tensor, ...)` and `SAETrainer(...).fit()` with the configuration of
  SAE-Lens's `train_toy_sae` (Adam 0.9/0.999, constant lr, grad-norm clip 1, dead window
  1000 steps). Both start from the same initial weights (SAE-Lens's own classes built under
  seed 1; checked before timing) and use the same loss: standard = SAE-Lens's
  `StandardTrainingSAE` (ReLU, decoder-norm-weighted L1, λ = 1, the paper's L1 recipe with
  b_dec subtracted from the input), TopK = `TopKTrainingSAE` (k = 32 / 64, AuxK coefficient
  1/32 on both sides, decoder-norm rescaling). vlens runs its fused steps
  (`vlens.sae.standard`, `vlens.sae.topk`); SAE-Lens runs autograd.
- Repeats are interleaved (order alternates), `samples_per_s_ratio` is the median of the
  per-repeat ratios vlens/SAE-Lens, with the spread (min, max) beside it.

Quality: SAE-Lens's `eval_sae_on_synthetic_data` on held-out samples of the same generator
(MCC = Hungarian-matched |cos| between decoder rows and the true features, explained
variance, L0). The runs are identical computations up to float summation order, so the two
sides' numbers must agree; how much of the dictionary is learnt depends on the budget. The
small setting (d 128, 1024 latents, 500 steps = 512k samples, orthogonalised dictionary)
has the budget to learn part of it; at d_in 512 / 1024 with 16× latents and batch 4096 a step costs seconds on a
2-core CPU, so the default runs (8 and 4 steps) fit the time budget but only start
learning: there the quality numbers check that both trainers land on the same SAE, not the
SAE's final quality (pass `--steps` for longer runs).

Roofline: per setting, the machine's dense float32 `torch.mm` rate for the step's three
product shapes ([B,d]·[d,m], [B,m]·[m,d], [d,B]·[B,m]); each trainer's
`dense_equivalent_fraction` is samples/s × 12·d·m FLOPs (a dense step: encoder + decoder
forward, ≈ 2× that backward) ÷ that rate. The fused TopK step does not do most of those
FLOPs (one dense product, the encoder's, plus work on the B·k firing pairs), so its
fraction can pass 1; `topk_floor_samples_per_s` is the rate bound by the encoder product alone.

Idleness: the machine must be idle (nothing else running). The JSON records the 1-min load
average before and after each setting and the CPU time used by other processes while it
ran (`/proc/stat` busy time minus this process's); a setting is `reliable: false` when
other processes used more than 0.3 of a core on average (`benchmarks/_idle.py`). The load
average is recorded, not judged: it counts this benchmark's own threads (about 1.9 after
the previous setting even on an idle machine). The ratio is then printed as unreliable. Runs use torch's thread count
(`--threads` to set it; recorded as `threads`).

    python benchmarks/sae_train.py                       # full: small, 512, 1024 (~15 min idle on 2 cores)
    python benchmarks/sae_train.py --settings small --repeats 5
    python benchmarks/sae_train.py --quick               # tiny sizes, for a test (seconds)
    python benchmarks/sae_train.py --device cuda         # the same on a GPU (recorded in the JSON as "device")
    python benchmarks/sae_train.py --multi-sae           # also run benchmarks/multi_sae.py (its own process)

The last line printed is one JSON object: `settings` (one entry per setting and
architecture), `multi_sae_ratio` (null unless `--multi-sae`; then `multi_sae` holds that
benchmark's whole JSON), and for compatibility the headline `samples_per_s_ratio`
(the smallest ratio over the settings run) with that setting's `mcc_vlens` / `mcc_sae_lens`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _idle import OtherLoad  # noqa: E402

os.environ.setdefault("TQDM_DISABLE", "1")  # SAE-Lens's progress bar (vlens runs with progress=False)

import torch  # noqa: E402
from sae_lens.config import LoggingConfig, SAETrainerConfig  # noqa: E402
from sae_lens.saes import (  # noqa: E402
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from sae_lens.synthetic import ActivationGenerator, FeatureDictionary, eval_sae_on_synthetic_data  # noqa: E402
from sae_lens.synthetic.training import SyntheticActivationIterator  # noqa: E402
from sae_lens.training.sae_trainer import SAETrainer  # noqa: E402

import vlens.sae as vs  # noqa: E402

AUX = 1.0 / 32  # AuxK coefficient on both sides (vlens's default; SAE-Lens's default is 1.0)
L1 = 1.0
DEAD_WINDOW_STEPS = 1000  # train_toy_sae's dead_feature_window
DEVICE = "cpu"  # --device


def _sync() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Size:
    name: str
    d: int
    d_sae: int
    batch: int
    n_features: int
    true_l0: float
    steps: int
    n_eval: int
    archs: tuple[str, ...]
    orthogonal: bool  # orthogonalise the true dictionary (SAE-Lens's default; O(n²) per step, small sizes only)


SIZES = {
    "quick": Size("quick", 32, 256, 256, 256, 4, 40, 4096, ("standard", "topk8"), True),
    "small": Size("small", 128, 1024, 1024, 1024, 8, 500, 50_000, ("standard", "topk32"), True),
    "512": Size("512", 512, 8192, 4096, 1024, 16, 8, 16_384, ("standard", "topk32", "topk64"), False),
    "1024": Size("1024", 1024, 16384, 4096, 2048, 16, 4, 16_384, ("standard", "topk32", "topk64"), False),
}


def _arch(name: str) -> tuple[str, int | None]:
    return ("standard", None) if name == "standard" else ("topk", int(name[4:]))


def make_data(size: Size, steps: int, seed: int = 0):
    fd = FeatureDictionary(size.n_features, size.d, seed=seed,
                           **({} if size.orthogonal else {"initializer": None}))
    ag = ActivationGenerator(size.n_features, size.true_l0 / size.n_features, std_firing_magnitudes=0.2,
                             mean_firing_magnitudes=1.0)
    torch.manual_seed(123)
    it = SyntheticActivationIterator(fd, ag, size.batch)
    data = torch.cat([next(it) for _ in range(steps)]).contiguous()
    return fd, ag, data


def sae_lens_sae(size: Size, arch: str, k: int | None):
    torch.manual_seed(1)
    if arch == "standard":
        return StandardTrainingSAE(StandardTrainingSAEConfig(d_in=size.d, d_sae=size.d_sae, l1_coefficient=L1,
                                                             apply_b_dec_to_input=True))
    return TopKTrainingSAE(TopKTrainingSAEConfig(d_in=size.d, d_sae=size.d_sae, k=k, apply_b_dec_to_input=True,
                                                 aux_loss_coefficient=AUX))


def vlens_kwargs(size: Size, arch: str, k: int | None, steps: int, lr: float) -> tuple[str, dict]:
    kw = dict(d_sae=size.d_sae, steps=steps, batch_size=size.batch, lr=lr, lr_decay_frac=0.0, lr_warmup_steps=0,
              coefficient_warmup_frac=0.0, normalize=False, shuffle=False, seed=1, grad_clip=1.0, adam_beta1=0.9,
              adam_beta2=0.999, dead_window_tokens=DEAD_WINDOW_STEPS * size.batch, apply_b_dec_to_input=True)
    if arch == "standard":
        kw["l1_coefficient"] = L1
    else:
        kw.update(k=k, aux_loss_coefficient=AUX)
    return ("standard" if arch == "standard" else "topk"), kw


def run_vlens(data, size, arch, k, steps, lr):
    preset, kw = vlens_kwargs(size, arch, k, steps, lr)
    t0 = time.perf_counter()
    sae = vs.train(data, preset, progress=False, stats_tokens=0, device=DEVICE, **kw)
    _sync()
    return time.perf_counter() - t0, sae


def run_sae_lens(data, size, arch, k, steps, lr):
    """SAE-Lens's own trainer, configured as `train_toy_sae` does, fed the pre-generated batches."""
    t0 = time.perf_counter()
    sae = sae_lens_sae(size, arch, k)
    cfg = SAETrainerConfig(
        n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False,
        total_training_samples=steps * size.batch, device=DEVICE, autocast=False, lr=lr, lr_end=lr,
        lr_scheduler_name="constant", lr_warm_up_steps=0, adam_beta1=0.9, adam_beta2=0.999, lr_decay_steps=0,
        n_restart_cycles=1, train_batch_size_samples=size.batch, dead_feature_window=DEAD_WINDOW_STEPS,
        feature_sampling_window=2000,
        logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1),
        n_batches_for_norm_estimate=1000)
    SAETrainer(cfg=cfg, sae=sae, data_provider=iter(data.split(size.batch))).fit()
    _sync()
    return time.perf_counter() - t0, sae


def check_same_init(size, arch, k, steps, lr) -> None:
    """vlens's training SAE starts from SAE-Lens's weights, bit for bit (else the comparison means nothing)."""
    preset, kw = vlens_kwargs(size, arch, k, steps, lr)
    cfg = vs.TrainConfig.preset(preset, d_in=size.d, **{k_: v for k_, v in kw.items() if k_ not in ("steps", "d_sae")})
    cfg = cfg.replace(d_sae=size.d_sae, total_steps=steps)
    ours, theirs = vs.make_training_sae(cfg).state_dict(), sae_lens_sae(size, arch, k).state_dict()
    bad = [n for n in theirs if not torch.equal(ours[n], theirs[n])]
    if bad or set(ours) != set(theirs):
        raise SystemExit(f"vlens and SAE-Lens start from different weights ({bad}): fix the settings first")


def matmul_rate(size: Size, reps: int = 2) -> dict:
    """Dense float32 torch.mm GFLOP/s for the three product shapes of a training step (best of `reps`)."""
    B, d, m = size.batch, size.d, size.d_sae
    g = torch.Generator().manual_seed(0)
    x, w, h = (torch.randn(*shape, generator=g).to(DEVICE) for shape in ((B, d), (d, m), (B, m)))
    wt = w.T.contiguous()
    shapes = {"enc [B,d]x[d,m]": (x, w), "dec [B,m]x[m,d]": (h, wt), "wgrad [d,B]x[B,m]": (x.T, h)}
    rates = {}
    for name, (a, b) in shapes.items():
        best = float("inf")
        for _ in range(reps):
            _sync()
            t0 = time.perf_counter()
            torch.mm(a, b)
            _sync()
            best = min(best, time.perf_counter() - t0)
        rates[name] = 2 * B * d * m / best / 1e9
    return {"gflops": round(statistics.median(rates.values()), 1),
            "gflops_by_shape": {k_: round(v, 1) for k_, v in rates.items()}}


def quality(sae, fd, ag, n_eval):
    torch.manual_seed(999)
    with torch.no_grad():
        r = eval_sae_on_synthetic_data(sae.to("cpu"), fd, ag, num_samples=n_eval, batch_size=min(n_eval, 4096))
    return {"mcc": round(r.mcc, 4), "ev": round(r.explained_variance, 4), "l0": round(r.sae_l0, 2),
            "dead": int(r.dead_latents)}


def bench_setting(size: Size, arch_name: str, steps: int, repeats: int, lr: float, data, fd, ag, roof,
                  threads: int) -> dict:
    arch, k = _arch(arch_name)
    check_same_init(size, arch, k, steps, lr)
    samples = steps * size.batch
    load = OtherLoad()
    load.start()
    times: dict[str, list[float]] = {"vlens": [], "sae_lens": []}
    saes = {}
    for r in range(repeats):
        for who in (("vlens", "sae_lens") if r % 2 == 0 else ("sae_lens", "vlens")):
            run = run_vlens if who == "vlens" else run_sae_lens
            dt, saes[who] = run(data, size, arch, k, steps, lr)
            times[who].append(dt)
        print(f"  repeat {r}: vlens {samples / times['vlens'][-1]:,.0f} /s, SAE-Lens "
              f"{samples / times['sae_lens'][-1]:,.0f} /s, ratio {times['sae_lens'][-1] / times['vlens'][-1]:.2f}",
              flush=True)
    idle = load.stop()
    ratios = [s / v for s, v in zip(times["sae_lens"], times["vlens"])]
    sps = {who: samples / statistics.median(ts) for who, ts in times.items()}
    q = {who: quality(sae, fd, ag, size.n_eval) for who, sae in saes.items()}
    # other processes' CPU only: the load average counts this benchmark's own threads
    # (without /proc/stat, `OtherLoad.reliable` falls back to a low load average)
    reliable = load.reliable(idle)
    dense_flops = 12 * size.d * size.d_sae  # per sample
    entry = {
        "setting": size.name, "d_in": size.d, "d_sae": size.d_sae, "architecture": arch, "k": k,
        "batch_size": size.batch, "steps": steps, "samples": samples, "repeats": repeats,
        "samples_per_s_ratio": round(statistics.median(ratios), 3),
        "samples_per_s_ratio_spread": [round(min(ratios), 3), round(max(ratios), 3)],
        "samples_per_s_ratio_repeats": [round(x, 3) for x in ratios],
        "samples_per_s_vlens": round(sps["vlens"], 1), "samples_per_s_sae_lens": round(sps["sae_lens"], 1),
        "mcc_vlens": q["vlens"]["mcc"], "mcc_sae_lens": q["sae_lens"]["mcc"],
        "ev_vlens": q["vlens"]["ev"], "ev_sae_lens": q["sae_lens"]["ev"],
        "l0_vlens": q["vlens"]["l0"], "l0_sae_lens": q["sae_lens"]["l0"],
        "dead_vlens": q["vlens"]["dead"], "dead_sae_lens": q["sae_lens"]["dead"],
        "matmul_gflops": roof["gflops"], "matmul_gflops_by_shape": roof["gflops_by_shape"],
        "dense_equivalent_fraction_vlens": round(sps["vlens"] * dense_flops / (roof["gflops"] * 1e9), 3),
        "dense_equivalent_fraction_sae_lens": round(sps["sae_lens"] * dense_flops / (roof["gflops"] * 1e9), 3),
        **({"topk_floor_samples_per_s": round(roof["gflops"] * 1e9 / (2 * size.d * size.d_sae), 1)}
           if arch == "topk" else {}),
        "n_features": size.n_features, "true_l0": size.true_l0, "eval_samples": size.n_eval, "lr": lr,
        **idle, "reliable": reliable,
    }
    flag = "" if reliable else "  [UNRELIABLE: the machine was busy]"
    print(f"{size.name} {arch_name}: ratio {entry['samples_per_s_ratio']:.2f} "
          f"(spread {entry['samples_per_s_ratio_spread']}){flag}; vlens {sps['vlens']:,.0f} /s, "
          f"SAE-Lens {sps['sae_lens']:,.0f} /s; MCC {entry['mcc_vlens']:.4f} vs {entry['mcc_sae_lens']:.4f}, "
          f"EV {entry['ev_vlens']:.4f} vs {entry['ev_sae_lens']:.4f}, L0 {entry['l0_vlens']} vs "
          f"{entry['l0_sae_lens']}; dense-equivalent roofline fraction {entry['dense_equivalent_fraction_vlens']} vs "
          f"{entry['dense_equivalent_fraction_sae_lens']} of {roof['gflops']} GFLOP/s", flush=True)
    return entry


def multi_sae(quick: bool, threads: int | None) -> dict | None:
    """The last-line JSON of benchmarks/multi_sae.py (run as its own process), or None when that file is absent."""
    path = Path(__file__).with_name("multi_sae.py")
    if not path.exists():
        return None
    cmd = [sys.executable, str(path), *(["--quick"] if quick else [])]
    cmd += ["--threads", str(threads)] if threads else []
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        print(f"benchmarks/multi_sae.py failed (exit {res.returncode}): {res.stderr[-1000:]}", file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (for a test)")
    ap.add_argument("--settings", default=None, help="comma list of: small, 512, 1024 (default all; quick: quick)")
    ap.add_argument("--archs", default=None, help="comma list, e.g. standard,topk32,topk64 (default per setting)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats per setting (default 3; quick 1)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default per setting)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: the same code on a GPU, recorded")
    ap.add_argument("--multi-sae", action="store_true", help="also run benchmarks/multi_sae.py for multi_sae_ratio")
    # the flags of the previous version of this benchmark (tests/test_sae.py uses them)
    ap.add_argument("--samples", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--eval-samples", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--speed-pairs", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    start_load = os.getloadavg()[0]
    names = (args.settings or ("quick" if args.quick else "small,512,1024")).split(",")
    unknown = [n for n in names if n not in SIZES]
    if unknown:
        ap.error(f"unknown setting(s) {unknown}; choose from {sorted(SIZES)}")
    repeats = args.repeats or args.speed_pairs or (1 if args.quick else 3)
    entries = []
    for name in names:
        size = SIZES[name]
        if args.eval_samples:
            size.n_eval = args.eval_samples
        steps = args.steps or (max(args.samples // size.batch, 1) if args.samples else size.steps)
        archs = tuple(args.archs.split(",")) if args.archs else size.archs
        t0 = time.perf_counter()
        fd, ag, data = make_data(size, steps)
        t_gen = time.perf_counter() - t0
        roof = matmul_rate(size)
        print(f"setting {name}: d_in {size.d}, d_sae {size.d_sae}, batch {size.batch}, {steps} steps "
              f"({steps * size.batch:,} samples, generated in {t_gen:.1f} s, not timed); "
              f"matmul {roof['gflops']} GFLOP/s on {threads} threads", flush=True)
        for arch_name in archs:
            entries.append(bench_setting(size, arch_name, steps, repeats, args.lr, data, fd, ag, roof, threads))
        del data
    multi = multi_sae(args.quick, args.threads) if args.multi_sae else None
    head = min(entries, key=lambda e: e["samples_per_s_ratio"])
    result = {
        "benchmark": "sae_train",
        "settings": entries,
        "multi_sae_ratio": None if multi is None else multi.get("multi_sae_ratio"),
        "multi_sae": multi,
        "samples_per_s_ratio": head["samples_per_s_ratio"],
        "headline_setting": f"{head['setting']} {head['architecture']}" + (f" k={head['k']}" if head["k"] else ""),
        "mcc_vlens": head["mcc_vlens"], "mcc_sae_lens": head["mcc_sae_lens"],
        "reliable": all(e["reliable"] for e in entries),
        "device": DEVICE, "threads": threads, "cpus": os.cpu_count(), "torch": torch.__version__,
        "load_avg_1min_at_start": round(start_load, 2), "load_avg_1min_at_end": round(os.getloadavg()[0], 2),
        "quick": args.quick,
    }
    if not result["reliable"]:
        print("the machine was busy (other load than this benchmark) during some settings: their ratios are not "
              "results; rerun idle", file=sys.stderr)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
