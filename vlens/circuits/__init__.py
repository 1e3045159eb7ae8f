"""Attribution graphs for VLMs: the local replacement model, the graph from patches to the answer, its JSON, interventions.

"Circuit Tracing" (Ameisen et al. 2025) for images: transcoders replace every
MLP of the language model (SAE-Lens transcoder objects, `hook_name`
`blocks.L.hook_mlp_in` → `hook_name_out` `blocks.L.hook_mlp_out`), the graph's
input nodes include one node per image patch with its pixel box, and the
result is written in circuit-tracer's graph JSON for its viewer and
Neuronpedia's.

* `replacement`: `LocalReplacement`, the frozen, linearised model (exact logits);
* `clt`: `CrossLayerTranscoder` (features that write to every later layer), `fit_clt`;
* `graph`: `attribute` → `Graph` (nodes, direct-effect edges, influence, pruning, scores);
* `pruning`: circuit-tracer's influence, pruning and graph-score formulas;
* `export`: `graph_json` / `write_graph_files` (circuit-tracer's JSON + vlens patch keys);
* `steer`: `intervene`, graph-predicted against measured answer changes; `feature_effects` ranks features.

    >>> import vlens; from PIL import Image
    >>> from vlens.circuits import attribute, random_transcoders
    >>> vlm = vlens.tiny(n_layers=1)
    >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
    >>> attribute(vlm, random_transcoders(vlm, d_sae=8), b, progress=False).n_layers
    1
"""

from .clt import CrossLayerTranscoder, fit_clt
from .export import graph_json, patch_info, png_data_url, write_graph_files
from .graph import Graph, attribute, logit_targets, predicting_position
from .pruning import PruneResult, graph_scores, node_influence, prune
from .replacement import (LIVE, NORMS, LayerCoder, LocalReplacement, ReplacementState, layer_coders,
                          random_transcoders, skip_term, transcoder_layers)
from .steer import InterventionResult, feature_effects, intervene, predicted_change

__all__ = [
    "LIVE", "NORMS", "LayerCoder", "LocalReplacement", "ReplacementState", "layer_coders", "random_transcoders",
    "skip_term", "transcoder_layers", "CrossLayerTranscoder", "fit_clt",
    "Graph", "attribute", "logit_targets", "predicting_position",
    "PruneResult", "graph_scores", "node_influence", "prune",
    "graph_json", "patch_info", "png_data_url", "write_graph_files",
    "InterventionResult", "feature_effects", "intervene", "predicted_change",
]
