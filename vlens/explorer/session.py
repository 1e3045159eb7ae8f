"""The state behind `vlens explore`: a model, its images, cached class features, and one method per view.

Every method is a few calls of the library (`vlens.steering`, `vlens.lens`, `vlens.attribution`,
`vlens.probes`, `vlens.sae`, `vlens.viz`): the page is a window on the API, never a second
implementation. `Settings` holds what the page's controls say; `vlens.explorer.snippet` renders
the same settings as Python that reproduces the view. Nothing here imports the web framework, so
a session works (and is tested) without it.

    >>> import vlens
    >>> s = Session(vlens.tiny(words=vlens.toy.data.all_words()), n_train=40, n_pool=4)
    >>> s.info()["sites"][:2], s.info()["layer_sites"][:2], len(s.info()["images"])
    (['resid_pre.0', 'resid_post.0'], ['z.0', 'attn_out.0'], 4)
"""

from __future__ import annotations

import dataclasses
import io
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from jaxtyping import Bool
from torch import Tensor

from ..activations.read import pool_features, read_layers
from ..errors import BadImageError, InputError, NotFoundError
from ..interventions import check_vector
from ..lens import logit_lens, patch_values, region_tokens
from ..prepare import load_image
from ..prompts import QUESTION, two_choice_prompt
from ..sites import IN_LAYER, RESIDUAL_KINDS, VECTOR_KINDS as SITE_VECTOR_KINDS
from ..tokens import KIND_NAMES, TokenLayout
from ..viz import heatmap_overlay, image_data_uri

if TYPE_CHECKING:
    from ..model import VLM

__all__ = ["Settings", "Session", "pixel_box", "VECTOR_KINDS", "TOKEN_CHOICES", "VIEWS"]

#: Where a steering vector can come from (`Settings.vector`).
VECTOR_KINDS = ("mean_diff", "probe", "sae", "random", "upload")
#: Token selections of the page (`Settings.tokens`); 'box' is the rectangle `Settings.box` (image pixels).
TOKEN_CHOICES = ("image", "base", "highres", "text", "box")
#: Per-patch views of the "Look" panel (`Settings.view`).
VIEWS = ("probe", "sae", "lens", "attribution")
#: Prompts of the page: the paper's two-choice question for the pair, or the toy's open question.
PROMPTS = {"two_choice": two_choice_prompt, "question": QUESTION}
_BATCH = 16
#: The in-layer site kinds the page offers beside the residual stream (one vector per token: not `pattern`).
LAYER_KINDS = tuple(k for k in IN_LAYER if k in SITE_VECTOR_KINDS)


@dataclass
class Settings:
    """What the page's controls say: the image, the intervention and the view. `from_dict` checks every field.

    Example:
        >>> Settings.from_dict({"k": "3", "site": "resid_post.1"}).k
        3.0
    """

    image: str = "toy-0"
    prompt: str = "two_choice"
    site: str = "resid_pre.1"
    vector: str = "mean_diff"
    src: str = "red circle"
    tgt: str = "blue circle"
    latent: int = 0
    seed: int = 0
    upload: str = ""
    tokens: str = "image"
    box: list[float] = field(default_factory=lambda: [0.0, 0.0, 32.0, 32.0])
    k: float = 2.0
    caption: str = ""
    view: str = "probe"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Settings":
        """Settings from the page's JSON (strings are converted; unknown keys and bad values are refused)."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise InputError(f"unknown setting(s) {unknown}: the settings are {sorted(names)}")
        out = cls()
        for key, value in d.items():
            default = getattr(out, key)
            try:
                if isinstance(default, list):
                    value = [float(v) for v in value]
                    if len(value) != 4:
                        raise ValueError("a box is four numbers x0, y0, x1, y1")
                else:
                    value = type(default)(value)
            except (TypeError, ValueError) as e:
                raise InputError(f"setting {key!r} = {value!r} is not a valid {type(default).__name__}: {e}") from None
            setattr(out, key, value)
        for key, allowed in (("vector", VECTOR_KINDS), ("tokens", TOKEN_CHOICES), ("view", VIEWS)):
            if getattr(out, key) not in allowed:
                raise InputError(f"{key} must be one of {', '.join(allowed)}, not {getattr(out, key)!r}")
        if out.prompt not in PROMPTS and "<image>" not in out.prompt:
            raise InputError("the prompt is 'two_choice', 'question', or your own text holding an <image> placeholder")
        return out


def pixel_box(x0: float, y0: float, x1: float, y1: float, min_overlap: float = 0.5
              ) -> Callable[[TokenLayout], Bool[Tensor, "batch seq"]]:
    """A token selection: the image tokens whose pixel box lies at least `min_overlap` inside a rectangle
    (original-image pixels; every image of the batch), through `vlens.lens.region_tokens`.

    Example:
        >>> import vlens; from PIL import Image
        >>> from vlens.tokens import select
        >>> b = vlens.tiny().prepare(["<image>\\nhi"], [Image.new("RGB", (32, 32))])
        >>> int(select(b, pixel_box(0, 0, 16, 32)).sum())   # the left half: 8 base + 8 high-res patches
        16
    """
    if not (x1 > x0 and y1 > y0):
        raise InputError(f"the rectangle ({x0}, {y0}, {x1}, {y1}) is empty: draw it from its top-left to bottom-right")

    def select_box(layout: TokenLayout) -> Tensor:
        mask = torch.zeros(layout.shape, dtype=torch.bool)
        for i, span in enumerate(layout.images):
            h, w = span.geometry.size
            region = torch.zeros(h, w, dtype=torch.bool)
            region[max(int(y0), 0):max(int(y1), 0), max(int(x0), 0):max(int(x1), 0)] = True
            mask |= region_tokens(layout, region, image=i, min_overlap=min_overlap)
        return mask

    return select_box


class Session:
    """One model and what the page has loaded: images, uploaded vectors, class features per site (cached).

    `data` is a labelled data set of `Sample`s for class means and probes (default: `n_train` toy training
    images); `pool` the images to pick from and to browse SAE latents on (default: `n_pool` held-out toy
    images). `probes` maps a site (or an int layer) to a fitted probe; without one for a site, a probe is
    fit on the cached features when asked. `graphs` are attribution-graph JSONs (paths or dicts) for the graph
    panel, held in `self.graphs` (`vlens.explorer.graphs.GraphShelf`: `session.graphs.add(graph)` adds one
    later); `transcoders` maps a layer to its transcoder (or lists them by layer), for its features'
    dashboards. Model work takes `lock`; `stage` says what runs now.
    """

    def __init__(self, vlm: VLM, *, sae: Any = None, probes: dict | None = None, data: Sequence | None = None,
                 pool: Sequence | None = None, n_train: int = 240, n_pool: int = 40, model: str | None = None,
                 sae_path: str | None = None, graphs: Sequence | None = None, transcoders: dict | None = None
                 ) -> None:
        from ..toy.data import toy_dataset
        from .graphs import GraphShelf

        self.vlm, self.sae, self.model, self.sae_path = vlm, sae, model, sae_path
        self.toy_data, self.toy_pool = data is None, pool is None
        self.data = data if data is not None else toy_dataset("train", n=n_train)
        self.pool = pool if pool is not None else toy_dataset("heldout", n=n_pool)
        self.n_train, self.n_pool = len(self.data), len(self.pool)
        self.class_names = list(getattr(self.data, "class_names", None) or [])
        self.probes = {vlm.site(s).name: p for s, p in (probes or {}).items()}
        self.given_probes = set(self.probes)
        self.images: dict[str, Any] = {f"toy-{i}": s.image for i, s in enumerate(self.pool)}
        self.image_names: dict[str, str] = {}
        self.vectors: dict[str, Tensor] = {}
        self.vector_names: dict[str, str] = {}
        self._features: dict[str, Tensor] = {}
        self._labels: Tensor | None = None
        self.lock = threading.RLock()
        self.stage = "idle"
        self.closing = False  # set when the server stops: long loops end early
        self.graphs = GraphShelf(transcoders)
        for g in graphs or ():
            self.graphs.add(g)
        self.sae_site = None
        if sae is not None:
            from ..sae.io import site_of

            self.sae_site = site_of(sae, vlm).name
            if sae.cfg.d_in != vlm.width(self.sae_site):
                raise InputError(f"the SAE reads width {sae.cfg.d_in} but {self.sae_site} has width "
                                 f"{vlm.width(self.sae_site)}: check the SAE's hook_name")

    # -- what the page lists ---------------------------------------------------------------------

    @property
    def sites(self) -> list[str]:
        """The residual sites the page offers, in depth order (their class features are read in one pass)."""
        return [f"{kind}.{L}" for L in range(self.vlm.n_layers) for kind in RESIDUAL_KINDS]

    @property
    def layer_sites(self) -> list[str]:
        """The sites inside each layer the page offers (`LAYER_KINDS`: z, attn_out, mlp_in, mlp_out), in depth order;
        their class features are read one site at a time, when a view asks."""
        return [f"{kind}.{L}" for L in range(self.vlm.n_layers) for kind in LAYER_KINDS]

    def info(self) -> dict[str, Any]:
        """Model facts, sites, classes, the images to pick from (thumbnails) and the SAE's latents, for the page."""
        thumbs = []
        for key, im in list(self.images.items())[:64]:
            small = im.copy()
            small.thumbnail((64, 64))
            thumbs.append({"id": key, "src": image_data_uri(small), "size": list(im.size),
                           "name": self.image_names.get(key, key)})
        sae = None
        if self.sae is not None:
            from ..sae.features import choose_latents

            sae = {"site": self.sae_site, "d_sae": int(self.sae.cfg.d_sae), "latents": choose_latents(self.sae, 32)}
        return {"model": self.vlm.name, "n_layers": self.vlm.n_layers, "d_model": self.vlm.d_model,
                "family": self.vlm.family.name, "sites": self.sites, "layer_sites": self.layer_sites,
                "classes": self.class_names,
                "images": thumbs, "sae": sae, "probes": sorted(self.probes), "n_train": self.n_train,
                "graphs": self.graphs.entries(), "transcoder_layers": sorted(self.graphs.transcoders)}

    # -- inputs ----------------------------------------------------------------------------------

    def add_image(self, data: bytes, name: str = "upload") -> dict[str, Any]:
        """Decode an uploaded image (`vlens.prepare.load_image`: a bad file raises `BadImageError`); return its entry."""
        try:
            im = load_image(bytes(data))
        except BadImageError as e:
            why = str(e).split(": ", 1)[-1] if "BytesIO" not in str(e) else "not a picture file PIL can identify"
            raise BadImageError(f"{name} is not an image vlens can read ({why}): upload a PNG, JPEG, BMP, GIF or "
                                "WebP file") from None
        key = f"upload-{sum(k.startswith('upload-') for k in self.images)}"
        self.images[key] = im
        self.image_names[key] = name
        small = im.copy()
        small.thumbnail((64, 64))
        return {"id": key, "src": image_data_uri(small), "size": list(im.size), "name": name}

    def add_vector(self, data: bytes, name: str = "vector.pt") -> dict[str, Any]:
        """Read an uploaded steering vector (`.pt` tensor or `.safetensors` with one tensor) and check its width."""
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load as st_load

                tensors = st_load(bytes(data))
                if len(tensors) != 1:
                    raise InputError(f"{name} holds {len(tensors)} tensors ({sorted(tensors)[:5]}): upload one vector")
                v = next(iter(tensors.values()))
            else:
                buf = io.BytesIO(bytes(data))
                v = torch.load(buf, map_location="cpu", weights_only=True)
        except InputError:
            raise
        except Exception as e:
            raise InputError(f"cannot read a tensor from {name}: {e} (upload a torch.save'd tensor or a .safetensors file)"
                             ) from None
        if not isinstance(v, Tensor):
            raise InputError(f"{name} holds a {type(v).__name__}, not a tensor: torch.save(vector, path)")
        heads = self.vlm.width("z.0")  # a vector for z.L has the heads' width, every other site's is d_model
        width = heads if v.dim() == 1 and v.shape[0] == heads else self.vlm.d_model
        v = check_vector(v.float(), width, what=f"the uploaded vector {name}")
        key = f"vector-{len(self.vectors)}"
        self.vectors[key] = v
        self.vector_names[key] = name
        return {"id": key, "name": name, "width": int(v.shape[0]), "norm": round(float(v.norm()), 4)}

    def image(self, key: str):
        """An image of the session by id."""
        if key not in self.images:
            raise NotFoundError(f"no image {key!r}: pick one of the data set or upload one ({len(self.images)} loaded)")
        return self.images[key]

    def class_id(self, name: str) -> int:
        """The label of a class name of the data set."""
        if name not in self.class_names:
            shown = ", ".join(self.class_names[:8]) + (" ..." if len(self.class_names) > 8 else "")
            raise NotFoundError(f"unknown class {name!r}: the data set's classes are {shown}")
        return self.class_names.index(name)

    # -- cached features -------------------------------------------------------------------------

    def features(self, site: str) -> tuple[Tensor, Tensor]:
        """Mean image-token activations of the data set at `site` (every residual site read in one pass, a site
        inside a layer alone; cached)."""
        site = self.vlm.site(site).name
        with self.lock:
            if site not in self._features:
                self._read_features(self.sites if site in self.sites else [site])
        return self._features[site], self._labels

    def _read_features(self, sites: list[str]) -> None:
        def stage(done: int, n: int) -> None:
            if self.closing:
                raise InputError("the explorer is stopping")
            self.stage = f"reading class features: images {done}–{min(done + _BATCH, n)} of {n} at {len(sites)} sites"

        self._features |= pool_features(self.vlm, self.data, sites, prompt=QUESTION, batch_size=_BATCH, callback=stage)
        self._labels = torch.tensor([s.label for s in self.data])

    def probe(self, site: str) -> Any:
        """The probe at `site`: the one given, else a softmax probe fit on the cached features (cached)."""
        from ..probes import fit_probe

        site = self.vlm.site(site).name
        if site not in self.probes:
            X, y = self.features(site)
            self.stage = f"fitting a probe at {site}"
            self.probes[site] = fit_probe(X, y, class_names=self.class_names)
        return self.probes[site]

    # -- the intervention ------------------------------------------------------------------------

    def vector(self, s: Settings) -> Tensor:
        """The steering vector the settings name (`vlens.steering` functions; an SAE decoder row; an upload)."""
        from .. import steering

        if s.vector == "upload":
            if s.upload not in self.vectors:
                raise NotFoundError("no uploaded vector: upload a .pt or .safetensors tensor first")
            return self.vectors[s.upload]
        if s.vector == "sae":
            if self.sae is None:
                raise InputError("no SAE was given: start with vlens explore --sae DIR (or explore(vlm, sae=...))")
            if not 0 <= s.latent < self.sae.cfg.d_sae:
                raise InputError(f"latent {s.latent} is out of range 0..{self.sae.cfg.d_sae - 1}")
            return self.sae.W_dec[s.latent].detach().float().cpu()
        src, tgt = self.class_id(s.src), self.class_id(s.tgt)
        if s.vector == "probe":
            return steering.from_probe(self.probe(s.site), tgt, src)
        X, y = self.features(s.site)
        v = steering.diff_of_means(X, y, src, tgt)
        return steering.random_like(v, seed=s.seed) if s.vector == "random" else v

    def selection(self, s: Settings) -> Any:
        """The token selection of the settings: a name of `vlens.tokens`, or `pixel_box` for the rectangle."""
        return pixel_box(*s.box) if s.tokens == "box" else s.tokens

    def prompt(self, s: Settings) -> Any:
        """The prompt: the two-choice question (a function of the pair), the open question, or the given text."""
        return PROMPTS.get(s.prompt, s.prompt)

    def steer(self, s: Settings) -> dict[str, Any]:
        """Greedy answer and target probability before and after steering (`vlens.steering.efficacy`), and the
        damage on the caption when one is given (`vlens.steering.damage`)."""
        from .. import steering
        from ..data.records import Sample

        with self.lock:
            image = self.image(s.image)
            self.class_id(s.src), self.class_id(s.tgt)  # an unknown class is refused before any model work
            v = self.vector(s)
            tokens, prompt = self.selection(s), self.prompt(s)
            self.stage = "generating the clean answer"
            before = steering.efficacy(self.vlm, [image], s.src, s.tgt, None, s.site, 0.0, prompt=prompt)
            self.stage = f"generating with k = {s.k} at {s.site}"
            after = steering.efficacy(self.vlm, [image], s.src, s.tgt, v, s.site, s.k, prompt=prompt, tokens=tokens)
            damage = None
            if s.caption.strip():
                self.stage = "scoring the caption"
                damage = steering.damage(self.vlm, [Sample(image, caption=s.caption.strip())], v, s.site, s.k,
                                         tokens=tokens)
            self.stage = "idle"
        return {"before": before["answers"][0], "after": after["answers"][0],
                "p_before": float(before["p_target"][0]), "p_after": float(after["p_target"][0]),
                "flipped": bool(after["flipped"][0]), "damage": damage, "norm": float(v.norm()),
                "tgt": s.tgt, "src": s.src}

    # -- views -----------------------------------------------------------------------------------

    def geometry(self, key: str) -> dict[str, Any]:
        """The processed view of an image: tile grids of base and high-res tokens, newline count (plotly JSON)."""
        from ..viz import token_layout_figure

        with self.lock:
            image = self.image(key)
            batch = self.vlm.prepare([QUESTION], [image])
            fig = token_layout_figure(self.vlm, batch, [image], height=420)
        g = batch.layout.images[0].geometry
        counts = {n: g.count(n) for n in KIND_NAMES}
        return {"figure": fig.to_json(), "counts": counts, "size": list(image.size),
                "tiles": list(g.tiles), "summary": batch.layout.summary()}

    def look(self, s: Settings) -> dict[str, Any]:
        """A per-patch map over the image: probe probability of the target class, SAE latent, logit lens top-token
        probability (with `vlens.lens.lens_figure`), or gradient × activation of the target answer."""
        with self.lock:
            image = self.image(s.image)
            site = self.vlm.site(s.site).name
            fig = None
            if s.view == "attribution":
                from ..attribution import answer_target, grad_x_act

                self.class_id(s.tgt)
                self.stage = f"gradient × activation of {s.tgt!r} at {site}"
                text = self.prompt(s)
                batch = self.vlm.prepare([text(s.src, s.tgt) if callable(text) else text], [image], answers=[s.tgt])
                a = grad_x_act(self.vlm, batch, answer_target(), site)
                picture, title = a.overlay(image, size=320), f"gradient × activation of the answer {s.tgt!r} at {site}"
            else:
                batch = self.vlm.prepare([QUESTION], [image])
                values, title = self._token_values(s, batch, site)
                picture = self._overlay(batch.layout, values, image)
                if s.view == "lens":
                    from ..lens import lens_figure

                    fig = lens_figure(logit_lens(self.vlm, batch, [site], k=1), image).to_json()
            self.stage = "idle"
        return {"png": image_data_uri(picture), "title": title, "figure": fig}

    def _token_values(self, s: Settings, batch: Any, site: str) -> tuple[Tensor, str]:
        """Per-token values [batch, seq] (NaN off the image tokens) of the probe, SAE or lens view."""
        values = torch.full(batch.layout.shape, float("nan"))
        mask = batch.layout.image
        if s.view == "lens":
            self.stage = f"logit lens at {site}"
            lens = logit_lens(self.vlm, batch, [site], k=1)
            return lens.values(0), f"logit lens at {site}: probability of each patch's top token"
        if s.view == "sae":
            if self.sae is None:
                raise InputError("no SAE was given: start with vlens explore --sae DIR (or explore(vlm, sae=...))")
            if not 0 <= s.latent < self.sae.cfg.d_sae:
                raise InputError(f"latent {s.latent} is out of range 0..{self.sae.cfg.d_sae - 1}")
            site = self.sae_site
            self.stage = f"SAE latent {s.latent} at {site}"
            h = read_layers(self.vlm, batch, [site], tokens=mask)[site]
            with torch.no_grad():
                f = self.sae.encode(h.to(self.sae.W_dec.device, self.sae.W_dec.dtype))[:, s.latent]
            values[mask] = f.float().cpu()
            return values, f"SAE latent {s.latent} at {site}"
        probe = self.probe(site)
        tgt = self.class_id(s.tgt)
        classes = [int(c) for c in probe.classes]
        if tgt not in classes:
            raise InputError(f"class {s.tgt!r} is not one of the probe's classes")
        self.stage = f"probe at {site} on every image token"
        h = read_layers(self.vlm, batch, [site], tokens=mask, dtype=torch.float32)[site]
        values[mask] = probe.predict_proba(h)[:, classes.index(tgt)].detach().float().cpu()
        return values, f"probe probability of {s.tgt!r} at {site}, per patch"

    @staticmethod
    def _overlay(layout: TokenLayout, values: Tensor, image: Any):
        g = layout.images[0].geometry
        boxes, v = patch_values(layout, torch.nan_to_num(values, nan=0.0), 0,
                                "highres" if g.count("highres") else "base")
        return heatmap_overlay(image, boxes, v, size=320)

    def latent_page(self, latent: int, out: Any, layer: int | None = None) -> Any:
        """Write the latent browser page of `latent` (`vlens.sae.dashboard` over the pool) into `out`: of the SAE,
        or, with `layer`, of that layer's transcoder (a graph's feature)."""
        from ..sae.dashboards import dashboard

        sae = self.sae if layer is None else self.graphs.transcoder(layer)
        if sae is None:
            raise InputError("no SAE was given: start with vlens explore --sae DIR (or explore(vlm, sae=...))")
        if not 0 <= latent < sae.cfg.d_sae:
            raise InputError(f"latent {latent} is out of range 0..{sae.cfg.d_sae - 1}")
        with self.lock:
            self.stage = f"latent {latent}: top images over {len(self.pool)} pool images"
            dashboard(sae, self.vlm, self.pool, out, latents=[latent], progress=False)
            self.stage = "idle"
        return out
