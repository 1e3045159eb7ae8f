"""The toy data generator, the shipped toy model, its training loop and CLI."""

from __future__ import annotations

import io
import re
import time
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch

import vlens
from vlens.toy import data as toydata
from vlens.toy import (
    CAPTION_PROMPT,
    CLASS_NAMES,
    COLOUR_QUESTION,
    QUESTION,
    SHAPE_QUESTION,
    class_pairs,
    load_toy,
    toy_dataset,
    two_choice_prompt,
)
from vlens.toy.train import TASKS, ToyBatches, TrainConfig, all_examples, step_examples, task_example, train


@pytest.fixture(scope="module")
def toy_vlm():
    return load_toy()


# -- generator -------------------------------------------------------------------------


def test_generator_is_deterministic_and_random_access():
    a, b = toy_dataset("train", n=30, seed=3), toy_dataset("train", n=30, seed=3)
    for i in (0, 7, 29):
        assert a[i].image.tobytes() == b[i].image.tobytes()
        assert a[i].caption == b[i].caption and a[i].meta == b[i].meta
    # out of order gives the same sample
    assert toy_dataset("train", n=30, seed=3)[29].image.tobytes() == a[29].image.tobytes()
    # another seed gives other images
    c = toy_dataset("train", n=30, seed=4)
    assert all(c[i].image.tobytes() != a[i].image.tobytes() for i in range(5))


def test_splits_are_disjoint():
    train = {toydata.image_hash(s.image) for s in toy_dataset("train", n=200)}
    held = {toydata.image_hash(s.image) for s in toy_dataset("heldout", n=200)}
    assert len(train) == 200 and len(held) == 200
    assert not train & held
    with pytest.raises(ValueError, match="split must be one of"):
        toy_dataset("test")


def test_classes_and_balance():
    assert len(CLASS_NAMES) >= 20 and len(set(CLASS_NAMES)) == len(CLASS_NAMES)
    ds = toy_dataset("heldout", n=100)
    counts = np.bincount([s.label for s in ds], minlength=len(CLASS_NAMES))
    assert (counts == 100 // len(CLASS_NAMES)).all()
    for s in ds:
        assert CLASS_NAMES[s.label] == f"{s.meta['colour']} {s.meta['shape']}"
        assert s.image.mode == "RGB" and s.image.size == (64, 64)


def test_captions_describe_the_image():
    for s in toy_dataset("train", n=60):
        m = s.meta
        assert s.caption == f"a {m['size']} {m['colour']} {m['shape']} {m['position']} on a {m['background']} background"
        assert m["size"] == ("large" if 2 * m["r"] >= toydata.SIZE_SPLIT else "small")
        assert m["position"] == toydata.position_words(m["cx"], m["cy"])
        # the pixels at the shape's centre have the shape's colour; the corner has the background's
        arr = np.asarray(s.image, dtype=float)
        cy, cx = int(m["cy"] * 64), int(m["cx"] * 64)
        centre = arr[cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3).mean(0)
        assert np.abs(centre - np.array(m["rgb"])).max() < 30, (s.caption, centre, m["rgb"])
        assert (np.median(arr.mean(-1)) < 128) == (m["background"] == "dark")  # most pixels are background
        # the colour is the nearest named colour to the shape's pixels
        named = {c: np.array(v) for c, v in toydata.COLOURS.items()}
        assert min(named, key=lambda c: np.abs(named[c] - centre).sum()) == m["colour"]


def test_prompts_and_pairs():
    assert two_choice_prompt("red circle", "blue square") == (
        '<image>\nReply either "red circle" or "blue square" in lowercase depending on what is shown in the image. '
        "Do not output any other text."
    )
    assert QUESTION == "<image>\nWhat is shown in this image?"  # the paper's prompts carry their placeholder
    for kind, check in [("colour", lambda a, b: a[1] == b[1] and a[0] != b[0]),
                        ("shape", lambda a, b: a[0] == b[0] and a[1] != b[1])]:
        pairs = class_pairs(kind)
        assert pairs and all(check(a.split(), b.split()) for a, b in pairs)
    assert len(class_pairs()) == len(CLASS_NAMES) * (len(CLASS_NAMES) - 1)
    with pytest.raises(ValueError):
        class_pairs("size")


def test_toy_vocabulary_covers_every_prompt_and_answer(toy_vlm):
    tok = toy_vlm.tokenizer
    prompts = [QUESTION, CAPTION_PROMPT, COLOUR_QUESTION, SHAPE_QUESTION, two_choice_prompt(*class_pairs()[0])]
    texts = [p.replace("<image>\n", "") for p in prompts]
    texts += [s.caption for s in toy_dataset("train", n=40)] + CLASS_NAMES
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, t
        assert tok.decode(ids).replace(" ", "") == t.lower().replace(" ", ""), t


# -- training data ----------------------------------------------------------------------


def test_task_examples():
    rng = np.random.default_rng(0)
    s = toy_dataset("train", n=5)[4]
    name = CLASS_NAMES[s.label]
    assert task_example("question", s.meta, s.label, rng) == (QUESTION, name)
    assert task_example("caption", s.meta, s.label, rng) == (CAPTION_PROMPT, s.caption)
    assert task_example("colour", s.meta, s.label, rng)[1] == s.meta["colour"]
    assert task_example("shape", s.meta, s.label, rng)[1] == s.meta["shape"]
    for _ in range(20):
        prompt, ans = task_example("two_choice", s.meta, s.label, rng)
        src, tgt = re.findall(r'"([^"]+)"', prompt)
        assert ans == name and name in (src, tgt) and src != tgt
    assert set(TASKS) == {"question", "caption", "two_choice", "colour", "shape"}


def test_training_batches_match_prepare(toy_vlm):
    """The cached fixed-length rows are exactly what `VLM.prepare` builds, left-padded further."""
    samples = list(toy_dataset("train", n=8))
    data = ToyBatches(toy_vlm.processor, toy_vlm.config, samples, progress=False)
    cfg = TrainConfig(batch_size=6, seed=1)
    idx, ex = step_examples(cfg, 5, samples)
    assert (idx, ex) == step_examples(cfg, 5, samples)  # deterministic per step
    inputs, answer = data.batch(idx, ex)
    ref = toy_vlm.prepare([p for p, _ in ex], [samples[i].image for i in idx], answers=[a for _, a in ex], eos=True)
    S = ref.layout.shape[1]
    assert inputs["input_ids"].shape[1] >= S
    assert torch.equal(inputs["input_ids"][:, -S:], ref.inputs["input_ids"])
    assert torch.equal(inputs["attention_mask"][:, -S:], ref.inputs["attention_mask"])
    assert not inputs["attention_mask"][:, :-S].any()
    assert torch.equal(answer[:, -S:], ref.layout.answer)
    assert torch.equal(inputs["pixel_values"], ref.inputs["pixel_values"])
    # the fixed length covers every example the task mix can produce
    data.warm(all_examples(samples))
    assert data.seq_len == max(len(ids) for ids, _ in data._cache.values())


def test_training_resumes_exactly(tmp_path, monkeypatch):
    """Interrupt after 2 of 4 steps, rerun: the weights equal those of an uninterrupted run."""
    import vlens.toy.train as T

    cfg = TrainConfig(steps=4, batch_size=4, n_images=20, save_every=100, seed=0, threads=1, vision_pretrain_steps=3)
    small = T.ToyArch(n_layers=1, d_mlp=64)
    full = train(tmp_path / "full", cfg, small, eval_n=0, progress=False)
    real = T.step_examples

    def interrupt(cfg_, step, samples):
        if step == 2:
            raise KeyboardInterrupt
        return real(cfg_, step, samples)

    monkeypatch.setattr(T, "step_examples", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "resumed", cfg, small, eval_n=0, progress=False)
    assert torch.load(tmp_path / "resumed" / "state.pt", weights_only=False)["step"] == 2
    monkeypatch.setattr(T, "step_examples", real)
    train(tmp_path / "resumed", cfg, small, eval_n=0, progress=False)
    a = load_toy(path=tmp_path / "full" / "checkpoint")._module.state_dict()
    b = load_toy(path=tmp_path / "resumed" / "checkpoint")._module.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert full["steps"] == 4
    # other settings refuse to resume into the same folder
    with pytest.raises(ValueError, match="other settings"):
        train(tmp_path / "resumed", TrainConfig(steps=4, batch_size=4, n_images=20, lr=1e-4, vision_pretrain_steps=3),
              small, eval_n=0, progress=False)


# -- the shipped model --------------------------------------------------------------------


def test_shipped_checkpoint_loads_fast_and_small():
    from vlens.toy.model import CHECKPOINT_DIR

    load_toy()  # warm the imports of the model classes
    t = time.perf_counter()
    vlm = vlens.load("toy")
    assert time.perf_counter() - t < 2.0
    assert vlm.name == "toy" and vlm.n_layers >= 4 and vlm.config.text_config.model_type == "mistral"
    size = sum(f.stat().st_size for f in CHECKPOINT_DIR.iterdir())
    assert size < 8 * 2**20
    assert not vlm._module.training


def test_saved_processor_round_trips(toy_vlm):
    """The processor files shipped with the checkpoint load with plain transformers and agree with the code-built one."""
    from transformers import LlavaNextProcessor

    from vlens.toy.model import CHECKPOINT_DIR

    saved = LlavaNextProcessor.from_pretrained(CHECKPOINT_DIR)
    ours = toy_vlm.processor
    text = "[INST] <image>\nWhat is shown in this image? [/INST] red circle"
    assert saved.tokenizer(text)["input_ids"] == ours.tokenizer(text)["input_ids"]
    assert saved.chat_template == ours.chat_template
    im = toy_dataset("heldout", n=1)[0].image
    a, b = saved(text=[text], images=[im], return_tensors="pt"), ours(text=[text], images=[im], return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])


def test_shipped_model_sees(toy_vlm):
    """>= 95% exact "<colour> <shape>" answers on 100 held-out images."""
    from vlens.toy import evaluate

    assert evaluate(toy_vlm, n=100, progress=False) >= 0.95


def test_shipped_model_generates_answers(toy_vlm):
    """Greedy generation through nnsight says the class; the captioning prompt names colour and shape."""
    ds = toy_dataset("heldout", n=40)
    samples = [ds[i] for i in range(0, 40, 4)]
    prompts = [QUESTION] * len(samples) + [CAPTION_PROMPT] * len(samples)
    batch = toy_vlm.prepare(prompts, [s.image for s in samples] * 2)
    with torch.no_grad(), toy_vlm.generate(batch, max_new_tokens=14, do_sample=False) as tracer:
        ids = tracer.result.save()
    out = toy_vlm.decode(ids, batch)
    n = len(samples)
    assert sum(o == CLASS_NAMES[s.label] for o, s in zip(out[:n], samples)) >= n - 1
    assert sum(f"{s.meta['colour']} {s.meta['shape']}" in o for o, s in zip(out[n:], samples)) >= n - 1


def test_shipped_model_answers_two_choice(toy_vlm):
    ds = toy_dataset("heldout", n=20)
    prompts, images, want = [], [], []
    for s, (a, b) in zip(ds, class_pairs("colour")[::4]):
        name = CLASS_NAMES[s.label]
        other = b if a == name else a if b == name else b
        src, tgt = (name, other) if s.label % 2 else (other, name)
        prompts.append(two_choice_prompt(src, tgt))
        images.append(s.image)
        want.append(name)
    batch = toy_vlm.prepare(prompts, images)
    with torch.no_grad(), toy_vlm.generate(batch, max_new_tokens=3, do_sample=False) as tracer:
        ids = tracer.result.save()
    out = toy_vlm.decode(ids, batch)
    assert sum(o == w for o, w in zip(out, want)) >= 0.9 * len(want)


# -- slow: retrain from scratch -----------------------------------------------------------------


@pytest.mark.slow
def test_retrain_from_scratch_reaches_95_percent_in_10_minutes(tmp_path):
    t = time.time()
    rec = train(tmp_path, TrainConfig(), eval_n=500, progress=False)
    assert rec["accuracy"] >= 0.95
    assert time.time() - t < 600, f"training took {time.time() - t:.0f} s"


def test_docs_sample_table_matches_the_generator():
    from pathlib import Path

    from vlens.toy.samples import samples_table

    page = Path(__file__).parents[1] / "docs" / "toy.md"
    text = page.read_text()
    for row in samples_table().splitlines()[2:]:
        assert row in text, f"docs/toy.md is stale; regenerate with `vlens toy samples`: {row}"
        png = page.parent / row.split("(")[1].split(")")[0]
        assert png.exists(), png
