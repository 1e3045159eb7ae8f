"""Multimodal sparse autoencoders: SAE-Lens SAEs with modality statistics attached.

Train (`train`, or several SAEs from one pass of the model: `train_many`; presets and
`TrainConfig` = `ArchitectureConfig` + `TrainerConfig`),
evaluate (`evaluate`, `loss_recovered`), analyse modality (`modality_stats`,
`sharing_by_layer`, plots), browse (`dashboard`) and move SAEs to and from disk in the
SAE-Lens format (`export`, `load`, `convert_paper_checkpoint`,
`convert_sparsify_checkpoint`). Any SAE-Lens SAE works: statistics are a plain attribute,
`sae.modality` (`as_multimodal`).

| module       | holds                                                                        |
|--------------|------------------------------------------------------------------------------|
| `modality`   | `ModalityStats`, `as_multimodal`, `modality_stats`, sharing by layer, plots  |
| `standard`   | the paper's SAE as a registered SAE-Lens training class; its fused step      |
| `topk`       | the fused TopK step (sparse decoder products, AuxK on dead latents)          |
| `transcoder` | transcoders (mlp_in → mlp_out): training classes, `TopKTranscoder`, specs    |
| `fused`      | which architectures take a fused step, and the dispatch                      |
| `data`       | activation sources (tensors, stores, iterables)                              |
| `training`   | `config`, `trainer` (the loop, `Stepper`), `multi` (`train_many`), `buffer`  |
| `evals`      | `evaluate`, `loss_recovered`; transcoders: per layer, whole-model replacement |
| `io`         | `export`, `load`, converters                                                 |
| `dashboards` | `dashboard`: static HTML pages per latent                                    |

    >>> import torch, vlens.sae as vs
    >>> sae = vs.train((torch.randn(512, 8), torch.arange(512) % 2), "paper", d_sae=16, steps=2, batch_size=128,
    ...                progress=False)
    >>> type(sae).__name__, vs.modality_stats(sae).n_image
    ('StandardSAE', 256)
"""

from ..errors import NonFiniteActivations
from .dashboards import dashboard
from ..roles import IMAGE, TEXT
from .sources import StoreSource, TensorSource, as_source
from .evals import evaluate, evaluate_transcoders, loss_recovered, replacement_loss_recovered, sae_bench_core
from .features import export_features, feature_logits
from .io import convert_paper_checkpoint, convert_sparsify_checkpoint, convert_sparsify_run, export, load, site_of
from .modality import (
    ModalityStats,
    as_multimodal,
    firing_density,
    modality_stats,
    modality_stats_from_source,
    modality_table,
    plot_modality_histogram,
    plot_sharing_by_layer,
    sharing_by_layer,
)
from .standard import PaperTrainingSAE, PaperTrainingSAEConfig, fused_standard_step
from .transcoder import is_transcoder, transcoder_specs
from .training import PRESETS, ArchitectureConfig, TrainConfig, TrainerConfig, make_training_sae, train, train_many

__all__ = [
    "IMAGE", "TEXT", "ModalityStats", "as_multimodal", "modality_stats", "modality_stats_from_source",
    "modality_table", "plot_modality_histogram", "plot_sharing_by_layer", "sharing_by_layer",
    "StoreSource", "TensorSource", "as_source",
    "PaperTrainingSAE", "PaperTrainingSAEConfig", "fused_standard_step",
    "PRESETS", "ArchitectureConfig", "TrainerConfig", "TrainConfig", "make_training_sae", "train", "train_many",
    "NonFiniteActivations", "evaluate", "loss_recovered", "sae_bench_core", "export_features", "feature_logits",
    "convert_sparsify_run", "site_of", "firing_density",
    "export", "load", "convert_paper_checkpoint", "convert_sparsify_checkpoint", "dashboard",
    "transcoder_specs", "is_transcoder", "evaluate_transcoders", "replacement_loss_recovered",
]
