"""Every model family, one parametrization: sites, token geometry checked against the model, pixel boxes that tell
the truth, and the pipeline on the tiny build.

To add a family, add one entry to `FAMILIES`: its name and the `vlens.tiny(family=...)` keywords of a build whose
vision feature is patch-local (each image token depends on its own patch of pixels only). Family-specific checks
(e.g. a packing order) belong in the family's own test file.
"""

from __future__ import annotations

import nnsight
import numpy as np
import pytest
import torch
from PIL import Image

import vlens
import vlens.sae as vs
from vlens.data import Sample
from vlens.probes import fit_probe
from vlens.steering.vectors import diff_of_means
from vlens.tokens import NEWLINE

#: family name -> `vlens.tiny` keywords of a build with a patch-local vision feature.
FAMILIES: dict[str, dict] = {
    "llava-next": dict(vision_layers=0),  # 0: the patch embeddings (vision_feature_layer -2 of one CLIP layer)
    "llava": dict(vision_layers=0),  # 0 = no mixing before the feature (see vlens.families.llava_next.patch_local)
    "llava-onevision": dict(vision_layers=0),
}

WORDS = ["red", "blue", "square", "circle"]
# (width, height): square, wide, tall, tiny, large (a 3×3-tile canvas for the anyres families).
SIZES = [(32, 32), (64, 20), (20, 64), (7, 5), (200, 150)]
PROMPTS = ["<image>\nWhat is shown in this image?", "<image>\nWhat?", "<image> <image>\nAnd these two?", "<image>\nA"]


def noise(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())


@pytest.fixture(scope="module", params=list(FAMILIES))
def vlm(request):
    return vlens.tiny(family=request.param, words=WORDS, seed=1, **FAMILIES[request.param])


@pytest.fixture(scope="module")
def images():
    return [noise(w, h, i) for i, (w, h) in enumerate(SIZES)]


def hf_forward(vlm, batch):
    """A plain HF forward with hidden states (no nnsight), positions as the family gives them."""
    inputs = dict(batch.inputs)
    pos = vlm.family.position_ids(inputs)
    if pos is not None:
        inputs["position_ids"] = pos
    with torch.no_grad():
        return vlm._module(**inputs, output_hidden_states=True)


def image_features(vlm, batch) -> list[torch.Tensor]:
    """What the vision tower and projector emit, per image (the model's own `get_image_features`)."""
    keys = {k: batch.inputs[k] for k in vlm.family.image_inputs if k in batch.inputs}
    with torch.no_grad():
        out = vlm._module.model.get_image_features(**keys, return_dict=True).pooler_output
    return [f.reshape(-1, f.shape[-1]) for f in out]


# -- sites ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", vlens.families.names())
def test_every_family_runs_with_no_vision_layers(family):
    """`vision_layers=0` builds a model whose first forward works and equals HF's own hidden states."""
    vlm = vlens.tiny(family=family, vision_layers=0, words=WORDS)
    batch = vlm.prepare(["<image>\nWhat is shown in this image?"], [noise(40, 24, 0)])
    hs = hf_forward(vlm, batch).hidden_states
    with torch.no_grad(), vlm.trace(batch):
        h = vlm.resid_pre(1).save()
    torch.testing.assert_close(h, hs[1])


def test_a_vision_feature_layer_the_tower_lacks_is_refused_at_build_time():
    with pytest.raises(vlens.errors.InputError, match="vision_feature_layer -4 does not exist in a tower of 2"):
        vlens.tiny(family="llava-next", vision_layers=2, vision_feature_layer=-4)


def test_every_site_reads_and_residuals_equal_hidden_states(vlm, images):
    batch = vlm.prepare(PROMPTS, images, answers=["red", "a blue square", "red", "circle"])
    out = hf_forward(vlm, batch)
    hs, n = out.hidden_states, vlm.n_layers
    names = vlm.sites  # in execution order
    with torch.no_grad(), vlm.trace(batch):
        values = nnsight.save([])
        for name in names:
            values.append(vlm.read(name))
    got = dict(zip(names, values))
    assert len(got) == len(names) and len(hs) == n + 1
    for L in range(n):
        assert torch.equal(got[f"resid_pre.{L}"], hs[L]), L
    for L in range(n - 1):
        assert torch.equal(got[f"resid_post.{L}"], hs[L + 1]), L
    assert torch.equal(got["final_norm"], hs[n])  # HF's last hidden state is after the final norm
    assert torch.equal(got["logits"], out.logits)
    assert torch.equal(got["embed"][~batch.layout.image], hs[0][~batch.layout.image])
    for s in vlm.sites:
        assert got[s].isfinite().all(), s
        assert vlm.hook_name(s) and vlens.sites.from_hook_name(vlm.hook_name(s)) == vlm.site(s)


# -- geometry against the model ------------------------------------------------------------------------------------


def test_image_mask_and_counts_match_the_model(vlm, images):
    """Square, wide, tall, tiny and large images in one left-padded batch (one row holds two images)."""
    batch = vlm.prepare(PROMPTS, images, answers=["red", "a blue square", "red", "circle"])
    lay = batch.layout
    # The model's placeholder positions are the image-token ids; ours are exactly those.
    assert torch.equal(lay.image, lay.input_ids == vlm.config.image_token_id)
    parts = lay.image.int() + lay.prompt.int() + lay.answer.int() + lay.bos.int() + lay.pad.int()
    assert torch.equal(parts, torch.ones_like(parts))
    # Per image, the tower + projector emit as many features as its run of tokens, and the model puts them there.
    feats = image_features(vlm, batch)
    assert [len(f) for f in feats] == [s.geometry.n_tokens for s in lay.images]
    h0 = hf_forward(vlm, batch).hidden_states[0]
    for span, f in zip(lay.images, feats):
        torch.testing.assert_close(h0[span.batch_index, span.start : span.end], f.to(h0.dtype))
    for span in lay.images:
        g = span.geometry
        assert g.kind.shape == g.tile.shape == g.row.shape == g.col.shape == (g.n_tokens,)
        assert g.box.shape == (g.n_tokens, 4)
        real = g.kind != NEWLINE
        assert torch.isnan(g.box[~real]).all() and not torch.isnan(g.box[real]).any()
        h, w = g.size
        b = g.box[real]
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()


def _gap(box: torch.Tensor, block: tuple[float, float, float, float]) -> torch.Tensor:
    """Chebyshev distance in pixels between each box and the block (0 where they touch or overlap)."""
    x0, y0, x1, y1 = block
    dx = torch.stack([box[:, 0] - x1, x0 - box[:, 2], torch.zeros(len(box))], -1).amax(-1)
    dy = torch.stack([box[:, 1] - y1, y0 - box[:, 3], torch.zeros(len(box))], -1).amax(-1)
    return torch.maximum(dx, dy)


def test_pixel_boxes_tell_the_truth(vlm, images):
    """Perturb a block of pixels of one image; ask the model (HF hidden_states[0]) which image tokens changed.

    With a patch-local vision feature, every token whose box holds the block's centre must change, every token
    whose box is far from the block must not, and no token of another image, nor any text token, may change.
    "Far" allows for the processor's resampling (bicubic: a few pixels of the resized image).
    """
    check_pixel_boxes(vlm, images)


def check_pixel_boxes(vlm, images, prompts=PROMPTS):
    """The pixel-box truth check (see `test_pixel_boxes_tell_the_truth`) on one batch of `prompts` and `images`."""
    base = vlm.prepare(prompts, images)
    h_base = hf_forward(vlm, base).hidden_states[0]
    g = torch.Generator().manual_seed(0)
    n_checked = 0
    for k, im in enumerate(images):
        w, h = im.size
        span = base.layout.images[k]
        geo = span.geometry
        real = geo.kind != NEWLINE
        # One processed (resized) pixel in original pixels, at most; the resampling kernel reaches ~2 of them.
        side = float((geo.box[real, 2:] - geo.box[real, :2]).amax())
        margin = 3.0 * max(1.0, side / vlm.config.vision_config.patch_size) + 1.0
        for cx, cy in [(w / 2 + 0.3, h / 2 + 0.3), (float(torch.rand(1, generator=g)) * w,
                                                    float(torch.rand(1, generator=g)) * h)]:
            s = max(1, min(w, h) // 16)
            x0, y0 = min(max(0, int(cx) - s // 2), w - s), min(max(0, int(cy) - s // 2), h - s)
            block = (x0, y0, x0 + s, y0 + s)
            arr = torch.from_numpy(np.array(im)).clone()
            arr[y0 : y0 + s, x0 : x0 + s] = 255 - arr[y0 : y0 + s, x0 : x0 + s]
            moved = [Image.fromarray(arr.numpy()) if i == k else x for i, x in enumerate(images)]
            h_new = hf_forward(vlm, vlm.prepare(prompts, moved)).hidden_states[0]
            changed = (h_new - h_base).abs().amax(-1) > 1e-6
            mine = changed[span.batch_index, span.start : span.end]
            others = changed.clone()
            others[span.batch_index, span.start : span.end] = False
            assert not others.any(), f"image {k}: tokens outside the image changed"
            ccx, ccy = (block[0] + block[2]) / 2, (block[1] + block[3]) / 2
            box = geo.box
            covers = real & (box[:, 0] <= ccx) & (ccx < box[:, 2]) & (box[:, 1] <= ccy) & (ccy < box[:, 3])
            far = real & (_gap(torch.nan_to_num(box), block) > margin)
            assert mine[covers].all(), f"image {k} {im.size}, block {block}: a token whose box covers it did not change"
            assert not mine[far].any(), (
                f"image {k} {im.size}, block {block}: tokens far from it changed: {box[far & mine][:4].tolist()}")
            assert not mine[~real].any(), "a newline token changed"
            n_checked += int(covers.sum())
    assert n_checked >= len(images)  # every image had tokens covering its centre block


# -- the pipeline on the tiny build --------------------------------------------------------------------------------


def _data(n: int = 12) -> list[Sample]:
    colours = [(220, 20, 20), (20, 20, 220)]
    out = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        im = Image.new("RGB", (max(w, 16), max(h, 16)), colours[i % 2])
        out.append(Sample(im, label=i % 2, caption=["a red square", "a blue circle"][i % 2], id=f"s{i}"))
    return out


def test_pipeline_read_harvest_probe_steer_sae(vlm, tmp_path):
    data = _data()
    batch = vlm.prepare(["<image>\nWhat is shown?"] * 4, [s.image for s in data[:4]])
    # read_layers: one forward, two sites, pooled over image tokens
    read = vlens.read_layers(vlm, batch, [1, "resid_post.2"], tokens="image", pool="mean")
    assert read[1].shape == (4, vlm.d_model) and read["resid_post.2"].isfinite().all()
    # harvest (pooled): equals read_layers on the same prompt, and feeds a probe
    store = vlens.harvest(vlm, data, layers=[1, 2], pool="mean", batch_size=5, out=tmp_path / "pooled",
                          progress=False, prompt="<image>\nWhat is shown?")
    X, y = store.activations(2).tensor().float(), torch.tensor([s.label for s in data])
    assert X.shape == (len(data), vlm.d_model)
    torch.testing.assert_close(store.activations(1).tensor()[:4].float(), read[1].float(), rtol=1e-4, atol=1e-5)
    probe = fit_probe(X, y, test_size=0.25, seed=0)
    assert probe.train_accuracy == 1.0  # two solid colours: linearly separable
    # steering: a class-mean difference added at layer 1 during the prefill
    v = diff_of_means(X, y, src=0, tgt=1)
    plain, ids0 = vlens.steered_generate(vlm, batch, v, layer=1, k=0.0, max_new_tokens=3, return_ids=True)
    texts, ids = vlens.steered_generate(vlm, batch, v, layer=1, k=8.0, max_new_tokens=3, return_ids=True)
    with torch.no_grad(), vlm.generate(batch, max_new_tokens=3, do_sample=False) as tracer:
        ref = tracer.result.save()
    assert len(texts) == 4 and torch.equal(ids0, ref) and ids.shape == ref.shape
    # SAE: per-token image + caption activations, a short train, an SAE-Lens export that loads back
    tokens = vlens.harvest(vlm, data, layers=[2], tokens="image+answer", captions=True, batch_size=6,
                           out=tmp_path / "tokens", progress=False)
    sae = vs.train(tokens, "paper", layer=2, d_sae=4 * vlm.d_model, steps=20, batch_size=64, progress=False,
                   model_name=vlm.name, hook_name=vlm.hook_name(2))
    assert sae.modality.n_image > 0 and sae.modality.n_text > 0
    path = vs.export(sae, tmp_path / "sae")
    back = vs.load(path)
    assert torch.equal(back.W_enc, sae.W_enc) and back.cfg.metadata.hook_name == "blocks.2.hook_resid_pre"


@pytest.fixture(scope="module")
def tiny_sizes(vlm):
    """The `vlens.tiny` keywords `vlm` was built with (a module listing other families overrides this fixture)."""
    return FAMILIES[vlm.family.name]


def test_family_is_named_and_tiny_builds_are_deterministic(vlm, tiny_sizes):
    fam = vlm.family
    assert vlens.families.get(fam.name) is fam and vlens.families.of_model(vlm._module) is fam
    again = vlens.tiny(family=fam.name, words=WORDS, seed=1, **tiny_sizes)
    for (n1, p1), (n2, p2) in zip(vlm._module.named_parameters(), again._module.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1


# -- LLaVA-1.5 -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(336, 336), (480, 640), (640, 480), (5, 7), (2000, 300)])
def test_llava_real_settings_give_576_tokens(size):
    from vlens.families.llava import image_geometry

    g = image_geometry(size, tile_size=336, patch_size=14)
    assert g.n_tokens == g.count("base") == 576 and g.grid == 24
    assert [int(g.row[25]), int(g.col[25])] == [1, 1]


def test_llava_packing_and_padded_variant(images):
    """Token i of an image is patch (row, col) of its projector output; `pad=True` boxes tell the truth too."""
    vlm = vlens.tiny(family="llava", words=WORDS, seed=1, vision_layers=0, pad=True)
    batch = vlm.prepare(PROMPTS, images)
    with torch.no_grad(), vlm.trace(batch):
        proj = vlm.read("projector").save()
        h0 = vlm.resid_pre(0).save()
    g = vlm.config.vision_config.image_size // vlm.config.vision_config.patch_size
    for span in batch.layout.images:
        geo = span.geometry
        want = proj[span.image, geo.row * g + geo.col]
        torch.testing.assert_close(h0[span.batch_index, span.start : span.end], want)
    check_pixel_boxes(vlm, images)


# -- LLaVA-OneVision -----------------------------------------------------------------------------------------------


def test_onevision_counts_match_the_processor_for_any_grid():
    """Our token count equals the processor's own formula, tiny and real settings, with and without shrinking."""
    from vlens.families.llava_onevision import PINPOINTS, image_geometry, pinpoints, tiny_processor

    proc = tiny_processor(image_size=48, patch_size=12, image_grid_pinpoints=pinpoints(48, 3))
    cases = [(proc, 48, 12, 4, [5, 17, 48, 50, 97, 200, 333])]
    real = tiny_processor(image_size=384, patch_size=14, image_grid_pinpoints=PINPOINTS,
                          vision_aspect_ratio="anyres_max_9")
    cases.append((real, 384, 14, 9, [100, 384, 500, 1000, 2400]))
    shrunk = 0
    for p, tile, patch, budget, sides in cases:
        for h in sides:
            for w in sides:
                geo = image_geometry((h, w), pinpoints=p.image_processor.image_grid_pinpoints, tile_size=tile,
                                     patch_size=patch, max_tiles=budget)
                assert geo.n_tokens == p._get_number_of_features(h, w, tile, tile), (tile, h, w)
                shrunk += geo.count("highres") < geo.tiles[0] * geo.tiles[1] * (tile // patch) ** 2 // 2
    assert shrunk > 0


@pytest.fixture(scope="module")
def onevision():
    return vlens.tiny(family="llava-onevision", words=WORDS, seed=1, vision_layers=0)


def test_onevision_packing_matches_the_model(onevision, images):
    """Base and canvas tokens carry the projector feature of their (tile, row, col); shrunk canvases are the
    model's bilinear shrink of the unpadded canvas that the LLaVA-Next geometry describes."""
    from vlens.families.llava_next import image_geometry as canvas_geometry

    vlm = onevision
    batch = vlm.prepare(PROMPTS, images)
    with torch.no_grad(), vlm.trace(batch):
        proj = vlm.read("projector").save()
        h0 = vlm.resid_pre(0).save()
    cfg = vlm.config
    tile, g = cfg.vision_config.image_size, cfg.vision_config.image_size // cfg.vision_config.patch_size
    newline = vlm._module.model.image_newline.detach()
    # The processor nests images by prompt: a prompt with several images is the model's multi-image mode.
    multi = [n != 1 for n in batch.inputs["batch_num_images"].tolist() for _ in range(n)]
    assert multi == [False, False, True, True, False]
    offset, n_shrunk = 0, 0
    for span, several in zip(batch.layout.images, multi):
        geo = span.geometry
        got = h0[span.batch_index, span.start : span.end]
        n_tiles = 1 if several else 1 + geo.tiles[0] * geo.tiles[1]
        feats = proj[offset : offset + n_tiles]
        offset += n_tiles
        torch.testing.assert_close(got[geo.kind == NEWLINE], newline.expand(geo.count("newline"), -1))
        if several:  # the base tile, then one newline
            assert geo.count("newline") == 1 and geo.kind[-1] == NEWLINE
            torch.testing.assert_close(got[:-1], feats[0, geo.row[:-1] * g + geo.col[:-1]])
            continue
        full = canvas_geometry(geo.size, pinpoints=cfg.image_grid_pinpoints, tile_size=tile,
                               patch_size=cfg.vision_config.patch_size)
        n_rows = full.count("newline")
        hi = full.kind == 1
        canvas = feats[full.tile[hi], full.row[hi] * g + full.col[hi]].view(n_rows, -1, feats.shape[-1])
        if full.n_tokens == geo.n_tokens:  # no shrinking: every token is its own patch
            real = geo.kind != NEWLINE
            torch.testing.assert_close(got[real], feats[geo.tile[real], geo.row[real] * g + geo.col[real]])
            continue
        n_shrunk += 1
        n_base = geo.count("base")
        torch.testing.assert_close(got[:n_base], feats[0])
        oh = geo.count("newline")
        small = torch.nn.functional.interpolate(canvas.permute(2, 0, 1)[None], [oh, geo.count("highres") // oh],
                                                mode="bilinear")[0].permute(1, 2, 0).reshape(-1, feats.shape[-1])
        torch.testing.assert_close(got[n_base:][geo.kind[n_base:] != NEWLINE], small)
    assert n_shrunk >= 1  # the large image was shrunk


def test_onevision_prompt_with_several_images_gets_base_tiles_and_one_newline(onevision, images):
    """Several images in one prompt: each is padded to a square and gets its base tile and one newline."""
    vlm = onevision
    batch = vlm.prepare(["<image> <image>\nCompare.", "<image>\nAnd this?"], [images[1], images[4], images[4]])
    assert batch.inputs["batch_num_images"].tolist() == [2, 1]
    geos = [s.geometry for s in batch.layout.images]
    assert [(g.count("base"), g.count("highres"), g.count("newline")) for g in geos[:2]] == [(16, 0, 1)] * 2
    assert geos[2].count("highres") > 0  # alone in its prompt: anyres
    # The wide image is padded to a square: its top and bottom rows of patches are padding (empty boxes).
    wide = geos[0].box[:16]
    assert ((wide[:, 3] - wide[:, 1]) == 0).sum() >= 4
    check_pixel_boxes(vlm, [images[1], images[4], images[4]], ["<image> <image>\nCompare.", "<image>\nAnd this?"])


def test_onevision_real_canvas_boxes_are_exact_patches():
    from vlens.families.llava_onevision import PINPOINTS, image_geometry

    g = image_geometry((384, 384), pinpoints=PINPOINTS, tile_size=384, patch_size=14)
    for kind in (0, 1):  # base tile and the one canvas tile: the image is the canvas, pixel for pixel
        sel = g.kind == kind
        col, row = g.col[sel].float(), g.row[sel].float()
        want = torch.stack([14 * col, 14 * row, 14 * col + 14, 14 * row + 14], -1)
        torch.testing.assert_close(g.box[sel], want)
