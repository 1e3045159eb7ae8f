"""mkdocs hooks of the vlens site (registered in mkdocs.yml).

`assets/plotly.min.js`: the figure pages under docs/assets/ (written by
docs/gen_figures.py with `include_plotlyjs="plotly.min.js"`) and the figures the
pages' code shows load plotly.js from the site itself. Rather than commit a 4.7 MB
copy, the build writes the one bundled with the installed plotly package, so the
site works offline.

Executed pages: every page's Python blocks run at build time (docs/blocks.py has the
convention and why not markdown-exec), and what they print and show is drawn under
them. A failing block is logged as a warning, so `mkdocs build --strict` fails, after
every page has run. `VLENS_DOCS_EXECUTE=0` turns execution off (quick `mkdocs serve`
while writing); `VLENS_DOCS_RECORD=path.json` writes what ran on each page (the tests
read it).

Cache: a page's outputs are kept in `.cache/docs-exec/` under a key made of the page's
text, every file of the `vlens` package, `docs/blocks.py` and the versions of torch,
transformers, nnsight and sae-lens, so a rebuild with nothing changed runs nothing (the
full execution takes about two minutes on 2 CPU cores). Any change to the library or the
page runs the page again. `VLENS_DOCS_CACHE=0` ignores the cache; the tests build with it
off, so every block really runs there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from functools import lru_cache
from pathlib import Path

from mkdocs.structure.files import File, Files

sys.path.insert(0, str(Path(__file__).resolve().parent))
from blocks import BlockError, Result, code_blocks, render, run_page  # noqa: E402

PLOTLY_JS = "assets/plotly.min.js"
ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "docs-exec"
log = logging.getLogger("mkdocs.hooks.vlens")
_record: dict[str, dict] = {}


def on_files(files: Files, config) -> Files:
    if files.get_file_from_path(PLOTLY_JS) is None:
        from plotly.offline import get_plotlyjs

        files.append(File.generated(config, PLOTLY_JS, content=get_plotlyjs()))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    if os.environ.get("VLENS_DOCS_EXECUTE", "1") == "0":
        return markdown
    page_id = page.file.src_uri
    t0 = time.perf_counter()
    use_cache = os.environ.get("VLENS_DOCS_CACHE", "1") != "0"
    key = hashlib.sha256(f"{_sources_digest()}\n{page_id}\n{markdown}".encode()).hexdigest()[:32]
    results = _cached(markdown, key) if use_cache else None
    cached = results is not None
    if results is None:
        try:
            results = run_page(markdown, page_id)
        except BlockError as exc:
            _record[page_id] = {"ran": None, "error": str(exc) + _cause(exc)}
            log.warning(str(exc))
            return markdown
        if use_cache:
            _store(key, results)
    _record[page_id] = {"ran": len(results), "error": None, "seconds": round(time.perf_counter() - t0, 2),
                        "printed": sum(bool(r.stdout.strip()) for r in results),
                        "figures": sum(len(r.figures) for r in results), "cached": cached}
    depth = page.url.count("/") if page.url else 0
    return render(markdown, results, "../" * depth + PLOTLY_JS)


@lru_cache(maxsize=1)
def _sources_digest() -> str:
    """What a page's outputs depend on besides its text: the library's files and the main packages' versions."""
    from importlib.metadata import PackageNotFoundError, version

    h = hashlib.sha256()
    for path in sorted((ROOT / "vlens").rglob("*")) + [Path(__file__).with_name("blocks.py")]:
        if path.is_file() and "__pycache__" not in path.parts:
            h.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    for name in ("torch", "transformers", "nnsight", "sae-lens", "plotly"):
        try:
            h.update(f"{name}={version(name)}".encode())
        except PackageNotFoundError:
            pass
    return h.hexdigest()


def _cached(markdown: str, key: str) -> list[Result] | None:
    """The page's results from the cache, or None (also when the page's blocks no longer match)."""
    try:
        saved = json.loads((CACHE / f"{key}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    blocks = {b.line: b for b in code_blocks(markdown) if b.runnable}
    if sorted(blocks) != [r["line"] for r in saved]:
        return None
    return [Result(blocks[r["line"]], r["stdout"], r["figures"]) for r in saved]


def _store(key: str, results: list[Result]) -> None:
    """Write the page's results to the cache, atomically (a build stopped midway leaves no half file)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = CACHE / f".{key}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps([{"line": r.block.line, "stdout": r.stdout, "figures": r.figures} for r in results]),
                   encoding="utf-8")
    os.replace(tmp, CACHE / f"{key}.json")


def _cause(exc: BaseException) -> str:
    import traceback

    cause = exc.__cause__
    return "\n" + "".join(traceback.format_exception(cause)) if cause is not None else ""


def on_post_build(config) -> None:
    path = os.environ.get("VLENS_DOCS_RECORD")
    if path:
        Path(path).write_text(json.dumps(_record, indent=1), encoding="utf-8")
