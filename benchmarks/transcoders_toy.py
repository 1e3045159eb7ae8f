"""Transcoders on the toy model (quality numbers, not timings: fine on a busy machine).

One transcoder per layer of the embedded toy model (`vlens.load("toy")`), `mlp_in.L` → `mlp_out.L`,
all trained from one streaming pass (`vlens.sae.train_many`) over `vlens.data.toy("train", n=N)`
image + caption tokens (`tokens="image+answer"`, `captions=True`), for each architecture asked
(ReLU `standard`, `topk`, `jumprelu`; `--skip` adds SAE-Lens's skip connection). Reported on
held-out `vlens.data.toy("heldout")` samples, per layer and modality (`vlens.sae.evaluate_transcoders`):
explained variance of mlp_out, L0 and dead latents; and with every MLP replaced at once
(`vlens.sae.replacement_loss_recovered`): the caption CE clean, replaced, with error terms
(= clean), zero-ablated, and loss recovered.

    python benchmarks/transcoders_toy.py --out docs/assets/transcoders_toy.json
    python benchmarks/transcoders_toy.py --quick                                 # tiny, for a smoke run

The last line printed is one JSON object (also written to `--out`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def run(archs: list[str], n_train: int, n_test: int, steps: int, d_sae: int, k: int, skip: bool) -> dict:
    import vlens
    import vlens.sae as vs
    from vlens import data as vdata
    from vlens import prompts

    vlm = vlens.load("toy")
    train, test = vdata.toy("train", n=n_train), vdata.toy("heldout", n=n_test)
    out: dict = {"model": "toy", "n_layers": vlm.n_layers, "d_model": vlm.d_model, "n_train": n_train,
                 "n_test": n_test, "steps": steps, "d_sae": d_sae, "skip": skip, "results": {}}
    specs = {}
    for arch in archs:
        extra = {"k": k} if arch == "topk" else {}
        for name, spec in vs.transcoder_specs(vlm, arch, skip=skip, d_sae=d_sae, **extra).items():
            specs[f"{arch}-{name}"] = spec
    tcs = vs.train_many(vlm, train, specs, steps=steps, batch_size=512, prompt=prompts.CAPTION_PROMPT,
                        tokens="image+answer", captions=True, progress=False, stats_tokens=0)
    for arch in archs:
        mine = {n: t for n, t in tcs.items() if n.startswith(f"{arch}-")}
        per_layer = vs.evaluate_transcoders(vlm, mine, test, prompt=prompts.CAPTION_PROMPT, progress=False)
        keep = ("explained_variance", "l0", "dead", "n_tokens")
        rep = vs.replacement_loss_recovered(vlm, mine, test, prompt=prompts.CAPTION_PROMPT, progress=False)
        out["results"][arch] = {
            "per_layer": {L: {g: {m: r[g][m] for m in keep} for g in r} for L, r in per_layer.items()},
            "replacement": {g: {m: v for m, v in r.items() if m != "layers"} for g, r in rep.items()},
            "type": type(next(iter(mine.values()))).__name__,
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", default="standard,topk,jumprelu")
    p.add_argument("--n-train", type=int, default=400)
    p.add_argument("--n-test", type=int, default=60)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--d-sae", type=int, default=512)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--skip", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny settings (a smoke run)")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    if a.quick:
        a.n_train, a.n_test, a.steps, a.d_sae = 16, 6, 4, 64
    result = run(a.archs.split(","), a.n_train, a.n_test, a.steps, a.d_sae, a.k, a.skip)
    text = json.dumps(result)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1))
    print(text)
    return result


if __name__ == "__main__":
    main()
