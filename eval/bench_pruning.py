"""Token pruning speed on a LLaVA-1.5-shaped model with random weights (576 image tokens).

For the unpruned model and each method at each budget (kept image tokens), in one run on the same
model and prompt: vision-tower time, LLM prefill time (forward time minus vision time), decode time per
token (single-token forwards through the KV cache), and KV-cache bytes after prefill. The LLM prefill
speed-up is compared with its FLOP-proportional limit for the schedule the method runs (FastV's per-layer
FLOP model 4nd^2 + 2n^2d + 2ndm summed over layers; FastV keeps full length before layer K, the vision
methods keep layer 0 at full length, where dropped tokens are only masked). The unpruned baseline is
measured again right before each method's sweep, and each ratio uses that baseline.

    python eval/bench_pruning.py                                  # CPU: 4 text layers, full 24-layer vision tower
    python eval/bench_pruning.py --interleave --reps 3 --decode-tokens 4   # steadier ratios on a shared CPU
    python eval/bench_pruning.py --device cuda --dtype bfloat16 --text-layers 32 --vision-layers 24
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

DEFAULT_METHODS = ("fastv", "visionzip", "hiprune", "flowcut", "cluster", "plphp")


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def measure(model, inputs, args, tracker):
    """(vision s, llm prefill s, decode s/token, kv bytes) medians over reps."""
    from transformers import DynamicCache

    vis, llm, dec, kv = [], [], [], 0
    for _ in range(args.reps):
        tracker["vision"] = 0.0
        cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        _sync(args.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
        _sync(args.device)
        total = time.perf_counter() - t0
        vis.append(tracker["vision"])
        llm.append(total - tracker["vision"])
        kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
        tok = out.logits[:, -1:].argmax(-1)
        am = inputs["attention_mask"]
        steps = []
        for _ in range(args.decode_tokens):
            am = torch.cat([am, torch.ones_like(tok)], 1)
            _sync(args.device)
            t = time.perf_counter()
            with torch.inference_mode():
                o = model(input_ids=tok, attention_mask=am, past_key_values=cache, use_cache=True)
            _sync(args.device)
            steps.append(time.perf_counter() - t)
            tok = o.logits[:, -1:].argmax(-1)
        dec.append(statistics.median(steps))
    return statistics.median(vis), statistics.median(llm), statistics.median(dec), kv


def flops_limit(L, Lk, n_layers, full_layers, cfg):
    from vlmplug.methods.pruning.common import layer_flops

    d, m = cfg.hidden_size, cfg.intermediate_size
    full = n_layers * layer_flops(L, d, m)
    pruned = full_layers * layer_flops(L, d, m) + (n_layers - full_layers) * layer_flops(Lk, d, m)
    return full / pruned


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--vision-layers", type=int, default=24)
    p.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 192])
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    p.add_argument("--decode-tokens", type=int, default=8)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--interleave", action="store_true",
                   help="per budget, alternate unpruned and pruned runs --reps times; ratios are medians of the pairs "
                        "(steadier on a shared machine than one baseline per sweep)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import vlmplug
    from vlmplug.testing.shapes import build_random, llava15_config, llava_prompt

    dtype = getattr(torch, args.dtype)
    cfg = llava15_config(text_layers=args.text_layers, vision_layers=args.vision_layers)
    model = build_random(cfg, dtype=dtype, device=args.device)
    inputs = llava_prompt(cfg, device=args.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    L = int(inputs["input_ids"].shape[1])
    tracker = {"vision": 0.0, "t": 0.0}
    tower = model.base_model.vision_tower

    def pre(m, a):
        _sync(args.device)
        tracker["t"] = time.perf_counter()

    def post(m, a, o):
        _sync(args.device)
        tracker["vision"] += time.perf_counter() - tracker["t"]

    hooks = [tower.register_forward_pre_hook(pre), tower.register_forward_hook(post)]
    measure(model, inputs, argparse.Namespace(**{**vars(args), "reps": 1, "decode_tokens": 2}), tracker)  # warm-up
    rows = []
    tcfg = cfg.text_config
    for method in args.methods:
        # a fresh baseline before each method's sweep: ratios compare runs minutes apart, not an hour
        base = measure(model, inputs, argparse.Namespace(**{**vars(args), "reps": 1}) if args.interleave else args, tracker)
        rows.append({"method": "none", "budget": 576, "before": method, "vision_s": base[0], "llm_prefill_s": base[1],
                     "decode_s": base[2], "kv_bytes": base[3]})
        for k in args.budgets:
            params = {"keep_tokens": k}
            if method == "fastv":
                params["layer"] = min(2, args.text_layers - 1)
            if method == "hiprune":
                params["object_layer"] = min(9, args.vision_layers)
            if method == "plphp":
                params["start_layer"] = min(2, args.text_layers - 1)
            pairs = []
            if args.interleave:
                one = argparse.Namespace(**{**vars(args), "reps": 1})
                runs = []
                for _ in range(args.reps):
                    b = measure(model, inputs, one, tracker)
                    with vlmplug.apply(model, method, **params) as h:
                        m = measure(model, inputs, one, tracker)
                        st = h.stats[method]
                    runs.append((b, m))
                    pairs.append((b[1] / m[1], b[2] / m[2], m[0] / b[0] - 1))
                base = tuple(statistics.median(b[i] for b, _ in runs) for i in range(3)) + (runs[0][0][3],)
                r = tuple(statistics.median(m[i] for _, m in runs) for i in range(3)) + (runs[0][1][3],)
            else:
                with vlmplug.apply(model, method, **params) as h:
                    r = measure(model, inputs, args, tracker)
                    st = h.stats[method]
            Lk = L - 576 + k
            if method == "fastv":
                limit = flops_limit(L, Lk, args.text_layers, params["layer"], tcfg)
            elif method == "plphp":
                limit = 1.0
            else:
                limit = flops_limit(L, Lk, args.text_layers, 1, tcfg)
            speedup = statistics.median(p[0] for p in pairs) if pairs else base[1] / r[1]
            row = {"method": method, "budget": k, "vision_s": r[0], "llm_prefill_s": r[1], "decode_s": r[2], "kv_bytes": r[3],
                   "prefill_speedup": speedup, "flop_limit": limit, "of_limit": speedup / limit,
                   "decode_speedup": statistics.median(p[1] for p in pairs) if pairs else base[2] / r[2],
                   "kv_ratio": r[3] / base[3],
                   "vision_overhead": statistics.median(p[2] for p in pairs) if pairs else r[0] / base[0] - 1,
                   "flops_saved_stat": st.get("flops_saved"), "params": params, "pairs": pairs}
            rows.append(row)
            print(f"  {method} {k}: llm {r[1]:.2f}s ({row['prefill_speedup']:.2f}x of limit {limit:.2f}x) "
                  f"decode {r[2] * 1000:.0f}ms kv {r[3] / 2**20:.0f}MiB", flush=True)
    for hk in hooks:
        hk.remove()
    print(f"\nLLaVA-1.5 shapes, {args.text_layers} text / {args.vision_layers} vision layers, {L} prompt tokens "
          f"(576 image), {args.device} {args.dtype}")
    hdr = f"{'method':<10}{'kept':>5}{'LLM prefill':>12}{'speed-up':>9}{'limit':>7}{'of limit':>9}{'decode/tok':>11}{'x':>6}{'KV MiB':>8}{'vision +%':>10}"
    print(hdr)
    for r in rows:
        if r["method"] == "none":
            print(f"{'none':<10}{576:>5}{r['llm_prefill_s']:>11.3f}s{'':>9}{'':>7}{'':>9}{r['decode_s'] * 1000:>9.1f}ms{'':>6}{r['kv_bytes'] / 2**20:>8.1f}{'':>10}")
            continue
        print(f"{r['method']:<10}{r['budget']:>5}{r['llm_prefill_s']:>11.3f}s{r['prefill_speedup']:>8.2f}x{r['flop_limit']:>6.2f}x"
              f"{r['of_limit']:>9.2f}{r['decode_s'] * 1000:>9.1f}ms{r['decode_speedup']:>5.2f}x{r['kv_bytes'] / 2**20:>8.1f}"
              f"{100 * r['vision_overhead']:>9.1f}%")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "prompt_tokens": L, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
