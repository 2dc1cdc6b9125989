"""Each backend edit against its eager reference (tests/reference.py), on LLaVA (Llama text) and
Qwen2-VL (M-RoPE text) tiny models with GQA (4 query heads, 2 KV heads)."""
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch

import vlmplug
from conftest import tiny
from reference import eager_kernel, masked_eager_attention, register_reference
from vlmplug.backend.plan import Amplify, Gate, LayerPlan, PlanConflict, Probe, Redistribute, head_scale_tensor
from vlmplug.compat import output_cache
from vlmplug.methods.base import Method
from vlmplug.testing.tiny import make_batch

FAMS = ["llava", "qwen2_vl"]


@dataclass
class Edits(Method):
    """Test-only method that asks for any combination of edits on every text layer."""

    name: ClassVar[str] = "_edits"
    bias: float = 0.0
    fraction: float = 0.0
    head_scale: tuple | None = None
    probe: bool = False
    per_head: bool = False  # sinks / targets differ per query head; fraction per head and query row
    scale_rows: bool = False  # head scale only on some query rows, composed with a second, per-head scale
    amplify: float = 0.0  # PAI's s + alpha |s| on image keys, per head, on the last and some random query rows
    per_key: bool = False  # amplify with a strength per key (modPAI: two token sets, two strengths)
    gate: tuple | None = None  # (min_mass, min_share): redistribute only where the image gets enough (VAR)
    rows: dict = field(default_factory=dict)

    def layer_plan(self, ctx):
        lay = ctx.layout
        if lay is None:
            return None
        B, S = ctx.batch, ctx.kv_len
        img = torch.stack([torch.isin(ctx.k_pos[b], lay.samples[b].image_positions.to(ctx.device)) for b in range(B)])
        plan = LayerPlan()
        if self.bias:
            g = torch.Generator().manual_seed(1000 * ctx.layer_idx + S)
            plan.bias = (torch.rand(B, ctx.num_heads, S, generator=g) * self.bias * img[:, None, :]).to(ctx.device)
        if self.fraction:
            first = torch.tensor([s.first_real for s in lay.samples], device=ctx.device)
            sinks = ctx.k_pos == first[:, None]
            frac = torch.linspace(self.fraction / 2, self.fraction, ctx.num_heads)
            if self.per_head:  # odd heads also sink on the token after the first; even heads target every other image token
                H = ctx.num_heads
                odd = (torch.arange(H) % 2 == 1)[None, :, None]
                sinks = sinks[:, None, :] | (odd & (ctx.k_pos == first[:, None] + 1)[:, None, :])
                half = img & (ctx.k_pos % 2 == 0)
                targets = torch.where(odd, img[:, None, :], half[:, None, :])
                g = torch.Generator().manual_seed(31 + ctx.layer_idx)
                chosen = torch.rand(B, H, ctx.q_len, generator=g) < 0.6  # per (head, query row), like VAR's selection
                frac = frac[None, :, None] * chosen
                plan.redistribute = Redistribute(sinks=sinks, targets=targets, fraction=frac.to(ctx.device))
            else:
                plan.redistribute = Redistribute(sinks=sinks, targets=img, fraction=frac)
            if self.gate is not None:  # pool: every image token; targets: the even ones (odd ones act as image sinks)
                pool = img
                rd = plan.redistribute
                even, odd = img & (ctx.k_pos % 2 == 0), img & (ctx.k_pos % 2 == 1)
                if rd.sinks.dim() == 3:
                    even, odd = even[:, None, :], odd[:, None, :]
                rd.targets = rd.targets & even
                rd.sinks = rd.sinks | odd

                def seen(sel, li=ctx.layer_idx, ph=ctx.phase):
                    self.rows[("gate", li, ph)] = sel.float()

                plan.redistribute.gate = Gate(pool, self.gate[0], self.gate[1], seen)
        if self.amplify:
            g = torch.Generator().manual_seed(53 + ctx.layer_idx)
            rows = torch.rand(B, ctx.q_len, generator=g) < 0.3
            rows[:, -1] = True
            alpha = torch.linspace(self.amplify / 2, self.amplify, ctx.num_heads)
            if self.per_key:  # one strength on even image keys, another on odd ones, per head
                alpha = alpha[None, :, None] * torch.where(ctx.k_pos % 2 == 0, 1.0, 0.3)[:, None, :]
            plan.amplify = Amplify(keys=img, alpha=alpha, rows=rows.to(ctx.device))
        if self.head_scale is not None:
            plan.head_scale = torch.tensor(self.head_scale, dtype=torch.float32)
            if self.scale_rows:  # the first scale on the last query row only, then a second plan's scale merged in
                rows = torch.zeros(B, ctx.q_len, dtype=torch.bool)
                rows[:, -1] = True
                plan.head_scale = head_scale_tensor(plan.head_scale, rows)
                plan.merge(LayerPlan(head_scale=torch.linspace(0.5, 1.5, ctx.num_heads)))
        if self.probe:
            sel = torch.ones(B, ctx.q_len, dtype=torch.bool)
            sel[:, : ctx.q_len // 3] = False

            def cb(p, c, li=ctx.layer_idx):
                self.rows[(li, ctx.phase)] = p

            plan.probes.append(Probe(sel, cb))
        return plan


def _run(model, inputs, method, kernel=None, gen=False):
    with vlmplug.apply(model, method) as h, torch.no_grad():
        if kernel is not None:
            h.session.kernel = kernel
        if gen:
            return model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
        return model(**inputs).logits


EDITS = {
    "bias": dict(bias=3.0),
    "redistribute": dict(fraction=0.6),
    "head_scale": dict(head_scale=(0.0, 0.5, 1.0, 2.0)),
    "all": dict(bias=2.0, fraction=0.4, head_scale=(1.5, 1.0, 0.5, 1.0), probe=True),
    "per_head_rows": dict(fraction=0.7, per_head=True, head_scale=(0.0, 2.0, 1.0, 0.5), scale_rows=True),
    "amplify": dict(amplify=0.9),
    "amplify_per_key": dict(amplify=0.9, per_key=True),
    "gated_redistribution": dict(fraction=0.8, gate=(0.2, 0.5)),
    "gated_per_head": dict(fraction=0.8, per_head=True, gate=(0.1, 0.4), probe=True),
    "amplify_bias_probe_scale": dict(amplify=0.7, bias=2.0, probe=True, head_scale=(1.5, 1.0, 0.5, 1.0),
                                     scale_rows=True),
    "all_per_head": dict(bias=2.0, fraction=0.5, per_head=True, head_scale=(1.5, 1.0, 0.5, 1.0), scale_rows=True,
                         probe=True),
}


@pytest.fixture(params=["auto", "columns", "rows"])
def rd_path(request, monkeypatch):
    """How the kernel carries a redistribution: its own choice, extra SDPA value columns for every row, or explicit
    softmax rows (both must equal the reference)."""
    from vlmplug.backend import kernels

    if request.param == "columns":
        monkeypatch.setattr(kernels, "EXPLICIT_MAX_ROWS", -1)
        monkeypatch.setattr(kernels, "EXPLICIT_ROW_SHARE", -1.0)
    elif request.param == "rows":
        monkeypatch.setattr(kernels, "EXPLICIT_MAX_ROWS", 10**9)
    return request.param


@pytest.mark.parametrize("fam", FAMS)
@pytest.mark.parametrize("edit", list(EDITS))
def test_edit_matches_eager_reference(fam, edit, rd_path):
    if rd_path != "auto" and not EDITS[edit].get("fraction"):
        pytest.skip("no redistribution in this edit")
    model = tiny(fam)
    batch = make_batch(fam, model, (1, 2))
    real = batch.inputs["attention_mask"].bool()
    with torch.no_grad():
        plain = model(**batch.inputs).logits
    fast_m, ref_m = Edits(**EDITS[edit]), Edits(**EDITS[edit])
    fast = _run(model, batch.inputs, fast_m)
    ref = _run(model, batch.inputs, ref_m, kernel=eager_kernel)
    assert (fast - ref)[real].abs().max() <= 1e-5
    assert (fast - plain)[real].abs().max() > 1e-3  # the edit really changes the model
    for key in fast_m.rows:
        assert torch.allclose(fast_m.rows[key], ref_m.rows[key], atol=1e-6)
    gates = [v for k, v in fast_m.rows.items() if k[0] == "gate"]
    if EDITS[edit].get("gate"):  # the gate chose some (head, row) pairs and refused others
        assert gates and 0 < float(torch.cat([g.flatten() for g in gates]).mean()) < 1
    # through generate() and the KV cache (decode steps have q_len == 1)
    g_fast = _run(model, batch.inputs, Edits(**EDITS[edit]), gen=True)
    g_ref = _run(model, batch.inputs, Edits(**EDITS[edit]), kernel=eager_kernel, gen=True)
    assert torch.equal(g_fast.sequences, g_ref.sequences)
    for a, b in zip(g_fast.logits, g_ref.logits):
        assert (a - b).abs().max() <= 1e-4


@pytest.mark.parametrize("fam", FAMS)
def test_reference_kernel_is_faithful(fam):
    """With no edits the eager reference reproduces the unpatched model (validates the reference)."""
    model = tiny(fam)
    batch = make_batch(fam, model, (1, 2))
    real = batch.inputs["attention_mask"].bool()
    with torch.no_grad():
        plain = model(**batch.inputs).logits
    ref = _run(model, batch.inputs, Edits(probe=True), kernel=eager_kernel)
    assert (ref - plain)[real].abs().max() <= 1e-5


@dataclass
class Drop(Method):
    name: ClassVar[str] = "_drop"
    K: int = 1

    def __post_init__(self):
        self.drop_layer = self.K

    def tokens_to_keep(self, ctx):
        lay = ctx.layout
        keep = []
        for b in range(ctx.batch):
            img = lay.samples[b].image_positions
            dropped = img[1::2]
            k = torch.arange(ctx.q_len)
            keep.append(k[~torch.isin(k, dropped)])
        self.dropped = torch.zeros(ctx.batch, ctx.q_len, dtype=torch.bool)
        for b in range(ctx.batch):
            self.dropped[b, lay.samples[b].image_positions[1::2]] = True
        return torch.stack(keep)


@pytest.mark.parametrize("fam", FAMS)
def test_drop_matches_masked_eager(fam):
    model = tiny(fam)
    batch = make_batch(fam, model, (1, 1))
    m = Drop(K=1)
    with vlmplug.apply(model, m) as h, torch.no_grad():
        out = model(**batch.inputs).logits
        g = model.generate(**batch.inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
        cache = output_cache(g)
        lens = [cache.layers[i].keys.shape[2] for i in range(len(cache.layers))]
    L = batch.inputs["input_ids"].shape[1]
    n_drop = int(m.dropped[0].sum())
    assert n_drop > 0 and out.shape[1] == L - n_drop
    assert lens[0] == L + 3 and lens[1] == L - n_drop + 3
    register_reference("refmask", masked_eager_attention(drop_from_layer=1, dropped=m.dropped))
    model.set_attn_implementation({"text_config": "refmask"})
    try:
        with torch.no_grad():
            ref = model(**batch.inputs).logits
            gr = model.generate(**batch.inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
    assert (out[:, -1] - ref[:, -1]).abs().max() <= 1e-5
    assert torch.equal(g.sequences, gr.sequences)
    for a, b in zip(g.logits, gr.logits):
        assert (a - b).abs().max() <= 1e-4


@dataclass
class KVPrune(Method):
    name: ClassVar[str] = "_kv"
    keep: int = 6
    kv_prune_layers: ClassVar[tuple] = (1,)

    def kv_keep(self, ctx):
        g = torch.Generator().manual_seed(7)
        B, H, L = ctx.batch, ctx.num_kv_heads, ctx.q_len
        # a different random subset per sample and KV head; the last prompt token always stays
        score = torch.rand(B, H, L, generator=g)
        score[..., -1] = 2.0
        idx = score.topk(self.keep, dim=-1).indices.sort(-1).values
        self.dropped = torch.ones(B, H, L, dtype=torch.bool).scatter(2, idx, False)
        return idx


@pytest.mark.parametrize("fam", FAMS)
def test_kv_prune_matches_masked_eager(fam):
    model = tiny(fam)
    batch = make_batch(fam, model, (1, 1))  # different text lengths: left padding, so decode masks exist
    m = KVPrune(keep=6)
    with vlmplug.apply(model, m), torch.no_grad():
        g = model.generate(**batch.inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
        lens = [layer.keys.shape[2] for layer in output_cache(g).layers]
    L = batch.inputs["input_ids"].shape[1]
    assert lens == [L + 3, 6 + 3]
    register_reference("refkv", masked_eager_attention(kv_drop={1: m.dropped}))
    model.set_attn_implementation({"text_config": "refkv"})
    try:
        with torch.no_grad():
            gr = model.generate(**batch.inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
    assert torch.equal(g.sequences, gr.sequences)
    for a, b in zip(g.logits, gr.logits):
        assert (a - b).abs().max() <= 1e-4


@dataclass
class VisionProbe(Method):
    name: ClassVar[str] = "_vprobe"
    needs_vision_attention: ClassVar[bool] = True
    got: dict = field(default_factory=dict)

    def vision_plan(self, ctx):
        every = torch.ones(ctx.batch, ctx.q_len, dtype=torch.bool)
        first = torch.zeros(ctx.batch, ctx.q_len, dtype=torch.bool)
        first[:, 0] = True
        store = self.got.setdefault(ctx.layer_idx, [])
        return LayerPlan(probes=[Probe(every, lambda p, c: store.append(("mean", p))), Probe(first, lambda p, c: store.append(("first", p)))])


@pytest.mark.parametrize("fam", FAMS)
def test_vision_probes_match_eager_weights(fam):
    model = tiny(fam)
    batch = make_batch(fam, model, (1, 2))
    captured = {}

    def capture(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        from reference import eager_softmax

        a = eager_softmax(module, query, key, attention_mask, scaling, dict(kwargs, is_causal=False))
        captured.setdefault(id(module), []).append(a.float())
        out = (a @ value.double().repeat_interleave(query.shape[1] // value.shape[1], 1)).to(query.dtype)
        return out.transpose(1, 2).contiguous(), None

    register_reference("refvision", capture)
    m = VisionProbe()
    with vlmplug.apply(model, m) as h, torch.no_grad():
        out = model(**batch.inputs).logits
        mods = h.session.adapter.vision_attention_modules()
    with torch.no_grad():
        plain = model(**batch.inputs).logits
    assert torch.equal(out, plain)  # probing the vision tower changes nothing
    model.set_attn_implementation({"vision_config": "refvision"})
    try:
        with torch.no_grad():
            model(**batch.inputs)
    finally:
        model.set_attn_implementation({"vision_config": "sdpa"})
    assert len(m.got) == len(mods) >= 2
    for i, mod in enumerate(mods):
        refs = captured[id(mod)]
        mine = m.got[i]
        assert len(mine) == 2 * len(refs)
        for j, a in enumerate(refs):
            assert torch.allclose(mine[2 * j][1], a.mean(2), atol=1e-6)  # mean attention each key receives
            assert torch.allclose(mine[2 * j + 1][1], a[:, :, 0], atol=1e-6)  # the first (CLS) query's row


@dataclass
class PreDrop(Method):
    """Test-only pre-LLM selection: every other image token is removed before the LLM."""

    name: ClassVar[str] = "_predrop"
    hide_before: ClassVar[bool] = True

    cut: str = "pre"

    def setup(self, adapter):  # "pre": before layer 0 where the model allows; "one": masked layer 0, cut before 1
        self.drop_layer = adapter.pre_llm_drop_layer if self.cut == "pre" else adapter.min_drop_layer

    def tokens_to_keep(self, ctx):
        lay = ctx.layout
        self.dropped = torch.zeros(ctx.batch, ctx.q_len, dtype=torch.bool)
        keeps = []
        for b in range(ctx.batch):
            img = lay.samples[b].image_positions
            self.dropped[b, img[1::2]] = True
            keeps.append(torch.nonzero(~self.dropped[b]).flatten())
        return keeps


@pytest.mark.parametrize("cut", ["pre", "one"])
@pytest.mark.parametrize("fam", FAMS + ["gemma3"])
def test_pre_llm_drop_matches_masked_eager_from_layer_0(fam, cut):
    model = tiny(fam)
    batch = make_batch(fam, model, (2, 1))  # ragged budgets across the batch, left padding
    m = PreDrop(cut)
    with vlmplug.apply(model, m), torch.no_grad():
        out = model(**batch.inputs).logits[:, -1]
        g = model.generate(**batch.inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    register_reference("refpre", masked_eager_attention(drop_from_layer=0, dropped=m.dropped))
    model.set_attn_implementation({"text_config": "refpre"})
    try:
        with torch.no_grad():
            ref = model(**batch.inputs).logits[:, -1]
            if fam == "gemma3":
                # Gemma 3's tiny sliding window (8) is shorter than the prompt: while decoding, our pruned
                # sliding cache counts kept tokens, the reference counts original positions (documented).
                gr = None
            else:
                gr = model.generate(**batch.inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
    assert (out - ref).abs().max() <= 1e-5
    if gr is None:
        return
    assert torch.equal(g.sequences, gr.sequences)
    for a, b in zip(g.logits, gr.logits):
        assert (a - b).abs().max() <= 1e-4
