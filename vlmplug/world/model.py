"""The tiny world VLM: a real ``LlavaForConditionalGeneration`` (CLIP vision tower + Llama decoder) and its processor.

Everything here is built offline: the tokenizer is a ``tokenizers`` WordLevel model over a fixed vocabulary, the
image processor is ``CLIPImageProcessorPil`` (no torchvision needed), and the chat template follows LLaVA-1.5
(``USER: <image>\\n... ASSISTANT:``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import scenes

IMAGE_SIZE = 64
PATCH_SIZE = 8
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")

# Words of the questions (lower-cased by the tokenizer), then everything that can be an answer.
QUESTION_WORDS = (
    "user", "assistant", ":", "?", ".", ",", "!", "what", "color", "colour", "is", "the", "there", "a", "an",
    "where", "how", "many", "are", "of", "in", "image", "picture", "this", "any", "does", "it", "have", "which",
    "shape", "shapes", "object", "objects", "and", "answer", "one", "word", "with", "single", "please",
)


def vocabulary() -> list[str]:
    """The fixed token list (ids are positions in this list)."""
    words: list[str] = list(SPECIAL_TOKENS) + list(QUESTION_WORDS)
    words += list(scenes.SHAPES) + [scenes.PLURALS[s] for s in scenes.SHAPES]
    words += list(scenes.COLORS) + ["yes", "no"] + list(scenes.POSITIONS)
    words += [str(i) for i in range(10)]
    seen: set[str] = set()
    out = []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tokenizer():
    """A ``PreTrainedTokenizerFast`` over a WordLevel model of :func:`vocabulary` (lower-cased, split on spaces/punctuation)."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies punctuation
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_image_processor():
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=False,
    )


def build_processor():
    """``LlavaProcessor`` whose ``<image>`` expands to exactly ``NUM_IMAGE_TOKENS`` tokens (CLS dropped, as in LLaVA-1.5)."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=build_image_processor(),
        tokenizer=build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,
    )


DEFAULT_SIZES: dict[str, Any] = dict(
    vision_hidden=128,
    vision_layers=5,
    vision_heads=4,
    vision_mlp=256,
    text_hidden=128,
    text_layers=4,
    text_heads=4,
    text_kv_heads=2,
    text_mlp=384,
    rope_theta=1e6,
    text_head_dim=None,
)


def build_config(**sizes: Any):
    """``LlavaConfig`` for the world model (vision feature layer -2, 'default' strategy, GQA decoder)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    s = {**DEFAULT_SIZES, **sizes}
    vocab = vocabulary()
    vision = CLIPVisionConfig(
        hidden_size=s["vision_hidden"],
        intermediate_size=s["vision_mlp"],
        num_hidden_layers=s["vision_layers"],
        num_attention_heads=s["vision_heads"],
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=s["vision_hidden"],
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    text = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=s["text_hidden"],
        intermediate_size=s["text_mlp"],
        num_hidden_layers=s["text_layers"],
        num_attention_heads=s["text_heads"],
        num_key_value_heads=s["text_kv_heads"],
        head_dim=s["text_head_dim"] or s["text_hidden"] // s["text_heads"],
        max_position_embeddings=512,
        # With 32-dim heads, content lookups from a question to image tokens 10-200 positions back need slow
        # rotary frequencies; a large base (as in Qwen2) leaves about half of each head position-invariant.
        rope_parameters={"rope_type": "default", "rope_theta": float(s["rope_theta"])},
        rms_norm_eps=1e-5,
        # HF's default 0.02 suits hidden sizes in the thousands; a 128-wide model trains far faster at ~1/sqrt(d).
        initializer_range=s["text_hidden"] ** -0.5,
        tie_word_embeddings=False,
        bos_token_id=vocab.index("<s>"),
        eos_token_id=vocab.index("</s>"),
        pad_token_id=vocab.index("<pad>"),
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=vocab.index("<image>"),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=NUM_IMAGE_TOKENS,
        tie_word_embeddings=False,
    )
    cfg.pad_token_id = text.pad_token_id
    return cfg


def build_model(seed: int = 0, **sizes: Any):
    """A freshly initialised world model (fp32)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(**sizes))
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = (
        model.config.text_config.bos_token_id,
        model.config.text_config.eos_token_id,
        model.config.text_config.pad_token_id,
    )
    gc.do_sample = False
    gc.max_new_tokens = 4
    return model


def weights_dir() -> Path:
    return Path(__file__).resolve().parent / "weights"
