"""The attention math. `fast_kernel` is the only main path: SDPA plus edits, never an L x L tensor.

- bias: folded into SDPA by one extra q/k feature (q' = [q, 1], k' = [k, b/scale]), exact.
- redistribute: extra value columns (v masked to sinks, v masked to targets, the two indicators) make
  the same fused SDPA call return, per row, the sink/target mass and the weighted sums needed to
  move mass; cost grows with head_dim, not with L^2.
- head scale: a multiply of the output heads.
- probes: softmax rows of the selected queries only (O(rows x S)), with the model's mask and GQA.
- key mask: removed keys are folded into the boolean mask SDPA gets (exact, as if the tokens were gone).
- taps: callbacks that read q/k/v of the call (O(L) statistics), before attention runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .plan import LayerPlan, Probe

PROBE_CHUNK = 256  # query rows per probe chunk: bounds probe memory at PROBE_CHUNK x S per head


def expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, S, D] -> [B, Hkv*groups, S, D] (each KV head repeated for its query-head group)."""
    if groups == 1:
        return x
    B, H, S, D = x.shape
    return x[:, :, None].expand(B, H, groups, S, D).reshape(B, H * groups, S, D)


def causal_flag(module, query, attention_mask, kwargs) -> bool:
    """Same rule as transformers' SDPA integration: causal only when no mask was built and q_len > 1."""
    flag = kwargs.get("is_causal")
    if flag is None:
        flag = getattr(module, "is_causal", True)
    return bool(query.shape[2] > 1 and attention_mask is None and flag)


def visible(attention_mask, is_causal_module: bool, rows: torch.Tensor, q_len: int, S: int, device) -> torch.Tensor | None:
    """Bool/float mask for the selected query rows ([B, 1|H, n, S]); rows: long [B, n] indices into the query block."""
    if attention_mask is None:
        if not is_causal_module or q_len == 1:
            return None
        # SDPA's is_causal aligns top-left (query i sees keys 0..i): a static cache's prefill has S > q_len here
        qpos = rows
        return (torch.arange(S, device=device)[None, None, :] <= qpos[:, :, None])[:, None]
    m = attention_mask
    if m.shape[2] == 1:  # one row for every query (a key mask): broadcasts
        return m
    idx = rows[:, None, :, None].expand(m.shape[0], m.shape[1], rows.shape[1], m.shape[-1])
    return torch.gather(m.expand(rows.shape[0], *m.shape[1:]) if m.shape[0] == 1 else m, 2, idx)


def run_probe(module, probe: Probe, query, key, attention_mask, scaling, causal_module, bias=None) -> None:
    B, Hq, Lq, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    G = Hq // Hkv
    sel = probe.select.to(query.device)
    counts = sel.sum(-1)
    nmax = int(counts.max()) if B else 0
    out = torch.zeros(B, Hq, S, dtype=torch.float32, device=query.device)
    if nmax:
        # indices of the selected rows, padded with row 0 (weight 0)
        order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True)[:, :nmax]
        weight = torch.gather(sel, 1, order).float()
        kf = key.float().view(B, Hkv, 1, S, D)
        for s in range(0, nmax, PROBE_CHUNK):
            rows = order[:, s : s + PROBE_CHUNK]
            w = weight[:, s : s + PROBE_CHUNK]
            q = torch.gather(query, 2, rows[:, None, :, None].expand(B, Hq, rows.shape[1], D)).float()
            q = q.view(B, Hkv, G, rows.shape[1], D)
            scores = (q @ kf.transpose(-1, -2)).view(B, Hq, rows.shape[1], S) * scaling
            if bias is not None:
                scores = scores + bias[:, :, None, :].to(scores.device, torch.float32)
            m = visible(attention_mask, causal_module, rows, Lq, S, query.device)
            if m is not None:
                scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
            p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            out += (p * w[:, None, :, None]).sum(2)
        out = out / counts.clamp(min=1)[:, None, None]
    probe.callback(out, counts)


def _pad_last(x: torch.Tensor, width: int) -> torch.Tensor:
    return x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))


def with_key_mask(attention_mask, key_mask: torch.Tensor, is_causal: bool, Lq: int, S: int, device) -> torch.Tensor:
    """The call's mask (None, bool or additive float; [B|1, 1|H, Lq, S]) with the keys `key_mask` [B, S] removed."""
    km = key_mask.to(device)[:, None, None, :]
    if attention_mask is None:
        if not is_causal:
            return km
        qpos = torch.arange(Lq, device=device)  # is_causal's top-left alignment, as SDPA applies it
        return (torch.arange(S, device=device)[None, :] <= qpos[:, None])[None, None] & km
    if attention_mask.dtype == torch.bool:
        return attention_mask & km
    return attention_mask.masked_fill(~km, torch.finfo(attention_mask.dtype).min)


def fast_kernel(module, query, key, value, attention_mask, scaling, kwargs, plan: LayerPlan) -> torch.Tensor:
    """SDPA with the plan's edits. Returns attention output [B, Lq, Hq, D] (transformers' layout)."""
    B, Hq, Lq, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    G = Hq // Hkv
    is_causal = causal_flag(module, query, attention_mask, kwargs)
    causal_module = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))
    scale = scaling if scaling is not None else D**-0.5
    if plan.key_mask is not None:
        attention_mask = with_key_mask(attention_mask, plan.key_mask, is_causal, Lq, S, query.device)
        is_causal = False
    for tap in plan.taps:
        tap(query, key, value, attention_mask, scale)

    for probe in plan.probes:
        run_probe(module, probe, query, key, attention_mask, scale, causal_module, plan.bias)
    if plan.read_only:  # nothing edits the output: transformers' own SDPA call, bit-identical to the unpatched model
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=scaling,
                                      **kwargs)[0]

    q, k, v = query, key, value
    Dv = v.shape[-1]
    extra_q, extra_k, extra_v = [], [], []
    if plan.bias is not None:  # per-head bias needs per-query-head keys
        k, v, G = expand_kv(k, G), expand_kv(v, G), 1
        extra_q.append(torch.ones(B, Hq, Lq, 1, dtype=q.dtype, device=q.device))
        extra_k.append((plan.bias.to(k.device) / scale).to(k.dtype)[..., None])
    rd = plan.redistribute
    if rd is not None:
        if rd.sinks.dim() == 3 or rd.targets.dim() == 3:  # per query head: per-head value columns
            if k.shape[1] != Hq:
                k, v, G = expand_kv(k, G), expand_kv(v, G), 1

        def indicator(m):
            m = m.to(v.device, v.dtype)
            m = m[:, None, :] if m.dim() == 2 else m
            return m[..., None].expand(B, v.shape[1], S, 1)

        iS, iT = indicator(rd.sinks), indicator(rd.targets)
        extra_v += [v * iS, v * iT, iS, iT]
    if extra_q or extra_v:
        vv = torch.cat([v, *extra_v], dim=-1) if extra_v else v
        qq = torch.cat([q, *extra_q], dim=-1) if extra_q else q
        kk = torch.cat([k, *extra_k], dim=-1) if extra_k else k
        width = -(-max(qq.shape[-1], vv.shape[-1]) // 8) * 8  # equal, aligned widths keep the fused kernels
        qq, kk, vv = _pad_last(qq, width), _pad_last(kk, width), _pad_last(vv, width)
    else:
        qq, kk, vv = q, k, v
    gqa = kk.shape[1] != Hq
    o = F.scaled_dot_product_attention(
        qq, kk, vv, attn_mask=attention_mask, scale=scale, is_causal=is_causal, enable_gqa=gqa
    )
    out = o[..., :Dv]
    if rd is not None:
        oS = o[..., Dv : 2 * Dv].float()
        oT = o[..., 2 * Dv : 3 * Dv].float()
        mS = o[..., 3 * Dv : 3 * Dv + 1].float()
        mT = o[..., 3 * Dv + 1 : 3 * Dv + 2].float()
        frac = rd.fraction.to(o.device).float()
        frac = frac.view(1, Hq, 1, 1) if frac.dim() == 1 else frac.view(B, Hq, -1, 1)  # [B, Hq] or [B, Hq, Lq]
        ok = mT > 0
        new = out.float() - frac * oS + frac * mS * oT / torch.where(ok, mT, torch.ones_like(mT))
        new = torch.where(ok, new, out.float())
        if rd.rows is not None:
            new = torch.where(rd.rows.to(o.device)[:, None, :, None], new, out.float())
        out = new.to(out.dtype)
    if plan.head_scale is not None:
        hs = plan.head_scale.to(out.device, out.dtype)
        out = out * (hs.view(1, Hq, 1, 1) if hs.dim() == 1 else hs.view(B, Hq, -1, 1))  # [B, Hq] or [B, Hq, Lq]
    return out.transpose(1, 2).contiguous()
