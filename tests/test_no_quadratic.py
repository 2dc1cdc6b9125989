"""Inside every text attention call, the backend never creates a [batch, heads, L, L] tensor: each tensor an
op creates during attention is checked, against eager attention where such tensors do appear."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vlmplug
from conftest import tiny
from test_backend_edits import Edits
from vlmplug.adapters import get_adapter
from vlmplug.testing.tiny import make_batch


class LargestInAttention(TorchDispatchMode):
    """Largest tensor created by any op while a text attention module runs."""

    def __init__(self, model):
        super().__init__()
        self.largest, self.inside = 0, 0
        mods = get_adapter(model).text_attention_modules()
        self.hooks = [m.register_forward_pre_hook(lambda *a: self._enter()) for m in mods]
        self.hooks += [m.register_forward_hook(lambda *a: self._leave()) for m in mods]

    def _enter(self):
        self.inside += 1

    def _leave(self):
        self.inside -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.inside:
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
        return out

    def close(self):
        for h in self.hooks:
            h.remove()


def _largest(model, inputs, mode_cls=None, **kw):
    mode = (mode_cls or LargestInAttention)(model)
    try:
        with torch.no_grad(), mode:
            model(**inputs, **kw)
    finally:
        mode.close()
    return mode.largest


@pytest.mark.parametrize("fam", ["llava", "qwen2_vl"])
def test_no_head_by_l_by_l_tensor_in_attention(fam, monkeypatch):
    from vlmplug.backend import kernels

    # rows read explicitly (probes, amplified and redistributed rows) go PROBE_CHUNK at a time: chunk x L by design;
    # a small chunk here, so that these short prompts would show an L x L tensor
    monkeypatch.setattr(kernels, "PROBE_CHUNK", 16)
    model = tiny(fam)
    batch = make_batch(fam, model, (2, 2), text_lens=(40, 60))  # long enough that L*L dominates
    B, L = batch.inputs["input_ids"].shape
    H = model.config.get_text_config().num_attention_heads
    quadratic = B * H * L * L
    model.set_attn_implementation({"text_config": "eager"})
    try:
        assert _largest(model, batch.inputs, output_attentions=True) >= quadratic  # the check can fail
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
    # (a probe of many query rows costs rows x L by design, PROBE_CHUNK rows at a time; record reads one row)
    for methods in (["record"], [Edits(bias=2.0, fraction=0.5, head_scale=(1.0, 0.5, 1.0, 2.0))],
                    [vlmplug.PAI(alpha=0.5, layers="0:", gamma=1.0)], [Edits(amplify=0.5, bias=1.0, probe=False)],
                    [vlmplug.VAR(tau=1.0, summ=0.0, layers="0:")],
                    [vlmplug.ModPAI(layers="0:", gamma=1.0, heads="sensitivity")], [vlmplug.VHR(layers="0:")]):
        with vlmplug.apply(model, methods):
            assert _largest(model, batch.inputs) < quadratic / 2, methods


@pytest.mark.parametrize("fam", ["llava", "qwen2_vl"])
def test_act_reads_every_row_in_chunks(fam, monkeypatch):
    """ACT needs every row's attention (column means): it reads them PROBE_CHUNK rows at a time, so its largest tensor
    is chunk x L, not L x L (a small chunk here, so that the check can fail on these short prompts)."""
    from vlmplug.backend import kernels

    model = tiny(fam)
    batch = make_batch(fam, model, (2, 2), text_lens=(40, 60))
    B, L = batch.inputs["input_ids"].shape
    H = model.config.get_text_config().num_attention_heads
    monkeypatch.setattr(kernels, "PROBE_CHUNK", 16)
    with vlmplug.apply(model, vlmplug.ACT(layers="0:", threshold=0.02)):
        assert _largest(model, batch.inputs) < B * H * L * L / 2


class LargestInVision(LargestInAttention):
    def __init__(self, model):
        TorchDispatchMode.__init__(self)
        self.largest, self.inside = 0, 0
        mods = get_adapter(model).vision_attention_modules()
        self.hooks = [m.register_forward_pre_hook(lambda *a: self._enter()) for m in mods]
        self.hooks += [m.register_forward_hook(lambda *a: self._leave()) for m in mods]


def test_flowcut_keeps_vision_attention_linear():
    """FlowCut's taps read one query row and its key masks go into SDPA: no [crops, H, S, S] tensor in the tower
    (eager vision attention does make one: the check can fail)."""
    import transformers as tf
    from vlmplug.testing.tiny import IDS, tiny_config

    cfg = tiny_config("llava")
    cfg.vision_config.image_size = 32  # 256 patches: S*S dominates every per-token tensor
    cfg.image_seq_length = 256
    torch.manual_seed(0)
    model = tf.LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval()
    ids = torch.tensor([[1] + [IDS["image"]] * 256 + [5, 6, 7]])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(1, 3, 32, 32))
    S, H = 257, cfg.vision_config.num_attention_heads
    quadratic = H * S * S

    def largest():
        return _largest(model, inputs, LargestInVision)

    model.set_attn_implementation({"vision_config": "eager"})
    try:
        assert largest() >= quadratic
    finally:
        model.set_attn_implementation({"vision_config": "sdpa"})
    with vlmplug.apply(model, "flowcut", keep_tokens=32) as h:
        assert largest() < quadratic / 4
        assert h.stats["flowcut"]["tokens_kept_per_image"] == [[32]]
