"""The documentation site builds, and every Python block in it runs and shows its results.

The site build executes the pages (docs/hooks.py with docs/blocks.py, which holds the
convention for code blocks: every ```python block runs, in page order, in one namespace per
page; ```python skip opts out; what a block prints and the plotly figures it shows are
drawn under it). The build runs once per test session (the `docs_site` fixture in
conftest.py) and records what ran on every page; the per-page tests read that record, so
each block runs once, not once for the build and once for the test.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS))
from blocks import code_blocks, render, run_page  # noqa: E402

PAGES = sorted(DOCS.rglob("*.md"))


def _page_id(page: Path) -> str:
    return page.relative_to(DOCS).as_posix()


RUNNABLE = [p for p in PAGES if any(b.runnable for b in code_blocks(p.read_text(encoding="utf-8")))]


def test_site_builds_strict(docs_site):
    """`mkdocs build --strict` succeeds: no broken links, nav entries, API reference warnings or failing blocks."""
    proc, site = docs_site.proc, docs_site.path
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    for page in PAGES:
        rel = page.relative_to(DOCS).with_suffix("")
        out = site / ("index.html" if rel.as_posix() == "index" else f"{rel.as_posix()}/index.html")
        assert out.exists(), f"{_page_id(page)} was not rendered to {out}"
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("vlens.loading.load", "vlens.tokens.TokenLayout", "vlens.loading.tiny", "vlens.data.Dataset",
                 "vlens.activations.read.read_layers", "vlens.sites.from_hook_name"):
        assert f'id="{name}"' in api, f"API reference lacks {name}"
    assert (site / "assets" / "plotly.min.js").stat().st_size > 1_000_000, "plotly.js not bundled"


def test_every_page_is_in_the_nav():
    """Each Markdown page is reachable from the site navigation (mkdocs only logs orphans)."""
    import yaml

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"]

    def walk(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            for x in node:
                yield from walk(x)
        elif isinstance(node, dict):
            for x in node.values():
                yield from walk(x)

    in_nav = set(walk(nav))
    missing = [_page_id(p) for p in PAGES if _page_id(p) not in in_nav]
    assert not missing, f"pages missing from mkdocs.yml nav: {missing}"
    absent = [p for p in in_nav if p.endswith(".md") and not (DOCS / p).exists()]
    assert not absent, f"nav names pages that do not exist: {absent}"


def test_figures_are_offline():
    """Committed figure pages load plotly.js locally, never from a CDN, and the figure script is present."""
    htmls = sorted((DOCS / "assets").rglob("*.html"))
    assert (DOCS / "assets" / "token_layout.html") in htmls and (DOCS / "assets" / "token_layout.png").exists()
    for html in htmls:
        text = html.read_text(encoding="utf-8")
        srcs = re.findall(r'<script[^>]*src="([^"]+)"', text)
        remote = [s for s in srcs if "://" in s or s.startswith("//")]
        assert not remote, f"{html.relative_to(ROOT)} loads scripts from the network: {remote}"


def test_code_block_parser_conventions():
    text = (
        "# t\n\n```python\na = 1\n```\n\n!!! note\n    ```python\n    b = a + 1\n    ```\n\n"
        "```python skip\nraise SystemExit\n```\n\n```bash\nrm -rf /\n```\n\n````markdown\n```python\nc = 3\n```\n````\n"
    )
    blocks = code_blocks(text)
    assert [(b.lang, b.runnable) for b in blocks] == [
        ("python", True), ("python", True), ("python", False), ("bash", False), ("markdown", False)
    ]
    assert blocks[1].code == "b = a + 1\n"
    assert blocks[4].code == "```python\nc = 3\n```\n"


@pytest.mark.parametrize("page", RUNNABLE, ids=[_page_id(p) for p in RUNNABLE])
def test_page_code_blocks_run(page: Path, docs_site):
    """Every runnable block of the page ran in the site build, in order, in one namespace."""
    rec = docs_site.record.get(_page_id(page))
    assert rec is not None, f"the site build did not execute docs/{_page_id(page)}:\n{docs_site.proc.stderr[-3000:]}"
    assert rec["error"] is None, rec["error"]
    assert rec["ran"] == sum(b.runnable for b in code_blocks(page.read_text(encoding="utf-8")))


def test_pages_show_their_results(docs_site):
    """Printed results and plotly figures appear in the built pages, under the blocks that made them."""
    probes = (docs_site.path / "tutorials" / "probes" / "index.html").read_text(encoding="utf-8")
    assert "Output" in probes and probes.count('class="vlens-figure"') == 3
    assert probes.count('src="../../assets/plotly.min.js"') == 1 and "Plotly.newPlot" in probes
    rec = docs_site.record
    assert rec["tutorials/probes.md"]["figures"] == 3 and rec["tutorials/lens.md"]["figures"] == 1
    assert sum(r["printed"] or 0 for r in rec.values() if r["ran"]) >= 20


def test_render_puts_output_under_its_block(tmp_path):
    """Output goes right after the block's closing fence, at the block's indentation; hide-output hides it."""
    text = ("# t\n\n```python\nprint('a`b')\n```\n\n!!! note\n    ```python\n    print(2)\n    ```\n\n"
            "```python hide-output\nprint(3)\n```\ntail\n")
    results = run_page(text, "t.md", tmp_path)
    assert [r.stdout for r in results] == ["a`b\n", "2\n", "3\n"]
    lines = render(text, results, "assets/plotly.min.js").splitlines()
    assert lines[4:9] == ["```", "", '```text title="Output"', "a`b", "```"]
    i = lines.index('    ```text title="Output"')
    assert lines[i + 1:i + 3] == ["    2", "    ```"]
    assert "3" not in lines[lines.index("```python hide-output"):][3:]


def test_execution_cache_round_trip(tmp_path, monkeypatch):
    """A page's outputs come back from the cache only while its runnable blocks are where they were."""
    import hooks

    monkeypatch.setattr(hooks, "CACHE", tmp_path / "cache")
    text = "# t\n\n```python\nprint(6 * 7)\n```\n"
    hooks._store("k", run_page(text, "t.md", tmp_path))
    back = hooks._cached(text, "k")
    assert [(r.block.line, r.stdout) for r in back] == [(3, "42\n")]
    assert hooks._cached("# t\n\n\n```python\nprint(6 * 7)\n```\n", "k") is None
    assert hooks._cached(text, "other") is None


def test_code_lines_fit_their_blocks():
    """No code line is wider than its rendered block: 80 characters, measured in Chromium at 1280 to 1920 px wide."""
    wide = [f"docs/{_page_id(p)}:{b.line + 1 + k}" for p in PAGES for b in code_blocks(p.read_text(encoding="utf-8"))
            if b.lang in ("python", "py", "bash")
            for k, ln in enumerate(b.code.splitlines()) if len(ln) > 80]
    assert not wide, f"code lines over 80 characters (they scroll sideways in the page): {wide}"


def test_data_loaders_have_a_page_the_first_hour_finds():
    """The loaders of vlens.data (image_folder, sharegpt4v, from_hf) are shown, running, on a page of their own
    that the quickstart and the harvesting page link to (not only at the end of the toy-model page)."""
    import yaml

    page = DOCS / "data.md"
    assert page.exists(), "docs/data.md (the data loaders page) is missing"
    runnable = "".join(b.code for b in code_blocks(page.read_text(encoding="utf-8")) if b.runnable)
    for call in ("data.image_folder(", "data.sharegpt4v(", "data.from_hf(", "harvest("):
        assert call in runnable, f"docs/data.md runs no {call}...)"
    for linking in ("quickstart.md", "harvest.md"):
        assert "](data.md" in (DOCS / linking).read_text(encoding="utf-8"), f"docs/{linking} does not link data.md"
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert "data.md" in str(yaml.safe_load(nav)["nav"])


def test_quickstart_claims_no_untested_remote_execution():
    """The quickstart does not claim that remote execution on NDIF works: nothing tests it (no network), and
    nnsight's offline dry run of the remote path fails on a VLM (tests/test_model.py records it)."""
    text = (DOCS / "quickstart.md").read_text(encoding="utf-8")
    assert "remote execution on NDIF included" not in text
    assert "Remote execution on NDIF is untested" in text
    assert "test_a_trace_survives_nnsights_dry_run_of_the_remote_path" in text
    assert "def test_a_trace_survives_nnsights_dry_run_of_the_remote_path" in (
        ROOT / "tests" / "test_model.py").read_text(encoding="utf-8")


def test_steering_tutorial_sweeps_the_ks_where_its_pair_flips():
    """The steering tutorial's sweep tries the ks where its main pair flips (2 and 3; k = 4 and above degenerate),
    plots efficacy and damage against k in one figure, and shows the layer × token-group measurement."""
    page = (DOCS / "tutorials" / "steering.md").read_text(encoding="utf-8")
    runnable = "".join(b.code for b in code_blocks(page) if b.runnable)
    ks = re.search(r"ks=\[([^\]]*)\]", runnable)
    assert ks is not None and {2.0, 3.0} <= {float(k) for k in ks.group(1).split(",")}, "the sweep misses k = 2, 3"
    assert "secondary_y=True" in runnable and '"damage"' in runnable  # efficacy and damage against k, one figure
    assert "## Which layers and tokens carry the vector" in page
    for group in ('"highres"', '"base"', '"newline"'):
        assert group in runnable
