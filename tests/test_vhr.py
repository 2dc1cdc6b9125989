"""VHR against a reference written from the paper (Algorithm 1) without threads: layer by layer, the unpatched model
runs the prompt with its image and the prompt without it (eager attention, the heads chosen so far reinforced in both),
head outputs at the last position give VHD = ||A_img - A_txt||_2, the outlier filter (VHD and the text-only energy
both above mean + sample std) and the heads above the median (numpy) are chosen; then the final run reinforces them
at every position and step."""
import numpy as np
import pytest
import torch

import vlmplug
from conftest import tiny
from reference import eager_with, run_reference
from vlmplug.testing.tiny import make_batch

GEN = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)


def text_only(batch):
    ids, am = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    rows = []
    for b, ims in enumerate(batch.truth):
        drop = {p for im in ims for p in im.positions}
        rows.append([int(t) for i, t in enumerate(ids[b]) if am[b, i] and i not in drop])
    n = max(len(r) for r in rows)
    new = torch.zeros(len(rows), n, dtype=ids.dtype)
    mask = torch.zeros(len(rows), n, dtype=am.dtype)
    for b, r in enumerate(rows):
        new[b, n - len(r):] = torch.tensor(r)
        mask[b, n - len(r):] = 1
    return {"input_ids": new, "attention_mask": mask}


def choose(img_out, txt_out, use_filter=True):
    d = np.linalg.norm(img_out - txt_out, axis=-1)
    if use_filter:
        ta = (txt_out**2).sum(-1)
        d = np.where((d > d.mean() + d.std(ddof=1)) & (ta > ta.mean() + ta.std(ddof=1)), 0.0, d)
    return d > np.median(d)


def scaled(chosen, alpha, capture=None):
    def out(module, o):
        li = module.layer_idx
        if capture is not None and li == capture[0]:
            capture[1].append(o[:, :, -1].clone())
        if li in chosen:
            s = torch.where(torch.as_tensor(chosen[li]), alpha, 1.0).double()
            o = o * s[:, :, None, None]
        return o

    return eager_with(edit_out=out)


def vhr_reference(model, batch, layers, alpha, use_filter=True):
    txt = text_only(batch)
    chosen = {}
    has_image = [bool(ims) for ims in batch.truth]
    for li in sorted(layers):
        got = {}
        for name, inputs in (("img", batch.inputs), ("txt", txt)):
            cap = (li, [])
            run_reference(model, "vhr_ref", scaled(chosen, alpha, cap), inputs)
            got[name] = cap[1][0].numpy()  # [B, Hq, D]: the last position (left padding)
        chosen[li] = np.stack([choose(got["img"][b], got["txt"][b], use_filter) if has_image[b]
                               else np.zeros(got["img"].shape[1], dtype=bool) for b in range(len(has_image))])
    return chosen


@pytest.mark.parametrize("use_filter", [True, False])
def test_vhr_matches_the_paper(family, use_filter):
    model = tiny(family)
    batch = make_batch(family, model, (2, 1, 0))
    alpha, layers = 2.0, [0, 1]
    with torch.no_grad():
        plain = model(**batch.inputs).logits
        with vlmplug.apply(model, vlmplug.VHR(alpha=alpha, layers=layers, outlier_filter=use_filter)) as h:
            out = model(**batch.inputs).logits
            heads = h.stats["vhr"]["heads"]
            g = model.generate(**batch.inputs, **GEN)
    chosen = vhr_reference(model, batch, layers, alpha, use_filter)
    for i, li in enumerate(layers):
        assert heads[i] == [np.nonzero(r)[0].tolist() for r in chosen[li]]
    assert heads[0][2] == [] and len(heads[0][0]) == 2  # the image-free sample is left alone; half the heads
    ref, gr = run_reference(model, "vhr_ref", scaled(chosen, alpha), batch.inputs, GEN)
    real = batch.inputs["attention_mask"].bool()
    assert (out - ref)[real].abs().max() <= 1e-5
    assert (out[:2] - plain[:2])[real[:2]].abs().max() > 1e-4
    assert torch.equal(out[2], plain[2])
    assert torch.equal(g.sequences, gr.sequences)
    for a, b in zip(g.logits, gr.logits):
        assert (a - b).abs().max() <= 1e-4


def test_vhr_default_layers_and_identity():
    """Default layers: layer 1 and the last 14 (clipped to the model's depth); alpha=1 changes nothing and runs no
    text-only branch."""
    import threading

    model = tiny("llava")
    batch = make_batch("llava", model, (1,))
    with vlmplug.apply(model, vlmplug.VHR()) as h:
        assert h.stats["vhr"]["layers"] == [0, 1]
    with torch.no_grad():
        plain = model(**batch.inputs).logits
        before = threading.active_count()
        with vlmplug.apply(model, vlmplug.VHR(alpha=1.0)):
            assert torch.equal(model(**batch.inputs).logits, plain)
        assert threading.active_count() == before


def test_vhr_branch_failure_is_raised_and_leaves_no_thread():
    """An error inside the text-only branch reaches the caller; no helper thread is left waiting."""
    import threading

    model = tiny("llava")
    batch = make_batch("llava", model, (1,))
    before = threading.active_count()
    with vlmplug.apply(model, vlmplug.VHR(layers=[0, 1])) as h:
        runner = h.method("vhr")
        orig = runner._branch_plan

        def broken(ctx):
            raise RuntimeError("branch broke")

        runner._branch_plan = broken
        with pytest.raises(RuntimeError, match="branch broke"), torch.no_grad():
            model(**batch.inputs)
        runner._branch_plan = orig
        with torch.no_grad():
            model(**batch.inputs)  # the next prompt works
    assert threading.active_count() == before


def test_vhr_under_inference_mode():
    """The branch repeats the caller's inference mode (thread-local in torch): same result as under no_grad."""
    model = tiny("qwen2_vl")
    batch = make_batch("qwen2_vl", model, (1, 1))
    with vlmplug.apply(model, vlmplug.VHR(layers=[0, 1])) as h:
        with torch.no_grad():
            a = model(**batch.inputs).logits
            heads = h.stats["vhr"]["heads"]
        with torch.inference_mode():
            b = model(**batch.inputs).logits
            g = model.generate(**batch.inputs, max_new_tokens=2, do_sample=False)
        assert h.stats["vhr"]["heads"] == heads and h.method("vhr").branch_seconds > 0
    assert torch.equal(a, b) and g.shape[1] == batch.inputs["input_ids"].shape[1] + 2


def test_vhr_limited_to_main_and_without_cache():
    """passes={"vhr": ["main"]} still runs its own text-only branch; generate without a KV cache (every step a
    prefill of the grown prompt) keeps the heads chosen at the first step: the same tokens as with the cache."""
    model = tiny("llava")
    batch = make_batch("llava", model, (1, 1))
    with torch.no_grad():
        with vlmplug.apply(model, vlmplug.VHR(layers=[0, 1]), passes={"vhr": ["main"]}) as h:
            a = model.generate(**batch.inputs, max_new_tokens=4, do_sample=False)
            heads = h.stats["vhr"]["heads"]
            b = model.generate(**batch.inputs, max_new_tokens=4, do_sample=False, use_cache=False)
            assert h.stats["vhr"]["heads"] == heads
    assert torch.equal(a, b)
