"""Fidelity checks written against references outside vlmplug (the unpatched model, the papers' / official code's
values), added after a mutation audit (scripts/mutation.py) found changes the suite did not notice.

- identity settings of the six pre-LLM methods give the unpatched model's logits within 1e-5 (the README's promise),
  on every family, with a left-padded batch of several images per sample, for the forward and every generate step;
- defaults that the papers / official code fix: FlowCut's decay 0.5 (the cumulative score S <- 0.5 S + 0.5 score).
"""
import pytest
import torch

import vlmplug
from conftest import tiny
from vlmplug.testing.tiny import make_batch

PRE_LLM = ["visionzip", "hiprune", "flowcut", "cluster", "random", "pool"]
REFUSED = {("flowcut", "qwen2_5_vl")}  # windowed tower: refused on purpose (README)
GEN = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)


@pytest.mark.parametrize("method", PRE_LLM)
def test_identity_settings_keep_the_unpatched_logits(family, method):
    """keep_ratio=1 keeps every image token untouched: logits within 1e-5 of the unpatched model's (README), at
    every real position of the forward and at every generate step; the same greedy tokens."""
    if (method, family) in REFUSED:
        pytest.skip(f"{method} refuses {family} on purpose")
    model = tiny(family)
    batch = make_batch(family, model, (2, 1, 0))
    real = batch.inputs["attention_mask"].bool()
    kw = dict(object_layer=0) if method == "hiprune" else {}
    with torch.no_grad():
        ref = model(**batch.inputs).logits
        gref = model.generate(**batch.inputs, **GEN)
    with vlmplug.apply(model, method, keep_ratio=1.0, **kw) as h, torch.no_grad():
        out = model(**batch.inputs).logits
        g = model.generate(**batch.inputs, **GEN)
        kept = h.stats[method]["tokens_kept_per_image"]
    assert kept == [[im.positions.numel() for im in s.images] for s in h.layout.samples]
    assert out.shape == ref.shape
    assert (out[real] - ref[real]).abs().max() <= 1e-5
    assert torch.equal(g.sequences, gref.sequences)
    assert len(g.logits) == len(gref.logits)
    for step, (a, b) in enumerate(zip(g.logits, gref.logits)):
        assert (a - b).abs().max() <= 1e-5, f"generate step {step}"


def test_flowcut_decay_default_is_the_papers():
    """FlowCut's cumulative score S <- 0.5 S + 0.5 score (official code, utils_flowcut.py; reference notes 2.5)."""
    assert vlmplug.FlowCut().decay == 0.5
