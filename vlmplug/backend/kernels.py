"""The attention math. `fast_kernel` is the only main path: SDPA plus edits, never an L x L tensor.

- bias: folded into SDPA by one extra q/k feature (q' = [q, 1], k' = [k, b/scale]), exact.
- redistribute: by default on explicit softmax rows of the edited queries, PROBE_CHUNK rows at a time (O(chunk x S)
  memory), plain SDPA for the output; or (EXPLICIT_* thresholds) extra value columns (v masked to sinks, v masked
  to targets, the indicators) that make the same fused SDPA call return, per row, the masses and weighted sums
  needed to move mass.
- head scale: a multiply of the output heads.
- probes: softmax rows of the selected queries only (O(rows x S)), with the model's mask and GQA.
- key mask: removed keys are folded into the boolean mask SDPA gets (exact, as if the tokens were gone).
- taps: callbacks that read q/k/v of the call (O(L) statistics), before attention runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .plan import LayerPlan, PlanConflict, Probe

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


def amplified(scores: torch.Tensor, amp, rows: torch.Tensor) -> torch.Tensor:
    """PAI's s + alpha |s| at amp.keys, for the gathered query rows `rows` [B, n] of scores [B, Hq, n, S]."""
    sel = torch.gather(amp.rows.to(rows.device), 1, rows)  # [B, n]: which of these rows are amplified
    keys = amp.keys.to(scores.device)
    keys = keys[:, None, None, :] if keys.dim() == 2 else keys[:, :, None, :]
    a = amp.alpha.to(scores.device, torch.float32)
    a = a.view(1, -1, 1, 1) if a.dim() == 1 else (a[:, :, None, :] if a.dim() == 3 else a)
    return torch.where(sel[:, None, :, None] & keys, scores + a * scores.abs(), scores)


def _row_scores(query, key, rows, scaling, bias, amp, attention_mask, causal_module, Lq):
    """Softmax logits of the gathered query rows `rows` [B, n] ([B, Hq, n, S], float32), every edit before the
    softmax applied: bias, amplification, mask."""
    B, Hq, _, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    G = Hq // Hkv
    q = torch.gather(query, 2, rows[:, None, :, None].expand(B, Hq, rows.shape[1], D)).float()
    q = q.view(B, Hkv, G, rows.shape[1], D)
    scores = (q @ key.float().view(B, Hkv, 1, S, D).transpose(-1, -2)).view(B, Hq, rows.shape[1], S) * scaling
    if bias is not None:
        scores = scores + bias[:, :, None, :].to(scores.device, torch.float32)
    if amp is not None:
        scores = amplified(scores, amp, rows)
    m = visible(attention_mask, causal_module, rows, Lq, S, query.device)
    if m is not None:
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    return scores


def _selected(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices [B, nmax] of the selected rows (padded with unselected ones) and bool [B, nmax]: a real selection."""
    nmax = int(sel.sum(-1).max())
    order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True)[:, :nmax]
    return order, torch.gather(sel, 1, order)


def amplified_rows(plan: LayerPlan, query, key, value, attention_mask, scaling, causal_module, out):
    """`out` [B, Hq, Lq, Dv] with the rows `plan.amplify.rows` recomputed exactly under the amplification (and the
    bias); O(rows x S), never L x L."""
    B, Hq, Lq, _ = query.shape
    Hkv, S, Dv = key.shape[1], key.shape[2], value.shape[-1]
    sel = plan.amplify.rows.to(query.device)
    if not bool(sel.any()):
        return out
    order, real = _selected(sel)
    new = []
    for s in range(0, order.shape[1], PROBE_CHUNK):
        rows = order[:, s : s + PROBE_CHUNK]
        p = torch.softmax(_row_scores(query, key, rows, scaling, plan.bias, plan.amplify, attention_mask,
                                      causal_module, Lq), dim=-1).nan_to_num(0.0)
        o = p.view(B, Hkv, Hq // Hkv, rows.shape[1], S) @ value.float().view(B, Hkv, 1, S, Dv)
        new.append(o.view(B, Hq, rows.shape[1], Dv))
    new = torch.cat(new, 2)
    idx = order[:, None, :, None].expand(B, Hq, order.shape[1], Dv)
    new = torch.where(real[:, None, :, None], new.to(out.dtype), torch.gather(out, 2, idx))
    return out.scatter(2, idx, new)


#: a redistribution is computed on explicit softmax rows, PROBE_CHUNK rows at a time (O(chunk x S) memory, plain SDPA
#: for the output) when it edits at most this many rows or at most this share of the call's rows; otherwise extra SDPA
#: value columns carry it for every row in the one fused call. Measured (eval/bench_attention.py, CPU fp32, LLaVA-7B
#: shapes): the columns triple q/k/v's width (ACT, every row: peak memory 1.32x SDPA), explicit rows cost 1.00x;
#: so explicit rows are the default everywhere. The column path stays (tested, `--rd-path columns`) for a GPU
#: comparison still to be made.
EXPLICIT_MAX_ROWS = 16
EXPLICIT_ROW_SHARE = 1.0


def _per_row(x: torch.Tensor, B: int, Hq: int, Lq: int) -> torch.Tensor:
    """A per-head value [Hq], [B, Hq] or [B, Hq, Lq] -> [B, Hq, Lq]."""
    x = x.float()
    if x.dim() == 1:
        return x.view(1, Hq, 1).expand(B, Hq, Lq)
    if x.dim() == 2:
        return x.view(B, Hq, 1).expand(B, Hq, Lq)
    return x.expand(B, Hq, Lq)


def _per_key(m: torch.Tensor) -> torch.Tensor:
    """Key set [B, S] or [B, Hq, S] -> float [B, 1|Hq, 1, S]."""
    m = m.float()
    return m[:, None, None, :] if m.dim() == 2 else m[:, :, None, :]


def explicit_redistribution(plan: LayerPlan, rd_rows: torch.Tensor, query, key, value, attention_mask, scaling,
                            causal_module, out) -> torch.Tensor:
    """`out` [B, Hq, Lq, Dv] with the rows `rd_rows` (bool [B, Lq]) recomputed from explicit softmax rows with the
    redistribution (and its gate) applied; O(rows x S) per chunk, never L x L."""
    rd = plan.redistribute
    B, Hq, Lq, _ = query.shape
    Hkv, S, Dv = key.shape[1], key.shape[2], value.shape[-1]
    sel = rd_rows.to(query.device)
    chosen_all = torch.zeros(B, Hq, Lq, dtype=torch.bool, device=query.device) if rd.gate is not None else None
    if not bool(sel.any()):
        if rd.gate is not None and rd.gate.on_select is not None:
            rd.gate.on_select(chosen_all)
        return out
    order, real = _selected(sel)
    frac_all = _per_row(rd.fraction.to(query.device), B, Hq, Lq)
    iS, iT = _per_key(rd.sinks.to(query.device)), _per_key(rd.targets.to(query.device))
    iP = _per_key(rd.gate.pool.to(query.device)) if rd.gate is not None else None
    new = []
    for s in range(0, order.shape[1], PROBE_CHUNK):
        rows = order[:, s : s + PROBE_CHUNK]
        ok_rows = real[:, s : s + PROBE_CHUNK]
        p = torch.softmax(_row_scores(query, key, rows, scaling, plan.bias, None, attention_mask, causal_module, Lq),
                          dim=-1).nan_to_num(0.0)  # [B, Hq, n, S]
        mS, mT = (p * iS).sum(-1), (p * iT).sum(-1)  # [B, Hq, n]
        f = torch.gather(frac_all, 2, rows[:, None, :].expand(B, Hq, rows.shape[1])) * ok_rows[:, None, :]
        if rd.gate is not None:
            mP = (p * iP).sum(-1)
            chosen = (mP > 0) & (mP >= rd.gate.min_mass) & (mT >= rd.gate.min_share * mP) & ok_rows[:, None, :]
            f = f * chosen
            chosen_all.scatter_(2, rows[:, None, :].expand(B, Hq, rows.shape[1]),
                                chosen & (f > 0) | torch.gather(chosen_all, 2, rows[:, None, :].expand(B, Hq, rows.shape[1])))
        ok = mT > 0
        f = torch.where(ok, f, torch.zeros_like(f))
        gain = (f * mS / torch.where(ok, mT, torch.ones_like(mT)))[..., None]
        p = p - f[..., None] * p * iS + gain * p * iT
        o = p.view(B, Hkv, Hq // Hkv, rows.shape[1], S) @ value.float().view(B, Hkv, 1, S, Dv)
        new.append(o.view(B, Hq, rows.shape[1], Dv))
    new = torch.cat(new, 2)
    idx = order[:, None, :, None].expand(B, Hq, order.shape[1], Dv)
    new = torch.where(real[:, None, :, None], new.to(out.dtype), torch.gather(out, 2, idx))
    if rd.gate is not None and rd.gate.on_select is not None:
        rd.gate.on_select(chosen_all)
    return out.scatter(2, idx, new)


def run_probe(module, probe: Probe, query, key, attention_mask, scaling, causal_module, bias=None, amp=None) -> None:
    B, Hq, Lq, D = query.shape
    S = key.shape[2]
    sel = probe.select.to(query.device)
    counts = sel.sum(-1)
    out = torch.zeros(B, Hq, S, dtype=torch.float32, device=query.device)
    if B and int(counts.max()):
        order, real = _selected(sel)  # selected rows first, padded with unselected ones (weight 0)
        weight = real.float()
        for s in range(0, order.shape[1], PROBE_CHUNK):
            rows = order[:, s : s + PROBE_CHUNK]
            w = weight[:, s : s + PROBE_CHUNK]
            scores = _row_scores(query, key, rows, scaling, bias, amp, attention_mask, causal_module, Lq)
            p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            out += (p * w[:, None, :, None]).sum(2)
        out = out / counts.clamp(min=1)[:, None, None]
    probe.callback(out, counts)


def weighted_attention(query, key, attention_mask, scaling, causal_module, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i * mean_h softmax(q_i K^T) for every sample: float32 [B, S], weights [B, Lq] over this call's query
    rows (rollout's row vector times the head-mean attention). Only rows with weight are recomputed, PROBE_CHUNK at
    a time (O(chunk x S)), on the call's device; never L x L."""
    B, _, Lq, _ = query.shape
    dev = query.device
    w = weights.to(dev, torch.float32)
    out = torch.zeros(B, key.shape[2], dtype=torch.float32, device=dev)
    live = torch.nonzero((w != 0).any(0)).flatten()
    for s in range(0, live.numel(), PROBE_CHUNK):
        rows = live[s : s + PROBE_CHUNK][None, :].expand(B, -1)
        p = torch.softmax(_row_scores(query, key, rows, scaling, None, None, attention_mask, causal_module, Lq),
                          dim=-1).nan_to_num(0.0).mean(1)  # [B, n, S] head mean
        out += (torch.gather(w, 1, rows)[:, :, None] * p).sum(1)
    return out


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
        run_probe(module, probe, query, key, attention_mask, scale, causal_module, plan.bias, plan.amplify)
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
    rd_rows = None
    if rd is not None:
        rd_rows = rd.rows.to(q.device) if rd.rows is not None else torch.ones(B, Lq, dtype=torch.bool, device=q.device)
        n_rows = int(rd_rows.sum(-1).max()) if B else 0
        if plan.amplify is not None:
            raise PlanConflict("one plan both redistributes and amplifies attention; they rewrite the same rows")
        if n_rows <= EXPLICIT_MAX_ROWS or n_rows <= EXPLICIT_ROW_SHARE * Lq:
            rd = None  # explicit rows below; SDPA computes the plain output
        else:
            rd_rows = None
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
        if rd.gate is not None:
            if rd.gate.pool.dim() == 3 and k.shape[1] != Hq:
                k, v, G = expand_kv(k, G), expand_kv(v, G), 1
                iS, iT = indicator(rd.sinks), indicator(rd.targets)
                extra_v[:] = [v * iS, v * iT, iS, iT]
            extra_v.append(indicator(rd.gate.pool))
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
        if rd.gate is not None:
            mP = o[..., 3 * Dv + 2 : 3 * Dv + 3].float()
            chosen = (mP > 0) & (mP >= rd.gate.min_mass) & (mT >= rd.gate.min_share * mP)
            if rd.rows is not None:
                chosen = chosen & rd.rows.to(o.device)[:, None, :, None]
            frac = frac * chosen
            if rd.gate.on_select is not None:
                rd.gate.on_select(chosen[..., 0] & (frac[..., 0] > 0))
        ok = mT > 0
        new = out.float() - frac * oS + frac * mS * oT / torch.where(ok, mT, torch.ones_like(mT))
        new = torch.where(ok, new, out.float())
        if rd.rows is not None:
            new = torch.where(rd.rows.to(o.device)[:, None, :, None], new, out.float())
        out = new.to(out.dtype)
    if rd_rows is not None:
        out = explicit_redistribution(plan, rd_rows, query, key, value, attention_mask, scale, causal_module, out)
    if plan.amplify is not None:
        out = amplified_rows(plan, query, key, value, attention_mask, scale, causal_module, out)
    if plan.head_scale is not None:
        hs = plan.head_scale.to(out.device, out.dtype)
        out = out * (hs.view(1, Hq, 1, 1) if hs.dim() == 1 else hs.view(B, Hq, -1, 1))  # [B, Hq] or [B, Hq, Lq]
    return out.transpose(1, 2).contiguous()
