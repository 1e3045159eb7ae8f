"""`vlens demo`: every experiment of the paper, end to end, on the toy model (or a real one), into one HTML report.

Stages (each a few library calls; read this file as a worked example):

1. harvest mean-pooled image-token activations at every layer (`vlens.harvest`);
2. linear probes by layer (`vlens.probes.sweep`), and where the best one
   looks: gradient × activation of its class logit, as heatmaps over
   held-out images (`vlens.attribution`);
3. a steering vector for a class pair (difference of class means), with
   generations before and after on held-out images, and an efficacy/damage
   sweep over k (`vlens.steering`);
4. multimodal SAEs on image + caption tokens (plus a text-only caption pass)
   at every layer, evaluated at the middle layer (explained variance, L0,
   loss recovered per modality) (`vlens.sae`);
5. modality sharing by layer (`vlens.sae.sharing_by_layer`);
6. export of the middle-layer SAE to SAE-Lens's format, reloaded with plain
   `sae_lens.SAE.load_from_disk`, and feature dashboards (with each top
   image's attribution map);
7. a self-contained HTML report, whose path is printed last.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import InputError
from .model import VLM


@dataclass
class DemoConfig:
    """Sizes of the demo; `fast()` is the CI-sized version."""

    n_train: int = 400
    n_heldout: int = 120
    n_sae_samples: int = 300
    sae_steps: int = 1500
    sae_expansion: int = 8
    sae_preset: str = "topk"
    sae_k: int = 16
    steer_images: int = 24
    ks: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0, 8.0)
    n_pairs: int = 3
    n_dashboards: int = 8
    batch_size: int = 16
    sae_layer_stride: int = 1  # SAEs every this many layers (the middle and last layers always)
    sae_batch_size: int = 0  # rows per SAE step; 0: the preset's

    @classmethod
    def fast(cls) -> "DemoConfig":
        return cls(n_train=120, n_heldout=40, n_sae_samples=60, sae_steps=300, steer_images=8, ks=(0.0, 2.0, 8.0),
                   n_pairs=1, n_dashboards=3)

    @classmethod
    def for_model(cls, name: str, fast: bool = False) -> "DemoConfig":
        """The demo's sizes for a model: `fast()` or the default, and for `"toy-gemma"` the real-LM sizes.

        The real-LM toy (18 layers x d_model 640) gets SAEs of 16x width (d_sae 10,240) every third
        layer, with fewer, smaller steps, so its SAE stage fits a 2-core machine.

        Example:
            >>> c = DemoConfig.for_model("toy-gemma")
            >>> c.sae_expansion, c.sae_layer_stride
            (16, 3)
        """
        base = cls.fast() if fast else cls()
        if name != "toy-gemma":
            return base
        return dataclasses.replace(base, sae_expansion=16, sae_layer_stride=3, sae_batch_size=1024,
                                   sae_steps=base.sae_steps // 3, ks=(0.0, 2.0, 4.0, 8.0, 16.0))


#: Models whose data the demo generates itself: the embedded toy and the real-LM toy (`vlens.load("toy-gemma")`).
TOY_MODELS = ("toy", "toy-gemma")


def _stage(name: str) -> float:
    print(f"\n== {name}", flush=True)
    return time.perf_counter()


@dataclass
class _Demo:
    """What every stage of one demo run reads: the model, its data, the sizes and the report being written."""

    vlm: VLM
    cfg: DemoConfig
    out: Path
    report: Any
    train: Any
    heldout: Any
    cap_data: Any
    names: list[str]
    toy_model: bool
    timings: dict[str, float]

    @property
    def layers(self) -> list[int]:
        return list(range(self.vlm.n_layers))

    @property
    def mid(self) -> int:
        return self.vlm.n_layers // 2

    @property
    def sae_layers(self) -> list[int]:
        stride = max(1, self.cfg.sae_layer_stride)
        return sorted({*self.layers[::stride], self.mid, self.layers[-1]})


def run(
    out: str | Path = "vlens-demo",
    *,
    model: "str | VLM" = "toy",
    device: str | None = None,
    fast: bool = False,
    data: str | None = None,
    captions: str | None = None,
    image_root: str | None = None,
    config: DemoConfig | None = None,
) -> str:
    """Run the whole demo and return the report's path.

    `model="toy"` uses the embedded toy model and its generated data;
    `model="toy-gemma"` the real-LM toy (Gemma 3 270M) on the same data,
    at `DemoConfig.for_model("toy-gemma")`'s sizes. Any
    other model (a name for `vlens.load`, e.g. `"llava-hf/llava-v1.6-mistral-7b-hf"`
    with `device="cuda"`, or a `VLM` you built) needs `data`: an image-class folder (`class/xxx.jpg`) or
    an HF dataset id with `image`/`label` columns, and `captions`: a
    ShareGPT4V-style JSON (with `image_root`) for the SAE stages.

    Example:
        >>> path = run("/tmp/vlens-demo-doc", fast=True)  # doctest: +SKIP
    """
    cfg = config or DemoConfig.for_model(model if isinstance(model, str) else model.name, fast)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    torch.manual_seed(0)
    d = _start(model, device, cfg, out, data, captions, image_root)
    pooled = _harvest_stage(d)
    acc = _probe_stage(d, pooled)
    sw, succ = _steering_stage(d, pooled)
    saes, tokens, ev, lr = _sae_stage(d)
    share = _modality_stage(d, saes)
    _export_stage(d, saes[d.mid], tokens)
    d.timings["total"] = time.perf_counter() - t_start
    d.report.section("Timings", "Seconds per stage on this machine.")
    d.report.table([{k: round(v, 1) for k, v in d.timings.items()}])
    (out / "results.json").write_text(json.dumps({
        "model": d.vlm.name, "probe_accuracy": acc, "steering_success_rate": sw.success_rate(),
        "steering": succ, "sae": ev, "loss_recovered": lr, "sharing": share, "timings": d.timings,
    }, indent=1, default=str))
    path = d.report.save(out / "report.html")
    print(f"\nreport: {path}")
    return path


def _start(model, device, cfg: DemoConfig, out: Path, data, captions, image_root) -> _Demo:
    """Load the model and the data, and open the report."""
    from .loading import load
    from .viz import Report

    t = _stage(f"load {model if isinstance(model, str) else model.name}")
    vlm = model if isinstance(model, VLM) else load(model, device=device)
    toy_model = vlm.name in TOY_MODELS
    train, heldout, cap_data = _data(toy_model, cfg, data, captions, image_root)
    report = Report(
        f"vlens demo — {vlm.name}",
        f"Every experiment of <i>Line of Sight</i> (Rajaram et al., 2025) on <code>{vlm.name}</code>: "
        f"{vlm.n_layers} LM layers × d_model {vlm.d_model}. Residual sites are <code>resid_pre.L</code> "
        "(HF <code>hidden_states[L]</code>).",
    )
    d = _Demo(vlm, cfg, out, report, train, heldout, cap_data, list(train.class_names or []), toy_model, {})
    d.timings["load"] = time.perf_counter() - t
    return d


def _harvest_stage(d: _Demo):
    """Stage 1: mean image-token activations at every layer."""
    from . import prompts
    from .activations import harvest

    t = _stage(f"1/6 harvest mean image-token activations at all {len(d.layers)} layers ({len(d.train)} images)")
    pooled = harvest(d.vlm, d.train, d.layers, tokens="image", pool="mean", batch_size=d.cfg.batch_size,
                     out=d.out / "store-pooled", prompt=prompts.QUESTION, overwrite=True)
    d.report.section("Data", f"{len(d.train)} training and {len(d.heldout)} held-out images, "
                     f"{len(d.names)} classes.")
    d.report.images([(s.image, s.caption or d.names[s.label]) for s in list(d.heldout)[:10]])
    d.timings["harvest"] = time.perf_counter() - t
    return pooled


def _probe_stage(d: _Demo, pooled) -> dict:
    """Stage 2: probes by layer, and where the best one looks (gradient × activation)."""
    from . import attribution, probes, prompts

    t = _stage("2/6 linear probes by layer")
    names, report = d.names, d.report
    sweep = probes.sweep(pooled, d.layers)
    acc = sweep.accuracy
    print("held-out accuracy by layer: " + ", ".join(f"{L}: {a:.3f}" for L, a in acc.items()))
    report.section("Linear probes", "Softmax probes on the mean image-token residual, held-out accuracy by layer. "
                   f"Best layer {sweep.best_layer} ({acc[sweep.best_layer]:.3f}); chance is {1 / max(len(names), 1):.3f}.")
    report.figure(sweep.figure())
    report.text(f"Classes decodable at ≥ 0.9 at layer {sweep.best_layer}: "
                f"{', '.join(names[c] if isinstance(c, int) else str(c) for c in probes.decodable_classes(sweep, 0.9))}.",
                note=True)
    look_layer = max(sweep.best_layer, 1)  # attributed back to resid_pre.0, so a later layer
    overlays = []
    for s in list(d.heldout)[:6]:
        one = d.vlm.prepare(prompts.QUESTION, [s.image])
        target = attribution.probe_target(sweep.probes[look_layer], look_layer, int(s.label))
        att = attribution.grad_x_act(d.vlm, one, target, site=0)
        overlays += [(s.image, names[s.label]), (att.overlay(s.image), "attribution")]
    report.text(f"Where the layer-{look_layer} probe looks: gradient × activation at <code>resid_pre.0</code> of the "
                "true class's probe logit (positive part), painted over each held-out image by its tokens' pixel "
                "boxes (<code>vlens.attribution.grad_x_act</code>).")
    report.images(overlays)
    d.timings["probes"] = time.perf_counter() - t
    return acc


def _steering_stage(d: _Demo, pooled):
    """Stage 3: generations before/after one steering vector, and the efficacy/damage sweep."""
    from . import prompts, steering

    t = _stage("3/6 steering with class-mean differences")
    vlm, cfg, names, heldout, mid, question = d.vlm, d.cfg, d.names, d.heldout, d.mid, prompts.QUESTION
    pairs = _pairs(d.toy_model, names, heldout, cfg.n_pairs)
    means = {L: steering.class_means(*pooled.pooled(L), n_classes=len(names)) for L in d.layers}
    src, tgt = pairs[0]
    si, ti = names.index(src), names.index(tgt)
    src_images = [s.image for s in heldout if s.label == si][: min(cfg.steer_images, 6)]
    batch = vlm.prepare([question] * len(src_images), src_images)
    v = means[mid][ti] - means[mid][si]
    before = steering.steered_generate(vlm, batch, None, max_new_tokens=6)
    rows = [{"k": 0.0, **{f"image {i}": a for i, a in enumerate(before)}}]
    for k in [k for k in cfg.ks if k > 0]:
        after = steering.steered_generate(vlm, batch, v, layer=mid, k=k, max_new_tokens=6)
        rows.append({"k": k, **{f"image {i}": a for i, a in enumerate(after)}})
    print(f"steering {src} → {tgt} at layer {mid}:")
    for r in rows:
        print(f"  k={r['k']:>4}: {[r[f'image {i}'] for i in range(len(src_images))]}")
    sw = steering.sweep(vlm, pairs, cfg.ks, sorted({max(mid - 1, 0), mid}), data=heldout, vectors=means,
                        captions=d.cap_data, n_images=cfg.steer_images, n_captions=min(16, cfg.steer_images),
                        prompt=prompts.two_choice_prompt, caption_prompt=prompts.CAPTION_PROMPT,
                        random_control=True)
    succ = sw.success()
    _report_steering(d, src, tgt, src_images, rows, sw, succ)
    d.timings["steering"] = time.perf_counter() - t
    return sw, succ


def _report_steering(d: _Demo, src: str, tgt: str, src_images, rows, sw, succ) -> None:
    """The steering section of the report: generations before/after, the sweep's figures and table."""
    from . import prompts

    report = d.report
    report.section("Steering", f"Adding k·(mean<sub>{tgt}</sub> − mean<sub>{src}</sub>) to every image token at "
                   f"<code>resid_pre.{d.mid}</code> during the prefill only, then decoding greedily from the KV "
                   f"cache. Answers to <i>{html.escape(prompts.QUESTION)}</i> on held-out images of class "
                   f"<b>{src}</b>:")
    report.images([(im, f"image {i}") for i, im in enumerate(src_images)])
    report.table(rows)
    for fig in sw.figures().values():
        report.figure(fig)
    report.table(succ, ["src", "tgt", "layer", "k", "flip_rate", "damage"])
    report.text(f"Fraction of pairs with a k that flips ≥ 90% of answers: {sw.success_rate():.2f}. "
                "Damage is the increase of caption NLL (nats per token) at that k. A random vector of the same norm "
                "is the control (random_flip_rate in the sweep).", note=True)


def _sae_stage(d: _Demo):
    """Stage 4: multimodal SAEs at every layer, evaluated at the middle one."""
    from . import prompts
    from . import sae as vsae
    from .activations import harvest

    layers = d.sae_layers
    t = _stage(f"4/6 multimodal SAEs on image + caption tokens at {len(layers)} of {len(d.layers)} layers")
    cfg, mid, cap_prompt = d.cfg, d.mid, prompts.CAPTION_PROMPT
    tokens = harvest(d.vlm, d.cap_data[: cfg.n_sae_samples], layers, tokens="image+answer", captions=True,
                     text_only=True, batch_size=cfg.batch_size, out=d.out / "store-tokens", prompt=cap_prompt,
                     overwrite=True)
    mix = tokens.filter(modality="image"), tokens.filter(modality="text")
    print(f"{len(tokens)} tokens: {len(mix[0])} image, {len(mix[1])} text")
    saes = {}
    for L in layers:
        steps = cfg.sae_steps if L == mid else max(cfg.sae_steps // 2, 100)
        extra = {"k": cfg.sae_k} if cfg.sae_preset in ("topk", "batchtopk") else {}
        extra |= {"batch_size": cfg.sae_batch_size} if cfg.sae_batch_size else {}
        saes[L] = vsae.train(tokens, cfg.sae_preset, layer=L, expansion=cfg.sae_expansion, steps=steps, **extra,
                             checkpoint_dir=d.out / "sae-checkpoints" / f"layer-{L}", model_name=d.vlm.name,
                             progress=True)
    sae = saes[mid]
    ev = vsae.evaluate(sae, tokens, layer=mid)
    held_caps = [s for s in d.heldout if s.caption][: max(8, cfg.steer_images)]
    lr = vsae.loss_recovered(d.vlm, sae, mid, held_caps, prompt=cap_prompt)
    d.report.section(f"Multimodal SAE at layer {mid}",
                     f"{sae.cfg.architecture()} SAE ({cfg.sae_preset} preset), {sae.cfg.d_sae} latents "
                     f"(×{cfg.sae_expansion}), trained on "
                     f"{len(tokens)} tokens ({len(mix[0])} image, {len(mix[1])} caption, incl. a text-only pass).")
    d.report.text("The paper's ReLU recipe is <code>vlens.sae.train(store, \"paper\")</code> (pass "
                  "<code>sae_preset=\"paper\"</code> to <code>DemoConfig</code>); on the toy model TopK reaches the "
                  "sparsity/fidelity bar (EV ≥ 0.9 at L0 ≤ 32) in far fewer steps.", note=True)
    d.report.table([{"tokens": k, **{m: v.get(m) for m in ("explained_variance", "l0", "dead", "n_tokens")},
                     "loss_recovered": lr.get(k, {}).get("loss_recovered")} for k, v in ev.items()])
    d.timings["sae"] = time.perf_counter() - t
    return saes, tokens, ev, lr


def _modality_stage(d: _Demo, saes) -> dict:
    """Stage 5: modality sharing by layer."""
    from . import sae as vsae

    t = _stage("5/6 modality sharing by layer")
    share = vsae.sharing_by_layer(saes)
    for L, s in share.items():
        print(f"  layer {L}: " + ", ".join(f"{k} {v:.3f}" for k, v in s.items() if isinstance(v, float)))
    d.report.section("Modality sharing by layer",
                     "Each latent's image share of activation mass, normalised by token counts (0 = text only, "
                     "1 = image only); latents between the thresholds count as shared. The paper finds sharing "
                     "grows with depth.")
    d.report.figure(vsae.plot_sharing_by_layer(saes))
    d.report.figure(vsae.plot_modality_histogram(saes))
    d.timings["modality"] = time.perf_counter() - t
    return share


def _export_stage(d: _Demo, sae, tokens) -> None:
    """Stage 6: export to SAE-Lens, reload with plain SAE-Lens, and the feature dashboards."""
    import sae_lens

    from . import prompts
    from . import sae as vsae

    t = _stage("6/6 export to SAE-Lens and feature dashboards")
    vlm, cfg, mid, out = d.vlm, d.cfg, d.mid, d.out
    export_dir = out / f"sae-lens-layer-{mid}"
    vsae.export(sae, export_dir, model_name=vlm.name, hook_name=vlm.hook_name(f"resid_pre.{mid}"))
    plain = sae_lens.SAE.load_from_disk(str(export_dir))
    x = tokens.activations(mid)[: min(512, len(tokens))].float()
    same = torch.equal(plain.encode(x), sae.encode(x))
    print(f"exported to {export_dir}; plain SAE-Lens reload encodes identically: {same}")
    dash = vsae.dashboard(sae, vlm, list(d.heldout)[: max(16, cfg.steer_images)], out / "dashboards",
                          layer=mid, n_latents=cfg.n_dashboards, prompt=prompts.CAPTION_PROMPT,
                          attribution=0 if mid > 0 else None)
    d.report.section("Export and dashboards",
                     f"<code>{export_dir}</code> loads with <code>sae_lens.SAE.load_from_disk</code> "
                     f"(identical encodings: {same}).")
    d.report.link(Path(dash).resolve().relative_to(out.resolve()).as_posix(),
                  "Feature dashboards (top images with patch heatmaps, top text contexts)")
    d.timings["export"] = time.perf_counter() - t


def _data(toy_model: bool, cfg: DemoConfig, data: str | None, captions: str | None, image_root: str | None):
    """(train, heldout, caption data) for the model; the prompts are the paper's (`vlens.prompts`)."""
    from . import data as vdata

    if toy_model and data is None:
        return vdata.toy("train", n=cfg.n_train), vdata.toy("heldout", n=cfg.n_heldout), vdata.toy("train", n=cfg.n_train)
    if data is None or captions is None:
        raise InputError(
            "a model other than the toy needs data: --data <image folder class/xxx.jpg or HF dataset id> and "
            "--captions <ShareGPT4V json> --image-root <dir> (no dataset can be downloaded by the demo itself)"
        )
    classes = vdata.image_folder(data) if Path(data).is_dir() else vdata.from_hf(data, split="validation")
    train_idx, held_idx = split_per_class(classes.labels(), cfg.n_train, cfg.n_heldout, names=classes.class_names)
    train = vdata.ListDataset([classes[i] for i in train_idx], class_names=classes.class_names)
    heldout = vdata.ListDataset([classes[i] for i in held_idx], class_names=classes.class_names)
    return train, heldout, vdata.sharegpt4v(captions, image_root=image_root)


HELDOUT_SHARE = 0.25
"""The share of each class's images the demo holds out (before the caps of n_train / n_heldout)."""


def split_per_class(labels: Sequence[int | None], n_train: int, n_heldout: int, *, share: float = HELDOUT_SHARE,
                    names: Sequence[str] | None = None, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices of a training and a held-out split, per class and in proportion.

    Each class gives `share` of its images (rounded, at least one) to the
    held-out split and the rest (at least one) to training, in a seeded random
    order; when the splits would exceed `n_train` / `n_heldout`, every class is
    cut in the same proportion. A class with fewer than 2 images is refused,
    with how many it needs. Unlabelled samples are left out.

    Example:
        >>> labels = [0] * 10 + [1] * 10 + [2] * 10
        >>> train, held = split_per_class(labels, n_train=120, n_heldout=40)
        >>> len(train), len(held), sorted({labels[i] for i in held})
        (21, 9, [0, 1, 2])
    """
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        if y is not None and int(y) >= 0:
            by_class.setdefault(int(y), []).append(i)
    small = {c: len(v) for c, v in by_class.items() if len(v) < 2}
    if small:
        what = ", ".join(f"{names[c] if names else c!r}: {k}" for c, k in sorted(small.items()))
        raise InputError(f"the demo needs at least 2 images per class (one to train on, one held out); "
                         f"{what}: add images to those classes in --data, or remove them")
    g = torch.Generator().manual_seed(seed)
    held = {c: max(1, min(len(v) - 1, int(len(v) * share + 0.5))) for c, v in by_class.items()}
    n_held, n_tr = sum(held.values()), sum(len(v) - held[c] for c, v in by_class.items())
    f_held, f_tr = min(1.0, n_heldout / n_held), min(1.0, n_train / n_tr)
    train_idx, held_idx = [], []
    for c, idx in sorted(by_class.items()):
        order = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        h = max(1, math.floor(held[c] * f_held))
        t = max(1, math.floor((len(idx) - held[c]) * f_tr))
        held_idx += order[:h]
        train_idx += order[held[c]: held[c] + t]
    return sorted(train_idx), sorted(held_idx)


def _pairs(toy_model: bool, names: Sequence[str], heldout: Any, n: int) -> list[tuple[str, str]]:
    """Class pairs to steer: the toy's own pairs, or consecutive classes that have held-out images to steer."""
    if toy_model:
        from .toy import class_pairs

        return list(class_pairs())[:n]
    present = sorted({int(s.label) for s in heldout if s.label is not None})
    if len(present) < 2:
        raise InputError(
            f"the held-out split has images of {len(present)} class(es); steering needs two: give more images per "
            "class in --data, or a larger n_heldout"
        )
    pairs = [(names[present[i]], names[present[i + 1]]) for i in range(0, len(present) - 1, 2)]
    return pairs[: max(1, n)]