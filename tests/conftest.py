"""Shared fixtures: tiny random LLaVA-Next models, built once per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_under_pytests_folder(tmp_path_factory):
    """What vlens writes to a temporary folder when no `out=` is given (`harvest`'s store, the explorer's
    latents; kept on purpose, they are the user's) goes under pytest's own folder, which pytest prunes, and
    not into /tmp, where every test run left a few dozen stores behind. Subprocesses inherit TMPDIR."""
    import tempfile

    folder = str(tmp_path_factory.mktemp("tempfile"))
    old, old_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir, os.environ["TMPDIR"] = folder, folder
    yield
    tempfile.tempdir = old
    if old_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = old_env


@pytest.fixture(scope="session")
def tiny_mistral():
    import vlens

    return vlens.tiny(backbone="mistral")


@pytest.fixture(scope="session")
def tiny_llama():
    import vlens

    return vlens.tiny(backbone="llama", seed=1)


@pytest.fixture(scope="session", params=["mistral", "llama"])
def tiny_vlm(request, tiny_mistral, tiny_llama):
    return tiny_mistral if request.param == "mistral" else tiny_llama


@dataclass
class BuiltSite:
    """The documentation site built once per test session: its folder, the build process, what ran per page."""

    path: Path
    proc: subprocess.CompletedProcess
    record: dict


@pytest.fixture(scope="session")
def docs_site(tmp_path_factory) -> BuiltSite:
    """`mkdocs build --strict` of the docs, executing every page's code (shared by the docs and browser tests)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from browser_utils import build_site

    root = tmp_path_factory.mktemp("docs")
    rec = root / "record.json"
    proc = build_site(root / "site", env={"VLENS_DOCS_RECORD": str(rec), "VLENS_DOCS_CACHE": "0"})
    record = json.loads(rec.read_text(encoding="utf-8")) if rec.exists() else {}
    return BuiltSite(root / "site", proc, record)


def solid(w: int, h: int, colour=(200, 30, 30), mode: str = "RGB"):
    """A one-colour PIL image of width w and height h."""
    from PIL import Image

    return Image.new(mode, (w, h), colour if mode == "RGB" else None)
