"""The explorer's attribution graphs: the graph JSONs a session holds, their drawings, and their features' dashboards.

A graph comes from a file (`vlens explore --graph PATH`, `explore(graphs=[...])`, an upload on the page) or
is produced in the session (`explorer.session.graphs.add(graph_dict)`). Every number the panel shows is
`vlens.graph_view.view_data` (the influence of each image patch on each node, in Python). A transcoder
feature's dashboard (`vlens.sae.dashboards.dashboard`) opens when the session has the transcoder of its
layer (`transcoders={layer: sae}`, or a list indexed by layer as `vlens.circuits.attribute` takes them: any
SAE-Lens SAE or transcoder whose `hook_name` names its site).

    >>> from vlens.graph_view import example_graph
    >>> shelf = GraphShelf()
    >>> shelf.add(example_graph(), "example")["n_nodes"]
    5
    >>> shelf.view("graph-0")["ids"][-1]
    'logit'
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import InputError, NotFoundError
from ..graph_view import graph_page, read_graph, view_data

__all__ = ["GraphShelf"]


class GraphShelf:
    """The graphs of a session by id (`graph-0`, ...), their cached `view_data`, and the transcoders by layer
    (a mapping, or a sequence indexed by layer)."""

    def __init__(self, transcoders: Mapping[int, Any] | Sequence[Any] | None = None) -> None:
        self.graphs: dict[str, dict] = {}
        self.names: dict[str, str] = {}
        self.files: dict[str, str | None] = {}  # the file a graph came from (None: a dict given in Python)
        self._views: dict[str, dict] = {}
        items = transcoders.items() if isinstance(transcoders, Mapping) else enumerate(transcoders or ())
        self.transcoders = {int(k): v for k, v in items}

    def add(self, graph: "dict | bytes | str | os.PathLike", name: str | None = None) -> dict[str, Any]:
        """Hold a graph (a dict, JSON bytes from an upload, or a file path); return its entry for the page."""
        file = None  # where the graph came from, for the snippet: an upload's name, a path as given
        if isinstance(graph, (bytes, bytearray)):
            file = name
            try:
                graph = json.loads(bytes(graph).decode("utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise InputError(f"{name or 'the upload'} is not a graph JSON ({e}): upload the <slug>.json "
                                 "that create_graph_files or vlens wrote") from None
            if not isinstance(graph, dict):
                raise InputError(f"{name or 'the upload'} holds JSON but not a graph object")
        elif not isinstance(graph, dict):
            file, name = str(graph), name or Path(graph).name
        graph = read_graph(graph)
        view = view_data(graph)  # checked and drawn once, here: a bad graph is refused at once
        key = f"graph-{len(self.graphs)}"
        self.graphs[key], self._views[key] = graph, view
        self.names[key] = name or str(graph["metadata"].get("slug") or key)
        self.files[key] = file
        return self.entry(key)

    def entry(self, key: str) -> dict[str, Any]:
        """A graph's id, name and size, for the page's list."""
        g = self.get(key)
        return {"id": key, "name": self.names[key], "n_nodes": len(g["nodes"]), "n_links": len(g["links"]),
                "prompt": str(g["metadata"].get("prompt", ""))}

    def entries(self) -> list[dict[str, Any]]:
        """Every graph's entry."""
        return [self.entry(k) for k in self.graphs]

    def get(self, key: str) -> dict:
        """A graph by id."""
        if key not in self.graphs:
            raise NotFoundError(f"no graph {key!r}: load one first (upload a graph JSON, or explore(graphs=[...]))")
        return self.graphs[key]

    def view(self, key: str) -> dict[str, Any]:
        """What the page draws for a graph (`vlens.graph_view.view_data`), with the layers that have dashboards."""
        self.get(key)
        return {**self._views[key], "dashboards": sorted(self.transcoders)}

    def page(self, key: str) -> str:
        """The graph as one stand-alone HTML page (`vlens.graph_view.graph_page`)."""
        return graph_page(self.get(key), title=f"attribution graph — {self.names[key]}")

    def transcoder(self, layer: int) -> Any:
        """The transcoder (or SAE) of a layer, for its features' dashboards."""
        if layer not in self.transcoders:
            have = sorted(self.transcoders) or "none"
            raise NotFoundError(f"no transcoder for layer {layer} (layers with one: {have}): pass "
                                "transcoders={layer: sae} to the Session or explore()")
        return self.transcoders[layer]
