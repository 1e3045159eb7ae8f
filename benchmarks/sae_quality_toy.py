"""SAE quality on the toy model's own activations (quality numbers, not timings: fine on a busy machine).

Two experiments on layer-3 image + caption tokens of the embedded toy model (`vlens.load("toy")`,
`vlens.data.toy("train", n=N)`, `tokens="image+answer"`, `captions=True`), split 90/10 at random:

- `frontier`: TopK SAEs, k = 1…16, d_sae 512, 400 steps, batch 1024, lr 3e-4, held-out explained
  variance, vlens's `"topk"` preset (and `--variants`) next to SAE-Lens's own `SAETrainer` with its
  defaults (constant lr, no input normalisation), fed the same kind of epoch-shuffled batches;
- `losses`: the paper's loss (decoder norms detached in the L1 penalty, `"paper"` preset) vs
  SAE-Lens's form (`detach_decoder_norm=False`), same start, same batches (λ 5, lr 1e-3, d_sae 512,
  inputs scaled to mean norm √d_model): the mean decoder-row norm, L0 and EV at every step.

Held-out EV = 1 − Σ‖x̂ − x‖² / Σ‖x − mean‖² over the held-out rows, computed here for both libraries.

    python benchmarks/sae_quality_toy.py --out docs/assets/sae_quality_toy.json --figures docs/assets
    python benchmarks/sae_quality_toy.py --quick                                  # tiny, for a test (seconds)

The last line printed is one JSON object (also written to `--out`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def toy_tokens(n_samples: int, layer: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) float32 activations: layer `layer` image + caption tokens, 90/10 at random."""
    import tempfile

    import vlens
    from vlens import data as vdata
    from vlens import prompts
    from vlens.activations import harvest

    vlm = vlens.load("toy")
    with tempfile.TemporaryDirectory() as d:
        store = harvest(vlm, vdata.toy("train", n=n_samples), [layer], tokens="image+answer", captions=True,
                        out=Path(d) / "s", prompt=prompts.CAPTION_PROMPT, progress=False)
        x = store.activations(layer).float().clone()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.9 * len(x))
    return x[perm[:cut]], x[perm[cut:]]


def held_out_ev(sae, x: torch.Tensor) -> float:
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(x))
    return float(1 - (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def l0(sae, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((sae.encode(x) != 0).sum(-1).float().mean())


def train_vlens(x, k, steps, batch, lr, d_sae=512, **overrides):
    import vlens.sae as vs

    return vs.train(x, "topk", d_sae=d_sae, k=k, steps=steps, batch_size=batch, lr=lr, progress=False,
                    stats_tokens=0, **overrides)


def train_sae_lens(x, k, steps, batch, lr, seed=0, vlens_order=False, d_sae=512):
    """SAE-Lens's own trainer with its defaults (`SAETrainerConfig` as `train_toy_sae` sets it).

    Batches are epoch-shuffled rows; with `vlens_order` they are exactly the batches
    `vlens.sae.train` draws (seed 0), so the two libraries see the same data in the same order.
    """
    from sae_lens import LoggingConfig
    from sae_lens.saes import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer, SAETrainerConfig

    torch.manual_seed(seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=d_sae, k=k))
    g = torch.Generator().manual_seed(seed)
    per_epoch = len(x) // batch
    if vlens_order:
        from vlens.sae.sources import as_source

        src = as_source(x, None)
        batches = [x[src.indices(s, batch, seed, True)] for s in range(steps)]
    else:
        perms = [torch.randperm(len(x), generator=g) for _ in range(steps // per_epoch + 1)]
        batches = [x[p[i * batch:(i + 1) * batch]] for p in perms for i in range(per_epoch)][:steps]
    cfg = SAETrainerConfig(
        n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False, total_training_samples=steps * batch,
        device="cpu", autocast=False, lr=lr, lr_end=lr, lr_scheduler_name="constant", lr_warm_up_steps=0,
        adam_beta1=0.9, adam_beta2=0.999, lr_decay_steps=0, n_restart_cycles=1, train_batch_size_samples=batch,
        dead_feature_window=1000, feature_sampling_window=2000,
        logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1), n_batches_for_norm_estimate=1000)
    SAETrainer(cfg=cfg, sae=sae, data_provider=iter(batches)).fit()
    return sae


VARIANTS = {
    "vlens_topk_preset": {},
    "vlens_no_decay_no_norm": {"lr_decay_frac": 0.0, "normalize": False},
    # AuxK switched on within the run: latents silent for 100k tokens (~100 steps) count as dead
    "vlens_no_decay_no_norm_auxk": {"lr_decay_frac": 0.0, "normalize": False, "dead_window_tokens": 100_000},
}


def frontier(xtr, xte, ks, steps, batch, lr, variants) -> list[dict]:
    rows = []
    for k in ks:
        row = {"k": k}
        if "sae_lens" in variants:
            row["sae_lens"] = round(held_out_ev(train_sae_lens(xtr, k, steps, batch, lr), xte), 4)
        if "sae_lens_vlens_order" in variants:
            sae = train_sae_lens(xtr, k, steps, batch, lr, vlens_order=True)
            row["sae_lens_vlens_order"] = round(held_out_ev(sae, xte), 4)
        for name in (v for v in variants if not v.startswith("sae_lens")):
            row[name] = round(held_out_ev(train_vlens(xtr, k, steps, batch, lr, **VARIANTS[name]), xte), 4)
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def frontier_over_seeds(xtr, xte, ks, steps, batch, lr, seeds: int) -> list[dict]:
    """Held-out EV per k, mean and spread over `seeds` seeds (initialisation and batch order) for both libraries.

    vlens's `"topk"` preset with `seed=s`, SAE-Lens's trainer with its own init and epoch order from seed s.
    """
    import statistics

    rows = []
    for k in ks:
        ev = {"sae_lens": [], "vlens": []}
        for s in range(seeds):
            ev["sae_lens"].append(held_out_ev(train_sae_lens(xtr, k, steps, batch, lr, seed=s), xte))
            ev["vlens"].append(held_out_ev(train_vlens(xtr, k, steps, batch, lr, seed=s), xte))
        row = {"k": k, "seeds": seeds}
        for name, v in ev.items():
            row[f"{name}_mean"], row[f"{name}_sd"] = round(statistics.mean(v), 4), round(statistics.stdev(v), 4)
            row[f"{name}_min"], row[f"{name}_max"] = round(min(v), 4), round(max(v), 4)
        row["vlens_minus_sae_lens"] = round(row["vlens_mean"] - row["sae_lens_mean"], 4)
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def losses(xtr, steps, batch, lr, lam) -> dict:
    """Per-step mean decoder norm, L0 and EV under the paper's loss and under SAE-Lens's, from one start."""
    import vlens.sae as vs
    from vlens.sae.training.trainer import Stepper

    x = xtr * (xtr.shape[1] ** 0.5 / xtr.norm(dim=1).mean())  # the paper's input scaling, mean norm √d
    out = {}
    for name, detach in (("paper", True), ("sae_lens", False)):
        cfg = vs.TrainConfig.preset("paper", d_in=x.shape[1], d_sae=512, total_steps=steps, batch_size=batch, lr=lr,
                                    l1_coefficient=lam, detach_decoder_norm=detach)
        st = Stepper(cfg, log_every=1)
        g = torch.Generator().manual_seed(0)
        per_epoch = len(x) // batch
        order = torch.cat([torch.randperm(len(x), generator=g) for _ in range(steps // per_epoch + 1)])
        rec = {"decoder_norm": [], "l0": [], "ev": []}
        for s in range(steps):
            m = st.step(x[order[s * batch:(s + 1) * batch]])
            rec["decoder_norm"].append(round(float(st.sae.W_dec.detach().norm(dim=1).mean()), 5))
            rec["l0"].append(round(m["l0"], 3))
            rec["ev"].append(round(m["explained_variance"], 4))
        out[name] = rec
    return out


def figures(result: dict, folder: Path) -> list[Path]:
    """Plotly pages of the two experiments (`sae_losses.html`, `sae_topk_frontier.html`) for the docs."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    written = []
    if "losses" in result:
        fig = make_subplots(rows=1, cols=2, subplot_titles=("mean decoder-row norm", "L0 (latents per token)"))
        for name, colour, label in (("paper", "#1f77b4", "paper's code (norms detached)"),
                                    ("sae_lens", "#d62728", "SAE-Lens (gradient through norms)")):
            rec = result["losses"][name]
            steps = list(range(1, len(rec["l0"]) + 1))
            fig.add_trace(go.Scatter(x=steps, y=rec["decoder_norm"], name=label, line=dict(color=colour)), 1, 1)
            fig.add_trace(go.Scatter(x=steps, y=rec["l0"], name=label, line=dict(color=colour), showlegend=False),
                          1, 2)
        fig.update_xaxes(title_text="step")
        fig.update_layout(height=380, margin=dict(l=40, r=20, t=40, b=40), legend=dict(orientation="h", y=-0.2))
        written.append(folder / "sae_losses.html")
        fig.write_html(written[-1], include_plotlyjs="plotly.min.js")
    if "frontier" in result:
        rows = result["frontier"]
        fig = go.Figure()
        for key in [k for k in rows[0] if k != "k"]:
            fig.add_trace(go.Scatter(x=[r["k"] for r in rows], y=[r[key] for r in rows], name=key, mode="lines+markers"))
        fig.update_layout(height=380, xaxis_title="k", yaxis_title="held-out explained variance",
                          margin=dict(l=40, r=20, t=20, b=40))
        written.append(folder / "sae_topk_frontier.html")
        fig.write_html(written[-1], include_plotlyjs="plotly.min.js")
    return written


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (for a test)")
    ap.add_argument("--samples", type=int, default=400, help="toy images harvested")
    ap.add_argument("--only", choices=["frontier", "losses"], default=None)
    ap.add_argument("--ks", default="1-16", help="k values of the frontier: a range 'a-b' or a comma list")
    ap.add_argument("--variants", default="sae_lens,vlens_topk_preset,vlens_no_decay_no_norm",
                    help=f"comma list of sae_lens, sae_lens_vlens_order and {sorted(VARIANTS)}")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=0,
                    help="with N >= 2, the frontier is the mean and spread over N seeds of vlens and SAE-Lens")
    ap.add_argument("--figures", type=Path, default=None, help="write the plotly pages into this folder")
    ap.add_argument("--from-json", type=Path, default=None, help="draw --figures from a saved result, run nothing")
    a = ap.parse_args(argv)
    if a.from_json is not None:
        result = json.loads(a.from_json.read_text())
        print([str(p) for p in figures(result, a.figures or Path("."))])
        return result
    torch.set_num_threads(a.threads)
    t0 = time.time()
    lo, _, hi = a.ks.partition("-")
    ks = list(range(int(lo), int(hi) + 1)) if hi else [int(k) for k in a.ks.split(",")]
    n, steps, ks, lsteps = (24, 20, [2, 4], 20) if a.quick else (a.samples, 400, ks, 1000)
    xtr, xte = toy_tokens(n, 3)
    result: dict = {"benchmark": "sae_quality_toy", "train_tokens": len(xtr), "heldout_tokens": len(xte),
                    "layer": 3, "d_sae": 512, "batch_size": 1024 if not a.quick else 64, "quick": a.quick}
    batch = result["batch_size"]
    if a.only in (None, "frontier") and a.seeds >= 2:
        result["frontier_over_seeds"] = frontier_over_seeds(xtr, xte, ks, steps, batch, 3e-4, a.seeds)
        result["frontier_steps"], result["frontier_lr"] = steps, 3e-4
    elif a.only in (None, "frontier"):
        result["frontier"] = frontier(xtr, xte, ks, steps, batch, 3e-4, a.variants.split(","))
        result["frontier_steps"], result["frontier_lr"] = steps, 3e-4
    if a.only in (None, "losses"):
        result["losses"] = losses(xtr, lsteps, batch, 1e-3, 5.0)
        result["losses_steps"], result["losses_lr"], result["losses_lambda"] = lsteps, 1e-3, 5.0
    result["seconds"] = round(time.time() - t0, 1)
    if a.out is not None:
        a.out.write_text(json.dumps(result))
    if a.figures is not None:
        figures(result, a.figures)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
