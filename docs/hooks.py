"""mkdocs hooks of the vlens site (registered in mkdocs.yml).

`assets/plotly.min.js`: the figure pages under docs/assets/ (written by
docs/gen_figures.py with `include_plotlyjs="plotly.min.js"`) load plotly.js
from next to themselves. Rather than commit a 4.7 MB copy, the build writes
the one bundled with the installed plotly package, so the site works offline.
"""

from __future__ import annotations

from mkdocs.structure.files import File, Files

PLOTLY_JS = "assets/plotly.min.js"


def on_files(files: Files, config) -> Files:
    if files.get_file_from_path(PLOTLY_JS) is None:
        from plotly.offline import get_plotlyjs

        files.append(File.generated(config, PLOTLY_JS, content=get_plotlyjs()))
    return files
