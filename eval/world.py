"""Accuracy of a VLM on freshly drawn world scenes, per question type, with and without a vlmplug method.

    python eval/world.py --n 200
    python eval/world.py --n 200 --method fastv --param keep_ratio=0.25 --out eval/results/world_fastv.json
    python eval/world.py --n 100 --clutter          # many distractors
    python eval/world.py --n 100 --size 128x96      # another image size (the processor resizes)
    python eval/world.py --n 150 --clutter --kinds exists --per-kind 2 --method vhr   # existence: yes-ratio

Questions come from held-out scene seeds the trainer never draws; answers are scored by exact match of the first
word of the greedy answer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_params(pairs: list[str]) -> dict:
    """``["k=v", ...]`` to a dict; values are Python literals when they parse as one, strings otherwise."""
    from vlmplug.errors import MethodConfigError
    from vlmplug.evaluation.runner import parse_pair

    try:
        return dict(parse_pair(p) for p in pairs)
    except MethodConfigError as e:
        raise SystemExit(f"--param: {e}") from None


def parse_size(text: str | None):
    if not text:
        return 64
    if "x" in text:
        w, h = text.lower().split("x")
        return (int(w), int(h))
    return int(text)


def load(model_id: str, device: str, dtype: str | None):
    if model_id == "world":
        from vlmplug.world import load_world

        return load_world(device=device, dtype=dtype)
    if os.path.isdir(model_id) and (Path(model_id) / "training.json").exists():
        from vlmplug.world import load_world

        return load_world(device=device, dtype=dtype, path=model_id)
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlmplug.compat import load_kwargs

    model = AutoModelForImageTextToText.from_pretrained(
        model_id, **load_kwargs(dtype=getattr(torch, dtype) if dtype else "auto"))
    return model.to(device).eval(), AutoProcessor.from_pretrained(model_id)


def evaluate(model, processor, scenes, methods=None, method_params=None, desc="eval", max_new_tokens=4) -> dict:
    """Per-kind accuracy, mean seconds per answer and mean prompt tokens over all questions of ``scenes``."""
    from tqdm.auto import tqdm

    from vlmplug.pipeline import generate_info, normalize_answer
    from vlmplug.world import QUESTION_KINDS

    per = {k: [0, 0] for k in QUESTION_KINDS}
    seconds, tokens, records = 0.0, 0, []
    questions = [(s, q) for s in scenes for q in s.questions]
    for scene, q in tqdm(questions, desc=desc, mininterval=1.0):
        info = generate_info(
            model, processor, scene.image, q.text, methods=methods, method_params=method_params,
            max_new_tokens=max_new_tokens,
        )
        ok = normalize_answer(info["text"]) == q.answer
        per[q.kind][0] += int(ok)
        per[q.kind][1] += 1
        seconds += info["seconds"]
        tokens += info["prompt_tokens"]
        records.append(dict(seed=scene.seed, kind=q.kind, question=q.text, answer=q.answer, pred=info["text"]))
    n = max(1, len(questions))
    acc = {k: (c / t if t else None) for k, (c, t) in per.items()}
    total = sum(c for c, _ in per.values()) / n
    return dict(
        accuracy=acc, overall=total, counts={k: t for k, (_, t) in per.items()},
        seconds_per_answer=seconds / n, prompt_tokens=tokens / n, existence=existence(records), records=records,
    )


def existence(records: list[dict]) -> dict | None:
    """Existence questions as POPE scores them ("yes" the positive class): yes_ratio (share of "yes" answers, the
    hallucination signature when it exceeds truth_yes), precision, recall, f1; None without such questions."""
    from vlmplug.pipeline import normalize_answer

    ex = [r for r in records if r["kind"] == "exists"]
    if not ex:
        return None
    said = [normalize_answer(r["pred"]) == "yes" for r in ex]
    truth = [r["answer"] == "yes" for r in ex]
    tp = sum(s and t for s, t in zip(said, truth))
    prec = tp / max(1, sum(said))
    rec = tp / max(1, sum(truth))
    return dict(n=len(ex), yes_ratio=sum(said) / len(ex), truth_yes=sum(truth) / len(ex), precision=prec, recall=rec,
                f1=2 * prec * rec / max(1e-12, prec + rec))


def table(results: dict[str, dict]) -> str:
    from vlmplug.world import QUESTION_KINDS

    names = list(results)
    width = max(12, *(len(n) for n in names))
    head = f"{'question':<13}" + "".join(f"{n:>{width + 2}}" for n in names)
    lines = [head, "-" * len(head)]
    first = results[names[0]]
    for k in QUESTION_KINDS:
        cells = []
        for n in names:
            a = results[n]["accuracy"][k]
            cells.append(f"{'-' if a is None else f'{100 * a:.1f}%':>{width + 2}}")
        lines.append(f"{k + ' (' + str(first['counts'][k]) + ')':<13}" + "".join(cells))
    lines.append(f"{'overall':<13}" + "".join(f"{100 * results[n]['overall']:>{width + 1}.1f}%" for n in names))
    lines.append(f"{'ms/answer':<13}" + "".join(f"{1000 * results[n]['seconds_per_answer']:>{width + 2}.1f}" for n in names))
    lines.append(f"{'prompt tokens':<13}" + "".join(f"{results[n]['prompt_tokens']:>{width + 2}.1f}" for n in names))
    if first.get("existence"):
        lines.append(f"existence ({first['existence']['n']} questions, truth yes {100 * first['existence']['truth_yes']:.1f}%)")
        for key in ("yes_ratio", "precision", "recall", "f1"):
            lines.append(f"{'  ' + key:<13}" + "".join(f"{100 * results[n]['existence'][key]:>{width + 1}.1f}%"
                                                        for n in names))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="world", help="'world' (the embedded model), a checkpoint folder or a hub id")
    p.add_argument("--n", type=int, default=200, help="number of scenes (about one question of each type per scene)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", default=None, help="a vlmplug method name, evaluated next to the plain model")
    p.add_argument("--param", action="append", default=[], help="method parameter key=value (repeatable)")
    p.add_argument("--clutter", action="store_true", help="6-10 smaller objects per scene")
    p.add_argument("--small", action="store_true", help="small objects only")
    p.add_argument("--size", default=None, help="image size: N or WxH (default 64)")
    p.add_argument("--objects", default="1-4", help="objects per scene, N or A-B (ignored with --clutter)")
    p.add_argument("--kinds", default=None, help="question kinds, comma-separated (default: all), e.g. exists")
    p.add_argument("--per-kind", type=int, default=1, help="questions of each kind per scene")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-baseline", action="store_true", help="with --method: skip the plain run")
    p.add_argument("--out", default=None, help="write results as JSON here")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    from vlmplug.world import heldout_scenes

    lo, _, hi = a.objects.partition("-")
    n_objects = (int(lo), int(hi)) if hi else int(lo)
    extra = {"kinds": tuple(a.kinds.split(","))} if a.kinds else {}
    scenes = heldout_scenes(a.n, seed=a.seed, size=parse_size(a.size), n_objects=n_objects, clutter=a.clutter,
                            small=a.small, questions_per_kind=a.per_kind, **extra)
    model, processor = load(a.model, a.device, a.dtype)
    params = parse_params(a.param)
    results: dict[str, dict] = {}
    t0 = time.time()
    if not (a.method and a.no_baseline):
        results["plain"] = evaluate(model, processor, scenes, desc="plain")
    if a.method:
        label = a.method + ("(" + ",".join(f"{k}={v}" for k, v in params.items()) + ")" if params else "")
        results[label] = evaluate(model, processor, scenes, methods=a.method, method_params=params, desc=a.method)
    print(table(results))
    if a.out:
        out = dict(
            model=a.model, n_scenes=a.n, seed=a.seed, clutter=a.clutter, small=a.small, size=a.size,
            objects=a.objects, kinds=a.kinds, per_kind=a.per_kind, method=a.method, params=params,
            seconds=round(time.time() - t0, 1), results=results,
        )
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
