"""The registered attention implementation ("vlmplug") and its mask function.

Registered once per process in transformers' `AttentionInterface` / `AttentionMaskInterface` under a
name free of the substrings transformers dispatches on (sdpa, flash, flex, paged). Modules of a
patched model carry `_vlmplug_session`; the function asks that session for the layer's plan and runs
plain transformers SDPA when there is nothing to do, so an idle patch is bit-identical to SDPA.
"""
from __future__ import annotations

import torch

IMPL_NAME = "vlmplug"
_registered = False


def vlmplug_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    session = getattr(module, "_vlmplug_session", None)
    if session is not None and session.state.kv_index:
        from .kvprune import per_head_mask

        attention_mask = per_head_mask(session, module, attention_mask, query.device, query.shape[2])
    if (
        session is not None and attention_mask is not None and attention_mask.dim() == 4
        and attention_mask.shape[-1] > key.shape[2] and session.state.keep is not None
    ):
        attention_mask = attention_mask[..., -key.shape[2]:]  # a sliding cache after token dropping
    plan = session.plan_for(module, query, key, attention_mask, scaling, kwargs, value) if session is not None else None
    if plan is None or plan.empty:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError("vlmplug: attention logit soft-capping is not supported by the SDPA backend")
    out = session.kernel(module, query, key, value, attention_mask, scaling, kwargs, plan)
    li = getattr(module, "layer_idx", None)
    if li is not None:  # checked by the methods' verify
        if plan.amplify is not None:
            session.state.effects.add(("amplify", li))
        if plan.redistribute is not None:
            session.state.effects.add(("redistribute", li))
        if plan.head_scale is not None:
            session.state.effects.add(("head_scale", li))
    return out, None


def register_backend() -> str:
    """Register the implementation and its (SDPA-style, boolean or None) mask function; idempotent."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(IMPL_NAME, vlmplug_attention)
        AttentionMaskInterface.register(IMPL_NAME, sdpa_mask)
        _registered = True
    return IMPL_NAME
