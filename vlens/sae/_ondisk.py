"""Checks of SAE files before anything reads them (package-private to `vlens.sae`).

SAE-Lens and torch report a bad file by what failed inside them
(`Error(s) in loading state_dict`, `missing 1 required positional argument`,
`JSONDecodeError`); these checks name the file, what is wrong with it and what
to do instead.

    >>> import json, tempfile
    >>> from pathlib import Path
    >>> p = Path(tempfile.mkdtemp()) / "cfg.json"
    >>> _ = p.write_text("{not json")
    >>> try:
    ...     read_json(p, "re-export it")
    ... except InputError as e:
    ...     print(str(e)[-30:])
    line 1 column 2): re-export it
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor

from ..errors import InputError

__all__ = ["read_json", "check_config", "expected_shapes", "check_tensors"]


def read_json(path: Path, fix: str) -> dict[str, Any]:
    """The JSON object in `path`; a file that is not one is refused with `fix`, the way to a good one.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "cfg.json"
        >>> _ = p.write_text('{"d_in": 8}')
        >>> read_json(p, "")
        {'d_in': 8}
    """
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}): {fix}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path} is not a text file: {fix}") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path} holds a JSON {type(obj).__name__}, not an object of config fields: {fix}")
    return obj


def check_config(path: Path, cfg: Mapping[str, Any], cfg_cls: type, arch: str) -> None:
    """Refuse a `cfg.json` that lacks a field the SAE-Lens config class `cfg_cls` requires, or has bad widths.

    Example:
        >>> from sae_lens.saes import StandardSAEConfig
        >>> try:
        ...     check_config(Path("sae/cfg.json"), {"d_sae": 16}, StandardSAEConfig, "standard")
        ... except InputError as e:
        ...     print(str(e)[:58])
        sae/cfg.json lacks ['d_in'], which a 'standard' SAE needs
    """
    required = [f.name for f in dataclasses.fields(cfg_cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in cfg]
    if missing:
        raise InputError(
            f"{path} lacks {missing}, which a {arch!r} SAE needs (d_in: the width of the activations it reads, "
            "d_sae: its number of latents): add them, or re-export the SAE with vlens.sae.export"
        )
    for name in ("d_in", "d_sae"):
        value = cfg.get(name)
        if name in cfg and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise InputError(f"{path} says {name}={value!r}: it must be a positive int (fix it, or re-export the SAE)")


def expected_shapes(sae_cls: type, cfg: Any) -> dict[str, tuple[int, ...]]:
    """The tensor shapes an SAE of class `sae_cls` and config `cfg` holds (built on the meta device: no memory).

    Example:
        >>> from sae_lens.saes import StandardSAE, StandardSAEConfig
        >>> expected_shapes(StandardSAE, StandardSAEConfig(d_in=8, d_sae=16))["W_dec"]
        (16, 8)
    """
    meta_cfg = dataclasses.replace(cfg, device="meta")
    return {k: tuple(v.shape) for k, v in sae_cls(meta_cfg).state_dict().items()}


def check_tensors(path: Path, tensors: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]],
                  because: str, fix: str) -> None:
    """Refuse weights in `path` whose names or shapes are not `expected` (which `because` explains), with `fix`.

    Example:
        >>> import torch
        >>> try:
        ...     check_tensors(Path("sae.safetensors"), {"W": torch.zeros(2, 3)}, {"W": (3, 2), "b": (2,)},
        ...                   "cfg.json (d_in=2)", "Re-export it.")
        ... except InputError as e:
        ...     print(e)
        sae.safetensors does not match cfg.json (d_in=2): missing b; W has shape (2, 3), not (3, 2). Re-export it.
    """
    problems = []
    missing = [k for k in expected if k not in tensors]
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    extra = [k for k in tensors if k not in expected]
    if extra:
        problems.append(f"unexpected {', '.join(extra)}")
    problems += [f"{k} has shape {tuple(tensors[k].shape)}, not {shape}"
                 for k, shape in expected.items() if k in tensors and tuple(tensors[k].shape) != tuple(shape)]
    if problems:
        raise InputError(f"{path} does not match {because}: {'; '.join(problems)}. {fix}")
