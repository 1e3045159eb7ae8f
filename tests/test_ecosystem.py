"""vlens with the rest of the SAE ecosystem (issue 15): sparsify / lmms-lab checkpoints, SAE-Lens's Hub files,
sae-dashboard's folding, SAE-Bench's field names, SAE-Lens's cached-activation trainer, Neuronpedia's format.

Each numbered interop defect of the issue has a test named after it (`test_defect_N_...`)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import vlens
import vlens.sae as vs
from sae_lens import SAE
from sae_lens.saes import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata
from vlens.activations import harvest, read_layers
from vlens.cli import main
from vlens.data import Sample
from vlens.errors import InputError
from vlens.prompts import QUESTION

# New names are imported inside the tests, so that against vlens before issue 15 each test fails on its own.

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["a", "red", "green", "blue", "square", "circle", "on", "white"]
SAE_LENS_UPLOAD = ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors", "runner_cfg.json")  # what it copies


@pytest.fixture(scope="module")
def vlm():
    return vlens.tiny(words=WORDS)


@pytest.fixture(scope="module")
def samples():
    colors = [("red", "square"), ("green", "circle"), ("blue", "square"), ("red", "circle")]
    return [Sample(Image.new("RGB", (32 + 8 * i, 32), c), caption=f"a {c} {s} on white", id=f"s{i}")
            for i, (c, s) in enumerate(colors)]


def _acts(vlm, samples, site):
    batch = vlm.prepare([QUESTION] * len(samples), [s.image for s in samples], answers=[s.caption for s in samples])
    sel = batch.layout.select("image+answer")
    return read_layers(vlm, batch, site, tokens=sel, dtype=torch.float32)[site], batch.layout.image[sel].long()


def _sparsify_folder(path: Path, d=16, m=128, k=8, *, unit=True, seed=3, **cfg) -> dict:
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(m, d, generator=g)
    if unit:
        w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True)
    sd = {"encoder.weight": torch.randn(m, d, generator=g), "encoder.bias": torch.randn(m, generator=g) * 0.1,
          "W_dec": w_dec, "b_dec": torch.randn(d, generator=g)}
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps({"activation": "topk", "num_latents": m, "k": k, "d_in": d,
                                               "normalize_decoder": unit, **cfg}))
    save_file(sd, path / "sae.safetensors")
    return sd


# -- 1. hook names of converted sparsify / lmms-lab SAEs ----------------------------------------


def test_defect_1_sparsify_folder_names_resid_post_and_a_run_converts_every_hookpoint(tmp_path, capsys):
    """Before: converted SAEs had no hook_name (and the CLI hinted hook_resid_pre, one layer early)."""
    _sparsify_folder(tmp_path / "run" / "layers.8")
    _sparsify_folder(tmp_path / "run" / "layers.10", seed=4)
    _sparsify_folder(tmp_path / "run" / "embed_tokens", seed=5)
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": "lmms-lab/some-llava"}))
    one = vs.convert_sparsify_checkpoint(tmp_path / "run" / "layers.8", tmp_path / "one")
    assert one.cfg.metadata.hook_name == "blocks.8.hook_resid_post"
    assert SAE.load_from_disk(tmp_path / "one").cfg.metadata.hook_name == "blocks.8.hook_resid_post"
    assert vs.convert_sparsify_checkpoint(tmp_path / "run" / "layers.8", hook_name="x").cfg.metadata.hook_name == "x"
    from vlens.sae.io import convert_sparsify_run, sparsify_hook_name

    assert sparsify_hook_name("model.language_model.layers_4") == "blocks.4.hook_resid_post"
    saes = convert_sparsify_run(tmp_path / "run", tmp_path / "all")
    assert list(saes) == ["embed_tokens", "layers.8", "layers.10"]  # natural order
    assert {k: s.cfg.metadata.hook_name for k, s in saes.items()} == {
        "embed_tokens": "hook_embed", "layers.8": "blocks.8.hook_resid_post", "layers.10": "blocks.10.hook_resid_post"}
    assert all(s.cfg.metadata.model_name == "lmms-lab/some-llava" for s in saes.values())
    assert (tmp_path / "all" / "layers.10" / "cfg.json").exists()
    # the CLI: a run folder converts every hookpoint; the hint no longer suggests resid_pre for sparsify
    assert main(["export", "sparsify", str(tmp_path / "run"), "--out", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out
    assert "layers.10: blocks.10.hook_resid_post" in printed
    assert SAE.load_from_disk(tmp_path / "cli" / "layers.8").cfg.metadata.hook_name == "blocks.8.hook_resid_post"
    assert main(["export", "--help"]) == 0
    assert "blocks.N.hook_resid_post" in capsys.readouterr().out.replace("\n", " ").replace("│", " ").replace("  ", " ")


# -- 2. sae-dashboard folds the decoder norm ----------------------------------------------------


def test_defect_2_converted_topk_sae_folds_like_sae_dashboard(tmp_path):
    """Before: fold_W_dec_norm raised NotImplementedError on every converted TopK SAE."""
    _sparsify_folder(tmp_path / "layers.2")
    vs.convert_sparsify_checkpoint(tmp_path / "layers.2", tmp_path / "out")
    plain = SAE.load_from_disk(tmp_path / "out")
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    before_f, before_x = plain.encode(x), plain(x)
    plain.fold_W_dec_norm()  # what sae-dashboard always does
    torch.testing.assert_close(plain.encode(x), before_f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain(x), before_x, rtol=1e-5, atol=1e-5)
    # a decoder that is not unit norm stays bit-exact and unfoldable, and says why on export
    _sparsify_folder(tmp_path / "layers.3", unit=False)
    loose = vs.convert_sparsify_checkpoint(tmp_path / "layers.3")
    assert loose.cfg.rescale_acts_by_decoder_norm is False
    with pytest.raises(InputError, match="would change which latents"):
        vs.export(loose, tmp_path / "loose", fold_decoder_norm=True)


# -- 3. modality statistics through the Hub -----------------------------------------------------


@pytest.fixture(scope="module")
def labelled():
    g = torch.Generator().manual_seed(0)
    x, mod = torch.randn(2048, 16, generator=g) * 3, (torch.arange(2048) % 2).long()
    return vs.train((x, mod), "paper", d_sae=64, steps=20, batch_size=256, progress=False), x, mod


def test_defect_3_modality_statistics_survive_sae_lens_upload(labelled, tmp_path):
    """Before: only modality.safetensors held them, which SAE-Lens's upload never copies (silently None)."""
    sae, _, _ = labelled
    out = vs.export(sae, tmp_path / "export", hook_name="blocks.2.hook_resid_pre")
    hub = tmp_path / "hub"
    hub.mkdir()
    for name in SAE_LENS_UPLOAD:
        if (out / name).exists():
            shutil.copy(out / name, hub / name)
    back = vs.load(hub)
    assert back.modality is not None
    for name in ("freq_image", "freq_text", "mean_image", "mean_text"):
        assert torch.equal(getattr(back.modality, name), getattr(sae.modality, name))
    assert load_file(hub / "sparsity.safetensors")["sparsity"].shape == (64,)  # what SAE-Lens reads is unchanged
    # vlens 0.2 exports (modality.safetensors only) still load
    old = tmp_path / "old"
    shutil.copytree(out, old)
    save_file({"sparsity": load_file(out / "sparsity.safetensors")["sparsity"]}, old / "sparsity.safetensors")
    assert torch.equal(vs.load(old).modality.mean_image, sae.modality.mean_image)
    # metadata names a file that is missing: a warning, not a silent None
    (hub / "sparsity.safetensors").unlink()
    with pytest.warns(UserWarning, match="modality statistics were saved in sparsity.safetensors"):
        assert vs.load(hub).modality is None


# -- 4. sparsity.safetensors always ---------------------------------------------------------------


def test_defect_4_sparsity_written_without_modality_labels(tmp_path):
    """Before: no modality labels, no sparsity.safetensors (SAE-Lens, sae-dashboard and Neuronpedia read it)."""
    from vlens.sae.modality import firing_density

    from sae_lens.saes import TopKSAE, TopKSAEConfig

    x = torch.randn(1024, 16, generator=torch.Generator().manual_seed(1))
    sae = vs.as_multimodal(TopKSAE(TopKSAEConfig(d_in=16, d_sae=32, k=4)))  # built by hand: nothing measured
    with pytest.warns(UserWarning, match="no firing density is known"):
        vs.export(sae, tmp_path / "unknown")
    density = firing_density(sae, x)
    torch.testing.assert_close(density, (sae.encode(x) != 0).float().mean(0))
    assert 0 < float(density.sum()) <= 4.0  # at most k latents per token
    vs.as_multimodal(sae, density=density)
    out = vs.export(sae, tmp_path / "known")
    log10 = load_file(out / "sparsity.safetensors")["sparsity"]
    torch.testing.assert_close(log10, torch.log10(density + 1e-10))
    back = vs.load(out)
    torch.testing.assert_close(back.density, density, rtol=1e-5, atol=1e-9)
    assert vs.load(out).modality is None


# -- 5. run metadata ----------------------------------------------------------------------------


def test_defect_5_exports_carry_run_metadata_and_converted_saes_no_training_version(labelled, tmp_path):
    sae, _, _ = labelled
    out = vs.export(sae, tmp_path / "e", model_name="m", hook_name="blocks.2.hook_resid_pre",
                    metadata={"context_size": 1200, "dataset_path": "runs/store"})
    meta = json.loads((out / "cfg.json").read_text())["metadata"]
    for key in ("l0", "num_dead_features", "context_size", "prepend_bos", "dataset_path", "model_class_name",
                "hook_head_index", "model_from_pretrained_kwargs"):
        assert key in meta, key
    assert meta["l0"] == pytest.approx(float(sae.modality.frequency.sum()))
    assert meta["num_dead_features"] == int((~sae.modality.alive).sum())
    assert meta["context_size"] == 1200 and meta["dataset_path"] == "runs/store"
    assert SAE.load_from_disk(out).cfg.metadata.l0 == pytest.approx(meta["l0"])
    _sparsify_folder(tmp_path / "layers.1")
    vs.convert_sparsify_checkpoint(tmp_path / "layers.1", tmp_path / "c")
    vs.convert_paper_checkpoint({"fc1.weight": torch.randn(8, 4), "fc1.bias": torch.zeros(8),
                                 "fc2.weight": torch.randn(4, 8), "fc2.bias": torch.zeros(4)}, tmp_path / "p")
    for d in ("c", "p"):
        assert json.loads((tmp_path / d / "cfg.json").read_text())["metadata"]["sae_lens_training_version"] is None


# -- 6. the SAE's own site ----------------------------------------------------------------------


def test_defect_6_consumers_read_the_saes_own_site(vlm, samples, tmp_path):
    """Before: dashboards and loss_recovered read resid_pre(layer) whatever the SAE's hook name said."""
    x, mod = _acts(vlm, samples, "resid_post.1")
    sae = vs.train((x, mod), "paper", d_sae=32, steps=10, batch_size=64, progress=False,
                   hook_name=vlm.hook_name("resid_post.1"))
    with pytest.raises(InputError, match="trained on resid_post.1"):
        vs.loss_recovered(vlm, sae, 1, samples, progress=False)  # the int 1 is resid_pre.1
    with pytest.raises(InputError, match="trained on resid_post.1"):
        vs.dashboard(sae, vlm, samples, tmp_path / "d0", layer=1, latents=[0], progress=False)
    from vlens.sae.io import site_of

    assert site_of(sae, vlm) == vlm.site("resid_post.1")
    # with no layer the SAE's site is read: the activations are those of resid_post.1
    from vlens.sae.features import collect

    recs = collect(vlm, sae, samples[:1], list(range(32)), progress=False)
    x1, _ = _acts(vlm, samples[:1], "resid_post.1")
    torch.testing.assert_close(recs[0]["acts"].float(), sae.encode(x1).half().float())
    r = vs.loss_recovered(vlm, sae, None, samples, progress=False)
    assert math.isfinite(r["overall"]["loss_recovered"])
    page = vs.dashboard(sae, vlm, samples, tmp_path / "d", latents=[0], progress=False)
    assert "blocks.1.hook_resid_post" in page.read_text()
    bare = StandardSAE(StandardSAEConfig(d_in=vlm.d_model, d_sae=8))
    with pytest.raises(InputError, match="does not say where it reads"):
        site_of(bare, vlm)
    assert site_of(bare, vlm, 2) == vlm.site("resid_pre.2")


# -- 7. SAE-Lens's cached-activation route, datasets 3.x ----------------------------------------


def test_defect_7_cached_activation_export_trains_sae_lens_and_reads_in_datasets_3(vlm, samples, tmp_path):
    import pyarrow as pa
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.activations_store import ActivationsStore
    from sae_lens.training.sae_trainer import SAETrainer

    from vlens.activations import export_sae_lens

    store = harvest(vlm, samples, layers=[2], tokens="image+answer", captions=True, out=tmp_path / "s", progress=False)
    cfg = export_sae_lens(store, 2, tmp_path / "acts", context_size=16)
    # datasets 3.x (sae-bench, sae-dashboard) does not know the feature type `List`: none is written
    info = (tmp_path / "acts" / "dataset_info.json").read_text()
    assert '"List"' not in info and '"Sequence"' in info
    for arrow in (tmp_path / "acts").glob("*.arrow"):
        with pa.memory_map(str(arrow)) as f:
            assert b'"List"' not in pa.ipc.open_stream(f).schema.metadata[b"huggingface"]
    # the documented route: SAE-Lens's ActivationsStore on the cached path, then SAETrainer
    acts = ActivationsStore(
        model=None, dataset=None, streaming=False, hook_name=cfg["hook_name"], hook_head_index=None,
        context_size=cfg["context_size"], d_in=cfg["d_in"], n_batches_in_buffer=4, total_training_tokens=cfg["n_tokens"],
        store_batch_size_prompts=2, train_batch_size_tokens=16, prepend_bos=False, normalize_activations="none",
        device=torch.device("cpu"), dtype="float32", cached_activations_path=cfg["cached_activations_path"],
    )
    torch.manual_seed(0)
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=cfg["d_in"], d_sae=64, l1_coefficient=1e-3))
    trainer = SAETrainer(cfg=SAETrainerConfig(total_training_samples=16 * 5, train_batch_size_samples=16, lr=1e-3,
                                              lr_end=1e-3), sae=sae, data_provider=acts)
    trainer.fit()
    assert trainer.n_training_steps == 5
    old = Path(__import__("os").environ.get("VLENS_DATASETS3", "/nonexistent"))  # a datasets<4 install (--target)
    if old.is_dir():
        code = ("import datasets; assert datasets.__version__ < '4'; "
                f"ds = datasets.load_from_disk({str(tmp_path / 'acts')!r}); print(len(ds))")
        res = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(old)}, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-2000:]


# -- 8. dependency pins -------------------------------------------------------------------------

SAE_BENCH_0_6_0 = {  # sae-bench 0.6.0's requirements on packages vlens also requires (its wheel metadata)
    "datasets": ">=3.0.0,<4.0.0", "einops": ">=0.8.0", "jaxtyping": ">=0.2.25", "plotly": ">=5.22.0",
    "sae-lens": ">=6.28.0,<7.0.0", "torch": ">=2.1.0", "tqdm": ">=4.66.4",
}


def test_defect_8_pins_leave_room_for_sae_bench():
    """Every requirement vlens shares with sae-bench 0.6.0 admits a common version (here: the newest release
    below the tighter upper bound that both ranges contain, from a list of real releases)."""
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    releases = {"datasets": ["3.6.0", "4.0.0", "5.2.0"], "einops": ["0.8.2"], "jaxtyping": ["0.3.11"],
                "plotly": ["6.0.0", "7.1.0"], "sae-lens": ["6.54.12"], "torch": ["2.13.0"], "tqdm": ["4.70.1"]}
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ours = {Requirement(d).name.lower().replace("_", "-"): Requirement(d).specifier for d in deps}
    for name, theirs in SAE_BENCH_0_6_0.items():
        both = [v for v in releases[name] if v in ours[name] and v in SpecifierSet(theirs)]
        assert both, f"vlens's {name}{ours[name]} and sae-bench's {name}{theirs} share no release"


@pytest.mark.slow
def test_defect_8_pip_resolves_vlens_with_sae_bench():
    """`pip install --dry-run` of vlens next to sae-bench (needs the package index; minutes)."""
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                          str(ROOT), "sae-bench==0.6.0"], capture_output=True, text=True, timeout=900)
    if "ResolutionImpossible" not in res.stderr and res.returncode != 0:
        pytest.skip(f"pip could not reach the index: {res.stderr[-300:]}")
    assert res.returncode == 0, res.stderr[-3000:]


# -- 9. converter dtypes ------------------------------------------------------------------------


def test_defect_9_converters_keep_or_set_the_dtype_and_multi_topk_is_topk(tmp_path):
    sd = _sparsify_folder(tmp_path / "layers.5", multi_topk=True)
    bf = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    save_file(bf, tmp_path / "layers.5" / "sae.safetensors")
    kept = vs.convert_sparsify_checkpoint(tmp_path / "layers.5", tmp_path / "bf16", dtype=None)
    assert kept.W_enc.dtype == torch.bfloat16 and torch.equal(kept.W_dec, bf["W_dec"])
    assert SAE.load_from_disk(tmp_path / "bf16").W_dec.dtype == torch.bfloat16
    full = vs.convert_sparsify_checkpoint(tmp_path / "layers.5", tmp_path / "fp32")  # the default, as before
    assert full.W_enc.dtype == torch.float32
    size = lambda d: (tmp_path / d / "sae_weights.safetensors").stat().st_size  # noqa: E731
    assert size("bf16") < 0.6 * size("fp32")
    assert kept.cfg.architecture() == "topk" and kept.cfg.k == 8  # multi_topk: a training loss only
    paper = vs.convert_paper_checkpoint({k: v.to(torch.bfloat16) for k, v in {
        "fc1.weight": torch.randn(8, 4), "fc1.bias": torch.zeros(8), "fc2.weight": torch.randn(4, 8),
        "fc2.bias": torch.zeros(4)}.items()}, dtype="bfloat16")
    assert paper.W_enc.dtype == torch.bfloat16
    with pytest.raises(InputError, match="floating dtype"):
        vs.convert_sparsify_checkpoint(tmp_path / "layers.5", dtype="int8")


# -- 10. folding the decoder norm on export -----------------------------------------------------


def test_defect_10_export_can_fold_the_decoder_norm(labelled, tmp_path):
    sae, x, _ = labelled
    norms = sae.W_dec.detach().norm(dim=-1)
    assert float(norms.mean()) < 0.5  # the paper preset: rows of norm ~0.1
    out = vs.export(sae, tmp_path / "f", fold_decoder_norm=True)
    folded = vs.load(out)
    torch.testing.assert_close(folded.W_dec.norm(dim=-1), torch.ones(64), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded(x[:100]), sae(x[:100]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(folded.encode(x[:100]), sae.encode(x[:100]) * norms, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(folded.modality.mean_image, sae.modality.mean_image * norms)
    assert torch.equal(folded.modality.score.nan_to_num(-1), sae.modality.score.nan_to_num(-1)) or torch.allclose(
        folded.modality.score.nan_to_num(-1), sae.modality.score.nan_to_num(-1), atol=1e-6)
    assert float(sae.W_dec.detach().norm(dim=-1).mean()) < 0.5  # the caller's SAE is unchanged


# -- logit attribution, SAE-Bench names, the Neuronpedia export ---------------------------------


def test_feature_logits_are_decoder_rows_through_final_norm_and_unembedding(vlm, samples, tmp_path):
    from vlens.sae.features import feature_logits

    sae = StandardSAE(StandardSAEConfig(d_in=vlm.d_model, d_sae=16, metadata=SAEMetadata(hook_name="blocks.2.hook_resid_pre")))
    with torch.no_grad():
        sae.W_dec.normal_()
    norm = vlm._module.model.language_model.norm
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, vlm.d_model))  # a gain that matters
    W_U = vlm._module.get_output_embeddings().weight.detach()
    ref = (sae.W_dec.detach()[[3, 7]] * norm.weight.detach()) @ W_U.T
    out = feature_logits(sae, vlm, [3, 7], k=4)
    for j in range(2):
        top = ref[j].topk(4)
        assert [d["value"] for d in out[j]["top"]] == pytest.approx(top.values.tolist(), rel=1e-5)
        assert [d["token"] for d in out[j]["top"]] == [vlm.tokenizer.decode([int(i)]) for i in top.indices]
        assert [d["value"] for d in out[j]["bottom"]] == pytest.approx(ref[j].topk(4, largest=False).values.tolist(),
                                                                        rel=1e-5)
    page = vs.dashboard(sae, vlm, samples, tmp_path, latents=[3], progress=False)
    html = (tmp_path / "latent_3.html").read_text()
    assert page.exists() and "Logit attribution" in html and out[0]["top"][0]["token"] in html


def test_sae_bench_core_names(vlm, samples):
    from vlens.sae.evals import SAE_BENCH_CORE, sae_bench_core

    x, mod = _acts(vlm, samples, 2)
    sae = vs.train((x, mod), "paper", d_sae=64, steps=10, batch_size=64, progress=False)
    ev = vs.evaluate(sae, (x, mod))
    for g in ("overall", "image", "text"):
        r = ev[g]
        assert {"explained_variance", "l0", "dead", "mse", "n_tokens"} <= set(r)  # the old keys stay
        xs = x if g == "overall" else x[mod == (1 if g == "image" else 0)]
        xh, f = sae(xs), sae.encode(xs)
        assert r["cossim"] == pytest.approx(float(torch.cosine_similarity(xs, xh, dim=-1).mean()), rel=1e-4)
        assert r["l1"] == pytest.approx(float(f.abs().sum(-1).mean()), rel=1e-4)
        assert r["l2_ratio"] == pytest.approx(float((xh.norm(dim=-1) / xs.norm(dim=-1)).mean()), rel=1e-4)
        assert r["frac_alive"] == pytest.approx(1 - r["dead"] / 64)
    lr = vs.loss_recovered(vlm, sae, 2, samples, progress=False)
    assert lr["overall"]["ce_loss_score"] == lr["overall"]["loss_recovered"]
    assert lr["overall"]["ce_loss_without_sae"] == lr["overall"]["ce_clean"]
    core = sae_bench_core(ev, lr)
    # SAE-Bench 0.6's CoreMetricCategories fields (sae_bench/evals/core/eval_output.py)
    sae_bench = {
        "model_performance_preservation": {"ce_loss_score", "ce_loss_with_ablation", "ce_loss_with_sae",
                                           "ce_loss_without_sae"},
        "reconstruction_quality": {"explained_variance", "mse", "cossim"},
        "shrinkage": {"l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"},
        "sparsity": {"l0", "l1"},
        "token_stats": {"total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance"},
        "misc_metrics": {"freq_over_1_percent", "freq_over_10_percent", "normalized_freq_over_1_percent",
                         "normalized_freq_over_10_percent", "average_max_encoder_cosine_sim",
                         "average_max_decoder_cosine_sim", "frac_alive"},
    }
    assert set(core) == set(SAE_BENCH_CORE) and set(core) <= set(sae_bench)
    for cat, fields in core.items():
        assert set(fields) <= sae_bench[cat], cat
    assert core["model_performance_preservation"]["ce_loss_score"] == lr["overall"]["loss_recovered"]


def test_neuronpedia_export_validates_against_the_neuronpedia_package(vlm, samples, tmp_path, monkeypatch):
    from vlens.sae.features import export_features, image_token_names

    pytest.importorskip("neuronpedia")
    from neuronpedia.np_activation import Activation
    from neuronpedia.np_feature import Feature, Logit
    from neuronpedia.requests.feature_request import FeatureRequest
    from neuronpedia.types.common.activation import NPActivation
    from neuronpedia.types.common.feature import NPFeature

    x, mod = _acts(vlm, samples, 2)
    sae = vs.train((x, mod), "paper", d_sae=32, steps=10, batch_size=64, progress=False,
                   hook_name=vlm.hook_name("resid_pre.2"))
    latents = sae.modality.alive.nonzero().flatten()[:3].tolist()
    path = export_features(sae, vlm, samples, tmp_path, latents=latents, top_k=2, model_id="tiny-llava", progress=False)
    doc = json.loads(path.read_text())
    assert doc["source"] == "2-vlens-resid_pre" and [f["index"] for f in doc["features"]] == latents

    def strip(d):  # the payload without vlens's extra fields
        return {k: (strip(v) if isinstance(v, dict) else [strip(i) if isinstance(i, dict) else i for i in v]
                    if isinstance(v, list) else v) for k, v in d.items() if k != "vlens"}

    feats = []
    for f in doc["features"]:
        NPFeature(model=doc["modelId"], source=doc["source"], index=f["index"])
        acts = []
        for a in f["activations"]:
            NPActivation(tokens=a["tokens"], values=a["values"])
            acts.append(Activation(modelId=doc["modelId"], source=doc["source"], index=f["index"], tokens=a["tokens"],
                                   values=a["values"], quantileMax=a["quantileMax"], quantileMin=a["quantileMin"],
                                   quantileFraction=a["quantileFraction"]))
        feats.append(Feature(modelId=doc["modelId"], source=doc["source"], index=f["index"], density=f["density"],
                             top_logits=[Logit(**lg) for lg in f["topLogits"]],
                             bottom_logits=[Logit(**lg) for lg in f["bottomLogits"]], explanations=[], activations=acts))
    sent = {}
    req = FeatureRequest(api_key="not-used-nothing-is-sent")
    monkeypatch.setattr(req, "send_request", lambda **kw: sent.update(kw))
    req.upload_batch(doc["modelId"], doc["source"], feats)  # neuronpedia's own payload builder
    assert sent["uri"] == "upload-batch" and sent["json"] == strip(doc)
    # vlens's fields: modality score, pixel boxes aligned with the tokens, a thumbnail, stable pseudo-tokens
    f0 = doc["features"][0]
    assert f0["vlens"]["modality_score"] == pytest.approx(float(sae.modality.score[latents[0]]))
    assert f0["density"] == pytest.approx(float(sae.modality.frequency[latents[0]]))
    a0 = f0["activations"][0]
    extra = a0["vlens"]
    assert len(extra["boxes"]) == len(a0["tokens"]) == len(a0["values"])
    assert (tmp_path / extra["thumbnail"]).exists()
    sample = samples[extra["sample"]]
    assert extra["image_size"] == list(sample.image.size) and extra["sample_id"] == sample.id
    batch = vlm.prepare([QUESTION], [sample.image], answers=[sample.caption])
    names = image_token_names(batch.layout.images[0].geometry)
    assert a0["tokens"][: len(names)] == names and names[0] == "<img0:t0:r0:c0>"
    assert all(b is None for b in extra["boxes"][len(names):]) and extra["boxes"][0] is not None
    assert a0["tokens"][len(names):] == sample.caption.split()


# -- the real sparsify client -------------------------------------------------------------------


@pytest.mark.parametrize("normalize_decoder", [True, False])
def test_eai_sparsify_round_trip(tmp_path, normalize_decoder):
    """Checkpoints written by eai-sparsify's own SparseCoder.save_to_disk; converted top-k indices, values and
    reconstruction against sparsify's own encode / decode (float32)."""
    from vlens.sae.io import convert_sparsify_run

    pytest.importorskip("sparsify")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    d, m, k = 32, 256, 8
    coder = SparseCoder(d, SparseCoderConfig(num_latents=m, k=k, normalize_decoder=normalize_decoder))
    with torch.no_grad():
        coder.encoder.weight.normal_()
        coder.encoder.bias.normal_(0, 0.1)
        coder.b_dec.normal_()
        if not normalize_decoder:
            coder.W_dec.mul_(torch.rand(m, 1) * 3)
    coder.save_to_disk(tmp_path / "run" / "layers.3")
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": "toy"}))
    sae = convert_sparsify_run(tmp_path / "run", tmp_path / "out")["layers.3"]
    assert sae.cfg.rescale_acts_by_decoder_norm is normalize_decoder
    assert sae.cfg.metadata.hook_name == "blocks.3.hook_resid_post" and sae.cfg.metadata.model_name == "toy"
    back = SAE.load_from_disk(tmp_path / "out" / "layers.3")  # what an SAE-Lens user gets
    x = torch.randn(400, d) * 3
    with torch.no_grad():
        vals, idx, _ = coder.encode(x)
        ref = coder.decode(vals, idx)
        order = vals.argsort(-1, descending=True)
        vals, idx = vals.gather(-1, order), idx.gather(-1, order)
        for s in (sae, back):
            f = s.encode(x)
            top = f.topk(k, dim=-1)
            assert torch.equal(top.indices, idx)
            tol = dict(rtol=1e-5, atol=1e-5) if normalize_decoder else dict(rtol=0, atol=0)
            torch.testing.assert_close(top.values, vals, **tol)
            torch.testing.assert_close(s.decode(f), ref, rtol=1e-5, atol=1e-4)


def test_defect_4_trained_without_modality_labels_still_writes_sparsity(tmp_path):
    """The trainer measures the firing density even without modality labels, so the export has sparsity.safetensors."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no firing density is known" warning
        sae = vs.train(torch.randn(2048, 16), "topk", d_sae=64, k=4, steps=5, batch_size=256, progress=False)
        vs.export(sae, tmp_path / "s")
    log10 = load_file(tmp_path / "s" / "sparsity.safetensors")["sparsity"]
    torch.testing.assert_close(10 ** log10.double(), sae.density.double() + 1e-10, rtol=1e-5, atol=1e-9)
