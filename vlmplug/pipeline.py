"""Chat template + processor + ``model.generate`` for one or several images, optionally under vlmplug methods.

Used by the CLI (``vlmplug run``), the demo and the eval scripts, so that every entry point builds prompts the same
way: the processor's chat template when it has one, LLaVA-1.5's ``USER: <image>\\n... ASSISTANT:`` otherwise.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence, Union

ImageLike = Union["PIL.Image.Image", str, Path]  # noqa: F821 - PIL is imported lazily

DEFAULT_MAX_NEW_TOKENS = 16


def _load_images(image_or_images: Any) -> list:
    from PIL import Image

    if image_or_images is None:
        return []
    items = list(image_or_images) if isinstance(image_or_images, (list, tuple)) else [image_or_images]
    out = []
    for item in items:
        if isinstance(item, (str, Path)):
            from PIL import UnidentifiedImageError

            from vlmplug.errors import InputError

            try:
                with Image.open(item) as im:
                    item = im.convert("RGB")
            except FileNotFoundError:
                raise InputError(f"image file {str(item)!r} does not exist") from None
            except (UnidentifiedImageError, IsADirectoryError, OSError) as e:
                raise InputError(f"{str(item)!r} is not an image PIL can read ({type(e).__name__}: {e})") from None
        elif isinstance(item, Image.Image):
            if item.mode != "RGB":
                item = item.convert("RGB")
        else:
            from vlmplug.errors import InputError

            raise InputError(f"an image is a PIL image or a file path; got {type(item).__name__}")
        out.append(item)
    return out


def _image_placeholders(processor: Any) -> list[str]:
    """The strings a processor expands into image tokens (LLaVA's "<image>", Qwen's "<|image_pad|>", ...)."""
    found = set()
    for obj in (processor, getattr(processor, "tokenizer", None)):
        for name, value in (vars(obj).items() if hasattr(obj, "__dict__") else ()):
            if (name.endswith("_token") and isinstance(value, str) and value
                    and ("image" in name or "video" in name or "image" in value.lower())):
                found.add(value)
    return sorted(found)


def build_prompt(processor: Any, prompt: str, n_images: int) -> str:
    """The text fed to the processor: the chat template with ``n_images`` image slots and the question."""
    for placeholder in _image_placeholders(processor):
        if placeholder in prompt:
            from vlmplug.errors import InputError

            raise InputError(f"the prompt holds the image placeholder {placeholder!r}; vlmplug puts one in for each "
                             "image it is given: remove it from the text and pass the images (a list for several)")
    template = getattr(processor, "chat_template", None) or getattr(getattr(processor, "tokenizer", None), "chat_template", None)
    if template:
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image_token = getattr(processor, "image_token", "<image>")
    return "USER: " + f"{image_token}\n" * n_images + prompt + " ASSISTANT:"


def prepare_inputs(model: Any, processor: Any, image_or_images: Any, prompt: str) -> dict:
    """Processor outputs for the prompt and images, on the model's device, floating tensors in the model's dtype."""
    import torch

    images = _load_images(image_or_images)
    text = build_prompt(processor, prompt, len(images))
    kwargs: dict[str, Any] = dict(text=text, return_tensors="pt")
    if images:
        # one list for the one prompt, as prepare_batch passes one per sample: a flat list is a batch of single-image
        # samples to LlavaOnevisionProcessor (anyres for each image, batch_num_images one per image), a nested one is
        # one multi-image sample (base grids); every other processor reads both the same
        kwargs["images"] = [images]
    inputs = processor(**kwargs)
    device = getattr(model, "device", None)
    dtype = getattr(model, "dtype", None)
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            if v.is_floating_point() and dtype is not None:
                v = v.to(device=device, dtype=dtype)
            elif device is not None:
                v = v.to(device)
        out[k] = v
    return out


def prepare_batch(model: Any, processor: Any, images_per_sample: Sequence[Sequence[Any]], prompts: Sequence[str]) -> dict:
    """Processor outputs for a batch of prompts (one list of images each), padded, on the model's device: a batch
    of one is exactly `prepare_inputs`."""
    import torch

    if len(images_per_sample) != len(prompts):
        raise ValueError(f"{len(images_per_sample)} image lists for {len(prompts)} prompts")
    if len(prompts) == 1:
        return prepare_inputs(model, processor, list(images_per_sample[0]), prompts[0])
    loaded = [_load_images(list(ims)) for ims in images_per_sample]
    texts = [build_prompt(processor, p, len(ims)) for p, ims in zip(prompts, loaded)]
    kwargs: dict[str, Any] = dict(text=texts, return_tensors="pt", padding=True)
    if any(loaded):  # one list per sample: processors that batch flat lists flatten it, Idefics3's needs it nested
        kwargs["images"] = loaded
    inputs = processor(**kwargs)
    device, dtype = getattr(model, "device", None), getattr(model, "dtype", None)
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device=device, dtype=dtype) if v.is_floating_point() and dtype is not None else v.to(device)
        out[k] = v
    return out


def _run_generate(model: Any, inputs: dict, generate_kwargs: dict):
    import torch

    kw = dict(max_new_tokens=DEFAULT_MAX_NEW_TOKENS, do_sample=False)
    if not generate_kwargs.get("do_sample", False):
        # Greedy: make sure sampling-only settings from a generation_config do not trigger warnings.
        kw.update(temperature=None, top_p=None, top_k=None)
    kw.update(generate_kwargs)
    with torch.inference_mode():
        return model.generate(**inputs, **kw)


def generate_info(
    model: Any,
    processor: Any,
    image_or_images: Any,
    prompt: str,
    methods: Any = None,
    method_params: dict | None = None,
    second: dict | None = None,
    passes: dict | None = None,
    **generate_kwargs: Any,
) -> dict:
    """Answer ``prompt`` about the image(s); returns ``dict(text, seconds, prompt_tokens, image_tokens, new_tokens)``
    (``image_tokens``: the image placeholders in the prompt, before any method drops some).

    ``image_or_images``: a PIL image, a path, a list of them, or None. ``methods`` (optional) is anything
    ``vlmplug.apply`` accepts (a name, a config, a list); ``method_params`` are keyword parameters for a method given
    by name. Generation is greedy with a small ``max_new_tokens`` unless ``generate_kwargs`` say otherwise.
    ``seconds`` is the generation's wall time (with ViCrop / CARVE, their map and refinement passes included).
    With methods, ``stats`` holds the handle's statistics after generation (tokens kept, KV bytes, ...) and
    ``results`` each method's typed result (``AttentionMaps`` for record).

    ``second``: a second pass beside the main one, mixed into its logits at every step (classifier-free guidance,
    contrastive decoding): ``dict(prompt=..., image=None or images, mix=callable or None (CFG, gamma 1),
    label="second")``. ``passes`` limits methods to passes, as in ``vlmplug.apply`` (e.g. ``{"fastv": ["second"]}``).
    """
    _check_generate_kwargs(methods, generate_kwargs)
    images = _load_images(image_or_images)
    methods, refine = _split_pipeline(methods, method_params)
    refined = None
    refine_seconds = 0.0
    if refine is not None:  # ViCrop / CARVE: map, crop or mask, then answer with [original, refined]
        t0 = time.perf_counter()
        refined = refine[1](model, processor, images, prompt, refine[0])
        refine_seconds = time.perf_counter() - t0
        images = refined["images"]
        if methods is None:
            method_params = None
    inputs = prepare_inputs(model, processor, images, prompt)
    prompt_len = int(inputs["input_ids"].shape[1])
    image_tokens = _count_image_tokens(model, inputs)
    if second is not None:
        from vlmplug.guidance import PassMix
        from transformers import LogitsProcessorList

        extra = set(second) - {"prompt", "image", "mix", "label"}
        if extra or "prompt" not in second:
            from vlmplug.errors import MethodConfigError

            raise MethodConfigError(f"second takes prompt (required), image, mix, label; got {sorted(second)}")
        mixer = PassMix(model, prepare_inputs(model, processor, _load_images(second.get("image")), second["prompt"]),
                        mix=second.get("mix"), label=second.get("label", "second"))
        generate_kwargs = dict(generate_kwargs)
        # the mixed pass is part of the model's scores: before any processor the caller gave
        generate_kwargs["logits_processor"] = LogitsProcessorList([mixer, *generate_kwargs.get("logits_processor", [])])
    results = None
    if methods is not None:
        from vlmplug.api import apply  # lazy: the pipeline works without any method machinery

        with apply(model, methods, processor=processor, passes=passes, **(method_params or {})) as handle:
            handle.set_image_sizes([[im.size for im in images]])  # token boxes in the user's pixels
            extra = handle.guidance(inputs)  # the methods' own second passes (PAI's text-only CFG branch)
            if len(extra):
                from transformers import LogitsProcessorList

                generate_kwargs = dict(generate_kwargs)
                generate_kwargs["logits_processor"] = LogitsProcessorList(  # the methods' scores first, as above
                    [*extra, *generate_kwargs.get("logits_processor", [])])
            start = time.perf_counter()  # generation only: patching is a one-off cost
            out = _run_generate(model, inputs, generate_kwargs)
            seconds = time.perf_counter() - start
            stats = handle.stats
            results = {m.name: m.result() for m in handle.methods}
    else:
        stats = None
        start = time.perf_counter()
        out = _run_generate(model, inputs, generate_kwargs)
        seconds = time.perf_counter() - start
    sequences = out.sequences if hasattr(out, "sequences") else out
    new = sequences[0, prompt_len:]
    tok = getattr(processor, "tokenizer", processor)
    eos = getattr(tok, "eos_token_id", None)
    pad = getattr(tok, "pad_token_id", None)
    n_new = 0
    for t in new.tolist():
        if t in (eos, pad) and t is not None:
            break
        n_new += 1
    text = tok.decode(new, skip_special_tokens=True).strip()
    if refined is not None:  # the refinement's passes count in the answer's time (and on their own)
        results = dict(results or {})
        results[refine[0].name] = {**{k: v for k, v in refined.items() if k != "images"}, "seconds": refine_seconds}
        seconds += refine_seconds
    return dict(text=text, seconds=seconds, prompt_tokens=prompt_len, image_tokens=image_tokens, new_tokens=n_new,
                stats=stats, results=results)


def _count_image_tokens(model: Any, inputs: dict) -> int | None:
    """Image placeholder tokens in the (first) prompt: what the LLM would see without any method."""
    cfg = getattr(model, "config", None)
    tid = getattr(cfg, "image_token_id", None)
    if tid is None:
        tid = getattr(cfg, "image_token_index", None)
    if tid is None:
        return None
    return int((inputs["input_ids"][0] == int(tid)).sum())


def pipeline_methods() -> dict:
    """Methods that run around generation rather than inside attention: name -> (config class, runner)."""
    from vlmplug.grounding import carve, vicrop

    return {"vicrop": (vicrop.ViCrop, vicrop.run), "carve": (carve.CARVE, carve.run)}


def _check_generate_kwargs(methods: Any, generate_kwargs: dict) -> None:
    """A method's parameter given as a generate() keyword (``generate(..., methods="fastv", keep_ratio=0.5)``) would
    reach transformers as an unknown model kwarg: say where it goes instead."""
    if methods is None or not generate_kwargs:
        return
    import dataclasses

    from vlmplug.registry import method_registry

    from transformers import GenerationConfig

    generation = vars(GenerationConfig())  # generate()'s own settings stay generate()'s (CARVE's max_new_tokens too)
    classes = {**method_registry(), **{n: c for n, (c, _) in pipeline_methods().items()}}
    names = [m for m in (methods if isinstance(methods, (list, tuple)) else [methods]) if isinstance(m, str)]
    for name in names:
        cls = classes.get(name)
        if cls is None or not dataclasses.is_dataclass(cls):
            continue
        misplaced = sorted((set(generate_kwargs) - set(generation)) & {f.name for f in dataclasses.fields(cls)})
        if misplaced:
            from vlmplug.errors import MethodConfigError

            given = ", ".join(f"{k!r}: {generate_kwargs[k]!r}" for k in misplaced)
            raise MethodConfigError(f"{', '.join(misplaced)} {'is a parameter' if len(misplaced) == 1 else 'are parameters'}"
                                    f" of {name}, not of generate(): pass method_params={{{given}}}")


def _split_pipeline(methods: Any, params: dict | None):
    """(the attention methods for apply(), (config, runner) of the one pipeline method or None)."""
    if methods is None:
        return None, None
    pipes = pipeline_methods()
    by_class = {cls: (name, run) for name, (cls, run) in pipes.items()}
    items = list(methods) if isinstance(methods, (list, tuple)) else [methods]
    rest, found = [], []
    for it in items:
        if isinstance(it, str) and it in pipes:
            found.append((it, None))
        elif type(it) in by_class:
            found.append((by_class[type(it)][0], it))
        else:
            rest.append(it)
    if not found:
        return methods, None
    if len(found) > 1:
        from vlmplug.errors import MethodConfigError

        raise MethodConfigError(f"one refinement pipeline at a time; got {[n for n, _ in found]}")
    name, cfg = found[0]
    if cfg is None:
        from vlmplug.errors import MethodConfigError

        cls = pipes[name][0]
        if params and rest:
            raise MethodConfigError("keyword parameters go with a single method name; pass configured objects to compose")
        try:
            cfg = cls(**(params or {}))
        except TypeError as e:
            raise MethodConfigError(f"{name}: {e}") from None
    return (rest or None), (cfg, pipes[name][1])


def generate(
    model: Any,
    processor: Any,
    image_or_images: Any,
    prompt: str,
    methods: Any = None,
    method_params: dict | None = None,
    second: dict | None = None,
    passes: dict | None = None,
    **generate_kwargs: Any,
) -> str:
    """Answer ``prompt`` about one or several images with greedy decoding; see :func:`generate_info`."""
    return generate_info(model, processor, image_or_images, prompt, methods, method_params, second, passes,
                         **generate_kwargs)["text"]


def normalize_answer(text: str) -> str:
    """Lower-case first word without punctuation, for exact-match scoring of one-word answers."""
    words = text.strip().lower().replace(".", " ").replace(",", " ").replace("!", " ").split()
    return words[0] if words else ""


__all__: Sequence[str] = ["generate", "generate_info", "build_prompt", "prepare_inputs", "prepare_batch", "normalize_answer"]
