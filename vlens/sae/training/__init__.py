"""Train multimodal SAEs: the paper's recipe as a preset, modern presets through SAE-Lens classes.

    >>> import torch, vlens.sae as vs
    >>> x = torch.randn(2048, 16); mod = torch.arange(2048) % 2
    >>> sae = vs.train((x, mod), preset="paper", d_sae=64, steps=20, batch_size=256, progress=False)
    >>> sae.cfg.d_sae, sae.modality is not None
    (64, True)

| module        | holds                                                                          |
|---------------|--------------------------------------------------------------------------------|
| `config`      | `ArchitectureConfig` (what the SAE is), `TrainerConfig` (how it is trained), `TrainConfig` (both), `PRESETS`, `make_training_sae` |
| `trainer`     | `train`: the loop (fused sparse step or SAE-Lens's training pass, DDP, token mix), `vlens train-sae`; `Stepper`: one training step, written once |
| `multi`       | `train_many`: SAEs at several sites from one streaming pass of the model, nothing on disk but checkpoints |
| `buffer`      | `ShuffleBuffer`: the bounded, seeded, checkpointable shuffle buffer of each `train_many` SAE |
| `resume`      | periodic checkpoints and bit-identical resume                                   |

Presets (`PRESETS`, override any field by keyword):

- `"paper"`: the paper's multimodal SAE, as its code trains it. ReLU, biases both sides
  (`PaperTrainingSAE`); decoder rows Gaussian with norm 0.1, encoder = decoderᵀ, zero
  biases; loss Σ squared error + λ Σ f_i ||W_dec,i|| with the norms detached (no gradient
  of the penalty reaches the decoder) and λ = 5 warmed up linearly from 0 over the first
  5% of steps;
  Adam(β 0.9, 0.999), lr 5e-5 constant for 80% of steps then linear decay to 0; gradient
  norm clipped at 1; activations scaled by one constant so their mean norm is √d_model
  (folded into the weights at the end). Trained with a fused sparse step (no autograd).
- `"standard"`: SAE-Lens's `StandardTrainingSAE` (b_dec subtracted from the input,
  Kaiming-uniform init, the penalty's gradient through the decoder norms), λ = 1,
  lr 3e-4, same schedule shape. Schedules advance per optimiser step (`config` says why).
- `"topk"`, `"batchtopk"`: SAE-Lens's training classes with SAE-Lens's trainer defaults
  (lr 3e-4 constant, raw activations: measured better on short runs, see `config`);
  `"jumprelu"`: lr 3e-4 with the paper's schedule shape, normalised activations; BatchTopK and JumpReLU end as
  SAE-Lens `jumprelu` inference SAEs, TopK as `topk`.
"""

from .config import (
    PRESETS,
    TRAINING_ARCHITECTURES,
    ArchitectureConfig,
    TrainConfig,
    TrainerConfig,
    make_training_sae,
)
from .multi import train_many
from .trainer import train

__all__ = [
    "ArchitectureConfig", "TrainerConfig", "TrainConfig", "PRESETS", "TRAINING_ARCHITECTURES", "make_training_sae",
    "train", "train_many",
]

