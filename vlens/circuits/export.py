"""An attribution graph as circuit-tracer's graph JSON, the file its local server and Neuronpedia's viewer read.

`graph_json` builds what circuit-tracer 0.5.0's `create_graph_files` writes
(`circuit_tracer/utils/create_graph_files.py` with the pydantic models of
`circuit_tracer/frontend/graph_models.py`): `metadata`, `qParams`, `nodes`
and `links`, node ids and fields as its `Node.feature_node / error_node /
token_node / logit_node` make them, pruned by `prune_graph` at the given
thresholds. `write_graph_files` writes `<slug>.json` and updates
`graph-metadata.json` (its `add_graph_metadata`), so circuit-tracer's
`serve(data_dir=...)` shows the graph. Written here, not called, because
circuit-tracer cannot be installed beside vlens (it pins
`transformers<=4.57.3` and `huggingface-hub<1.0`) and its `Graph` holds
token ids, not image patches.

vlens adds keys the viewers ignore (pydantic drops unknown fields):

* each image-token embedding node with pixels (base and high-res patches;
  newline tokens have none) gets `"vlens_patch": {"image": i, "box": [x0,
  y0, x1, y1], "tile": t, "row": r, "col": c}`, the box in pixels of the
  original image (`vlens.tokens.ImageGeometry`), plus `"kind"`;
* every node gets `"vlens_influence"`, its (not cumulative) influence on the
  logit nodes, so summed patch influence can be drawn over the picture;
* `metadata` gets `"vlens_images"`: a PNG data URL of each image, and
  `"vlens_norms"`: how the graph linearised the norms (`"frozen"` or
  `"jacobian"`, `vlens.circuits.replacement`).

    >>> import vlens; from PIL import Image
    >>> from vlens.circuits.replacement import random_transcoders
    >>> from vlens.circuits.graph import attribute
    >>> vlm = vlens.tiny(n_layers=1)
    >>> img = Image.new("RGB", (32, 32), "red")
    >>> b = vlm.prepare(["<image>\\nhi"], [img])
    >>> g = attribute(vlm, random_transcoders(vlm, d_sae=8), b, images=[img], progress=False)
    >>> d = graph_json(g, "demo")
    >>> sorted(d), sorted(next(n for n in d["nodes"] if "vlens_patch" in n)["vlens_patch"])[:3]
    (['links', 'metadata', 'nodes', 'qParams'], ['box', 'col', 'image'])
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..tokens import KIND_NAMES, NEWLINE
from .graph import Graph

__all__ = ["graph_json", "write_graph_files", "patch_info", "png_data_url"]


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def _node(node_id: str, feature: int, layer: str, ctx_idx: int, feature_type: str, js: str, **kw: Any) -> dict:
    """A node with every field of circuit-tracer's `Node` model, in its order and with its defaults."""
    return {"node_id": node_id, "feature": feature, "layer": layer, "ctx_idx": ctx_idx, "feature_type": feature_type,
            "token_prob": kw.get("token_prob", 0.0), "is_target_logit": kw.get("is_target_logit", False),
            "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": js, "clerp": kw.get("clerp", ""),
            "influence": kw.get("influence"), "activation": kw.get("activation")}


def patch_info(graph: Graph) -> dict[int, dict]:
    """Per sequence position of an image patch: {"image", "box", "tile", "row", "col", "kind"} (newlines left out).

    Example:
        >>> import vlens; from PIL import Image
        >>> from vlens.circuits.replacement import random_transcoders
        >>> from vlens.circuits.graph import attribute
        >>> vlm = vlens.tiny(n_layers=1)
        >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
        >>> info = patch_info(attribute(vlm, random_transcoders(vlm, d_sae=8), b, progress=False))
        >>> first = info[min(info)]
        >>> first["tile"], first["row"], first["col"], first["box"]
        (0, 0, 0, [0.0, 0.0, 8.0, 8.0])
    """
    out: dict[int, dict] = {}
    for span in graph.layout.images:
        if span.batch_index != 0:
            continue
        g = span.geometry
        for k, pos in enumerate(span.positions().tolist()):
            if pos >= graph.n_pos or int(g.kind[k]) == NEWLINE:
                continue
            out[pos] = {"image": span.image, "box": [float(v) for v in g.box[k].tolist()], "tile": int(g.tile[k]),
                        "row": int(g.row[k]), "col": int(g.col[k]), "kind": KIND_NAMES[int(g.kind[k])]}
    return out


def png_data_url(image: Image.Image) -> str:
    """A PNG data URL of an image (what `metadata.vlens_images` holds).

    Example:
        >>> png_data_url(Image.new("RGB", (2, 2)))[:22]
        'data:image/png;base64,'
    """
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _f(x: Any) -> float:
    v = float(x)
    return v if math.isfinite(v) else 0.0


def _nodes(graph: Graph, node_mask: torch.Tensor, cumulative: torch.Tensor, infl: torch.Tensor) -> dict[int, dict]:
    n_f, n_pos, layers = graph.n_features, graph.n_pos, graph.n_layers
    err_end = n_f + n_pos * layers
    tok_end = err_end + n_pos
    patches = patch_info(graph)
    nodes: dict[int, dict] = {}
    for i in node_mask.nonzero()[:, 0].tolist():
        c = _f(cumulative[i])
        if i < n_f:
            L, p, f = graph.features[i].tolist()
            n = _node(f"{L}_{f}_{p}", _cantor(L, f), str(L), p, "cross layer transcoder", f"{L}_{f}-0",
                      influence=c, activation=_f(graph.activations[i]))
        elif i < err_end:
            L, p = divmod(i - n_f, n_pos)
            n = _node(f"0_{L}_{p}", -1, str(L), p, "mlp reconstruction error", f"{L}_{p}-0", influence=c)
        elif i < tok_end:
            p = i - err_end
            v = int(graph.input_ids[p])
            n = _node(f"E_{v}_{p}", p, "E", p, "embedding", f"E_{v}-{p}", influence=c)
            if p in patches:
                n["vlens_patch"] = patches[p]
        else:
            k = i - tok_end
            label, v = graph.logit_targets[k]
            prob = _f(graph.logit_probs[k])
            n = _node(f"{layers + 1}_{v}_{n_pos - 1}", v, str(layers + 1), n_pos - 1, "logit", f"L_{v}-{n_pos - 1}",
                      token_prob=prob, is_target_logit=k == 0, clerp=f'Output "{label}" (p={prob:.3f})')
        n["vlens_influence"] = _f(infl[i])
        nodes[i] = n
    return nodes


def _prompt_tokens(graph: Graph) -> list[str]:
    patches = patch_info(graph)
    out = []
    for p, t in enumerate(graph.tokens):
        if p in patches:
            q = patches[p]
            t = f"<img{q['image']} t{q['tile']} r{q['row']} c{q['col']}>"
        out.append(t.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵"))
    return out


def graph_json(graph: Graph, slug: str, node_threshold: float = 0.8, edge_threshold: float = 0.98,
               scan: str | None = None) -> dict:
    """The graph JSON of circuit-tracer's `create_graph_files`, pruned at these thresholds, with vlens's patch keys.

    Example:
        >>> import vlens; from PIL import Image
        >>> from vlens.circuits.replacement import random_transcoders
        >>> from vlens.circuits.graph import attribute
        >>> vlm = vlens.tiny(n_layers=1)
        >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
        >>> d = graph_json(attribute(vlm, random_transcoders(vlm, d_sae=8), b, progress=False), "g")
        >>> d["metadata"]["slug"], sum(n["feature_type"] == "logit" for n in d["nodes"]) >= 1
        ('g', True)
    """
    pruned = graph.prune(node_threshold, edge_threshold)
    nodes = _nodes(graph, pruned.node_mask, pruned.cumulative_scores, graph.influence())
    dsts, srcs = pruned.edge_mask.nonzero(as_tuple=True)
    links = [{"source": nodes[s]["node_id"], "target": nodes[d]["node_id"], "weight": float(graph.adjacency[d, s])}
             for d, s in zip(dsts.tolist(), srcs.tolist()) if s in nodes and d in nodes]
    connected = {lk["source"] for lk in links} | {lk["target"] for lk in links}
    used = [n for n in nodes.values() if n["node_id"] in connected or n["feature_type"] in ("embedding", "logit")]
    meta = {"slug": slug, "scan": scan or graph.scan, "transcoder_list": list(graph.transcoder_list),
            "prompt_tokens": _prompt_tokens(graph), "prompt": graph.prompt, "node_threshold": node_threshold,
            "schema_version": 1, "vlens_images": [png_data_url(im) for im in graph.images],
            "vlens_norms": graph.norms}
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": meta, "qParams": qparams, "nodes": used, "links": links}


def write_graph_files(graph: Graph, slug: str, output_dir: str | os.PathLike, node_threshold: float = 0.8,
                      edge_threshold: float = 0.98, scan: str | None = None) -> Path:
    """Write `<slug>.json` and add it to `graph-metadata.json` in `output_dir` (circuit-tracer's layout); returns the file.

    Example:
        >>> import vlens, tempfile; from PIL import Image
        >>> from vlens.circuits.replacement import random_transcoders
        >>> from vlens.circuits.graph import attribute
        >>> vlm = vlens.tiny(n_layers=1)
        >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
        >>> g = attribute(vlm, random_transcoders(vlm, d_sae=8), b, progress=False)
        >>> d = tempfile.mkdtemp()
        >>> write_graph_files(g, "g1", d).name, sorted(os.listdir(d))
        ('g1.json', ['g1.json', 'graph-metadata.json'])
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = graph_json(graph, slug, node_threshold, edge_threshold, scan)
    path = out / f"{slug}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False))
    tmp.replace(path)
    meta_path = out / "graph-metadata.json"
    index = json.loads(meta_path.read_text()) if meta_path.exists() else {"graphs": []}
    entry = {k: v for k, v in data["metadata"].items() if k != "vlens_images"}
    index["graphs"] = [g for g in index["graphs"] if g.get("slug") != slug] + [entry]
    meta_path.write_text(json.dumps(index, indent=2))
    return path
