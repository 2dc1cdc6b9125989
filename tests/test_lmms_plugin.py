"""The lmms-eval model plugin (`vlmplug.evaluation.lmms_plugin`): entry point, lmms-eval's registry, answers equal to
`vlmplug.pipeline.generate_info`, argument errors before loading, and one real lmms-eval task run end to end on
world images from a local JSON dataset (offline).

lmms-eval is an optional extra (`pip install 'vlmplug[lmms]'`): without it the tests that need it skip, saying why.
"""
import json
import os
import subprocess
import sys
import textwrap
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read when `datasets` is imported (by lmms-eval's tasks)

import pytest  # noqa: E402

from vlmplug.errors import MethodConfigError  # noqa: E402

TASK = "vlmplug_world_yesno"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


# ---------------------------------------------------------------------------------------------- no lmms-eval needed


def test_import_vlmplug_does_not_import_lmms_eval():
    r = _run("""
        import sys
        import vlmplug, vlmplug.evaluation
        vlmplug.evaluation.benchmarks()
        vlmplug.available_methods()
        bad = sorted(m for m in sys.modules if m == "lmms_eval" or m.startswith(("lmms_eval.", "vlmplug.evaluation.lmms")))
        print(bad)
        assert not bad, bad
    """)
    assert r.returncode == 0, r.stdout + r.stderr


def test_plugin_without_lmms_eval_says_how_to_install():
    r = _run("""
        import sys
        sys.modules["lmms_eval"] = None  # as if lmms-eval were not installed
        try:
            import vlmplug.evaluation.lmms_plugin
        except ImportError as e:
            print("ERR", e)
        else:
            raise SystemExit("imported without lmms-eval")
    """)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ERR" in r.stdout and "vlmplug[lmms]" in r.stdout


# ---------------------------------------------------------------------------------------------- with lmms-eval


@pytest.fixture(scope="module")
def plugin():
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (optional extra: pip install 'vlmplug[lmms]')")
    try:
        import lmms_eval.api.model  # noqa: F401
        import lmms_eval.models  # noqa: F401

        from vlmplug.evaluation import lmms_plugin
    except ImportError as e:  # installed, but a dependency its import path needs is missing
        pytest.skip(f"lmms-eval is installed but not importable: {type(e).__name__}: {e}")
    return lmms_plugin


@pytest.fixture(scope="module")
def docs():
    from vlmplug.world import heldout_scenes

    out = []
    for s in heldout_scenes(4, seed=31, kinds=("color", "exists")):
        for q in s.questions:
            out.append({"image": s.image, "question": q.text, "answer": q.answer})
    return out[:5]


@pytest.fixture(scope="module")
def fastv_model(plugin):
    return plugin.VlmplugLMMS.create_from_arg_string("pretrained=world,methods=fastv,keep_ratio=0.5")


@pytest.fixture(scope="module")
def plain_model(plugin):
    return plugin.VlmplugLMMS.create_from_arg_string("pretrained=world,methods=none", {"batch_size": 1, "device": "cpu"})


def _requests(model, docs, gen_kwargs, order=None, kind="generate_until", second=None):
    """lmms-eval Instances as a simple task makes them, over a stub task dict holding `docs`."""
    from lmms_eval.api.instance import Instance

    model.task_dict = {"stub": {"test": docs}}
    order = range(len(docs)) if order is None else order
    visual = lambda doc: [doc["image"]]  # noqa: E731
    return [Instance(request_type=kind,
                     arguments=(docs[i]["question"], dict(gen_kwargs) if second is None else second(docs[i]),
                                visual, i, "stub", "test"),
                     idx=0, metadata={"task": "stub", "doc_id": i, "repeats": 1})
            for i in order]


def _direct(model, doc, methods=None, params=None, max_new_tokens=8):
    from vlmplug.pipeline import generate_info

    return generate_info(model.model, model.processor, [doc["image"]], doc["question"], methods=methods,
                         method_params=params, max_new_tokens=max_new_tokens)["text"]


def test_entry_point_resolves_to_the_model_class(plugin):
    from importlib.metadata import entry_points

    eps = {ep.name: ep for ep in entry_points(group="lmms_eval.models")}
    assert "vlmplug" in eps, ("no 'vlmplug' entry point in group lmms_eval.models: refresh the editable install "
                              "(pip install --no-deps -e .)")
    assert eps["vlmplug"].value == "vlmplug.evaluation.lmms_plugin:manifest"
    manifest = eps["vlmplug"].load()()
    assert (manifest.model_id, manifest.simple_class_path) == ("vlmplug", "vlmplug.evaluation.lmms_plugin.VlmplugLMMS")

    from lmms_eval.models import MODEL_REGISTRY_V2, get_model
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    assert get_model("vlmplug") is plugin.VlmplugLMMS
    assert MODEL_REGISTRY_V2.resolve("vlmplug").model_type == "simple"
    fresh = ModelRegistryV2()  # the loading path lmms-eval runs at import, on its own
    fresh.load_entrypoint_manifests(group="lmms_eval.models", overwrite=True)
    assert fresh.get_model_class("vlmplug") is plugin.VlmplugLMMS


def test_generate_until_equals_generate_info_under_fastv(fastv_model, docs):
    m = fastv_model
    order = list(reversed(range(len(docs))))  # answers come back in request order, not doc order
    got = m.generate_until(_requests(m, docs, {"until": ["\n\n"], "max_new_tokens": 8}, order))
    want = [_direct(m, docs[i], "fastv", {"keep_ratio": 0.5}) for i in order]
    assert got == want
    assert all(isinstance(t, str) and t for t in got)
    rec = m.records[-1]
    assert rec["image_tokens_kept"] == rec["image_tokens"] // 2  # the method acted


def test_methods_none_equals_the_plain_model(plain_model, docs):
    m = plain_model
    assert m.methods is None and m.method_label == "none"
    got = m.generate_until(_requests(m, docs, {"until": ["\n\n"], "max_new_tokens": 8}))
    assert got == [_direct(m, d) for d in docs]
    assert m.records[-1]["image_tokens_kept"] is None
    assert "_vlmplug_handle" not in vars(m.model)


def test_composed_methods_equal_generate_info(plugin, docs):
    import vlmplug

    m = plugin.VlmplugLMMS.create_from_arg_string("pretrained=world,methods=fastv+pai,keep_ratio=0.5,pai.alpha=0.3")
    assert [s.name for s in m.specs] == ["fastv", "pai"]
    assert m.specs[0].params == {"keep_ratio": 0.5} and m.specs[1].params == {"alpha": 0.3}
    got = m.generate_until(_requests(m, docs[:2], {"max_new_tokens": 6}))
    want = [_direct(m, d, [vlmplug.FastV(keep_ratio=0.5), vlmplug.PAI(alpha=0.3)], max_new_tokens=6) for d in docs[:2]]
    assert got == want


def test_until_truncates_and_sampling_warns(plain_model, docs):
    m = plain_model
    doc = docs[0]
    full = _direct(m, doc)
    assert len(full) >= 3
    stop = full[1:3]
    got = m.generate_until(_requests(m, [doc], {"until": ["@@never@@", stop], "max_new_tokens": 8}))
    assert got == [full[: full.find(stop)]]
    m._warned.clear()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = m.generate_until(_requests(m, [doc], {"temperature": 0.7, "do_sample": True, "max_new_tokens": 8}))
    assert got == [full]  # greedy, as vlmplug eval answers
    assert any("greedily" in str(x.message) for x in w)


def test_loglikelihood(plain_model, fastv_model, docs):
    import torch

    from vlmplug.pipeline import prepare_inputs

    m, doc = plain_model, docs[0]
    answer = _direct(m, doc)
    wrong = "purple" if answer != "purple" else "green"
    cont = {"a": answer, "w": wrong}
    reqs = _requests(m, [doc, doc], {}, kind="loglikelihood")
    reqs[0].arguments = (doc["question"], answer, *reqs[0].arguments[2:])
    reqs[1].arguments = (doc["question"], lambda d: wrong, *reqs[1].arguments[2:])  # doc_to_target as a callable
    (lp_a, greedy_a), (lp_w, greedy_w) = m.loglikelihood(reqs)
    assert greedy_a is True and greedy_w is False
    assert lp_w < lp_a <= 0.0
    # plain model: the forced-generation score is the one-forward teacher-forced log-probability
    tok = m.tokenizer
    for text, lp in ((cont["a"], lp_a), (cont["w"], lp_w)):
        inputs = prepare_inputs(m.model, m.processor, [doc["image"]], doc["question"])
        ids = tok(text, add_special_tokens=False)["input_ids"]
        n = inputs["input_ids"].shape[1]
        inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([ids])], 1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        with torch.no_grad():
            logits = m.model(**inputs).logits[0].float()
        ref = sum(float(torch.log_softmax(logits[n - 1 + i], -1)[t]) for i, t in enumerate(ids))
        assert lp == pytest.approx(ref, abs=1e-3)
    # under a method, the answer it gives is its greedy continuation too
    fa = _direct(fastv_model, doc, "fastv", {"keep_ratio": 0.5})
    req = _requests(fastv_model, [doc], {}, kind="loglikelihood")[0]
    req.arguments = (doc["question"], fa, *req.arguments[2:])
    ((lp, greedy),) = fastv_model.loglikelihood([req])
    assert greedy is True and lp <= 0.0


def test_multi_round_is_not_supported(plain_model):
    with pytest.raises(NotImplementedError, match="single-turn"):
        plain_model.generate_until_multi_round([])


@pytest.mark.parametrize("args, match", [
    ("pretrained=world,methods=fastvv", "unknown method 'fastvv'"),
    ("pretrained=world,methods=fastv,keep_ratioo=0.5", "unknown parameter"),
    ("pretrained=world,methods=fastv,keep_ratio=2.0", "keep_ratio"),
    ("pretrained=world,keep_ratio=0.5", "takes no method parameters"),
    ("pretrained=world,methods=fastv+none", "cannot be combined"),
    ("pretrained=world,methods=fastv+fastv", "twice"),
    ("pretrained=world,methods=fastv+pool,keep_ratio=0.5", "method.param"),
    ("pretrained=world,methods=fastv,pai.alpha=0.2", "not in methods"),
    ("pretrained=world,methods=tag", "grounding method"),
    ("pretrained=world,methods=vicrop+carve", "one refinement pipeline"),
])
def test_bad_arguments_fail_before_loading(plugin, monkeypatch, args, match):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("vlmplug.loading.load", no_load)
    with pytest.raises(MethodConfigError, match=match):
        plugin.VlmplugLMMS.create_from_arg_string(args)


@pytest.mark.parametrize("args, match", [
    ("pretrained=world,dtype=float33", "not a torch dtype"),
    ("pretrained=world,max_new_tokens=0", "positive integer"),
])
def test_bad_wrapper_arguments_fail_before_loading(plugin, monkeypatch, args, match):
    monkeypatch.setattr("vlmplug.loading.load", lambda *a, **k: pytest.fail("loaded before checking the arguments"))
    with pytest.raises(ValueError, match=match):
        plugin.VlmplugLMMS.create_from_arg_string(args)


def test_model_args_parsing(plugin):
    args = plugin.parse_model_args("pretrained=world,methods=fastv+pai,fastv.keep_ratio=0.25,layers=[2, 3],"
                                   "dtype=float32,name='a,b'")
    assert args == {"pretrained": "world", "methods": "fastv+pai", "fastv.keep_ratio": 0.25, "layers": [2, 3],
                    "dtype": "float32", "name": "a,b"}
    specs = plugin.resolve_methods("fastv+pai", {"fastv.keep_ratio": 0.25, "layers": [2, 3], "alpha": "0.2"})
    assert [(s.name, s.params) for s in specs] == [("fastv", {"keep_ratio": 0.25}),
                                                  ("pai", {"layers": [2, 3], "alpha": 0.2})]


# ---------------------------------------------------------------------------------------------- a real task


def _write_task(root, docs):
    """A yes/no lmms-eval task over world images saved as PNGs, read by `datasets`' json builder (no network)."""
    rows = []
    for i, d in enumerate(docs):
        path = root / f"img{i}.png"
        d["image"].save(path)
        rows.append({"question_id": i, "image": str(path), "question": d["question"], "answer": d["answer"]})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(textwrap.dedent("""
        from PIL import Image

        def doc_to_visual(doc):
            with Image.open(doc["image"]) as im:
                return [im.convert("RGB")]

        def doc_to_text(doc, lmms_eval_specific_kwargs=None):
            return doc["question"]

        def process_results(doc, results):
            return {"accuracy": float(results[0].strip().lower() == doc["answer"])}
    """))
    (tasks / f"{TASK}.yaml").write_text(textwrap.dedent(f"""
        task: {TASK}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {root / "data.jsonl"}
          cache_dir: {root / "hf_datasets"}
        test_split: test
        output_type: generate_until
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: 8
          until: ["\\n\\n"]
          do_sample: false
        process_results: !function utils.process_results
        metric_list:
          - metric: accuracy
            aggregation: mean
            higher_is_better: true
        metadata:
          version: 0.0
    """))
    return tasks, rows


def test_simple_evaluate_runs_a_local_task(plugin, plain_model, tmp_path, monkeypatch):
    from vlmplug.world import heldout_scenes

    try:
        from lmms_eval import evaluator
        from lmms_eval.tasks import TaskManager
    except ImportError as e:
        pytest.skip(f"lmms-eval's evaluator is not importable: {type(e).__name__}: {e}")
    try:
        import filelock._api  # noqa: F401
    except ImportError:
        # lmms-eval 0.7.3's simple_evaluate patches filelock._api (filelock 3.x) against lock contention between
        # ranks; filelock 4 has no such module. The patch concerns multi-process runs, not the plugin: skip it.
        monkeypatch.setattr(evaluator._enable_reentrant_filelocks, "_patched", True, raising=False)
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "lmms_datasets"))
    docs = [{"image": s.image, "question": s.questions[0].text, "answer": s.questions[0].answer}
            for s in heldout_scenes(4, seed=41, kinds=("exists",))]
    tasks, rows = _write_task(tmp_path, docs)
    import random

    import numpy as np
    import torch

    rng = random.getstate(), np.random.get_state(), torch.get_rng_state()  # simple_evaluate seeds all three
    try:
        out = evaluator.simple_evaluate(
            model="vlmplug", model_args="pretrained=world,methods=fastv,keep_ratio=0.5", tasks=[TASK],
            task_manager=TaskManager(include_path=str(tasks), include_defaults=False), batch_size=1, device="cpu",
            log_samples=True, bootstrap_iters=0)
    finally:
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    got = [s["resps"][0][0] if isinstance(s["resps"][0], list) else s["resps"][0] for s in samples]
    want = [_direct(plain_model, d, "fastv", {"keep_ratio": 0.5}) for d in docs]
    assert got == want
    acc = sum(w.strip().lower() == r["answer"] for w, r in zip(want, rows)) / len(rows)
    assert out["results"][TASK]["accuracy,none"] == pytest.approx(acc)
    assert "VlmplugLMMS" in out["config"]["model_backend"]
