"""Shared pieces of the pruning methods: budgets and the statistics `handle.stats` reports."""
from __future__ import annotations

import math

import torch

from ...errors import MethodConfigError
from ..base import check_range


def check_budget(method: str, keep_ratio, keep_tokens) -> None:
    if keep_ratio is not None and keep_tokens is not None:
        raise MethodConfigError(f"{method}: give keep_ratio or keep_tokens, not both")
    if keep_ratio is not None:
        check_range(method, "keep_ratio", keep_ratio, 0.0, 1.0)
    if keep_tokens is not None:
        check_range(method, "keep_tokens", keep_tokens, 0, None, kind=int)


def budget(n: int, keep_ratio, keep_tokens) -> int:
    """How many of n image tokens to keep."""
    if keep_tokens is not None:
        return min(n, int(keep_tokens))
    return min(n, int(round(n * keep_ratio)))


def layer_flops(n: int, d: int, m: int) -> float:
    """FastV's per-layer FLOP model: 4nd^2 + 2n^2d + 2ndm (attention projections, scores, MLP)."""
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def drop_stats(session, layer_lens: list[int], cache_lens: list[int] | None = None) -> dict:
    """Tokens kept per image and per layer, KV-cache bytes and estimated FLOPs saved, last prefill.
    `cache_lens`: tokens each layer's KV cache holds, where it differs from what the layer computed."""
    cfg = session.adapter.text_config
    d, m = int(cfg.hidden_size), int(cfg.intermediate_size)
    heads = int(cfg.num_attention_heads)
    hd = int(getattr(cfg, "head_dim", None) or d // heads)
    kvh = int(getattr(cfg, "num_key_value_heads", heads))
    layout, st = session.layout, session.state
    kept_per_image = []
    if layout is not None:
        for b, s in enumerate(layout.samples):
            keep = st.keep[b] if st.keep is not None else None
            dead = st.dead[b] if st.dead is not None else None
            alive = keep[~dead] if (keep is not None and dead is not None) else keep
            kept_per_image.append([int(im.positions.numel()) if alive is None else int(torch.isin(im.positions, alive).sum())
                                   for im in s.images])
    B = len(layout.samples) if layout is not None else 1
    bytes_per = 2 if session.model.dtype in (torch.float16, torch.bfloat16) else torch.finfo(session.model.dtype).bits // 8
    L = int(st.prompt_len or layer_lens[0])  # every layer at the prompt's length: the unpruned cost
    full = sum(layer_flops(L, d, m) for _ in layer_lens)
    pruned = sum(layer_flops(n, d, m) for n in layer_lens)
    return {
        "tokens_kept_per_image": kept_per_image,
        "tokens_per_layer": layer_lens,
        "kv_cache_bytes": int(sum(cache_lens or layer_lens) * 2 * kvh * hd * bytes_per * B),
        "flops_saved": 0.0 if full == 0 else 1.0 - pruned / full,
    }


def token_drop_stats(session, K: int | None) -> dict:
    """`drop_stats` for methods that drop tokens before layer K (full length before, kept length after; the
    session's cut of the last prefill where it moved, e.g. layer 0's padded cache or a fallback)."""
    if session is None or session.state.input_ids is None or K is None:
        return {}
    st = session.state
    n, L = session.adapter.num_layers, st.prompt_len
    Lk = int(st.keep.shape[1]) if st.keep is not None else L
    if st.keep is None or st.drop_layer is None:
        return drop_stats(session, [L] * K + [Lk] * (n - K))
    cut, cache_cut = st.drop_layer, st.cache_cut
    return drop_stats(session, [L] * cut + [Lk] * (n - cut), [L] * cache_cut + [Lk] * (n - cache_cut))


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores (ties broken by position), sorted ascending."""
    if k >= scores.numel():
        return torch.arange(scores.numel())
    order = torch.argsort(scores.double(), descending=True, stable=True)
    return order[:k].sort().values


def isqrt_exact(n: int) -> int:
    r = math.isqrt(n)
    return r if r * r == n else -1


def split_budget(k: int, weights: list[int]) -> list[int]:
    """Split k over parts in proportion to `weights` (largest remainder, ties to the earlier part), each part at
    most its weight."""
    total = sum(weights)
    if total == 0:
        return [0] * len(weights)
    k = min(k, total)
    exact = [k * w / total for w in weights]
    out = [int(math.floor(e)) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order[: k - sum(out)]:
        out[i] += 1
    return out
