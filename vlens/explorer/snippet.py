"""The page's settings as a copy-pasteable Python snippet that reproduces the view with the library.

`snippet(settings, ...)` writes the same calls `vlens.explorer.session.Session` makes (the page is a
window on the API): load the model, the image, the class features, the vector, then
`vlens.steering.efficacy` before and after (and `damage` with a caption), or the per-patch map of
the "Look" panel. Run it and it prints what the page showed.
"""

from __future__ import annotations

from typing import Any

from .session import Settings

__all__ = ["snippet", "session_snippet", "model_code", "graph_snippet"]


def model_code(model: str | None) -> str:
    """The line that builds the model from the explorer's model spec ('toy', 'tiny:FAMILY', an id or directory).

    Example:
        >>> model_code("tiny:gemma3")
        'vlm = vlens.tiny(family="gemma3", words=vlens.toy.data.all_words())'
    """
    if model is None:
        return "vlm = ...  # the VLM you passed to vlens.explore"
    if model.startswith("tiny:"):
        return f'vlm = vlens.tiny(family="{model[5:]}", words=vlens.toy.data.all_words())'
    return f"vlm = vlens.load({model!r})"


def _image(s: Settings, names: dict[str, str], n_pool: int, toy_pool: bool) -> str:
    if s.image.startswith("toy-") and toy_pool:
        return f'image = vlens.toy.toy_dataset("heldout", n={n_pool})[{int(s.image[4:])}].image'
    if s.image.startswith("toy-"):
        return f"image = pool[{int(s.image[4:])}].image  # the pool you passed to vlens.explore"
    return f"image = vlens.prepare.load_image({names.get(s.image, 'my-image.png')!r})  # the file you uploaded"


def _features(n_train: int, toy_data: bool) -> list[str]:
    data = f'train = vlens.toy.toy_dataset("train", n={n_train})' if toy_data else \
        "train = ...  # the labelled data you passed to vlens.explore"
    return [
        "# class features: the mean image-token activation at the site, per image",
        data,
        "feats = []",
        "for i in range(0, len(train), 16):",
        "    part = [train[j] for j in range(i, min(i + 16, len(train)))]",
        "    batch = vlm.prepare([prompts.QUESTION] * len(part), [x.image for x in part])",
        "    out = read_layers(vlm, batch, [site], pool=\"mean\", dtype=torch.float32)",
        "    feats.append(out[site])",
        "X, y = torch.cat(feats), torch.tensor([x.label for x in train])",
        "src_id, tgt_id = train.class_names.index(src), train.class_names.index(tgt)",
    ]


def _vector(s: Settings, ctx: dict[str, Any]) -> list[str]:
    if s.vector == "upload":
        name = ctx.get("vector_names", {}).get(s.upload, "vector.pt")
        if name.endswith(".safetensors"):
            return ["from safetensors.torch import load_file", f"v = next(iter(load_file({name!r}).values())).float()"]
        return [f"v = torch.load({name!r}, weights_only=True).float()  # the file you uploaded"]
    if s.vector == "sae":
        src = ctx.get("sae_path")
        load = f"sae = vlens.sae.load({str(src)!r})" if src else "sae = ...  # the SAE you passed to vlens.explore"
        return [load, f"v = sae.W_dec[{s.latent}].detach().float().cpu()  # latent {s.latent}'s decoder row"]
    lines = _features(ctx["n_train"], ctx["toy_data"])
    if s.vector == "probe":
        if ctx.get("given_probe"):
            return ["probe = ...  # the probe you passed to vlens.explore for this site",
                    "src_id, tgt_id = ...  # the labels of src and tgt", "v = steering.from_probe(probe, tgt_id, src_id)"]
        return lines + ["probe = probes.fit_probe(X, y, class_names=train.class_names)",
                        "v = steering.from_probe(probe, tgt_id, src_id)"]
    lines.append("v = steering.diff_of_means(X, y, src_id, tgt_id)")
    if s.vector == "random":
        lines.append(f"v = steering.random_like(v, seed={s.seed})  # the control: random, same norm")
    return lines


def _tokens(s: Settings) -> str:
    if s.tokens == "box":
        x0, y0, x1, y1 = (round(v, 2) for v in s.box)
        return f"tokens = pixel_box({x0}, {y0}, {x1}, {y1})  # the rectangle, in image pixels"
    return f"tokens = {s.tokens!r}"


def _prompt(s: Settings) -> str:
    if s.prompt == "two_choice":
        return "prompt = prompts.two_choice_prompt  # the paper's two-choice question"
    if s.prompt == "question":
        return "prompt = prompts.QUESTION"
    return f"prompt = {s.prompt!r}"


def snippet(s: Settings, *, what: str = "steer", model: str | None = "toy", n_train: int = 240, n_pool: int = 40,
            toy_data: bool = True, toy_pool: bool = True, image_names: dict[str, str] | None = None,
            **ctx: Any) -> str:
    """Python that reproduces the page's view: `what="steer"` (answers before / after) or `"look"` (the map).

    `ctx` may name `sae_path`, `vector_names` (upload id -> file name) and `given_probe`.

    Example:
        >>> code = snippet(Settings(), model="toy")
        >>> "steering.efficacy(vlm, [image], src, tgt, v, site, k" in code
        True
    """
    setup = [model_code(model), _image(s, image_names or {}, n_pool, toy_pool),
             f"site, k = {s.site!r}, {float(s.k)!r}", f"src, tgt = {s.src!r}, {s.tgt!r}", _prompt(s)]
    ctx = {**ctx, "n_train": n_train, "toy_data": toy_data}
    if what == "look":
        return _with_imports(setup + [""] + _look(s, ctx))
    body = ["", *_vector(s, ctx), _tokens(s), "",
            "before = steering.efficacy(vlm, [image], src, tgt, None, site, 0.0,",
            "                           prompt=prompt)",
            "after = steering.efficacy(vlm, [image], src, tgt, v, site, k, prompt=prompt,",
            "                          tokens=tokens)",
            'for name, r in (("before", before), ("after", after)):',
            "    answer, p = r['answers'][0], float(r['p_target'][0])",
            '    print(f"{name}: {answer}, p({tgt}) = {p:.3f}")']
    if s.caption.strip():
        body += ["from vlens.data import Sample",
                 f"caption = {s.caption.strip()!r}",
                 "damage = steering.damage(vlm, [Sample(image, caption=caption)], v, site, k,",
                 "                         tokens=tokens)",
                 "print(\"damage:\", damage)"]
    return _with_imports(setup + body)


def _with_imports(lines: list[str]) -> str:
    """The code with the imports it uses on top."""
    code = "\n".join(lines)
    mods = [m for m in ("probes", "prompts", "steering") if f"{m}." in code]
    head = ["import torch", "", "import vlens"]
    head += [f"from vlens import {', '.join(mods)}"] if mods else []
    head += ["from vlens.activations import read_layers"] if "read_layers(" in code else []
    head += ["from vlens.explorer import pixel_box"] if "pixel_box(" in code else []
    return "\n".join(head + [""] + lines) + "\n"


def _look(s: Settings, ctx: dict[str, Any]) -> list[str]:
    overlay = ["from vlens.lens import patch_values",
               "from vlens.viz import heatmap_overlay",
               "kind = \"highres\" if batch.layout.images[0].geometry.count(\"highres\") else \"base\"",
               "boxes, vals = patch_values(batch.layout, torch.nan_to_num(values), 0, kind)",
               "heatmap_overlay(image, boxes, vals, size=320).save(\"look.png\")"]
    if s.view == "attribution":
        return ["from vlens.attribution import answer_target, grad_x_act",
                "text = prompt(src, tgt) if callable(prompt) else prompt",
                "batch = vlm.prepare([text], [image], answers=[tgt])",
                "a = grad_x_act(vlm, batch, answer_target(), site)",
                "a.overlay(image, size=320).save(\"look.png\")"]
    lines = ["batch = vlm.prepare([prompts.QUESTION], [image])"]
    if s.view == "lens":
        return lines + ["from vlens.lens import lens_figure, logit_lens",
                        "lens = logit_lens(vlm, batch, [site], k=1)",
                        "lens_figure(lens, image).write_html(\"lens.html\")",
                        "values = lens.values(0)"] + overlay
    lines += ["values = torch.full(batch.layout.shape, float(\"nan\"))", "mask = batch.layout.image"]
    if s.view == "sae":
        src = ctx.get("sae_path")
        return lines + [f"sae = vlens.sae.load({str(src)!r})" if src else "sae = ...  # the SAE you passed",
                        "site = vlens.sae.site_of(sae, vlm).name",
                        "h = read_layers(vlm, batch, [site], tokens=mask)[site]",
                        f"values[mask] = sae.encode(h.to(sae.W_dec.dtype))[:, {s.latent}].detach().float()"] + overlay
    return _features(ctx["n_train"], ctx["toy_data"]) + lines + [
        "probe = probes.fit_probe(X, y, class_names=train.class_names)",
        "h = read_layers(vlm, batch, [site], tokens=mask, dtype=torch.float32)[site]",
        "col = [int(c) for c in probe.classes].index(tgt_id)",
        "values[mask] = probe.predict_proba(h)[:, col].detach()",
    ] + overlay


def session_snippet(session: Any, s: Settings, what: str = "steer") -> str:
    """`snippet` with the context of a `Session` (its model spec, data sizes, uploads, SAE path, given probes).

    Example:
        >>> import vlens
        >>> from vlens.explorer.session import Session
        >>> sess = Session(vlens.tiny(words=vlens.toy.data.all_words()), n_train=40, n_pool=4, model="tiny:llava-next")
        >>> session_snippet(sess, Settings(view="lens"), what="look").count("logit_lens(vlm, batch, [site], k=1)")
        1
    """
    return snippet(s, what=what, model=session.model, n_train=session.n_train, n_pool=session.n_pool,
                   toy_data=session.toy_data, toy_pool=session.toy_pool, image_names=session.image_names,
                   sae_path=session.sae_path, vector_names=session.vector_names,
                   given_probe=session.vlm.site(s.site).name in session.given_probes)


def graph_snippet(file: str | None, node: str) -> str:
    """Python that prints what the graph panel shows for `node` of the graph JSON `file` (None: a graph given as
    a dict), and saves its pixel heat.

    Example:
        >>> code = graph_snippet("red-square.json", "logit")
        >>> "patch_influence(g, node)" in code and "node = 'logit'" in code
        True
    """
    return "\n".join([
        "import numpy as np",
        "from PIL import Image",
        "",
        "from vlens.graph_view import image_share, patch_heat, patch_influence, read_graph",
        "",
        f"g = read_graph({file!r})  # the graph JSON you loaded" if file else
        "g = read_graph(...)  # the graph you gave the explorer (a dict, or its JSON file)",
        f"node = {node!r}",
        "for p in sorted(patch_influence(g, node), key=lambda p: -p[\"influence\"])[:10]:",
        "    print(p[\"node_id\"], p[\"box\"], round(p[\"influence\"], 4))",
        "print(\"image share:\", round(image_share(g, node), 4))",
        "heat = patch_heat(g, node)  # [height, width] of picture 0",
        "Image.fromarray(np.uint8(255 * heat / max(heat.max(), 1e-12))).save(\"heat.png\")",
    ]) + "\n"
