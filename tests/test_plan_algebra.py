"""The plan algebra the redistribution / head methods stand on: exclusive edits refused at apply(), two-phase
planning from this call's own attention, per-call masks, and the one layer / head selection type."""
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import vlmplug
from conftest import tiny
from reference import eager_attentions, eager_kernel
from vlmplug.backend.plan import LayerPlan, PlanConflict, Redistribute, head_scale_tensor
from vlmplug.methods.base import Method
from vlmplug.selection import check_selection, resolve
from vlmplug.testing.tiny import make_batch


@dataclass
class Sinker(Method):
    """Test method: moves mass from the first real token to the image, in chosen layers (declared or not)."""

    name: ClassVar[str] = "_sinker"
    layers: tuple = (0, 1)
    declare: bool = True
    fraction: float = 0.5

    def edit_layers(self):
        return {"redistribute": set(self.layers)} if self.declare else {}

    def layer_plan(self, ctx):
        if ctx.layer_idx not in self.layers or ctx.layout is None:
            return None
        first = torch.tensor([s.first_real for s in ctx.layout.samples], device=ctx.device)
        sinks = ctx.k_pos == first[:, None]
        return LayerPlan(redistribute=Redistribute(sinks, ctx.image_keys, torch.full((ctx.num_heads,), self.fraction)))


@dataclass
class Sinker2(Sinker):
    name: ClassVar[str] = "_sinker2"


def _untouched(model):
    assert "_vlmplug_handle" not in vars(model)
    assert model.config.get_text_config()._attn_implementation == "sdpa"
    assert not model.base_model._forward_pre_hooks


def test_two_redistributions_in_one_layer_are_refused_before_patching():
    model = tiny("llava")
    with pytest.raises(vlmplug.MethodConfigError, match=r"_sinker and _sinker2 both redistribute or amplify attention in \[1\]"):
        vlmplug.apply(model, [Sinker(layers=(0, 1)), Sinker2(layers=(1,))])
    _untouched(model)
    # different layers, or different passes: allowed
    batch = make_batch("llava", model, (1,))
    for methods, passes in (([Sinker(layers=(0,)), Sinker2(layers=(1,))], None),
                            ([Sinker(), Sinker2()], {"_sinker": ["main"], "_sinker2": ["other"]})):
        with vlmplug.apply(model, methods, passes=passes), torch.no_grad():
            model(**batch.inputs)
    # an undeclared overlap still fails loudly at the forward, never silently
    with vlmplug.apply(model, [Sinker(declare=False), Sinker2(declare=False)]), torch.no_grad():
        with pytest.raises(PlanConflict, match="redistribute"):
            model(**batch.inputs)


def test_head_scales_merge_per_row():
    rows = torch.tensor([[True, False, True]])
    a = head_scale_tensor(torch.tensor([2.0, 3.0]), rows)  # [1, 2, 3]
    assert torch.equal(a, torch.tensor([[[2.0, 1.0, 2.0], [3.0, 1.0, 3.0]]]))
    plan = LayerPlan(head_scale=a)
    plan.merge(LayerPlan(head_scale=torch.tensor([0.5, 10.0])))
    assert torch.equal(plan.head_scale, torch.tensor([[[1.0, 0.5, 1.0], [30.0, 10.0, 30.0]]]))


@dataclass
class TwoPhase(Method):
    """Test method: reads this call's attention for the last real token, then makes each head's most attended key
    its sink and moves half of that mass to the image (a per-head choice from the attention it edits)."""

    name: ClassVar[str] = "_twophase"
    seen: dict = None

    def layer_plan(self, ctx):
        if ctx.layout is None or ctx.phase != "prefill":
            return None
        sel = torch.zeros(ctx.batch, ctx.q_len, dtype=torch.bool)
        for b, s in enumerate(ctx.layout.samples):
            sel[b, s.last_real] = True
        att = ctx.attention(sel)  # [B, Hq, S], before this call's edits
        if self.seen is None:
            self.seen = {}
        self.seen[ctx.layer_idx] = att
        top = att.masked_fill(ctx.image_keys[:, None, :], -1).argmax(-1)  # most attended non-image key per head
        sinks = torch.zeros_like(att, dtype=torch.bool).scatter_(2, top[..., None], True)
        return LayerPlan(redistribute=Redistribute(sinks, ctx.image_keys, torch.full((ctx.num_heads,), 0.5)))


@pytest.mark.parametrize("fam", ["llava", "qwen2_vl"])
def test_two_phase_planning_sees_this_calls_attention(fam):
    model = tiny(fam)
    batch = make_batch(fam, model, (1, 2))
    with torch.no_grad():
        plain_att = eager_attentions(model, batch.inputs)
        plain = model(**batch.inputs).logits
    fast, ref = TwoPhase(), TwoPhase()
    with vlmplug.apply(model, fast), torch.no_grad():
        out = model(**batch.inputs).logits
    with vlmplug.apply(model, ref) as h, torch.no_grad():
        h.session.kernel = eager_kernel
        out_ref = model(**batch.inputs).logits
    real = batch.inputs["attention_mask"].bool()
    assert (out - out_ref)[real].abs().max() <= 1e-5 and (out - plain)[real].abs().max() > 1e-3
    # layer 0 is unedited before it runs: its rows equal the unpatched model's eager attention
    last = batch.inputs["attention_mask"].shape[1] - 1
    assert torch.allclose(fast.seen[0], plain_att[0][:, :, last].float(), atol=1e-6)
    # layer 1 sees the attention of the edited model (its input changed), identical in both kernels
    assert torch.allclose(fast.seen[1], ref.seen[1], atol=1e-5)


@dataclass
class Masks(Method):
    name: ClassVar[str] = "_masks"
    seen: list = None

    def layer_plan(self, ctx):
        if self.seen is None:
            self.seen = []
        self.seen.append((ctx.phase, ctx.q_pos.clone(), ctx.k_pos.clone(), ctx.image_keys, ctx.text_queries,
                          ctx.image_keys is ctx.image_keys))
        return None


def test_image_and_text_masks_follow_the_layout():
    model = tiny("llava")
    batch = make_batch("llava", model, (1, 2))
    m = Masks()
    with vlmplug.apply(model, m) as h, torch.no_grad():
        model.generate(**batch.inputs, max_new_tokens=2, do_sample=False)
        lay = h.layout
    am = batch.inputs["attention_mask"].bool()
    for phase, q_pos, k_pos, image_keys, text_queries, cached in m.seen:
        assert cached  # computed once per call
        for b, s in enumerate(lay.samples):
            img = set(s.image_positions.tolist())
            assert image_keys[b].tolist() == [int(p) in img for p in k_pos[b]]
            want = [(int(p) not in img) and (int(p) >= s.first_real) for p in q_pos[b]]
            assert text_queries[b].tolist() == want
            if phase == "prefill":
                assert text_queries[b].sum() == am[b].sum() - len(img)


def test_selection_type():
    assert resolve("m", "layers", None, 4) == [0, 1, 2, 3]
    assert resolve("m", "layers", "all", 4) == [0, 1, 2, 3]
    assert resolve("m", "layers", -1, 4) == [3]
    assert resolve("m", "layers", [0, -1, 3], 4) == [0, 3]
    assert resolve("m", "layers", "2:", 5) == [2, 3, 4]
    assert resolve("m", "layers", ":-2", 5) == [0, 1, 2]
    assert resolve("m", "layers", "::2", 5) == [0, 2, 4]
    assert resolve("m", "heads", range(1, 3), 4, "heads") == [1, 2]
    with pytest.raises(vlmplug.MethodConfigError, match=r"m: layers=\[4\] names \[4\]; this model has decoder layers 0..3"):
        resolve("m", "layers", [4], 4)
    with pytest.raises(vlmplug.MethodConfigError, match="selects none"):
        resolve("m", "layers", "7:", 4)
    for bad in ("x", [], [1.5], True, "1:2:0", {1: 2}):
        with pytest.raises(vlmplug.MethodConfigError, match="m: layers="):
            check_selection("m", "layers", bad)
    # record takes the shared type
    model = tiny("llava")
    batch = make_batch("llava", model, (1,))
    with vlmplug.apply(model, vlmplug.Record(layers="1:")) as h, torch.no_grad():
        model(**batch.inputs)
        assert h.result("record").layers == [1]


def test_droppers_must_not_meet_in_any_pass():
    model = tiny("llava")
    x = [vlmplug.VisionZip(keep_tokens=2), vlmplug.Cluster(keep_tokens=2), vlmplug.HiPrune(keep_tokens=2, object_layer=0)]
    with pytest.raises(vlmplug.MethodConfigError, match="each choose which tokens to drop"):  # pairwise, not n-way
        vlmplug.apply(model, x, passes={"visionzip": ["a", "b"], "cluster": ["b", "c"], "hiprune": ["a", "c"]})
    _untouched(model)
    gemma = tiny("gemma3")  # its pre-LLM cut is layer 1 (sliding layer 0), fastv's layer too: one selection layer
    with pytest.raises(vlmplug.MethodConfigError, match="pre-LLM selection and an in-LLM one"):
        vlmplug.apply(gemma, [vlmplug.Cluster(), vlmplug.FastV(layer=1)], passes={"cluster": ["a"], "fastv": ["b"]})
    assert "_vlmplug_handle" not in vars(gemma)
    batch = make_batch("llava", model, (1,))
    with vlmplug.apply(model, x[:2], passes={"visionzip": ["main"], "cluster": ["other"]}) as h, torch.no_grad():
        model(**batch.inputs)
        assert h.session.state.keep is not None


def test_a_forward_that_raised_leaves_the_next_one_clean():
    """A forward that fails midway (here a plan conflict) must not leave the session 'inside a forward': the next
    generate() would apply its feature plans to the previous prompt's layout."""
    model = tiny("llava")
    a = make_batch("llava", model, (1,), seed=0)
    b = make_batch("llava", model, (1,), seed=4, text_lens=[11])
    with torch.no_grad():
        with vlmplug.apply(model, [Sinker(declare=False), Sinker2(declare=False), vlmplug.Cluster(keep_tokens=2)]) as h:
            with pytest.raises(PlanConflict):
                model(**a.inputs)
            assert not h.session.in_forward
            h.method("_sinker2").layers = ()  # no conflict any more
            h.method("_sinker").layers = ()
            got = model.generate(**b.inputs, max_new_tokens=3, do_sample=False)
        with vlmplug.apply(model, vlmplug.Cluster(keep_tokens=2)):
            want = model.generate(**b.inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(got, want)


def test_image_keys_per_query_head_on_a_pruned_cache():
    model = tiny("llava")  # GQA: 4 query heads, 2 KV heads
    batch = make_batch("llava", model, (1, 1))
    m = Masks()
    with vlmplug.apply(model, [m, vlmplug.PLPHP(start_layer=1, keep_tokens=2)]) as h, torch.no_grad():
        model.generate(**batch.inputs, max_new_tokens=2, do_sample=False)
        lay = h.layout
    per_head = [s for s in m.seen if s[2].dim() == 3]  # decode calls of the pruned layer
    assert per_head
    for phase, q_pos, k_pos, image_keys, text_queries, cached in per_head:
        B, Hkv, S = k_pos.shape
        assert image_keys.shape == (B, 2 * Hkv, S)
        for b, s in enumerate(lay.samples):
            img = set(s.image_positions.tolist())
            for hq in range(2 * Hkv):
                assert image_keys[b, hq].tolist() == [int(p) in img for p in k_pos[b, hq // 2]]
