"""Command line: `vlmplug run` (the main job), `vlmplug ground`, `vlmplug eval`, `vlmplug methods`, `vlmplug models`."""
from __future__ import annotations

import argparse
import os
import sys


def _param(text: str) -> tuple[str, object]:
    from .errors import MethodConfigError
    from .evaluation.runner import parse_pair

    try:
        return parse_pair(text)
    except MethodConfigError as e:
        raise argparse.ArgumentTypeError(f"--param: {e}") from None


def _default_method() -> str:
    from .api import available_methods

    names = available_methods()
    return "fastv" if "fastv" in names else "record"


def _fail(command: str, error: BaseException) -> int:
    """One line on stderr (no traceback) and exit status 2: the library's message says what to do."""
    text = str(error).strip().splitlines()
    print(f"vlmplug {command}: {text[0] if text else type(error).__name__}", file=sys.stderr)
    return 2


def _load_or_fail(command: str, model_id: str, dtype=None, **kwargs):
    """(model, processor), or None after printing why the checkpoint could not be loaded."""
    from .loading import load

    try:
        return load(model_id, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as e:  # not cached / not a folder / unknown architecture
        offline = " (offline: only checkpoints already in the local cache or on disk load)" if os.environ.get(
            "HF_HUB_OFFLINE") == "1" else ""
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"vlmplug {command}: cannot load {model_id!r}{offline}: {first}", file=sys.stderr)
        return None


def _quantization(args) -> dict:
    """`quantization_config` for --load-in-4bit (NF4) / --load-in-8bit (bitsandbytes), else nothing."""
    if not (getattr(args, "load_in_4bit", False) or getattr(args, "load_in_8bit", False)):
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    if args.load_in_8bit:
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    compute = getattr(torch, args.dtype) if isinstance(args.dtype, str) else torch.float32
    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_compute_dtype=compute)}


def cmd_run(args) -> int:
    import torch

    from . import pipeline
    from .errors import VlmplugError
    from .evaluation.runner import MethodSpec

    # everything that can be checked without a model, before the model loads
    name = args.method or _default_method()
    params = dict(args.param or [])
    try:
        MethodSpec(name, name, params).check()
    except VlmplugError as e:
        return _fail("run", e)
    if args.model != "world" and (not args.image or not args.prompt):
        print("vlmplug run --model needs --image and --prompt", file=sys.stderr)
        return 2
    if args.load_in_4bit or args.load_in_8bit:
        if args.model == "world" or (args.load_in_4bit and args.load_in_8bit):
            print("vlmplug run: --load-in-4bit / --load-in-8bit (one of them) quantize a checkpoint given by --model",
                  file=sys.stderr)
            return 2
        try:
            import bitsandbytes  # noqa: F401 - say it is missing before loading anything
        except ImportError:
            print("vlmplug run: --load-in-4bit / --load-in-8bit need bitsandbytes: pip install 'vlmplug[quant]'",
                  file=sys.stderr)
            return 2
    try:
        user_image = pipeline._load_images(args.image)[0] if args.image else None
    except VlmplugError as e:
        return _fail("run", e)
    torch.manual_seed(0)
    if args.model == "world":
        from .world import sample_scene

        loaded = _load_or_fail("run", "world")
        if loaded is None:
            return 2
        model, processor = loaded
        image, meta = sample_scene()
        image = user_image or image
        prompt = args.prompt or meta["question"]
        expected = None if (args.image or args.prompt) else meta["answer"]
        print(f"model: embedded world model (tiny LLaVA, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params)")
        print(f"image: {args.image or 'bundled sample scene'}  {image.size[0]}x{image.size[1]}")
    else:
        loaded = _load_or_fail("run", args.model, args.dtype, **_quantization(args))
        if loaded is None:
            return 2
        model, processor = loaded
        image, prompt, expected = user_image, args.prompt, None
        print(f"model: {args.model}")
    print(f"prompt: {prompt}")
    gen = dict(max_new_tokens=args.max_new_tokens)
    try:
        pipeline.generate_info(model, processor, image, prompt, **gen)  # warm-up, so timings compare steady states
        plain = pipeline.generate_info(model, processor, image, prompt, **gen)
        patched = pipeline.generate_info(model, processor, image, prompt, methods=name, method_params=params or None,
                                         **gen)
    except VlmplugError as e:  # e.g. a method's default layers beyond this model's depth
        return _fail("run", e)
    shown = _config_repr(name, params)
    rows = [("plain", plain), (shown, patched)]
    w = max(len(r[0]) for r in rows)
    for label, r in rows:
        print(f"{label:<{w}}  answer: {r['text']!r:<16} {r['seconds'] * 1000:8.1f} ms  "
              f"prompt tokens {r['prompt_tokens']}, new tokens {r['new_tokens']}")
    st = (patched.get("stats") or {}).get(name) or {}
    if "tokens_kept_per_image" in st:
        print(f"{name}: image tokens kept per image {st['tokens_kept_per_image'][0]}, "
              f"tokens per layer {st['tokens_per_layer']}, KV cache {st['kv_cache_bytes'] / 1024:.1f} KiB, "
              f"LLM FLOPs saved {100 * st['flops_saved']:.0f}%")
    if expected is not None:
        ok = pipeline.normalize_answer(plain["text"]) == expected
        print(f"expected: {expected!r} -> plain answer {'correct' if ok else 'WRONG'}")
        return 0 if ok else 1
    return 0


def _config_repr(name: str, params: dict) -> str:
    """The method's config as the user would write it (its repr, defaults filled in)."""
    from .pipeline import pipeline_methods
    from .registry import method_registry

    reg = method_registry()
    if name in reg:
        return repr(reg[name].from_params(**params))
    return repr(pipeline_methods()[name][0](**params))


def cmd_ground(args) -> int:
    from PIL import Image

    from .errors import VlmplugError
    from .grounding import METHODS, ground

    if args.method not in METHODS:
        print(f"unknown grounding method {args.method!r}; choose one of {list(METHODS)}", file=sys.stderr)
        return 2
    try:
        image = Image.open(args.image).convert("RGB")
    except (OSError, ValueError) as e:
        print(f"cannot read --image {args.image!r}: {e}", file=sys.stderr)
        return 2
    try:
        import scipy  # noqa: F401 - the box and the prompts need it; say so before loading a model
        if args.overlay:
            import matplotlib  # noqa: F401
    except ImportError as e:
        print(f"vlmplug ground needs the 'ground' extra ({e.name} is missing): pip install 'vlmplug[ground]'",
              file=sys.stderr)
        return 2
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    loaded = _load_or_fail("ground", args.model, args.dtype)
    if loaded is None:
        return 2
    model, processor = loaded
    try:
        g = ground(model, processor, image, args.query, method=args.method, tokens=args.tokens, target=args.target,
                   threshold=args.threshold, layers=layers, top_k=args.top_k, prompt=args.prompt)
    except (VlmplugError, ValueError, RuntimeError) as e:
        print(f"vlmplug ground: {e}", file=sys.stderr)
        return 2
    picture = g.overlay() if args.overlay else Image.fromarray((g.heatmap * 255).round().astype("uint8"), "L")
    picture.save(args.out)
    x, y = g.point
    print(f"{g.method} map of {args.query!r} ({image.size[0]}x{image.size[1]}), query tokens {g.tokens}")
    print(f"point: ({x:.1f}, {y:.1f})  box: {g.box}  prompts: {g.points}")
    print(f"wrote {args.out}")
    return 0


def cmd_eval(args) -> int:
    from pathlib import Path

    from .errors import VlmplugError
    from .evaluation import benchmarks
    from .evaluation.base import BenchmarkFilesError
    from .evaluation.runner import MethodSpec, distributed, run

    table = benchmarks()
    if args.bench not in table:
        print(f"unknown benchmark {args.bench!r}; available: {', '.join(table)}", file=sys.stderr)
        return 2
    make, writer = table[args.bench]
    bench = make(args.seed)
    try:
        specs = [MethodSpec.parse(m) for m in args.method]
        extra = dict(_param(p) for p in args.param or [])
        for s in specs:
            if extra and s.name != "none":
                s.params = {**extra, **s.params}
            s.check(bench.kind)  # names and parameters, before any model is loaded
    except (VlmplugError, argparse.ArgumentTypeError) as e:
        print(str(e), file=sys.stderr)
        return 2
    state = distributed()
    main_process = state is None or state.is_main_process
    out = Path(args.out)
    if writer is not None:
        data = Path(args.data) if args.data else out / f"{args.bench.replace('-', '_')}_data"
        if main_process and not (data / ".complete").exists():
            writer(data, n=args.scenes, seed=args.seed)
            (data / ".complete").write_text(f"scenes={args.scenes} seed={args.seed}\n")
            print(f"wrote {args.bench} files ({args.scenes} scenes, seed {args.seed}) under {data}")
        if state is not None:
            state.wait_for_everyone()
        model_id = args.model or "world"
    else:
        if not args.data or not args.model:
            print(f"vlmplug eval {args.bench} needs --data (the benchmark's folder: {bench.layout}) and --model",
                  file=sys.stderr)
            return 2
        data, model_id = Path(args.data), args.model
    splits = args.splits or list(bench.splits)
    try:
        bench.check(data, splits)
    except (BenchmarkFilesError, ValueError) as e:
        print(str(e), file=sys.stderr)
        return 2
    loaded = _load_or_fail("eval", model_id, args.dtype, **({"device": state.device} if state is not None else {}))
    if loaded is None:
        return 2
    model, processor = loaded
    results, answers, items = run(bench, model, processor, data, specs, out, splits=splits, limit=args.limit,
                                  max_new_tokens=args.max_new_tokens, suffix=args.suffix)
    if main_process:
        _write_eval(args, bench, data, model_id, splits, specs, state, out, results, answers, items)
    if state is not None:  # every process leaves together: one exiting mid-way can abort the other's gloo threads
        import torch.distributed as dist

        state.wait_for_everyone()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _write_eval(args, bench, data, model_id, splits, specs, state, out, results, answers, items) -> None:
    from .evaluation.runner import write_outputs

    meta = {"benchmark": args.bench, "model": model_id, "data": str(data), "limit": args.limit, "splits": splits,
            "methods": [s.label for s in specs], "params": {s.label: s.params for s in specs}, "suffix": args.suffix,
            "max_new_tokens": args.max_new_tokens or bench.max_new_tokens, "decoding": "greedy",
            "processes": 1 if state is None else state.num_processes}
    paths = write_outputs(results, out, args.bench, meta, bench, items, answers)
    print(paths["table"].read_text())
    print(f"wrote {paths['json']}, {paths['table']}, {paths['plot']}")


def cmd_methods(args) -> int:
    from .registry import method_registry

    for name, cls in sorted(method_registry().items()):
        doc = (cls.__doc__ or "").strip().splitlines()
        print(f"{name:<12} {doc[0] if doc else ''}")
    return 0


def cmd_demo(args) -> int:
    from .demo.app import run

    return run(args)


def cmd_models(args) -> int:
    from .api import supported_models

    print("\n".join(supported_models()))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="vlmplug", description="Inference-time attention plugins for HF vision-language models")
    sub = p.add_subparsers(dest="cmd")
    r = sub.add_parser("run", help="answer a question about an image, plain and with a method")
    r.add_argument("--model", default="world", help='"world" (embedded default) or a checkpoint id/path')
    r.add_argument("--image", help="image file (default: the bundled sample scene)")
    r.add_argument("--prompt", help="question (default: the sample scene's question)")
    r.add_argument("--method", help="method name (default: fastv when available, else record)")
    r.add_argument("--param", action="append", type=_param, help="method parameter key=value (repeatable)")
    r.add_argument("--max-new-tokens", type=int, default=8)
    r.add_argument("--dtype", default=None, help="e.g. bfloat16 for real checkpoints")
    r.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes NF4 (compute in --dtype, default fp32)")
    r.add_argument("--load-in-8bit", action="store_true", help="bitsandbytes int8")
    r.set_defaults(fn=cmd_run)
    g = sub.add_parser("ground", help="where the model looks for a query: heatmap, point and box")
    g.add_argument("--image", required=True, help="image file")
    g.add_argument("--query", required=True, help='what to find, e.g. "What color is the circle?"')
    g.add_argument("--model", default="world", help='"world" (embedded default) or a checkpoint id/path')
    g.add_argument("--method", default="tag", help="tag (default), relative, rollout or raw")
    g.add_argument("--tokens", default=None, choices=["query", "last"], help="query tokens (tag's default) or the last")
    g.add_argument("--target", default=None, help="the phrase of the query whose tokens are read")
    g.add_argument("--threshold", type=float, default=0.5, help="box threshold, a fraction of the peak")
    g.add_argument("--layers", default=None, help="decoder layers, comma-separated (default: the method's)")
    g.add_argument("--top-k", type=int, default=10, help="tag: (layer, head) pairs kept per query token")
    g.add_argument("--prompt", default="{query}", help='the text asked, "{query}" replaced by the query')
    g.add_argument("--overlay", action="store_true", help="save the heatmap over the picture (default: the heatmap)")
    g.add_argument("--out", default="heatmap.png", help="output PNG")
    g.add_argument("--dtype", default=None, help="e.g. bfloat16 for real checkpoints")
    g.set_defaults(fn=cmd_ground)
    e = sub.add_parser("eval", help="a benchmark with several methods on identical prompts (greedy, resumable)")
    e.add_argument("bench", help="pope, chair, mme, textvqa, screenspot, vstar (your files: --data, --model) or "
                                 "world-pope, world-vqa, world-grounding (generated from the embedded scenes)")
    e.add_argument("--model", default=None, help='checkpoint id/path (world suites: "world", the default)')
    e.add_argument("--data", default=None, help="the benchmark's folder (world suites: written there if missing)")
    e.add_argument("--method", nargs="+", default=["none"],
                   help='settings to compare: "none", "fastv", "fastv:keep_ratio=0.25,layer=2", ...; point '
                        "benchmarks also take the grounding methods tag, raw, relative, rollout")
    e.add_argument("--param", action="append", help="key=value added to every method but none (repeatable)")
    e.add_argument("--splits", nargs="+", default=None, help="default: all of the benchmark's")
    e.add_argument("--limit", type=int, default=None, help="first N items of each split")
    e.add_argument("--scenes", type=int, default=100, help="world suites: scenes to draw")
    e.add_argument("--seed", type=int, default=2024, help="world suites: scene seed; chair: image sampling seed")
    e.add_argument("--suffix", default="", help='appended to every question (lmms-eval: "\\nAnswer the question '
                                                 'using a single word or phrase.")')
    e.add_argument("--max-new-tokens", type=int, default=None, help="default: the benchmark's")
    e.add_argument("--out", default="eval_out", help="folder for answers (cached, resumable), JSON, table, plot")
    e.add_argument("--dtype", default=None)
    e.set_defaults(fn=cmd_eval)
    sub.add_parser("methods", help="list methods").set_defaults(fn=cmd_methods)
    sub.add_parser("models", help="list supported model types").set_defaults(fn=cmd_models)
    d = sub.add_parser("demo", help="compare methods side by side in the browser (needs the demo extra: gradio)")
    from .demo.app import add_arguments as add_demo_arguments

    add_demo_arguments(d)
    d.set_defaults(fn=cmd_demo)
    args = p.parse_args(argv)
    if not getattr(args, "fn", None):
        p.print_help()
        return 2
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
