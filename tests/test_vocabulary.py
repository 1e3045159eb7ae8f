"""Words the tiny tokenizers do not know (issue 28): a warning with the share of unknown tokens and the fix, once,
and tiny builds that learn a data set's words."""

from __future__ import annotations

import re
import warnings

import pytest
from PIL import Image

import vlens
from vlens.data import ListDataset, Sample
from vlens.prepare import UnknownWordsWarning

CAPTION = "A circle coloured red on a light background."


def _unknown_warnings(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if issubclass(w.category, UnknownWordsWarning)]


@pytest.mark.parametrize("family", ["qwen2.5-vl", "gemma3", "llava-next"])
def test_unknown_words_warn_once_with_their_share_and_the_fix(family):
    vlm = vlens.tiny(family=family)
    tok = vlm.processor.tokenizer
    image = Image.new("RGB", (48, 32), "red")

    def twice():
        for _ in range(2):  # a second batch of the same words does not warn again
            vlm.prepare(["<image>\nDescribe the image."], [image], answers=[CAPTION])

    messages = _unknown_warnings(twice)
    assert len(messages) == 1, messages
    # the share, counted here with the tokenizer itself over the batch's text tokens
    batch = vlm.prepare(["<image>\nDescribe the image."], [image], answers=[CAPTION])
    text = batch.layout.input_ids[~batch.layout.pad & ~batch.layout.image].tolist()
    n_unk = text.count(tok.unk_token_id)
    assert tok.convert_ids_to_tokens(tok(CAPTION, add_special_tokens=False)["input_ids"]).count(tok.unk_token) == 5
    assert f"{n_unk} of {len(text)} text tokens ({n_unk / len(text):.0%})" in messages[0]
    assert re.search(r"'coloured'.*'background'", messages[0]) and "words=dataset" in messages[0]


@pytest.mark.parametrize("family", ["qwen2.5-vl", "gemma3"])
def test_a_tiny_build_learns_a_data_sets_class_names_and_captions(family):
    data = ListDataset([Sample(Image.new("RGB", (40, 30), "red"), label=0, caption=CAPTION)],
                       class_names=["red circle", "Hexagon"])
    vlm = vlens.tiny(family=family, words=data)
    tok = vlm.processor.tokenizer
    for text in (CAPTION, "hexagon"):
        pieces = tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])
        assert tok.unk_token not in pieces, pieces
    assert not _unknown_warnings(lambda: vlm.prepare(["<image>\nDescribe."], [data[0].image], answers=[CAPTION]))


def test_the_command_line_tiny_build_learns_the_folders_class_names(tmp_path):
    from vlens.cli import main

    for name in ("hexagon", "rhombus"):
        (tmp_path / "img" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (30 + 10 * i, 24), "blue").save(tmp_path / "img" / name / f"{i}.png")
    argv = ["harvest", "--model", "tiny:qwen2.5-vl", "--data", str(tmp_path / "img"), "--layers", "1",
            "--pool", "mean", "--prompt", "<image>\nhexagon or rhombus?", "--out", str(tmp_path / "s")]
    assert not _unknown_warnings(lambda: main(argv))


def test_an_image_folder_reads_the_caption_beside_each_image(tmp_path):
    (tmp_path / "circle").mkdir()
    Image.new("RGB", (30, 20), "red").save(tmp_path / "circle" / "0.png")
    Image.new("RGB", (30, 20), "red").save(tmp_path / "circle" / "1.png")
    (tmp_path / "circle" / "0.txt").write_text(CAPTION + "\n", encoding="utf-8")
    data = vlens.data.image_folder(tmp_path)
    assert [s.caption for s in data] == [CAPTION, None] == data.captions()
    assert "coloured" in vlens.data.vocabulary(data) and "circle" in vlens.data.vocabulary(data)
