"""The memory planner against what runs measure: token counts of the real processor, parameter counts,
store bytes on disk, and the peak activation memory of small-width runs of the real architecture."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import vlens
from vlens.attribution import integrated_gradients, token_target
from vlens.data import Sample
from vlens.errors import InputError
from vlens.families.checkpoints import LLAVA_NEXT_MISTRAL
from vlens.planning import PeakMemory, plan, sae_bytes
from vlens.prompts import QUESTION


@pytest.mark.parametrize("size, tokens", [((336, 336), 1176), ((672, 672), 2928), ((640, 480), 2340)])
def test_tokens_per_image_at_full_size_match_the_measured_counts(size, tokens):
    """DESIGN.md's counts, measured with llava-hf's processor settings; the 7B is built on the meta device."""
    p = plan(LLAVA_NEXT_MISTRAL, size, layers=[16], dtype=torch.bfloat16)
    assert p.tokens_per_image == tokens
    assert p.store_bytes_per_image == tokens * (2 * 4096 + 38)


def test_parameter_bytes_of_the_7b_are_the_published_size():
    p = plan(LLAVA_NEXT_MISTRAL, 336, layers=[8], dtype="bfloat16")
    assert abs(p.param_bytes / 2 - 7.57e9) < 0.01e9  # the model card: 7.57B parameters
    assert plan(LLAVA_NEXT_MISTRAL, 336, layers=[8], dtype=torch.float32).param_bytes == 2 * p.param_bytes


def test_peak_memory_counts_live_tensors_not_freed_ones():
    with PeakMemory() as m:
        for _ in range(5):
            x = torch.ones(250_000) * 2.0  # 1 MB each, freed at the next iteration
    assert 2_000_000 <= m.peak <= 3_000_000  # ones + product alive at once, never five of them
    with PeakMemory() as m:
        keep = [torch.zeros(100_000, dtype=torch.bfloat16) + 1 for _ in range(3)]
    assert m.peak >= 3 * 200_000 and len(keep) == 3


def test_store_bytes_match_a_harvest_on_disk(tmp_path):
    vlm = vlens.tiny()
    data = [Sample(Image.new("RGB", (32, 32), (40 * i, 0, 0)), label=i) for i in range(3)]
    store = vlens.harvest(vlm, data, [1, 2], out=tmp_path, progress=False)
    p = plan(vlm, (32, 32), layers=[1, 2], dtype=vlm.dtype)
    disk = sum(f.stat().st_size for f in tmp_path.rglob("*.safetensors"))
    assert len(store) == 3 * p.tokens_per_image
    assert p.store_bytes_per_image * 3 <= disk <= p.store_bytes_per_image * 3 + 4096 * len(list(tmp_path.rglob("*.safetensors")))


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    vlm = vlens.load(LLAVA_NEXT_MISTRAL, weights="random", d_model=128, n_layers=2, vision_d_model=64,
                     vision_layers=2)
    return vlm, vlm.prepare([QUESTION], [Image.new("RGB", (336, 336), (90, 20, 200))])


def test_activation_memory_matches_a_small_width_run(small):
    """Real architecture at d_model 128 (full vocabulary and image geometry): measured peaks within 25%."""
    vlm, b = small
    p = plan(vlm, (336, 336), layers=[1], dtype=torch.float32, site=1)
    with PeakMemory() as m:
        vlens.read_layers(vlm, b, [1])
    assert 0.75 < m.peak / p.harvest_bytes < 1.25
    with PeakMemory() as m, torch.inference_mode():
        vlm._module(**b.inputs)
    assert 0.75 < m.peak / p.forward_bytes < 1.25
    with PeakMemory() as m:
        integrated_gradients(vlm, b, token_target(5), site=1, baseline="mean", steps=2, batch_size=2)
    assert 0.75 < m.peak / 2 / p.attribution_bytes < 1.25  # two rows per backward


def test_rows_fit_the_budget_and_errors_name_the_argument():
    p = plan(LLAVA_NEXT_MISTRAL, (672, 672), layers=[16], dtype=torch.bfloat16)
    n = p.rows(80 * 2**30, "attribution", margin=0.1)
    assert n >= 1 and p.param_bytes + n * p.attribution_bytes <= 0.9 * 80 * 2**30
    assert p.param_bytes + (n + 1) * p.attribution_bytes > 0.9 * 80 * 2**30
    assert p.rows(10 * 2**30, "harvest") == 0  # the weights alone do not fit
    with pytest.raises(InputError, match="kind"):
        p.rows(2**30, "backward")
    with pytest.raises(InputError, match="layers"):
        plan(LLAVA_NEXT_MISTRAL, 336, layers=[40])


def test_sae_bytes_counts_weights_adam_and_batch():
    measured = torch.nn.Linear(64, 1024).weight.numel() * 2 * 4 * 4  # enc + dec, fp32, w + grad + 2 moments
    assert sae_bytes(64, 1024, 1) >= measured
    assert sae_bytes(64, 1024, 8) - sae_bytes(64, 1024, 0) == 8 * 4 * (4 * 1024 + 4 * 64)
