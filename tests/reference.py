"""Eager reference implementations, written from the formulas, used only by tests.

`eager_kernel` materialises the full softmax matrix and applies each edit on it directly:
  bias          scores + b[h, key]
  amplify       s + alpha |s| at the chosen keys of the chosen rows (after the bias, before the mask; PAI)
  redistribute  a'_sink = (1-p) a_sink;  a'_t = a_t + p * (sum_sink a) * a_t / (sum_targets a)
                (sinks / targets per head or shared, p per head or per head and row; with a gate, only rows where
                sum_pool a >= min_mass and sum_targets a >= min_share * sum_pool a)
  head scale    o_h * s_h (per row where given)
  probe         mean over selected rows of softmax(scores) (with the bias, before redistribution)
It plugs into the session in place of the fast kernel, so both see identical plans.
"""
from __future__ import annotations

import torch


def _expand(x, g):
    return x.repeat_interleave(g, dim=1)


def full_mask(module, attention_mask, Lq, S, kwargs, device):
    """Bool [B|1, 1|H, Lq, S] of visible keys (True = attend), or a float additive mask."""
    if attention_mask is not None:
        return attention_mask
    causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
    if not causal or Lq == 1:
        return torch.ones(1, 1, Lq, S, dtype=torch.bool, device=device)
    i = torch.arange(Lq, device=device)[:, None]  # torch SDPA's is_causal: top-left aligned
    j = torch.arange(S, device=device)[None, :]
    return (j <= i)[None, None]


def eager_softmax(module, q, k, attention_mask, scaling, kwargs, bias=None, amplify=None):
    B, Hq, Lq, D = q.shape
    k = _expand(k, Hq // k.shape[1])
    scale = scaling if scaling is not None else D**-0.5
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * scale
    if bias is not None:
        scores = scores + bias[:, :, None, :].double()
    if amplify is not None:  # PAI, written from the paper: s[..., row, img] += alpha * |s[..., row, img]|
        keys = amplify.keys.to(scores.device)
        keys = keys[:, None, None, :] if keys.dim() == 2 else keys[:, :, None, :]
        chosen = amplify.rows.to(scores.device)[:, None, :, None] & keys
        alpha = amplify.alpha.double().to(scores.device)
        alpha = alpha.view(1, -1, 1, 1) if alpha.dim() == 1 else (alpha[:, :, None, :] if alpha.dim() == 3 else alpha)
        scores = scores + chosen * alpha * scores.abs()
    m = full_mask(module, attention_mask, Lq, k.shape[2], kwargs, q.device)
    if m.dtype == torch.bool:
        scores = scores.masked_fill(~m, float("-inf"))
    else:
        scores = scores + m.double()
    return torch.softmax(scores, -1).nan_to_num(0.0)


def _per_head_row(x, B, Hq, Lq):
    """A per-head value given as [Hq], [B, Hq] or [B, Hq, Lq] -> broadcastable to [B, Hq, Lq, 1]."""
    if x.dim() == 1:
        return x.view(1, Hq, 1, 1)
    if x.dim() == 2:
        return x.view(B, Hq, 1, 1)
    return x.view(B, Hq, Lq, 1)


def eager_kernel(module, q, k, v, attention_mask, scaling, kwargs, plan):
    B, Hq, Lq, D = q.shape
    a = eager_softmax(module, q, k, attention_mask, scaling, kwargs, plan.bias, plan.amplify)
    for p in plan.probes:
        sel = p.select.to(a.device).double()
        cnt = sel.sum(-1)
        rows = (a * sel[:, None, :, None]).sum(2) / cnt.clamp(min=1)[:, None, None]
        p.callback(rows.float(), cnt.long())
    rd = plan.redistribute
    if rd is not None:
        def per_head(m):  # [B, S] -> every head; [B, Hq, S] -> its own head
            m = m.to(a.device).double()
            return m[:, None, None, :] if m.dim() == 2 else m[:, :, None, :]

        iS, iT = per_head(rd.sinks), per_head(rd.targets)
        frac = _per_head_row(rd.fraction.double().to(a.device), B, Hq, Lq)
        if rd.gate is not None:  # edit only where the pool gets >= min_mass and the targets >= min_share of it
            pool = (a * per_head(rd.gate.pool)).sum(-1, keepdim=True)
            tgt = (a * per_head(rd.targets)).sum(-1, keepdim=True)
            chosen = (pool > 0) & (pool >= rd.gate.min_mass) & (tgt >= rd.gate.min_share * pool)
            if rd.rows is not None:
                chosen = chosen & rd.rows.to(a.device)[:, None, :, None]
            frac = frac * chosen
            if rd.gate.on_select is not None:
                rd.gate.on_select((chosen & (frac > 0))[..., 0])
        mS = (a * iS).sum(-1, keepdim=True)
        mT = (a * iT).sum(-1, keepdim=True)
        new = a - frac * a * iS + frac * mS * (a * iT) / mT.clamp(min=1e-300)
        keep_rows = mT > 0
        if rd.rows is not None:
            keep_rows = keep_rows & rd.rows.to(a.device)[:, None, :, None]
        a = torch.where(keep_rows, new, a)
    vv = _expand(v, Hq // v.shape[1]).double()
    o = a @ vv
    if plan.head_scale is not None:
        o = o * _per_head_row(plan.head_scale.double().to(o.device), B, Hq, Lq)
    return o.to(q.dtype).transpose(1, 2).contiguous()


def masked_eager_attention(drop_from_layer=None, dropped=None, kv_drop=None):
    """An attention function for an UNPATCHED model: eager softmax, where keys listed in `dropped`
    ([B, L] bool, prompt positions) are invisible from layer `drop_from_layer` on, and keys in
    `kv_drop[layer]` ([B, Hkv, L] bool) are invisible to single-token (decode) queries of that layer."""

    def fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        B, Hq, Lq, D = query.shape
        S = key.shape[2]
        li = module.layer_idx
        m = full_mask(module, attention_mask, Lq, S, kwargs, query.device)
        m = m.expand(B, Hq, Lq, S).clone()
        if dropped is not None and li >= drop_from_layer:
            d = dropped.to(m.device)
            m[:, :, :, : d.shape[1]] &= ~d[:, None, None, :]  # dropped rows' own outputs are never used
        if kv_drop is not None and li in kv_drop and Lq == 1:
            kd = kv_drop[li].to(m.device)
            kd = kd.repeat_interleave(Hq // kd.shape[1], dim=1)
            m[:, :, :, : kd.shape[2]] &= ~kd[:, :, None, :]
        k = _expand(key, Hq // key.shape[1]).double()
        v = _expand(value, Hq // value.shape[1]).double()
        scale = scaling if scaling is not None else D**-0.5
        s = torch.einsum("bhqd,bhkd->bhqk", query.double(), k) * scale
        s = s.masked_fill(~m, float("-inf"))
        a = torch.softmax(s, -1).nan_to_num(0.0)
        return (a @ v).to(query.dtype).transpose(1, 2).contiguous(), a.to(query.dtype)

    return fn


def register_reference(name: str, fn) -> str:
    """Register an attention function and the SDPA mask function under `name` (without a mask
    function transformers passes no mask at all to unknown implementations)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def eager_attentions(model, inputs):
    """Per-layer attention weights of the unpatched model with eager text attention."""
    model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.no_grad():
            return model(**inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})


def split_by_weight(k, counts):
    """Largest-remainder split of k over parts weighted by counts (ties to the earlier part), written from the
    rule (the package's `split_budget` is checked against it through every packed-grid test)."""
    tot = sum(counts)
    k = min(k, tot)
    exact = [k * c / tot for c in counts]
    out = [int(e) for e in exact]
    for i in sorted(range(len(counts)), key=lambda i: (-(exact[i] - out[i]), i))[: k - sum(out)]:
        out[i] += 1
    return out


def eager_with(edit_probs=None, edit_scores=None, edit_out=None):
    """An attention function for an UNPATCHED model: full eager attention in float64 where a test applies a
    method's rule written from its paper or official code: edit_scores(module, s) on the scaled logits [B, Hq, Lq, S]
    (before the mask), edit_probs(module, a) on the softmax rows, edit_out(module, o) on the head outputs
    [B, Hq, Lq, Dv] (before o_proj). Each returns the edited tensor (or None to leave it)."""

    def fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        B, Hq, Lq, D = query.shape
        S = key.shape[2]
        k = _expand(key, Hq // key.shape[1]).double()
        v = _expand(value, Hq // value.shape[1]).double()
        scale = scaling if scaling is not None else D**-0.5
        s = torch.einsum("bhqd,bhkd->bhqk", query.double(), k) * scale
        if edit_scores is not None:
            got = edit_scores(module, s)
            s = s if got is None else got
        m = full_mask(module, attention_mask, Lq, S, kwargs, query.device)
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.double()
        a = torch.softmax(s, -1).nan_to_num(0.0)
        if edit_probs is not None:
            got = edit_probs(module, a)
            a = a if got is None else got
        o = a @ v
        if edit_out is not None:
            got = edit_out(module, o)
            o = o if got is None else got
        return o.to(query.dtype).transpose(1, 2).contiguous(), None

    return fn


def run_reference(model, name, fn, inputs, gen_kwargs=None):
    """Logits (and a generate() output) of the unpatched model with attention function `fn` on its text layers."""
    register_reference(name, fn)
    model.set_attn_implementation({"text_config": name})
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
            g = model.generate(**inputs, **gen_kwargs) if gen_kwargs else None
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
    return logits, g
