"""Fuzzed inputs (hypothesis): method parameters of every type and boundary, images of any size, aspect and mode,
prompts of any text, batches of any shape and either padding side. Every call either works or raises a
`VlmplugError`; after an error the model is exactly as before (nothing left patched); nothing crashes or hangs.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

import vlmplug
from conftest import tiny
from test_contract import _assert_restored, _snapshot
from vlmplug.errors import VlmplugError
from vlmplug.pipeline import generate_info, prepare_batch, prepare_inputs
from vlmplug.registry import method_registry
from vlmplug.testing.tiny import make_batch

def fuzz(n: int):
    """Seeded (the same examples every run: CI never meets a new one by chance), no per-example deadline."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

VALUES = st.one_of(
    st.sampled_from([0, 1, -1, 2, 0.0, 1.0, 0.5, -0.5, 1e-12, 1e12, 10**9, float("nan"), float("inf"),
                     -float("inf"), True, False, None, "", "0:", "1:", "-1:", "2:-1", ":", "all", "x", [], [0], [1, 0],
                     [-1], [10**6], (0, 1), {"a": 1}, [[0, 1]], "paper", "code"]),
    st.integers(-10**4, 10**4),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.text(max_size=4),
    st.lists(st.integers(-3, 6), max_size=3),
)


@pytest.fixture(scope="module")
def world():
    from vlmplug.world import load_world

    return load_world()


def _settled(family: str):
    """The tiny model after one forward asking for attentions and hidden states: transformers installs its own
    output-capturing hooks lazily, once, the first time anything asks (a method reading the vision tower's attentions
    does); counted before that, they would look like hooks a method left behind."""
    model = tiny(family)
    batch = make_batch(family, model, (1, 1), seed=1)
    if not getattr(model, "_fuzz_settled", False):
        with torch.no_grad():
            model(**batch.inputs, output_attentions=True, output_hidden_states=True)
        model._fuzz_settled = True
    return model, batch


def _no_handle(model) -> None:
    assert "_vlmplug_handle" not in vars(model), "a failed call left the model patched"


@fuzz(200)
@given(data=st.data())
def test_any_method_parameters_work_or_raise_a_vlmplug_error(data):
    """Any method, any subset of its fields set to anything: apply -> generate -> remove works, or apply refuses
    with a VlmplugError and the model is untouched."""
    model, batch = _settled("llava")
    name = data.draw(st.sampled_from(sorted(method_registry())), label="method")
    fields = [f.name for f in dataclasses.fields(method_registry()[name])]
    chosen = data.draw(st.lists(st.sampled_from(fields), unique=True, max_size=3), label="fields") if fields else []
    params = {k: data.draw(VALUES, label=k) for k in chosen}
    before = _snapshot(model)
    try:
        with vlmplug.apply(model, name, **params):
            with torch.no_grad():
                out = model.generate(**batch.inputs, max_new_tokens=2, do_sample=False)
        assert out.shape[0] == 2
        event("ran")
    except VlmplugError as e:
        event(f"refused: {type(e).__name__}")
    _assert_restored(model, before)


IMAGE_MODES = ("RGB", "L", "RGBA", "P", "LA", "1", "I", "F", "CMYK", "I;16")


def _image(w: int, h: int, mode: str, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    rgb = Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy(), "RGB")
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    if mode in ("I", "F", "I;16"):
        return rgb.convert("L").convert(mode)
    return rgb.convert(mode)


@fuzz(40)
@given(w=st.integers(1, 96), h=st.integers(1, 96), mode=st.sampled_from(IMAGE_MODES), seed=st.integers(0, 3),
       method=st.sampled_from([None, "fastv", "visionzip", "record"]))
def test_any_image_size_and_mode(world, w, h, mode, seed, method):
    model, processor = world
    try:
        info = generate_info(model, processor, _image(w, h, mode, seed), "What color is the circle?",
                                              methods=method, method_params={"keep_ratio": 0.5} if method in (
                                                  "fastv", "visionzip") else None, max_new_tokens=2)
        assert isinstance(info["text"], str)
        event("ran")
    except VlmplugError as e:
        event(f"refused: {type(e).__name__}")
    _no_handle(model)


@pytest.mark.parametrize("size", [(1, 1), (1, 4000), (4000, 1), (3, 700), (1000, 1000)])
def test_extreme_aspect_ratios(world, size):
    model, processor = world
    try:
        info = vlmplug.generate(model, processor, _image(*size, "RGB", 0), "What color is the circle?",
                                methods="fastv", method_params={"keep_ratio": 0.5}, max_new_tokens=2)
        assert isinstance(info, str)
    except VlmplugError as e:
        assert "aspect" in str(e) or "size" in str(e)
    _no_handle(model)


def test_a_method_parameter_given_to_generate_says_where_it_goes(world):
    model, processor = world
    with pytest.raises(VlmplugError, match=r"keep_ratio is a parameter of fastv, not of generate\(\): pass "
                                           r"method_params=\{'keep_ratio': 0.5\}"):
        vlmplug.generate(model, processor, _image(64, 64, "RGB", 0), "What color is the circle?", methods="fastv",
                         keep_ratio=0.5)
    _no_handle(model)


PROMPT_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\n", "<image>", "<image> What is this? <image>", "USER: hi ASSISTANT:", "{query}",
                     "What color is the circle?" * 40, "\x00", "🙂🙂", "<s></s>", "<pad>"]),
)


@fuzz(60)
@given(prompt=PROMPT_TEXT, n_images=st.integers(0, 3), method=st.sampled_from([None, "fastv", "pai", "record"]))
def test_any_prompt_and_number_of_images(world, prompt, n_images, method):
    model, processor = world
    images = [_image(64, 64, "RGB", i) for i in range(n_images)]
    params = {"keep_ratio": 0.5} if method == "fastv" else ({"layers": "1:", "gamma": 1.0} if method == "pai" else None)
    try:
        info = generate_info(model, processor, images, prompt, methods=method, method_params=params,
                                              max_new_tokens=2)
        assert isinstance(info["text"], str)
        event("ran")
    except VlmplugError as e:
        event(f"refused: {type(e).__name__}")
    _no_handle(model)


@fuzz(30)
@given(n=st.integers(1, 4), side=st.sampled_from(["left", "right"]), data=st.data(),
       method=st.sampled_from(["fastv", "cluster", "pai", "record", "plphp"]))
def test_any_batch_shape_and_padding_side(world, n, side, data, method):
    """Batches of 1-4 prompts of different lengths, 0-2 images each, padded on either side, under a method: each
    sample gets what it gets alone (left padding: the greedy answer; right padding, which generate() itself does
    not support: vlmplug refuses a right-padded prompt with an InputError, and an unpadded batch's last logits equal
    each prompt's alone), or the call raises a VlmplugError."""
    model, processor = world
    counts = [data.draw(st.integers(0, 2), label=f"images{i}") for i in range(n)]
    words = ["What color is the circle?", "Is there a red square?", "How many stars are there?", "Where is the star?"]
    prompts = [words[i % len(words)] + " " * i for i in range(n)]
    images = [[_image(64, 64, "RGB", 10 * i + j) for j in range(c)] for i, c in enumerate(counts)]
    params = {"keep_ratio": 0.5} if method in ("fastv", "cluster", "plphp") else (
        {"layers": "1:", "gamma": 1.0} if method == "pai" else {})
    old = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = side
    try:
        inputs = prepare_batch(model, processor, images, prompts)
    finally:
        processor.tokenizer.padding_side = old
    try:
        with vlmplug.apply(model, method, processor=processor, **params):
            with torch.no_grad():
                if side == "left":
                    out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
                else:
                    logits = model(**inputs).logits
    except VlmplugError as e:
        event(f"refused: {type(e).__name__} ({side})")
        _no_handle(model)
        return
    event(f"ran ({side})")
    for i in range(n):
        alone = prepare_inputs(model, processor, images[i], prompts[i])
        with vlmplug.apply(model, method, processor=processor, **params):
            with torch.no_grad():
                if side == "left":
                    ref = model.generate(**alone, max_new_tokens=2, do_sample=False)
                    got = out[i, inputs["input_ids"].shape[1]:]
                    assert torch.equal(got, ref[0, alone["input_ids"].shape[1]:]), (i, counts)
                else:
                    ref = model(**alone).logits[0, -1]
                    # only an unpadded batch gets here (right padding is refused): the last position is every prompt's
                    # end (pruning methods return logits for the kept positions only)
                    assert bool(inputs["attention_mask"].all())
                    torch.testing.assert_close(logits[i, -1], ref, atol=1e-4, rtol=1e-4, msg=str((i, counts)))
    _no_handle(model)
