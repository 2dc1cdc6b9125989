"""The imbalanced-attention fix ("modPAI"; Arif, Dip, Hussain, Zhang, Thomas, arXiv 2501.12206, "Fixing Imbalanced
Attention to Mitigate In-Context Hallucination of Large Vision Language Model"), as the released code runs it
(hasanar1f/llava-hallunication-fix, modPAI/attention.py and clip_encoder.py `update_modpai_alpha`), with the
paper's head-specific modulation as an option.

Two token sets per image, from the vision tower's attention (CLS row; towers without CLS use the mean attention
a patch receives, averaged over each LLM token's patches where tokens pool or merge patches):
  - informative ("top"): the `local_ratio` share of the image's tokens with the most CLS attention in the
    tower's first layer;
  - outliers ("bottom"): tokens whose CLS attention in the tower's second to last layer lies above Q3 + 1.5 IQR
    (the high-norm register / sink patches); they leave the informative set.
Then, PAI-style, in the chosen decoder layers, on the query row producing the next token, all heads:
s <- s + alpha |s| on informative tokens and s <- s + beta |s| on outliers (other image tokens are left alone).
Defaults: alpha 0.7, beta 0.3, local_ratio 0.25 (the code's defaults; its README runs alpha 0.9), layers 2 to the
last, PAI's CFG step with gamma 1.1 and the 0.1 plausibility cutoff (`handle.guidance`, as `pai`).

`heads="uniform"` (default) is the released code: one alpha and beta for every head. `heads="sensitivity"` is the
paper's head-specific modulation; its formula is not in the code, and this is vlmplug's reading of it: a head's
strength is scaled by its visual sensitivity, the attention mass it puts on the image in that very row, divided by
the mean over heads (so the strengths average to alpha and beta). The code's optional "spatial" token stream
(spatial_token_ratio, 0 by default) is not offered. `alpha=0, beta=0` (and gamma=1) is the identity.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...backend.plan import Amplify, LayerPlan
from ...registry import register_method
from ...selection import check_selection, freeze, resolve
from ..base import Method, MethodConfig, check_choice, check_range
from ..pruning.vision_scores import VisionScores
from .pai import next_token_rows, pai_mix, text_only_inputs, warn_missing_branch


def iqr_outliers(x: torch.Tensor) -> torch.Tensor:
    """bool [n]: values above Q3 + 1.5 IQR (numpy's linear percentiles)."""
    q1, q3 = torch.quantile(x.double(), torch.tensor([0.25, 0.75], dtype=torch.float64))
    return x.double() > q3 + 1.5 * (q3 - q1)


def token_sets(first: torch.Tensor, penult: torch.Tensor, local_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(informative, outliers), bool [n], from one image's per-token scores (NaN: a token without a patch)."""
    ok = ~torch.isnan(first)
    n = int(ok.sum())
    top = torch.zeros_like(ok)
    k = int(n * local_ratio)
    if k:
        top[torch.topk(first.double().masked_fill(~ok, float("-inf")), k).indices] = True
    bottom = torch.zeros_like(ok)
    if n:
        bottom[ok] = iqr_outliers(penult[ok])
    return top & ~bottom, bottom


@register_method("modpai")
@dataclass(frozen=True)
class ModPAI(MethodConfig):
    """PAI-style boosts with one strength for informative image tokens and another for outlier tokens (modPAI)."""

    alpha: float = 0.7
    beta: float = 0.3
    local_ratio: float = 0.25
    layers: tuple[int, ...] | str | int | None = "2:"
    heads: str = "uniform"
    gamma: float = 1.1
    plausibility: float = 0.1

    def __post_init__(self):
        check_range("modpai", "alpha", self.alpha, 0.0, None)
        check_range("modpai", "beta", self.beta, 0.0, None)
        check_range("modpai", "local_ratio", self.local_ratio, 0.0, 1.0)
        check_range("modpai", "gamma", self.gamma, 1.0, None)
        check_range("modpai", "plausibility", self.plausibility, 0.0, 1.0)
        check_choice("modpai", "heads", self.heads, ("uniform", "sensitivity"))
        check_selection("modpai", "layers", self.layers)
        self._normalise("layers", freeze(self.layers))

    def build(self) -> "ModPAIRunner":
        return ModPAIRunner(self)


class ModPAIRunner(VisionScores, Method):
    wants_image_features = True

    def setup(self, adapter):
        self._layers = set(resolve("modpai", "layers", self.layers, adapter.num_layers))
        self._setup_vision(adapter, {0: "cls", -2: "cls"})
        v = sorted(self._vision_layers)
        self._first, self._penult = v[0], v[-1]
        self._marks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # pass -> (informative, outliers) [B, L]
        self._fresh: dict[str, bool] = {}  # pass -> the marks belong to its current prompt
        self._counts: list = []

    @property
    def _on(self) -> bool:
        return self.alpha > 0 or self.beta > 0

    def edit_layers(self):
        return {"amplify": set(self._layers)} if self._on else {}

    def begin_forward(self, session):
        warn_missing_branch(self, session, "modpai-text")
        st = session.state
        if st.phase == "prefill" and not st.reuses_encoder:
            self._fresh[st.label] = False  # this prompt's image-feature call must bring its own token sets

    def _image_scores(self, n_rows: int, image, first, penult) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of one image's features: (first-layer, penultimate-layer) scores; NaN where a row has no patch."""
        if self._grid.packed:
            ids, crop, patch = self.packed_crops(image)
            out = []
            for sc in (first, penult):
                s = torch.full((len(crop),), float("nan"), dtype=torch.float64)
                for c, gi in enumerate(ids):
                    mine = crop == c
                    s[mine] = sc[gi][patch[mine]].double()
                out.append(s)
            return out[0], out[1]
        crops = self.crops_of(n_rows, image)
        return (torch.cat([first[i].double() for i, _ in crops]), torch.cat([penult[i].double() for i, _ in crops]))

    def feature_plan(self, rows, images, session):
        first, penult = self.token_scores(self._first), self.token_scores(self._penult)
        self._crop, self._scores_len = 0, [int(t.numel()) for t in first]
        st = session.state
        L = max(st.prompt_len, max(int(im.positions.max()) + 1 for _, im in images))
        top = torch.zeros(len(session.layout.samples), L, dtype=torch.bool)
        bottom = torch.zeros_like(top)
        counts, done = [], {}
        for x, (b, im) in zip(rows, images):
            if im.index is not None and im.index in done:  # a row generate() repeated (beams): the same image
                t, o = done[im.index]
            else:
                f, p = self._image_scores(x.shape[0], im, first, penult)
                t, o = token_sets(f, p, self.local_ratio)
                if im.index is not None:
                    done[im.index] = (t, o)
            pos = im.positions.cpu()
            top[b, pos[t]] = True
            bottom[b, pos[o]] = True
            counts.append([int(t.sum()), int(o.sum())])
        self._marks[st.label] = (top, bottom)
        self._fresh[st.label] = True
        if st.label == "main":
            self._counts = counts
        return None

    def layer_plan(self, ctx):
        if not self._on or ctx.layer_idx not in self._layers or ctx.layout is None:
            return None
        marks = self._marks.get(ctx.label)
        if marks is None or not self._fresh.get(ctx.label):
            return None
        rows = next_token_rows(ctx)
        if not bool(rows.any()):
            return None
        top, bottom = ctx.keys_at(marks[0]), ctx.keys_at(marks[1])
        strength = top.float() * self.alpha + bottom.float() * self.beta  # [B, S] or [B, Hq, S]
        strength = strength[:, None, :] if strength.dim() == 2 else strength
        if self.heads == "sensitivity":  # per head: its image mass on this row over the mean over heads
            mass = (ctx.attention(rows) * ctx.image_keys.reshape(ctx.batch, -1, ctx.kv_len).float()).sum(-1)
            rel = mass / mass.mean(-1, keepdim=True).clamp(min=1e-12)  # [B, Hq]
            strength = strength * rel[:, :, None]
        return LayerPlan(amplify=Amplify(keys=top | bottom, alpha=strength, rows=rows))

    def verify(self, session):
        if not self._on:
            return None
        if not self._fresh.get(session.state.label):
            return "modpai expected the vision tower's attention of this prompt's images; none was seen"
        missed = sorted(li for li in self._layers if ("amplify", li) not in session.state.effects)
        if missed:
            return f"modpai expected amplified attention in decoder layers {missed}; none was applied"
        return None

    def stats(self):
        return {"layers": sorted(self._layers), "alpha": self.alpha, "beta": self.beta, "heads": self.heads,
                "gamma": self.gamma,
                # per image of the latest prefill: [informative tokens, outlier tokens]
                "tokens": self._counts}

    def result(self, label: str = "main"):
        """The token sets of the latest prompt of pass `label`: {"informative": [[positions] per sample],
        "outliers": [...]} (logical prompt positions), or None."""
        marks = self._marks.get(label)
        if marks is None:
            return None
        return {name: [torch.nonzero(r).flatten().tolist() for r in m] for name, m in zip(("informative", "outliers"), marks)}

    def guidance(self, inputs: dict):
        """PAI's CFG branch for these generate() inputs (None when gamma == 1)."""
        if self.gamma == 1.0:
            return None
        from ...guidance import PassMix

        return PassMix(self.session.model, text_only_inputs(self.session, inputs),
                       mix=pai_mix(self.gamma, self.plausibility), label="modpai-text")
