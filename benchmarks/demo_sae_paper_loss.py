"""The demo's SAE stages at full size with the paper preset, under the old loss and the paper's own (issue #23).

The old `"paper"` preset backpropagated the sparsity penalty through the decoder norms (SAE-Lens's form)
and started λ at λ/W; the paper's code (`sae/sae_trainer.py`) reads the norms as constants and warms λ up
from 0. This script repeats the demo's stages 4 and 5 (`vlens.demo`: the same toy data, 300 captioned
images, image + caption tokens with the text-only pass, every layer, 1500 steps at the middle layer and
750 elsewhere, ×8 latents) once per loss, and prints one JSON line: EV / L0 / dead by modality and loss
recovered at the middle layer, the mean decoder-row norm, and the shared-latent fraction by layer.
It measures quality, not time, so the machine's load does not change its numbers.

    python benchmarks/demo_sae_paper_loss.py [--fast]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import vlens
from vlens import data as vdata
from vlens import prompts
from vlens import sae as vsae
from vlens.activations import harvest
from vlens.demo import DemoConfig

LOSSES = {
    "old (SAE-Lens gradient through the norms, λ from λ/W)":
        {"detach_decoder_norm": False, "coefficient_warmup_from_zero": False},
    "paper code (norms detached, λ from 0)": {},
}


def one_loss(vlm, tokens, held_caps, cfg: DemoConfig, options: dict, out: Path) -> dict:
    mid = vlm.n_layers // 2
    saes = {}
    for L in range(vlm.n_layers):
        torch.manual_seed(0)
        steps = cfg.sae_steps if L == mid else max(cfg.sae_steps // 2, 100)
        saes[L] = vsae.train(tokens, "paper", layer=L, expansion=cfg.sae_expansion, steps=steps, progress=False,
                             checkpoint_dir=out / f"layer-{L}", model_name=vlm.name, **options)
    ev = vsae.evaluate(saes[mid], tokens, layer=mid)
    lr = vsae.loss_recovered(vlm, saes[mid], mid, held_caps, prompt=prompts.CAPTION_PROMPT)
    share = vsae.sharing_by_layer(saes)
    return {
        "layer": mid,
        "eval": {k: {m: v.get(m) for m in ("explained_variance", "l0", "dead")} for k, v in ev.items()},
        "loss_recovered": {k: v.get("loss_recovered") for k, v in lr.items()},
        "mean_decoder_norm": saes[mid].W_dec.norm(dim=1).mean().item(),
        "shared_by_layer": {L: s.get("shared") for L, s in share.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fast", action="store_true", help="the demo's CI sizes (DemoConfig.fast())")
    args = ap.parse_args()
    cfg = DemoConfig.fast() if args.fast else DemoConfig()
    vlm = vlens.load("toy")
    caps = vdata.toy("train", n=cfg.n_train)
    held_caps = [s for s in vdata.toy("heldout", n=cfg.n_heldout) if s.caption][: max(8, cfg.steer_images)]
    with tempfile.TemporaryDirectory() as tmp:
        tokens = harvest(vlm, caps[: cfg.n_sae_samples], list(range(vlm.n_layers)), tokens="image+answer",
                         captions=True, text_only=True, batch_size=cfg.batch_size, out=Path(tmp) / "store",
                         prompt=prompts.CAPTION_PROMPT, progress=False)
        result = {name: one_loss(vlm, tokens, held_caps, cfg, opts, Path(tmp) / f"ck{i}")
                  for i, (name, opts) in enumerate(LOSSES.items())}
    print(json.dumps({"config": "fast" if args.fast else "full", "n_tokens": len(tokens), **result}, default=str))


if __name__ == "__main__":
    main()
