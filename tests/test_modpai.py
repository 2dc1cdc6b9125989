"""modPAI against references written from the released code (hasanar1f/llava-hallunication-fix): on LLaVA-1.5 the
whole rule, from the vision tower's own eager attentions (CLS row of the first and second to last layers, summed over
heads; top 25% minus the IQR outliers) to the last row's logit boosts; on every family the LLM-side rule with the
token sets the method reports (s + alpha |s| on informative tokens, s + beta |s| on outliers)."""
import numpy as np
import pytest
import torch

import vlmplug
from conftest import tiny
from reference import eager_with, run_reference
from vlmplug.testing.tiny import make_batch

GEN = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)


def boost_reference(layers, top, bottom, alpha, beta, sensitivity=False, has_image=None, first=None):
    """top/bottom: per sample, lists of prompt positions (key j = position j: dynamic cache, nothing pruned)."""

    def scores(module, s):
        if module.layer_idx not in layers:
            return None
        s = s.clone()
        for b in range(s.shape[0]):
            if has_image is not None and not has_image[b]:
                continue
            row = s[b, :, -1]  # left padding: the last row is the last real token (prefill) or the new one
            w = torch.zeros(row.shape[-1], dtype=torch.float64)
            w[top[b]] = alpha
            w[bottom[b]] = beta
            if sensitivity:  # per head: image mass of the row (unedited softmax) over the mean over heads
                img = torch.zeros(row.shape[-1], dtype=torch.bool)
                img[top[b] + bottom[b] + OTHER[b]] = True
                p = torch.zeros_like(row)
                p[:, first[b]:] = torch.softmax(row[:, first[b]:], -1)  # the row's visible keys: no left padding
                mass = (p * img).sum(-1)
                w = w[None, :] * (mass / mass.mean())[:, None]
            s[b, :, -1] = row + w * row.abs()
        return s

    return eager_with(edit_scores=scores)


OTHER: list = []


def test_modpai_llava_whole_rule():
    model = tiny("llava")
    batch = make_batch("llava", model, (1, 1))
    alpha, beta, ratio = 0.9, 0.5, 0.25
    model.set_attn_implementation({"vision_config": "eager"})
    try:
        with torch.no_grad():
            att = model.model.vision_tower(batch.inputs["pixel_values"], output_attentions=True).attentions
    finally:
        model.set_attn_implementation({"vision_config": "sdpa"})
    top_attn = att[0][:, :, 0, 1:].sum(1)  # [images, patches]: CLS row, first layer, summed over heads
    bot_attn = att[-2][:, :, 0, 1:].sum(1)  # second to last layer
    tops, bottoms = [], []
    for b, ims in enumerate(batch.truth):
        pos = np.array(ims[0].positions)
        n = len(pos)
        t = set(torch.topk(top_attn[b], int(n * ratio)).indices.tolist())
        x = bot_attn[b].numpy()
        q1, q3 = np.percentile(x, 25), np.percentile(x, 75)
        o = set(np.nonzero(x > q3 + 1.5 * (q3 - q1))[0].tolist())
        tops.append(sorted(pos[sorted(t - o)].tolist()))
        bottoms.append(sorted(pos[sorted(o)].tolist()))
    cfg = vlmplug.ModPAI(alpha=alpha, beta=beta, local_ratio=ratio, layers=[1], gamma=1.0)
    with torch.no_grad(), vlmplug.apply(model, cfg) as h:
        out = model(**batch.inputs).logits
        sets = h.result("modpai")
        g = model.generate(**batch.inputs, **GEN)
    assert sets["informative"] == tops and sets["outliers"] == bottoms
    ref, gr = run_reference(model, "modpai_ref", boost_reference({1}, tops, bottoms, alpha, beta), batch.inputs, GEN)
    real = batch.inputs["attention_mask"].bool()
    assert (out - ref)[real].abs().max() <= 1e-5
    assert torch.equal(g.sequences, gr.sequences)
    for a, b in zip(g.logits, gr.logits):
        assert (a - b).abs().max() <= 1e-4


@pytest.mark.parametrize("heads", ["uniform", "sensitivity"])
def test_modpai_llm_rule(family, heads):
    model = tiny(family)
    batch = make_batch(family, model, (2, 1, 0))
    alpha, beta = 0.9, 0.4
    cfg = vlmplug.ModPAI(alpha=alpha, beta=beta, local_ratio=0.5, layers=[1], gamma=1.0, heads=heads)
    with torch.no_grad():
        plain = model(**batch.inputs).logits
        with vlmplug.apply(model, cfg) as h:
            out = model(**batch.inputs).logits
            sets = h.result("modpai")
            g = model.generate(**batch.inputs, **GEN)
    img = [sorted(p for im in ims for p in im.positions) for ims in batch.truth]
    for b in range(3):
        t, o = set(sets["informative"][b]), set(sets["outliers"][b])
        assert not (t & o) and (t | o) <= set(img[b])
    assert sets["informative"][0]
    OTHER[:] = [sorted(set(img[b]) - set(sets["informative"][b]) - set(sets["outliers"][b])) for b in range(3)]
    fn = boost_reference({1}, sets["informative"], sets["outliers"], alpha, beta, heads == "sensitivity",
                         [bool(x) for x in img], batch.inputs["attention_mask"].float().argmax(1).tolist())
    ref, gr = run_reference(model, "modpai_ref", fn, batch.inputs, GEN)
    real = batch.inputs["attention_mask"].bool()
    assert (out - ref)[real].abs().max() <= 1e-5
    assert (out[:2, -1] - plain[:2, -1]).abs().max() > 1e-4
    assert torch.equal(out[2], plain[2])
    assert torch.equal(g.sequences, gr.sequences)
    for a, b in zip(g.logits, gr.logits):
        assert (a - b).abs().max() <= 1e-4


@pytest.mark.parametrize("fam", ["llava", "llava_next", "qwen2_vl", "gemma3"])
def test_modpai_beams_and_fresh_token_sets(fam):
    """Beams (generate repeats the prompt's rows): every copy gets the image's sets. A prompt whose image-feature
    call brings no token sets is not boosted with the previous prompt's and fails loudly."""
    from vlmplug.runtime import features

    model = tiny(fam)
    batch = make_batch(fam, model, (1, 1))
    cfg = vlmplug.ModPAI(layers=[0, 1], gamma=1.0, local_ratio=0.5)
    with torch.no_grad(), vlmplug.apply(model, cfg) as h:
        g = model.generate(**batch.inputs, num_beams=2, max_new_tokens=3, do_sample=False)
        assert g.shape[0] == 2
        sets = h.result("modpai")
        assert len(sets["informative"]) == 4 and sets["informative"][0] == sets["informative"][1]
        orig = features._rows_per_image
        features._rows_per_image = lambda *a: None  # the feature methods are skipped for the next prompt
        try:
            with pytest.warns(UserWarning, match="feature methods skipped"), \
                    pytest.raises(vlmplug.TransformersMismatchError, match="modpai expected the vision tower"):
                model.generate(**batch.inputs, max_new_tokens=2, do_sample=False)
        finally:
            features._rows_per_image = orig
