"""vlens.data loaders: image folders, HF datasets, ShareGPT4V JSON, the toy set; bad input."""

from __future__ import annotations

import io
import json
import warnings

import pytest
from PIL import Image

from vlens import data as D
from vlens.data import BadImageError, Dataset, ListDataset, Sample


def _png_bytes(mode="RGB", size=(6, 5), color=0) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    for c in ["zebra", "cat", "dog"]:
        (root / c).mkdir(parents=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(root / "cat" / "1.jpg")
    Image.new("L", (8, 6), 128).save(root / "cat" / "2.png")  # grayscale
    Image.new("RGBA", (5, 5), (0, 0, 255, 0)).save(root / "dog" / "a.png")  # fully transparent -> white
    Image.new("P", (4, 4)).save(root / "zebra" / "z.gif")
    (root / "zebra" / "notes.txt").write_text("not an image")
    return root


# -- image folders ---------------------------------------------------------------------------


def test_image_folder_labels_modes_and_ids(folder):
    ds = D.image_folder(folder)
    assert isinstance(ds, Dataset) and len(ds) == 4
    assert ds.class_names == ["cat", "dog", "zebra"]
    assert [s.label for s in ds] == [0, 0, 1, 2]
    assert all(s.image.mode == "RGB" for s in ds)
    assert ds[1].image.getpixel((0, 0)) == (128, 128, 128)
    assert ds[2].image.getpixel((0, 0)) == (255, 255, 255)  # transparent composited on white
    assert ds[0].id == "cat/1.jpg" and ds[0].meta["class"] == "cat"
    assert len(ds[1:3]) == 2 and ds[-1].label == 2


def test_image_folder_options(folder):
    assert len(D.image_folder(folder, per_class=1)) == 3
    ds = D.image_folder(folder, class_names={"cat": "tabby", "dog": "beagle", "zebra": "zebra"})
    assert ds.class_names == ["tabby", "beagle", "zebra"]
    assert D.image_folder(folder, class_names=["a", "b", "c"]).class_names == ["a", "b", "c"]
    with pytest.raises(ValueError, match="3 class folders"):
        D.image_folder(folder, class_names=["a"])


def test_image_folder_bad_layouts(tmp_path, folder):
    (folder / "empty").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*empty has no images"):
        D.image_folder(folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.image_folder(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "x.png")
    with pytest.raises(ValueError, match="no class sub-folders"):
        D.image_folder(tmp_path / "flat")


def test_corrupt_image_is_skipped_counted_and_named(folder):
    bad = folder / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    ds = D.image_folder(folder)
    assert len(ds) == 5  # lazy: found only when read
    with pytest.raises(BadImageError, match="broken.jpg"):
        ds[3]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        samples = list(ds)
    assert len(samples) == 4
    assert len(ds.skipped) == 1 and ds.skipped[0][0].endswith("broken.jpg")
    msgs = [str(x.message) for x in w]
    assert len(msgs) == 1 and "skipped 1 of 5" in msgs[0] and "broken.jpg" in msgs[0]
    # raise mode stops at it, naming the file
    with pytest.raises(BadImageError, match="broken.jpg"):
        list(D.image_folder(folder, on_error="raise"))
    # verify() drops it up front
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(D.image_folder(folder).verify()) == 4
    with pytest.raises(ValueError, match="on_error"):
        D.image_folder(folder, on_error="ignore")


def test_load_image_sources(tmp_path):
    p = tmp_path / "x.png"
    p.write_bytes(_png_bytes("L"))
    for src in [p, str(p), p.read_bytes(), {"bytes": p.read_bytes(), "path": None}, {"bytes": None, "path": str(p)},
                Image.open(p)]:
        im = D.load_image(src)
        assert im.mode == "RGB" and im.size == (6, 5)
    Image.new("I;16", (3, 3), 1000).save(tmp_path / "d.png")
    assert D.load_image(tmp_path / "d.png").mode == "RGB"
    with pytest.raises(BadImageError, match="not found: .*missing.png"):
        D.load_image(tmp_path / "missing.png")


# -- HF datasets ---------------------------------------------------------------------------


@pytest.fixture
def hf_classes():
    import datasets

    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["tench", "goldfish", "shark"]),
                               "extra": datasets.Value("string")})
    rows = {"image": [Image.new("RGB", (4, 4), (i * 40, 0, 0)) for i in range(6)],
            "label": [0, 1, 2, 0, 1, 0], "extra": list("abcdef")}
    return datasets.Dataset.from_dict(rows, features=feats)


def test_from_hf_in_memory(hf_classes):
    ds = D.from_hf(hf_classes)
    assert len(ds) == 6 and ds.class_names == ["tench", "goldfish", "shark"]
    s = ds[1]
    assert s.label == 1 and s.image.mode == "RGB" and s.image.getpixel((0, 0)) == (40, 0, 0)
    assert s.meta == {"extra": "b"} and s.id == 1
    assert [x.label for x in D.from_hf(hf_classes, per_class=1)] == [0, 1, 2]
    assert [x.label for x in D.from_hf(hf_classes, classes=[0])] == [0, 0, 0]
    assert len(D.from_hf(hf_classes, n=4)) == 4
    with pytest.raises(ValueError, match=r"class\(es\) \[7\]"):
        D.from_hf(hf_classes, classes=[7])


def test_from_hf_unknown_column_names_the_columns(hf_classes):
    with pytest.raises(KeyError, match=r"no label column 'fine_label'.*\['image', 'label', 'extra'\]"):
        D.from_hf(hf_classes, label_column="fine_label")
    with pytest.raises(KeyError, match=r"no image column 'img'"):
        D.from_hf(hf_classes, image_column="img")


def test_from_hf_dataset_dict_and_hub_call(hf_classes, monkeypatch):
    import datasets

    dd = datasets.DatasetDict({"validation": hf_classes})
    assert len(D.from_hf(dd, split="validation")) == 6
    with pytest.raises(KeyError, match="validation"):
        D.from_hf(dd, split="train")
    calls = []

    def fake_load_dataset(name, split=None, streaming=False):
        calls.append((name, split, streaming))
        return hf_classes

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = D.from_hf("ILSVRC/imagenet-1k", split="validation", class_names=D.imagenet_class_names()[:3])
    assert calls == [("ILSVRC/imagenet-1k", "validation", False)]
    assert ds.class_names == ["tench", "goldfish", "great white shark"]


def test_from_hf_streaming_takes_n(hf_classes):
    ds = D.from_hf(hf_classes.to_iterable_dataset(), n=3)
    assert len(ds) == 3 and ds.class_names == ["tench", "goldfish", "shark"]
    with pytest.raises(ValueError, match="n="):
        D.from_hf(hf_classes.to_iterable_dataset())


def test_from_hf_skips_corrupt_rows():
    import datasets

    feats = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    hf = datasets.Dataset.from_dict(
        {"image": [{"bytes": _png_bytes(), "path": None}, {"bytes": b"garbage", "path": "bad.png"},
                   {"bytes": _png_bytes("LA"), "path": None}], "label": [0, 1, 2]}, features=feats)
    ds = D.from_hf(hf)
    assert ds.class_names is None
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = list(ds)
    assert [s.label for s in out] == [0, 2]
    assert len(ds.skipped) == 1 and "bad.png" in ds.skipped[0][1]
    assert len(w) == 1 and "skipped 1 of 3" in str(w[0].message)
    with pytest.raises(BadImageError, match="bad.png"):
        list(D.from_hf(hf, on_error="raise"))


def test_hf_captions():
    import datasets

    hf = datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4))] * 2,
                                     "sentences": [["a black square", "dark"], ["a black box"]]})
    ds = D.hf_captions(hf, caption_column="sentences")
    assert [s.caption for s in ds] == ["a black square", "a black box"]
    assert ds[0].label is None and ds.class_names is None
    with pytest.raises(KeyError, match=r"no caption column 'caption'.*\['image', 'sentences'\]"):
        D.hf_captions(hf)


# -- ShareGPT4V ------------------------------------------------------------------------------


def _sharegpt(tmp_path, n=3):
    root = tmp_path / "images"
    (root / "coco").mkdir(parents=True)
    recs = []
    for i in range(n):
        Image.new("RGB", (5, 5), (i, i, i)).save(root / "coco" / f"{i}.jpg")
        recs.append({"id": f"r{i}", "image": f"coco/{i}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"},
            {"from": "gpt", "value": f"caption {i}"}]})
    return root, recs


def test_sharegpt4v_json_and_jsonl(tmp_path):
    root, recs = _sharegpt(tmp_path)
    (tmp_path / "caps.json").write_text(json.dumps(recs))
    ds = D.sharegpt4v(tmp_path / "caps.json", root)
    assert len(ds) == 3 and ds[2].caption == "caption 2" and ds[2].id == "r2"
    assert ds[0].meta["prompt"] == "What is in the picture?" and ds[0].image.mode == "RGB"
    (tmp_path / "caps.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    assert [s.caption for s in D.sharegpt4v(tmp_path / "caps.jsonl", root, n=2)] == ["caption 0", "caption 1"]


def test_sharegpt4v_missing_images_skipped_and_counted(tmp_path):
    root, recs = _sharegpt(tmp_path, n=4)
    (root / "coco" / "1.jpg").unlink()
    recs.append({"id": "no-caption", "image": "coco/0.jpg", "conversations": [{"from": "human", "value": "hi"}]})
    (tmp_path / "caps.json").write_text(json.dumps(recs))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds = D.sharegpt4v(tmp_path / "caps.json", root)
    assert [s.id for s in ds] == ["r0", "r2", "r3"]
    assert len(ds.skipped) == 2 and ds.skipped[0][0].endswith("coco/1.jpg")
    assert len(w) == 1 and "skipped 2" in str(w[0].message) and "1.jpg" in str(w[0].message)
    with pytest.raises(BadImageError, match=r"coco/1.jpg"):
        D.sharegpt4v(tmp_path / "caps.json", root, on_error="raise")
    with pytest.raises(FileNotFoundError):
        D.sharegpt4v(tmp_path / "nope.json", root)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="neither a JSON list nor JSON lines"):
        D.sharegpt4v(tmp_path / "bad.json", root)


# -- class names and the toy set ----------------------------------------------------------------


def test_imagenet_class_names():
    names = D.imagenet_class_names()
    assert len(names) == 1000
    assert names[:3] == ["tench", "goldfish", "great white shark"]
    assert names[207] == "golden retriever" and names[281] == "tabby" and names[954] == "banana"
    assert names[999] == "toilet tissue" and all(n and n == n.strip() for n in names)


def test_toy_loader_and_list_dataset():
    ds = D.toy("heldout", n=20)
    assert len(ds) == 20 and len(ds.class_names) == 20
    assert isinstance(ds[0], Sample) and ds[0].meta["split"] == "heldout"
    lst = ListDataset(list(ds)[:3], class_names=ds.class_names)
    assert [s.id for s in lst] == [s.id for s in list(ds)[:3]]
