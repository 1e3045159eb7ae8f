"""The documentation site builds, and every Python block in it runs.

Convention for code blocks in docs/**/*.md:

* Every fenced block whose info string starts with `python` (or `py`) is
  executed. Blocks of one page run in page order in ONE namespace, like the
  cells of a notebook, in a fresh empty temporary working directory. Pages
  run independently, each as its own parametrized test named after the page.
* A block opts out with the word `skip` after the language: ```python skip
  (rendered as ordinary Python; mkdocs.yml sets superfences'
  `relaxed_headers` so the extra word is allowed). Use it only for code that
  truly needs a GPU or the hub, e.g. loading llava-hf 7B.
* Fences in any other language (bash, text, ...) are never run.
* `plotly` figures' `.show()` is a no-op during the run.

Each block is written to a real file before it runs (nnsight reads trace
bodies from source files), so a traceback names `<page>_<n>_L<line>.py`.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from browser_utils import build_site  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\n]*)$")


@dataclass
class Block:
    """One fenced code block: 1-based line of its opening fence, its info words, its dedented code."""

    line: int
    info: list[str]
    code: str

    @property
    def lang(self) -> str:
        return self.info[0].lstrip("{.").rstrip("}").lower() if self.info else ""

    @property
    def runnable(self) -> bool:
        return self.lang in ("python", "py") and "skip" not in self.info[1:]


def code_blocks(text: str) -> list[Block]:
    """All fenced code blocks of a Markdown text, at any indentation (admonitions, tabs, lists).

    Example:
        >>> [(b.line, b.lang, b.runnable) for b in code_blocks("x\\n```python\\n1\\n```\\n```python skip\\n2\\n```")]
        [(2, 'python', True), (5, 'python', False)]
    """
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = len(m["indent"].expandtabs()), m["fence"], m["info"].split()
        close = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j].lstrip())
            j += 1
        blocks.append(Block(line=i + 1, info=info, code="\n".join(body) + "\n"))
        i = j + 1
    return blocks


def _page_id(page: Path) -> str:
    return page.relative_to(DOCS).as_posix()


RUNNABLE = [p for p in PAGES if any(b.runnable for b in code_blocks(p.read_text(encoding="utf-8")))]


def test_site_builds_strict(tmp_path):
    """`mkdocs build --strict` succeeds: no broken links, nav entries, or API reference warnings."""
    proc = build_site(tmp_path / "site")
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    for page in PAGES:
        rel = page.relative_to(DOCS).with_suffix("")
        out = tmp_path / "site" / ("index.html" if rel.as_posix() == "index" else f"{rel.as_posix()}/index.html")
        assert out.exists(), f"{_page_id(page)} was not rendered to {out}"
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("vlens.loading.load", "vlens.tokens.TokenLayout", "vlens.loading.tiny", "vlens.data.Dataset",
                 "vlens.activations.read.read_layers", "vlens.sites.from_hook_name"):
        assert f'id="{name}"' in api, f"API reference lacks {name}"
    assert (tmp_path / "site" / "assets" / "plotly.min.js").stat().st_size > 1_000_000, "plotly.js not bundled"


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
def test_page_code_blocks_run(page: Path, tmp_path, monkeypatch):
    """Run the page's Python blocks in order in one namespace (see the module docstring)."""
    import plotly.basedatatypes
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(plotly.basedatatypes.BaseFigure, "show", lambda self, *a, **k: None)
    torch.manual_seed(0)
    rel = _page_id(page)
    namespace: dict = {"__name__": "__main__"}
    src_dir = tmp_path / "_blocks"
    src_dir.mkdir()
    ran = 0
    for n, block in enumerate(code_blocks(page.read_text(encoding="utf-8"))):
        if not block.runnable:
            continue
        file = src_dir / f"{re.sub(r'[^A-Za-z0-9]+', '_', rel)}_{n}_L{block.line}.py"
        # Pad with blank lines so tracebacks give the line number in the page itself.
        source = "\n" * block.line + block.code
        file.write_text(source, encoding="utf-8")
        try:
            exec(compile(source, str(file), "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"docs/{rel}: the python block at line {block.line} failed: "
                                 f"{type(exc).__name__}: {exc}") from exc
        ran += 1
    assert ran > 0
