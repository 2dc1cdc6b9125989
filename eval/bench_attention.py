"""Attention-redistribution and head methods against plain SDPA and against the anchors' way, LLaVA-1.5-7B shapes,
random weights (speed needs no trained weights): PAI, VAR, ACT, modPAI, VHR.

Per mode, in its own worker process (so peak memory is its own): one prefill forward with a KV cache (time and
peak memory on top of the weights), then --decode-tokens single-token steps (median time per token).
  - sdpa:        the unpatched model;
  - pai:         vlmplug's PAI (alpha 0.2, layers 2..), attention intervention only (gamma=1);
  - pai_eager:   the same rule the way the official PAI code runs it: eager attention materialising every
                 layer's [heads, L, L] scores, the last row's image logits amplified in layers 2.. (the other
                 layers eager as well, as its patched LlamaAttention is);
  - var:         vlmplug's VAR (released config: tau 20, rho 0.5, p 0.6, summ 0.2, layers 2..), sink dims calibrated
                 at apply() (its time in the extra column; random weights have no massive activations, so tau is
                 set to 2.5 here to give every layer sinks to move mass from);
  - var_eager:   the same rule as the official VAR code runs it: eager attention with every layer's [heads, L, L]
                 probabilities, sinks from the layer inputs' hidden states, the selection and the redistribution
                 on the text rows (vectorised over heads; the official code loops over heads in Python);
  - act:         vlmplug's ACT (beta 0.4, threshold 0.1, every head of layers 2..L-2);
  - act_eager:   the official ACT way: eager probabilities, column means and redistribution per head;
  - modpai:      vlmplug's modPAI (alpha 0.7, beta 0.3, layers 2..), attention part (gamma=1);
  - vhr:         vlmplug's VHR (alpha 2, layer 1 and the last 14); its text-only branch runs inside the prefill and
                 is subtracted from the prefill time and reported as the extra pass.
  - method-inherent extra passes (PAI's / modPAI's CFG branch: the text-only prompt, gamma != 1; VHR's text-only
    branch; VAR's calibration) are reported in the `extra pass` columns, not added to the method's.
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

MODES = ("sdpa", "pai", "pai_eager", "var", "var_eager", "act", "act_eager", "modpai", "vhr")
PAI_ALPHA, PAI_START = 0.2, 2
VAR_TAU, VAR_RHO, VAR_P, VAR_SUMM = 2.5, 0.5, 0.6, 0.2  # tau lowered: random weights have no massive activations
ACT_BETA, ACT_THRES = 0.4, 0.1


def _mask_scores(s, attention_mask, Lq):
    import torch

    if attention_mask is not None:
        return s.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool else s + attention_mask
    if Lq > 1:
        return s.masked_fill(torch.ones(Lq, s.shape[-1], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return s


def _eager_probs(query, key, value, attention_mask, scaling):
    import torch

    B, Hq, Lq, D = query.shape
    G = Hq // key.shape[1]
    k, v = key.repeat_interleave(G, 1), value.repeat_interleave(G, 1)
    s = (query @ k.transpose(-1, -2)) * (scaling if scaling is not None else D**-0.5)
    return torch.softmax(_mask_scores(s, attention_mask, Lq).float(), -1), v


def _var_eager(img_positions: list[int], dims, eps: float, sinks: dict):
    """The official VAR code's way: eager probabilities; in layers 2.., on the text rows after the image (prefill) or
    the new token, heads with image mass >= summ and visual-sink portion <= rho get (1 - p) of the sink mass moved to
    the image's non-sink tokens. `sinks[layer]` is filled by hidden-state pre-hooks (phi >= tau) at prefill."""
    import torch

    img_end = max(img_positions) + 1
    img = torch.zeros(0)

    def fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        nonlocal img
        a, v = _eager_probs(query, key, value, attention_mask, scaling)
        li = module.layer_idx
        if li >= 2 and li in sinks:
            S = a.shape[-1]
            im = torch.zeros(S, dtype=torch.bool, device=a.device)
            im[img_positions] = True
            sk = torch.zeros(S, dtype=torch.bool, device=a.device)
            sk[: sinks[li].shape[-1]] = sinks[li][0]
            rows = a[:, :, img_end:] if a.shape[2] > 1 else a  # text after the image; decode: the new token
            summation = rows[..., im].sum(-1, keepdim=True)
            portion = rows[..., im & sk].sum(-1, keepdim=True) / summation.clamp(min=1e-30)
            sel = (portion <= VAR_RHO) & (summation >= VAR_SUMM)
            tgt = im & ~sk
            budget = (1 - VAR_P) * rows[..., sk].sum(-1, keepdim=True)
            new = rows.clone()
            new[..., sk] = rows[..., sk] * VAR_P
            new[..., tgt] = rows[..., tgt] + budget * rows[..., tgt] / rows[..., tgt].sum(-1, keepdim=True).clamp(min=1e-30)
            rows.copy_(torch.where(sel, new, rows))
        return (a.to(v.dtype) @ v).transpose(1, 2).contiguous(), None

    def hook(li):
        def pre(module, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            if li >= 2 and x.shape[1] > 1:
                xf = x.float()
                z = xf[..., list(dims)] / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
                sinks[li] = z.abs().amax(-1) >= VAR_TAU

        return pre

    return fn, hook


def _act_eager(n_layers: int):
    """The official ACT code's way (atten_process_eval) on every head of layers 2..n-2, vectorised over heads;
    decode rows use the prefill's sinks."""
    import torch

    saved = {}

    def fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        a, v = _eager_probs(query, key, value, attention_mask, scaling)
        li = module.layer_idx
        if 2 <= li < n_layers - 1:
            B, H, Lq, S = a.shape
            if Lq > 1:
                col = a.sum(2) / torch.arange(S, 0, -1, device=a.device, dtype=a.dtype)
                sk = col > ACT_THRES
                sk = sk & (sk.cumsum(-1) > 1)
                saved[li] = sk
            else:
                sk = torch.zeros(B, H, S, dtype=torch.bool, device=a.device)
                sk[..., : saved[li].shape[-1]] = saved[li]
            skf = sk[:, :, None, :].to(a.dtype)
            avail = (a * skf).sum(-1, keepdim=True) * (1 - ACT_BETA)
            other = a * (1 - skf)
            a = a * (1 - skf) + a * skf * ACT_BETA + avail * other / other.sum(-1, keepdim=True).clamp(min=1e-30)
        return (a.to(v.dtype) @ v).transpose(1, 2).contiguous(), None

    return fn


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


def text_cfg_of(model):
    return model.config.get_text_config(decoder=True)


def worker(mode: str, args) -> dict:
    import torch
    from transformers import AttentionInterface, DynamicCache
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    import vlmplug
    from vlmplug.compat import with_cache
    from vlmplug.testing.shapes import build_random, llava15_config, llava_prompt

    torch.set_num_threads(args.threads or torch.get_num_threads())
    dtype = getattr(torch, args.dtype)
    if args.rd_path != "auto":  # measure one way of carrying a redistribution (backend/kernels.py)
        from vlmplug.backend import kernels

        if args.rd_path == "rows":
            kernels.EXPLICIT_MAX_ROWS = 10**9
        else:
            kernels.EXPLICIT_MAX_ROWS, kernels.EXPLICIT_ROW_SHARE = -1, -1.0
    cfg = llava15_config(text_layers=args.text_layers, vision_layers=args.vision_layers)
    model = build_random(cfg, dtype=dtype, device=args.device)
    inputs = llava_prompt(cfg, device=args.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    handle, setup_s = None, None
    img = torch.nonzero(inputs["input_ids"][0] == cfg.image_token_id).flatten().tolist()

    def use(name, fn):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, sdpa_mask)
        model.set_attn_implementation({"text_config": name})

    configs = {
        "pai": lambda: vlmplug.PAI(alpha=PAI_ALPHA, layers=f"{PAI_START}:", gamma=1.0),
        "var": lambda: vlmplug.VAR(tau=VAR_TAU, rho=VAR_RHO, p=VAR_P, summ=VAR_SUMM),
        "act": lambda: vlmplug.ACT(beta=ACT_BETA, threshold=ACT_THRES),
        "modpai": lambda: vlmplug.ModPAI(gamma=1.0),
        "vhr": lambda: vlmplug.VHR(),
    }
    if mode in configs:
        t = time.perf_counter()
        handle = vlmplug.apply(model, configs[mode]())
        setup_s = time.perf_counter() - t
    elif mode == "pai_eager":
        use("pai_eager", _pai_eager(img, args.text_layers))
    elif mode == "var_eager":
        from vlmplug.methods.attention.var import find_sink_dims

        dims = find_sink_dims(model)
        fn, hook = _var_eager(img, dims, float(getattr(text_cfg_of(model), "rms_norm_eps", 1e-6)), {})
        from vlmplug.adapters import get_adapter

        for li, layer in enumerate(get_adapter(model).decoder_layers()):
            layer.register_forward_pre_hook(hook(li), with_kwargs=True)
        use("var_eager", fn)
    elif mode == "act_eager":
        use("act_eager", _act_eager(args.text_layers))
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
        res["stats"] = handle.stats[mode]
    if mode in ("pai", "modpai"):
        from vlmplug.methods.attention.pai import text_only_inputs

        text = text_only_inputs(handle.session, inputs)  # the CFG branch's prompt: an extra pass per step
        extra = [generate(text, args.decode_tokens) for _ in range(args.reps)]
        res["extra_prefill"] = statistics.median(r[0] for r in extra)
        res["extra_decode"] = statistics.median(r[1] for r in extra)
        res["extra_what"] = "CFG text-only branch"
    elif mode == "vhr":  # the branch ran inside each prefill: measure it with one more prefill and take it out
        branch = []
        for _ in range(args.reps):
            p0 = generate(inputs, 0)[0]
            branch.append((p0, handle.method("vhr").branch_seconds))
        res["extra_prefill"] = statistics.median(b for _, b in branch)
        res["prefill"] = statistics.median(p - b for p, b in branch)
        res["extra_decode"] = 0.0
        res["extra_what"] = "text-only branch, once per prompt (inside the prefill)"
    elif mode == "var":
        res["extra_prefill"], res["extra_decode"] = setup_s, 0.0
        res["extra_what"] = "sink-dimension calibration, once per model (at apply)"
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
    p.add_argument("--rd-path", choices=("auto", "rows", "columns"), default="auto",
                   help="force how the kernel carries a redistribution (explicit rows or extra value columns)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of the modes (sdpa always runs)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return 0
    results = {}
    modes = ["sdpa"] + [m for m in args.modes.split(",") if m in MODES and m != "sdpa"]
    for mode in modes:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode]
        for k in ("text_layers", "vision_layers", "decode_tokens", "reps", "device", "dtype", "threads", "rd_path"):
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
    for mode in modes:
        r = results[mode]
        extra = (f"  {r['extra_prefill']:.3f} / {1e3 * r['extra_decode']:.1f} ({r['extra_what']})"
                 if "extra_prefill" in r else "")
        print(f"{mode:<10} {r['prefill']:>9.3f} {r['prefill'] / b['prefill']:>7.2f} {1e3 * r['decode']:>10.1f} "
              f"{r['decode'] / b['decode']:>7.2f} {r['peak_bytes'] / 2**20:>9.1f} "
              f"{r['peak_bytes'] / max(b['peak_bytes'], 1):>7.2f}{extra}")
    print("\nprefill next-token logits, max abs difference:")
    for name in ("pai", "var", "act"):
        if name not in results or name + "_eager" not in results:
            continue
        diff = max(abs(a - c) for a, c in zip(results[name]["logits"], results[name + "_eager"]["logits"]))
        moved = max(abs(a - c) for a, c in zip(results[name]["logits"], b["logits"]))
        print(f"  {name} vs {name}_eager {diff:.2e} (same rule); {name} vs sdpa {moved:.2e} (its effect)")
    for name in ("modpai", "vhr"):
        if name not in results:
            continue
        moved = max(abs(a - c) for a, c in zip(results[name]["logits"], b["logits"]))
        print(f"  {name} vs sdpa {moved:.2e} (its effect)")
    if "var" in results:
        print(f"  var stats: {results['var']['stats']['selected']} selected share per layer")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
