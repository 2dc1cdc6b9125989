"""lmms-eval model plugin: any supported Hugging Face VLM, under any vlmplug methods, as an lmms-eval model.

    pip install 'vlmplug[lmms]'
    lmms-eval --model vlmplug --model_args pretrained=llava-hf/llava-1.5-7b-hf,methods=fastv,keep_ratio=0.25 \\
        --tasks pope          # or: python -m lmms_eval --model vlmplug ...

lmms-eval finds the model through the ``lmms_eval.models`` entry point that vlmplug's packaging declares
(``vlmplug = "vlmplug.evaluation.lmms_plugin:manifest"``); it imports this module only when it builds its model
registry, and ``import vlmplug`` / ``import vlmplug.evaluation`` never import it.

``--model_args`` (comma-separated ``key=value``; values are Python literals where they parse as one, so
``layers=[2,4]`` is a list):

* ``pretrained``: a checkpoint id or local folder, or ``world`` (the tiny VLM shipped with vlmplug, offline);
* ``methods``: ``none`` (default: the plain model), one method (``fastv``) or several joined by ``+``
  (``fastv+pai``); the names of ``vlmplug.available_methods()`` plus the refinement pipelines ``vicrop``/``carve``;
* every other key is a method parameter: with one method it goes to that method; with several, ``name.param=...``
  names the method, and a bare ``param=...`` goes to the one method that has such a parameter;
* ``dtype`` (``float32``, ``bfloat16``, ``auto``, ...), ``device`` (default: this process's GPU when there is one,
  else the CPU), ``max_new_tokens`` (used when a task's ``generation_kwargs`` give none).

Unknown methods and bad parameters fail in the constructor, before the model is loaded. Each request is answered
alone by :func:`vlmplug.pipeline.generate_info` (the prompt builder, greedy decoding and method handling of
``vlmplug eval``), so an answer here is exactly the answer ``vlmplug.generate`` gives for the same image and text.

Requests: ``generate_until`` decodes greedily (a task's ``temperature > 0``, ``do_sample`` or ``num_beams > 1`` are
ignored with one warning) and cuts the answer at the first ``until`` string; ``<image>`` placeholders in a task's
text are dropped, since vlmplug's prompt builder places the images. ``loglikelihood`` forces the continuation through
generation under the methods and returns (sum of its token log-probabilities, whether greedy decoding gives it).
``generate_until_multi_round`` and video / audio inputs raise NotImplementedError.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import fields, is_dataclass
from typing import Any, Iterable, List, Optional, Tuple

try:
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
except ImportError as e:  # pragma: no cover - exercised only without lmms-eval
    raise ImportError(
        "vlmplug.evaluation.lmms_plugin is the lmms-eval model plugin and needs lmms-eval "
        f"(pip install 'vlmplug[lmms]'); importing it failed: {e}"
    ) from e

from ..errors import MethodConfigError
from .runner import GROUND_METHODS, MethodSpec, parse_pair

MODEL_ID = "vlmplug"
CLASS_PATH = f"{__name__}.VlmplugLMMS"

#: model_args that configure the wrapper itself; every other key is a method parameter
MODEL_KEYS = ("pretrained", "methods", "dtype", "device", "max_new_tokens", "batch_size", "max_batch_size")
#: default ``max_new_tokens`` when a task's generation_kwargs do not set one
DEFAULT_MAX_NEW_TOKENS = 128
#: generation_kwargs understood here (the others are ignored, with one warning)
_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "do_sample", "num_beams")
_KNOWN_GEN_KEYS = ("until", "max_new_tokens", "max_gen_toks", "use_cache", *_SAMPLING_KEYS)
_VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".flv", ".wmv", ".m4v", ".mpeg", ".mpg")


def manifest():
    """The ``lmms_eval.models`` entry point: lmms-eval's registration record for ``--model vlmplug``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)


# ---------------------------------------------------------------------------------------------- model_args


def split_args(text: str) -> list[str]:
    """Split ``key=value,key=value`` at the commas outside brackets and quotes (``layers=[2,4]`` stays one)."""
    parts, cur, depth, quote = [], [], 0, None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def parse_model_args(text: str) -> dict[str, Any]:
    """``"pretrained=world,methods=fastv,keep_ratio=0.25"`` -> a dict; values are Python literals where they parse
    as one (``0.25``, ``[2, 4]``, ``None``), else strings."""
    out: dict[str, Any] = {}
    for part in split_args(text or ""):
        key, value = parse_pair(part)
        if key in out:
            raise MethodConfigError(f"model_args gives {key!r} twice")
        out[key] = value
    return out


def _literal(value: Any) -> Any:
    """A string value as the Python literal it spells (lmms-eval's own parser leaves ``[2,4]`` a string)."""
    return parse_pair(f"v={value}")[1] if isinstance(value, str) else value


def _param_names(name: str) -> list[str]:
    from ..pipeline import pipeline_methods
    from ..registry import method_registry

    reg, pipes = method_registry(), pipeline_methods()
    cls = reg[name] if name in reg else pipes[name][0] if name in pipes else None
    if cls is None or not is_dataclass(cls):
        return []
    return [f.name for f in fields(cls) if f.init]


def _method_names(methods: Any) -> list[str]:
    if methods is None:
        return []
    items = methods.split("+") if isinstance(methods, str) else list(methods)
    names = [str(n).strip().lower() for n in items]
    if any(not n for n in names):
        raise MethodConfigError(f"methods={methods!r}: an empty name; join several methods with '+', e.g. fastv+pai")
    return names


def resolve_methods(methods: Any, params: dict[str, Any]) -> list[MethodSpec]:
    """The methods and their parameters, checked: ``[]`` for the plain model, else one `MethodSpec` per method.
    Raises `MethodConfigError` for an unknown name, a bad or unplaced parameter, or an impossible combination."""
    names = _method_names(methods)
    if not names or names == ["none"]:
        if params:
            raise MethodConfigError(f"methods=none (the plain model) takes no method parameters; got {sorted(params)} "
                                    "(the wrapper's own keys are " + ", ".join(MODEL_KEYS) + ")")
        return []
    if "none" in names:
        raise MethodConfigError(f"methods={'+'.join(names)}: 'none' means the plain model and cannot be combined")
    if len(set(names)) != len(names):
        raise MethodConfigError(f"methods={'+'.join(names)}: a method appears twice")
    per: dict[str, dict] = {n: {} for n in names}
    for key, value in params.items():
        value = _literal(value)
        if "." in key:
            target, _, pname = key.partition(".")
            if target not in per:
                raise MethodConfigError(f"parameter {key!r} names method {target!r}, which is not in "
                                        f"methods={'+'.join(names)}")
            per[target][pname] = value
        elif len(names) == 1:
            per[names[0]][key] = value
        else:
            owners = [n for n in names if key in _param_names(n)]
            if len(owners) != 1:
                why = "no method here takes it" if not owners else f"{' and '.join(owners)} all take it"
                raise MethodConfigError(f"parameter {key!r}: {why}; with several methods write method.param, "
                                        f"e.g. {names[0]}.{key}=...")
            per[owners[0]][key] = value
    specs = [MethodSpec(label=n, name=n, params=per[n]) for n in names]
    for spec in specs:
        if spec.name in GROUND_METHODS:
            raise MethodConfigError(f"{spec.name} is a grounding method (vlmplug.ground): it answers with a point, "
                                    "not text, and has no lmms-eval model form")
        spec.check("text")  # unknown name / bad parameters, before anything loads
    from ..pipeline import pipeline_methods

    pipes = [s.name for s in specs if s.name in pipeline_methods()]
    if len(pipes) > 1:
        raise MethodConfigError(f"one refinement pipeline at a time; got {pipes}")
    return specs


def method_configs(specs: list[MethodSpec]):
    """What `generate_info(methods=...)` takes for the specs: None, one config, or a list of configs."""
    if not specs:
        return None
    from ..pipeline import pipeline_methods
    from ..registry import method_registry

    reg, pipes = method_registry(), pipeline_methods()
    out = []
    for s in specs:
        if s.name in reg:
            out.append(reg[s.name].from_params(**s.params))
        else:
            try:
                out.append(pipes[s.name][0](**s.params))
            except TypeError as e:
                raise MethodConfigError(f"{s.name}: {e}") from None
    return out[0] if len(out) == 1 else out


# ---------------------------------------------------------------------------------------------- the model


def _truncate(text: str, until: Iterable[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cut = len(text)
    for stop in until:
        if stop:
            i = text.find(stop)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


def _flatten(visuals: Any) -> list:
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        return [visuals]
    out = []
    for v in visuals:
        out.extend(_flatten(v) if isinstance(v, (list, tuple)) else [v])
    return out


def _check_dtype(dtype: Any):
    """None for the checkpoint's own dtype ("auto"), else a torch dtype; a bad name fails before loading."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).strip().removeprefix("torch.")
    if name.lower() in ("", "auto", "none"):
        return None
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not a torch dtype; use e.g. float32, bfloat16, float16 or auto")
    return getattr(torch, name)


class VlmplugLMMS(lmms):
    """An lmms-eval "simple" model: a Hugging Face VLM loaded by `vlmplug.load`, answering every request through
    `vlmplug.pipeline.generate_info` under the configured methods (applied for each answer and removed after it)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str = "world",
        methods: Any = "none",
        dtype: Optional[str] = None,
        device: Optional[str] = None,
        max_new_tokens: Optional[int] = None,
        batch_size: Any = 1,
        max_batch_size: Optional[int] = None,
        **method_params: Any,
    ) -> None:
        super().__init__()
        # first everything that can be wrong in the arguments: nothing loads before they are checked
        self.specs = resolve_methods(methods, method_params)
        self.methods = method_configs(self.specs)
        self.method_label = "+".join(s.name for s in self.specs) or "none"
        try:
            self.max_new_tokens = DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else int(max_new_tokens)
        except (TypeError, ValueError):
            self.max_new_tokens = 0
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
        try:
            self.batch_size_per_gpu = int(batch_size)
        except (TypeError, ValueError):  # "auto", "auto:N": one request at a time anyway
            self.batch_size_per_gpu = 1
        self._warned: set = set()
        if self.batch_size_per_gpu != 1:
            self._warn_once("batch", f"vlmplug answers lmms-eval requests one at a time (each under its own method "
                                     f"handle); batch_size={batch_size!r} is ignored")
        dtype = _check_dtype(dtype)
        self.pretrained = str(pretrained)
        self._rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))
        self._world_size = int(os.environ.get("WORLD_SIZE", 1))
        self._device = self._pick_device(device)
        #: per answer: task, doc_id, seconds, prompt_tokens, image_tokens, image_tokens_kept (small, for reports)
        self.records: list[dict] = []

        from ..loading import load

        self._model, self._processor = load(self.pretrained, device=self._device, dtype=dtype)
        if self.specs:
            from ..adapters.base import get_adapter

            get_adapter(self._model, self._processor)  # UnsupportedModelError now, not at the first request

    @staticmethod
    def _pick_device(device: Optional[str]):
        import torch

        if device is None or str(device) == "cuda":
            if not torch.cuda.is_available():
                if device is not None:
                    raise RuntimeError("device=cuda but torch sees no CUDA device; pass device=cpu")
                return torch.device("cpu")
            return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        return torch.device(device)

    # -------------------------------------------------------------------------------- properties lmms-eval reads

    @property
    def model(self):
        return self._model

    @property
    def processor(self):
        return self._processor

    @property
    def tokenizer(self):
        return getattr(self._processor, "tokenizer", self._processor)

    @property
    def config(self):
        return self._model.config

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> "VlmplugLMMS":
        """``--model_args`` parsed with vlmplug's rules (Python literals, brackets kept together); lmms-eval's
        ``batch_size`` / ``device`` fill in keys the arguments do not set."""
        args = parse_model_args(arg_string)
        for k, v in (additional_config or {}).items():
            if v is not None and k not in args:
                args[k] = v
        return cls(**args)

    # -------------------------------------------------------------------------------- requests

    def _warn_once(self, key: str, message: str) -> None:
        """A Python warning and a line in lmms-eval's log (lmms_eval.utils silences Python warnings globally)."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)
            try:
                from loguru import logger

                logger.warning(message)
            except ImportError:  # pragma: no cover - loguru comes with lmms-eval
                pass

    def _doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual, task, split, doc_id) -> list:
        if doc_to_visual is None:
            return []
        visuals = _flatten(doc_to_visual(self._doc(task, split, doc_id)))
        for v in visuals:
            if isinstance(v, dict):
                raise NotImplementedError(f"task {task!r} gives {sorted(v)[:4]} inputs (audio?); the vlmplug model "
                                          "answers about images only")
            if isinstance(v, (str, os.PathLike)) and str(v).lower().endswith(_VIDEO_SUFFIXES):
                raise NotImplementedError(f"task {task!r} gives a video ({v}); the vlmplug model answers about "
                                          "images only")
        return visuals

    def _context(self, context: str) -> str:
        """The task's text without image placeholders: vlmplug's prompt builder places one slot per image."""
        tags = {"<image>", str(getattr(self._processor, "image_token", "<image>") or "<image>")}
        if any(t in context for t in tags):
            for t in tags:
                context = context.replace(t, "")
            context = context.strip()
        return context

    def _generation(self, gen_kwargs: Optional[dict]) -> tuple[int, list[str]]:
        """(max_new_tokens, stop strings) from a task's generation_kwargs; sampling settings are refused politely:
        vlmplug answers greedily, like ``vlmplug eval``."""
        gk = dict(gen_kwargs or {})
        until = gk.get("until") or []
        if isinstance(until, str):
            until = [until]
        elif not isinstance(until, (list, tuple)):
            raise ValueError(f"generation_kwargs['until'] must be a string or a list of strings, got {until!r}")
        n = gk.get("max_new_tokens", gk.get("max_gen_toks"))
        n = self.max_new_tokens if n is None else int(n)
        sampling = float(gk.get("temperature") or 0) > 0 or bool(gk.get("do_sample", False))
        if sampling:
            self._warn_once("sampling", f"generation_kwargs ask for sampling (temperature={gk.get('temperature')!r}, "
                                        f"do_sample={gk.get('do_sample')!r}); the vlmplug model decodes greedily, "
                                        "as vlmplug eval does, and ignores them")
        if int(gk.get("num_beams") or 1) > 1:
            self._warn_once("beams", f"generation_kwargs ask for num_beams={gk['num_beams']}; the vlmplug model "
                                     "decodes greedily (one beam) and ignores it")
        extra = sorted(set(gk) - set(_KNOWN_GEN_KEYS))
        if extra:
            self._warn_once("extra:" + ",".join(extra), f"generation_kwargs {extra} are ignored by the vlmplug model")
        return n, [str(u) for u in until]

    def _record(self, task, doc_id, info: dict) -> None:
        kept = None
        for s in self.specs:
            per = ((info.get("stats") or {}).get(s.name) or {}).get("tokens_kept_per_image")
            if per:
                kept = sum(per[0])
        self.records.append({"task": task, "doc_id": doc_id, "seconds": info.get("seconds"),
                             "prompt_tokens": info.get("prompt_tokens"), "image_tokens": info.get("image_tokens"),
                             "image_tokens_kept": kept})

    def generate_until(self, requests: List[Instance]) -> List[str]:
        """Greedy answers, in request order, each cut at the first of the task's ``until`` strings."""
        from tqdm.auto import tqdm

        from ..pipeline import generate_info

        out: list[str] = []
        for req in tqdm(requests, desc=f"vlmplug ({self.method_label})", disable=self.rank != 0 or not requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args[:6]
            images = self._visuals(doc_to_visual, task, split, doc_id)
            max_new, until = self._generation(gen_kwargs)
            info = generate_info(self._model, self._processor, images, self._context(context), methods=self.methods,
                                 max_new_tokens=max_new)
            text = _truncate(info["text"], until)
            self._record(task, doc_id, info)
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out

    def loglikelihood(self, requests: List[Instance]) -> List[Tuple[float, bool]]:
        """(sum of the continuation's token log-probabilities, whether greedy decoding would produce it), the
        continuation forced through generation under the methods, so that it is scored by the same forwards
        (pruned prompt, guidance passes) an answer would be."""
        from tqdm.auto import tqdm

        out = []
        for req in tqdm(requests, desc=f"vlmplug ({self.method_label}) loglikelihood",
                        disable=self.rank != 0 or not requests):
            args = req.args
            if len(args) == 2:  # unconditional scoring ("", choice): no images
                context, continuation, images = args[0], args[1], []
            else:
                context, target, doc_to_visual, doc_id, task, split = args[:6]
                continuation = target if isinstance(target, str) else target(self._doc(task, split, doc_id))
                images = self._visuals(doc_to_visual, task, split, doc_id)
            out.append(self._score(images, self._context(context), str(continuation)))
            self.cache_hook.add_partial("loglikelihood", (args[0], args[1] if len(args) > 1 else None), out[-1])
        return out

    def _score(self, images: list, prompt: str, continuation: str) -> Tuple[float, bool]:
        from .likelihood import continuation_ids, score_continuation

        ids = continuation_ids(self._processor, prompt, len(images), continuation)
        logp, greedy, _ = score_continuation(self._model, self._processor, images, prompt, ids, methods=self.methods)
        return sum(logp), greedy

    def generate_until_multi_round(self, requests) -> List[str]:
        raise NotImplementedError("the vlmplug lmms-eval model answers single-turn requests (generate_until, "
                                  "loglikelihood); multi-round tasks are not supported")

