"""Token pruning speed on a LLaVA-1.5- or Qwen2-VL-7B-shaped model with random weights (576 image tokens).

For the unpruned model and each method at each budget (kept image tokens), in one run on the same model and
prompt, times one prefill forward split into
  - vision: the vision tower (with the methods' probes, taps and key masks inside it);
  - LLM prefill: the decoder stack (`language_model`), including the drop hooks and layer masks;
  - other: the rest of the forward (embeddings, projector, the pre-LLM selection itself, the LM head);
plus decode time per token (single-token forwards through the KV cache) and KV-cache bytes after prefill.

The LLM prefill speed-up is compared with two limits for the schedule the method ran (FastV keeps the first K
layers at full length; the pre-LLM methods cut before layer 0 where the model allows, see the `cut` column):
  - limit: FLOP-proportional, FastV's per-layer model 4nd^2 + 2n^2d + 2ndm summed over layers;
  - ideal: measured, the same unpatched decoder stack run in the same pair on a prompt that physically lacks the
    dropped tokens (per-layer times at full and at kept length, combined by the schedule). What a machine can do
    with fewer tokens: on a CPU or a batch-1 GPU, short sequences use the hardware less well than long ones
    (every layer's weights are read once whatever the length), so even this falls short of the FLOP limit.
`of limit` = speed-up / limit (the issue's target: >= 0.85); `of ideal` = ideal time / pruned time, per pair:
what the library's own work costs (1.0 = nothing).

With --interleave (recommended on a shared machine), each budget alternates unpruned, ideal and pruned runs
--reps times and every ratio is the median of the per-pair ratios.

    python eval/bench_pruning.py --interleave --reps 3 --decode-tokens 2          # CPU: 4 text layers, 24 vision
    python eval/bench_pruning.py --arch qwen2vl --vision-layers 2 --interleave --reps 2 --decode-tokens 2
    python eval/bench_pruning.py --device cuda --dtype bfloat16 --text-layers 32 --vision-layers 24 --interleave
    python eval/bench_pruning.py --device cuda --dtype bfloat16 --arch qwen2vl --text-layers 28 --vision-layers 32 --interleave
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from vlmplug.compat import with_cache

DEFAULT_METHODS = ("fastv", "visionzip", "hiprune", "flowcut", "cluster", "plphp", "random", "pool")  # the last two: baselines


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


class Timers:
    """Forward-hook timers on the vision tower, the decoder stack and each decoder layer."""

    def __init__(self, model, device):
        self.device, self.t, self.hooks = device, {}, []
        base = model.base_model
        self.add(getattr(base, "vision_tower", None) or base.visual, "vision")
        self.add(base.language_model, "llm")
        for i, layer in enumerate(base.language_model.layers):
            self.add(layer, i)
        self.reset()

    def add(self, module, key):
        def pre(m, a):
            _sync(self.device)
            self.t[("start", key)] = time.perf_counter()

        def post(m, a, o):
            _sync(self.device)
            self.t[key] = self.t.get(key, 0.0) + time.perf_counter() - self.t[("start", key)]

        self.hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def reset(self):
        self.t = {}

    def layers(self):
        return [self.t.get(i, 0.0) for i in range(sum(isinstance(k, int) for k in self.t))]

    def remove(self):
        for h in self.hooks:
            h.remove()


def measure(model, inputs, args, timers) -> dict:
    """One prefill (split into vision / llm / other, per-layer times) and `decode_tokens` decode steps."""
    from transformers import DynamicCache

    timers.reset()
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    _sync(args.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model(**inputs, **with_cache(model, cache), use_cache=True, logits_to_keep=1)
    _sync(args.device)
    total = time.perf_counter() - t0
    r = {"total": total, "vision": timers.t.get("vision", 0.0), "llm": timers.t["llm"], "layers": timers.layers()}
    r["other"] = total - r["vision"] - r["llm"]
    r["kv"] = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    tok = out.logits[:, -1:].argmax(-1)
    am = inputs["attention_mask"]
    steps = []
    for _ in range(args.decode_tokens):
        am = torch.cat([am, torch.ones_like(tok)], 1)
        _sync(args.device)
        t = time.perf_counter()
        with torch.inference_mode():
            # Qwen2-VL derives decode positions from a mask over the whole sequence; without padding it needs none
            extra = {} if "image_grid_thw" in inputs else {"attention_mask": am}
            o = model(input_ids=tok, **with_cache(model, cache), use_cache=True, **extra)
        _sync(args.device)
        steps.append(time.perf_counter() - t)
        tok = o.logits[:, -1:].argmax(-1)
    r["decode"] = statistics.median(steps) if steps else float("nan")
    return r


def measure_short(model, n, args, timers, dtype) -> tuple[list[float], float]:
    """Per-layer times and the whole stack's time, unpatched, on an n-token prompt (the dropped tokens absent)."""
    from transformers import DynamicCache

    lm = model.base_model.language_model
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(1, n, model.config.text_config.hidden_size, generator=g) * 0.02).to(args.device, dtype)
    timers.reset()
    with torch.inference_mode():
        lm(inputs_embeds=x, **with_cache(lm, DynamicCache(config=model.config.get_text_config(decoder=True))), use_cache=True)
    return timers.layers(), timers.t["llm"]


def layer_flops_limit(L, Lk, n_layers, cut, cfg):
    from vlmplug.methods.pruning.common import layer_flops

    d, m = cfg.hidden_size, cfg.intermediate_size
    full = n_layers * layer_flops(L, d, m)
    pruned = cut * layer_flops(L, d, m) + (n_layers - cut) * layer_flops(Lk, d, m)
    return full / pruned


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=("llava15", "qwen2vl"), default="llava15",
                   help="LLaVA-1.5-7B (CLIP-L/336, Vicuna-7B) or Qwen2-VL-7B (672 px image: 2304 patches, 576 tokens)")
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--vision-layers", type=int, default=None, help="default: 24 (llava15), 32 (qwen2vl)")
    p.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 192])
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    p.add_argument("--decode-tokens", type=int, default=8)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--interleave", action="store_true",
                   help="per budget, alternate unpruned, ideal and pruned runs --reps times; ratios are medians of "
                        "the pairs (steadier on a shared machine than one baseline per sweep)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import vlmplug
    from vlmplug.testing import shapes

    dtype = getattr(torch, args.dtype)
    cfg, inputs, image_id = shapes.arch_setup(args.arch, args.text_layers, args.vision_layers, device=args.device)
    args.vision_layers = cfg.vision_config.num_hidden_layers if args.arch == "llava15" else cfg.vision_config.depth
    model = shapes.build_random(cfg, dtype=dtype, device=args.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    L = int(inputs["input_ids"].shape[1])
    n_img = int((inputs["input_ids"] == image_id).sum())
    timers = Timers(model, args.device)
    warm = argparse.Namespace(**{**vars(args), "decode_tokens": 2})
    measure(model, inputs, warm, timers)  # warm-up
    measure_short(model, 128, args, timers, dtype)
    rows = []
    tcfg = cfg.text_config
    n_layers = args.text_layers
    for method in args.methods:
        for k in args.budgets:
            params = {"keep_tokens": k}
            if method == "fastv":
                params["layer"] = min(2, n_layers - 1)
            if method == "hiprune":
                params["object_layer"] = min(8, args.vision_layers - 1)
            if method == "plphp":
                params["start_layer"] = min(2, n_layers - 1)
            Lk = L - n_img + k
            pairs = []
            for _ in range(args.reps if args.interleave else 1):
                b = measure(model, inputs, args, timers)
                short = measure_short(model, Lk, args, timers, dtype)
                with vlmplug.apply(model, method, **params) as h:
                    if args.interleave:
                        m = measure(model, inputs, args, timers)
                    else:
                        runs = [measure(model, inputs, args, timers) for _ in range(args.reps)]
                        m = {key: statistics.median(r[key] for r in runs) for key in ("total", "vision", "llm", "other", "decode")}
                        m["kv"] = runs[0]["kv"]
                    st = h.stats[method]
                    cut = h.session.drop_layer if h.session.drop_layer is not None else n_layers
                if method == "plphp":
                    cut = n_layers  # prefill is not shortened (the KV cache is pruned after it)
                # the schedule's layers (full length before the cut, kept length after) + the short stack's own
                # work outside its layers (rotary, mask, final norm)
                short_layers, short_llm = short
                ideal = sum(b["layers"][:cut]) + sum(short_layers[cut:]) + (short_llm - sum(short_layers))
                pairs.append({
                    "base": b, "pruned": m, "ideal_llm": ideal,
                    "speedup": b["llm"] / m["llm"], "ideal_speedup": b["llm"] / ideal, "of_ideal": ideal / m["llm"],
                    "e2e_speedup": b["total"] / m["total"], "decode_speedup": b["decode"] / m["decode"],
                    "vision_overhead": m["vision"] / b["vision"] - 1,
                })
            med = {key: statistics.median(pr[key] for pr in pairs)
                   for key in ("speedup", "ideal_speedup", "of_ideal", "e2e_speedup", "decode_speedup", "vision_overhead")}
            limit = layer_flops_limit(L, Lk, n_layers, cut, tcfg) if method != "plphp" else 1.0
            pm = {key: statistics.median(pr["pruned"][key] for pr in pairs) for key in ("llm", "other", "decode", "total")}
            bm = {key: statistics.median(pr["base"][key] for pr in pairs) for key in ("llm", "other", "decode", "total")}
            row = {"method": method, "budget": k, "cut": cut, "params": params, "flop_limit": limit,
                   "of_limit": med["speedup"] / limit,
                   "base": bm, "pruned": pm, "kv_bytes": pairs[0]["pruned"]["kv"], "base_kv_bytes": pairs[0]["base"]["kv"],
                   "flops_saved_stat": st.get("flops_saved"), **med,
                   "pairs": [{key: pr[key] for key in ("speedup", "ideal_speedup", "of_ideal", "e2e_speedup",
                                                      "decode_speedup", "vision_overhead")} for pr in pairs]}
            rows.append(row)
            print(f"  {method} {k}: llm {bm['llm']:.2f}s -> {pm['llm']:.2f}s ({med['speedup']:.2f}x; ideal "
                  f"{med['ideal_speedup']:.2f}x, limit {limit:.2f}x) other {bm['other']:.2f} -> {pm['other']:.2f}s",
                  flush=True)
    timers.remove()
    arch = "LLaVA-1.5-7B" if args.arch == "llava15" else "Qwen2-VL-7B"
    print(f"\n{arch} shapes, {n_layers} text / {args.vision_layers} vision layers, {L} prompt tokens "
          f"({n_img} image), {args.device} {args.dtype}, " + (f"medians of {args.reps} interleaved pairs" if args.interleave else
                                                          f"{args.reps} reps"))
    print(f"{'method':<10}{'kept':>5}{'cut':>4}{'LLM prefill':>18}{'speed-up':>9}{'ideal':>7}{'limit':>7}{'of ideal':>9}"
          f"{'of limit':>9}{'other s':>12}{'e2e':>7}{'decode':>8}{'KV MiB':>12}{'vision':>8}")
    for r in rows:
        print(f"{r['method']:<10}{r['budget']:>5}{r['cut']:>4}{r['base']['llm']:>8.2f}->{r['pruned']['llm']:>6.2f}s"
              f"{r['speedup']:>8.2f}x{r['ideal_speedup']:>6.2f}x{r['flop_limit']:>6.2f}x{r['of_ideal']:>9.2f}{r['of_limit']:>9.2f}"
              f"{r['base']['other']:>6.2f}->{r['pruned']['other']:.2f}{r['e2e_speedup']:>6.2f}x{r['decode_speedup']:>7.2f}x"
              f"{r['base_kv_bytes'] / 2**20:>6.0f}->{r['kv_bytes'] / 2**20:<4.0f}{100 * r['vision_overhead']:>+7.1f}%")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "prompt_tokens": L, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
