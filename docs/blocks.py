"""Run the Python blocks of a docs page, and render what they print and show into the page.

Shared by `docs/hooks.py` (the site build executes every page and shows the outputs under
the blocks) and `tests/test_docs.py` (which reads the build's record of every run).

Convention for code blocks in docs/**/*.md:

* Every fenced block whose info string starts with `python` (or `py`) is executed. Blocks
  of one page run in page order in ONE namespace, like the cells of a notebook, in a fresh
  empty temporary working directory, after `torch.manual_seed(0)`.
* A block opts out with the word `skip` after the language: ```python skip (rendered as
  ordinary Python; mkdocs.yml sets superfences' `relaxed_headers` so the extra word is
  allowed). Use it only for code that truly needs a GPU or the hub, e.g. llava-hf 7B.
* The word `hide-output` after the language runs the block but shows nothing under it.
* Fences in any other language (bash, text, ...) are never run.
* What a block prints appears under it as an "Output" block; each plotly figure it
  `.show()`s appears under it, drawn by the locally served plotly.js (no CDN).

Why not markdown-exec: it compiles each block under a pseudo file name
(`<code block: n1>`), and nnsight reads the body of a `with vlm.trace(...)` block from
its source file, so every page with a trace fails there (tried: `WithBlockNotFoundError`).
Here each block is written to a real file before it runs, so nnsight finds its source and a
traceback names `<page>_<n>_L<line>.py` with the page's own line numbers.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\n]*)$")


@dataclass
class Block:
    """One fenced code block: 1-based lines of its opening and closing fences, indent, info words, code."""

    line: int
    info: list[str]
    code: str
    indent: int = 0
    end: int = 0

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
        blocks.append(Block(line=i + 1, info=info, code="\n".join(body) + "\n", indent=indent, end=j + 1))
        i = j + 1
    return blocks


@dataclass
class Result:
    """What one block did: its printed text and the HTML of the figures it showed."""

    block: Block
    stdout: str = ""
    figures: list[str] = field(default_factory=list)


class BlockError(Exception):
    """A block of a page raised; the message names the page and the block's line."""


def run_page(text: str, page_id: str, workdir: str | os.PathLike | None = None) -> list[Result]:
    """Run the runnable blocks of one page in order in one namespace; return what each printed and showed.

    Runs in `workdir` (default: a fresh temporary folder), restoring the working directory after.
    Raises `BlockError` at the first block that fails.
    """
    import plotly.basedatatypes
    import torch

    own = workdir is None
    tmp = tempfile.mkdtemp(prefix="vlens-docs-") if own else str(workdir)
    src_dir = Path(tmp) / "_blocks"
    src_dir.mkdir(exist_ok=True)
    namespace: dict[str, Any] = {"__name__": "__main__"}
    shown: list[str] = []
    original_show = plotly.basedatatypes.BaseFigure.show

    def show(fig: Any, *args: Any, **kwargs: Any) -> None:
        height = fig.layout.height or 450
        shown.append(fig.to_html(full_html=False, include_plotlyjs=False, config={"responsive": True},
                                 default_width="100%", default_height=f"{height}px"))

    results: list[Result] = []
    cwd = os.getcwd()
    plotly.basedatatypes.BaseFigure.show = show  # type: ignore[method-assign]
    try:
        os.chdir(tmp)
        torch.manual_seed(0)
        stem = re.sub(r"[^A-Za-z0-9]+", "_", page_id)
        for n, block in enumerate(code_blocks(text)):
            if not block.runnable:
                continue
            file = src_dir / f"{stem}_{n}_L{block.line}.py"
            # Pad with blank lines so tracebacks give the line number in the page itself.
            source = "\n" * block.line + block.code
            file.write_text(source, encoding="utf-8")
            out = io.StringIO()
            shown.clear()
            try:
                with contextlib.redirect_stdout(out):
                    exec(compile(source, str(file), "exec"), namespace)
            except Exception as exc:
                raise BlockError(f"docs/{page_id}: the python block at line {block.line} failed: "
                                 f"{type(exc).__name__}: {exc}") from exc
            results.append(Result(block, out.getvalue(), list(shown)))
    finally:
        plotly.basedatatypes.BaseFigure.show = original_show  # type: ignore[method-assign]
        os.chdir(cwd)
        if own:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return results


def render(text: str, results: list[Result], plotly_src: str) -> str:
    """The page's Markdown with each block's output and figures inserted right under the block.

    `plotly_src` is the URL of plotly.min.js relative to the page; it is loaded once, before the first figure.
    """
    lines = text.splitlines()
    inserts: dict[int, list[str]] = {}
    script_done = False
    for r in results:
        if "hide-output" in r.block.info[1:]:
            continue
        pad = " " * r.block.indent
        add: list[str] = []
        out = r.stdout.rstrip("\n")
        if out:
            fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", out)), default=0))
            add += ["", f'{pad}{fence}text title="Output"', *(pad + ln for ln in out.splitlines()), pad + fence]
        for fig in r.figures:
            if not script_done:
                add += ["", f'{pad}<script src="{plotly_src}"></script>']
                script_done = True
            # One line of raw HTML, so Markdown leaves it alone.
            add += ["", pad + '<div class="vlens-figure">' + fig.replace("\n", " ") + "</div>"]
        if add:
            inserts[r.block.end] = add + [""]
    new: list[str] = []
    for i, ln in enumerate(lines, start=1):
        new.append(ln)
        new.extend(inserts.get(i, []))
    return "\n".join(new) + ("\n" if text.endswith("\n") else "")
