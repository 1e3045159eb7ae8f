"""Shared fixtures: tiny random LLaVA-Next models, built once per session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_mistral():
    import vlens

    return vlens.tiny("mistral")


@pytest.fixture(scope="session")
def tiny_llama():
    import vlens

    return vlens.tiny("llama", seed=1)


@pytest.fixture(scope="session", params=["mistral", "llama"])
def tiny_vlm(request, tiny_mistral, tiny_llama):
    return tiny_mistral if request.param == "mistral" else tiny_llama


def solid(w: int, h: int, colour=(200, 30, 30), mode: str = "RGB"):
    """A one-colour PIL image of width w and height h."""
    from PIL import Image

    return Image.new(mode, (w, h), colour if mode == "RGB" else None)
