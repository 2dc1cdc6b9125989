"""Attention-redistribution methods against plain SDPA and against the anchors' way, LLaVA-1.5-7B shapes, random
weights (speed needs no trained weights). For now: PAI (issue 12's other methods join as they land).

Per mode, in its own worker process (so peak memory is its own): one prefill forward with a KV cache (time and
peak memory on top of the weights), then --decode-tokens single-token steps (median time per token).
  - sdpa:        the unpatched model;
  - pai:         vlmplug's PAI (alpha 0.2, layers 2..), attention intervention only (gamma=1);
  - pai_eager:   the same rule the way the official PAI code runs it: eager attention materialising every
                 layer's [heads, L, L] scores, the last row's image logits amplified in layers 2.. (the other
                 layers eager as well, as its patched LlamaAttention is);
  - pai's CFG branch (the text-only prompt, gamma != 1) is a method-inherent extra pass: its own prefill and
    per-token decode time are reported in the `extra pass` columns, not added to PAI's.
Ratios are against sdpa in the same run.

    python eval/bench_attention.py                                   # CPU, 8 text / 2 vision layers
    python eval/bench_attention.py --device cuda --dtype bfloat16 --text-layers 32 --vision-layers 24
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

MODES = ("sdpa", "pai", "pai_eager")
PAI_ALPHA, PAI_START = 0.2, 2


def _pai_eager(image_positions: list[int], n_layers: int):
    """The official code's way, on an unpatched model: eager softmax with PAI's rule in layers PAI_START.."""
    import torch

    img = torch.tensor(image_positions)

    def fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        B, Hq, Lq, D = query.shape
        G = Hq // key.shape[1]
        k, v = key.repeat_interleave(G, 1), value.repeat_interleave(G, 1)
        s = (query @ k.transpose(-1, -2)) * (scaling if scaling is not None else D**-0.5)
        if PAI_START <= module.layer_idx < n_layers:
            row = s[:, :, -1, img]
            s[:, :, -1, img] = row + PAI_ALPHA * row.abs()
        if attention_mask is not None:
            s = s.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool else s + attention_mask
        elif Lq > 1:
            s = s.masked_fill(torch.ones(Lq, s.shape[-1], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
        return (torch.softmax(s.float(), -1).to(v.dtype) @ v).transpose(1, 2).contiguous(), None

    return fn


def worker(mode: str, args) -> dict:
    import torch
    from transformers import AttentionInterface, DynamicCache
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    import vlmplug
    from vlmplug.compat import with_cache
    from vlmplug.testing.shapes import build_random, llava15_config, llava_prompt

    torch.set_num_threads(args.threads or torch.get_num_threads())
    dtype = getattr(torch, args.dtype)
    cfg = llava15_config(text_layers=args.text_layers, vision_layers=args.vision_layers)
    model = build_random(cfg, dtype=dtype, device=args.device)
    inputs = llava_prompt(cfg, device=args.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    handle = None
    if mode == "pai":
        handle = vlmplug.apply(model, vlmplug.PAI(alpha=PAI_ALPHA, layers=f"{PAI_START}:", gamma=1.0))
    elif mode == "pai_eager":
        img = torch.nonzero(inputs["input_ids"][0] == cfg.image_token_id).flatten().tolist()
        AttentionInterface.register("pai_eager", _pai_eager(img, args.text_layers))
        AttentionMaskInterface.register("pai_eager", sdpa_mask)
        model.set_attn_implementation({"text_config": "pai_eager"})
    cuda = args.device.startswith("cuda")
    text_cfg = model.config.get_text_config(decoder=True)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def generate(inp, steps):
        """prefill seconds, median decode seconds per token, prefill peak bytes"""
        cache = DynamicCache(config=text_cfg)
        sync()
        base = peak_start(cuda)
        t = time.perf_counter()
        with torch.inference_mode():
            out = model(**inp, **with_cache(model, cache), use_cache=True, logits_to_keep=1)
        sync()
        prefill = time.perf_counter() - t
        peak = peak_since(cuda, base)
        last_logits.append(out.logits[0, -1].float().cpu().tolist())
        tok, per = out.logits[:, -1:].argmax(-1), []
        for _ in range(steps):
            t = time.perf_counter()
            with torch.inference_mode():
                out = model(input_ids=tok, **with_cache(model, cache), use_cache=True)
            sync()
            per.append(time.perf_counter() - t)
            tok = out.logits[:, -1:].argmax(-1)
        return prefill, statistics.median(per) if per else float("nan"), peak

    last_logits: list = []
    generate(inputs, 1)  # warm-up
    runs = [generate(inputs, args.decode_tokens) for _ in range(args.reps)]
    res = {"mode": mode, "prefill": statistics.median(r[0] for r in runs),
           "decode": statistics.median(r[1] for r in runs), "peak_bytes": min(r[2] for r in runs),
           "seq_len": int(inputs["input_ids"].shape[1]), "logits": last_logits[0]}
    if handle is not None:
        assert handle.stats["pai"]["layers"] == list(range(PAI_START, args.text_layers))
        from vlmplug.methods.attention.pai import text_only_inputs

        text = text_only_inputs(handle.session, inputs)  # the CFG branch's prompt: an extra pass per step
        extra = [generate(text, args.decode_tokens) for _ in range(args.reps)]
        res["extra_prefill"] = statistics.median(r[0] for r in extra)
        res["extra_decode"] = statistics.median(r[1] for r in extra)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text-layers", type=int, default=8)
    p.add_argument("--vision-layers", type=int, default=2)
    p.add_argument("--decode-tokens", type=int, default=4)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return 0
    results = {}
    for mode in MODES:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode]
        for k in ("text_layers", "vision_layers", "decode_tokens", "reps", "device", "dtype", "threads"):
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        res = run_worker(cmd)
        if isinstance(res, int):
            return res
        results[mode] = res
        print(f"  measured {mode}: prefill {results[mode]['prefill']:.3f} s", file=sys.stderr)
    b = results["sdpa"]
    print(f"\nLLaVA-1.5-7B shapes, {args.text_layers} text / {args.vision_layers} vision layers, {b['seq_len']} tokens "
          f"(576 image), {args.device} {args.dtype}, medians of {args.reps} runs, {args.decode_tokens} decode tokens")
    print(f"{'mode':<10} {'prefill s':>9} {'x sdpa':>7} {'decode ms':>10} {'x sdpa':>7} {'peak MiB':>9} {'x sdpa':>7}"
          f"  {'extra pass: prefill s / decode ms'}")
    for mode in MODES:
        r = results[mode]
        extra = (f"  {r['extra_prefill']:.3f} / {1e3 * r['extra_decode']:.1f} (CFG text-only branch)"
                 if "extra_prefill" in r else "")
        print(f"{mode:<10} {r['prefill']:>9.3f} {r['prefill'] / b['prefill']:>7.2f} {1e3 * r['decode']:>10.1f} "
              f"{r['decode'] / b['decode']:>7.2f} {r['peak_bytes'] / 2**20:>9.1f} "
              f"{r['peak_bytes'] / max(b['peak_bytes'], 1):>7.2f}{extra}")
    diff = max(abs(a - c) for a, c in zip(results["pai"]["logits"], results["pai_eager"]["logits"]))
    moved = max(abs(a - c) for a, c in zip(results["pai"]["logits"], b["logits"]))
    print(f"\nprefill next-token logits: pai vs pai_eager max diff {diff:.2e} (same rule), pai vs sdpa {moved:.2e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
