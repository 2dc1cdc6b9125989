"""Mutation testing of vlmplug's methods and backend: does the suite notice when the code is subtly wrong?

Each entry of MUTATIONS names one small change (a file, an exact source snippet, its replacement, what it
breaks) and the test files that exercise it. For each mutation the script

1. applies it to a COPY of the repository (never the working tree): the tree is copied once per worker to a
   temporary directory (without .venv, .git, .compat, caches), the snippet must occur exactly once in the copy's
   file (otherwise the code drifted and the script stops, naming the mutation), and the mutated file must compile;
2. runs pytest from the copy with the venv's python, `PYTHONPATH` pointing at the copy and a guard plugin
   (`-p _mutation_guard`) that stops the run unless `vlmplug` was imported from the copy; bytecode caching is off,
   so a restored file can never be shadowed by the mutated one's .pyc;
3. restores the copy's file and records the outcome: killed (a test failed), survived (all passed), timeout.

Before the mutations, the union of their test files runs once on the unmutated copy (the baseline): a suite that
already fails would make every mutation look killed. `--full` runs the whole suite for every mutation instead of
its targets (`-x` in both cases: the first failure kills). Results: a table on stdout and JSON (`--json`).

    .venv/bin/python scripts/mutation.py                 # every mutation, targeted tests (make mutation)
    .venv/bin/python scripts/mutation.py --full          # every mutation, the whole suite
    .venv/bin/python scripts/mutation.py --only fastv-default-keep-ratio,hiprune-alpha-default
    .venv/bin/python scripts/mutation.py --list          # names, files, descriptions; runs nothing
    .venv/bin/python scripts/mutation.py --check         # every snippet applies exactly once; runs nothing
    .venv/bin/python scripts/mutation.py --tests tests/test_contract.py   # other tests than the declared targets

Exit status: 0 when every mutation was killed (or is listed as equivalent, with the reason), 1 when one survived,
2 on a usage error, drifted snippet, failed baseline or a copy that did not import its own vlmplug.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PY = ROOT / ".venv" / "bin" / "python"
DEFAULT_JSON = ROOT / "build" / "mutation.json"
#: not copied: environments, VCS data, caches, build outputs
IGNORE = (".venv", ".git", ".compat", ".hypothesis", ".pytest_cache", "__pycache__", "*.pyc", "*.egg-info", "build",
          "dist", ".whl")
GUARD = "_mutation_guard"
GUARD_SRC = '''"""Written by scripts/mutation.py into the copy: stop unless vlmplug comes from the copy under test."""
import os

import pytest


def pytest_sessionstart(session):
    import vlmplug

    root = os.path.realpath(os.environ["VLMPLUG_MUTATION_ROOT"])
    got = os.path.realpath(vlmplug.__file__)
    if not got.startswith(root + os.sep):
        pytest.exit(f"mutation guard: vlmplug was imported from {got}, not from the copy {root}", returncode=99)
'''
GUARD_RC = 99


class Abort(SystemExit):
    """Stop with status 2 and a message (drifted snippet, broken copy, failed guard)."""

    def __init__(self, msg: str):
        print(msg, file=sys.stderr)
        super().__init__(2)


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    old: str  # exact snippet, must occur once
    new: str
    desc: str
    tests: tuple[str, ...]  # test files (or node ids) that exercise it, most specific first
    equivalent: str = ""  # non-empty: known to be equivalent (why); a survival then does not fail the run


M = Mutation
FASTV = "vlmplug/methods/pruning/fastv.py"
PLPHP = "vlmplug/methods/pruning/plphp.py"
VZIP = "vlmplug/methods/pruning/visionzip.py"
HIP = "vlmplug/methods/pruning/hiprune.py"
COMMON = "vlmplug/methods/pruning/common.py"
VCOMMON = "vlmplug/methods/pruning/vision_common.py"
VSCORES = "vlmplug/methods/pruning/vision_scores.py"
FLOW = "vlmplug/methods/pruning/flowcut.py"
CLUSTER = "vlmplug/methods/pruning/cluster.py"
RANDOM = "vlmplug/methods/pruning/random_drop.py"
POOL = "vlmplug/methods/pruning/pool.py"
KERNELS = "vlmplug/backend/kernels.py"
DROP = "vlmplug/backend/drop.py"
KV = "vlmplug/backend/kvprune.py"
ATTN = "vlmplug/backend/attention.py"
INSTALL = "vlmplug/runtime/install.py"
A_LLAVA = "vlmplug/adapters/llava.py"
A_INTERNVL = "vlmplug/adapters/internvl.py"
A_QWEN = "vlmplug/adapters/qwen_vl.py"

T_FID = "tests/test_fidelity.py"
T_FASTV = "tests/test_fastv.py"
T_PLPHP = "tests/test_plphp.py"
T_VIS = "tests/test_vision_pruning.py"
T_BEAMS = "tests/test_beams_vision.py"
T_API = "tests/test_api.py"
T_CONTRACT = "tests/test_contract.py"
T_BASE = "tests/test_baselines.py"
T_CLUSTER = "tests/test_cluster.py"
T_FLOW = "tests/test_flowcut.py"
T_PRE = "tests/test_pre_llm_drop.py"
T_RECORD = "tests/test_record.py"

MUTATIONS: list[Mutation] = [
    # ---- the seven survivors of the audit (issue "Pruning family ... tests that can fail")
    M("fastv-default-keep-ratio", FASTV,
      'self._normalise("keep_ratio", 0.5)', 'self._normalise("keep_ratio", 0.25)',
      "FastV's default keep ratio 50% -> 25% (paper headline: K=2, R=50%)", (T_FASTV, T_API)),
    M("fastv-all-drops-last-row", FASTV,
      "sel[b, s.first_real : s.last_real + 1] = True", "sel[b, s.first_real : s.last_real] = True",
      "FastV scores='all' leaves the last query row out of the mean", (T_FASTV,)),
    M("plphp-no-reduce-branch", PLPHP,
      "        if vision_share <= self.beta:\n            return max(0.0, r - self.delta)\n        return r\n",
      "        return r\n",
      "PLPHP: vision-indifferent layers (share <= beta) keep keep_ratio instead of keep_ratio - delta", (T_PLPHP,)),
    M("visionzip-merge-least-similar", VZIP,
      "assign = torch.argmax(sim, dim=1)", "assign = torch.argmin(sim, dim=1)",
      "VisionZip merges each remaining token into its LEAST similar contextual target", (T_VIS,)),
    M("vision-identity-drift", VCOMMON,
      "            if new is not None:\n                plan.overwrite.append((i, new))",
      "            if new is None and kept.numel() == x.shape[0]:\n                new = x * (1 + 1e-4)\n"
      "            if new is not None:\n                plan.overwrite.append((i, new))",
      "pre-LLM methods keeping every token scale the features by 1 + 1e-4 (identity drifts)", (T_FID, T_VIS)),
    M("hiprune-alpha-default", HIP,
      "alpha: float = 0.1", "alpha: float = 0.2",
      "HiPrune's default alpha 0.1 -> 0.2 (official code: 0.1)", (T_VIS,)),
    M("remove-leaves-vision-attention", INSTALL,
      "        for cfg, value in self._attn_snapshot:\n            cfg._attn_implementation_internal = value",
      "        for cfg, value in self._attn_snapshot:\n            if 'vision' not in type(cfg).__name__.lower():\n"
      "                cfg._attn_implementation_internal = value",
      "remove() leaves the vision tower's attention implementation switched to vlmplug", (T_API, T_CONTRACT)),
    # ---- budgets and rankings shared by every pruning method
    M("budget-ratio-floor", COMMON,
      "return min(n, int(round(n * keep_ratio)))", "return min(n, int(n * keep_ratio))",
      "keep_ratio budgets floor n * ratio instead of rounding it", (T_FASTV, T_PLPHP, T_VIS, T_BASE)),
    M("budget-tokens-off-by-one", COMMON,
      "return min(n, int(keep_tokens))", "return min(n, int(keep_tokens) + 1)",
      "keep_tokens budgets keep one token more", (T_FASTV, T_VIS)),
    M("topk-keeps-lowest", COMMON,
      "order = torch.argsort(scores.double(), descending=True, stable=True)",
      "order = torch.argsort(scores.double(), descending=False, stable=True)",
      "top-k keeps the LOWEST scores", (T_FASTV,)),
    M("split-budget-ties-to-later", COMMON,
      "key=lambda i: (-(exact[i] - out[i]), i))", "key=lambda i: (-(exact[i] - out[i]), -i))",
      "largest-remainder budget split breaks ties towards the later part", (T_BASE, T_VIS)),
    # ---- FastV
    M("fastv-first-head-only", FASTV,
      'self._scores = {"probs": probs.mean(1).cpu()}', 'self._scores = {"probs": probs[:, 0].cpu()}',
      "FastV scores by the first head instead of the head mean", (T_FASTV,)),
    M("fastv-all-counts-padding", FASTV,
      "sel[b, s.first_real : s.last_real + 1] = True", "sel[b, : s.last_real + 1] = True",
      "FastV scores='all' averages over the left padding's rows too", (T_FASTV,)),
    # ---- PLPHP
    M("plphp-gqa-grouping", PLPHP,
      "head = probs[b].view(Hkv, G, -1).mean(1)[:, img]", "head = probs[b].view(G, Hkv, -1).mean(0)[:, img]",
      "PLPHP averages the wrong query heads per KV head (GQA grouping)", (T_PLPHP,)),
    M("plphp-share-mean", PLPHP,
      "share = float(probs[b, :, img].sum(-1).mean())", "share = float(probs[b, :, img].mean(-1).mean())",
      "PLPHP's layer share is the MEAN attention per image token instead of the total", (T_PLPHP,)),
    # ---- VisionZip
    M("visionzip-dominant-floor", VZIP,
      "n_dom = min(k, int(round(k * dominant_share)))", "n_dom = min(k, int(k * dominant_share))",
      "VisionZip's dominant count floors instead of rounding", (T_VIS,)),
    M("visionzip-merge-drops-target", VZIP,
      "h[t] = (hidden[t].double() + hidden[members].double().mean(0)).to(hidden.dtype)",
      "h[t] = hidden[members].double().mean(0).to(hidden.dtype)",
      "VisionZip's contextual token forgets the target itself (mean of members only)", (T_VIS,)),
    M("visionzip-key-norm-dim", VZIP,
      "metric = torch.nn.functional.normalize(keys[rest_idx].double(), dim=-1)",
      "metric = torch.nn.functional.normalize(keys[rest_idx].double(), dim=0)",
      "VisionZip normalises the keys over tokens instead of over features", (T_VIS,)),
    # ---- HiPrune and the vision scores
    M("hiprune-buffer-off-by-one", HIP,
      "for j in (a, a - 1, a + 1, a - width, a + width):", "for j in (a, a - 1, a + 1, a - width, a + width + 1):",
      "HiPrune's lower buffer is the anchor's diagonal neighbour", (T_VIS,)),
    M("hiprune-object-layer-unscaled", HIP,
      "return min(depth - 1, max(0, round(layer * depth / of) - 1))",
      "return min(depth - 1, max(0, round(layer * depth / of)))",
      "HiPrune's default object layer off by one (1-based index used as 0-based)", (T_VIS,)),
    M("vision-scores-cls-column", VSCORES,
      "                    s = s[1:]", "                    s = s[:-1]",
      "vision scores drop the last patch instead of the CLS column", (T_VIS,)),
    M("vision-scores-cls-row", VSCORES,
      "sel[:, 0] = True", "sel[:, 1] = True",
      "CLS scores read the first patch's attention row instead of the CLS token's", (T_VIS,)),
    # ---- FlowCut, cluster, random, pool
    M("flowcut-entropy-linear", FLOW,
      "(1.0 - ent * ent)", "(1.0 - ent)",
      "FlowCut's adaptive prune count uses 1 - H instead of 1 - H^2", (T_FLOW,)),
    M("flowcut-decay-default", FLOW,
      "decay: float = 0.5", "decay: float = 0.6",
      "FlowCut's default cumulative decay 0.5 -> 0.6 (paper: 0.5)", (T_FLOW, T_FID)),
    M("cluster-init-nearest", CLUSTER,
      "i = int(torch.argmin(best))", "i = int(torch.argmax(best))",
      "cluster's farthest-point initialisation picks the NEAREST row", (T_CLUSTER,)),
    M("cluster-sum-not-mean", CLUSTER,
      "means = means[used] / counts[used, None]", "means = means[used]",
      "cluster's merged token is the sum of its members, not their mean", (T_CLUSTER,)),
    M("random-one-seed-per-prompt", RANDOM,
      "image_seed(self.seed, self._place[id(image)])", "image_seed(self.seed, 0)",
      "random draws every image of a prompt with the same seed", (T_BASE,)),
    M("pool-centre-off-by-one", POOL,
      "centre.append(edges[i] + (edges[i + 1] - edges[i] - 1) // 2)",
      "centre.append(edges[i] + (edges[i + 1] - edges[i]) // 2)",
      "pool places an even cell's token at the lower right of its central four", (T_BASE,)),
    # ---- the adapters' vision geometry (the references take theirs from the config: tests/geometry.py)
    M("llava-feature-layer-shift", A_LLAVA,
      "feature_layer=vfl % (n + 1) - 1, num_layers=n)", "feature_layer=vfl % (n + 1) - 2, num_layers=n)",
      "LLaVA's vision methods score the layer before the one the projector reads (the audit's surviving shift)",
      (T_VIS,)),
    M("internvl-feature-layer-shift", A_INTERNVL,
      "feature_layer=vfl % (n + 1) - 1, num_layers=n)", "feature_layer=vfl % (n + 1) - 2, num_layers=n)",
      "InternVL's vision methods score the layer before the one the projector reads", (T_VIS,)),
    M("qwen25-windows-ignored", A_QWEN,
      'windowed = self.config.model_type == "qwen2_5_vl"', "windowed = False",
      "Qwen2.5-VL's window-ordered patches are read as if in token order", (T_VIS,)),
    # ---- backend
    M("probe-softmax-dim", KERNELS,
      "p = torch.softmax(scores, dim=-1).nan_to_num(0.0)", "p = torch.softmax(scores, dim=-2).nan_to_num(0.0)",
      "probes normalise over query rows instead of keys (wrong softmax dim)", (T_FASTV, T_RECORD)),
    M("probe-batch-count", KERNELS,
      "out = out / counts.clamp(min=1)[:, None, None]", "out = out / counts.clamp(min=1).max()",
      "probes divide every sample by the batch's largest row count (padding changes the mean)", (T_FASTV, T_RECORD)),
    M("drop-compact-positions", DROP,
      'compat.write(kwargs, "position_embeddings", tuple(_gather_seq(t, keep, 1) for t in pe))',
      'compat.write(kwargs, "position_embeddings", tuple(t[:, : keep.shape[1]] for t in pe))',
      "kept tokens get compact positions 0..L'-1 instead of their own (RoPE)", (T_FASTV, T_VIS)),
    M("drop-dead-from-real-tokens", DROP,
      "cand = cand[torch.argsort((~pad[b, cand]).to(torch.int8), stable=True)]",
      "cand = cand[torch.argsort((pad[b, cand]).to(torch.int8), stable=True)]",
      "ragged batches fill dead slots with dropped real tokens before padding", (T_FASTV, T_BASE),
      equivalent="a dead slot is hidden from every other token (and its own row is never read), so which dropped "
                 "position fills it changes no output bit; padding first is a convention"),
    M("drop-dead-keys-visible", DROP,
      "m = m & ~dead_kv[:, None, None, :].to(m.device)", "m = m",
      "ragged batches leave dead slots visible as keys (a sample sees another sample's filler)", (T_FASTV, T_BASE)),
    M("kvprune-gqa-mask", KV,
      "kv = kv.repeat_interleave(G, dim=1)  # [B, Hq, S]", "kv = kv.repeat(1, G, 1)  # [B, Hq, S]",
      "pruned KV layers give query head h the mask of the wrong KV head (PLPHP alone cannot show it: every KV head "
      "keeps all text, padding included, and as many image tokens, so padding sits at the same slots in every head; "
      "a backend test with arbitrary per-head keep sets does)",
      ("tests/test_backend_edits.py::test_kv_prune_matches_masked_eager", T_PLPHP)),
    M("kvprune-one-index-for-all-heads", KV,
      "        idx = keep.to(layer.keys.device)\n",
      "        idx = keep[:, :1].expand_as(keep).to(layer.keys.device)\n",
      "KV pruning gathers every KV head with the first head's kept positions", (T_PLPHP,)),
    M("sliding-mask-head", ATTN,
      "attention_mask = attention_mask[..., -key.shape[2]:]", "attention_mask = attention_mask[..., : key.shape[2]]",
      "after token dropping, a sliding cache's mask keeps its first columns instead of its last", (T_PRE, T_FASTV)),
]


# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Result:
    name: str
    file: str
    desc: str
    tests: list[str]
    status: str  # killed | survived | timeout | error
    seconds: float
    returncode: int | None
    killed_by: str = ""
    summary: str = ""
    equivalent: str = ""
    output_tail: list[str] = field(default_factory=list)


def make_copy(dest: Path) -> Path:
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(*IGNORE), symlinks=True)
    (dest / f"{GUARD}.py").write_text(GUARD_SRC)
    return dest


def apply_once(text: str, m: Mutation) -> str:
    n = text.count(m.old)
    if n != 1:
        raise Abort(f"mutation {m.name!r}: the snippet occurs {n} times in {m.file} (expected exactly once); "
                         f"the code drifted: update the mutation.\n--- snippet ---\n{m.old}")
    return text.replace(m.old, m.new)


def check_all(mutations: list[Mutation], root: Path = ROOT) -> None:
    names = [m.name for m in mutations]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise Abort(f"duplicate mutation names: {dup}")
    for m in mutations:
        src = (root / m.file).read_text()
        new = apply_once(src, m)
        if new == src:
            raise Abort(f"mutation {m.name!r} changes nothing")
        try:
            compile(new, m.file, "exec")  # a mutation that does not compile would be 'killed' by a SyntaxError
        except SyntaxError as e:
            raise Abort(f"mutation {m.name!r} does not compile: {e}") from None
        for t in m.tests:
            if not (root / t.split("::")[0]).exists():
                raise Abort(f"mutation {m.name!r}: test file {t} does not exist")


def _env(copy: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["VLMPLUG_MUTATION_ROOT"] = str(copy)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a restored file must never be shadowed by its mutant's .pyc
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def verify_import(py: str, copy: Path) -> None:
    code = "import os, vlmplug; print(os.path.realpath(vlmplug.__file__))"
    out = subprocess.run([py, "-c", code], cwd=copy, env=_env(copy), capture_output=True, text=True)
    got = out.stdout.strip()
    if out.returncode != 0 or not got.startswith(os.path.realpath(copy) + os.sep):
        raise Abort(f"the copy {copy} imports vlmplug from {got or out.stderr!r}, not from itself")


def run_pytest(py: str, copy: Path, tests: list[str], timeout: float) -> tuple[int | None, str, float]:
    cmd = [py, "-m", "pytest", *tests, "-x", "-p", "no:cacheprovider", "-p", GUARD]  # -q: the project's addopts
    t0 = time.monotonic()
    try:
        out = subprocess.run(cmd, cwd=copy, env=_env(copy), capture_output=True, text=True, timeout=timeout)
        rc, text = out.returncode, out.stdout + out.stderr
    except subprocess.TimeoutExpired as e:
        rc = None
        text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    if rc == GUARD_RC:
        raise Abort(f"mutation guard stopped the run:\n{text[-2000:]}")
    return rc, text, time.monotonic() - t0


def _killed_by(text: str) -> str:
    m = re.search(r"^(?:FAILED|ERROR) (\S+)", text, re.M)
    if m:
        return m.group(1)
    m = re.search(r"^E\s+(.+)$", text, re.M)
    return m.group(1)[:120] if m else ""


def _summary(text: str) -> str:
    """pytest's closing line ("3 passed, 1 skipped in 9.1s"), else the last line."""
    found = re.findall(r"^=*\s*(\d+ (?:passed|failed|errors?|skipped|deselected)\b.*?)\s*=*$", text, re.M)
    if found:
        return found[-1]
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return lines[-1].strip("= ") if lines else ""


def run_one(py: str, copy: Path, m: Mutation, tests: list[str], timeout: float) -> Result:
    path = copy / m.file
    orig = path.read_text()
    mutated = apply_once(orig, m)
    try:
        path.write_text(mutated)
        rc, text, secs = run_pytest(py, copy, tests, timeout)
    finally:
        path.write_text(orig)
    if rc is None:
        status = "timeout"
    elif rc == 0:
        status = "survived"
    elif rc == 5:  # no tests collected: a wrong target, not a kill
        status = "error"
    else:
        status = "killed"
    return Result(m.name, m.file, m.desc, tests, status, round(secs, 1), rc,
                  killed_by=_killed_by(text) if status == "killed" else "", summary=_summary(text),
                  equivalent=m.equivalent, output_tail=text.strip().splitlines()[-15:] if status != "killed" else [])


def table(results: list[Result]) -> str:
    w = max(len(r.name) for r in results)
    rows = [f"{'mutation':<{w}}  {'status':<8}  {'secs':>6}  killed by / description", "-" * (w + 80)]
    for r in results:
        status = r.status + ("*" if r.status == "survived" and r.equivalent else "")
        what = r.killed_by if r.status == "killed" else r.desc
        rows.append(f"{r.name:<{w}}  {status:<8}  {r.seconds:>6.1f}  {what}")
    killed = sum(r.status in ("killed", "timeout") for r in results)
    rows.append("-" * (w + 80))
    rows.append(f"{killed}/{len(results)} killed" + (
        "; * = known equivalent" if any(r.equivalent for r in results) else ""))
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="run the whole suite for every mutation (default: its targets)")
    ap.add_argument("--only", default="", help="comma-separated mutation names")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--check", action="store_true", help="check every snippet applies exactly once, and exit")
    ap.add_argument("--tests", default="", help="comma-separated test files / node ids replacing every mutation's targets")
    ap.add_argument("--jobs", type=int, default=1, help="parallel workers (one copy each)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated baseline run")
    ap.add_argument("--json", default=str(DEFAULT_JSON), help=f"where to write the results (default {DEFAULT_JSON})")
    ap.add_argument("--python", default=str(DEFAULT_PY) if DEFAULT_PY.exists() else sys.executable)
    ap.add_argument("--keep", action="store_true", help="keep the temporary copies (their paths are printed)")
    args = ap.parse_args(argv)

    muts = MUTATIONS
    if args.only:
        want = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(want) - {m.name for m in MUTATIONS})
        if unknown:
            ap.error(f"unknown mutations {unknown}; --list shows them")
        muts = [m for m in MUTATIONS if m.name in want]
    if args.list:
        for m in muts:
            print(f"{m.name:<34} {m.file:<42} {m.desc}")
        return 0
    check_all(muts)  # before any copy: every snippet applies exactly once to the working tree
    if args.check:
        print(f"{len(muts)} mutations apply exactly once and compile")
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="vlmplug-mutation-"))
    jobs = max(1, min(args.jobs, len(muts)))
    t_start = time.monotonic()
    try:
        copies = [make_copy(tmp / f"w{i}") for i in range(jobs)]
        for c in copies:
            verify_import(args.python, c)
        print(f"copies of {ROOT} in {tmp} ({jobs} worker{'s' if jobs > 1 else ''}); python {args.python}", flush=True)
        override = ["tests"] if args.full else [t.strip() for t in args.tests.split(",") if t.strip()]
        targets = {m.name: override or list(m.tests) for m in muts}
        baseline = None
        if not args.no_baseline:
            union = list(dict.fromkeys(t for m in muts for t in targets[m.name]))
            rc, text, secs = run_pytest(args.python, copies[0], union, args.timeout * 4)
            baseline = {"tests": union, "returncode": rc, "seconds": round(secs, 1), "summary": _summary(text)}
            print(f"baseline (unmutated): {baseline['summary']} in {secs:.0f}s", flush=True)
            if rc != 0:
                print(text[-4000:])
                print("the unmutated suite fails: fix it before mutation testing", file=sys.stderr)
                return 2
        results: dict[str, Result] = {}
        free = list(copies)

        def work(m: Mutation) -> Result:
            copy = free.pop()
            try:
                return run_one(args.python, copy, m, targets[m.name], args.timeout)
            finally:
                free.append(copy)

        with cf.ThreadPoolExecutor(jobs) as ex:
            futs = {ex.submit(work, m): m for m in muts}
            try:
                for f in cf.as_completed(futs):
                    r = f.result()
                    results[r.name] = r
                    print(f"  {r.name:<34} {r.status:<8} {r.seconds:6.1f}s  {r.killed_by or r.summary}", flush=True)
            except BaseException:  # an abort (drift, guard) or ^C: run nothing more
                ex.shutdown(wait=True, cancel_futures=True)
                raise
        ordered = [results[m.name] for m in muts]
        total = time.monotonic() - t_start
        print()
        print(table(ordered))
        print(f"total {total:.0f}s")
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "mode": "full" if args.full else ("given tests" if args.tests else "targeted"), "seconds": round(total, 1),
            "baseline": baseline,
            "killed": sum(r.status in ("killed", "timeout") for r in ordered), "total": len(ordered),
            "mutations": [asdict(r) for r in ordered]}, indent=2))
        print(f"results: {out}")
        bad = [r for r in ordered if r.status == "error" or (r.status == "survived" and not r.equivalent)]
        return 1 if bad else 0
    finally:
        if args.keep:
            print(f"copies kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
