"""Cost of attention-map grounding against a plain SDPA forward and against the prior art's way of getting maps,
LLaVA-1.5-7B shapes with random weights (speed needs no trained weights), depth cut on a CPU.

The prompt: BOS + 4 tokens, the 576 image tokens of a 336 x 336 image, 40 text tokens (LLaVA-1.5's
"USER: <image>\\n{question} ASSISTANT:" shape); the query is 3 text tokens near the end. Every mode runs without a KV
cache and keeps the last position's logits only (logits_to_keep=1), as the grounding probe's forward does.

All modes run in one worker process (bench_backend.run_worker): a warm-up call of sdpa, eager and the first grounding
mode (the other grounding modes run the same probe path), then --reps rounds of every mode once, the order rotated: on a shared machine separate processes' timings drifted by up to 2x,
so time is compared within a round (x sdpa: median of the per-round ratios). Peak memory is per call, on top of
what was alive before it (the weights): CPU, peak resident memory during the call minus resident memory just before
it (bench_backend.peak_start; run_worker's malloc settings return freed blocks to the OS, so one call's memory does
not hide in the next one's baseline); CUDA, peak allocated minus allocated before. The least over the rounds.
  - sdpa:      the unpatched model, one forward (torch.no_grad, use_cache=False): the baseline;
  - tag, raw, rollout, relative: one grounding call as `ground()` makes it after tokenisation: `ground_inputs` on all
               layers (relative: ViCrop's middle layer) with the query tokens as targets, the heatmap normalised into
               a `Grounding`, its `.point` and `.box` read. relative runs two forwards (the question and ViCrop's
               generic prompt), so it is expected near 2x; the <= 1.2x time target is for the one-forward methods;
  - eager:     how TAG / ViCrop get maps: eager attention with output_attentions=True, every layer's [B, H, L, L]
               probabilities returned (and kept alive until the peak is read).
Targets (issue): a grounding call <= 1.2x the SDPA forward's time; >= 5x less peak memory than eager.

    python eval/bench_grounding.py                                    # CPU fp32, 4 text / 2 vision layers
    python eval/bench_grounding.py --text-layers 32 --vision-layers 24 --shared-weights --reps 1 \\
        --modes tag,eager                              # CPU, full depth, one layer's weights (~15 min on 2 cores)
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
from bench_backend import peak_since, peak_start, run_worker, write_results, llava_model  # noqa: E402 - one way to measure

MODES = ("sdpa", "tag", "raw", "rollout", "relative", "eager")
GROUNDING = ("tag", "raw", "rollout", "relative")
TEXT_BEFORE, TEXT_AFTER, GENERIC_AFTER = 5, 40, 12  # tokens around the image; the generic prompt's text


def worker(modes: list[str], args) -> dict:
    import torch

    from vlmplug.grounding.core import _normalise, ground_inputs
    from vlmplug.grounding.result import Grounding
    from vlmplug.testing.shapes import llava_prompt

    cfg, model, dtype = llava_model(args)
    inputs = llava_prompt(cfg, text_before=TEXT_BEFORE, text_after=TEXT_AFTER, device=args.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    generic = llava_prompt(cfg, text_before=TEXT_BEFORE, text_after=GENERIC_AFTER, device=args.device, seed=1)
    generic["pixel_values"] = inputs["pixel_values"]  # the same image, ViCrop's generic question
    L = int(inputs["input_ids"].shape[1])
    targets = [[L - 8, L - 7, L - 6]]  # the query's content words, before the "ASSISTANT:" tail
    cuda = args.device.startswith("cuda")

    def call(mode):
        if mode in ("sdpa", "eager"):
            model.set_attn_implementation({"text_config": mode})
            with torch.no_grad():
                out = model(**inputs, use_cache=False, output_attentions=mode == "eager", logits_to_keep=1)
            model.set_attn_implementation({"text_config": "sdpa"})  # every other mode starts from the plain model
            return out
        maps = ground_inputs(model, inputs, method=mode, targets=None if mode == "relative" else targets,
                             image_sizes=[[(336, 336)]], generic_inputs=generic if mode == "relative" else None)
        m = maps[0][0]
        g = Grounding(heatmap=_normalise(m["heat"]), query="q", method=mode, info=m["info"])
        return g, g.point, g.box

    def measure(mode):
        """seconds, peak bytes on top of what was alive before, what the call returned (alive until the peak is read)"""
        base = peak_start(cuda)
        t = time.perf_counter()
        out = call(mode)
        if cuda:
            torch.cuda.synchronize()
        sec = time.perf_counter() - t
        return sec, peak_since(cuda, base), out

    res = {m: {"mode": m, "seq_len": L, "times": [], "peaks": [], "x_sdpa": []} for m in modes}
    # warm-up: the plain model, eager, and one grounding mode (the others run the same probe path); then each mode
    # once per round, the order rotated from round to round
    warm = ["sdpa"] + [m for m in modes if m in GROUNDING][:1] + [m for m in modes if m == "eager"]
    rounds = [warm] + [modes[r % len(modes):] + modes[: r % len(modes)] for r in range(args.reps)]
    for r, order in enumerate(rounds):
        got = {}
        for mode in order:
            sec, peak, out = measure(mode)
            if mode == "eager" and "attn_bytes" not in res[mode]:
                att = out.attentions
                res[mode].update(attn_bytes=sum(a.numel() * a.element_size() for a in att), attn_layers=len(att),
                                 attn_shape=list(att[0].shape))
            elif mode in GROUNDING and "point" not in res[mode]:
                g = out[0]
                res[mode].update(point=list(g.point), box=list(g.box) if g.box else None,
                                 map_shape=list(g.heatmap.shape))
            del out
            if r > 0:  # round 0 is the warm-up
                got[mode] = sec
                res[mode]["times"].append(sec)
                res[mode]["peaks"].append(peak)
        for mode in got:
            res[mode]["x_sdpa"].append(got[mode] / got["sdpa"])
    for v in res.values():
        v["seconds"], v["time_ratio"] = statistics.median(v["times"]), statistics.median(v["x_sdpa"])
        v["peak_bytes"] = min(v["peaks"])  # the least the call needed (the allocator's noise only adds)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--vision-layers", type=int, default=2)
    p.add_argument("--reps", type=int, default=2, help="measured rounds after the warm-up")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--shared-weights", action="store_true", help="real depth with every layer sharing one layer's weights")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of the modes (sdpa always runs)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker.split(","), args)))
        return 0
    modes = ["sdpa"] + [m for m in MODES if m != "sdpa" and m in args.modes.split(",")]
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", ",".join(modes)]
    for k in ("text_layers", "vision_layers", "reps", "device", "dtype", "threads"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    cmd += ["--shared-weights"] if args.shared_weights else []
    results = run_worker(cmd)
    if isinstance(results, int):
        return results
    b, eager = results["sdpa"], results.get("eager")
    print(f"\nLLaVA-1.5-7B shapes, {args.text_layers} text / {args.vision_layers} vision layers"
          f"{' sharing one set of weights' if args.shared_weights else ''}, {b['seq_len']} tokens (576 image), "
          f"{args.device} {args.dtype}; time: median of {args.reps} rounds after a warm-up, "
          "x sdpa: median of the per-round ratios; peak: least over the rounds")
    print(f"{'mode':<9} {'time s':>8} {'x sdpa':>7} {'peak MiB':>9} {'x sdpa':>7}"
          + (f" {'eager peak / peak':>18}" if eager else ""))
    summary = {}
    for mode in modes:
        r = results[mode]
        m_ratio = r["peak_bytes"] / max(b["peak_bytes"], 1)
        line = f"{mode:<9} {r['seconds']:>8.3f} {r['time_ratio']:>7.2f} {r['peak_bytes'] / 2**20:>9.1f} {m_ratio:>7.2f}"
        if eager and mode in GROUNDING:
            e_ratio = eager["peak_bytes"] / max(r["peak_bytes"], 1)
            line += f" {e_ratio:>18.1f}"
            summary[mode] = {"time_x_sdpa": r["time_ratio"], "peak_x_sdpa": m_ratio, "eager_peak_over_peak": e_ratio}
        print(line)
    if eager:
        print(f"\neager returned {eager['attn_layers']} x {eager['attn_shape']} attentions: "
              f"{eager['attn_bytes'] / 2**20:.1f} MiB of its {eager['peak_bytes'] / 2**20:.1f} MiB peak")
    for mode, s in summary.items():
        target = "<= 1.2" if mode != "relative" else "none: two forwards, ~2 expected"
        print(f"  {mode:<9} time {s['time_x_sdpa']:.2f}x sdpa (target {target}); eager peak "
              f"{s['eager_peak_over_peak']:.1f}x its peak (target >= 5); map {results[mode]['map_shape']}, "
              f"point {tuple(round(v, 1) for v in results[mode]['point'])}, box {results[mode]['box']}")
    write_results(args, results, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
