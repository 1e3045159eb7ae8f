"""The shape of the house: no cycles, no shadowing, small modules, old paths that warn, no unpickling."""

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


@pytest.mark.parametrize("old", ["vlens.positions", "vlens.tiny", "vlens.configs", "vlens.harvest", "vlens.report",
                                 "vlens.sae.train", "vlens.sae.evaluate", "vlens.sae.export", "vlens.sae.dashboard",
                                 "vlens.sae.base"])
def test_old_module_paths_warn_and_forward(old):
    from vlens._deprecated import MOVED

    assert old in MOVED
    mod = importlib.import_module(old)
    targets, call = MOVED[old]
    first = importlib.import_module(targets[0])
    name = call or next(n for n in getattr(first, "__all__", dir(first)) if not n.startswith("_"))
    with pytest.warns(DeprecationWarning, match=re.escape(old)):
        value = getattr(mod, name)
    assert value is getattr(first, name)


def test_same_named_functions_still_call_after_the_old_module_was_imported():
    import vlens

    from vlens.loading import tiny
    from vlens.sae.training import train

    for old in ("vlens.tiny", "vlens.harvest", "vlens.sae.train", "vlens.sae.evaluate"):
        importlib.import_module(old)  # the old module path is served from sys.modules...
    assert vlens.tiny is tiny and vlens.sae.train is train  # ...and the package keeps its functions
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert vlens.tiny(n_layers=1).n_layers == 1


def test_old_names_keep_their_meaning():
    import vlens
    from vlens import interventions, prompts, tokens

    with pytest.warns(DeprecationWarning):
        from vlens.positions import TokenLayout
    assert TokenLayout is tokens.TokenLayout
    with pytest.warns(DeprecationWarning):
        assert importlib.import_module("vlens.harvest").DEFAULT_PROMPT == prompts.QUESTION
    with pytest.warns(DeprecationWarning):
        assert interventions.site_name(3) == "resid_pre.3"
    with pytest.warns(DeprecationWarning):
        assert vlens.image_geometry((32, 32), pinpoints=[[32, 32]], tile_size=32, patch_size=8).n_tokens == 36


def test_every_paper_concept_has_its_module():
    for name in ("sites", "tokens", "families", "prepare", "model", "loading", "activations", "scoring", "prompts",
                 "probes", "sparsity", "steering", "interventions", "sae", "viz", "errors", "cli"):
        importlib.import_module(f"vlens.{name}")
