"""Real Hugging Face processors for the tiny models of :mod:`vlmplug.testing.tiny`, built offline.

For each family in :data:`~vlmplug.testing.tiny.FAMILIES`: a small ``PreTrainedTokenizerFast`` (a ``tokenizers``
WordLevel model over a 128-token vocabulary whose special tokens sit at the tiny configs' ids: image token,
vision start / end, ``<start_of_image>``, ``<fake_token_around_image>``, ``<row_r_col_c>``, ...), the family's
chat template (the real one's structure, shortened), the family's PIL image processor with sizes that make the
tiny vision tower's token counts, and the family's real processor class (``LlavaProcessor``,
``Qwen2VLProcessor``, ...).

:func:`save_tiny_checkpoint` writes model + processor with ``save_pretrained`` into a folder that
``vlmplug.load(folder)`` (``AutoModelForImageTextToText`` / ``AutoProcessor``) reads back: the path a user with a
real checkpoint takes.

Without torchvision (transformers 5 makes every video processor torchvision-only) the processors that own a video
processor (Qwen2-VL / 2.5-VL / 3-VL, LLaVA-OneVision, SmolVLM, InternVL) cannot be built the usual way:
:func:`build_processor` then builds them image-only, a :class:`vlmplug.loading.VideoProcessorUnavailable` (the video
settings a checkpoint saves) in the video processor's place, and ``save_pretrained`` writes the same files as for a
full processor. ``AutoProcessor.from_pretrained`` cannot read those folders back without torchvision;
``vlmplug.load`` can (:func:`vlmplug.loading.load_processor`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .tiny import FAMILIES, IDS, MAX_TILE_SIDE, VOCAB

__all__ = [
    "CHAT_TEMPLATES",
    "VIDEO_FAMILIES",
    "build_image_processor",
    "build_processor",
    "build_tokenizer",
    "processor_class",
    "save_tiny_checkpoint",
    "vocabulary",
]

# Families whose processor class takes a video processor (torchvision-only in transformers 5).
VIDEO_FAMILIES = ("llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "smolvlm", "internvl")

_QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

# Words of the chat templates and of the test prompts (ids 4.. in this order, lower-cased by the tokenizer).
_WORDS = (
    "user", "assistant", "system", "model", ":", "?", ".", ",", "!", "[", "]", "/", "inst",
    "you", "are", "a", "helpful", "what", "is", "in", "the", "this", "image", "picture", "describe", "color",
    "colour", "of", "and", "how", "many", "shapes", "there", "red", "green", "blue", "yes", "no", "one", "two",
    "compare", "images", "which", "left", "right", "first", "second",
)

# Chat templates: the structure of each family's released template (roles, turn markers, where the image slot
# goes), shortened. Every template puts the images before the text of a user turn.
_IMAGES_THEN_TEXT = (
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}IMG{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
)


def _template(user_open: str, image: str, user_close: str, assistant_open: str, gen: str, prefix: str = "") -> str:
    body = _IMAGES_THEN_TEXT.replace("IMG", image)
    return (
        prefix
        + "{% for message in messages %}"
        + "{% if message['role'] == 'user' %}" + user_open + body + user_close
        + "{% elif message['role'] == 'assistant' %}" + assistant_open
        + "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        + "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
        + "{% endfor %}{% endif %}{{ eos_token }}"
        + "{% endif %}{% endfor %}"
        + "{% if add_generation_prompt %}" + gen + "{% endif %}"
    )


_CHATML_USER = "<|im_start|>user\n"
_CHATML_CLOSE = "<|im_end|>\n"
CHAT_TEMPLATES: dict[str, str] = {
    # llava-hf/llava-1.5: "USER: <image>\n... ASSISTANT:"
    "llava": _template("USER: ", "<image>\n", " ", "ASSISTANT: ", "ASSISTANT:", prefix="{{ bos_token }}"),
    # llava-hf/llava-v1.6-mistral: "[INST] <image>\n... [/INST]"
    "llava_next": _template("[INST] ", "<image>\n", " [/INST]", " ", "", prefix="{{ bos_token }}"),
    # llava-hf/llava-onevision-qwen2: ChatML, "<image>\n" slots
    "llava_onevision": _template(_CHATML_USER, "<image>\n", _CHATML_CLOSE, "<|im_start|>assistant\n",
                                 "<|im_start|>assistant\n"),
    # Qwen2-VL / 2.5-VL / 3-VL: ChatML with "<|vision_start|><|image_pad|><|vision_end|>" slots
    **{f: _template(_CHATML_USER, "<|vision_start|><|image_pad|><|vision_end|>", _CHATML_CLOSE,
                    "<|im_start|>assistant\n", "<|im_start|>assistant\n",
                    prefix="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n") for f in _QWEN},
    # HuggingFaceM4/Idefics3 and SmolVLM: "User:<image>...<end_of_utterance>\nAssistant:"
    **{f: _template("User:", "<image>", "<end_of_utterance>\n", "Assistant: ", "Assistant:",
                    prefix="<|im_start|>") for f in ("idefics3", "smolvlm")},
    # google/gemma-3: "<start_of_turn>user\n<start_of_image>...<end_of_turn>\n<start_of_turn>model\n"
    "gemma3": _template("<start_of_turn>user\n", "<start_of_image>", "<end_of_turn>\n", "<start_of_turn>model\n",
                        "<start_of_turn>model\n", prefix="{{ bos_token }}"),
    # OpenGVLab/InternVL3-hf: ChatML with "<IMG_CONTEXT>\n" slots (the processor wraps them in <img>...</img>)
    "internvl": _template(_CHATML_USER, "<IMG_CONTEXT>\n", _CHATML_CLOSE, "<|im_start|>assistant\n",
                          "<|im_start|>assistant\n"),
}


def _special_tokens(family: str) -> dict[int, str]:
    """Special tokens by id: the ids of :data:`vlmplug.testing.tiny.IDS` with the family's token strings."""
    image = {"gemma3": "<image_soft_token>", "internvl": "<IMG_CONTEXT>"}.get(family, "<image>")
    if family in _QWEN:
        image = "<|image_pad|>"
    video = "<|video_pad|>" if family in _QWEN else "<video>"
    out = {
        0: "<unk>", IDS["pad"]: "<pad>", IDS["bos"]: "<s>", IDS["eos"]: "</s>",
        IDS["vision_start"]: "<|vision_start|>", IDS["vision_end"]: "<|vision_end|>",
        92: "<|im_start|>", 93: "<|im_end|>", 94: "<end_of_utterance>", 95: "<start_of_turn>", 96: "<end_of_turn>",
        IDS["boi"]: "<start_of_image>", IDS["eoi"]: "<end_of_image>",
        IDS["image"]: image, IDS["video"]: video, IDS["img_start"]: "<img>", IDS["img_end"]: "</img>",
        IDS["double_newline"]: "\n\n", IDS["newline"]: "\n",
        IDS["fake_image"]: "<fake_token_around_image>", IDS["global_image"]: "<global-img>",
    }
    for r in range(MAX_TILE_SIDE):
        for c in range(MAX_TILE_SIDE):
            out[IDS["row_col_base"] + MAX_TILE_SIDE * r + c] = f"<row_{r + 1}_col_{c + 1}>"
    return out


def vocabulary(family: str) -> list[str]:
    """The token strings by id (``VOCAB`` of them): special tokens at their tiny-config ids, words elsewhere."""
    special = _special_tokens(family)
    words = list(dict.fromkeys(_WORDS))
    free = [i for i in range(VOCAB) if i not in special]
    words += [f"w{i}" for i in range(len(free) - len(words))]
    vocab = dict(special)
    vocab.update(zip(free, words))
    return [vocab[i] for i in range(VOCAB)]


def _extra_special(family: str) -> dict[str, str]:
    """The tokenizer's named multimodal tokens (``tokenizer.image_token`` etc.), as the released tokenizers have."""
    sp = _special_tokens(family)
    if family == "gemma3":
        return {"image_token": sp[IDS["image"]], "boi_token": sp[IDS["boi"]], "eoi_token": sp[IDS["eoi"]]}
    if family == "internvl":
        return {"context_image_token": sp[IDS["image"]], "start_image_token": "<img>", "end_image_token": "</img>",
                "video_token": "<video>"}
    if family in _QWEN:
        return {"image_token": sp[IDS["image"]], "video_token": sp[IDS["video"]],
                "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
    if family in ("idefics3", "smolvlm"):
        return {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"}
    if family == "llava_onevision":
        return {"image_token": "<image>", "video_token": "<video>"}
    return {"image_token": "<image>"}


def build_tokenizer(family: str):
    """A ``PreTrainedTokenizerFast`` over :func:`vocabulary` (WordLevel, lower-cased, split on spaces/punctuation;
    special tokens matched first), left padding, the family's chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    _check_family(family)
    words = vocabulary(family)
    special = _special_tokens(family)
    tok = Tokenizer(WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens([AddedToken(special[i], special=True, normalized=False) for i in sorted(special)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=_extra_special(family),
        padding_side="left",
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATES[family]
    assert len(fast) == VOCAB, (family, len(fast))
    return fast


def build_image_processor(family: str):
    """The family's PIL image processor with sizes matching the tiny vision tower."""
    import transformers as tf

    from .tiny import _ANY_IMG, _PINPOINTS, tiny_config

    _check_family(family)
    cfg = tiny_config(family)
    vc = cfg.vision_config
    if family == "llava":
        s = vc.image_size
        return tf.LlavaImageProcessorPil(size={"height": s, "width": s}, crop_size={"height": s, "width": s},
                                         do_center_crop=False, do_pad=False)
    if family == "llava_next":
        return tf.LlavaNextImageProcessorPil(size={"shortest_edge": _ANY_IMG},
                                             crop_size={"height": _ANY_IMG, "width": _ANY_IMG},
                                             image_grid_pinpoints=[list(p) for p in _PINPOINTS])
    if family == "llava_onevision":
        return tf.LlavaOnevisionImageProcessorPil(size={"height": _ANY_IMG, "width": _ANY_IMG},
                                                  image_grid_pinpoints=[list(p) for p in _PINPOINTS])
    if family in _QWEN:
        p, m, t = vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size
        unit = p * m
        # at most 8x8 patches (16 image tokens) per image, at least one merged cell
        return tf.Qwen2VLImageProcessorPil(patch_size=p, merge_size=m, temporal_patch_size=t,
                                           size={"shortest_edge": unit * unit, "longest_edge": 16 * unit * unit})
    if family in ("idefics3", "smolvlm"):
        cls = tf.Idefics3ImageProcessorPil if family == "idefics3" else tf.SmolVLMImageProcessorPil
        tile = vc.image_size
        # images resized to a longest edge of at most 2 tiles, split into tiles of the vision tower's size
        return cls(size={"longest_edge": 2 * tile}, max_image_size={"longest_edge": tile}, do_image_splitting=True)
    if family == "gemma3":
        s = vc.image_size
        return tf.Gemma3ImageProcessorPil(size={"height": s, "width": s}, do_pan_and_scan=False)
    if family == "internvl":
        s = vc.image_size[0] if isinstance(vc.image_size, (list, tuple)) else vc.image_size
        return tf.GotOcr2ImageProcessorPil(size={"height": s, "width": s}, crop_to_patches=True, min_patches=1,
                                           max_patches=4)
    raise AssertionError(family)


def _processor_kwargs(family: str) -> dict:
    """The processor's own settings (besides its sub-processors) matching the tiny config."""
    from .tiny import tiny_config

    cfg = tiny_config(family)
    vc = cfg.vision_config
    if family in ("llava", "llava_next"):
        return dict(patch_size=vc.patch_size, vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                    num_additional_image_tokens=1)  # CLIP's CLS token, dropped by the "default" strategy
    if family == "llava_onevision":
        return dict(num_image_tokens=(vc.image_size // vc.patch_size) ** 2,
                    vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    if family in ("idefics3", "smolvlm"):
        return dict(image_seq_len=int((vc.image_size // vc.patch_size) ** 2 / cfg.scale_factor**2))
    if family == "gemma3":
        return dict(image_seq_length=cfg.mm_tokens_per_image)
    if family == "internvl":
        return dict(image_seq_length=cfg.image_seq_length)
    return {}


_CLASSES = {
    "llava": "LlavaProcessor",
    "llava_next": "LlavaNextProcessor",
    "llava_onevision": "LlavaOnevisionProcessor",
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "qwen3_vl": "Qwen3VLProcessor",
    "idefics3": "Idefics3Processor",
    "smolvlm": "SmolVLMProcessor",
    "gemma3": "Gemma3Processor",
    "internvl": "InternVLProcessor",
}


def processor_class(family: str):
    import transformers as tf

    _check_family(family)
    return getattr(tf, _CLASSES[family])


def build_processor(family: str):
    """The family's real processor class over :func:`build_tokenizer` and :func:`build_image_processor`.

    Processors that own a video processor get one when torchvision is installed; without it they are built
    image-only, with a :class:`vlmplug.loading.VideoProcessorUnavailable` holding the video settings a checkpoint
    would save (:func:`vlmplug.loading.without_video_processor`).
    """
    cls = processor_class(family)
    kw: dict[str, Any] = dict(image_processor=build_image_processor(family), tokenizer=build_tokenizer(family),
                              chat_template=CHAT_TEMPLATES[family], **_processor_kwargs(family))
    if family not in VIDEO_FAMILIES:
        return cls(**kw)
    from transformers.utils import is_torchvision_available

    settings = _video_processor_entry(family, kw["image_processor"])
    if is_torchvision_available():  # pragma: no cover - not in this project's environment
        import transformers as tf

        video_cls = getattr(tf, settings.pop("video_processor_type"))
        return cls(video_processor=video_cls(**settings), **kw)
    from ..loading import VideoProcessorUnavailable, without_video_processor

    with without_video_processor():
        return cls(video_processor=VideoProcessorUnavailable(settings), **kw)


def save_tiny_checkpoint(family: str, folder: str | os.PathLike, model=None, processor=None) -> Path:
    """Write a tiny checkpoint of ``family`` (model + processor, ``save_pretrained``) into ``folder``; return it.

    ``model`` defaults to :func:`vlmplug.testing.tiny.build_tiny_model`, ``processor`` to :func:`build_processor`.
    An image-only processor (no torchvision) writes the files a full one writes: tokenizer files,
    ``chat_template.jinja`` and ``processor_config.json`` with the image processor's and the video processor's entry.
    """
    from .tiny import build_tiny_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if model is None:
        model = build_tiny_model(family)
    if processor is None:
        processor = build_processor(family)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _video_processor_entry(family: str, image_processor) -> dict:
    """What a torchvision-enabled ``save_pretrained`` writes for the video processor (its type and geometry)."""
    ip = image_processor.to_dict()
    names = {"llava_onevision": "LlavaOnevisionVideoProcessor", "qwen2_vl": "Qwen2VLVideoProcessor",
             "qwen2_5_vl": "Qwen2VLVideoProcessor", "qwen3_vl": "Qwen3VLVideoProcessor",
             "smolvlm": "SmolVLMVideoProcessor", "internvl": "InternVLVideoProcessor"}
    keep = ("patch_size", "merge_size", "temporal_patch_size", "size", "image_mean", "image_std", "do_rescale",
            "rescale_factor", "do_normalize", "do_convert_rgb", "resample")
    out = {k: ip[k] for k in keep if k in ip}
    out["video_processor_type"] = names[family]
    return out


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
