"""VAR (Kang, Kim, Kim, Hwang, ICLR 2025, "See What You Are Told: Visual Attention Sink in Large Multimodal Models").

Sink tokens are the ones whose hidden state, at the input of a decoder layer, carries a massive activation in the
model's sink dimensions: phi(x) = max over d in D_sink of |x[d] / RMS(x)| >= tau (RMS without the norm's weight).
Among the text query rows, the image-centric (row, head) pairs are those that give the image at least `summ` of
their attention and whose image attention is mostly on non-sink image tokens; in those, a share of the mass on every
sink token (text sinks such as BOS included) moves to the non-sink image tokens, in proportion to the attention they
already get. Sinks are found at prefill and reused while decoding (they index cache positions).

The sink dimensions are a property of the language model (Sun et al.'s massive activations): `sink_dims=None`
finds them with a calibration pass (`find_sink_dims`) the first time a model is seen, cached in memory by its config
and weights and, for a model loaded from a path or the hub, on disk (`$VLMPLUG_CACHE`, default ~/.cache/vlmplug).
LLaMA-2-7B (LLaVA-1.5-7B) has {1415, 2533} in the official code; give `sink_dims` to skip the calibration.

Paper and released code differ; `variant` picks one (defaults: the released config, tau 20, rho 0.5, p 0.6,
summ 0.2; seilk/VisAttnSink A_exps/lv1.5_7b.yml):
  - "paper": select a (row, head) when the non-sink share of its image attention is >= rho; move p of the sink
    mass; every layer from 2 except the last.
  - "code": select when the sink share of its image attention is <= rho (the complement: rho=0.5 agrees); keep p of
    the sink mass and move 1 - p; every layer from 2 including the last (the official `except_last_layer` is
    shadowed by a class attribute, so the last layer is modified).
`p=0` (paper) or `p=1` (code) is the identity.

SDPA cost: the selection (image mass and sink share per row and head) and the redistribution come from the edited
rows' own softmax (backend/plan.py `Gate`, `Redistribute`): the text rows only, a chunk at a time, SDPA for every
other row; no L x L tensor. The sink test reads each layer's input hidden states once at prefill (O(L x |D_sink|)).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ...backend.plan import Gate, LayerPlan, Redistribute
from ...errors import MethodConfigError
from ...registry import register_method
from ...selection import check_selection, freeze, resolve
from ..base import Method, MethodConfig, check_choice, check_range

_MEMORY: dict[str, tuple[int, ...]] = {}


def _cache_file() -> Path:
    root = os.environ.get("VLMPLUG_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vlmplug")
    return Path(root) / "sink_dims.json"


def _text_config(model):
    cfg = model.config
    return getattr(cfg, "text_config", None) or cfg


def _embedding_weight(model) -> torch.Tensor:
    """The input embedding matrix, also where accelerate offloaded it (to disk, or to the CPU beside a GPU): then the
    module holds a meta tensor and its hook's `weights_map` the weight."""
    emb = model.get_input_embeddings()
    w = emb.weight
    if w.device.type == "meta":
        wm = getattr(getattr(emb, "_hf_hook", None), "weights_map", None)
        if wm is None or "weight" not in wm:
            raise MethodConfigError("var: the input embeddings are on the meta device and no offload hook holds "
                                    "them; load the model fully or give sink_dims explicitly")
        w = wm["weight"]
    return w


def _input_device(model) -> torch.device:
    """Where the model takes its input ids: the embeddings' device, or their offload hook's execution device."""
    emb = model.get_input_embeddings()
    if emb.weight.device.type != "meta":
        return emb.weight.device
    dev = getattr(getattr(emb, "_hf_hook", None), "execution_device", None)
    return torch.device(dev) if dev is not None else torch.device("cpu")


def _fingerprint(model) -> str:
    """Config and a few weights: two random-weight models of one config are different models."""
    tc = _text_config(model)
    h = hashlib.sha256(tc.to_json_string(use_diff=False).encode())
    emb = _embedding_weight(model)
    h.update(repr([round(float(x), 6) for x in emb[:4, :8].detach().float().flatten().cpu()]).encode())
    return h.hexdigest()[:16]


def _special_ids(model) -> set[int]:
    out = set()
    for cfg in (model.config, _text_config(model)):
        for k, v in cfg.to_dict().items():
            if isinstance(v, int) and not isinstance(v, bool) and (k.endswith("token_id") or k.endswith("token_index")):
                out.add(v)
    return out


def find_sink_dims(model, n_dims: int = 2, adapter=None, samples: int = 4, length: int = 48) -> tuple[int, ...]:
    """The language model's sink (massive-activation) dimensions, found by a calibration pass and cached.

    Runs `samples` text-only prompts of `length` random tokens (BOS first where the model has one; massive activations
    sit on the first token and on delimiters whatever the text) through the unpatched model, RMS-normalises each
    decoder layer's input hidden states (no weight), takes per channel the largest |value| over tokens, the median of
    that over the middle half of the layers, and keeps the `n_dims` largest channels.
    """
    from ...adapters.base import get_adapter

    key = f"{_fingerprint(model)}|{n_dims}"
    if key in _MEMORY:
        return _MEMORY[key]
    name = str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "") or "")
    disk_key = f"{name}|{key}" if name else None
    path = _cache_file()
    if disk_key and path.is_file():
        try:
            got = json.loads(path.read_text()).get(disk_key)
        except (OSError, ValueError):
            got = None
        if got:
            _MEMORY[key] = tuple(int(d) for d in got)
            return _MEMORY[key]
    ad = adapter or get_adapter(model)
    tc = _text_config(model)
    layers = ad.decoder_layers()
    n = len(layers)
    band = range(n // 4, max(n // 4 + 1, (3 * n) // 4))
    eps = float(getattr(tc, "rms_norm_eps", None) or 1e-6)
    seen: dict[int, torch.Tensor] = {}

    def grab(li):
        def hook(module, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            z = x.detach().float()
            z = z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + eps)
            seen[li] = z.abs().amax(dim=(0, 1)).cpu()
            return None

        return hook

    vocab = int(tc.vocab_size)
    bad = torch.tensor(sorted(i for i in _special_ids(model) if 0 <= i < vocab) or [-1])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (samples, length), generator=g)
    while bool(torch.isin(ids, bad).any()):
        ids = torch.where(torch.isin(ids, bad), torch.randint(0, vocab, ids.shape, generator=g), ids)
    bos = getattr(tc, "bos_token_id", None) or getattr(model.config, "bos_token_id", None)
    if isinstance(bos, int) and 0 <= bos < vocab:
        ids[:, 0] = bos
    dev = _input_device(model)
    hooks = [layers[li].register_forward_pre_hook(grab(li), with_kwargs=True) for li in band]
    live = model.__dict__.get("_vlmplug_handle")
    unpatched = live.session.paused() if live is not None and live.active else contextlib.nullcontext()
    try:
        with torch.no_grad(), unpatched:
            model(input_ids=ids.to(dev), attention_mask=torch.ones_like(ids).to(dev), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    if len(seen) != len(band):
        raise MethodConfigError("var: the sink-dimension calibration did not see the decoder layers' inputs; "
                                "give sink_dims explicitly")
    score = torch.stack([seen[li] for li in band]).median(0).values
    dims = tuple(sorted(int(d) for d in torch.argsort(score, descending=True, stable=True)[:n_dims]))
    _MEMORY[key] = dims
    if disk_key:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            data = json.loads(path.read_text()) if path.is_file() else {}
            data[disk_key] = list(dims)
            path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        except (OSError, ValueError):  # a read-only home: the memory cache still serves this process
            pass
    return dims


@register_method("var")
@dataclass(frozen=True)
class VAR(MethodConfig):
    """Move attention from sink tokens to the image's non-sink tokens in image-centric heads (VAR)."""

    tau: float = 20.0
    rho: float = 0.5
    p: float = 0.6
    summ: float = 0.2
    variant: str = "code"
    layers: tuple[int, ...] | str | int | None = None  # None: "2:" (code) or "2:-1" (paper)
    sink_dims: tuple[int, ...] | None = None  # None: calibrated per model (find_sink_dims)
    n_sink_dims: int = 2

    def __post_init__(self):
        check_choice("var", "variant", self.variant, ("paper", "code"))
        check_range("var", "tau", self.tau, 0.0, None)
        check_range("var", "rho", self.rho, 0.0, 1.0)
        check_range("var", "p", self.p, 0.0, 1.0)
        check_range("var", "summ", self.summ, 0.0, 1.0)
        check_range("var", "n_sink_dims", self.n_sink_dims, 1, None, kind=int)
        if self.layers is None:
            self._normalise("layers", "2:" if self.variant == "code" else "2:-1")
        check_selection("var", "layers", self.layers)
        self._normalise("layers", freeze(self.layers))
        if self.sink_dims is not None:
            dims = (self.sink_dims,) if isinstance(self.sink_dims, int) else self.sink_dims
            if (not isinstance(dims, (list, tuple)) or not dims
                    or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims)):
                raise MethodConfigError(f"var: sink_dims={self.sink_dims!r}; give None (calibrate) or a non-empty "
                                        "list of hidden-state channel indices >= 0")
            self._normalise("sink_dims", tuple(dims))

    @property
    def moved(self) -> float:
        """The share of the sink mass that moves (the paper's p; the code's 1 - p)."""
        return self.p if self.variant == "paper" else 1.0 - self.p

    @property
    def min_share(self) -> float:
        """Least non-sink share of a row's image attention for an image-centric (row, head)."""
        return self.rho if self.variant == "paper" else 1.0 - self.rho

    def build(self) -> "VARRunner":
        return VARRunner(self)


class VARRunner(Method):
    wants_layer_input = True

    def setup(self, adapter):
        self._layers = resolve("var", "layers", self.layers, adapter.num_layers)
        hidden = int(adapter.text_config.hidden_size)
        if self.sink_dims is not None:
            bad = [d for d in self.sink_dims if d >= hidden]
            if bad:
                raise MethodConfigError(f"var: sink_dims {bad} out of range; this model's hidden states have "
                                        f"channels 0..{hidden - 1}")
            self._dims = tuple(self.sink_dims)
        else:
            self._dims = find_sink_dims(adapter.model, self.n_sink_dims, adapter)
        self._eps = float(getattr(adapter.text_config, "rms_norm_eps", None) or 1e-6)
        self._sinks: dict[str, dict[int, torch.Tensor]] = {}  # pass label -> layer -> bool [B, prompt_len]
        self._chosen: dict[int, list] = {}
        self._visual: dict[int, list[int]] = {}

    def edit_layers(self):
        return {"redistribute": set(self._layers)} if self.config.moved > 0 else {}

    def layer_input(self, li, hidden, positions, session):
        if li not in self._layers:
            return
        st = session.state
        x = hidden.detach().float()
        z = x[..., list(self._dims)] / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self._eps)
        sink_rows = z.abs().amax(-1) >= self.tau  # [B, L']
        marked = torch.zeros(hidden.shape[0], max(st.prompt_len, int(positions.max()) + 1), dtype=torch.bool,
                             device=hidden.device)
        marked.scatter_(1, positions, sink_rows)
        store = self._sinks.setdefault(st.label, {})
        if li == self._layers[0]:
            store.clear()
            if st.label == "main":
                self._chosen, self._visual = {}, {}
        store[li] = marked

    def layer_plan(self, ctx):
        if ctx.layer_idx not in self._layers or ctx.layout is None or self.config.moved == 0:
            return None
        sinks_at = self._sinks.get(ctx.label, {}).get(ctx.layer_idx)
        img = ctx.image_keys
        if sinks_at is None or img is None or not bool(img.any()):
            return None
        sinks = ctx.keys_at(sinks_at)  # same shape as img: both follow this call's key positions
        targets = img & ~sinks
        on_select = None
        if ctx.label == "main" and ctx.phase == "prefill":
            li = ctx.layer_idx
            text = ctx.text_queries
            self._visual[li] = [int((sinks_at[b] & s_img).sum()) for b, s_img in
                                enumerate(ctx.layout.image_mask(sinks_at.shape[1], device=sinks_at.device))]

            def on_select(sel, li=li, text=text):
                n = int(text.sum()) * sel.shape[1]
                self._chosen[li] = [int(sel.sum()), n]
        frac = torch.full((ctx.num_heads,), float(self.config.moved), device=ctx.device)
        gate = Gate(pool=img, min_mass=float(self.summ), min_share=float(self.config.min_share), on_select=on_select)
        return LayerPlan(redistribute=Redistribute(sinks=sinks, targets=targets, fraction=frac,
                                                   rows=ctx.text_queries, gate=gate))

    def verify(self, session):
        if self.config.moved == 0:
            return None
        st = session.state
        have = self._sinks.get(st.label, {})
        no_sinks = [li for li in self._layers if li not in have]
        if no_sinks:
            return f"var expected the input hidden states of decoder layers {no_sinks} (to find sink tokens); none came"
        missed = [li for li in self._layers if ("redistribute", li) not in st.effects]
        if missed:
            return f"var expected redistributed attention in decoder layers {missed}; none was applied"
        return None

    def stats(self):
        return {
            "variant": self.variant, "layers": list(self._layers), "sink_dims": list(self._dims),
            "visual_sinks": [self._visual.get(li) for li in self._layers],  # per layer, per sample
            # per layer: share of (text query row, head) pairs that were image-centric and edited
            "selected": [None if li not in self._chosen else self._chosen[li][0] / max(1, self._chosen[li][1])
                         for li in self._layers],
        }
