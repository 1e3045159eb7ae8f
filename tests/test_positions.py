"""Token geometry agrees exactly with the processor and the model."""

from __future__ import annotations

import itertools

import pytest
import torch
from PIL import Image

import vlens
from vlens.families.llava_next import image_geometry
from vlens.tokens import BASE, HIGHRES, NEWLINE

REAL_PINS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

# (width, height): square, wide, tall, tiny, multi-tile, extreme aspect ratios.
SIZES = [(32, 32), (64, 20), (20, 64), (7, 5), (64, 64), (96, 40), (33, 90), (120, 31)]


def images(sizes, colour=(200, 30, 30)):
    return [Image.new("RGB", s, colour) for s in sizes]


@pytest.mark.parametrize("size,expected", [((336, 336), 1176), ((224, 224), 1176), ((672, 672), 2928),
                                           ((480, 640), 2340), ((768, 1024), 2340)])
def test_real_model_token_counts(size, expected):
    g = image_geometry(size, pinpoints=REAL_PINS, tile_size=336, patch_size=14)
    assert g.n_tokens == expected
    assert g.count("base") == 576


@pytest.mark.parametrize(
    "pins,tile,patch",
    [
        (None, 32, 8),
        ([[32, 32], [32, 96], [96, 32]], 32, 8),
        ([[48, 48], [48, 96], [96, 48], [96, 96], [144, 48]], 48, 12),
        ([[64, 128], [128, 64], [128, 128]], 64, 16),
    ],
)
def test_counts_match_processor_for_any_grid(pins, tile, patch):
    from vlens.families.llava_next import tiny_processor

    proc = tiny_processor(image_size=tile, patch_size=patch, image_grid_pinpoints=pins)
    ip = proc.image_processor
    for w, h in itertools.product([5, 17, 32, 50, 97, 200], repeat=2):
        ours = image_geometry((h, w), pinpoints=ip.image_grid_pinpoints, tile_size=tile, patch_size=patch).n_tokens
        theirs = proc._get_number_of_features(h, w, tile, tile) - 1  # minus CLS, as the processor does
        assert ours == theirs, (w, h)


@pytest.fixture(scope="module")
def mixed(tiny_mistral):
    vlm = tiny_mistral
    batch = vlm.prepare(
        ["<image>\nWhat is shown in this image?", "<image>\nWhat?", "<image> <image>\nAnd these two?",
         "<image>\nA", "<image>\nB", "<image>\nC"],
        images(SIZES[:7]),
        answers=["red", "a blue square", "x", "y", "z", "w"],
    )
    return vlm, batch


def test_image_mask_is_image_token_ids(mixed):
    vlm, batch = mixed
    lay = batch.layout
    assert torch.equal(lay.image, lay.input_ids == vlm.image_token_id)
    assert int(lay.image.sum()) == sum(s.geometry.n_tokens for s in lay.images)
    # Masks partition the sequence.
    parts = lay.image.int() + lay.prompt.int() + lay.answer.int() + lay.bos.int() + lay.pad.int()
    assert torch.equal(parts, torch.ones_like(parts))
    assert torch.equal(lay.text, lay.prompt | lay.answer)


def test_tile_row_col_match_the_models_packing(mixed):
    """Every image token carries exactly the projector feature of its (tile, row, col), or the newline."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    vlm, batch = mixed
    cfg = vlm.config
    with torch.no_grad(), vlm.trace(batch):
        proj = vlm.read("projector").save()
        embeds = vlm.resid_pre(0).save()
    g = cfg.vision_config.image_size // cfg.vision_config.patch_size
    offset = 0
    newline = vlm._module.model.image_newline.detach()
    for span, size in zip(batch.layout.images, batch.inputs["image_sizes"]):
        n_tiles = image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        geo = span.geometry
        got = embeds[span.batch_index, span.start : span.end]
        for i in range(geo.n_tokens):
            if geo.kind[i] == NEWLINE:
                assert torch.allclose(got[i], newline)
            else:
                want = proj[offset + geo.tile[i], geo.row[i] * g + geo.col[i]]
                assert torch.allclose(got[i], want, atol=1e-6), (span.image, i)
        offset += n_tiles


def test_per_image_counts_match_vision_tower(mixed):
    vlm, batch = mixed
    with torch.no_grad():
        out = vlm._module.model.get_image_features(
            batch.inputs["pixel_values"], batch.inputs["image_sizes"], return_dict=True
        ).pooler_output
    assert [len(f) for f in out] == [s.geometry.n_tokens for s in batch.layout.images]


def test_pixel_boxes_cover_the_image(mixed):
    _, batch = mixed
    for span in batch.layout.images:
        g = span.geometry
        h, w = g.size
        base = g.box[g.kind == BASE]
        # The base tile partitions the whole image.
        area = ((base[:, 2] - base[:, 0]) * (base[:, 3] - base[:, 1])).sum()
        assert area == pytest.approx(w * h, rel=1e-4)
        hi = g.box[g.kind == HIGHRES]
        assert (hi[:, 0] >= 0).all() and (hi[:, 2] <= w + 1e-4).all()
        assert (hi[:, 1] >= 0).all() and (hi[:, 3] <= h + 1e-4).all()
        # High-res patches reach (close to) every edge of the image.
        assert hi[:, 0].min() < w / 4 and hi[:, 2].max() > 3 * w / 4
        assert hi[:, 1].min() < h / 4 and hi[:, 3].max() > 3 * h / 4
        assert torch.isnan(g.box[g.kind == NEWLINE]).all()


def test_newlines_close_each_highres_row(mixed):
    _, batch = mixed
    for span in batch.layout.images:
        kind = span.geometry.kind
        n_rows = int((kind == NEWLINE).sum())
        hi = int((kind == HIGHRES).sum())
        assert hi % n_rows == 0
        per_row = hi // n_rows
        body = kind[span.geometry.count("base") :].view(n_rows, per_row + 1)
        assert (body[:, -1] == NEWLINE).all() and (body[:, :-1] == HIGHRES).all()


def test_select_and_tables(mixed):
    _, batch = mixed
    lay = batch.layout
    assert torch.equal(lay.select("image+answer"), lay.image | lay.answer)
    assert torch.equal(lay.select("all"), ~lay.pad)
    union = lay.select("base") | lay.select("highres") | lay.select("newline")
    assert torch.equal(union, lay.image)
    table = lay.image_token_table()
    assert len(table["kind"]) == int(lay.image.sum())
    assert [int(n) for n in lay.answer.sum(1)] == [1, 3, 1, 1, 1, 1]
    assert int(lay.bos.sum()) == len(batch)
    with pytest.raises(ValueError, match="unknown token selection"):
        lay.select("pixels")
    with pytest.raises(ValueError, match="bool mask of the batch"):
        lay.select(torch.ones(2, 2, dtype=torch.bool))
    assert "base" in lay.summary()


def test_two_images_in_one_prompt_are_split(mixed):
    _, batch = mixed
    spans = [s for s in batch.layout.images if s.batch_index == 2]
    assert len(spans) == 2 and spans[0].end <= spans[1].start


def test_multi_tile_grid_with_other_patch_size():
    vlm = vlens.tiny(image_size=48, patch_size=12, image_grid_pinpoints=[[48, 48], [48, 144], [144, 48], [96, 96]])
    batch = vlm.prepare(["<image>\nhi"] * 3, images([(150, 40), (40, 150), (90, 100)]))
    with torch.no_grad(), vlm.trace(batch):
        logits = vlm.read("logits").save()
    assert logits.shape[:2] == batch.layout.shape
    assert [s.geometry.tiles for s in batch.layout.images] == [(1, 3), (3, 1), (2, 2)]


def test_modes_are_converted_not_rejected(tiny_mistral):
    imgs = [Image.new("L", (20, 30), 128), Image.new("RGBA", (30, 20), (10, 20, 30, 0)), Image.new("P", (16, 16))]
    batch = tiny_mistral.prepare(["<image>\nx"] * 3, imgs)
    assert batch.inputs["pixel_values"].shape[0] == 3


def test_bad_input_errors(tiny_mistral):
    vlm = tiny_mistral
    img = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match="no '<image>' placeholder"):
        vlm.prepare(["What is shown?"], [img])
    with pytest.raises(ValueError, match="2 image\\(s\\) but 1"):
        vlm.prepare(["<image>\nWhat is shown?"], [img, img])
    with pytest.raises(ValueError, match="one answer per prompt"):
        vlm.prepare(["<image>\nx", "<image>\ny"], [img, img], answers=["a"])


def test_text_only_batch(tiny_mistral):
    batch = tiny_mistral.prepare(["Describe the image."], answers=["a red circle"])
    assert "pixel_values" not in batch.inputs
    assert not batch.layout.image.any() and int(batch.layout.answer.sum()) == 3
