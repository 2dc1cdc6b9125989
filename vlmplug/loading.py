"""`vlmplug.load`: the embedded world model by name, or any supported checkpoint by id or path."""
from __future__ import annotations

import contextlib
from typing import Any


def load(name_or_path: str = "world", device: Any = "cpu", dtype: Any = None, **kwargs):
    """Return `(model, processor)`.

    "world" is the tiny LLaVA the project trains and ships (offline). Anything else goes to
    `AutoModelForImageTextToText.from_pretrained` / `AutoProcessor.from_pretrained` (a hub id you have
    cached, or a local folder); extra kwargs (e.g. `quantization_config`) are passed to the model.
    Without torchvision, a processor that owns a video processor (Qwen2-VL, LLaVA-OneVision, InternVL, ...: every
    video processor of transformers 5 needs it) is loaded image-only, see `load_processor`.
    """
    import torch

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if name_or_path == "world":
        from .world import load_world

        return load_world(device=device, dtype=dtype)
    from transformers import AutoModelForImageTextToText

    from .compat import load_kwargs

    model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype or "auto", **load_kwargs(**kwargs))
    if "device_map" not in kwargs and "quantization_config" not in kwargs:
        model.to(device)
    processor = load_processor(name_or_path)
    return model.eval(), processor


def load_processor(name_or_path: str, **kwargs):
    """`AutoProcessor.from_pretrained`; when that fails because torchvision is missing and the processor class takes a
    video processor, the same class built from the same files with a `VideoProcessorUnavailable` in the video
    processor's place (images and text work as usual; videos raise ImportError). A warning says so."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(name_or_path, **kwargs)
    except (ImportError, AttributeError):
        # transformers 5 without torchvision: AutoVideoProcessor raises ImportError ("... requires the Torchvision
        # library"); building the processor raises AttributeError ('VIDEO_PROCESSOR_MAPPING' has no attribute
        # '_extra_content') when it looks the base class of video processors up.
        from transformers.utils import is_torchvision_available

        if is_torchvision_available():
            raise
        cls = _processor_class(name_or_path, **kwargs)
        if cls is None or "video_processor" not in cls.get_attributes():
            raise
        processor = _image_only_processor(cls, name_or_path, **kwargs)
    import warnings

    warnings.warn(f"{cls.__name__} loaded without its video processor (torchvision is not installed): images and "
                  "text work, videos do not", stacklevel=2)
    return processor


class VideoProcessorUnavailable(dict):
    """In a processor's `video_processor` place when the real one cannot be built (transformers 5's video processors
    need torchvision). It is the saved settings of the video processor (a dict: the processor's repr and
    `save_pretrained` write them back as they were), read as attributes too (SmolVLMProcessor's chat template reads
    `num_frames` and `fps`); a video setting it lacks reads None (a video processor's default); processing a video
    raises ImportError."""

    model_input_names: list = []
    _auto_class = None

    def __getattr__(self, key: str):
        if key.startswith("__"):
            raise AttributeError(key)
        if key in self:
            return self[key]
        from transformers.processing_utils import VideosKwargs

        if key in VideosKwargs.__annotations__:
            return None
        raise AttributeError(key)

    def __bool__(self) -> bool:
        return True

    def __call__(self, *args, **kwargs):
        name = self.get("video_processor_type", "the video processor")
        raise ImportError(f"{name} needs torchvision (pip install torchvision); this processor was loaded without it")

    def __repr__(self) -> str:
        return f"VideoProcessorUnavailable({dict.__repr__(self)})"


def _processor_class(name_or_path: str, **kwargs):
    """The processor class a checkpoint names (processor_config.json, preprocessor_config.json, tokenizer_config.json),
    else the one transformers maps its config to; None when neither says."""
    import json

    import transformers
    from transformers.utils import cached_file

    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = cached_file(name_or_path, name, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False, **kwargs)
        if path:
            with open(path, encoding="utf-8") as f:
                cls_name = json.load(f).get("processor_class")
            if cls_name and hasattr(transformers, cls_name):
                return getattr(transformers, cls_name)
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    config = AutoConfig.from_pretrained(name_or_path, **kwargs)
    return PROCESSOR_MAPPING.get(type(config))


def _image_only_processor(cls, name_or_path: str, **kwargs):
    """`cls.from_pretrained` without the video processor: its tokenizer, its image processor (AutoImageProcessor, which
    falls back to the PIL backend without torchvision), a `VideoProcessorUnavailable` with the saved video settings,
    the rest of processor_config.json."""
    from transformers import AutoImageProcessor, AutoTokenizer

    processor_dict, init_kwargs = cls.get_processor_dict(name_or_path, **kwargs)
    video_settings = processor_dict.get("video_processor")
    load_tokenizer = getattr(cls, "_load_tokenizer_from_pretrained", None)
    args = []
    for attribute in cls.get_attributes():
        if attribute == "tokenizer":
            args.append(load_tokenizer(attribute, name_or_path, **kwargs) if load_tokenizer is not None
                        else AutoTokenizer.from_pretrained(name_or_path, **kwargs))
        elif attribute == "image_processor":
            args.append(AutoImageProcessor.from_pretrained(name_or_path, **kwargs))
        elif attribute == "video_processor":
            args.append(VideoProcessorUnavailable(video_settings if isinstance(video_settings, dict) else {}))
        else:  # an audio feature extractor etc.: not something an image-text processor has
            raise ValueError(f"{cls.__name__} has a {attribute}: cannot load it without its video processor")
    with without_video_processor():
        return cls.from_args_and_dict(args, processor_dict, **init_kwargs)


@contextlib.contextmanager
def without_video_processor():
    """While active, transformers' processors accept a `VideoProcessorUnavailable` (or None) as their video processor
    (their type check looks up the base class of video processors, which transformers 5 does not export without
    torchvision)."""
    from transformers.processing_utils import ProcessorMixin

    original = ProcessorMixin.__dict__["check_argument_for_proper_class"]

    def check(self, argument_name, argument):
        if argument_name == "video_processor" and (argument is None or isinstance(argument, VideoProcessorUnavailable)):
            return VideoProcessorUnavailable
        return original(self, argument_name, argument)

    ProcessorMixin.check_argument_for_proper_class = check
    try:
        yield
    finally:
        ProcessorMixin.check_argument_for_proper_class = original
