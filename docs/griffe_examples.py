"""Griffe extension of the vlens site (registered in mkdocs.yml).

vlens docstrings introduce their doctests with `Example:`. Griffe's Google
parser reads only `Examples:` as an examples section (code blocks, output
kept verbatim) and would otherwise render `Example:` as a Markdown
admonition, where doctest output such as `[1, 3]` turns into broken links.
This extension renames the heading before parsing.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Treat a Google-style `Example:` heading as `Examples:`."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and "Example:" in obj.docstring.value:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
