"""VHR (He et al., ACL 2025, "Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence").

At the first generation step (the prefill of a prompt with images), layer by layer in the chosen layers:
  VHD[l, h] = || A_lh(with the image) - A_lh(the same prompt without the image) ||_2
where A_lh is head h's attention output (its slice of o_proj's input) at the last position. Outlier filter: a head
whose VHD is above mean + std of the layer's VHDs *and* whose text-only output energy ||A_lh(text)||^2 is above mean +
std of those is set to 0 (it surges when the image is removed). The heads whose VHD is above the layer's median are
reinforced: their outputs are multiplied by `alpha`, at every position of that prefill and at every later step.
Selection is in lockstep (the paper's Algorithm 1): the text-only branch runs beside the prefill, and layer l's VHD
is measured with the heads of the earlier layers already reinforced in both branches.

Defaults (paper): alpha 2, layers = layer 1 and the last 14 (LLaVA-1.5 / LLaVA-NeXT), outlier filter on; std is
the sample standard deviation (torch's default). `alpha=1` is the identity. The selected heads per layer are in
`handle.stats["vhr"]["heads"]`.

Cost: one text-only forward per prompt (the prompt without its image tokens, no KV cache), run in a helper thread
that advances in step with the prefill and stops after the last chosen layer; head outputs are read from one query
row per sample (O(S)); the scaling is a multiply of the attention output. No L x L tensor.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import torch

from ...backend.plan import LayerPlan
from ...errors import MethodConfigError
from ...registry import register_method
from ...selection import check_selection, freeze, resolve
from ..base import Method, MethodConfig, check_range
from .pai import strip_images

BRANCH = "vhr-text"


class _BranchDone(Exception):
    """Raised inside the text-only branch after the last chosen layer: the rest of its forward is not needed."""


def vhd_select(img: torch.Tensor, txt: torch.Tensor, outlier_filter: bool = True) -> torch.Tensor:
    """img, txt: [Hq, D] head outputs with and without the image -> bool [Hq], the heads above the median VHD."""
    d = (img.double() - txt.double()).norm(dim=-1)
    if outlier_filter and d.numel() > 1:
        ta = txt.double().pow(2).sum(-1)
        d = torch.where((d > d.mean() + d.std()) & (ta > ta.mean() + ta.std()), torch.zeros_like(d), d)
    return d > torch.quantile(d, 0.5)


@register_method("vhr")
@dataclass(frozen=True)
class VHR(MethodConfig):
    """Reinforce the heads whose output changes most when the image is removed (VHR)."""

    alpha: float = 2.0
    layers: tuple[int, ...] | str | int | None = None  # None: layer 1 and the last 14
    outlier_filter: bool = True

    def __post_init__(self):
        check_range("vhr", "alpha", self.alpha, 0.0, None)
        if not isinstance(self.outlier_filter, bool):
            raise MethodConfigError(f"vhr: outlier_filter={self.outlier_filter!r} must be True or False")
        if self.layers is not None:
            check_selection("vhr", "layers", self.layers)
            self._normalise("layers", freeze(self.layers))

    def build(self) -> "VHRRunner":
        return VHRRunner(self)


class _Branch:
    """The text-only branch of one prefill, in its own thread. It and the prefill take turns and never run together:
    whichever hands a message over then waits for the answer."""

    def __init__(self, session, inputs: dict, last_layer: int):
        self.to_main: queue.Queue = queue.Queue()
        self.to_text: queue.Queue = queue.Queue()
        self.last_layer = last_layer
        self.thread = threading.Thread(target=self._run, args=(session, inputs), daemon=True, name="vlmplug-vhr")
        self.thread.vlmplug_branch = self  # the branch's own queues, even if a newer branch has started since
        self.waited = 0.0  # seconds the prefill waited for the branch: the branch's own time (they alternate)

    @staticmethod
    def _modes():
        """The calling thread's inference / autocast modes (thread-local in torch), to repeat them in the branch."""
        autocast = [(d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
        return torch.is_inference_mode_enabled(), autocast

    def start(self):
        self._caller_modes = self._modes()
        self.thread.start()

    def _run(self, session, inputs):
        import contextlib

        inference, autocast = self._caller_modes
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(torch.inference_mode() if inference else torch.no_grad())
                for dev, dt in autocast:
                    stack.enter_context(torch.autocast(dev, dtype=dt))
                stack.enter_context(session.pass_(BRANCH))
                session.model(**inputs, use_cache=False)
            self.to_main.put(("error", MethodConfigError("vhr: the text-only branch ended before the chosen layers")))
        except _BranchDone:
            self.to_main.put(("done", None))
        except BaseException as e:  # noqa: BLE001 - handed to the prefill, which raises it
            self.to_main.put(("error", e))

    def receive(self):
        t = time.perf_counter()
        kind, payload = self.to_main.get()
        self.waited += time.perf_counter() - t
        if kind == "error":
            raise payload
        return kind, payload


class VHRRunner(Method):
    own_passes = frozenset({BRANCH})

    def setup(self, adapter):
        n = adapter.num_layers
        if self.layers is None:
            self._layers = sorted({1 % n, *range(max(0, n - 14), n)})
        else:
            self._layers = resolve("vhr", "layers", self.layers, n)
        self._selected: dict[str, dict[int, torch.Tensor]] = {}  # pass -> layer -> bool [B, Hq]
        self._branch: _Branch | None = None
        self._pending: dict[str, bool] = {}
        self._branch_seconds = 0.0
        self._prompts: dict[str, torch.Tensor | None] = {}  # pass -> the prompt its heads were chosen for

    def _stop_branch(self):
        b, self._branch = self._branch, None
        if b is not None and b.thread.is_alive():
            b.to_text.put(None)  # unblock a branch left waiting by a prefill that raised
            b.thread.join(timeout=5)

    def detach(self):
        self._stop_branch()
        super().detach()

    def begin_forward(self, session):
        st = session.state
        if st.label == BRANCH or st.phase != "prefill":
            return
        self._stop_branch()
        prev = self._prompts.get(st.label)
        ids = st.input_ids
        if (prev is not None and ids is not None and ids.shape[0] == prev.shape[0] and ids.shape[1] > prev.shape[1]
                and torch.equal(ids[:, : prev.shape[1]].cpu(), prev)):
            return  # the same prompt grown by generated tokens (generate without a KV cache): heads stay as chosen
        self._prompts[st.label] = ids.detach().cpu().clone() if ids is not None else None
        self._selected[st.label] = {}
        self._pending[st.label] = self.alpha != 1
        if st.label == "main":
            self._branch_seconds = 0.0

    def layer_plan(self, ctx):
        li = ctx.layer_idx
        if li not in self._layers:
            return None
        if ctx.label == BRANCH:
            return self._branch_plan(ctx)
        sel = self._selected.get(ctx.label, {})
        if ctx.phase == "prefill" and self._pending.get(ctx.label):
            lay = ctx.layout
            if lay is None or not any(s.images for s in lay.samples):
                self._pending[ctx.label] = False
                return None
            if self._branch is None:
                self._start_branch(ctx)
            sel[li] = self._select(ctx)
            if li == self._layers[-1]:
                self._pending[ctx.label] = False
        chosen = sel.get(li)
        if chosen is None:
            return None
        scale = torch.where(chosen.to(ctx.device), torch.tensor(float(self.alpha), device=ctx.device),
                            torch.tensor(1.0, device=ctx.device))
        return LayerPlan(head_scale=scale)

    def _last_rows(self, ctx, positions=None) -> torch.Tensor:
        rows = torch.zeros(ctx.batch, ctx.q_len, dtype=torch.bool, device=ctx.device)
        if positions is None:
            rows[:, -1] = True  # left-padded text-only branch: the last position is the last token
        else:
            for b, p in enumerate(positions):
                rows[b] = ctx.q_pos[b].to(ctx.device) == p
        return rows

    def _start_branch(self, ctx):
        st = ctx.state
        if st.input_ids is None:
            raise MethodConfigError("vhr: the prefill came without input_ids, so the text-only branch (the prompt "
                                    "without its image tokens) cannot be built; call the model with input_ids")
        pad = getattr(ctx.session.adapter.text_config, "pad_token_id", None) or 0
        inputs = strip_images(st.input_ids, st.attention_mask, ctx.layout, pad)
        self._branch = _Branch(ctx.session, inputs, self._layers[-1])
        self._branch.start()
        self._msg = self._branch.receive()  # the branch runs (the prefill waits) up to the first chosen layer

    def _select(self, ctx) -> torch.Tensor:
        """Main prefill at layer li: wait for the branch's head outputs there, choose, hand the choice back."""
        b = self._branch
        last = [s.last_real for s in ctx.layout.samples]
        img_out = ctx.head_outputs(self._last_rows(ctx, last))  # [B, Hq, D]
        kind, (li, txt_out) = self._msg
        if li != ctx.layer_idx:
            raise MethodConfigError(f"vhr: the text-only branch reached layer {li} while the prefill is at "
                                    f"{ctx.layer_idx}")
        chosen = torch.zeros(ctx.batch, ctx.num_heads, dtype=torch.bool)
        for i, s in enumerate(ctx.layout.samples):
            if s.images:
                chosen[i] = vhd_select(img_out[i].cpu(), txt_out[i].cpu(), self.outlier_filter)
        b.to_text.put(chosen)
        self._msg = b.receive()  # the branch runs (the prefill waits) to its next chosen layer, or stops
        if self._msg[0] == "done":
            b.thread.join()
            self._branch = None
            if ctx.label == "main":
                self._branch_seconds = b.waited
        return chosen

    def _branch_plan(self, ctx):
        """Inside the text-only branch's thread, at a chosen layer: report the head outputs, take the choice."""
        b = getattr(threading.current_thread(), "vlmplug_branch", None)
        if b is None:  # a branch forward that is not this runner's thread
            return None
        b.to_main.put(("layer", (ctx.layer_idx, ctx.head_outputs(self._last_rows(ctx)).cpu())))
        chosen = b.to_text.get()
        if chosen is None:
            raise _BranchDone()
        if ctx.layer_idx == b.last_layer:
            raise _BranchDone()
        return LayerPlan(head_scale=torch.where(chosen.to(ctx.device), torch.tensor(float(self.alpha), device=ctx.device),
                                                torch.tensor(1.0, device=ctx.device)))

    def verify(self, session):
        if self.alpha == 1:
            return None
        sel = self._selected.get(session.state.label, {})
        missed = [li for li in self._layers if li not in sel]
        if missed:
            return f"vhr expected heads chosen in decoder layers {missed}; the text-only branch did not reach them"
        missed = [li for li in self._layers if ("head_scale", li) not in session.state.effects]
        if missed:
            return f"vhr expected reinforced heads in decoder layers {missed}; none were scaled"
        return None

    def stats(self):
        sel = self._selected.get("main", {})
        return {"alpha": self.alpha, "layers": list(self._layers), "outlier_filter": self.outlier_filter,
                # per layer, per sample: the reinforced heads of the latest prefill
                "heads": [None if li not in sel else [torch.nonzero(r).flatten().tolist() for r in sel[li]]
                          for li in self._layers]}

    @property
    def branch_seconds(self) -> float:
        """Seconds the latest prefill of the main pass spent in the text-only branch (an extra pass inherent to
        the method; eval/bench_attention.py reports it apart)."""
        return self._branch_seconds
