"""The grounding probe: per chosen query token, the softmax rows it gives every key in chosen decoder layers, each
forward of a prompt (prefill and, for answers, every decode step), and optionally each layer's q / k for rollout.

It is a `Method` runner like `record`, applied by `ground()` and the ViCrop / CARVE pipelines for one call and
removed after; it reads attention through the backend's probes (O(rows x S)) and taps, never an L x L matrix, and
leaves every output unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..backend.plan import LayerPlan, Probe
from ..methods.base import Method
from ..methods.record import logical_rows


@dataclass
class Step:
    """What one forward gave: decoder layer -> float32 [B, T, H, L] rows of the T chosen queries (logical key
    positions, zero for a query a sample lacks), and counts [B, T] (1 where sample b has query t)."""

    rows: dict[int, torch.Tensor] = field(default_factory=dict)
    counts: torch.Tensor | None = None
    phase: str = "prefill"


@dataclass
class QK:
    """One decoder layer's attention inputs at prefill, kept for rollout (O(L x D) per layer)."""

    query: torch.Tensor
    key: torch.Tensor
    mask: torch.Tensor | None
    scale: float
    causal: bool


class TokenProbe(Method):
    """targets: per sample, the logical positions of the chosen query tokens at prefill (None: the last real
    token at prefill and the new token at each decode step). layers: decoder layers (None: all). steps: keep every
    forward (an answer's decode steps), else the latest only. capture_qk: keep q / k of every layer at prefill."""

    name = "grounding-probe"

    def __init__(self, layers=None, targets: list[list[int]] | None = None, steps: bool = False,
                 capture_qk: bool = False):
        super().__init__(None)
        self.name = "grounding-probe"
        self.layers = layers
        self.targets = targets
        self.keep_steps = steps
        self.capture_qk = capture_qk
        self.steps: list[Step] = []
        self.qk: dict[int, QK] = {}
        self._planned: set[int] = set()
        self._probed: set[int] = set()

    def setup(self, adapter):
        n = adapter.num_layers
        self._layer_set = set(range(n)) if self.layers is None else {li % n for li in self.layers}

    def begin_forward(self, session):
        if session.state.label != "main":
            return
        if not self.keep_steps:
            self.steps = []
        self.steps.append(Step(phase=session.state.phase))
        self._planned, self._probed = set(), set()

    def _select(self, ctx) -> list[torch.Tensor]:
        """One bool [B, Lq] per chosen query."""
        lay, B = ctx.layout, ctx.batch
        qp = ctx.q_pos.to(ctx.device)
        if self.targets is None or ctx.phase == "decode":
            if ctx.phase == "decode":
                return [torch.ones(B, ctx.q_len, dtype=torch.bool, device=ctx.device) & (qp == qp[:, -1:])]
            last = torch.tensor([s.last_real for s in lay.samples], device=ctx.device)
            return [qp == last[:, None]]
        T = max((len(t) for t in self.targets), default=0)
        out = []
        for t in range(T):
            want = torch.tensor([tg[t] if t < len(tg) else -1 for tg in self.targets], device=ctx.device)
            out.append(qp == want[:, None])
        return out

    def layer_plan(self, ctx):
        if ctx.vision or ctx.label != "main" or ctx.layer_idx not in self._layer_set or ctx.layout is None:
            return None
        if self.targets is not None and ctx.phase == "prefill" and len(self.targets) != ctx.batch:
            raise ValueError(f"grounding: {len(self.targets)} target lists for a batch of {ctx.batch}")
        li, k_pos, L = ctx.layer_idx, ctx.k_pos, ctx.state.logical_len
        step = self.steps[-1]
        sels = self._select(ctx)
        self._planned.add(li)
        T = len(sels)
        got: dict[int, tuple] = {}

        def store(t):
            def cb(probs, counts):
                got[t] = (logical_rows(probs, k_pos, L), counts.cpu())
                if len(got) == T:
                    step.rows[li] = torch.stack([got[i][0] for i in range(T)], 1)
                    step.counts = torch.stack([got[i][1] for i in range(T)], 1)
                    self._probed.add(li)
            return cb

        plan = LayerPlan(probes=[Probe(sel, store(t)) for t, sel in enumerate(sels)])
        if self.capture_qk and ctx.phase == "prefill":
            c = ctx._call
            causal = bool(c["kwargs"].get("is_causal", getattr(c["module"], "is_causal", True)))

            def tap(q, k, v, mask, scale):
                self.qk[li] = QK(q, k, mask, float(scale), causal)

            plan.taps.append(tap)
        return plan

    def verify(self, session):
        if session.state.label != "main":
            return None
        missed = sorted(self._layer_set - self._probed)
        if missed:
            return f"grounding expected attention rows of decoder layers {missed}; none were read"
        return None
