"""Forward state of one pass: what the session knows about the prompt a pass is running.

A pass is a label ("main" unless `Session.pass_` says otherwise). Contrastive and guidance methods run two
forwards side by side (with and without the image, question vs generic prompt); each keeps its own state, so
one pass's prefill never resets the other's kept tokens, pruned cache index or layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..layout import Layout


@dataclass
class ForwardState:
    label: str = "main"
    phase: str = "prefill"  # "prefill" (empty cache) or "decode"
    forward_index: int = -1  # forwards of this pass so far
    input_ids: torch.Tensor | None = None  # the prompt (prefill)
    attention_mask: torch.Tensor | None = None  # [B, L] padding mask of the prompt
    prompt_len: int = 0
    logical_len: int = 0  # logical sequence length after this forward
    sizes: list | None = None  # original image sizes of this prompt (set_image_sizes)
    static_cache: bool = False
    has_cache: bool = False  # the base model's forward received a KV cache
    reuses_encoder: bool = False  # this prefill got encoder outputs computed before (no image-feature call)
    # what the backend and hooks did in this forward (checked by Session.verify_forward)
    effects: set = field(default_factory=set)
    text_calls: set = field(default_factory=set)  # decoder layers whose attention reached the backend
    layout: Layout | None = None
    layout_done: bool = False
    # token dropping (backend/drop.py)
    keep: torch.Tensor | None = None  # [B, L'] logical positions kept after `drop_layer`
    dead: torch.Tensor | None = None  # [B, L'] True at padding slots of ragged keeps
    hidden: torch.Tensor | None = None  # [B, L] dropped positions (pre-LLM selection masks them early)
    drop_layer: int | None = None  # first layer computing kept tokens only (this prefill)
    cache_cut: int | None = None  # first layer whose KV cache holds kept tokens only
    # KV pruning (backend/kvprune.py)
    kv_index: dict = field(default_factory=dict)  # layer -> [B, Hkv, S'] logical positions kept in the cache
    kv_dead: dict = field(default_factory=dict)  # layer -> [B, Hkv, S'] padding slots of ragged KV keeps
    # feature plans: method name -> its kept rows per image ((sample, image index) -> rows), waiting for the drop at
    # this prompt's prefill; the latest ones also serve later prefills that reuse the same encoder outputs
    feature_keep: dict = field(default_factory=dict)
    last_feature_keep: dict = field(default_factory=dict)

    def begin_prompt(self, input_ids, attention_mask, q_len: int, sizes, drop_layer: int | None) -> None:
        """A prefill: forget the previous prompt of this pass."""
        self.phase = "prefill"
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.prompt_len = self.logical_len = q_len
        self.sizes = sizes
        self.layout, self.layout_done = None, False
        self.keep = self.dead = self.hidden = None
        self.drop_layer = self.cache_cut = drop_layer
        self.kv_index, self.kv_dead = {}, {}
        self.feature_keep = {}

    def begin_decode(self, past: int, q_len: int) -> None:
        self.phase = "decode"
        self.logical_len = past + q_len
