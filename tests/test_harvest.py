"""vlens.activations.harvest: correct values, early stop, atomic resumable shards, the store API, SAE-Lens round trip."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import vlens
from vlens.data import Sample
from vlens.activations import ActivationStore, export_sae_lens, harvest, pool_features
from vlens.errors import HarvestError, InputError, SelectionError, SiteError, StoreError
from vlens.tokens import position_ids
from vlens.prompts import QUESTION

WORDS = ["red", "blue", "square", "circle", "large", "small"]
CAPTIONS = ["a red square", "a large blue circle", "blue", "a small red circle on the left", "a square", "red"]
SIZES = [(32, 32), (64, 32), (32, 64), (48, 40), (32, 32), (36, 36), (24, 28)]


@pytest.fixture(scope="module")
def vlm():
    return vlens.tiny(words=WORDS, seed=3)


def make_data(n=7):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        px = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        out.append(Sample(Image.fromarray(px), label=i % 3, caption=CAPTIONS[i % len(CAPTIONS)], id=f"img-{i}"))
    return out


@pytest.fixture(scope="module")
def data():
    return make_data()


def reference(vlm, data, layers, tokens, batch_size, captions, site="resid_pre"):
    """The same tokens from a plain HF forward with output_hidden_states (no nnsight, no hooks)."""
    outs = {L: [] for L in layers}
    for b0 in range(0, len(data), batch_size):
        chunk = data[b0 : b0 + batch_size]
        batch = vlm.prepare([QUESTION] * len(chunk), [s.image for s in chunk],
                            answers=[s.caption for s in chunk] if captions else None)
        mask = batch.layout.select(tokens)
        with torch.no_grad():
            hs = vlm._module(**batch.inputs, position_ids=position_ids(batch.inputs["attention_mask"]),
                             output_hidden_states=True).hidden_states
        for L in layers:
            outs[L].append(hs[L if site == "resid_pre" else L + 1][mask])
    return {L: torch.cat(v) for L, v in outs.items()}


def test_values_equal_hidden_states_and_metadata(vlm, data, tmp_path):
    store = harvest(vlm, data, layers=[2, 0, 3], tokens="image+answer", captions=True, batch_size=3,
                    out=tmp_path / "s", progress=False)
    ref = reference(vlm, data, [0, 2, 3], "image+answer", 3, captions=True)
    assert store.layers == [0, 2, 3] and store.d_model == vlm.d_model and store.complete
    for L in store.layers:
        x = store.activations(L)
        assert x.shape == ref[L].shape
        torch.testing.assert_close(x.tensor(), ref[L], rtol=1e-5, atol=1e-5)
    # metadata: per-token geometry agrees with the layout of each sample processed alone
    m = store.meta
    assert store.sample_ids == [s.id for s in data]
    for i in (0, 3):
        b = vlm.prepare([QUESTION], [data[i].image], answers=[data[i].caption])
        rows = m["sample"] == i
        sel = b.layout.select("image+answer")[0]
        assert m["position"][rows].tolist() == sel.nonzero().flatten().tolist()
        assert m["token_id"][rows].tolist() == b.layout.input_ids[0][sel].tolist()
        img = rows & (m["modality"] == 1)
        t = b.layout.image_token_table()
        for col in ("kind", "tile", "row", "col"):
            assert m[col][img].tolist() == t[col].tolist()
        assert int((rows & (m["role"] == 2)).sum()) == len(vlm.tokenizer(data[i].caption, add_special_tokens=False)["input_ids"])
        assert set(m["label"][rows].tolist()) == {data[i].label}
    # no BOS and no instruction tokens in an image+answer harvest
    assert set(m["role"].unique().tolist()) == {0, 2}


def test_pooled_and_resid_post(vlm, data, tmp_path):
    store = harvest(vlm, data, layers=["resid_post.1"], pool="mean", batch_size=4, out=tmp_path / "p",
                    progress=False, dtype=torch.float64)
    assert store.layers == [1] and store.sites == ["resid_post.1"] and store.config["site"] == "resid_post"
    X, y = store.pooled(1)
    assert X.dtype == torch.float32 and y.tolist() == [s.label for s in data]
    for i in (0, 5):
        b = vlm.prepare([QUESTION], [data[i].image])
        with torch.no_grad():
            hs = vlm._module(**b.inputs, output_hidden_states=True).hidden_states
        torch.testing.assert_close(X[i], hs[2][b.layout.image].mean(0), rtol=1e-4, atol=1e-5)
    assert store.meta["n_tokens"].tolist()[0] == int(vlm.prepare(["<image>"], [data[0].image]).layout.image.sum())
    # a per-token store pools to the same means
    tok = harvest(vlm, data, layers=["resid_post.1"], batch_size=4, out=tmp_path / "t", progress=False)
    X2, y2 = tok.pooled("resid_post.1")
    torch.testing.assert_close(X2, X, rtol=1e-4, atol=1e-5)
    assert y2.equal(y)


def test_a_store_holds_residual_sites_of_one_kind(vlm, data, tmp_path):
    """Full site names pick the kind; mixed kinds and non-residual sites are refused before any forward."""
    store = harvest(vlm, data[:4], layers=["resid_post.3", "resid_post.1"], batch_size=2, out=tmp_path / "new",
                    progress=False)
    index = json.loads((store.path / "index.json").read_text())
    assert index["config"]["layers"] == [1, 3] and index["config"]["site"] == "resid_post"
    assert index["hook_names"] == {"1": "blocks.1.hook_resid_post", "3": "blocks.3.hook_resid_post"}
    with pytest.raises(InputError, match="mix the site kinds"):
        harvest(vlm, data, layers=[1, "resid_post.2"], out=tmp_path / "m", progress=False)
    with pytest.raises(InputError, match="one vector per token.*read_layers"):
        harvest(vlm, data, layers=["embed"], out=tmp_path / "m", progress=False)


def test_pool_features_are_the_hidden_state_means(vlm, data):
    """The in-memory pass (`pool_features`, batched and left-padded) against a plain HF forward per sample."""
    seen = []
    feats = pool_features(vlm, data[:5], [1, "resid_post.2"], batch_size=2, callback=lambda i, n: seen.append((i, n)))
    assert seen == [(0, 5), (2, 5), (4, 5)] and feats[1].shape == (5, vlm.d_model) and feats[1].dtype == torch.float32
    for i in range(5):
        b = vlm.prepare([QUESTION], [data[i].image])
        with torch.no_grad():
            hs = vlm._module(**b.inputs, output_hidden_states=True).hidden_states
        torch.testing.assert_close(feats[1][i], hs[1][b.layout.image].mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(feats["resid_post.2"][i], hs[3][b.layout.image].mean(0), rtol=1e-4, atol=1e-5)


def test_stops_after_deepest_layer(vlm, data, tmp_path):
    calls = {}
    layers = vlm._module.model.language_model.layers
    hooks = [m.register_forward_hook(lambda *a, k=k: calls.__setitem__(k, calls.get(k, 0) + 1))
             for k, m in [*((f"layer{i}", l) for i, l in enumerate(layers)), ("head", vlm._module.lm_head)]]
    try:
        harvest(vlm, data[:4], layers=[0, 1], batch_size=2, out=tmp_path / "e", progress=False)
    finally:
        for h in hooks:
            h.remove()
    assert calls.get("layer0") == 2  # layer 0 ran (resid_pre.1 is its output), nothing after layer 1's input
    assert "layer1" not in calls and "layer3" not in calls and "head" not in calls


def test_text_only_pass(vlm, data, tmp_path):
    store = harvest(vlm, data, layers=[1], tokens="image+answer", captions=True, text_only=True, batch_size=4,
                    out=tmp_path / "x", progress=False)
    txt = store.filter(text_only=True)
    n_caption = sum(len(vlm.tokenizer(s.caption, add_special_tokens=False)["input_ids"]) for s in data)
    assert len(txt) == n_caption and set(txt.meta["modality"].tolist()) == {0}
    assert len(store.filter(text_only=False, modality="text")) == n_caption
    # the text-only rows are the captions read alone, without image or template: they differ from the image pass
    b = vlm.prepare([""], None, answers=[data[0].caption], template=False)
    with torch.no_grad():
        hs = vlm._module(**b.inputs, output_hidden_states=True).hidden_states
    first = txt.meta["sample"] == 0
    torch.testing.assert_close(txt.activations(1)[first], hs[1][b.layout.answer], rtol=1e-5, atol=1e-5)


# -- resume and failure ------------------------------------------------------------------------------


N_RESUME = 5  # samples in the resume tests (two passes: 2 × 3 batches)


@pytest.fixture(scope="module")
def ref_store(vlm, tmp_path_factory):
    """An uninterrupted harvest, to compare resumed ones with."""
    return _full(vlm, make_data(N_RESUME), tmp_path_factory.mktemp("ref"))


def _full(vlm, data, out):
    return harvest(vlm, data, layers=[1, 3], tokens="image+answer", captions=True, text_only=True, batch_size=2,
                   out=out, progress=False, shard_mb=0.01)


def _same(a: ActivationStore, b: ActivationStore):
    assert len(a) == len(b) and a.layers == b.layers
    for L in a.layers:
        assert a.activations(L).tensor().equal(b.activations(L).tensor())
    for k, v in a.meta.items():
        assert v.equal(b.meta[k]), k
    assert a.sample_ids == b.sample_ids


def test_resume_after_exception(vlm, ref_store, tmp_path):
    data, ref = make_data(N_RESUME), ref_store
    seen = []

    def boom(info):
        seen.append(info)
        if len(seen) == 4:  # after the first batch of the text-only pass
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        harvest(vlm, data, layers=[1, 3], tokens="image+answer", captions=True, text_only=True, batch_size=2,
                out=tmp_path / "r", progress=False, shard_mb=1000, callback=boom)
    part = ActivationStore(tmp_path / "r")
    assert not part.complete and part.index["progress"] == {"main": 5, "text": 2}  # buffered batches were flushed
    done = []
    resumed = harvest(vlm, data, layers=[3, 1], tokens="image+answer", captions=True, text_only=True, batch_size=2,
                      out=tmp_path / "r", progress=False, shard_mb=0.01, callback=done.append)
    assert (done[0]["pass"], done[0]["done"]) == ("text", 4) and resumed.complete  # started after the last sample written
    _same(resumed, ref)


KILL_SCRIPT = """
import os, signal, sys
import vlens
sys.path.insert(0, {tests!r})
from test_harvest import WORDS, make_data
from vlens.activations import harvest
vlm = vlens.tiny(words=WORDS, seed=3)
n = [0]
def cb(info):
    n[0] += 1
    if n[0] == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
harvest(vlm, make_data({n}), layers=[1, 3], tokens="image+answer", captions=True, text_only=True, batch_size=2,
        out={out!r}, progress=False, shard_mb=0.01, callback=cb)
"""


def test_resume_after_kill_9(vlm, ref_store, tmp_path):
    data, ref = make_data(N_RESUME), ref_store
    out = tmp_path / "k"
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parent), kill_at=4, out=str(out), n=N_RESUME))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    part = ActivationStore(out)  # readable, every listed shard complete
    assert not part.complete and 0 < part.index["progress"]["main"] + part.index["progress"]["text"] < 2 * N_RESUME
    for L in part.layers:
        assert part.activations(L).tensor().isfinite().all()
    resumed = _full(vlm, data, out)
    _same(resumed, ref)


def test_disk_full_leaves_store_consistent(vlm, ref_store, tmp_path, monkeypatch):
    import safetensors.torch

    data, ref = make_data(N_RESUME), ref_store
    real = safetensors.torch.save_file
    calls = [0]

    def full_disk(tensors, path, metadata=None):
        calls[0] += 1
        if calls[0] == 3:
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(HarvestError, match="disk is full.*consistent.*resume"):
        _full(vlm, data, tmp_path / "d")
    left = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert left == ["index.json", "shard-00000.safetensors", "shard-00001.safetensors"]
    assert ActivationStore(tmp_path / "d").index["progress"]["main"] == 4
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    _same(_full(vlm, data, tmp_path / "d"), ref)


def test_a_store_without_the_fields_of_later_versions_still_opens_and_resumes(vlm, ref_store, tmp_path):
    """Formats are data: a store as vlens 0.1 wrote it (no index checksum, no shard CRC-32, no sample ids or keys)
    opens, reads the same rows, and a second harvest call with the same arguments finds it complete."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    old = tmp_path / "old"
    shutil.copytree(ref_store.path, old)
    index = json.loads((old / "index.json").read_text())
    index.pop("checksum", None)
    index.pop("sample_ids", None)
    for e in index["shards"]:
        for key in ("crc32", "sample_ids", "sample_keys"):
            e.pop(key, None)
        if e.get("file"):
            with safe_open(str(old / e["file"]), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                meta = {k: v for k, v in f.metadata().items() if k not in ("sample_ids", "sample_keys")}
            save_file(tensors, str(old / e["file"]), metadata=meta)
    (old / "index.json").write_text(json.dumps(index))
    store = ActivationStore(old)
    for L in ref_store.layers:
        assert store.activations(L).tensor().equal(ref_store.activations(L).tensor())
    for k, v in ref_store.meta.items():
        assert v.equal(store.meta[k]), k
    again = _full(vlm, make_data(N_RESUME), old)
    assert again.complete and len(again) == len(ref_store)


def test_orphan_and_tmp_files_are_cleaned_on_resume(vlm, data, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(RuntimeError):
        harvest(vlm, data, layers=[1], batch_size=2, out=out, progress=False, shard_mb=0.001,
                callback=lambda i: (_ for _ in ()).throw(RuntimeError("stop")) if i["done"] == 4 else None)
    # simulate a kill between the shard rename and the index update, and one mid-write
    (out / "shard-00002.safetensors").write_bytes(b"orphan")
    (out / "shard-00003.safetensors.tmp").write_bytes(b"half")
    store = harvest(vlm, data, layers=[1], batch_size=2, out=out, progress=False, shard_mb=0.001)
    assert store.complete and not list(out.glob("*.tmp"))
    ref = harvest(vlm, data, layers=[1], batch_size=2, out=tmp_path / "ref", progress=False)
    assert store.activations(1).tensor().equal(ref.activations(1).tensor())


# -- bad input ---------------------------------------------------------------------------------------


def test_bad_inputs(vlm, data, tmp_path):
    with pytest.raises(SiteError, match=r"layer 4 is out of range.*0\.\.3"):
        harvest(vlm, data, layers=[1, 4], out=tmp_path / "a", progress=False)
    with pytest.raises(InputError, match=r"layer\(s\) \[1\] more than once"):
        harvest(vlm, data, layers=[1, 2, -3], out=tmp_path / "a", progress=False)
    with pytest.raises(SelectionError, match="unknown token selection 'imgae'"):
        harvest(vlm, data, layers=[1], tokens="imgae", out=tmp_path / "a", progress=False)
    with pytest.raises(InputError, match="no caption.*captions=False"):
        harvest(vlm, [Sample(data[0].image, id="x")], layers=[1], captions=True, out=tmp_path / "c", progress=False)


def test_selection_that_selects_nothing_is_skipped(vlm, data, tmp_path):
    # answers without captions: every batch selects nothing
    with pytest.warns(UserWarning, match="selected nothing in 7 sample"):
        store = harvest(vlm, data, layers=[1], tokens="answer", batch_size=3, out=tmp_path / "n", progress=False)
    assert len(store) == 0 and store.index["skipped"]["main"] == 7 and store.complete
    # a function selecting only the first row of each batch: the others are skipped and counted
    with pytest.warns(UserWarning, match="4 sample"):
        store = harvest(vlm, data, layers=[1], pool="mean", batch_size=3, out=tmp_path / "f", progress=False,
                        tokens=lambda layout: layout.image & (torch.arange(layout.shape[0]) == 0)[:, None])
    assert store.meta["sample"].tolist() == [0, 3, 6]


def test_other_configuration_is_refused(vlm, data, tmp_path):
    out = tmp_path / "c"
    harvest(vlm, data[:2], layers=[1], out=out, progress=False)
    with pytest.raises(HarvestError, match="layers is \\[1\\] there but \\[1, 2\\] now.*overwrite=True"):
        harvest(vlm, data[:2], layers=[1, 2], out=out, progress=False)
    with pytest.raises(HarvestError, match="model_fingerprint"):
        harvest(vlens.tiny(words=WORDS, seed=4), data[:2], layers=[1], out=out, progress=False)
    store = harvest(vlm, data[:2], layers=[1, 2], out=out, progress=False, overwrite=True)
    assert store.layers == [1, 2] and json.loads((out / "index.json").read_text())["config"]["layers"] == [1, 2]


# -- the store ---------------------------------------------------------------------------------------


def test_store_api(vlm, data, tmp_path):
    store = harvest(vlm, data, layers=[0, 2], tokens="image+answer", captions=True, batch_size=2, out=tmp_path / "s",
                    progress=False, shard_mb=0.02, dtype="float16")
    assert len(store._shards) > 2 and store.dtype == torch.float16
    x = store.activations(2)
    full = x.tensor()
    assert full.dtype == torch.float16 and full.shape == (len(store), 64)
    idx = torch.tensor([5, 0, len(store) - 1, 77])
    assert x[idx].equal(full[idx]) and x[3].equal(full[3]) and x[10:400:7].equal(full[10:400:7])
    assert x[-1].equal(full[-1]) and x[:, :5].equal(full[:, :5])
    # filters compose and keep the right rows
    img = store.filter(modality="image", label=[0, 2])
    m = store.meta
    keep = (m["modality"] == 1) & ((m["label"] == 0) | (m["label"] == 2))
    assert img.activations(2).tensor().equal(full[keep]) and img.meta["label"].equal(m["label"][keep])
    assert len(store.filter(role="answer")) == len(store.filter(modality="text"))
    # batches: every row exactly once, shuffled, reproducible; bounded buffers
    bs = list(store.batches(2, batch_size=64, seed=1, buffer_shards=2))
    got = torch.cat(bs).float()
    assert got.shape == full.shape and not got.equal(full.float())
    assert torch.sort(got.sum(1)).values.equal(torch.sort(full.float().sum(1)).values)
    assert torch.cat(list(store.batches(2, batch_size=64, seed=1, buffer_shards=2))).float().equal(got)
    assert all(len(b) == 64 for b in bs[:-1])
    txt = torch.cat(list(store.batches(2, batch_size=10, modality="text", shuffle=False)))
    assert txt.equal(full[m["modality"] == 0])
    with pytest.raises(StoreError, match="layer 1 was not harvested.*layers \\[0, 2\\]"):
        store.activations(1)
    with pytest.raises(StoreError, match="holds resid_pre sites.*not resid_post.2"):
        store.activations("resid_post.2")
    assert store.activations("resid_pre.2")[:3].equal(full[:3])
    # numpy interop and repr
    import numpy as np

    assert np.asarray(x).shape == tuple(full.shape)
    assert "float16" in repr(store) and "ActivationRows" in repr(x)


def test_sae_lens_trains_from_export(vlm, data, tmp_path):
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.activations_store import ActivationsStore
    from sae_lens.training.sae_trainer import SAETrainer

    store = harvest(vlm, data, layers=[2], tokens="image+answer", captions=True, out=tmp_path / "s", progress=False)
    cfg = export_sae_lens(store, 2, tmp_path / "acts", context_size=16, shuffle=False)
    assert cfg["hook_name"] == "blocks.2.hook_resid_pre" and cfg["n_tokens"] == len(store) // 16 * 16
    acts = ActivationsStore(
        model=None, dataset=None, streaming=False, hook_name=cfg["hook_name"], hook_head_index=None,
        context_size=cfg["context_size"], d_in=cfg["d_in"], n_batches_in_buffer=8, total_training_tokens=1024,
        store_batch_size_prompts=4, train_batch_size_tokens=32, prepend_bos=False, normalize_activations="none",
        device=torch.device("cpu"), dtype="float32", cached_activations_path=cfg["cached_activations_path"],
    )
    # SAE-Lens reads back exactly the store's rows and token ids
    raw, tok = acts._load_raw_llm_batch_from_cached(raise_on_epoch_end=False)
    assert raw.equal(store.activations(2)[: 4 * 16].float()) and tok.equal(store.meta["token_id"][: 4 * 16].int())
    acts.current_row_idx = 0
    torch.manual_seed(0)
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=cfg["d_in"], d_sae=128, l1_coefficient=1e-3))
    x = store.activations(2).float()
    with torch.no_grad():
        before = float(((sae(x) - x) ** 2).mean())
    trainer = SAETrainer(cfg=SAETrainerConfig(total_training_samples=32 * 30, train_batch_size_samples=32, lr=3e-3,
                                              lr_end=3e-3), sae=sae, data_provider=acts)
    trainer.fit()
    with torch.no_grad():
        after = float(((sae(x) - x) ** 2).mean())
    assert trainer.n_training_steps == 30 and after < before
