"""Old import paths of vlens 0.1, kept for one minor version: each warns and forwards to the new home.

vlens 0.2 moved several modules (see docs/architecture.md). `import vlens`
installs a finder that serves the old module paths as thin shim modules:
`from vlens.harvest import ActivationStore` still works, with a
`DeprecationWarning` naming the new path. Where an old module shared its name
with a function (`vlens.harvest`, `vlens.tiny`, `vlens.sae.train`, ...), the
package keeps the function: importing the old module path registers the shim
in `sys.modules` only (`guard`), so `vlens.harvest(...)` and `vlens.harvest is
vlens.activations.harvest` hold whatever was imported before.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any

#: old module path -> (new module paths searched in order, the same-named function the package keeps, if any)
MOVED: dict[str, tuple[tuple[str, ...], str | None]] = {
    "vlens.positions": (("vlens.tokens", "vlens.families.llava_next"), None),
    "vlens.tiny": (("vlens.loading", "vlens.families.llava_next", "vlens.families.wordlevel"), "tiny"),
    "vlens.configs": (("vlens.families.checkpoints", "vlens.loading"), None),
    "vlens.harvest": (
        ("vlens.activations", "vlens.prompts", "vlens.activations.harvesting", "vlens.activations.store",
         "vlens.activations.figures"),
        "harvest",
    ),
    "vlens.report": (("vlens.viz",), None),
    "vlens.sae.train": (("vlens.sae.training",), "train"),
    "vlens.sae.evaluate": (("vlens.sae.evals",), "evaluate"),
    "vlens.sae.export": (("vlens.sae.io",), "export"),
    "vlens.sae.dashboard": (("vlens.sae.dashboards",), "dashboard"),
    "vlens.sae.base": (("vlens.sae.modality", "vlens.sae.data"), None),
}

#: Names whose spelling changed, per old module: old name -> new name.
RENAMED: dict[str, dict[str, str]] = {
    "vlens.harvest": {"DEFAULT_PROMPT": "QUESTION", "SITES": "KINDS"},
}


class _Shim(types.ModuleType):
    """A stand-in for a moved module: attribute access warns and forwards to the new modules."""

    _targets: tuple[str, ...] = ()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        new_name = RENAMED.get(self.__name__, {}).get(name, name)
        for target in self._targets:
            mod = importlib.import_module(target)
            if hasattr(mod, new_name):
                warnings.warn(
                    f"{self.__name__}.{name} moved to {target}.{new_name}; the old path goes away in vlens 0.3",
                    DeprecationWarning,
                    stacklevel=2,
                )
                return getattr(mod, new_name)
        raise AttributeError(f"module {self.__name__!r} (moved to {', '.join(self._targets)}) has no attribute {name!r}")


class _Loader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        targets, _ = MOVED[spec.name]
        mod = _Shim(spec.name, f"Deprecated: moved to {', '.join(targets)}.")
        mod._targets = targets
        return mod

    def exec_module(self, module: types.ModuleType) -> None:
        return None


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED or importlib.machinery.PathFinder.find_spec(fullname, path) is not None:
            return None  # not moved, or its file is still there
        return importlib.machinery.ModuleSpec(fullname, _Loader())


def install() -> None:
    """Serve the old module paths (idempotent)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


class _Guarded(types.ModuleType):
    """A package that keeps its same-named functions when an old module path of the same name is imported."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, _Shim) and name in self.__dict__ and not isinstance(self.__dict__[name], types.ModuleType):
            return  # the import system binds submodules on their parent; the function stays, the shim is in sys.modules
        super().__setattr__(name, value)


def guard(package: types.ModuleType) -> None:
    """Keep `package`'s functions named like moved modules (call at the end of the package's `__init__`)."""
    if type(package) is types.ModuleType:
        package.__class__ = _Guarded
