"""Backend cost on a LLaVA-1.5-shaped model with random weights (576 image tokens).

Measures, in one run and on the same model and prompt: plain SDPA forward, `record` on all layers
(last-token image attention), and eager attention with `output_attentions=True`. Each mode runs in a
fresh worker process so that peak memory is its own: peak = the process's peak resident memory
during the measured forward (peak counter reset just before it) minus the resident memory before it,
i.e. the memory the forward itself needs on top of the weights. Time = median of --reps forwards.
All modes use logits_to_keep=1 (as generate() does at prefill) and, unless --use-cache, no KV cache:
an analysis forward, where neither the vocabulary projection nor the cache (the same bytes in every
mode: 671 MiB at full depth) hides what reading attention costs.

    python eval/bench_backend.py                       # CPU, depth cut to 8 text / 2 vision layers
    python eval/bench_backend.py --text-layers 32 --vision-layers 24 --shared-weights --reps 0 --no-warmup
                                                       # CPU, full depth, memory only (one forward per mode)
    python eval/bench_backend.py --device cuda --dtype bfloat16 --text-layers 32 --vision-layers 24
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODES = ("sdpa", "record", "eager")


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _hwm_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_start(cuda: bool) -> int:
    """Reset the peak-memory counter; returns the baseline (bytes) that `peak_since` subtracts."""
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    import gc

    gc.collect()
    base = _rss_kib() * 1024
    _reset_hwm()
    return base


def peak_since(cuda: bool, base: int) -> int:
    """Peak memory (bytes) since `peak_start`, on top of its baseline."""
    if cuda:
        import torch

        return torch.cuda.max_memory_allocated() - base
    return _hwm_kib() * 1024 - base


def llava_model(args):
    """(config, model, dtype): LLaVA-1.5-7B shapes with random weights at --text-layers / --vision-layers, or the
    real depth with every layer sharing one layer's weights (--shared-weights); threads from --threads."""
    import torch

    from vlmplug.testing.shapes import build_random, deepen_shared, llava15_config

    torch.set_num_threads(args.threads or torch.get_num_threads())
    dtype = getattr(torch, args.dtype)
    if args.shared_weights:  # real depth, one layer's weights (see deepen_shared)
        cfg = llava15_config(text_layers=1, vision_layers=1)
        model = deepen_shared(build_random(cfg, dtype=dtype, device=args.device), args.text_layers, args.vision_layers)
    else:
        cfg = llava15_config(text_layers=args.text_layers, vision_layers=args.vision_layers)
        model = build_random(cfg, dtype=dtype, device=args.device)
    return cfg, model, dtype


def write_results(args, results, summary) -> None:
    """--out: the run's arguments, per-mode results and summary as JSON."""
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results, "summary": summary}, f, indent=2)


def run_worker(cmd: list[str]) -> dict | int:
    """Run one measurement worker in its own process (peak memory is then its own): its last stdout line as JSON, or
    the worker's exit code (its stderr printed) when it failed."""
    # large blocks via mmap and no heap hoarding: resident memory then follows live tensors
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        print(out.stderr, file=sys.stderr)
        return out.returncode
    return json.loads(out.stdout.strip().splitlines()[-1])


def worker(mode: str, args) -> dict:
    import torch

    import vlmplug
    from vlmplug.testing.shapes import llava_prompt

    cfg, model, dtype = llava_model(args)
    inputs = llava_prompt(cfg, device=args.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    extra = {"logits_to_keep": 1, "use_cache": args.use_cache}
    handle = None
    if mode == "record":
        handle = vlmplug.apply(model, "record")
    elif mode == "eager":
        model.set_attn_implementation({"text_config": "eager"})
        extra["output_attentions"] = True
    cuda = args.device.startswith("cuda")

    def run():
        with torch.inference_mode():
            out = model(**inputs, **extra)
        if cuda:
            torch.cuda.synchronize()
        return out

    if args.warmup:
        out = run()
        del out
    base = peak_start(cuda)
    out = run()
    peak = peak_since(cuda, base)
    if handle is not None:
        maps = handle.image_attention()
        assert maps[0][0].shape[-2:] == (24, 24)
    del out
    times = []
    for _ in range(args.reps):
        t = time.perf_counter()
        o = run()
        times.append(time.perf_counter() - t)
        del o
    return {"mode": mode, "seconds": statistics.median(times) if times else float("nan"), "peak_bytes": peak,
            "seq_len": int(inputs["input_ids"].shape[1])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text-layers", type=int, default=8)
    p.add_argument("--vision-layers", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--shared-weights", action="store_true", help="real depth with every layer sharing one layer's weights")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="measure memory on the first forward")
    p.add_argument("--use-cache", action="store_true", help="also build the KV cache (same bytes in every mode)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return 0
    results = {}
    for mode in MODES:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--text-layers", str(args.text_layers),
               "--vision-layers", str(args.vision_layers), "--device", args.device, "--dtype", args.dtype,
               "--reps", str(args.reps), "--threads", str(args.threads)]
        cmd += ["--shared-weights"] if args.shared_weights else []
        cmd += [] if args.warmup else ["--no-warmup"]
        cmd += ["--use-cache"] if args.use_cache else []
        res = run_worker(cmd)
        if isinstance(res, int):
            return res
        results[mode] = res
        print(f"  measured {mode}: {results[mode]['seconds']:.3f} s", file=sys.stderr)
    base = results["sdpa"]
    print(f"\nLLaVA-1.5 shapes, {args.text_layers} text / {args.vision_layers} vision layers"
          f"{' sharing one set of weights' if args.shared_weights else ''}, "
          f"{base['seq_len']} tokens (576 image), {args.device} {args.dtype}")
    print(f"{'mode':<8} {'time (s)':>9} {'x sdpa':>7} {'peak (MiB)':>11} {'x sdpa':>7}")
    for mode in MODES:
        r = results[mode]
        print(f"{mode:<8} {r['seconds']:>9.3f} {r['seconds'] / base['seconds']:>7.2f} "
              f"{r['peak_bytes'] / 2**20:>11.1f} {r['peak_bytes'] / max(base['peak_bytes'], 1):>7.2f}")
    rec, eag = results["record"], results["eager"]
    summary = {
        "record_time_ratio": rec["seconds"] / base["seconds"],
        "eager_over_record_peak": eag["peak_bytes"] / max(rec["peak_bytes"], 1),
        "record_extra_mib": (rec["peak_bytes"] - base["peak_bytes"]) / 2**20,
        "eager_extra_mib": (eag["peak_bytes"] - base["peak_bytes"]) / 2**20,
    }
    depth = f"{args.text_layers} text / {args.vision_layers} vision layers" + (" (shared weights)" if args.shared_weights else "")
    print(f"({depth})")
    print(f"\nrecord / sdpa time: {summary['record_time_ratio']:.3f} (target <= 1.2)")
    print(f"eager / record peak memory: {summary['eager_over_record_peak']:.1f}x (target >= 5)")
    print(f"memory added to the SDPA forward: record {summary['record_extra_mib']:+.1f} MiB, "
          f"eager {summary['eager_extra_mib']:+.1f} MiB (eager keeps a [heads, L, L] map per layer)")
    write_results(args, results, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
