"""Evaluate SAEs: reconstruction metrics per modality and loss recovered with the SAE spliced into the model.

`evaluate(sae, data)` streams activations (any source `train` accepts) and reports,
overall and on image / text tokens separately:

- `explained_variance` = 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² (x̄: the mean over that group's tokens);
- `l0`: mean number of latents firing per token; `dead`: latents that never fired on the group;
- `mse`: mean over tokens of ‖x − x̂‖²;
- SAE-Bench's `core` names, SAE-Lens's definitions: `cossim` (mean cos(x, x̂)), `l1` (mean Σ|f|),
  `l2_norm_in` / `l2_norm_out` (mean ‖x‖, ‖x̂‖), `l2_ratio` (mean ‖x̂‖/‖x‖),
  `relative_reconstruction_bias` (E‖x̂‖² / E⟨x, x̂⟩), `frac_alive` (1 − dead/d_sae),
  `total_tokens_eval_sparsity_variance` (= `n_tokens`).

`loss_recovered(vlm, sae, layer, samples)` runs the model on image+caption batches
and splices the SAE into its own site (`sae.cfg.metadata.hook_name`, else `layer`: see
`vlens.sae.io.site_of`) with `vlens.interventions.splice_sae` (the residual at the selected
positions replaced by `decode(encode(.))`):

    loss recovered = 1 − (CE_spliced − CE_clean) / (CE_zero − CE_clean)

with CE the mean next-token cross-entropy on the caption (answer) tokens, scored by
`vlens.scoring.score_answers`, and CE_zero the same with the residual zero-ablated at
those positions (`vlens.interventions.ablate`). "overall" splices every image and caption
token; "image" only image tokens; "text" only caption tokens. Each group also carries
SAE-Bench's names: `ce_loss_score` (= loss recovered), `ce_loss_with_sae`,
`ce_loss_without_sae`, `ce_loss_with_ablation`, `total_tokens_eval_reconstruction`.
`sae_bench_core` nests one group of both results as SAE-Bench's `eval_result_metrics`.

Transcoders (`vlens.sae.transcoder`): `evaluate_transcoders(vlm, transcoders, samples)` gives
the same metrics per layer and modality for the prediction of `mlp_out.L` from `mlp_in.L`
on the clean model; `replacement_loss_recovered(vlm, transcoders, samples)` replaces every
MLP by its transcoder in one forward, with and without error terms.

Why not SAE-Lens's `sae_lens.evals`: it runs a TransformerLens `HookedTransformer` on text
token batches; a VLM runs through nnsight with images, and the metrics here are split by
modality.
"""

from __future__ import annotations

from typing import Any, Sequence, TYPE_CHECKING

import torch
from sae_lens import SAE
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import InputError, NonFiniteActivations
from ..activations import read_layers
from ..interventions import ablate, splice_sae, splice_transcoder
from ..prompts import QUESTION
from ..roles import IMAGE, TEXT
from ..scoring import bos_id, score_answers
from ..sites import Site, SiteLike, from_hook_name
from .sources import as_source
from .io import site_of
from .transcoder import is_transcoder

if TYPE_CHECKING:
    from ..model import VLM


#: SAE-Bench `core` metric categories (`CoreMetricCategories`) and the keys of vlens results that fill them.
SAE_BENCH_CORE: dict[str, tuple[str, ...]] = {
    "model_performance_preservation": ("ce_loss_score", "ce_loss_with_ablation", "ce_loss_with_sae",
                                       "ce_loss_without_sae"),
    "reconstruction_quality": ("explained_variance", "mse", "cossim"),
    "shrinkage": ("l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"),
    "sparsity": ("l0", "l1"),
    "token_stats": ("total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance"),
    "misc_metrics": ("frac_alive",),
}


class _Group:
    def __init__(self, d_sae: int) -> None:
        self.n = 0
        self.sum_x: Tensor | None = None
        self.sum_sq = 0.0
        self.sse = 0.0
        self.l0 = 0.0
        self.fired = torch.zeros(d_sae, dtype=torch.bool)
        self.sums = dict.fromkeys(("l1", "cossim", "l2_in", "l2_out", "l2_ratio", "xhat_sq", "x_xhat"), 0.0)

    def add(self, x: Tensor, x_hat: Tensor, f: Tensor) -> None:
        if x.shape[0] == 0:
            return
        x64, xh = x.double(), x_hat.double()
        self.n += x.shape[0]
        s = x64.sum(0)
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        self.sum_sq += float(x64.pow(2).sum())
        self.sse += float((xh - x64).pow(2).sum())
        self.l0 += float((f != 0).sum())
        self.fired |= (f != 0).any(0).cpu()
        n_in, n_out = x64.norm(dim=-1), xh.norm(dim=-1)
        add = {"l1": f.double().abs().sum(), "cossim": torch.nn.functional.cosine_similarity(x64, xh, dim=-1).sum(),
               "l2_in": n_in.sum(), "l2_out": n_out.sum(),
               "l2_ratio": (n_out / torch.where(n_in.abs() < 1e-4, torch.ones_like(n_in), n_in)).sum(),
               "xhat_sq": n_out.pow(2).sum(), "x_xhat": (x64 * xh).sum()}
        for k, v in add.items():
            self.sums[k] += float(v)

    def result(self, d_sae: int) -> dict[str, float]:
        if self.n == 0 or self.sum_x is None:
            nan = float("nan")
            return {"n_tokens": 0, "explained_variance": nan, "l0": nan, "dead": nan, "mse": nan, "cossim": nan,
                    "l1": nan, "l2_norm_in": nan, "l2_norm_out": nan, "l2_ratio": nan,
                    "relative_reconstruction_bias": nan, "frac_alive": nan, "total_tokens_eval_sparsity_variance": 0}
        total_var = self.sum_sq - float(self.sum_x.pow(2).sum()) / self.n
        dead = int((~self.fired).sum())
        m = {k: v / self.n for k, v in self.sums.items()}
        return {
            "n_tokens": self.n,
            "explained_variance": 1.0 - self.sse / total_var if total_var > 0 else float("nan"),
            "l0": self.l0 / self.n,
            "dead": dead,
            "mse": self.sse / self.n,
            # SAE-Bench `core` names (SAE-Lens's definitions, over all tokens of the group)
            "cossim": m["cossim"], "l1": m["l1"], "l2_norm_in": m["l2_in"], "l2_norm_out": m["l2_out"],
            "l2_ratio": m["l2_ratio"],
            "relative_reconstruction_bias": m["xhat_sq"] / m["x_xhat"] if m["x_xhat"] else float("nan"),
            "frac_alive": 1.0 - dead / d_sae, "total_tokens_eval_sparsity_variance": self.n,
        }


@torch.no_grad()
def evaluate(sae: SAE, data: Any, *, n_tokens: int | None = None, batch_size: int = 4096,
             layer: int | None = None) -> dict[str, dict[str, float]]:
    """Explained variance, L0, dead latents and MSE, overall and per modality.

    NaN/inf activations, or NaN/inf latents from finite activations (an SAE whose weights
    hold NaN/inf), raise `NonFiniteActivations` naming the rows, rather than turning the
    metrics into NaN (and NaN latents into "firing" ones).

    Example:
        >>> import torch, vlens.sae as vs
        >>> x, mod = torch.randn(1024, 8), torch.arange(1024) % 2
        >>> sae = vs.train((x, mod), "paper", d_sae=32, steps=5, batch_size=256, progress=False)
        >>> r = evaluate(sae, (x, mod))
        >>> sorted(r), r["image"]["n_tokens"], r["image"]["total_tokens_eval_sparsity_variance"]
        (['image', 'overall', 'text'], 512, 512)
    """
    for name, v in (("batch_size", batch_size), ("n_tokens", n_tokens)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise InputError(f"{name} must be an int >= 1, not {v!r}")
    source = as_source(data, layer)
    d_in = int(sae.cfg.d_in)
    if source.d is not None and source.d != d_in:
        raise InputError(f"the activations have width {source.d} but the SAE reads d_in = {d_in}: evaluate it on "
                         "activations of the model and site it was trained on")
    groups = {"overall": _Group(sae.cfg.d_sae), "image": _Group(sae.cfg.d_sae), "text": _Group(sae.cfg.d_sae)}
    sae.eval()
    start = 0
    for x, mod in source.sequential(batch_size, n_tokens):
        if x.ndim != 2 or x.shape[1] != d_in:
            raise InputError(f"an activation batch has shape {tuple(x.shape)}, but the SAE reads [batch, {d_in}]")
        x = x.to(sae.device, sae.dtype)
        _check_finite(x, start, "the activations hold NaN/inf values", "drop those rows or check the harvest "
                      "(e.g. fp16 overflow)")
        f = sae.encode(x)
        _check_finite(f, start, "the SAE gives NaN/inf latents for finite activations", "its weights hold NaN/inf "
                      "(check sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec; retrain or reload it)")
        x_hat = sae.decode(f)
        start += x.shape[0]
        groups["overall"].add(x, x_hat, f)
        if mod is not None:
            mod = mod.to(x.device)
            for name, code in (("image", IMAGE), ("text", TEXT)):
                sel = mod == code
                groups[name].add(x[sel], x_hat[sel], f[sel])
    if groups["overall"].n == 0:
        raise InputError("no activations to evaluate: the data has 0 rows")
    return {k: g.result(sae.cfg.d_sae) for k, g in groups.items()}


def _check_finite(t: Tensor, start: int, what: str, fix: str) -> None:
    """A `NonFiniteActivations` naming the first rows (of the data) of `t` that hold NaN/inf."""
    bad = ~torch.isfinite(t).all(dim=-1)
    if bool(bad.any()):
        rows = (bad.nonzero().flatten()[:5] + start).tolist()
        raise NonFiniteActivations(f"{what} (row(s) {rows} of the data): {fix}")


#: The token groups of `loss_recovered`, by `positions`: where the SAE is spliced (and the residual zeroed).
POSITION_GROUPS = {"modality": ("overall", "image", "text"), "all": ("all",)}


@torch.no_grad()
def loss_recovered(
    vlm: VLM,
    sae: SAE,
    layer: SiteLike | None,
    samples: Sequence[Any],
    *,
    prompt: str = QUESTION,
    batch_size: int = 8,
    progress: bool = True,
    positions: str = "modality",
    average: str = "token",
    bos_target: bool = False,
) -> dict[str, dict[str, float]]:
    """Loss recovered with `sae` spliced into its own site, by token group.

    The site is the SAE's `cfg.metadata.hook_name`; `layer` (an int L is `resid_pre.L`; any
    site name works) is needed only when the SAE names none, and must agree when it does.
    `samples` are `vlens.data.Sample`s with `image` and `caption` (the caption is the answer whose
    cross-entropy is measured).

    `positions="modality"` (default) gives the groups "overall" (image + caption tokens),
    "image" and "text"; `positions="all"` one group, "all", spliced and zeroed at every
    position (the paper's `eval_sae_damage.py`). `average="token"` pools the CEs over every
    caption token, then takes the ratio; `"sample"` takes the ratio per sample, then the mean
    (the paper's). `bos_target=True` scores BOS as one more target, as the paper's targets
    `processor(caption).input_ids` do (`vlens.scoring.lead_logprob`).

    Example:
        >>> import torch, vlens, vlens.sae as vs
        >>> from PIL import Image
        >>> from vlens.data import Sample
        >>> vlm = vlens.tiny(words=["a", "red", "square"])
        >>> sae = vs.train(torch.randn(512, vlm.d_model), "paper", d_sae=128, steps=2, batch_size=256, progress=False)
        >>> r = loss_recovered(vlm, sae, 2, [Sample(Image.new("RGB", (32, 32)), caption="a red square")], progress=False)
        >>> sorted(r["overall"])[:5], r["overall"]["ce_loss_score"] == r["overall"]["loss_recovered"]
        (['ce_clean', 'ce_loss_score', 'ce_loss_with_ablation', 'ce_loss_with_sae', 'ce_loss_without_sae'], True)
    """
    _check_recovery_args(vlm, sae, samples, positions, average)
    site = site_of(sae, vlm, layer)
    sae = sae.to(vlm.device)
    lead = bos_id(vlm.tokenizer) if bos_target else None
    runs: dict[str, dict[str, list]] = {g: {k: [] for k in ("clean", "spliced", "zero")}
                                        for g in POSITION_GROUPS[positions]}

    def ce(batch: Any, edit: Any = None) -> tuple[Tensor, Tensor]:
        """Per row: Σ CE over the scored targets and their count, with `edit()` applied in the trace."""
        logprob, count = score_answers(vlm, batch, edit, lead_target=lead)
        return -logprob, count

    chunks = range(0, len(samples), batch_size)
    for s in tqdm(chunks, desc="loss recovered", disable=(not progress) or None):
        part = samples[s : s + batch_size]
        batch = vlm.prepare([prompt] * len(part), [x.image for x in part], answers=[x.caption for x in part])
        clean = ce(batch)
        for g, mask in _group_masks(batch.layout, positions).items():
            runs[g]["clean"].append(clean)
            runs[g]["spliced"].append(ce(batch, lambda: splice_sae(vlm, site, sae, batch=batch, tokens=mask)))
            runs[g]["zero"].append(ce(batch, lambda: ablate(vlm, site, batch=batch, tokens=mask)))
    return {g: _recovered(r, average) for g, r in runs.items()}


def _check_recovery_args(vlm: VLM, sae: SAE, samples: Sequence[Any], positions: str, average: str) -> None:
    if sae.cfg.d_in != vlm.d_model:
        raise InputError(f"SAE d_in {sae.cfg.d_in} != model d_model {vlm.d_model}: this SAE belongs to another model")
    missing = [i for i, s in enumerate(samples) if getattr(s, "caption", None) is None or getattr(s, "image", None) is None]
    if missing:
        raise InputError(f"samples {missing[:5]} lack an image or a caption; loss recovered needs both")
    if positions not in POSITION_GROUPS:
        raise InputError(f"positions must be 'modality' (image + caption, image, text tokens) or 'all' (every "
                         f"position, the paper's), not {positions!r}")
    if average not in ("token", "sample"):
        raise InputError(f"average must be 'token' (pooled CEs) or 'sample' (the paper's mean of per-sample ratios), "
                         f"not {average!r}")


def _group_masks(lay: Any, positions: str) -> dict[str, Tensor]:
    """Where each group splices the SAE: image + caption / image / caption tokens, or every position."""
    if positions == "all":
        return {"all": ~lay.pad}
    return {"overall": lay.image | lay.answer, "image": lay.image, "text": lay.answer}


def _recovered(runs: dict[str, list[tuple[Tensor, Tensor]]], average: str) -> dict[str, float]:
    """One group's CEs (clean, spliced, zero-ablated) and loss recovered, pooled over tokens or per sample."""
    n_tokens = sum(int(c.sum()) for _, c in runs["clean"])
    if average == "sample":
        per = {k: torch.cat([t.double() / c.clamp(min=1) for t, c in v]) for k, v in runs.items()}
        ratio = 1 - (per["spliced"] - per["clean"]) / (per["zero"] - per["clean"])
        mean = {k: float(v.mean()) for k, v in per.items()}
        recovered = float(ratio.mean())
    else:
        mean = {k: sum(float(t.sum()) for t, _ in v) / max(sum(int(c.sum()) for _, c in v), 1)
                for k, v in runs.items()}
        denom = mean["zero"] - mean["clean"]
        recovered = 1 - (mean["spliced"] - mean["clean"]) / denom if abs(denom) > 1e-12 else float("nan")
    return {
        "ce_clean": mean["clean"], "ce_spliced": mean["spliced"], "ce_zero": mean["zero"],
        "loss_recovered": recovered, "n_tokens": n_tokens,
        # SAE-Bench `core` names
        "ce_loss_score": recovered, "ce_loss_with_sae": mean["spliced"], "ce_loss_without_sae": mean["clean"],
        "ce_loss_with_ablation": mean["zero"], "total_tokens_eval_reconstruction": n_tokens,
    }


def sae_bench_core(*results: dict[str, dict[str, float]], group: str = "overall") -> dict[str, dict[str, float]]:
    """One token group of `evaluate` and/or `loss_recovered` results as SAE-Bench's `core` `eval_result_metrics`.

    Categories and field names are SAE-Bench's `CoreMetricCategories` (`SAE_BENCH_CORE`);
    fields vlens does not measure (KL divergences, encoder/decoder cosine similarities) are left out.

    Example:
        >>> import torch, vlens.sae as vs
        >>> x = torch.randn(512, 8)
        >>> sae = vs.train(x, "topk", d_sae=16, k=2, steps=2, batch_size=128, progress=False)
        >>> core = sae_bench_core(evaluate(sae, x))
        >>> sorted(core), core["sparsity"]["l0"]
        (['misc_metrics', 'reconstruction_quality', 'shrinkage', 'sparsity', 'token_stats'], 2.0)
    """
    flat: dict[str, float] = {}
    for r in results:
        if group not in r:
            raise InputError(f"no token group {group!r} in these results (groups: {sorted(r)})")
        flat.update(r[group])
    out = {cat: {k: flat[k] for k in keys if k in flat} for cat, keys in SAE_BENCH_CORE.items()}
    return {cat: fields for cat, fields in out.items() if fields}


# -- transcoders ---------------------------------------------------------------------------------


def _by_layer(vlm: "VLM", transcoders: Any, one_per_layer: bool = True) -> list[tuple[int, SAE, Site, Site, str]]:
    """(layer, transcoder, input site, output site, name), in layer order; no hook names (or, with
    `one_per_layer`, a layer twice) refused. Names: the dict's keys, else `layer L`."""
    if isinstance(transcoders, dict):
        items = list(transcoders.items())
    else:
        items = [(None, tc) for tc in transcoders]
    if not items:
        raise InputError("no transcoders given: pass {name: transcoder} or a list (e.g. vlens.sae.train_many's result)")
    out = []
    for name, tc in items:
        meta = tc.cfg.metadata
        if not is_transcoder(tc) or not meta.hook_name or not meta.hook_name_out:
            raise InputError(f"{type(tc).__name__} is not a transcoder that names its sites: a transcoder sets "
                             "cfg.metadata.hook_name (blocks.L.hook_mlp_in) and hook_name_out (blocks.L.hook_mlp_out)")
        site_in, site_out = vlm.site(from_hook_name(meta.hook_name)), vlm.site(from_hook_name(meta.hook_name_out))
        L = int(site_out.index)
        out.append((L, tc, site_in, site_out, f"layer {L}" if name is None else str(name)))
    layers = [x[0] for x in out]
    if one_per_layer and len(set(layers)) != len(layers):
        raise InputError(f"two transcoders write the same layer's MLP output (layers {sorted(layers)}): one per layer")
    return sorted(out, key=lambda x: x[0])


def _batches(vlm: "VLM", samples: Sequence[Any], prompt: str, batch_size: int, desc: str, progress: bool):
    """Image + caption batches of `samples` (the caption is the answer), with a progress bar."""
    missing = [i for i, s in enumerate(samples) if getattr(s, "caption", None) is None or getattr(s, "image", None) is None]
    if missing:
        raise InputError(f"samples {missing[:5]} lack an image or a caption; transcoder evaluation needs both")
    for s in tqdm(range(0, len(samples), batch_size), desc=desc, disable=(not progress) or None):
        part = samples[s: s + batch_size]
        yield vlm.prepare([prompt] * len(part), [x.image for x in part], answers=[x.caption for x in part])


@torch.no_grad()
def evaluate_transcoders(vlm: "VLM", transcoders: Any, samples: Sequence[Any], *, prompt: str = QUESTION,
                         batch_size: int = 8, progress: bool = True) -> dict[str, dict[str, dict[str, float]]]:
    """Each transcoder's prediction of its MLP's output on the clean model, overall and per modality.

    For every transcoder (layer L), on the image and caption tokens of `samples`: the
    metrics of `evaluate` with x̂ the prediction from `mlp_in.L` and x the MLP's true
    output `mlp_out.L` (`explained_variance` of mlp_out, `l0`, `dead`, `mse`, ...). Returns
    `{name: {"overall" | "image" | "text": metrics}}`, names the keys of a dict of
    transcoders (`train_many`'s result), else `"layer L"`.

    Example:
        >>> import vlens
        >>> from PIL import Image
        >>> from vlens.data import Sample
        >>> from vlens.sae.transcoder import transcoder_specs
        >>> vlm = vlens.tiny(words=["a", "red", "square"])
        >>> data = [Sample(Image.new("RGB", (32, 32), (90 * i, 0, 0)), caption="a red square") for i in range(3)]
        >>> tcs = vlens.sae.train_many(vlm, data, transcoder_specs(vlm, "topk", [1], k=4, d_sae=32), steps=2,
        ...                            batch_size=32, buffer=32, progress=False, tokens="image+answer", captions=True)
        >>> r = evaluate_transcoders(vlm, tcs, data, progress=False)
        >>> sorted(r), r["transcoder.1"]["image"]["l0"]
        (['transcoder.1'], 4.0)
    """
    layers = _by_layer(vlm, transcoders, one_per_layer=False)
    groups = {n: {g: _Group(tc.cfg.d_sae) for g in ("overall", "image", "text")} for _, tc, _, _, n in layers}
    sites = list(dict.fromkeys(s for _, _, si, so, _ in layers for s in (si, so)))
    for batch in _batches(vlm, samples, prompt, batch_size, "evaluate transcoders", progress):
        lay = batch.layout
        mask = lay.image | lay.answer
        acts = read_layers(vlm, batch, sites, tokens=mask, dtype=torch.float32)
        image = lay.image[mask].to(torch.bool)
        for _, tc, si, so, n in layers:
            x = acts[si].to(tc.device, tc.dtype)
            y = acts[so].to(tc.device, tc.dtype)
            f = tc.encode(x)
            y_hat = tc(x)  # with a skip transcoder's affine term
            for g, sel in (("overall", None), ("image", image), ("text", ~image)):
                if sel is None:
                    groups[n][g].add(y, y_hat, f)
                else:
                    sel = sel.to(y.device)
                    groups[n][g].add(y[sel], y_hat[sel], f[sel])
    return {n: {g: acc.result(tc.cfg.d_sae) for g, acc in groups[n].items()} for _, tc, _, _, n in layers}


@torch.no_grad()
def replacement_loss_recovered(vlm: "VLM", transcoders: Any, samples: Sequence[Any], *, prompt: str = QUESTION,
                               batch_size: int = 8, progress: bool = True) -> dict[str, dict[str, float]]:
    """Loss recovered when every MLP that has a transcoder is replaced by it, with and without error terms.

    In one forward, each layer's `mlp_out` at the selected tokens becomes its transcoder's
    prediction from that layer's (already changed) `mlp_in` (`vlens.interventions.splice_transcoder`,
    layer by layer). With error terms (`ce_with_error`) the MLP's true output minus the
    prediction is added back, so the forward is the clean one and `ce_with_error` equals
    `ce_clean`. Loss recovered = 1 − (CE_replaced − CE_clean) / (CE_zero − CE_clean), CE_zero
    with every such MLP's output zero-ablated at the same tokens. Groups as `loss_recovered`:
    "overall" (image and caption tokens), "image", "text"; `layers` lists the replaced layers.

    Example:
        >>> import vlens
        >>> from PIL import Image
        >>> from vlens.data import Sample
        >>> from vlens.sae.transcoder import transcoder_specs
        >>> vlm = vlens.tiny(words=["a", "red", "square"])
        >>> data = [Sample(Image.new("RGB", (32, 32), (90 * i, 0, 0)), caption="a red square") for i in range(3)]
        >>> tcs = vlens.sae.train_many(vlm, data, transcoder_specs(vlm, "standard", d_sae=32), steps=2,
        ...                            batch_size=32, buffer=32, progress=False, tokens="image+answer", captions=True)
        >>> r = replacement_loss_recovered(vlm, tcs, data, progress=False)
        >>> r["overall"]["layers"], abs(r["overall"]["ce_with_error"] - r["overall"]["ce_clean"]) < 1e-4
        ([0, 1, 2, 3], True)
    """
    layers = _by_layer(vlm, transcoders)
    for _, tc, _, _, _ in layers:
        tc.to(vlm.device)
    groups = ("overall", "image", "text")
    kinds = ("clean", "replaced", "with_error", "zero")
    sums = {g: {k: [0.0, 0] for k in kinds} for g in groups}

    def ce(batch: Any, edit: Any = None) -> tuple[float, int]:
        logprob, count = score_answers(vlm, batch, edit)
        return -float(logprob.sum()), int(count.sum())

    for batch in _batches(vlm, samples, prompt, batch_size, "replacement loss", progress):
        lay = batch.layout
        clean = ce(batch)
        for g, mask in (("overall", lay.image | lay.answer), ("image", lay.image), ("text", lay.answer)):
            def splice(error: bool, mask: Tensor = mask, batch: Any = batch) -> None:
                for _, tc, _, _, _ in layers:
                    splice_transcoder(vlm, tc, batch=batch, tokens=mask, error=error)

            def zero(mask: Tensor = mask, batch: Any = batch) -> None:
                for _, _, _, so, _ in layers:
                    ablate(vlm, so, batch=batch, tokens=mask)

            runs = {"clean": clean, "replaced": ce(batch, lambda: splice(False)),
                    "with_error": ce(batch, lambda: splice(True)), "zero": ce(batch, zero)}
            for k, (total, count) in runs.items():
                sums[g][k][0] += total
                sums[g][k][1] += count
    out: dict[str, dict[str, Any]] = {}
    for g in groups:
        mean = {k: v[0] / max(v[1], 1) for k, v in sums[g].items()}
        denom = mean["zero"] - mean["clean"]
        recovered = 1 - (mean["replaced"] - mean["clean"]) / denom if abs(denom) > 1e-12 else float("nan")
        out[g] = {"ce_clean": mean["clean"], "ce_replaced": mean["replaced"], "ce_with_error": mean["with_error"],
                  "ce_zero": mean["zero"], "loss_recovered": recovered, "n_tokens": sums[g]["clean"][1],
                  "layers": [L for L, _, _, _, _ in layers]}
    return out
