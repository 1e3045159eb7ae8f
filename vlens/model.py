"""`VLM`: LLaVA-Next as an nnsight model, with residual streams a researcher can name.

A `VLM` *is* an nnsight `TransformersModel(task="image-text-to-text")`, so
everything nnsight does (trace, generate, edit, remote) works unchanged. It
adds three things:

* names for the points people study, read and written inside a trace:

  | name            | what                                                            |
  |-----------------|-----------------------------------------------------------------|
  | `resid_pre.L`   | residual stream entering LM layer L  (= HF `hidden_states[L]`)  |
  | `resid_post.L`  | residual stream leaving LM layer L   (= `hidden_states[L+1]`, before the final norm) |
  | `embed`         | token embeddings, before image features are scattered in        |
  | `vision.J`      | output of vision-tower encoder layer J                          |
  | `projector`     | multimodal projector output, per tile: [tiles, patches, d_model]|
  | `final_norm`    | output of the LM's final norm                                   |
  | `logits`        | LM head output                                                  |

* the module layout of both transformers 5 (`model.model.language_model`)
  and older releases (`model.language_model.model`, tuple outputs);
* `prepare`, which builds one batched encoding and its `TokenLayout`.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterable, Sequence

import torch
from jaxtyping import Float
from nnsight.intervention.envoy import traceable
from nnsight.modeling.transformers import TransformersModel
from torch import Tensor

from .positions import Batch, ImageSpan, TokenLayout, image_geometry

SUPPORTED = "LLaVA-Next (LlavaNextForConditionalGeneration, e.g. llava-hf/llava-v1.6-mistral-7b-hf)"
_SITE = re.compile(r"^(resid_pre|resid_post|vision)\.(-?\d+)$|^(embed|projector|final_norm|logits)$")


class VLM(TransformersModel):
    """A LLaVA-Next model wrapped for interpretability. Build it with `vlens.load` or `vlens.tiny`.

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny()
        >>> batch = vlm.prepare(["<image>\\nWhat is shown?"], [Image.new("RGB", (32, 48))])
        >>> with vlm.trace(batch):
        ...     h = vlm.resid_pre(2).save()
        >>> tuple(h.shape) == (*batch.layout.shape, vlm.d_model)
        True
    """

    def __init__(self, *args: Any, name: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("task", "image-text-to-text")
        super().__init__(*args, **kwargs)
        self.name = name or getattr(self._module.config, "_name_or_path", "") or "llava-next"
        self._find_modules()

    # -- construction -----------------------------------------------------------

    @classmethod
    def wrap(cls, model: torch.nn.Module, processor: Any, name: str | None = None) -> "VLM":
        """Wrap an already-built LLaVA-Next module and its processor.

        Example:
            >>> from vlens.tiny import tiny_processor, tiny_config
            >>> from transformers import LlavaNextForConditionalGeneration
            >>> proc = tiny_processor()
            >>> vlm = VLM.wrap(LlavaNextForConditionalGeneration(tiny_config(proc)), proc, name="mine")
            >>> vlm.name
            'mine'
        """
        check_llava_next(model)
        # Tell the pipeline where the model already is, so it never moves it.
        device = next(model.parameters()).device
        return cls(model, processor=processor, tokenizer=processor.tokenizer, name=name, device=device)

    def _find_modules(self) -> None:
        m = self._module
        if hasattr(m, "model") and hasattr(m.model, "language_model") and hasattr(m.model.language_model, "layers"):
            self.layout_version = "transformers>=4.52"
            base = self.model
            self._lm = base.language_model
            self._vision = base.vision_tower
            self._projector = base.multi_modal_projector
            self._lm_head = self.lm_head
        elif hasattr(m, "language_model") and hasattr(m.language_model, "model"):
            self.layout_version = "transformers<4.52"
            self._lm = self.language_model.model
            self._vision = self.vision_tower
            self._projector = self.multi_modal_projector
            self._lm_head = self.language_model.lm_head
        else:
            raise TypeError(f"cannot find the language model layers of {type(m).__name__}; vlens supports {SUPPORTED}")
        self._layers = self._lm.layers
        vt = self._vision
        self._vision_layers = vt.vision_model.encoder.layers if hasattr(vt._module, "vision_model") else vt.encoder.layers

    # -- facts ------------------------------------------------------------------

    @property
    def config(self):
        return self._module.config

    @property
    def n_layers(self) -> int:
        """Number of language-model layers."""
        return len(self._layers)

    @property
    def d_model(self) -> int:
        """Width of the language-model residual stream."""
        return int(self.config.text_config.hidden_size)

    @property
    def n_vision_layers(self) -> int:
        return len(self._vision_layers)

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    @property
    def vocab_size(self) -> int:
        return int(self.config.text_config.vocab_size)

    @property
    def device(self) -> torch.device:
        return next(self._module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self._module.parameters()).dtype

    # -- named points -------------------------------------------------------------

    def _check_layer(self, layer: int, n: int, what: str) -> int:
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise TypeError(f"{what} layer must be an int, not {type(layer).__name__}")
        if not -n <= layer < n:
            raise IndexError(f"{what} layer {layer} is out of range: this model has layers 0..{n - 1}")
        return layer % n

    def _site(self, name: str):
        m = _SITE.match(name) if isinstance(name, str) else None
        if m is None:
            raise ValueError(
                f"unknown site {name!r}: use 'resid_pre.L', 'resid_post.L' (0 <= L < {self.n_layers}), "
                f"'vision.J' (0 <= J < {self.n_vision_layers}), 'embed', 'projector', 'final_norm' or 'logits'"
            )
        kind, idx, single = m.groups()
        if kind == "resid_pre":
            return self._layers[self._check_layer(int(idx), self.n_layers, "language-model")], "input"
        if kind == "resid_post":
            return self._layers[self._check_layer(int(idx), self.n_layers, "language-model")], "output"
        if kind == "vision":
            return self._vision_layers[self._check_layer(int(idx), self.n_vision_layers, "vision-tower")], "output"
        envoy = {
            "embed": self._lm.embed_tokens,
            "projector": self._projector,
            "final_norm": self._lm.norm,
            "logits": self._lm_head,
        }[single]
        return envoy, "output"

    def module_path(self, name: str) -> str:
        """The nnsight/torch module path behind a site, and whether it is its input or output.

        Example:
            >>> import vlens
            >>> vlens.tiny().module_path("resid_pre.3")
            'model.language_model.layers.3.input'
        """
        envoy, attr = self._site(name)
        return f"{_strip_root(envoy.path)}.{attr}"

    def read(self, name: str) -> Tensor:
        """Read a site inside a trace (tuple outputs are unpacked to their hidden state).

        The returned tensor is the live one: edit it in place to intervene.

        Example:
            >>> import vlens; from PIL import Image
            >>> vlm = vlens.tiny()
            >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
            >>> with vlm.trace(b):
            ...     logits = vlm.read("logits").save()
            >>> logits.shape[-1] == vlm.vocab_size
            True
        """
        envoy, attr = self._site(name)
        value = getattr(envoy, attr)
        return value[0] if isinstance(value, tuple) else value

    def write(self, name: str, value: Tensor) -> None:
        """Replace the value at a site inside a trace.

        Example:
            >>> import vlens; from PIL import Image
            >>> vlm = vlens.tiny()
            >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
            >>> with vlm.trace(b):
            ...     vlm.write("resid_pre.1", vlm.read("resid_pre.1") * 0)
            ...     out = vlm.read("resid_post.1").save()
            >>> bool(out.isfinite().all())
            True
        """
        envoy, attr = self._site(name)
        if attr == "input":
            envoy.input = value
            return
        current = envoy.output
        envoy.output = (value, *current[1:]) if isinstance(current, tuple) else value

    def resid_pre(self, layer: int) -> Float[Tensor, "batch seq d_model"]:
        """Residual stream entering LM layer `layer` (HF `hidden_states[layer]`), live inside a trace.

        Example:
            >>> import vlens; from PIL import Image
            >>> vlm = vlens.tiny()
            >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
            >>> with vlm.trace(b):
            ...     vlm.resid_pre(1)[b.layout.image] += 1.0   # steer every image token
        """
        return self.read(f"resid_pre.{layer}")

    def resid_post(self, layer: int) -> Float[Tensor, "batch seq d_model"]:
        """Residual stream leaving LM layer `layer` (HF `hidden_states[layer + 1]` before the final norm).

        Example:
            >>> import vlens; from PIL import Image
            >>> vlm = vlens.tiny()
            >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
            >>> with vlm.trace(b):
            ...     h = vlm.resid_post(0).save()
        """
        return self.read(f"resid_post.{layer}")

    def hook_name(self, name: str) -> str:
        """The TransformerLens-style hook name of a site, used as SAE-Lens `hook_name`.

        Example:
            >>> import vlens
            >>> vlens.tiny().hook_name("resid_pre.3")
            'blocks.3.hook_resid_pre'
        """
        envoy, _ = self._site(name)
        kind, _, idx = name.partition(".")
        if kind in ("resid_pre", "resid_post"):
            return f"blocks.{int(idx) % self.n_layers}.hook_{kind}"
        if kind == "vision":
            return f"vision.blocks.{int(idx) % self.n_vision_layers}.hook_resid_post"
        return {"embed": "hook_embed", "projector": "hook_projector", "final_norm": "ln_final.hook_normalized",
                "logits": "hook_logits"}[kind]

    # -- running ------------------------------------------------------------------

    def trace(self, *inputs: Any, **kwargs: Any):
        """nnsight's `trace`, also accepting a `Batch` from `prepare`.

        A `Batch` gets position ids derived from its attention mask, so a
        left-padded row computes exactly what it would alone.
        """
        return super().trace(*_unbatch(inputs, positions=True), **kwargs)

    @traceable
    def generate(self, *inputs: Any, **kwargs: Any):
        """nnsight's `generate`, also accepting a `Batch` from `prepare`."""
        return TransformersModel.generate.__wrapped__(self, *_unbatch(inputs), **kwargs)

    def decode(self, ids: Tensor, batch: Batch | None = None) -> list[str]:
        """Decode generated ids to text, dropping the prompt of `batch` when given.

        Example:
            >>> import vlens; from PIL import Image
            >>> vlm = vlens.tiny()
            >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
            >>> with vlm.generate(b, max_new_tokens=2, do_sample=False) as tracer:
            ...     ids = tracer.result.save()
            >>> len(vlm.decode(ids, b))
            1
        """
        if batch is not None:
            ids = ids[:, batch.layout.shape[1] :]
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    # -- inputs -------------------------------------------------------------------

    def prepare(
        self,
        prompts: str | Sequence[str],
        images: Any = None,
        answers: str | Sequence[str] | None = None,
        *,
        template: bool = True,
        eos: bool = False,
    ) -> Batch:
        """One padded batch for many prompts and images, and its `TokenLayout`.

        Each prompt marks where its image goes with `<image>`; `images` lists
        the images of all prompts in order (PIL images or HWC uint8 arrays; any
        mode is converted to RGB). `answers` (or captions) are appended after
        the generation prompt, one per prompt, with `eos` optionally closing
        them. With `template` the model's chat template wraps each prompt.
        Rows are left-padded, ready for `generate`.

        Example:
            >>> import vlens; from PIL import Image
            >>> vlm = vlens.tiny()
            >>> b = vlm.prepare(["<image>\\nWhat is shown?", "<image>\\nWhat is shown?"],
            ...                 [Image.new("RGB", (32, 32)), Image.new("L", (64, 20))], answers=["red", "a blue square"])
            >>> [int(n) for n in b.layout.answer.sum(1)]
            [1, 3]
        """
        return prepare(self.processor, self.config, prompts, images, answers, template=template, eos=eos)

    def __repr__(self) -> str:
        return (
            f"VLM({self.name!r}: {self.n_layers} LM layers × d_model {self.d_model}, "
            f"{self.n_vision_layers} vision layers, {self.layout_version})"
        )


def _strip_root(path: str) -> str:
    return path[len("model.") :] if path.startswith("model.") else path


def _unbatch(inputs: tuple, positions: bool = False) -> tuple:
    out = []
    for i in inputs:
        if isinstance(i, Batch):
            i = dict(i.inputs)
            if positions and "position_ids" not in i:
                i["position_ids"] = position_ids(i["attention_mask"])
        out.append(i)
    return tuple(out)


def position_ids(attention_mask: Tensor) -> Tensor:
    """Position ids of a left-padded batch: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def check_llava_next(model: torch.nn.Module) -> None:
    """Raise a clear error if `model` is not LLaVA-Next."""
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if mtype != "llava_next":
        raise TypeError(
            f"vlens supports {SUPPORTED}; got {type(model).__name__} (model_type {mtype!r}). "
            "Load a llava-hf LLaVA-Next checkpoint, or build one with vlens.tiny()."
        )


# -- prepare ------------------------------------------------------------------------------


def _to_rgb(image: Any):
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        image = Image.open(image)
    elif isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, Image.Image):
        import numpy as np

        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            raise TypeError(f"images must be PIL images, paths, or uint8 HWC arrays; got an array of {arr.dtype}")
        image = Image.fromarray(arr)
    if image.mode != "RGB":
        if image.mode in ("RGBA", "LA", "P"):
            image = image.convert("RGBA")
            bg = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(bg, image)
        image = image.convert("RGB")
    return image


def _as_list(x: Any) -> list:
    if x is None:
        return []
    if isinstance(x, (str, bytes)) or not isinstance(x, (list, tuple)):
        return [x]
    return list(x)


def prepare(
    processor: Any,
    config: Any,
    prompts: str | Sequence[str],
    images: Any = None,
    answers: str | Sequence[str] | None = None,
    *,
    template: bool = True,
    eos: bool = False,
) -> Batch:
    """`VLM.prepare` for a bare processor and config (see there)."""
    tok = processor.tokenizer
    image_token = processor.image_token
    prompts = _as_list(prompts)
    images = [_to_rgb(im) for im in _as_list(images)]
    answers_list = _as_list(answers)
    if not prompts:
        raise ValueError("prepare needs at least one prompt")
    if answers is not None and len(answers_list) != len(prompts):
        raise ValueError(f"got {len(answers_list)} answers for {len(prompts)} prompts: give one answer per prompt")
    counts = [p.count(image_token) for p in prompts]
    if sum(counts) != len(images):
        missing = [i for i, c in enumerate(counts) if c == 0]
        hint = (
            f" Prompt(s) {missing} have no {image_token!r} placeholder: write it where the image goes, "
            f"e.g. '{image_token}\\nWhat is shown in this image?'."
            if missing and images
            else ""
        )
        raise ValueError(
            f"{len(images)} image(s) but {sum(counts)} {image_token!r} placeholder(s) in the prompts; "
            f"give one image per placeholder, in order.{hint}"
        )

    texts = [_render(processor, p, image_token) if template else p for p in prompts]
    enc = processor(text=texts, images=images or None, return_tensors="pt", padding=True)
    ids_rows = [row[m.bool()].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"])]

    ans_rows: list[list[int]] = [[] for _ in prompts]
    for i, a in enumerate(answers_list):
        ans_rows[i] = tok(a, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else [])

    B = len(prompts)
    S = max(len(p) + len(a) for p, a in zip(ids_rows, ans_rows))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    attention = torch.zeros((B, S), dtype=torch.long)
    prompt_m = torch.zeros((B, S), dtype=torch.bool)
    answer_m = torch.zeros((B, S), dtype=torch.bool)
    for b, (p, a) in enumerate(zip(ids_rows, ans_rows)):
        n = len(p) + len(a)
        input_ids[b, S - n :] = torch.tensor(p + a, dtype=torch.long)
        attention[b, S - n :] = 1
        prompt_m[b, S - n : S - len(a)] = True
        answer_m[b, S - len(a) :] = True
    pad = attention == 0
    image = input_ids == int(config.image_token_id)
    bos = torch.zeros_like(pad)
    if tok.bos_token_id is not None:
        first = (S - attention.sum(1)).clamp(max=S - 1)
        bos[torch.arange(B), first] = input_ids[torch.arange(B), first] == tok.bos_token_id
    prompt_m &= ~image & ~bos

    spans: list[ImageSpan] = []
    if images:
        ip = processor.image_processor
        tile = ip.crop_size["height"]
        resize_to = ip.size.get("shortest_edge") or ip.size.get("height") or tile
        pins = config.image_grid_pinpoints
        sizes = enc["image_sizes"].tolist()
        k = 0
        for b, c in enumerate(counts):
            pos = image[b].nonzero().flatten().tolist()
            start = 0
            for _ in range(c):
                geom = image_geometry(
                    tuple(sizes[k]), pinpoints=pins, tile_size=tile, patch_size=processor.patch_size, resize_to=resize_to
                )
                s0 = pos[start]
                s1 = s0 + geom.n_tokens
                if pos[start : start + geom.n_tokens] != list(range(s0, s1)):
                    raise RuntimeError(
                        f"token geometry of image {k} ({sizes[k]}) disagrees with the processor: expected "
                        f"{geom.n_tokens} consecutive image tokens at position {s0}. Please report this with "
                        "the processor settings."
                    )
                spans.append(ImageSpan(image=k, batch_index=b, start=s0, end=s1, geometry=geom))
                start += geom.n_tokens
                k += 1
            if start != len(pos):
                raise RuntimeError(
                    f"row {b} has {len(pos)} image tokens but its images account for {start}: the processor's "
                    "image settings do not match the model config (vision_feature_select_strategy, "
                    "num_additional_image_tokens, patch_size)."
                )

    inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention}
    if images:
        inputs["pixel_values"] = enc["pixel_values"]
        inputs["image_sizes"] = enc["image_sizes"]
    layout = TokenLayout(input_ids=input_ids, image=image, prompt=prompt_m, answer=answer_m, bos=bos, pad=pad,
                         images=spans)
    return Batch(inputs=inputs, layout=layout, prompts=list(prompts))


def _render(processor: Any, prompt: str, image_token: str) -> str:
    if not getattr(processor, "chat_template", None):
        return prompt
    n = prompt.count(image_token)
    text = prompt.replace(image_token, "").lstrip("\n").strip()
    content = [{"type": "image"} for _ in range(n)] + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


# -- loading --------------------------------------------------------------------------


def load(
    name_or_path: Any,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    lazy: bool = False,
    meta: bool = False,
    **kwargs: Any,
) -> VLM:
    """Load a LLaVA-Next model as a `VLM`.

    `name_or_path` is `"toy"` (the embedded toy model, offline), a llava-hf
    LLaVA-Next hub id or local directory, or a `(model, processor)` pair.
    `device` and `dtype` go to `from_pretrained` (e.g. `device="cuda"`,
    `dtype=torch.float16`). `lazy=True` builds the model on the meta device
    without weights (nnsight's lazy loading; weights arrive on the first
    trace, or stay remote with `trace(..., remote=True)` on NDIF).
    `meta=True` builds a known checkpoint's architecture offline on the meta
    device (see `vlens.configs`), for geometry and module paths only.

    Example:
        >>> import vlens
        >>> vlm = vlens.load("toy")
        >>> vlm.n_layers
        6
    """
    if isinstance(name_or_path, tuple):
        model, processor = name_or_path
        if device is not None or dtype is not None:
            model = model.to(device=device, dtype=_dtype(dtype))
        return VLM.wrap(model, processor, name=kwargs.get("name"))
    if name_or_path == "toy":
        from .toy import load_toy

        return load_toy(device=device, dtype=_dtype(dtype))
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"load takes 'toy', a hub id, a directory, or a (model, processor) pair; got {type(name_or_path).__name__}")
    from transformers import AutoConfig, AutoProcessor, LlavaNextForConditionalGeneration

    name = str(name_or_path)
    if meta:
        from .configs import KNOWN, meta as build_meta

        if name in KNOWN:
            return build_meta(name)
    config = AutoConfig.from_pretrained(name)
    if config.model_type != "llava_next":
        raise TypeError(f"{name} is a {config.model_type!r} model; vlens supports {SUPPORTED}")
    if lazy:
        return VLM(name, name=name, dtype=_dtype(dtype), **kwargs)
    if meta:
        with torch.device("meta"):
            model = LlavaNextForConditionalGeneration(config)
    else:
        model = LlavaNextForConditionalGeneration.from_pretrained(
            name, dtype=_dtype(dtype) or "auto", device_map=device, **kwargs
        )
    model.eval()
    processor = AutoProcessor.from_pretrained(name)
    return VLM.wrap(model, processor, name=name)


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    return getattr(torch, str(dtype).removeprefix("torch."))
