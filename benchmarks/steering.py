"""Steered generation speed: vlens (nnsight, KV cache) vs plain HF generate vs re-running without a cache.

A larger tiny LLaVA-Next (d_model 512, 8 layers, 64-px tiles with 8-px patches: a
128x128 image gives 64 base + 256 high-res + 16 newline = 336 image tokens), a batch
of images, 64 new tokens (min_new_tokens pins the length). Three ways, interleaved,
medians reported:

* plain: `model.generate` of transformers, no intervention;
* steered: `vlens.steering.steered_generate` adding k·v at the image tokens of layer 4
  during the prefill (the paper), decoding from the KV cache;
* no cache: the same steered greedy decode by re-running the whole sequence for every
  new token (plain torch forward with a hook, use_cache=False; run once, it is slow).

`steered_vs_plain_generate` = steered / plain (goal <= 1.15); `cache_speedup` = no cache /
steered (goal >= 5). The `_toy` figures repeat this on the toy model. With `--sweep`,
also runs the paper's steering evaluation on the toy model over many class pairs
(`--pair-kind colour`: same shape, other colour; `shape`; `any`) and reports the fraction
of pairs with a k that flips >= 90% of held-out answers, and the damage at that k.

Usage: python benchmarks/steering.py [--batch 4] [--new 64] [--repeats 3] [--sweep]
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import vlens
from vlens.steering import steered_generate


def images(n: int, size: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def no_cache_generate(vlm, batch, v, layer, k, n_new):
    """Greedy decode re-running the full sequence each step, steering the prompt's image tokens."""
    model = vlm.hf_model
    mask = batch.layout.image.to(vlm.device)
    S = mask.shape[1]
    vec = (k * v).to(vlm.device, vlm.dtype)

    def hook(mod, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        h = h.clone()
        h[:, :S][mask] += vec
        if args:
            return (h, *args[1:]), kwargs
        kwargs["hidden_states"] = h
        return args, kwargs

    layer_mod = model.model.language_model.layers[layer]
    handle = layer_mod.register_forward_pre_hook(hook, with_kwargs=True)
    ids = batch.inputs["input_ids"]
    att = batch.inputs["attention_mask"]
    try:
        with torch.no_grad():
            for _ in range(n_new):
                pos = (att.cumsum(-1) - 1).clamp(min=0)
                out = model(input_ids=ids, attention_mask=att, position_ids=pos, pixel_values=batch.inputs["pixel_values"],
                            image_sizes=batch.inputs["image_sizes"], use_cache=False)
                logits = out.logits[:, -1]
                logits[:, vlm.tokenizer.eos_token_id] = -float("inf")  # as min_new_tokens does in generate
                nxt = logits.argmax(-1, keepdim=True)
                ids = torch.cat([ids, nxt], 1)
                att = torch.cat([att, torch.ones_like(nxt)], 1)
    finally:
        handle.remove()
    return ids


def measure(vlm, batch, n_new: int, repeats: int, layer: int, label: str) -> dict:
    v = torch.randn(vlm.d_model, generator=torch.Generator().manual_seed(0))
    v = v / v.norm() * 4
    kw = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
    gen_kw = dict(kw, temperature=None, top_p=None, top_k=None)
    # warm up both paths once
    vlm.hf_model.generate(**batch.inputs, **gen_kw)
    steered_generate(vlm, batch, v, layer=layer, k=1.0, **kw)
    t_plain, t_steer = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.no_grad():
            vlm.hf_model.generate(**batch.inputs, **gen_kw)
        t_plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        _, ids = steered_generate(vlm, batch, v, layer=layer, k=1.0, return_ids=True, **kw)
        t_steer.append(time.perf_counter() - t)
    t = time.perf_counter()
    ids_nc = no_cache_generate(vlm, batch, v, layer, 1.0, n_new)
    t_nc = time.perf_counter() - t
    same = bool(torch.equal(ids_nc, ids))
    tp, ts = statistics.median(t_plain), statistics.median(t_steer)
    print(f"{label}: {len(batch)} images x {int(batch.layout.image[0].sum())} image tokens, seq {batch.layout.shape[1]}, "
          f"{n_new} new tokens | plain {tp:.2f}s  steered {ts:.2f}s  no-cache {t_nc:.2f}s  "
          f"(steered ids == no-cache ids: {same})", flush=True)
    return dict(plain_s=tp, steered_s=ts, no_cache_s=t_nc, ratio=ts / tp, cache_speedup=t_nc / ts, same_ids=same)


def toy_sweep(n_pairs: int, n_images: int, kind: str = "colour", layers=(1,), ks=(0, 2, 3, 4, 6, 8)) -> dict:
    import vlens.toy as toy
    from vlens import steering

    from probes import mean_image_features  # benchmarks/probes.py, beside this file

    vlm = vlens.load("toy")
    layers = list(layers)
    train = toy.toy_dataset("train", n=20 * 16)
    held = toy.toy_dataset("heldout", n=20 * n_images)
    feats = mean_image_features(vlm, train, layers)
    y = torch.tensor([s.label for s in train])
    means = {L: steering.class_means(X, y) for L, X in feats.items()}
    pairs = toy.class_pairs(kind)
    rng = np.random.default_rng(0)
    pairs = [pairs[i] for i in rng.choice(len(pairs), size=min(n_pairs, len(pairs)), replace=False)]
    captions = toy.toy_dataset("heldout", n=32, seed=1)
    prompt = toy.two_choice_prompt
    sw = steering.sweep(vlm, pairs, ks=list(ks), layers=layers, data=held, vectors=means,
                        captions=captions, n_images=n_images, n_captions=32, prompt=prompt,
                        caption_prompt=toy.CAPTION_PROMPT)
    best: dict = {}
    for s in sw.success(0.9):  # per pair: the layer needing the smallest k
        key = (s["src"], s["tgt"])
        if s["k"] is not None and (key not in best or s["k"] < best[key]["k"]):
            best[key] = s
    ok = list(best.values())
    return dict(toy_pair_kind=kind, toy_pairs=len(pairs), toy_pairs_flipped_frac=round(len(ok) / len(pairs), 3),
                toy_damage_at_flip_median=round(statistics.median(s["damage"] for s in ok), 4) if ok else None,
                toy_k_at_flip_median=statistics.median(s["k"] for s in ok) if ok else None, toy_layers=layers,
                toy_ks=list(ks), toy_images_per_pair=n_images)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sweep", action="store_true", help="also run the toy steering evaluation over class pairs")
    ap.add_argument("--only-sweep", action="store_true", help="run only the toy steering evaluation")
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--pair-kind", default="colour", help="toy class pairs: colour, shape or any")
    ap.add_argument("--layers", default="1", help="toy layers to steer, comma-separated (a pair counts if any works)")
    ap.add_argument("--ks", default="0,2,3,4,6,8", help="coefficients k, comma-separated")
    ap.add_argument("--images", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.only_sweep:
        print(json.dumps(toy_sweep(args.pairs, args.images, args.pair_kind,
                  [int(x) for x in args.layers.split(",")], [float(x) for x in args.ks.split(",")])))
        return
    vlm = vlens.tiny(d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, image_size=64, patch_size=8,
                     vision_d_model=128, vision_layers=2)
    batch = vlm.prepare(["<image>\nWhat is shown in this image?"] * args.batch, images(args.batch, 128))
    big = measure(vlm, batch, args.new, args.repeats, 4, "tiny d512 x 8 layers")
    out = dict(steered_vs_plain_generate=round(big["ratio"], 3), cache_speedup=round(big["cache_speedup"], 2),
               plain_generate_s=round(big["plain_s"], 3), steered_generate_s=round(big["steered_s"], 3),
               no_cache_s=round(big["no_cache_s"], 3), steered_equals_no_cache=big["same_ids"],
               image_tokens_per_image=int(batch.layout.image[0].sum()), batch=args.batch, new_tokens=args.new)
    if (Path(vlens.__file__).parent / "toy" / "checkpoint").exists():
        import vlens.toy as toy

        tv = vlens.load("toy")
        ds = toy.toy_dataset("heldout", n=args.batch)
        tb = tv.prepare([toy.CAPTION_PROMPT] * args.batch, [s.image for s in ds])
        t = measure(tv, tb, args.new, args.repeats, 1, "toy")
        out.update(steered_vs_plain_generate_toy=round(t["ratio"], 3), cache_speedup_toy=round(t["cache_speedup"], 2),
                   steered_equals_no_cache_toy=t["same_ids"])
        if args.sweep:
            out.update(toy_sweep(args.pairs, args.images, args.pair_kind,
                  [int(x) for x in args.layers.split(",")], [float(x) for x in args.ks.split(",")]))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
