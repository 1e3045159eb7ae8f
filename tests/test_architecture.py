"""The shape of the house: no cycles, no shadowing, small modules, old paths gone, no unpickling."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STRUCTURE = ROOT.parent / "shared" / "tools" / "structure.py"


@pytest.mark.skipif(not STRUCTURE.exists(), reason="../shared/tools/structure.py is not beside the checkout")
def test_structure_check_passes():
    r = subprocess.run([sys.executable, str(STRUCTURE)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]


def test_no_module_unpickles_user_files():
    """No file vlens reads may run code: no pickle, and torch.load only with weights_only=True."""
    bad = []
    for path in (ROOT / "vlens").rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"pickle\.loads?\(|torch\.load\([^)]*\)|weights_only\s*=\s*False", text):
            if m.group(0).startswith("torch.load") and "weights_only=True" in m.group(0):
                continue
            bad.append(f"{path.relative_to(ROOT)}: {m.group(0)}")
    assert not bad, bad


#: What vlens 0.3 removed (CHANGELOG.md): old module paths, moved names, the legacy classes.
REMOVED_MODULES = ["vlens.positions", "vlens.configs", "vlens.harvest", "vlens.report", "vlens.sae.train",
                   "vlens.sae.evaluate", "vlens.sae.export", "vlens.sae.dashboard", "vlens.sae.base"]
REMOVED_NAMES = [("vlens", "image_geometry"), ("vlens.interventions", "token_mask"), ("vlens.interventions", "site_name"),
                 ("vlens.interventions", "positions"), ("vlens.steering", "pool_features"),
                 ("vlens.steering", "sparse_approximation"), ("vlens.steering", "TWO_CHOICE"),
                 ("vlens.probes", "sparse_probe"), ("vlens.probes", "HardConcrete"), ("vlens.sae", "MultimodalSAE"),
                 ("vlens.sae", "MultimodalStandardSAE"), ("vlens.sae", "collect_activations"),
                 ("vlens.sae", "heatmap_overlay"), ("vlens.sae.training", "modality_stats_from_source"),
                 ("vlens.activations:ActivationStore", "to_sae_lens"), ("vlens.activations:ActivationStore", "site")]


@pytest.mark.parametrize("old", REMOVED_MODULES)
def test_old_module_paths_are_gone(old):
    """No import finder serves vlens 0.1's module paths any more."""
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(old)
    assert not any(type(f).__module__.startswith("vlens") for f in sys.meta_path)


@pytest.mark.parametrize("where, name", REMOVED_NAMES)
def test_old_names_are_gone(where, name):
    """No module `__getattr__` forwards vlens 0.1's names: each is listed in CHANGELOG.md with its new home."""
    mod, _, cls = where.partition(":")
    obj = importlib.import_module(mod)
    obj = getattr(obj, cls) if cls else obj
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not hasattr(obj, name)
    assert re.search(rf"[`.]{name}\b", (ROOT / "CHANGELOG.md").read_text()), f"{where}.{name} is not in CHANGELOG.md"


def test_removed_keywords_are_refused():
    """`TrainConfig(lr=...)`, `harvest(site=...)` and `tiny("llama")` are gone (their replacements are in the changelog)."""
    import vlens
    from vlens.sae.training import TrainConfig

    with pytest.raises(TypeError):
        TrainConfig(lr=1e-3)
    with pytest.raises(TypeError, match="site"):
        vlens.harvest(vlens.tiny(n_layers=1), [], layers=[0], site="resid_post")
    with pytest.raises(Exception, match="llama"):
        vlens.tiny("llama")
    assert vlens.tiny(backbone="llama", n_layers=1).n_layers == 1


def test_every_paper_concept_has_its_module():
    for name in ("sites", "tokens", "families", "prepare", "model", "loading", "activations", "scoring", "prompts",
                 "probes", "sparsity", "steering", "interventions", "sae", "viz", "errors", "cli"):
        importlib.import_module(f"vlens.{name}")
