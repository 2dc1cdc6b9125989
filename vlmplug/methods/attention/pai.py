"""PAI (Liu, Zheng, Chen, ECCV 2024, "Paying More Attention to Image"), the attention intervention.

In the chosen decoder layers, for the query row that produces the next token (the prompt's last token at prefill,
the new token while decoding), every head's pre-softmax logits on the image's tokens become s + alpha * |s|
(positive logits grow by (1 + alpha), negative ones move toward 0), then softmax. Defaults from the official code
(LALBJ/PAI): layers 2 to the last (its start_layer=2 .. end_layer=32 on a 32-layer model), alpha 0.2, all heads.
`alpha=0` is the identity. The logit-level CFG step against a text-only branch (the paper's part (b)) is not in
this method yet; `vlmplug.PassMix` with `cfg_mix` runs such a branch.

SDPA cost: the amplification depends on the score, so the chosen rows (one per sample and step) are recomputed
exactly from q.K^T (O(S) per head), the rest of the call stays one SDPA call; no L x L tensor.
Samples without an image are left alone.

The paper's part (b), logit refinement, runs through the logits hook: a text-only branch (the same prompt with
the image's tokens removed, its own KV cache and pass) beside generate(), and
    log p = gamma * log p(y | image, prompt) - (gamma - 1) * log p(y | prompt),
with the adaptive plausibility cutoff: tokens whose conditional log-probability is below log(beta) + its maximum
are excluded. gamma 1.1 and beta 0.1 are the official README's values; gamma=1 turns it off. `vlmplug.generate`
adds the branch; with `model.generate`, pass `logits_processor=handle.guidance(inputs)`.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ...backend.plan import Amplify, LayerPlan
from ...registry import register_method
from ...selection import check_selection, freeze, resolve
from ..base import Method, MethodConfig, check_range


@register_method("pai")
@dataclass(frozen=True)
class PAI(MethodConfig):
    """Amplify the last query row's attention logits on image tokens (PAI)."""

    alpha: float = 0.2
    layers: tuple[int, ...] | str | int | None = "2:"
    gamma: float = 1.1
    beta: float = 0.1

    def __post_init__(self):
        check_range("pai", "alpha", self.alpha, 0.0, None)
        check_range("pai", "gamma", self.gamma, 1.0, None)
        check_range("pai", "beta", self.beta, 0.0, 1.0)
        check_selection("pai", "layers", self.layers)
        self._normalise("layers", freeze(self.layers))

    def build(self) -> "PAIRunner":
        return PAIRunner(self)


class PAIRunner(Method):
    def setup(self, adapter):
        self._layers = set(resolve("pai", "layers", self.layers, adapter.num_layers))

    def begin_forward(self, session):
        warn_missing_branch(self, session, "pai-text")

    def edit_layers(self):
        return {"amplify": set(self._layers)} if self.alpha > 0 else {}

    def layer_plan(self, ctx):
        if self.alpha == 0 or ctx.layer_idx not in self._layers or ctx.layout is None:
            return None
        rows = next_token_rows(ctx)
        if not bool(rows.any()):
            return None
        return LayerPlan(amplify=Amplify(keys=ctx.image_keys, alpha=torch.tensor(float(self.alpha)), rows=rows))

    def verify(self, session):
        if self.alpha == 0:
            return None
        fx = session.state.effects
        missed = sorted(li for li in self._layers if ("amplify", li) not in fx)
        if missed:
            return f"pai expected amplified attention in decoder layers {missed}; none was applied"
        return None

    def stats(self):
        return {"layers": sorted(self._layers), "alpha": self.alpha, "gamma": self.gamma}

    def guidance(self, inputs: dict):
        """The CFG branch for these generate() inputs (None when gamma == 1)."""
        if self.gamma == 1.0:
            return None
        from ...guidance import PassMix

        return PassMix(self.session.model, text_only_inputs(self.session, inputs), mix=pai_mix(self.gamma, self.beta),
                       label="pai-text")


def next_token_rows(ctx) -> torch.Tensor:
    """bool [B, Lq]: the query row that produces the next token (the prompt's last token at prefill, the new token
    while decoding), in samples with an image."""
    rows = torch.zeros(ctx.batch, ctx.q_len, dtype=torch.bool, device=ctx.device)
    for b, s in enumerate(ctx.layout.samples):
        if not s.images:
            continue
        if ctx.phase == "prefill":
            rows[b] = ctx.q_pos[b].to(ctx.device) == s.last_real
        else:
            rows[b, -1] = True  # the token being generated
    return rows


def warn_missing_branch(runner, session, label: str) -> None:
    """Warn once when decoding runs with gamma != 1 but the method's CFG branch (pass `label`) never ran."""
    st = session.state
    if (runner.gamma != 1.0 and st.label == "main" and st.phase == "decode" and not getattr(runner, "_warned", False)
            and session.state_of(label) is None):
        runner._warned = True
        warnings.warn(f"{runner.name}: gamma={runner.gamma} needs its text-only branch beside generate(): pass "
                      "logits_processor=handle.guidance(inputs) (vlmplug.generate does); running the attention "
                      "intervention only", stacklevel=3)


def pai_mix(gamma: float, beta: float):
    """PAI's logit refinement with the adaptive plausibility cutoff (log-softmax space)."""

    def mix(main: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        cond = torch.log_softmax(main.float(), -1)
        out = gamma * cond - (gamma - 1) * torch.log_softmax(text.float(), -1)
        cut = cond < cond.max(-1, keepdim=True).values + math.log(beta) if beta > 0 else torch.zeros_like(cond, dtype=torch.bool)
        return out.masked_fill(cut, float("-inf"))

    return mix


def text_only_inputs(session, inputs: dict) -> dict:
    """The prompt without its image tokens (the branch PAI contrasts with), left-padded again: input_ids and
    attention_mask (token-type ids rebuilt as text); no pixel inputs."""
    ad = session.adapter
    ids, am = inputs["input_ids"], inputs.get("attention_mask")
    lay = ad.locate(ids, am, ad.capture_meta(inputs), None)
    out = strip_images(ids, am, lay, getattr(ad.text_config, "pad_token_id", None) or 0)
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in inputs:
            out[key] = torch.zeros_like(out["input_ids"])
    return out


def strip_images(ids: torch.Tensor, am: torch.Tensor | None, layout, pad: int) -> dict:
    """input_ids / attention_mask of the prompt `ids` with every image token of `layout` removed, left-padded."""
    am = am if am is not None else torch.ones_like(ids)
    rows = []
    for b, s in enumerate(layout.samples):
        keep = am[b].bool().clone()
        keep[s.image_positions.to(keep.device)] = False
        rows.append(ids[b][keep])
    n = max(len(r) for r in rows)
    new_ids = ids.new_full((len(rows), n), pad)
    new_am = am.new_zeros((len(rows), n))
    for b, r in enumerate(rows):
        new_ids[b, n - len(r):] = r
        new_am[b, n - len(r):] = 1
    return {"input_ids": new_ids, "attention_mask": new_am}
