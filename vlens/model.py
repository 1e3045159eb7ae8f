"""`VLM`: a vision-language model as an nnsight model, with sites a researcher can name.

A `VLM` *is* an nnsight `TransformersModel(task="image-text-to-text")`, so
everything nnsight does (trace, generate, edit, remote) works unchanged. It
adds three things:

* names for the points people study (`vlm.sites` lists them; see
  `vlens.sites` for the table), read and written inside a trace with
  `vlm.read(site)` / `vlm.write(site, value)`, `vlm.resid_pre(L)`, `vlm.resid_post(L)`;
* the model family (`vlm.family`, see `vlens.families`): module paths across
  transformers releases, token geometry, chat template;
* `prepare`, which builds one batched encoding and its `TokenLayout`.

Build one with `vlens.load` or `vlens.tiny`.
"""

from __future__ import annotations

import hashlib
from functools import reduce
from typing import Any, Sequence

import torch
from jaxtyping import Float
from nnsight.intervention.envoy import traceable
from nnsight.modeling.transformers import TransformersModel
from torch import Tensor

from . import attention, families, sites
from .errors import InputError, UnsupportedModelError
from .prepare import prepare
from .tokens import Batch

__all__ = ["VLM", "as_dtype"]


def _get(root: Any, path: str) -> Any:
    return reduce(getattr, path.split("."), root)


def _has(root: torch.nn.Module, path: str) -> bool:
    try:
        _get(root, path)
        return True
    except AttributeError:
        return False


class VLM(TransformersModel):
    """A vision-language model wrapped for interpretability. Build it with `vlens.load` or `vlens.tiny`.

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
        self.name = name or getattr(self._module.config, "_name_or_path", "") or "vlm"
        self.family = families.of_model(self._module)
        self._find_modules()

    # -- construction -----------------------------------------------------------

    @classmethod
    def wrap(cls, model: torch.nn.Module, processor: Any, name: str | None = None) -> "VLM":
        """Wrap an already-built model of a supported family and its processor.

        Example:
            >>> from vlens.families.llava_next import tiny_processor, tiny_config
            >>> from transformers import LlavaNextForConditionalGeneration
            >>> proc = tiny_processor()
            >>> vlm = VLM.wrap(LlavaNextForConditionalGeneration(tiny_config(proc)), proc, name="mine")
            >>> vlm.name, vlm.family.name
            ('mine', 'llava-next')
        """
        families.of_model(model)  # a clear error before nnsight wraps anything
        # Tell the pipeline where the model already is, so it never moves it.
        device = next(model.parameters()).device
        return cls(model, processor=processor, tokenizer=processor.tokenizer, name=name, device=device)

    def _find_modules(self) -> None:
        for name, layout in self.family.layouts.items():
            top = [p for f, p in vars(layout).items() if f not in sites.LAYER_FIELDS]
            if all(_has(self._module, p) for p in top) and all(
                _has(_get(self._module, layout.lm_layers)[0], getattr(layout, f)) for f in sites.LAYER_FIELDS
            ):
                self.modules, self.layout_version = layout, name
                return
        raise UnsupportedModelError(
            f"cannot find the modules of {type(self._module).__name__} in any known {self.family.name} layout "
            f"(tried {list(self.family.layouts)}); is this transformers release supported?"
        )

    def _envoy(self, field: str) -> Any:
        return _get(self, getattr(self.modules, field))

    # -- facts ------------------------------------------------------------------

    @property
    def config(self):
        return self._module.config

    @property
    def hf_model(self) -> torch.nn.Module:
        """The wrapped Hugging Face model itself, outside any trace: weights, embeddings, submodules.

        The one public door to what nnsight keeps as `_module`; reads and
        writes inside a trace go through `read` / `write` instead.

        Example:
            >>> import vlens
            >>> vlm = vlens.tiny()
            >>> vlm.hf_model.get_input_embeddings().weight.shape[1] == vlm.d_model
            True
        """
        return self._module

    def fingerprint(self) -> str:
        """A short hash of a few weights, telling apart two models of one name (e.g. two random tiny seeds).

        Example:
            >>> import vlens
            >>> vlens.tiny(seed=0).fingerprint() != vlens.tiny(seed=1).fingerprint()
            True
        """
        try:
            w = self._module.get_input_embeddings().weight
            if w.device.type == "meta":
                return "meta"
            head = w.detach().flatten()[:256].float().cpu().numpy().tobytes()
            return hashlib.sha1(head).hexdigest()[:16]
        except Exception:  # pragma: no cover - exotic modules
            return "unknown"

    @property
    def n_layers(self) -> int:
        """Number of language-model layers."""
        return len(_get(self._module, self.modules.lm_layers))

    @property
    def d_model(self) -> int:
        """Width of the language-model residual stream."""
        return int(self.family.text_config(self.config).hidden_size)

    @property
    def n_heads(self) -> int:
        """Number of query heads per LM layer (the `heads` axis of `z` and `pattern`)."""
        return int(self.family.text_config(self.config).num_attention_heads)

    @property
    def d_head(self) -> int:
        """Width of one attention head of the LM (`z`'s last axis)."""
        attn = _get(_get(self._module, self.modules.lm_layers)[0], self.modules.attn)
        return int(attn.head_dim)

    def width(self, site: sites.SiteLike) -> int:
        """The width of one token's vector at a site (`heads × d_head` at `z`, as SAE-Lens's hook_z SAEs read it).

        Example:
            >>> import vlens
            >>> vlm = vlens.tiny()
            >>> vlm.width("mlp_out.1") == vlm.d_model, vlm.width("z.1") == vlm.n_heads * vlm.d_head
            (True, True)
        """
        s = self.site(site)
        if s.kind == "z":
            return self.n_heads * self.d_head
        if s.kind == "pattern":
            raise InputError(f"{s.name} has no fixed width (one row per key token): read it with vlm.read")
        if s.kind == "vision":
            return int(getattr(self.config.vision_config, "hidden_size"))
        return self.vocab_size if s.kind == "logits" else self.d_model

    @property
    def n_vision_layers(self) -> int:
        """Number of vision-tower layers."""
        return len(_get(self._module, self.modules.vision_layers))

    @property
    def image_token_id(self) -> int:
        return self.family.image_token_id(self.config)

    @property
    def vocab_size(self) -> int:
        return int(self.family.text_config(self.config).vocab_size)

    @property
    def device(self) -> torch.device:
        return next(self._module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self._module.parameters()).dtype

    @property
    def sites(self) -> list[str]:
        """Every site name of this model, in execution order.

        Example:
            >>> import vlens
            >>> vlm = vlens.tiny(n_layers=2, vision_layers=1)
            >>> vlm.sites[:3], vlm.sites[-2:]
            (['embed', 'vision.0', 'projector'], ['final_norm', 'logits'])
        """
        return sites.names(self.n_layers, self.n_vision_layers)

    # -- named points -------------------------------------------------------------

    def site(self, site: sites.SiteLike) -> sites.Site:
        """A site of this model, range-checked, layer made non-negative (an int L is `resid_pre.L`).

        Example:
            >>> import vlens
            >>> vlens.tiny().site(-1)
            Site('resid_pre.3')
        """
        return sites.resolve(site, self.n_layers, self.n_vision_layers)

    def envoy(self, site: sites.SiteLike) -> Any:
        """The nnsight envoy of the module behind a site (for `pattern.L`: the layer's attention block).

        Example:
            >>> import vlens
            >>> type(vlens.tiny().envoy("z.0")._module).__name__
            'Linear'
        """
        return self._site_envoy(site)[0]

    def submodule(self, site: sites.SiteLike) -> torch.nn.Module:
        """The torch module behind a site, outside any trace (for `pattern.L`: the layer's attention block).

        Example:
            >>> import vlens
            >>> type(vlens.tiny().submodule("z.0")).__name__
            'Linear'
        """
        return self.envoy(site)._module

    def _site_envoy(self, site: sites.SiteLike) -> tuple[Any, sites.Site]:
        s = self.site(site)
        envoy = self._envoy(s.module)
        envoy = envoy[s.index] if s.index is not None else envoy
        return (_get(envoy, getattr(self.modules, s.sub)) if s.sub else envoy), s

    def module_path(self, site: sites.SiteLike) -> str:
        """The module path behind a site, and whether it is its input or output.

        Example:
            >>> import vlens
            >>> vlens.tiny().module_path("resid_pre.3")
            'model.language_model.layers.3.input'
        """
        s = self.site(site)
        path = getattr(self.modules, s.module) + (f".{s.index}" if s.index is not None else "")
        path += f".{getattr(self.modules, s.sub)}" if s.sub else ""
        return f"{path}.{s.value}"

    def hook_name(self, site: sites.SiteLike) -> str:
        """The TransformerLens-style hook name of a site, used as SAE-Lens `hook_name`.

        Example:
            >>> import vlens
            >>> vlens.tiny().hook_name("resid_pre.-1")
            'blocks.3.hook_resid_pre'
        """
        return self.site(site).hook_name

    def read(self, site: sites.SiteLike, *, queries: Any = None) -> Tensor:
        """Read a site inside a trace (tuple outputs are unpacked to their hidden state).

        The returned tensor is the live one: edit it in place to intervene.
        `z.L` comes as `[batch, seq, heads, d_head]` (a view: `z[:, :, h] = 0`
        ablates head h). `pattern.L` is `[batch, heads, query, key]`,
        recomputed from the queries and keys of the layer's attention function
        (`vlens.attention.pattern`); `queries` (int positions or a 1-D index
        tensor) computes only those query rows.

        Example:
            >>> import vlens; from PIL import Image
            >>> vlm = vlens.tiny()
            >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
            >>> with vlm.trace(b):
            ...     logits = vlm.read("logits").save()
            >>> logits.shape[-1] == vlm.vocab_size
            True
        """
        envoy, s = self._site_envoy(site)
        if s.kind == "pattern":
            return attention.pattern(envoy, queries)
        if queries is not None:
            raise InputError(f"queries= limits the rows of a pattern site, not of {s.name}")
        value = getattr(envoy, s.value)
        value = value[0] if isinstance(value, tuple) else value
        return value.unflatten(-1, (self.n_heads, self.d_head)) if s.kind == "z" else value

    def vectors(self, site: sites.SiteLike) -> Float[Tensor, "batch seq d"]:
        """A site as one vector per token, `[batch, seq, width]`, live inside a trace (`z`'s heads concatenated).

        This is what SAEs, harvests and vector edits read and write (a view:
        editing it edits the model).

        Example:
            >>> import vlens; from PIL import Image
            >>> vlm = vlens.tiny()
            >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
            >>> with vlm.trace(b):
            ...     z = vlm.vectors("z.1").save()
            >>> z.shape[-1] == vlm.n_heads * vlm.d_head
            True
        """
        s = self.site(site)
        if s.kind == "pattern":
            raise InputError(f"{s.name} is not one vector per token: read it with vlm.read({s.name!r})")
        h = self.read(s)
        return h.flatten(-2) if s.kind == "z" else h

    def write(self, site: sites.SiteLike, value: Tensor) -> None:
        """Replace the value at a site inside a trace (same shape as the value it replaces).

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
        envoy, s = self._site_envoy(site)
        if s.kind == "pattern":
            raise InputError(f"{s.name} is read-only (recomputed from the attention's inputs): block attention edges "
                             "with vlens.attention.knockout, or edit z/attn_out")
        current = getattr(envoy, s.value)
        live = current[0] if isinstance(current, tuple) else current
        if s.kind == "z" and isinstance(value, Tensor) and value.dim() == 4:
            value = value.flatten(-2)
        if isinstance(value, Tensor) and isinstance(live, Tensor) and tuple(value.shape) != tuple(live.shape):
            raise InputError(
                f"cannot write a value of shape {tuple(value.shape)} to {s.name}, whose value has shape "
                f"{tuple(live.shape)}: write a tensor of the same shape (edit a copy of vlm.read({s.name!r}))"
            )
        if s.value == "input":
            envoy.input = value
        else:
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
        return self.read(sites.Site("resid_pre", layer))

    def resid_post(self, layer: int) -> Float[Tensor, "batch seq d_model"]:
        """Residual stream leaving LM layer `layer` (HF `hidden_states[layer + 1]` before the final norm).

        Example:
            >>> import vlens; from PIL import Image
            >>> vlm = vlens.tiny()
            >>> b = vlm.prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
            >>> with vlm.trace(b):
            ...     h = vlm.resid_post(0).save()
        """
        return self.read(sites.Site("resid_post", layer))

    # -- running ------------------------------------------------------------------

    def trace(self, *inputs: Any, **kwargs: Any):
        """nnsight's `trace`, also accepting a `Batch` from `prepare`.

        A `Batch` gets position ids derived from its attention mask (for
        families that take them), so a left-padded row computes exactly what
        it would alone.
        """
        return super().trace(*self._unbatch(inputs, positions=True), **kwargs)

    @traceable
    def generate(self, *inputs: Any, **kwargs: Any):
        """nnsight's `generate`, also accepting a `Batch` from `prepare`."""
        return TransformersModel.generate.__wrapped__(self, *self._unbatch(inputs), **kwargs)

    def _unbatch(self, inputs: tuple, positions: bool = False) -> tuple:
        out = []
        for i in inputs:
            if isinstance(i, Batch):
                i = dict(i.inputs)
                if positions and "position_ids" not in i:
                    pos = self.family.position_ids(i)
                    if pos is not None:
                        i["position_ids"] = pos
            out.append(i)
        return tuple(out)

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
        the images of all prompts in order (anything `vlens.prepare.load_image`
        reads: PIL images, paths, HWC arrays; any mode is converted to RGB).
        `answers` (or captions) are appended after the generation prompt, one
        per prompt, with `eos` optionally closing them. With `template` the
        model's chat template wraps each prompt. Rows are left-padded, ready
        for `generate`.

        Example:
            >>> import vlens; from PIL import Image
            >>> vlm = vlens.tiny()
            >>> b = vlm.prepare(["<image>\\nWhat is shown?", "<image>\\nWhat is shown?"],
            ...                 [Image.new("RGB", (32, 32)), Image.new("L", (64, 20))], answers=["red", "a blue square"])
            >>> [int(n) for n in b.layout.answer.sum(1)]
            [1, 3]
        """
        return prepare(self.family, self.processor, self.config, prompts, images, answers, template=template, eos=eos)

    def __repr__(self) -> str:
        return (
            f"VLM({self.name!r}: {self.family.name}, {self.n_layers} LM layers × d_model {self.d_model}, "
            f"{self.n_vision_layers} vision layers)"
        )


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from a dtype or its name ('bfloat16', 'torch.float16'); None stays None.

    Example:
        >>> as_dtype("bfloat16"), as_dtype(None)
        (torch.bfloat16, None)
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    d = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(d, torch.dtype):
        raise InputError(f"unknown dtype {dtype!r}: use e.g. torch.float16, 'bfloat16' or 'float32'")
    return d
