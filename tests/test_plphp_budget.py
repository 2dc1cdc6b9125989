"""PLPHP's per-layer allocation holds for both ways of giving the budget (it was switched off for keep_tokens):
hand-computed kept counts per layer class."""
import torch

import vlmplug
from conftest import tiny
from vlmplug.methods.pruning.plphp import PLPHP
from vlmplug.testing.tiny import make_batch


def test_keep_tokens_is_the_balanced_share_moved_by_delta():
    r = PLPHP(keep_tokens=16, delta=0.1, alpha=0.2, beta=0.05).build()
    base = 16 / 64
    assert r.rate(0.5, base) == base + 0.1      # vision-attentive: 0.35 of 64 -> round(22.4) = 22 tokens
    assert r.rate(0.01, base) == base - 0.1     # vision-indifferent: 0.15 -> round(9.6) = 10
    assert r.rate(0.1, base) == base            # balanced: exactly keep_tokens
    assert PLPHP(keep_ratio=0.25).build().rate(0.5) == 0.25 + 0.1


def test_keep_tokens_allocation_reaches_the_kv_cache():
    """On a tiny model: each pruned layer keeps round(n * (keep_tokens / n +- delta)) per its image-attention share,
    computed here from the shares PLPHP recorded (the per-layer classes, by hand)."""
    model = tiny("llava")
    batch = make_batch("llava", model, (1,), seed=3)
    n = int((batch.inputs["input_ids"][0] == model.config.image_token_index).sum())
    with vlmplug.apply(model, "plphp", keep_tokens=4, delta=0.25, alpha=0.0, beta=0.0, start_layer=1) as h, \
            torch.no_grad():
        model.generate(**batch.inputs, max_new_tokens=2, do_sample=False)
        kept = h.stats["plphp"]["image_tokens_kept_per_layer"]
    # alpha = 0: every layer is vision-attentive (share >= 0): keep_tokens / n + delta of the image
    assert kept == {1: [min(n, round(n * (4 / n + 0.25)))]}
