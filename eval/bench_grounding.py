"""Cost of attention-map grounding against a plain SDPA forward and against the prior art's way of getting maps,
LLaVA-1.5-7B shapes with random weights (speed needs no trained weights), depth cut on a CPU.

The prompt: BOS + 4 tokens, the 576 image tokens of a 336 x 336 image, 40 text tokens (LLaVA-1.5's
"USER: <image>\\n{question} ASSISTANT:" shape); the query is 3 text tokens near the end. Per mode, in its own
worker process (so peak memory is its own), the median wall time of --reps calls after a warm-up and the peak memory
on top of the weights (CPU: peak resident memory during the call minus resident memory before it, see
bench_backend.peak_start; CUDA: peak allocated minus allocated before). Every mode runs without a KV cache and
returns full logits, as the grounding probe's forward does.
  - sdpa:      the unpatched model, one forward (torch.no_grad, use_cache=False): the baseline;
  - tag, raw, rollout, relative: one grounding call as `ground()` makes it after tokenisation: `ground_inputs` on all
               layers (relative: ViCrop's middle layer) with the query tokens as targets, the heatmap normalised into
               a `Grounding`, its `.point` and `.box` read. relative runs two forwards (the question and ViCrop's
               generic prompt), so it is expected near 2x; the <= 1.2x time target is for the one-forward methods;
  - eager:     how TAG / ViCrop get maps: eager attention with output_attentions=True, every layer's [B, H, L, L]
               probabilities returned (and kept alive until the peak is read).
Targets (issue): a grounding call <= 1.2x the SDPA forward's time; >= 5x less peak memory than eager.

    python eval/bench_grounding.py                                    # CPU fp32, 4 text / 2 vision layers
    python eval/bench_grounding.py --device cuda --dtype bfloat16 --text-layers 32 --vision-layers 24
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_backend import peak_since, peak_start, run_worker  # noqa: E402 - one way to measure

MODES = ("sdpa", "tag", "raw", "rollout", "relative", "eager")
GROUNDING = ("tag", "raw", "rollout", "relative")
TEXT_BEFORE, TEXT_AFTER, GENERIC_AFTER = 5, 40, 12  # tokens around the image; the generic prompt's text


def worker(mode: str, args) -> dict:
    import torch

    from vlmplug.grounding.core import _normalise, ground_inputs
    from vlmplug.grounding.result import Grounding
    from vlmplug.testing.shapes import build_random, llava15_config, llava_prompt

    torch.set_num_threads(args.threads or torch.get_num_threads())
    dtype = getattr(torch, args.dtype)
    cfg = llava15_config(text_layers=args.text_layers, vision_layers=args.vision_layers)
    model = build_random(cfg, dtype=dtype, device=args.device)
    inputs = llava_prompt(cfg, text_before=TEXT_BEFORE, text_after=TEXT_AFTER, device=args.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    generic = llava_prompt(cfg, text_before=TEXT_BEFORE, text_after=GENERIC_AFTER, device=args.device, seed=1)
    generic["pixel_values"] = inputs["pixel_values"]  # the same image, ViCrop's generic question
    L = int(inputs["input_ids"].shape[1])
    targets = [[L - 8, L - 7, L - 6]]  # the query's content words, before the "ASSISTANT:" tail
    sizes = [[(336, 336)]]
    cuda = args.device.startswith("cuda")
    if mode == "eager":
        model.set_attn_implementation({"text_config": "eager"})

    def call():
        if mode in ("sdpa", "eager"):
            with torch.no_grad():
                return model(**inputs, use_cache=False, output_attentions=mode == "eager")
        maps = ground_inputs(model, inputs, method=mode, targets=None if mode == "relative" else targets,
                             image_sizes=sizes, generic_inputs=generic if mode == "relative" else None)
        m = maps[0][0]
        g = Grounding(heatmap=_normalise(m["heat"]), query="q", method=mode, info=m["info"])
        return g, g.point, g.box

    def measure():
        """seconds, peak bytes on top of the weights, what the call returned (alive until the peak is read)"""
        base = peak_start(cuda)
        t = time.perf_counter()
        out = call()
        if cuda:
            torch.cuda.synchronize()
        sec = time.perf_counter() - t
        return sec, peak_since(cuda, base), out

    _, _, out = measure()  # warm-up
    res = {"mode": mode, "seq_len": L}
    if mode == "eager":
        att = out.attentions
        res["attn_bytes"] = sum(a.numel() * a.element_size() for a in att)
        res["attn_shape"], res["attn_layers"] = list(att[0].shape), len(att)
    elif mode != "sdpa":
        g = out[0]
        res.update(point=list(g.point), box=list(g.box) if g.box else None, map_shape=list(g.heatmap.shape))
    del out
    runs = []
    for _ in range(args.reps):
        sec, peak, out = measure()
        del out
        runs.append((sec, peak))
    res["seconds"] = statistics.median(r[0] for r in runs)
    res["times"] = [r[0] for r in runs]
    res["peak_bytes"] = min(r[1] for r in runs)  # the least the call needed (the allocator's noise only adds)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--vision-layers", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of the modes (sdpa always runs)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return 0
    modes = ["sdpa"] + [m for m in MODES if m != "sdpa" and m in args.modes.split(",")]
    results = {}
    for mode in modes:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode]
        for k in ("text_layers", "vision_layers", "reps", "device", "dtype", "threads"):
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        res = run_worker(cmd)
        if isinstance(res, int):
            return res
        results[mode] = res
        print(f"  measured {mode}: {res['seconds']:.3f} s, {res['peak_bytes'] / 2**20:.1f} MiB", file=sys.stderr)
    b = results["sdpa"]
    eager = results.get("eager")
    print(f"\nLLaVA-1.5-7B shapes, {args.text_layers} text / {args.vision_layers} vision layers, {b['seq_len']} tokens "
          f"(576 image), {args.device} {args.dtype}, median of {args.reps} calls after a warm-up")
    print(f"{'mode':<9} {'time s':>8} {'x sdpa':>7} {'peak MiB':>9} {'x sdpa':>7}"
          + (f" {'eager peak / peak':>18}" if eager else ""))
    summary = {}
    for mode in modes:
        r = results[mode]
        t_ratio, m_ratio = r["seconds"] / b["seconds"], r["peak_bytes"] / max(b["peak_bytes"], 1)
        line = f"{mode:<9} {r['seconds']:>8.3f} {t_ratio:>7.2f} {r['peak_bytes'] / 2**20:>9.1f} {m_ratio:>7.2f}"
        if eager and mode in GROUNDING:
            e_ratio = eager["peak_bytes"] / max(r["peak_bytes"], 1)
            line += f" {e_ratio:>18.1f}"
            summary[mode] = {"time_x_sdpa": t_ratio, "peak_x_sdpa": m_ratio, "eager_peak_over_peak": e_ratio}
        print(line)
    if eager:
        print(f"\neager returned {eager['attn_layers']} x {eager['attn_shape']} attentions: "
              f"{eager['attn_bytes'] / 2**20:.1f} MiB of its {eager['peak_bytes'] / 2**20:.1f} MiB peak")
    for mode in GROUNDING:
        if mode in summary:
            s = summary[mode]
            target = "<= 1.2" if mode != "relative" else "two forwards, ~2 expected"
            print(f"  {mode:<9} time {s['time_x_sdpa']:.2f}x sdpa (target {target}); eager peak "
                  f"{s['eager_peak_over_peak']:.1f}x its peak (target >= 5); map {results[mode]['map_shape']}, "
                  f"point {tuple(round(v, 1) for v in results[mode]['point'])}, box {results[mode]['box']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results, "summary": summary}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
