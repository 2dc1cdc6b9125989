"""Beam search with the pre-LLM methods. generate() repeats each prompt's rows for the beams, either after
encoding the images once (transformers 5.2x) or together with them (5.17): the layout must tell which, and
every copy of a row must get its original's selection and merged features. References: the first beam's
step-0 scores equal the log-softmax of the same method's greedy first-step logits; every beam's every step equals a
teacher-forced forward of its sample alone."""
import warnings

import pytest
import torch
import transformers

import vlmplug
from conftest import FAMILIES, tiny
from vlmplug.testing.tiny import make_batch

METHODS = ["hiprune", "visionzip", "flowcut", "cluster"]
BEAMS = 3


def _first_step(model, inputs, beams):
    """Step-0 log-probabilities of greedy search (log-softmax of its logits) and of the first beam per sample."""
    greedy = model.generate(**inputs, max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True)
    out = model.generate(**inputs, max_new_tokens=3, num_beams=beams, do_sample=False, output_scores=True,
                         return_dict_in_generate=True)
    return torch.log_softmax(greedy.logits[0].float(), -1), out.scores[0][::beams].float()


def _close(ref, got):
    finite = torch.isfinite(got)  # beam search masks some tokens (e.g. special ones) with -inf
    return finite.float().mean() > 0.5 and (got[finite] - ref[finite]).abs().max() <= 1e-4


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fam", FAMILIES)
def test_beam_search_keeps_each_rows_selection(fam, method):
    model = tiny(fam)
    images = (2, 1, 0)
    batch = make_batch(fam, model, images)
    with torch.no_grad():
        if not _close(*_first_step(model, batch.inputs, BEAMS)):
            # transformers 5.17 repeats per-image pixel tensors (LLaVA, NeXT/OneVision, Gemma 3, InternVL) per
            # row for beams: there the unpatched model's beams already see the wrong images
            pytest.skip(f"transformers {transformers.__version__}: unpatched beams differ from greedy for {fam}")
    try:
        h = vlmplug.apply(model, method, keep_tokens=2, **({"object_layer": 0} if method == "hiprune" else {}))
    except vlmplug.MethodConfigError as e:
        pytest.skip(str(e))  # flowcut on a windowed tower
    with h, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # a layout that cannot be located would only warn
        greedy = model.generate(**batch.inputs, max_new_tokens=1, do_sample=False)
        kept_per_image = h.stats[method]["tokens_kept_per_image"]  # max_new_tokens=1: the prefill's stats
        keep_greedy = h.session.state.keep.clone()
        ref, got = _first_step(model, batch.inputs, BEAMS)
        keep_beams = h.session.state.keep
    assert greedy.shape[0] == len(images)
    assert kept_per_image == [[2] * n for n in images]  # tokens were dropped
    # every beam row keeps what its sample kept alone, and scores what greedy scored
    assert torch.equal(keep_beams, keep_greedy.repeat_interleave(BEAMS, 0))
    assert _close(ref, got)


@pytest.mark.parametrize("beams", [1, 2])
@pytest.mark.parametrize("method", ["cluster", "visionzip"])
@pytest.mark.parametrize("fam", FAMILIES)
def test_identical_rows_with_different_images(fam, method, beams):
    """Two rows with the same text and different images: each keeps its own image through generate(), with
    and without beams (which then repeat the two identical rows again). Reference: the patched forward,
    which encodes the images inside the forward, one per row."""
    from vlmplug.testing.tiny import _default_sizes

    model = tiny(fam)
    size = _default_sizes(fam)[0]
    batch = make_batch(fam, model, (1, 1), image_sizes=[[size], [size]], text_lens=[6, 6])
    inputs = dict(batch.inputs)
    for key in ("input_ids", "attention_mask"):
        inputs[key] = inputs[key].clone()
        inputs[key][1] = inputs[key][0]
    with vlmplug.apply(model, method, keep_tokens=2) as h, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        ref = model(**inputs).logits[:, -1].float()
        assert (ref[0] - ref[1]).abs().max() > 1e-4  # the images differ, so do the rows
        out = model.generate(**inputs, max_new_tokens=1, num_beams=beams, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        assert h.stats[method]["tokens_kept_per_image"] == [[2]] * (2 * beams)
    assert (out.logits[0].float()[::beams] - ref).abs().max() <= 1e-5


def _forced_logprobs(model, single, cont):
    """Log-probabilities a plain forward (no cache, no beams) gives the tokens `cont` appended to the sample alone."""
    inputs = dict(single.inputs)
    n = cont.numel()
    inputs["input_ids"] = torch.cat([inputs["input_ids"], cont[None]], 1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(1, n, dtype=inputs["attention_mask"].dtype)], 1)
    for key in ("mm_token_type_ids", "token_type_ids"):  # Qwen / Gemma 3: the new tokens are text
        if key in inputs:
            inputs[key] = torch.cat([inputs[key], torch.zeros(1, n, dtype=inputs[key].dtype)], 1)
    logits = model(**inputs).logits[0, -n - 1 : -1]  # the cut keeps every text token: the last n + 1 rows
    return torch.log_softmax(logits.float(), -1).gather(1, cont[:, None])[:, 0]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fam", FAMILIES)
def test_every_beam_scores_every_step_as_its_sample_alone(fam, method):
    """Every returned beam (num_return_sequences = beams), at every step: the log-probability beam search gave each
    token (compute_transition_scores, through the reordered KV cache) equals what a plain forward of the patched model
    gives the beam's whole sequence with its sample alone, without a cache (teacher forcing). A pre-LLM selection
    depends only on the sample's images, so it is the same for the prompt and the prompt plus the beam's tokens."""
    from vlmplug.testing.tiny import split_batch

    model = tiny(fam)
    images = (2, 1, 0)
    batch = make_batch(fam, model, images)
    with torch.no_grad():
        if not _close(*_first_step(model, batch.inputs, BEAMS)):
            pytest.skip(f"transformers {transformers.__version__}: unpatched beams differ from greedy for {fam}")
    try:
        h = vlmplug.apply(model, method, keep_tokens=2, **({"object_layer": 0} if method == "hiprune" else {}))
    except vlmplug.MethodConfigError as e:
        pytest.skip(str(e))
    eos = model.generation_config.eos_token_id
    L = batch.inputs["input_ids"].shape[1]
    checked = set()
    with h, torch.no_grad():
        out = model.generate(**batch.inputs, max_new_tokens=4, num_beams=BEAMS, num_return_sequences=BEAMS,
                             do_sample=False, output_scores=True, return_dict_in_generate=True)
        steps = model.compute_transition_scores(out.sequences, out.scores, out.beam_indices, normalize_logits=False)
        assert h.stats[method]["tokens_kept_per_image"] == [[2] * n for n in images for _ in range(BEAMS)]
        for b in range(len(images)):
            single = split_batch(batch, b)
            for j in range(BEAMS):
                r = b * BEAMS + j
                cont = out.sequences[r, L:]
                ends = torch.nonzero(cont == eos).flatten()
                cont = cont[: int(ends[0]) + 1] if ends.numel() else cont
                ref = _forced_logprobs(model, single, cont)
                got = steps[r, : cont.numel()]
                assert (got - ref).abs().max() <= 1e-5, (b, j, got, ref)
                checked |= {(j, t) for t in range(cont.numel())}
    assert {j for j, _ in checked} == set(range(BEAMS)) and max(t for _, t in checked) >= 1  # every beam, later steps
