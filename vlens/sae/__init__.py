"""Multimodal sparse autoencoders: SAE-Lens SAEs with modality statistics.

Train (`train`), evaluate (`evaluate`, `loss_recovered`), analyse modality
(`modality_stats`, `sharing_by_layer`, plots), browse (`dashboard`) and
export to / import from the SAE-Lens format (`export`, `load`,
`convert_paper_checkpoint`, `convert_sparsify_checkpoint`).
"""

from .base import (
    IMAGE,
    TEXT,
    ModalityStats,
    MultimodalJumpReLUSAE,
    MultimodalSAE,
    MultimodalStandardSAE,
    MultimodalTopKSAE,
    as_multimodal,
)
from .data import StoreSource, TensorSource, as_source
from .standard import PaperTrainingSAE, PaperTrainingSAEConfig, fused_standard_step
from .train import PRESETS, NonFiniteActivations, TrainConfig, make_training_sae, modality_stats_from_source, train

__all__ = [
    "IMAGE", "TEXT", "ModalityStats", "MultimodalSAE", "MultimodalStandardSAE", "MultimodalTopKSAE",
    "MultimodalJumpReLUSAE", "as_multimodal", "StoreSource", "TensorSource", "as_source", "PaperTrainingSAE",
    "PaperTrainingSAEConfig", "fused_standard_step", "PRESETS", "NonFiniteActivations", "TrainConfig",
    "make_training_sae", "modality_stats_from_source", "train",
]

from .export import convert_paper_checkpoint, convert_sparsify_checkpoint, export, load  # noqa: E402

__all__ += ["convert_paper_checkpoint", "convert_sparsify_checkpoint", "export", "load"]
from .evaluate import evaluate, loss_recovered  # noqa: E402
from .modality import (  # noqa: E402
    modality_stats,
    modality_table,
    plot_modality_histogram,
    plot_sharing_by_layer,
    sharing_by_layer,
)

__all__ += ["evaluate", "loss_recovered", "modality_stats", "modality_table", "plot_modality_histogram",
            "plot_sharing_by_layer", "sharing_by_layer"]
from .dashboard import dashboard, heatmap_overlay  # noqa: E402

__all__ += ["dashboard", "heatmap_overlay"]
from .data import collect_activations  # noqa: E402

__all__ += ["collect_activations"]
