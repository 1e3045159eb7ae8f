"""Qwen2.5-VL, Qwen3-VL and Gemma 3: the shared family checks of test_families.py, plus what is theirs.

The shared checks (sites equal HF hidden_states, image mask and per-image token counts equal what the model
emits for mixed image sizes in one batch, pixel boxes that tell the truth, the pipeline, deterministic builds) are
the functions of `test_families.py`, run here with this file's `vlm` fixture (builds with a patch-local vision
feature: `vision_layers=0`). The family-specific checks below use the default builds, whose vision towers mix
patches (Qwen2.5-VL's windowed attention, Qwen3-VL's DeepStack): left padding against each row alone (M-RoPE,
Gemma's bidirectional image attention and sliding windows), the family's extra inputs against the real
processor's own, DeepStack's injection sites, Qwen2.5-VL's window order at the vision sites, chat-template shape,
and Gemma's pan-and-scan refusal.
"""

from __future__ import annotations

import pytest
import torch

import test_families as shared
import vlens
from vlens.errors import InputError
from vlens.families.qwen_vl import smart_resize
from vlens.prompts import QUESTION

#: family name -> `vlens.tiny` keywords of a build with a patch-local vision feature (no vision layer).
FAMILIES: dict[str, dict] = {
    "qwen2.5-vl": dict(vision_layers=0),  # patch embedding, then the merger over each 2×2 block
    "qwen3-vl": dict(vision_layers=0),  # patch embedding + interpolated position embedding, then the merger
    "gemma3": dict(vision_layers=0),  # SigLIP patch embedding + position + post-norm, then the pooling projector
}
WORDS = shared.WORDS
noise = shared.noise
images = shared.images  # the module fixture: square, wide, tall, tiny and large images

# The shared checks, collected here with this module's `vlm` fixture.
test_every_site_reads_and_residuals_equal_hidden_states = shared.test_every_site_reads_and_residuals_equal_hidden_states
test_image_mask_and_counts_match_the_model = shared.test_image_mask_and_counts_match_the_model
test_pixel_boxes_tell_the_truth = shared.test_pixel_boxes_tell_the_truth
test_pipeline_read_harvest_probe_steer_sae = shared.test_pipeline_read_harvest_probe_steer_sae


@pytest.fixture(scope="module", params=list(FAMILIES))
def vlm(request):
    return vlens.tiny(family=request.param, words=WORDS, seed=1, **FAMILIES[request.param])


def test_family_is_named_and_tiny_builds_are_deterministic(vlm):
    fam = vlm.family
    assert vlens.families.get(fam.name) is fam and vlens.families.of_model(vlm._module) is fam
    again = vlens.tiny(family=fam.name, words=WORDS, seed=1, **FAMILIES[fam.name])
    for (n1, p1), (n2, p2) in zip(vlm._module.named_parameters(), again._module.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1


@pytest.fixture(scope="module", params=list(FAMILIES))
def mixing(request):
    """The default tiny build: vision layers that mix patches (windows, DeepStack)."""
    return vlens.tiny(family=request.param, words=WORDS, seed=2)


def _read(vlm, batch, sites=("resid_post.0", "resid_pre.2", "final_norm", "logits")):
    out = {}
    with torch.no_grad(), vlm.trace(batch):
        for s in sites:
            out[s] = vlm.read(s).save()
    return out


# -- left padding --------------------------------------------------------------------------------------------------


def test_left_padded_rows_compute_what_they_compute_alone(mixing):
    """Two images of different sizes and prompts of different lengths: each row of the padded batch equals the
    row run alone (M-RoPE positions for Qwen, bidirectional image attention and sliding windows for Gemma)."""
    ims = [noise(200, 90, 1), noise(30, 44, 2)]
    prompts = [QUESTION, "<image>\nWhat?"]
    answers = ["a red square", "blue"]
    batch = mixing.prepare(prompts, ims, answers=answers)
    assert batch.layout.pad.any(1).tolist().count(True) == 1  # one row is left-padded
    both = _read(mixing, batch)
    for i in range(2):
        alone = _read(mixing, mixing.prepare([prompts[i]], [ims[i]], answers=[answers[i]]))
        n = alone["logits"].shape[1]
        for site, v in both.items():
            torch.testing.assert_close(v[i, -n:], alone[site][0], rtol=1e-4, atol=1e-5, msg=f"row {i} {site}")


def test_extra_inputs_equal_the_processors_own_and_matter(mixing):
    """`prepare` rebuilds the batch (answers, padding); the family's extra input (Qwen: mm_token_type_ids for
    M-RoPE; Gemma: token_type_ids for image attention) equals what the real processor emits, and the model
    uses it: without it the image tokens compute something else."""
    key = {"gemma3": "token_type_ids"}.get(mixing.family.name, "mm_token_type_ids")
    im = noise(90, 60, 3)
    batch = mixing.prepare([QUESTION], [im])
    text = mixing.family.render(mixing.processor, QUESTION)
    enc = mixing.processor(text=[text], images=[[im]], return_tensors="pt", padding=True)
    assert set(enc) - {"num_crops"} == set(batch.inputs)
    for k, v in batch.inputs.items():
        assert torch.equal(v, enc[k].to(v.dtype)), k
    without = vlens.tokens.Batch({k: v for k, v in batch.inputs.items() if k != key}, batch.layout)
    if mixing.family.name == "qwen3-vl":  # Qwen3-VL refuses to run without it
        with pytest.raises(ValueError, match="mm_token_type_ids"):
            _read(mixing, without, ["resid_post.1"])
        return
    full = _read(mixing, batch, ["resid_post.1"])["resid_post.1"]
    bare = _read(mixing, without, ["resid_post.1"])["resid_post.1"]
    assert not torch.allclose(full[batch.layout.image], bare[batch.layout.image], atol=1e-4)


# -- family-specific geometry and sites -----------------------------------------------------------------------------


def test_image_runs_sit_between_the_familys_markers(mixing):
    ims = [noise(64, 20, 4), noise(20, 64, 5), noise(7, 5, 6)]
    batch = mixing.prepare(["<image> <image>\nTwo?", "<image>\nOne?"], ims)
    tok = mixing.tokenizer
    before, after = (("<start_of_image>", "<end_of_image>") if mixing.family.name == "gemma3"
                     else ("<|vision_start|>", "<|vision_end|>"))
    ids = batch.layout.input_ids
    for span in batch.layout.images:
        assert tok.convert_ids_to_tokens(int(ids[span.batch_index, span.start - 1])) == before
        assert tok.convert_ids_to_tokens(int(ids[span.batch_index, span.end])) == after
    # one BOS at most (Gemma's template writes <bos> and its tokenizer adds one: prepare keeps one)
    assert int((ids == tok.bos_token_id).sum(1).max()) <= 1 if tok.bos_token_id is not None else True


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_qwen_grid_follows_smart_resize(family):
    vlm = vlens.tiny(family=family, vision_layers=0, n_layers=1)
    ip = vlm.processor.image_processor
    factor = ip.patch_size * ip.merge_size
    ims = [noise(w, h, i) for i, (w, h) in enumerate([(300, 40), (40, 300), (10, 10), (500, 500), (97, 61)])]
    batch = vlm.prepare(["<image>"] * len(ims), ims)
    for span, im in zip(batch.layout.images, ims):
        g = span.geometry
        rh, rw = smart_resize(im.height, im.width, factor, ip.size["shortest_edge"], ip.size["longest_edge"])
        assert g.canvas == (rh, rw) and g.n_tokens == (rh // factor) * (rw // factor)
        assert g.row.max() + 1 == rh // factor and g.col.max() + 1 == rw // factor == g.grid


def test_qwen3_deepstack_is_added_between_resid_post_and_the_next_resid_pre():
    vlm = vlens.tiny(family="qwen3-vl", words=WORDS, seed=3, vision_layers=3)  # DeepStack from blocks 0 and 1
    k = len(vlm.config.vision_config.deepstack_visual_indexes)
    assert k == 2
    batch = vlm.prepare([QUESTION, "<image>\nWhat?"], [noise(120, 70, 7), noise(40, 40, 8)], answers=["red", "a"])
    sites = [s for s in vlm.sites if s.startswith("resid")]
    got = _read(vlm, batch, sites)
    hs = shared.hf_forward(vlm, batch).hidden_states
    keys = {key: batch.inputs[key] for key in ("pixel_values", "image_grid_thw")}
    with torch.no_grad():
        deep = vlm._module.model.get_image_features(**keys, return_dict=True).deepstack_features
    img = batch.layout.image
    for L in range(vlm.n_layers - 1):
        assert torch.equal(got[f"resid_post.{L}"], hs[L + 1]), L  # HF records the layer output, before DeepStack
        step = got[f"resid_pre.{L + 1}"] - got[f"resid_post.{L}"]
        assert not step[~img].any(), L
        if L < k:  # the next layer's input carries the DeepStack feature of vision block indexes[L], image tokens only
            torch.testing.assert_close(step[img], torch.cat(deep[L]), rtol=1e-4, atol=1e-5)
        else:
            assert not step.any(), L


def test_qwen25_vision_sites_are_in_window_order():
    """Qwen2.5-VL's vision blocks and merger see the patches of all images flattened, regrouped into attention
    windows; the model restores the row-major token order after the merger. `projector` rows are in window order."""
    from transformers.vision_utils import get_vision_window_index

    vlm = vlens.tiny(family="qwen2.5-vl", words=WORDS, seed=4)
    batch = vlm.prepare(["<image>", "<image>"], [noise(200, 120, 9), noise(60, 60, 10)])
    got = _read(vlm, batch, ["vision.0", f"vision.{vlm.n_vision_layers - 1}", "projector"])
    grid = batch.inputs["image_grid_thw"]
    vc = vlm.config.vision_config
    window, _ = get_vision_window_index(grid, vc.spatial_merge_size, vc.window_size, vc.patch_size)
    assert not torch.equal(window, torch.arange(len(window)))  # the big image spans several windows
    with torch.no_grad():
        out = vlm._module.model.visual(batch.inputs["pixel_values"], grid_thw=grid, output_hidden_states=True)
    assert got["vision.0"].shape == (int(grid.prod(-1).sum()), vc.hidden_size)
    torch.testing.assert_close(got[f"vision.{vlm.n_vision_layers - 1}"], out.last_hidden_state)
    torch.testing.assert_close(got["projector"][torch.argsort(window)], out.pooler_output)
    h0 = shared.hf_forward(vlm, batch).hidden_states[0]
    torch.testing.assert_close(h0[batch.layout.image], out.pooler_output)  # row-major per image, images in order


def test_gemma3_refuses_pan_and_scan_and_keeps_one_bos():
    from transformers import Gemma3Processor

    vlm = vlens.tiny(family="gemma3", words=WORDS)
    b = vlm.prepare([QUESTION], [noise(64, 16, 11)])
    assert int((b.layout.input_ids == vlm.tokenizer.bos_token_id).sum()) == 1 and b.layout.bos[0].any()
    # pan-and-scan on (a 4:1 image gets 4 crops, each its own run of soft tokens with text between)
    vlm.processor.images_kwargs = {**Gemma3Processor.images_kwargs, "do_pan_and_scan": True,
                                   "pan_and_scan_min_crop_size": 8}
    with pytest.raises(InputError, match="pan-and-scan"):
        vlm.prepare([QUESTION], [noise(64, 16, 11)])


def test_load_an_already_built_pair(mixing):
    again = vlens.load((mixing._module, mixing.processor))
    assert again.family is mixing.family and again.sites == mixing.sites



def test_a_saved_checkpoint_loads_back(mixing, tmp_path):
    """The real path on a directory: Gemma 3 through `vlens.load(dir)`; Qwen through `qwen_vl.load_processor`
    (transformers' AutoProcessor would also build Qwen's video processor, which needs torchvision)."""
    from transformers import AutoModelForImageTextToText

    from vlens.families.qwen_vl import load_processor

    proc = mixing.processor
    mixing._module.save_pretrained(tmp_path)
    if mixing.family.name == "gemma3":
        proc.save_pretrained(tmp_path)
        back = vlens.load(tmp_path)
    else:
        proc.image_processor.save_pretrained(tmp_path)
        proc.tokenizer.save_pretrained(tmp_path)
        (tmp_path / "chat_template.jinja").write_text(proc.chat_template)
        back = vlens.load((AutoModelForImageTextToText.from_pretrained(tmp_path), load_processor(tmp_path)))
        assert type(back.processor) is type(proc)
    args = (["<image>\nWhat is shown?", "<image>\nWhat?"], [noise(90, 40, 12), noise(20, 30, 13)])
    b0, b1 = mixing.prepare(*args), back.prepare(*args)
    for k, v in b0.inputs.items():
        assert torch.equal(v, b1.inputs[k]), k
    torch.testing.assert_close(_read(back, b1, ["logits"])["logits"], _read(mixing, b0, ["logits"])["logits"])
