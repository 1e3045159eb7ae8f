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
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from mkdocs.structure.files import File, Files

sys.path.insert(0, str(Path(__file__).resolve().parent))
from blocks import BlockError, render, run_page  # noqa: E402

PLOTLY_JS = "assets/plotly.min.js"
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
    try:
        results = run_page(markdown, page_id)
    except BlockError as exc:
        _record[page_id] = {"ran": None, "error": str(exc) + _cause(exc)}
        log.warning(str(exc))
        return markdown
    _record[page_id] = {"ran": len(results), "error": None, "seconds": round(time.perf_counter() - t0, 2),
                        "printed": sum(bool(r.stdout.strip()) for r in results),
                        "figures": sum(len(r.figures) for r in results)}
    depth = page.url.count("/") if page.url else 0
    return render(markdown, results, "../" * depth + PLOTLY_JS)


def _cause(exc: BaseException) -> str:
    import traceback

    cause = exc.__cause__
    return "\n" + "".join(traceback.format_exception(cause)) if cause is not None else ""


def on_post_build(config) -> None:
    path = os.environ.get("VLENS_DOCS_RECORD")
    if path:
        Path(path).write_text(json.dumps(_record, indent=1), encoding="utf-8")
