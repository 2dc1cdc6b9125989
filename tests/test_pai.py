"""PAI's attention intervention on every family against an eager reference written from the paper: full eager
attention of the unpatched model, with s[h, last row, image keys] += alpha * |s| in the chosen layers (prefill: the
prompt's last token; decode: the new token), image positions from the batch's ground truth."""
import pytest
import torch

import vlmplug
from conftest import tiny
from reference import full_mask, register_reference
from vlmplug.testing.tiny import make_batch

ALPHA = 0.8
GEN = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)


def pai_reference(layers, image_positions, alpha):
    """An attention function for the UNPATCHED model. image_positions[b]: the image tokens' prompt positions; with a
    dynamic cache and nothing pruned, key index j is sequence position j."""

    def fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        B, Hq, Lq, D = query.shape
        S = key.shape[2]
        G = Hq // key.shape[1]
        k = key.repeat_interleave(G, 1).double()
        v = value.repeat_interleave(G, 1).double()
        scale = scaling if scaling is not None else D**-0.5
        s = torch.einsum("bhqd,bhkd->bhqk", query.double(), k) * scale
        if module.layer_idx in layers:
            for b, img in enumerate(image_positions):
                if img:
                    cols = torch.tensor(img)
                    row = s[b, :, Lq - 1, cols]  # left padding: the last row is the last real token
                    s[b, :, Lq - 1, cols] = row + alpha * row.abs()
        m = full_mask(module, attention_mask, Lq, S, kwargs, query.device)
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.double()
        a = torch.softmax(s, -1).nan_to_num(0.0)
        return (a @ v).to(query.dtype).transpose(1, 2).contiguous(), None

    return fn


def test_pai_matches_the_paper_rule(family):
    model = tiny(family)
    batch = make_batch(family, model, (2, 1, 0))  # several images, one sample without any, left padding
    positions = [sorted(p for im in imgs for p in im.positions) for imgs in batch.truth]
    with torch.no_grad():
        plain = model(**batch.inputs).logits
        with vlmplug.apply(model, vlmplug.PAI(alpha=ALPHA, layers=[1], gamma=1.0)) as h:
            out = model(**batch.inputs).logits
            g = model.generate(**batch.inputs, **GEN)
            assert h.stats["pai"]["layers"] == [1]
        name = register_reference("pai_ref", pai_reference({1}, positions, ALPHA))
        model.set_attn_implementation({"text_config": name})
        try:
            ref = model(**batch.inputs).logits
            gr = model.generate(**batch.inputs, **GEN)
        finally:
            model.set_attn_implementation({"text_config": "sdpa"})
    real = batch.inputs["attention_mask"].bool()
    assert (out - ref)[real].abs().max() <= 1e-5
    assert (out[:2, -1] - plain[:2, -1]).abs().max() > 1e-4  # the intervention changes samples with images
    assert torch.equal(out[2], plain[2])  # and leaves the image-free sample alone
    assert torch.equal(g.sequences, gr.sequences)
    for a, b in zip(g.logits, gr.logits):  # decode steps: the new token's row is amplified too
        assert (a - b).abs().max() <= 1e-4


@pytest.mark.parametrize("fam", ["llava", "qwen2_vl"])
def test_pai_composes_with_record_and_pruning(fam):
    """record sees the amplified attention (a probe applies the same logit edit); PAI runs on FastV's kept tokens."""
    model = tiny(fam)
    batch = make_batch(fam, model, (1, 1))
    with torch.no_grad():
        with vlmplug.apply(model, [vlmplug.Record(layers=[1]), vlmplug.PAI(alpha=ALPHA, layers=[1], gamma=1.0)]) as h:
            model(**batch.inputs)
            boosted = h.result("record").rows[1]
        with vlmplug.apply(model, vlmplug.Record(layers=[1])) as h:
            model(**batch.inputs)
            plain = h.result("record").rows[1]
        with vlmplug.apply(model, [vlmplug.FastV(layer=1, keep_ratio=0.5), vlmplug.PAI(alpha=ALPHA, layers=[1], gamma=1.0)]):
            model.generate(**batch.inputs, max_new_tokens=2, do_sample=False)
    img = torch.zeros_like(plain[:, 0], dtype=torch.bool)
    for b, imgs in enumerate(batch.truth):
        img[b, [p for im in imgs for p in im.positions]] = True
    # amplifying the image logits moves mass onto the image (rows still sum to one)
    assert ((boosted * img[:, None]).sum(-1) > (plain * img[:, None]).sum(-1) - 1e-6).all()
    assert torch.allclose(boosted.sum(-1), torch.ones_like(boosted.sum(-1)), atol=1e-5)


def test_pai_refuses_a_redistribution_in_the_same_layer():
    from test_plan_algebra import Sinker

    model = tiny("llava")
    with pytest.raises(vlmplug.MethodConfigError, match="redistribute or amplify attention in \\[1\\]"):
        vlmplug.apply(model, [Sinker(layers=(1,)), vlmplug.PAI(layers=[1])])
    assert "_vlmplug_handle" not in vars(model)
    batch = make_batch("llava", model, (1,))
    with vlmplug.apply(model, [Sinker(layers=(0,)), vlmplug.PAI(layers=[1])]), torch.no_grad():
        model(**batch.inputs)


@pytest.mark.parametrize("fam", ["llava", "qwen2_vl", "gemma3"])
def test_pai_cfg_branch_equals_hand_reference(fam):
    """handle.guidance(inputs): the text-only branch (the prompt without its image tokens), mixed as in the paper with
    the plausibility cutoff; checked against each branch decoded alone and the formula written out."""
    import math

    from test_passes import _forced, _suppressed

    gamma, beta = 1.5, 0.1
    model = tiny(fam)
    batch = make_batch(fam, model, (1,))
    cfg = vlmplug.PAI(alpha=ALPHA, layers=[1], gamma=gamma, beta=beta)
    with torch.no_grad(), vlmplug.apply(model, cfg) as h:
        procs = h.guidance(batch.inputs)
        text = procs[0].inputs
        g = model.generate(**batch.inputs, logits_processor=procs, max_new_tokens=3, do_sample=False,
                           output_scores=True, return_dict_in_generate=True)
        new = g.sequences[:, batch.inputs["input_ids"].shape[1]:]
        main = _forced(model, batch.inputs, new)  # PAI's attention intervention on the image prompt
    img = {p for im in batch.truth[0] for p in im.positions}
    ids = batch.inputs["input_ids"][0]
    assert text["input_ids"][0].tolist() == [int(t) for i, t in enumerate(ids) if i not in img]
    assert "pixel_values" not in text
    with torch.no_grad():
        uncond = _forced(model, text, new)  # the text-only branch: unpatched (it has no image)
    cond = torch.log_softmax(_suppressed(model, main).double(), -1)
    ref = gamma * cond - (gamma - 1) * torch.log_softmax(uncond.double(), -1)
    ref = ref.masked_fill(cond < cond.max(-1, keepdim=True).values + math.log(beta), float("-inf"))
    scores = torch.stack(g.scores).double()
    assert torch.equal(torch.isfinite(scores), torch.isfinite(ref))
    fin = torch.isfinite(ref)
    assert (scores[fin] - ref[fin]).abs().max() <= 1e-4
    assert torch.equal(new[0], ref.argmax(-1)[:, 0])


def test_pai_warns_when_its_branch_is_missing():
    model = tiny("llava")
    batch = make_batch("llava", model, (1,))
    with torch.no_grad(), vlmplug.apply(model, vlmplug.PAI(layers=[1])):
        with pytest.warns(UserWarning, match="handle.guidance"):
            model.generate(**batch.inputs, max_new_tokens=2, do_sample=False)
    with torch.no_grad(), vlmplug.apply(model, vlmplug.PAI(layers=[1], gamma=1.0)):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            model.generate(**batch.inputs, max_new_tokens=2, do_sample=False)
