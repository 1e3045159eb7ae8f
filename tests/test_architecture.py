"""The shape of the house: no cycles, no shadowing, small modules, old paths gone, no unpickling."""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STRUCTURE = ROOT.parent / "shared" / "tools" / "structure.py"


@pytest.mark.skipif(not STRUCTURE.exists(), reason="../shared/tools/structure.py is not beside the checkout")
def test_structure_check_passes():
    r = subprocess.run([sys.executable, str(STRUCTURE)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]


def test_import_contracts_hold():
    """The layers, no-cycle and forbidden-import contracts of pyproject.toml ([tool.importlinter]), from this checkout."""
    from importlinter.cli import lint_imports

    sys.path.insert(0, str(ROOT))
    old = os.getcwd()
    try:
        os.chdir(ROOT)
        code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True)
    finally:
        os.chdir(old)
        sys.path.remove(str(ROOT))
    assert code == 0, "an import contract is broken: run `lint-imports` in the checkout for the import chain"


def _imports(path: Path):
    """(module path, ImportFrom node) of every `from X import Y` inside vlens, function-local ones too."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == "vlens"):
            yield node


def test_no_private_name_crosses_a_module_wall():
    """Modules meet through public names: no `from .x import _y` (a `_`-prefixed module is a package-private helper)."""
    bad = []
    for path in sorted((ROOT / "vlens").rglob("*.py")):
        for node in _imports(path):
            if (node.module or "").rsplit(".", 1)[-1].startswith("_"):
                continue
            names = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            if names:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {'.' * node.level}{node.module or ''} "
                           f"import {', '.join(names)}")
    assert not bad, "private names imported across modules (give them a public seam):\n" + "\n".join(bad)


def test_only_the_model_reaches_into_nnsight():
    """nnsight's private `_module` is read in `vlens.model` (and `vlens.attention`, the in-trace attention pattern
    `VLM.read` computes from an envoy); elsewhere `VLM.hf_model` / `VLM.submodule`."""
    allowed = {"model.py", "attention.py"}
    bad = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "vlens").rglob("*.py")) if p.name not in allowed
           for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\._module\b", line)]
    assert not bad, bad


def test_nothing_inside_vlens_imports_the_vlens_package_itself():
    bad = [f"{path.relative_to(ROOT)}:{node.lineno}" for path in sorted((ROOT / "vlens").rglob("*.py"))
           for node in _imports(path) if node.level == 0 and node.module == "vlens"]
    assert not bad, bad


def test_modules_stay_small():
    """No module over 600 lines (docs/architecture.md)."""
    big = {str(p.relative_to(ROOT)): n for p in (ROOT / "vlens").rglob("*.py")
           if (n := len(p.read_text().splitlines())) > 600}
    assert not big, big


def test_no_public_name_shadows_a_submodule():
    """`import vlens.sae.training as m` binds a module: no package attribute hides a submodule of the same name."""
    bad = []
    for init in (ROOT / "vlens").rglob("__init__.py"):
        pkg = ".".join(init.parent.relative_to(ROOT).parts)
        if pkg in ("vlens.explorer",):  # its app needs the `explore` extra; its __init__ binds no submodule name
            continue
        mod = importlib.import_module(pkg)
        for sub in init.parent.iterdir():
            name = sub.stem if sub.suffix == ".py" else sub.name if (sub / "__init__.py").exists() else None
            if name and not name.startswith("_") and name in vars(mod):
                value = vars(mod)[name]
                if not (isinstance(value, types.ModuleType) and value.__name__ == f"{pkg}.{name}"):
                    bad.append(f"{pkg}.{name}")
    assert not bad, bad


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
