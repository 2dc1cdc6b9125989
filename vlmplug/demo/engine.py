"""What the demo computes, without any UI: answers plain and under methods, the image tokens a pruning method kept,
where the model looked, accuracy against budget. `vlmplug.demo.app` puts a Gradio page on top of it; this module
never imports gradio.

One model serves every request: each request's apply -> generate -> remove (and grounding's own probe) runs under
one lock, so no request's methods are on the model while another request generates.
"""
from __future__ import annotations

import ast
import json
import math
import random
import threading
from dataclasses import dataclass, field
from typing import Any

from ..errors import MethodConfigError, VlmplugError
from ..methods.base import Method, ParamSpec, param_specs

#: keep ratios of the accuracy-vs-budget curve
CURVE_RATIOS = (1.0, 0.5, 0.25, 0.125)
#: a displayed picture's longer side (the world's scenes are 64 px: drawn on a larger copy)
SHOW_SIDE = 384
#: the most side of an uploaded image the demo accepts (the processor resizes; this only refuses absurd files)
MAX_SIDE = 8192


class DemoInputError(VlmplugError, ValueError):
    """A request the demo cannot serve (no image, an unreadable image, an empty question): shown as a message."""


# --------------------------------------------------------------------------------------------- kept tokens
class KeptTokens(Method):
    """A runner that changes nothing and, when the session asks the methods for their statistics (after generation,
    before the handle is removed), records which image tokens the other methods kept: per image of the first sample,
    per placed view, the share of each token kept (1 kept / 0 dropped for token dropping; for KV-cache pruning, the
    share of the pruned layers' cache heads that still hold it)."""

    name = "demo-kept-tokens"

    def __init__(self):
        super().__init__(None)
        self.images: list[dict] | None = None

    def stats(self) -> dict:
        import torch

        from ..results import boxed_views, covering_views, pixel_frame

        s = self.session
        lay = s.layout if s is not None else None
        if lay is None or not lay.samples:
            return {}
        st = s.state
        alive = None
        if st.keep is not None:
            alive = st.keep[0]
            if st.dead is not None:
                alive = alive[~st.dead[0]]
            alive = alive.cpu()
        kv = []
        for li, idx in sorted(st.kv_index.items()):
            dead = st.kv_dead.get(li)
            for h in range(idx.shape[1]):
                rows = idx[0, h]
                if dead is not None:
                    rows = rows[~dead[0, h]]
                kv.append(rows.cpu())
        out = []
        for im in lay.samples[0].images:
            try:
                views = boxed_views(im, covering_views(im))
                frame = pixel_frame(im, views)
            except ValueError:
                continue
            placed = []
            for v in views:
                pos = v.positions.cpu()
                share = torch.ones(pos.numel(), dtype=torch.float64)
                if alive is not None:
                    share *= torch.isin(pos, alive).double()
                if kv:
                    share *= torch.stack([torch.isin(pos, rows).double() for rows in kv]).mean(0)
                placed.append(dict(name=v.name, rows=v.rows, cols=v.cols, boxes=v.boxes.double().cpu().tolist(),
                                   share=share.tolist()))
            out.append(dict(frame=frame, views=placed, tokens=int(im.positions.numel())))
        self.images = out
        return {}


# ------------------------------------------------------------------------------------------- results
@dataclass
class Answer:
    """One answer: plain (method None) or under one method setting."""

    label: str
    method: str | None = None
    params: dict = field(default_factory=dict)
    text: str = ""
    seconds: float = 0.0
    prompt_tokens: int | None = None
    image_tokens: int | None = None
    kept_tokens: int | None = None  # image tokens the LLM kept (pruning methods' statistics), first image
    kept: list | None = None  # KeptTokens.images, where the method dropped or evicted some image tokens
    kept_share: float | None = None  # image tokens kept, KV-cache pruning counted per head: sum of `kept` shares
    error: str | None = None
    extra: dict = field(default_factory=dict)  # e.g. ViCrop's box

    def summary(self) -> dict:
        """JSON-friendly: what `/compare` returns for it."""
        return dict(label=self.label, method=self.method, params=_jsonable(self.params), text=self.text,
                    seconds=round(self.seconds, 4), prompt_tokens=self.prompt_tokens, image_tokens=self.image_tokens,
                    kept_tokens=self.kept_tokens,
                    kept_share=None if self.kept_share is None else round(self.kept_share, 3), error=self.error)


@dataclass
class Comparison:
    plain: Answer
    patched: list[Answer]
    expected: str | None = None
    grounding: Any = None  # vlmplug Grounding or None
    grounding_error: str | None = None
    curve: dict | None = None  # {"plain": acc, "tokens": n, "methods": {label: [(kept, acc), ...]}}
    notes: list[str] = field(default_factory=list)


def _jsonable(value):
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def parse_literal(text):
    """A form's text for a "literal" parameter: a Python literal where it parses as one, else the string; empty or
    "None" is None (as `vlmplug eval`'s key=value parameters)."""
    if text is None:
        return None
    if not isinstance(text, str):
        return text
    text = text.strip()
    if not text:
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_method(text: str, params: Any = None) -> tuple[str | None, dict]:
    """ "fastv", "fastv:keep_ratio=0.25,layer=2" (as `vlmplug eval --method`) and optional JSON / dict parameters
    -> (name or None for "none" / "", parameters). The dict's parameters win over the string's."""
    from ..evaluation.runner import MethodSpec

    text = (text or "").strip()
    extra: dict = {}
    if isinstance(params, dict):
        extra = dict(params)
    elif isinstance(params, str) and params.strip():
        try:
            extra = json.loads(params)
        except json.JSONDecodeError as e:
            raise MethodConfigError(f"params must be a JSON object, e.g. {{\"keep_ratio\": 0.25}}: {e}") from None
        if not isinstance(extra, dict):
            raise MethodConfigError(f"params must be a JSON object, got {type(extra).__name__}")
    if not text or text.lower() in ("none", "plain"):
        if extra:
            raise MethodConfigError("parameters were given without a method")
        return None, {}
    spec = MethodSpec.parse(text)
    return spec.name.lower(), {**spec.params, **extra}


def load_image(image) -> "PIL.Image.Image":  # noqa: F821
    """A PIL image, a path or a numpy array -> an RGB PIL image; DemoInputError for anything unreadable."""
    from PIL import Image, UnidentifiedImageError

    if image is None or (isinstance(image, str) and not image.strip()):
        raise DemoInputError("no image: upload one or draw a random world scene")
    try:
        if isinstance(image, Image.Image):
            im = image
        elif isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
            with Image.open(image) as f:
                f.load()
                im = f.copy()
        elif hasattr(image, "shape"):
            im = Image.fromarray(image)
        else:
            raise DemoInputError(f"cannot read an image from a {type(image).__name__}")
        if min(im.size) < 1 or max(im.size) > MAX_SIDE:
            raise DemoInputError(f"the image is {im.size[0]}x{im.size[1]}; sides of 1..{MAX_SIDE} pixels are accepted")
        return im.convert("RGB")
    except DemoInputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, TypeError, SyntaxError) as e:
        raise DemoInputError(f"this file is not an image the demo can read ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------- engine
class DemoEngine:
    """One model, many requests. `compare` / `answer` are thread-safe (one lock around every use of the model).

    model / processor: as loaded (else `model_id` is loaded: "world", the embedded model, or a checkpoint id / path);
    model_id also names the model on the page."""

    def __init__(self, model=None, processor=None, model_id: str = "world", *, dtype=None, device=None,
                 max_new_tokens: int | None = None):
        if (model is None) != (processor is None):
            raise ValueError("give both model and processor, or neither (then model_id is loaded)")
        if model is None:
            from ..loading import load

            kw = {} if device is None else {"device": device}
            model, processor = load(model_id, dtype=dtype, **kw)
            self.is_world = model_id == "world"
        else:  # a model given: the embedded one if it was loaded from the packaged weights
            from pathlib import Path

            from ..world import WEIGHTS_DIR

            where = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
            self.is_world = bool(where) and Path(where).resolve() == WEIGHTS_DIR.resolve()
            if model_id == "world" and not self.is_world:
                model_id = where or type(model).__name__
        self.model, self.processor, self.model_id = model, processor, model_id
        self.max_new_tokens = max_new_tokens or (8 if self.is_world else 32)
        self.lock = threading.Lock()
        self._specs: dict[str, list[ParamSpec]] = {}

    # -------------------------------------------------------------- methods and their parameters
    def method_classes(self) -> dict[str, type]:
        """Every method the demo offers: the registry's, then the pipelines run around generation (vicrop, carve)."""
        from ..pipeline import pipeline_methods
        from ..registry import method_registry

        out = dict(sorted(method_registry().items()))
        out.update({name: cls for name, (cls, _) in pipeline_methods().items()})
        return out

    def method_names(self) -> list[str]:
        return list(self.method_classes())

    def specs(self, name: str) -> list[ParamSpec]:
        if name not in self._specs:
            self._specs[name] = param_specs(self._class(name))
        return self._specs[name]

    def _class(self, name: str) -> type:
        classes = self.method_classes()
        if name not in classes:
            raise MethodConfigError(f"unknown method {name!r}; available: {sorted(classes)}")
        return classes[name]

    def config(self, name: str, params: dict | None = None):
        """The validated config of one method setting (MethodConfigError with the reason otherwise)."""
        cls = self._class(name)
        params = dict(params or {})
        if hasattr(cls, "from_params"):
            return cls.from_params(**params)
        allowed = [s.name for s in self.specs(name)]
        unknown = [k for k in params if k not in allowed]
        if unknown:
            raise MethodConfigError(f"{name}: unknown parameter(s) {unknown}; allowed: {allowed}")
        params = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
        try:
            return cls(**params)
        except TypeError as e:
            raise MethodConfigError(f"{name}: {e}") from None

    def form_params(self, name: str, values: dict[str, Any], budget: str | None = None) -> dict:
        """A form's raw widget values for one method -> the parameters to build it with: numbers as ints / floats,
        "literal" text parsed; of a group of exclusive parameters only `budget` (the one the form chose) is kept; a
        parameter left at its declared default is left out."""
        out = {}
        specs = {s.name: s for s in self.specs(name)}
        for key, raw in values.items():
            s = specs.get(key)
            if s is None:
                raise MethodConfigError(f"{name}: unknown parameter {key!r}")
            chosen = bool(s.exclusive) and budget is not None and (key == budget or budget in s.exclusive)
            if chosen and key != budget:
                continue  # the form gives one of the group
            value = _coerce(name, s, raw)
            if not chosen and (value is None and s.optional or (value == s.default and type(value) is type(s.default))):
                continue  # left unset / at the declared default
            out[key] = value
        return out

    # ------------------------------------------------------------------------ answering
    def answer(self, image, question: str, method: str | None = None, params: dict | None = None,
               label: str | None = None) -> Answer:
        """One answer (thread-safe). A bad setting or a failing method is reported in `Answer.error`."""
        image = load_image(image)
        question = _check_question(question)
        return self._answer(image, question, method, params or {}, label)

    def _answer(self, image, question, method, params, label=None) -> Answer:
        from .. import pipeline

        ans = Answer(label=label or _label(method, params), method=method, params=dict(params))
        try:
            cfg = self.config(method, params) if method is not None else None
        except (MethodConfigError, ValueError, TypeError) as e:
            ans.error = str(e)
            return ans
        probe = None
        methods = None
        if cfg is not None:
            methods = cfg
            if method not in self._pipeline_names():
                probe = KeptTokens()
                methods = [cfg, probe]
        try:
            with self.lock:
                info = pipeline.generate_info(self.model, self.processor, image, question, methods=methods,
                                              max_new_tokens=self.max_new_tokens)
        except Exception as e:  # noqa: BLE001 - one setting failing must not end the request
            ans.error = f"{type(e).__name__}: {e}" if not isinstance(e, VlmplugError) else str(e)
            return ans
        ans.text, ans.seconds = info["text"], float(info["seconds"])
        ans.prompt_tokens, ans.image_tokens = info["prompt_tokens"], info["image_tokens"]
        st = ((info.get("stats") or {}).get(method) or {}) if method else {}
        kept = st.get("tokens_kept_per_image")
        if kept and kept[0]:
            ans.kept_tokens = int(kept[0][0])
        if probe is not None and probe.images and any(
                any(sh < 1.0 for v in im["views"] for sh in v["share"]) for im in probe.images):
            ans.kept = probe.images
            first = probe.images[0]["views"]
            ans.kept_share = float(sum(sum(v["share"]) for v in first))
        res = (info.get("results") or {}).get(method) if method else None
        if isinstance(res, dict) and "box" in res:
            ans.extra["box"] = res["box"]
        return ans

    def _pipeline_names(self) -> set[str]:
        from ..pipeline import pipeline_methods

        return set(pipeline_methods())

    def compare(self, image, question: str, settings: list[tuple[str, dict]], *, scene: dict | None = None,
                ground: bool = True, curve: bool = True) -> Comparison:
        """The plain answer and one answer per (method, params) setting, where the model looked (TAG map of the
        question), and, when `scene` holds the image's questions with known answers ({"questions": [[text,
        answer], ...]}), accuracy against the kept-token budget for the pruning settings."""
        image = load_image(image)
        question = _check_question(question)
        plain = self._answer(image, question, None, {}, "plain")
        if plain.error:
            raise DemoInputError(f"the model could not answer: {plain.error}")
        patched = [self._answer(image, question, name, params) for name, params in settings]
        known = dict((q, a) for q, a in (scene or {}).get("questions", []))
        out = Comparison(plain=plain, patched=patched, expected=known.get(question.strip()))
        if ground:
            try:
                from ..grounding import ground as ground_fn

                with self.lock:
                    out.grounding = ground_fn(self.model, self.processor, image, question)
            except ImportError as e:
                out.grounding_error = f"the heatmap needs the 'ground' extra: {e}"
            except Exception as e:  # noqa: BLE001 - the answers stand without the map
                out.grounding_error = f"{type(e).__name__}: {e}"
        if curve and known:
            out.curve = self.accuracy_curve(image, list(known.items()),
                                            [(a.method, a.params) for a in patched if not a.error])
        return out

    def accuracy_curve(self, image, questions: list[tuple[str, str]], settings: list[tuple[str, dict]],
                       ratios=CURVE_RATIOS) -> dict | None:
        """Accuracy over `questions` (text, answer) at each keep ratio, for each setting whose method has a
        keep_ratio parameter (the setting's other parameters kept): {"plain": accuracy, "tokens": image tokens,
        "methods": {label: [(image tokens kept, accuracy), ...]}}; None without a pruning setting."""
        from ..pipeline import normalize_answer

        pruning = [(n, p) for n, p in settings if n and any(s.name == "keep_ratio" for s in self.specs(n))]
        if not pruning or not questions:
            return None
        image = load_image(image)

        def accuracy(method, params):
            right, kept = 0, []
            for text, answer in questions:
                a = self._answer(image, text, method, params)
                if a.error:
                    return None, a.error
                right += normalize_answer(a.text) == normalize_answer(str(answer))
                kept.append(next((k for k in (a.kept_share, a.kept_tokens, a.image_tokens) if k is not None), None))
            return (sum(kept) / len(kept) if kept and None not in kept else None, right / len(questions)), None

        (tokens, plain_acc), _ = accuracy(None, {})
        out = {"plain": plain_acc, "tokens": tokens, "methods": {}, "errors": {}}
        for name, params in pruning:
            base = {k: v for k, v in params.items() if k not in ("keep_ratio", "keep_tokens")}
            label = _label(name, base)
            points = []
            for r in ratios:
                point, err = accuracy(name, {**base, "keep_ratio": r})
                if err:
                    out["errors"][label] = err
                    break
                points.append(point)
            if points:
                out["methods"][label] = points
        return out

    # ---------------------------------------------------------------------------------- scenes
    def random_scene(self, seed: int | None = None) -> tuple[Any, dict]:
        """A world scene the model never trained on: (image, {"questions": [[text, answer], ...], "seed": seed})."""
        from ..world import heldout_scenes

        seed = random.randrange(1, 10_000) if seed is None else int(seed)
        scene = heldout_scenes(1, seed=seed)[0]
        return scene.image, {"questions": [[q.text, q.answer] for q in scene.questions], "seed": seed}

    @staticmethod
    def bundled_scene() -> tuple[Any, dict]:
        from ..world import sample_scene

        image, meta = sample_scene()
        return image, {"questions": [[q["question"], q["answer"]] for q in meta["questions"]], "seed": meta.get("seed"),
                       "question": meta["question"]}


def _check_question(question) -> str:
    if not isinstance(question, str) or not question.strip():
        raise DemoInputError("no question: type one, or pick one of the scene's questions")
    if len(question) > 2000:
        raise DemoInputError(f"the question is {len(question)} characters long; 2000 at most")
    return question.strip()


def _label(method, params) -> str:
    if method is None:
        return "plain"
    if not params:
        return method
    return method + ":" + ",".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in params.items())


def _coerce(method: str, spec: ParamSpec, raw):
    """One widget's raw value -> the parameter's value (None for an empty box)."""
    if isinstance(raw, str) and spec.kind not in ("text", "choice", "literal"):
        raw = raw.strip()
        if raw == "" or raw == "None":
            return None
        raw = parse_literal(raw)
    if raw is None:
        return None
    if spec.kind == "int":
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw) or raw != int(raw):
            raise MethodConfigError(f"{method}: {spec.name}={raw!r} must be a whole number")
        return int(raw)
    if spec.kind == "float":
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise MethodConfigError(f"{method}: {spec.name}={raw!r} must be a number")
        return float(raw)
    if spec.kind == "bool":
        return bool(raw)
    if spec.kind == "literal":
        return parse_literal(raw)
    return raw


# ---------------------------------------------------------------------------------------------- pictures
def _scaled(image, side: int = SHOW_SIDE):
    """A larger copy for display (nearest neighbour for small pictures: the world's pixels stay crisp)."""
    from PIL import Image

    w, h = image.size
    s = side / max(w, h)
    if s <= 1:
        return image.copy(), 1.0
    resample = Image.NEAREST if max(w, h) <= 128 else Image.BICUBIC
    return image.resize((round(w * s), round(h * s)), resample), s


def kept_picture(image, kept: list, image_index: int = 0):
    """The image with its pruned tokens darkened and its kept tokens outlined (green: kept; a token kept by part of
    the cache heads is darkened in proportion). None when nothing is known about the image."""
    from PIL import Image, ImageDraw

    if not kept or image_index >= len(kept):
        return None
    info = kept[image_index]
    big, _ = _scaled(image.convert("RGB"))
    W, H = big.size
    fw, fh = info["frame"]
    sx, sy = W / fw, H / fh
    shade = Image.new("L", big.size, 0)
    sd = ImageDraw.Draw(shade)
    outline = []
    for v in info["views"]:
        for (x0, y0, x1, y1), share in zip(v["boxes"], v["share"]):
            box = (x0 * sx, y0 * sy, x1 * sx - 1, y1 * sy - 1)
            if share < 1.0:
                sd.rectangle(box, fill=int(round(175 * (1.0 - share))))
            if share > 0.0:
                outline.append(box)
    dark = Image.new("RGB", big.size, (0, 0, 0))
    out = Image.composite(dark, big, shade)
    d = ImageDraw.Draw(out)
    for box in outline:
        d.rectangle(box, outline=(40, 220, 90), width=1)
    return out


def grounding_picture(grounding):
    """The grounding overlay (heatmap over the image) with its box (white) and point (a cross)."""
    from PIL import ImageDraw

    big, s = _scaled(grounding.overlay())
    d = ImageDraw.Draw(big)
    if grounding.box is not None:
        x0, y0, x1, y1 = grounding.box
        d.rectangle((x0 * s, y0 * s, x1 * s - 1, y1 * s - 1), outline=(255, 255, 255), width=3)
    x, y = grounding.point
    x, y, r = x * s, y * s, max(6, SHOW_SIDE // 40)
    for colour, w in (((0, 0, 0), 5), ((255, 255, 255), 2)):
        d.line((x - r, y, x + r, y), fill=colour, width=w)
        d.line((x, y - r, x, y + r), fill=colour, width=w)
    return big


def curve_figure(curve: dict):
    """A matplotlib Figure: accuracy over the scene's questions against image tokens kept (KV-cache pruning: the
    share of cache heads holding each token, summed), one line per setting, the plain model dashed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 3.4), dpi=100)
    ax = fig.add_subplot(111)
    for label, points in curve["methods"].items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label=label)
    if curve.get("plain") is not None:
        ax.axhline(curve["plain"], color="grey", linestyle="--", label="plain")
    ax.set_xlabel("image tokens kept")
    ax.set_ylabel("accuracy on the scene's questions")
    ax.set_ylim(-0.05, 1.05)
    if curve.get("tokens"):
        ax.set_xlim(0, curve["tokens"] * 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig
