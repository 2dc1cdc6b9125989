import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models: one thread is fastest and immune to a busy second core

from vlmplug.testing.tiny import FAMILIES, build_tiny_model  # noqa: E402

_MODELS: dict = {}


def tiny(family: str, dtype=torch.float32):
    """Cached tiny model; tests must leave it unpatched (use handles as context managers)."""
    key = (family, dtype)
    if key not in _MODELS:
        _MODELS[key] = build_tiny_model(family, dtype=dtype)
    m = _MODELS[key]
    h = m.__dict__.get("_vlmplug_handle")
    if h is not None:  # a failed test left a patch: undo it so the next test starts clean
        h.remove()
    return m


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param
