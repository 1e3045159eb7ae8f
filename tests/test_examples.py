"""Every script in examples/ runs on the toy model (in a fresh interpreter, in a temporary directory)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.py"))
EXPECT = {
    "steer_live.py": "k=",
    "inspect_latent.py": "wrote latent.png",
    "export_to_sae_lens.py": "identical encodings: True",
    "probe_layers.py": "wrote probes.html",
}


def test_every_example_is_checked():
    assert {p.name for p in EXAMPLES} == set(EXPECT)


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script, tmp_path):
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert EXPECT[script.name] in r.stdout
