"""The demo on a small folder of one's own (issue 28): a split per class and in proportion, refused only when a class
truly has too few images."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from PIL import Image

from vlens.demo import DemoConfig, split_per_class
from vlens.errors import InputError

LABELS = [0] * 10 + [1] * 10 + [2] * 10  # 3 classes × 10 images, the folder of the issue


def _counts(labels, idx):
    return Counter(labels[i] for i in idx)


def test_a_small_folder_is_split_a_quarter_per_class_under_fast_caps():
    cfg = DemoConfig.fast()  # n_train 120, n_heldout 40: the old split sent all 30 images to training
    train, held = split_per_class(LABELS, cfg.n_train, cfg.n_heldout)
    assert _counts(LABELS, held) == {0: 3, 1: 3, 2: 3}  # round(10 / 4)
    assert _counts(LABELS, train) == {0: 7, 1: 7, 2: 7}
    assert not set(train) & set(held)


def test_the_caps_cut_every_class_in_the_same_proportion():
    labels = [0] * 100 + [1] * 60 + [2] * 40
    train, held = split_per_class(labels, n_train=30, n_heldout=10)
    assert len(train) <= 30 and len(held) <= 10
    assert set(_counts(labels, held)) == set(_counts(labels, train)) == {0, 1, 2}
    c = _counts(labels, train)
    assert c[0] > c[1] > c[2]  # proportions kept


def test_the_suggested_n_heldout_now_works():
    train, held = split_per_class(LABELS, n_train=120, n_heldout=12)
    assert len(held) == 9 and len(_counts(LABELS, held)) == 3


def test_a_class_with_one_image_is_refused_by_name_with_what_it_needs():
    with pytest.raises(InputError, match=r"at least 2 images per class.*'lonely': 1"):
        split_per_class([0, 0, 0, 1, 2, 2], 120, 40, names=["circle", "lonely", "square"])


def test_unlabelled_samples_are_left_out():
    train, held = split_per_class([0, 0, None, 1, 1, -1], 120, 40)
    assert sorted(train + held) == [0, 1, 3, 4]


def _folder(tmp_path):
    root = tmp_path / "images"
    records = []
    for c, colour in (("circle", "red"), ("square", "blue"), ("triangle", "green")):
        (root / c).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (200 + 20 * i, 300 - 10 * i), colour).save(root / c / f"{i}.png")
            records.append({"id": f"{c}{i}", "image": f"images/{c}/{i}.png", "conversations": [
                {"from": "human", "value": "<image>\nDescribe the image."},
                {"from": "gpt", "value": f"a {colour} {c} on a light background"}]})
    (tmp_path / "captions.json").write_text(json.dumps(records))
    return root, tmp_path / "captions.json"


@pytest.mark.slow
def test_the_demo_runs_on_a_folder_of_30_images(tmp_path):
    """`vlens demo --fast` on 3 classes × 10 images, a tiny build of another family: every stage runs."""
    from vlens.cli import main

    root, caps = _folder(tmp_path)
    argv = ["demo", "--fast", "--model", "tiny:qwen2.5-vl", "--n-layers", "2", "--data", str(root), "--captions",
            str(caps), "--sae-steps", "60", "--n-sae-samples", "12", "--n-dashboards", "2", "--out",
            str(tmp_path / "d")]
    assert main(argv) == 0
    res = json.loads((tmp_path / "d" / "results.json").read_text())
    assert res["steering"] is not None and (tmp_path / "d" / "report.html").exists()
