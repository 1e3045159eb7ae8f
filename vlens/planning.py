"""Memory and size planning: what a model, an image size, layers and a dtype cost, before any weight exists.

`plan` builds the model on the meta device (no memory, no weights; a 7B model
in seconds), counts image tokens with the model's real processor, and returns
a `MemoryPlan`: tokens per image, store bytes per image, parameter bytes, and
the activation memory of a forward (a harvest that stops after its deepest
layer, a full forward with the LM head) and of an attribution pass (one
backward from the logits to a site), per batch row. `MemoryPlan.rows` turns a
memory budget into a batch size; `benchmarks/gpu.py` sizes its stages with it.

    >>> import torch
    >>> p = plan("llava-hf/llava-v1.6-mistral-7b-hf", (672, 672), layers=[8, 16], dtype=torch.bfloat16)
    >>> p.tokens_per_image, p.seq_len, round(p.param_bytes / 2**30, 1)
    (2928, 2945, 14.1)
    >>> p.store_bytes_per_image == 2928 * (2 * 2 * 4096 + 38)
    True
    >>> p.rows(80 * 2**30, "attribution") >= 1
    True

The activation formulas count the tensors a transformers 5 forward keeps alive
at its peak (see `MemoryPlan`); their constants were fitted to measured CPU
runs at small widths (`PeakMemory` counts every fresh tensor) and are checked
against such runs in `tests/test_planning.py`. Fused attention (SDPA's flash
or memory-efficient kernels, the default on GPUs and on the CPU) is assumed:
no sequence × sequence score matrix. On a GPU the allocator's rounding and
cuBLAS workspaces add a few hundred MB: keep a margin (`rows(..., margin=)`).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from ._memtrack import PeakMemory
from .errors import InputError
from .model import VLM, as_dtype
from .prompts import QUESTION

__all__ = ["MemoryPlan", "plan", "sae_bytes", "PeakMemory", "META_BYTES_PER_TOKEN"]

#: Bytes of harvest metadata per stored token (sample, label, token id: 8 each; position 4;
#: tile, row, col 2 each; modality, role, kind, text-only 1 each), once per token, not per layer.
META_BYTES_PER_TOKEN = 38
#: Residual-width tensors alive in the language model at its peak, per token (embeddings, the
#: residual, its norm, the image features scattered in, rotary tables...): fitted, see the module doc.
RESID_COPIES = 8.4
#: Tensors the autograd graph keeps per token and layer, in widths: 4 of the MLP (gate, up,
#: activation, product), 7 of d_model and 4 of the key/value width in attention and norms.
SAVED_MLP, SAVED_D, SAVED_KV = 4, 7, 4


@dataclass(frozen=True)
class MemoryPlan:
    """Sizes and memory of one model at one image size; bytes are per batch row unless named otherwise.

    - `tokens_per_image`, `seq_len` (with the prompt), `tiles` (crops the vision tower sees);
    - `param_bytes`: the weights in `dtype`;
    - `store_bytes_per_image`: a harvest of every image token at `layers`, in `dtype`, with metadata;
    - `harvest_bytes`: a forward that stops after the deepest of `layers` (harvest, `read_layers`),
      its KV cache included; `forward_bytes`: a full forward with the LM head over every position;
    - `generate_bytes`: the prefill of `generate` (every layer, the head on the last position only);
    - `attribution_bytes`: one row of a gradient pass (`vlens.attribution`) from the logits back to
      resid_pre of `site`: the graph of the layers after it and of the vision tower (its weights
      require gradients), the logits and their gradient.
    """

    model: str
    dtype: str
    image_size: tuple[int, int]
    layers: tuple[int, ...]
    site: int
    tokens_per_image: int
    seq_len: int
    tiles: int
    param_bytes: int
    store_bytes_per_image: int
    harvest_bytes: int
    forward_bytes: int
    generate_bytes: int
    attribution_bytes: int

    def rows(self, budget: int, kind: str = "harvest", *, margin: float = 0.1, cap: int = 1024) -> int:
        """How many batch rows of `kind` fit in `budget` bytes beside the weights (0 when none does).

        `kind` is 'harvest', 'forward', 'generate' or 'attribution'; `margin` is the fraction of
        the budget kept free (allocator rounding, workspaces).

        Example:
            >>> p = plan("llava-hf/llava-v1.6-mistral-7b-hf", (336, 336), layers=[16])
            >>> p.rows(80 * 2**30, "harvest") > p.rows(80 * 2**30, "attribution")
            True
        """
        per = {"harvest": self.harvest_bytes, "forward": self.forward_bytes, "generate": self.generate_bytes,
               "attribution": self.attribution_bytes}
        if kind not in per:
            raise InputError(f"kind must be one of {', '.join(per)}, not {kind!r}")
        free = budget * (1 - margin) - self.param_bytes
        return int(max(0, min(cap, free // per[kind])))

    def as_dict(self) -> dict[str, Any]:
        """The plan as plain JSON-ready values."""
        return asdict(self)


def plan(
    model: str | VLM,
    image_size: int | tuple[int, int] = (336, 336),
    layers: Sequence[int] | None = None,
    dtype: torch.dtype | str = torch.bfloat16,
    *,
    site: int | None = None,
    prompt: str = QUESTION,
) -> MemoryPlan:
    """The `MemoryPlan` of `model` (a known checkpoint id, built on the meta device, or a `VLM`).

    `image_size` is (width, height) or one side; `layers` the LM layers a harvest reads (default
    the paper's 5, 8, 12, 16, 20, 24 that exist); `site` the layer an attribution starts from
    (default the first of `layers`); `dtype` of the weights and activations.

    Example:
        >>> p = plan("llava-hf/llava-v1.6-mistral-7b-hf", (640, 480), layers=[16])
        >>> p.tokens_per_image, p.tiles
        (2340, 5)
    """
    from PIL import Image

    dt = as_dtype(dtype)
    if dt is None or not dt.is_floating_point:
        raise InputError(f"dtype must be a floating dtype such as torch.bfloat16, not {dtype!r}")
    vlm = _meta_vlm(model, dt)
    w, h = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    batch = vlm.prepare([prompt], [Image.new("RGB", (int(w), int(h)))])
    n_img, seq = int(batch.layout.image.sum()), int(batch.layout.shape[1])
    tiles = int(batch.inputs["pixel_values"].shape[1]) if batch.inputs["pixel_values"].dim() == 5 else 1
    L = vlm.n_layers
    layers = tuple(layers) if layers is not None else tuple(x for x in (5, 8, 12, 16, 20, 24) if x < L) or (L - 1,)
    bad = [x for x in layers if not isinstance(x, int) or not 0 <= x < L]
    if bad:
        raise InputError(f"layers {bad} are not LM layers of {vlm.name} (0..{L - 1})")
    site = layers[0] if site is None else site
    e = dt.itemsize
    s = _Shapes(vlm, seq, tiles)
    params = sum(p.numel() for p in vlm.hf_model.parameters()) * e
    return MemoryPlan(
        model=vlm.name, dtype=str(dt).removeprefix("torch."), image_size=(int(w), int(h)), layers=layers, site=site,
        tokens_per_image=n_img, seq_len=seq, tiles=tiles, param_bytes=int(params),
        store_bytes_per_image=n_img * (len(layers) * s.d * e + META_BYTES_PER_TOKEN),
        harvest_bytes=int(e * max(s.vision(), s.lm(max(layers) + 1))),
        forward_bytes=int(e * max(s.vision(), s.lm(L), s.lm(L, mlp=False) + seq * s.vocab)),
        generate_bytes=int(e * max(s.vision(), s.lm(L) + s.vocab)),
        attribution_bytes=int(e * (s.graph(L - site) + s.lm(L) + 2 * seq * s.vocab)),
    )


def sae_bytes(d_in: int, d_sae: int, batch_size: int, *, k: int | None = None) -> int:
    """Memory of one float32 SAE training step: weights, gradients, Adam's two moments, and the batch.

    The batch costs about 4 `[batch, d_sae]` tensors (pre-activations, latents, their gradients)
    for dense SAEs; a TopK SAE with `k` keeps 2 of them dense.

    Example:
        >>> round(sae_bytes(4096, 65536, 4096) / 2**30, 1)
        12.3
    """
    weights = 2 * d_in * d_sae + d_sae + d_in
    dense = 2 if k is not None else 4
    return int(4 * (4 * weights + batch_size * (dense * d_sae + 4 * d_in)))


class _Shapes:
    """The widths of one model and the element counts of its phases (multiply by the dtype's bytes)."""

    def __init__(self, vlm: VLM, seq: int, tiles: int) -> None:
        t, v = vlm.config.text_config, vlm.config.vision_config
        self.seq, self.tiles = seq, tiles
        self.d, self.dm, self.vocab = int(t.hidden_size), int(t.intermediate_size), int(t.vocab_size)
        head = int(getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads)
        self.kv = int(t.num_key_value_heads) * head
        self.dv, self.dvm, self.lv = int(v.hidden_size), int(v.intermediate_size), int(v.num_hidden_layers)
        self.side = int(v.image_size)
        self.patches = (self.side // int(v.patch_size)) ** 2 + 1  # with the CLS token

    def vision(self) -> float:
        """The vision tower's peak: the pixels cast, every hidden state kept, one MLP's transients."""
        tp = self.tiles * self.patches
        return self.tiles * 3 * self.side**2 + tp * self.dv * (self.lv + 1) + tp * (3 * self.dvm + 2 * self.dv) \
            + self.seq * self.d

    def lm(self, layers_run: int, mlp: bool = True) -> float:
        """The language model's peak: residual copies, the KV cache of the layers run, one MLP's transients."""
        return self.seq * (RESID_COPIES * self.d + 2 * layers_run * self.kv + 3 * self.dm * mlp)

    def graph(self, layers_after: int) -> float:
        """What the autograd graph keeps: the layers after the site, and the vision tower."""
        lm = layers_after * self.seq * (SAVED_MLP * self.dm + SAVED_D * self.d + SAVED_KV * self.kv)
        return lm + self.lv * self.tiles * self.patches * 4 * (self.dvm + self.dv)


def _meta_vlm(model: str | VLM, dtype: torch.dtype) -> VLM:
    if isinstance(model, VLM):
        return model
    if not isinstance(model, str):
        raise InputError(f"plan takes a known checkpoint id or a VLM, not {type(model).__name__}")
    return _built(model, dtype)


@functools.lru_cache(maxsize=4)
def _built(name: str, dtype: torch.dtype) -> VLM:
    from .loading import load

    return load(name, weights="random", device="meta", dtype=dtype)
