"""Two passes side by side: generate() runs the main prompt while a PassMix logits processor runs a second prompt
at every step, each pass under its own methods and forward state; the mixed logits equal a hand-computed mix of
each pass run alone."""
import pytest
import torch
from transformers import DynamicCache, LogitsProcessorList

import vlmplug
from conftest import tiny
from vlmplug.compat import with_cache
from vlmplug.guidance import PassMix
from vlmplug.pipeline import generate_info
from vlmplug.testing.tiny import make_batch

STEPS = 4
GAMMA = 0.7


def _suppressed(model, a):
    """generate() hands PassMix the main logits after its own processors: the tiny models suppress special tokens."""
    a = a.clone()
    a[..., list(model.generation_config.suppress_tokens or [])] = float("-inf")
    return a


def _close(scores, ref):
    """Equal -inf entries (suppressed tokens) and finite entries within 1e-4."""
    scores = scores.double()
    fin = torch.isfinite(ref)
    return torch.equal(fin, torch.isfinite(scores)) and (scores[fin] - ref[fin]).abs().max() <= 1e-4


def _hand_cfg(a, b):
    """(1 + g) log softmax(a) - g log softmax(b), written out."""
    la = a.double() - torch.logsumexp(a.double(), -1, keepdim=True)
    lb = b.double() - torch.logsumexp(b.double(), -1, keepdim=True)
    return (1 + GAMMA) * la - GAMMA * lb


def _forced(model, inputs, tokens):
    """Next-token logits of one prompt decoded alone with a KV cache, fed the given tokens: [T, B, V]."""
    base = getattr(model, "model", model)
    if hasattr(base, "rope_deltas"):  # Qwen-VL keeps the last prompt's M-RoPE offset; a text-only prompt reuses it
        base.rope_deltas = None
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    out = model(**inputs, **with_cache(model, cache), use_cache=True)
    logits, am = [out.logits[:, -1]], inputs["attention_mask"]
    assert bool(am.bool().all())  # one unpadded prompt: decode steps need no mask (Qwen derives positions from it)
    for t in range(tokens.shape[1] - 1):
        out = model(input_ids=tokens[:, t:t + 1], **with_cache(model, cache), use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits)


def _mixed_generate(model, main, second, label="second"):
    pm = PassMix(model, second.inputs, mix=vlmplug.cfg_mix(GAMMA), label=label)
    g = model.generate(**main.inputs, logits_processor=LogitsProcessorList([pm]), max_new_tokens=STEPS,
                       do_sample=False, output_scores=True, return_dict_in_generate=True)
    return g.sequences[:, main.inputs["input_ids"].shape[1]:], torch.stack(g.scores)


@pytest.mark.parametrize("fam", ["llava", "qwen2_vl", "idefics3"])
def test_cfg_mix_of_two_plain_passes_equals_hand_reference(fam):
    model = tiny(fam)
    main = make_batch(fam, model, (1,), seed=0)
    second = make_batch(fam, model, (0,), seed=5, text_lens=[9])  # text only: the unconditional branch
    with torch.no_grad():
        new, scores = _mixed_generate(model, main, second)
        a = _forced(model, main.inputs, new)
        b = _forced(model, second.inputs, new)
    ref = _hand_cfg(_suppressed(model, a), b)
    assert torch.equal(new[0], ref.argmax(-1)[:, 0])
    assert _close(scores, ref)
    fin = torch.isfinite(ref)
    assert (ref - _hand_cfg(_suppressed(model, a), a))[fin].abs().max() > 1e-2  # the second pass moves the logits


@pytest.mark.parametrize("fam", ["llava", "qwen2_vl"])
def test_record_in_one_pass_and_drop_in_the_other_keep_their_own_state(fam):
    """Pass "main" records, pass "second" drops image tokens (FastV): each pass's decode steps use their own
    prompt, layout and kept tokens, though the forwards alternate."""
    model = tiny(fam)
    main = make_batch(fam, model, (1,), seed=0, text_lens=[6])
    second = make_batch(fam, model, (2,), seed=3, text_lens=[10])  # another prompt, two images
    methods = [vlmplug.Record(), vlmplug.FastV(layer=1, keep_ratio=0.5)]
    with torch.no_grad():
        with vlmplug.apply(model, methods, passes={"record": ["main"], "fastv": ["second"]}) as h:
            new, scores = _mixed_generate(model, main, second)
            st_main, st_second = h.session.state_of("main"), h.session.state_of("second")
            maps = h.result("record")
            assert st_main.keep is None and st_second.keep is not None  # fastv acted in its pass only
            assert torch.equal(st_main.input_ids, main.inputs["input_ids"])
            assert torch.equal(st_second.input_ids, second.inputs["input_ids"])
            assert st_main.logical_len == main.inputs["input_ids"].shape[1] + STEPS - 1
            assert st_second.logical_len == second.inputs["input_ids"].shape[1] + STEPS - 1
            kept_second = st_second.keep.clone()
            assert h.result("record", label="second") is None  # record did not act in pass "second"
        # each pass alone, fed the same tokens
        with vlmplug.apply(model, vlmplug.Record()) as h1:
            a = _forced(model, main.inputs, new)
            maps_alone = h1.result("record")
        with vlmplug.apply(model, vlmplug.FastV(layer=1, keep_ratio=0.5)) as h2:
            b = _forced(model, second.inputs, new)
            assert torch.equal(h2.session.state.keep, kept_second)
    ref = _hand_cfg(_suppressed(model, a), b)
    assert torch.equal(new[0], ref.argmax(-1)[:, 0])
    assert _close(scores, ref)
    # record's maps of the main pass's last decode step equal the main prompt recorded alone
    assert maps.layers == maps_alone.layers == [0, 1]
    for li in maps.layers:
        assert torch.allclose(maps.rows[li], maps_alone.rows[li], atol=1e-6)
    im = maps.image(0, 0)
    assert im.shape[0] == 2 and torch.allclose(im, maps_alone.image(0, 0), atol=1e-6)


def test_pass_labels_and_names_are_checked():
    model = tiny("llava")
    with pytest.raises(vlmplug.MethodConfigError, match="not applied"):
        vlmplug.apply(model, "record", passes={"fastv": ["x"]})
    with pytest.raises(vlmplug.MethodConfigError, match="pass labels"):
        vlmplug.apply(model, "record", passes={"record": [""]})
    assert "_vlmplug_handle" not in vars(model)
    with vlmplug.apply(model, "record") as h:
        with pytest.raises(vlmplug.MethodConfigError, match="non-empty string"):
            with h.pass_(""):
                pass


def test_vlmplug_generate_runs_a_second_pass():
    """The pipeline's `second=` builds the PassMix from a prompt and image, like the main pass."""
    model, processor = vlmplug.load("world")
    from vlmplug.world import sample_scene

    image, _ = sample_scene()
    plain = vlmplug.generate(model, processor, image, "What color is the circle?", max_new_tokens=3)
    same = vlmplug.generate(model, processor, image, "What color is the circle?", max_new_tokens=3,
                            second=dict(prompt="What color is the circle?", image=image, mix=lambda a, b: a))
    assert same == plain  # a mix that keeps the main logits changes nothing
    info = generate_info(model, processor, image, "What color is the circle?", methods=["record"],
                                          max_new_tokens=2,
                                          second=dict(prompt="What color is the circle?", label="uncond"))
    assert info["results"]["record"] is not None and info["results"]["record"].layers



def test_a_passmix_reused_for_a_second_generate_starts_again():
    model = tiny("llava")
    main = make_batch("llava", model, (1,), seed=0)
    longer = make_batch("llava", model, (1,), seed=2, text_lens=[12])
    second = make_batch("llava", model, (0,), seed=5, text_lens=[9])
    pm = PassMix(model, second.inputs, mix=vlmplug.cfg_mix(GAMMA))
    gen = dict(max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        for inputs in (main.inputs, main.inputs, longer.inputs):  # same prompt again, then a longer one
            reused = model.generate(**inputs, logits_processor=LogitsProcessorList([pm]), **gen)
            fresh = model.generate(**inputs, logits_processor=LogitsProcessorList(
                [PassMix(model, second.inputs, mix=vlmplug.cfg_mix(GAMMA))]), **gen)
            assert torch.equal(reused.sequences, fresh.sequences)
            for a, b in zip(reused.scores, fresh.scores):
                assert torch.equal(a, b)


def test_passmix_needs_its_own_label():
    model = tiny("llava")
    second = make_batch("llava", model, (0,))
    with pytest.raises(vlmplug.MethodConfigError, match="its own label"):
        PassMix(model, second.inputs, label="main")
