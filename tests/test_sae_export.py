"""vlens.sae.io: SAE-Lens round trip in a clean process, any SAE-Lens architecture, converters, bad files, old paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import vlens.sae as vs
from sae_lens import SAE
from sae_lens.registry import get_sae_class
from sae_lens.saes import StandardSAE


@pytest.fixture(scope="module")
def trained():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 16, generator=g) * 5.0
    mod = (torch.arange(2048) % 2).long()
    sae = vs.train((x, mod), "paper", d_sae=64, steps=20, batch_size=256, progress=False)
    return sae, x, mod


def _clean_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `code` in `python -I -S` from a directory without vlens.

    -I: no cwd on sys.path, no PYTHON* variables, no user site; -S: no site processing, so the
    editable-install hook of vlens (a .pth file) never runs. The venv's site-packages is then added
    as a plain path: SAE-Lens and torch import, vlens does not (asserted inside).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    prelude = f"import sys; sys.path.append({sysconfig.get_paths()['purelib']!r})\n"
    return subprocess.run([sys.executable, "-I", "-S", "-c", prelude + textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)


def test_export_loads_in_plain_sae_lens_without_vlens(tmp_path):
    """Standard (paper), TopK and BatchTopK (-> JumpReLU) exports, checked in one clean subprocess."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1024, 16, generator=g) * 3.0
    mod = (torch.arange(1024) % 2).long()
    probe = x[:64].contiguous()
    dirs = []
    for preset in ("paper", "topk", "batchtopk"):
        sae = vs.train((x, mod), preset, d_sae=64, steps=10, batch_size=256, k=4, progress=False)
        out = vs.export(sae, tmp_path / preset, model_name="tiny-llava", hook_name="blocks.2.hook_resid_pre")
        f = sae.encode(probe)
        save_file({"x": probe, "feats": f.contiguous(), "recon": sae.decode(f).contiguous()}, out / "ref.safetensors")
        dirs.append(str(out))
        cfg = json.loads((out / "cfg.json").read_text())
        assert cfg["metadata"]["sae_lens_version"] and cfg["metadata"]["vlens_modality"]["n_image_tokens"] > 0
        sp = load_file(out / "sparsity.safetensors")["sparsity"]
        assert sp.shape == (64,) and (sp <= 0).all()
    code = f"""
        try:
            import vlens
        except ImportError:
            pass
        else:
            raise AssertionError('vlens must not be importable here: ' + repr(vlens))
        import torch
        from safetensors.torch import load_file
        from sae_lens import SAE
        for d in {dirs!r}:
            sae = SAE.load_from_disk(d)
            ref = load_file(d + '/ref.safetensors')
            f = sae.encode(ref['x'])
            assert torch.equal(f, ref['feats']), 'encode differs for ' + d
            assert torch.equal(sae.decode(f), ref['recon']), 'decode differs for ' + d
            assert sae.cfg.metadata.hook_name == 'blocks.2.hook_resid_pre'
            assert sae.cfg.metadata.model_name == 'tiny-llava'
            print('OK', type(sae).__name__)
    """
    res = _clean_python(code, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["OK", "StandardSAE", "OK", "TopKSAE", "OK", "JumpReLUSAE"]


def test_vlens_load_round_trip_keeps_modality(trained, tmp_path):
    sae, x, _ = trained
    back = vs.load(vs.export(sae, tmp_path / "s"))
    assert type(back) is StandardSAE and back.modality is not None
    assert torch.equal(back.encode(x[:32]), sae.encode(x[:32]))
    for name in ("freq_image", "freq_text", "mean_image", "mean_text"):
        assert torch.equal(getattr(back.modality, name), getattr(sae.modality, name))
    assert back.modality.n_image == sae.modality.n_image


def test_export_folds_activation_scale(trained):
    sae, x, _ = trained
    scale = sae.cfg.metadata.vlens_training["activation_scale"]
    assert scale != 1.0  # x had norm ~20, sqrt(16) = 4
    # the exported SAE takes raw activations: reconstruction error is small relative to x itself
    rel = (sae(x) - x).norm() / x.norm()
    assert rel < 1.0


def test_unknown_architecture_and_corrupt_weights(trained, tmp_path):
    sae, _, _ = trained
    d = vs.export(sae, tmp_path / "a")
    cfg = json.loads((d / "cfg.json").read_text())
    cfg["architecture"] = "mystery_sae"
    (d / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="architecture 'mystery_sae'.*does not know"):
        vs.load(d)
    d2 = vs.export(sae, tmp_path / "b")
    w = d2 / "sae_weights.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        vs.load(d2)
    w.write_bytes(b"\x80\x04garbage-pickle")
    with pytest.raises(ValueError, match="never falls back to pickle"):
        vs.load(d2)


@pytest.mark.parametrize("prefix", ["", "module."])
@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_convert_paper_checkpoint(tmp_path, prefix, fmt):
    g = torch.Generator().manual_seed(2)
    d, m = 16, 96
    sd = {f"{prefix}fc1.weight": torch.randn(m, d, generator=g) * 0.1, f"{prefix}fc1.bias": torch.randn(m, generator=g) * 0.1,
          f"{prefix}fc2.weight": torch.randn(d, m, generator=g) * 0.1, f"{prefix}fc2.bias": torch.randn(d, generator=g)}
    path = tmp_path / f"ckpt.{fmt}"
    if fmt == "safetensors":
        save_file(sd, path)
    else:
        torch.save(sd, path)
    sae = vs.convert_paper_checkpoint(path, tmp_path / "out", hook_name="blocks.8.hook_resid_pre")
    x = torch.randn(50, d, generator=g)
    # the original formula: fc2(relu(fc1(8 x))) / 8
    f_ref = F.relu(F.linear(8 * x, sd[f"{prefix}fc1.weight"], sd[f"{prefix}fc1.bias"]))
    ref = F.linear(f_ref, sd[f"{prefix}fc2.weight"], sd[f"{prefix}fc2.bias"]) / 8
    assert torch.allclose(sae.encode(x), f_ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(sae(x), ref, atol=1e-5, rtol=1e-5)
    again = vs.load(tmp_path / "out")
    assert torch.equal(again.encode(x), sae.encode(x))
    assert again.cfg.metadata.hook_name == "blocks.8.hook_resid_pre"


def test_convert_paper_checkpoint_bad_keys():
    with pytest.raises(ValueError, match="missing"):
        vs.convert_paper_checkpoint({"encoder.weight": torch.zeros(4, 2)})


def test_convert_sparsify_checkpoint(tmp_path):
    g = torch.Generator().manual_seed(3)
    d, m, k = 16, 128, 8
    src = tmp_path / "layers.8"
    src.mkdir()
    (src / "cfg.json").write_text(json.dumps({"activation": "topk", "expansion_factor": 8, "normalize_decoder": True,
                                               "num_latents": m, "k": k, "multi_topk": False,
                                               "skip_connection": False, "transcode": False, "d_in": d}))
    sd = {"encoder.weight": torch.randn(m, d, generator=g), "encoder.bias": torch.randn(m, generator=g) * 0.1,
          "W_dec": torch.randn(m, d, generator=g), "b_dec": torch.randn(d, generator=g)}
    save_file(sd, src / "sae.safetensors")
    sae = vs.convert_sparsify_checkpoint(src, tmp_path / "out")
    x = torch.randn(40, d, generator=g)
    # sparsify's formula: top-k of relu((x - b_dec) W_enc^T + b_enc), decode with W_dec + b_dec
    pre = F.relu(F.linear(x - sd["b_dec"], sd["encoder.weight"], sd["encoder.bias"]))
    vals, idx = pre.topk(k, dim=-1)
    ref = (vals.unsqueeze(-1) * sd["W_dec"][idx]).sum(1) + sd["b_dec"]
    f = sae.encode(x)
    assert torch.equal((f > 0).sum(-1), (vals > 0).sum(-1))
    assert torch.allclose(sae.decode(f), ref, atol=1e-4, rtol=1e-4)
    assert vs.load(tmp_path / "out").cfg.k == k
    (src / "cfg.json").write_text(json.dumps({"d_in": d, "k": k, "activation": "groupmax"}))
    with pytest.raises(ValueError, match="groupmax"):
        vs.convert_sparsify_checkpoint(src)


def _sae_lens_sae(arch: str, d: int = 16, m: int = 48):
    """A plain SAE-Lens inference SAE of `arch` with random weights (no vlens involved)."""
    import dataclasses

    cls, cfg_cls = get_sae_class(arch)
    names = {f.name for f in dataclasses.fields(cfg_cls)}
    kw = dict(d_in=d, d_sae=m)
    if "k" in names:
        kw["k"] = 6
    if "d_out" in names:
        kw.update(d_out=d, apply_b_dec_to_input=False)
    sae = cls(cfg_cls(**kw))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            if name == "threshold":
                p.abs_()
    return sae


@pytest.mark.parametrize("arch", ["gated", "abstopk", "matching_pursuit", "topk", "jumprelu", "transcoder"])
def test_load_any_sae_lens_architecture_with_modality(tmp_path, arch):
    """SAEs written by plain SAE-Lens `save_model` load through vlens.sae.load, take modality statistics by
    composition, and keep them through export / load (the export still loads in plain SAE-Lens)."""
    sae = _sae_lens_sae(arch)
    sae.save_model(tmp_path / "plain")
    back = vs.load(tmp_path / "plain")
    assert type(back) is type(sae) and back.modality is None
    g = torch.Generator().manual_seed(6)
    x, mod = torch.randn(400, 16, generator=g), (torch.arange(400) % 2).long()
    assert torch.equal(back.encode(x), sae.encode(x))
    with pytest.raises(ValueError, match="reads 16-dimensional"):
        back.encode(torch.randn(3, 12))
    st = vs.modality_stats(back, (x, mod))
    assert st.n_image == 200 and vs.modality_stats(back) is st and st.alive.any()
    out = vs.export(back, tmp_path / "vlens", hook_name="blocks.3.hook_resid_pre")
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "modality.safetensors", "sae_weights.safetensors",
                                                      "sparsity.safetensors"]
    again = vs.load(out)
    assert type(again) is type(sae)
    for name in ("freq_image", "freq_text", "mean_image", "mean_text"):
        assert torch.equal(getattr(again.modality, name), getattr(st, name))
    assert (again.modality.n_image, again.modality.n_text) == (200, 200)
    plain = SAE.load_from_disk(out)
    assert torch.equal(plain.encode(x), back.encode(x)) and plain.cfg.metadata.hook_name == "blocks.3.hook_resid_pre"


def test_export_writes_with_sae_lens_save_model(trained, tmp_path):
    """The weights file is SAE-Lens's own `save_model` output, byte for byte; the caller's SAE is unchanged."""
    sae, _, _ = trained
    meta_before = dict(sae.cfg.metadata.to_dict())
    out = vs.export(sae, tmp_path / "v", model_name="m", hook_name="blocks.1.hook_resid_pre")
    sae.save_model(tmp_path / "plain")
    assert (out / "sae_weights.safetensors").read_bytes() == (tmp_path / "plain" / "sae_weights.safetensors").read_bytes()
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["device"] == "cpu" and cfg["metadata"]["model_name"] == "m" and "vlens_modality" in cfg["metadata"]
    assert sae.cfg.metadata.to_dict() == meta_before
