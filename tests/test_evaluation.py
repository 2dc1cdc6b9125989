"""`vlmplug eval`: the readers on files in each benchmark's release layout, the runner's answers against direct calls
(and, for V*'s option likelihoods, against a teacher-forced forward), scores against hand-computed values, resumable
caches, outputs, the CLI's errors, and a two-process accelerate run against the single-process one."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from vlmplug import cli
from vlmplug.evaluation import benchmarks
from vlmplug.evaluation.base import BenchmarkFilesError, parse_point
from vlmplug.evaluation.chair import CHAIR
from vlmplug.evaluation.mme import MME
from vlmplug.evaluation.pope import POPE, write_world_pope
from vlmplug.evaluation.runner import MethodSpec, markdown_table, run, write_outputs
from vlmplug.evaluation.screenspot import ScreenSpot
from vlmplug.evaluation.textvqa import TextVQA
from vlmplug.evaluation.vstar import VStar
from vlmplug.evaluation.world import WorldGrounding, write_world_grounding, write_world_vqa
from vlmplug.world.scenes import heldout_scenes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world():
    from vlmplug.world import load_world

    return load_world()


def scene_images(tmp: Path, n: int, seed: int = 7, **kw):
    """n held-out scenes saved as PNGs under tmp; returns (scenes, paths)."""
    scenes = heldout_scenes(n, seed=seed, **kw)
    paths = []
    for i, sc in enumerate(scenes):
        p = tmp / f"scene{i}.png"
        sc.image.save(p)
        paths.append(p)
    return scenes, paths


class FakeGenerate:
    """Stands in for vlmplug.pipeline.generate_info: fixed answers per prompt, counted calls."""

    def __init__(self, answers):
        self.answers, self.calls = answers, []

    def __call__(self, model, processor, images, prompt, methods=None, method_params=None, **kw):
        self.calls.append((prompt, methods, method_params))
        return {"text": self.answers(prompt) if callable(self.answers) else self.answers[prompt], "seconds": 0.01,
                "prompt_tokens": 10, "image_tokens": 4, "stats": None}


# ------------------------------------------------------------------------------------------ readers


def test_world_pope_negatives_follow_popes_three_samplings(tmp_path):
    write_world_pope(tmp_path, n=12, seed=5)
    scenes = heldout_scenes(12, seed=5, n_objects=(1, 4), kinds=())
    present = [{(o.color, o.shape) for o in sc.objects} for sc in scenes]
    freq = Counter(obj for objs in present for obj in objs)
    for split in ("random", "popular", "adversarial"):
        items = POPE().read(tmp_path, split)
        assert len(items) == 24 and [it["label"] for it in items] == ["yes", "no"] * 12
        for k, sc in enumerate(scenes):
            yes, no = items[2 * k], items[2 * k + 1]
            assert yes["images"] == no["images"] == [tmp_path / "images" / f"world_5_{k:05d}.png"]
            name = lambda it: tuple(it["text"][len("Is there a "):-1].lstrip("n ").split(" "))  # noqa: E731
            assert name(yes) in present[k] and name(no) not in present[k]
            if split == "popular":  # the most frequent object over the whole set that this scene lacks
                assert freq[name(no)] == max(freq[o] for o in freq if o not in present[k]) or \
                    all(o in present[k] for o in freq)


def test_pope_reader_says_which_file_is_missing(tmp_path):
    with pytest.raises(BenchmarkFilesError, match="pope_random.jsonl"):
        POPE().read(tmp_path, "random")
    (tmp_path / "pope_random.jsonl").write_text('{"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", '
                                                '"label": "no"}\n')
    with pytest.raises(BenchmarkFilesError, match="a.jpg"):
        POPE().read(tmp_path, "random")
    (tmp_path / "pope_random.jsonl").write_text('{"question_id": 1, "image": "a.jpg"}\n')
    with pytest.raises(BenchmarkFilesError, match=r"lacks \['text', 'label'\]"):
        POPE().read(tmp_path, "random")


def make_mme(root: Path, tmp: Path):
    """MME's two layouts: `existence/NAME.png + NAME.txt` and `artwork/images/NAME.jpg +
    artwork/questions_answers_YES_or_NO/NAME.txt`."""
    scenes, paths = scene_images(tmp, 2, seed=11, n_objects=(1, 2))
    (root / "existence").mkdir(parents=True)
    (root / "artwork" / "images").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YES_or_NO").mkdir(parents=True)
    o0, o1 = scenes[0].objects[0], scenes[1].objects[0]
    scenes[0].image.save(root / "existence" / "000.png")
    (root / "existence" / "000.txt").write_text(
        f"Is there a {o0.color} {o0.shape}?\tYes\n"
        f"Is there a {o0.color} {'star' if o0.shape != 'star' else 'circle'}?\tNo\n")
    scenes[1].image.convert("RGB").save(root / "artwork" / "images" / "10002.jpg", quality=100)
    (root / "artwork" / "questions_answers_YES_or_NO" / "10002.txt").write_text(
        f"Is there a {o1.color} {o1.shape}?\tYes\n"
        f"Is there a {o1.color} {o1.shape}?\tNo\n")  # one of the two cannot be right
    return scenes


def test_mme_reader_reads_both_layouts(tmp_path):
    make_mme(tmp_path / "MME", tmp_path)
    items = MME().read(tmp_path / "MME", "all")
    assert [(it["category"], it["image_name"], it["answer"]) for it in items] == [
        ("artwork", "10002.jpg", "Yes"), ("artwork", "10002.jpg", "No"),
        ("existence", "000.png", "Yes"), ("existence", "000.png", "No")]
    assert items[0]["images"] == [tmp_path / "MME" / "artwork" / "images" / "10002.jpg"]
    (tmp_path / "MME" / "existence" / "000.txt").write_text("a question without an answer\n")
    with pytest.raises(BenchmarkFilesError, match="000.txt line 1"):
        MME().read(tmp_path / "MME", "all")
    (tmp_path / "MME" / "existence" / "000.png").unlink()
    with pytest.raises(BenchmarkFilesError, match="000.jpg / .png"):
        MME().read(tmp_path / "MME", "all")
    with pytest.raises(BenchmarkFilesError, match="release folder"):
        MME().read(tmp_path / "nothing", "all")


def test_textvqa_reader(tmp_path):
    scenes, _ = scene_images(tmp_path, 1)
    (tmp_path / "train_images").mkdir()
    scenes[0].image.convert("RGB").save(tmp_path / "train_images" / "003a8ae2ef43b901.jpg")
    doc = {"dataset_version": "0.5.1", "data": [{"question_id": 34602, "question": "what is the brand?",
                                                 "image_id": "003a8ae2ef43b901", "answers": ["nokia"] * 9 + ["Nokia"],
                                                 "image_classes": ["Mobile phone"]}]}
    with pytest.raises(BenchmarkFilesError, match="TextVQA_0.5.1_val.json"):
        TextVQA().read(tmp_path, "val")
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps(doc))
    (it,) = TextVQA().read(tmp_path, "val")
    assert it["question_id"] == 34602 and it["answers"][-1] == "Nokia"
    assert it["images"] == [tmp_path / "train_images" / "003a8ae2ef43b901.jpg"]
    assert TextVQA().score([it], [{"text": "Nokia."}]) == {"accuracy": 1.0, "n": 1}


def test_screenspot_reader_and_groups(tmp_path):
    scenes, _ = scene_images(tmp_path, 1)
    (tmp_path / "screenspot_imgs").mkdir()
    scenes[0].image.save(tmp_path / "screenspot_imgs" / "mobile_0.png")
    rows = [{"img_filename": "mobile_0.png", "bbox": [10, 20, 30, 10], "instruction": "open settings",
             "data_type": "icon", "data_source": "ios"},
            {"img_filename": "mobile_0.png", "bbox": [0, 0, 5, 5], "instruction": "go back", "data_type": "text",
             "data_source": "android"}]
    (tmp_path / "screenspot_mobile.json").write_text(json.dumps(rows))
    items = ScreenSpot().read(tmp_path, "mobile")
    assert [it["group"] for it in items] == ["mobile/icon", "mobile/text"]
    # the box is [x, y, w, h]: (40, 30) is its far corner, inside; (41, 30) is not
    r = ScreenSpot().score(items, [{"point": [40, 30]}, {"point": None}])
    assert r["accuracy"] == 0.5 and r["per_group"] == {"mobile/icon": {"accuracy": 1.0, "n": 1},
                                                       "mobile/text": {"accuracy": 0.0, "n": 1}}
    assert ScreenSpot().score(items[:1], [{"point": [41, 30]}])["accuracy"] == 0.0
    with pytest.raises(BenchmarkFilesError, match="screenspot_web.json"):
        ScreenSpot().read(tmp_path, "web")


def make_vstar(root: Path, tmp: Path):
    scenes, _ = scene_images(tmp, 2, seed=3, n_objects=1)
    for k, sc in enumerate(scenes):
        folder = root / ("direct_attributes" if k == 0 else "relative_position")
        folder.mkdir(parents=True, exist_ok=True)
        sc.image.convert("RGB").save(folder / f"sa_{k}.jpg", quality=100)
        o = sc.objects[0]
        others = [c for c in ("red", "green", "blue", "yellow") if c != o.color][:3]
        (folder / f"sa_{k}.json").write_text(json.dumps({
            "target_object": [o.shape], "bbox": [list(o.box)],
            "question": f"What color is the {o.shape}?", "options": [o.color, *others]}))
    return scenes


def test_vstar_reader(tmp_path):
    make_vstar(tmp_path / "vstar_bench", tmp_path)
    (it,) = VStar().read(tmp_path / "vstar_bench", "direct_attributes")
    assert it["question_id"] == "sa_0" and len(it["options"]) == 4
    assert VStar().score([it, it], [{"choice": 0}, {"choice": 2}]) == {"accuracy": 0.5, "n": 2}
    (tmp_path / "vstar_bench" / "relative_position" / "sa_1.json").unlink()
    with pytest.raises(BenchmarkFilesError, match="sa_1.json"):
        VStar().read(tmp_path / "vstar_bench", "relative_position")


def make_coco(root: Path, tmp: Path):
    scenes, _ = scene_images(tmp, 3, seed=9)
    (root / "annotations").mkdir(parents=True)
    (root / "val2014").mkdir()
    images = []
    for k, sc in enumerate(scenes):
        name = f"COCO_val2014_{k + 1:012d}.jpg"
        sc.image.convert("RGB").save(root / "val2014" / name)
        images.append({"id": k + 1, "file_name": name})
    cats = [{"id": 18, "name": "dog"}, {"id": 17, "name": "cat"}, {"id": 62, "name": "chair"}]
    anns = [{"id": 1, "image_id": 1, "category_id": 18}, {"id": 2, "image_id": 2, "category_id": 17}]
    (root / "annotations" / "instances_val2014.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))
    caps = [{"id": 9, "image_id": 3, "caption": "A chair by the window."}]
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps({"images": images, "annotations": caps}))


def test_chair_reader_and_score_by_hand(tmp_path, monkeypatch):
    make_coco(tmp_path / "coco", tmp_path)
    b = CHAIR(seed=0)
    items = b.read(tmp_path / "coco", "val2014")
    assert sorted(it["question_id"] for it in items) == [1, 2, 3]
    assert [it["question_id"] for it in CHAIR(seed=0).read(tmp_path / "coco", "val2014")] == \
        [it["question_id"] for it in items]  # seeded
    orders = {tuple(it["question_id"] for it in CHAIR(seed=s).read(tmp_path / "coco", "val2014")) for s in range(8)}
    assert len(orders) > 1
    captions = {1: "A dog and a cat.", 2: "A cat.", 3: "A chair and a dog."}
    answers = [{"text": captions[it["question_id"]]} for it in items]
    r = b.score(items, answers)
    # image 1: {dog}, "dog" ok, "cat" hallucinated; image 2: {cat}, ok; image 3: {chair} (from its reference
    # caption), "dog" hallucinated. CHAIR_s 2/3, CHAIR_i 2/5, recall 3/3
    assert r["CHAIR_s"] == pytest.approx(2 / 3) and r["CHAIR_i"] == pytest.approx(2 / 5) and r["recall"] == 1.0
    (tmp_path / "coco" / "annotations" / "captions_val2014.json").unlink()
    with pytest.raises(BenchmarkFilesError, match="captions_val2014.json"):
        b.read(tmp_path / "coco", "val2014")


def test_world_grounding_files_are_screenspot_files(tmp_path):
    write_world_grounding(tmp_path, n=6, seed=4)
    scenes = heldout_scenes(6, seed=4, kinds=())
    items = WorldGrounding().read(tmp_path, "world")
    expected = [(o.shape, o.box) for sc in scenes for o in sc.objects if sc.count(o.shape) == 1]
    assert [(it["text"], (it["bbox"][0], it["bbox"][1], it["bbox"][0] + it["bbox"][2],
                          it["bbox"][1] + it["bbox"][3])) for it in items] == expected
    assert ScreenSpot.file_pattern.format(split="world") == "screenspot_world.json"


def test_world_vqa_files_are_textvqa_files(tmp_path):
    write_world_vqa(tmp_path, n=5, seed=4)
    scenes = heldout_scenes(5, seed=4)
    items = TextVQA().read(tmp_path, "val")
    assert [(it["text"], it["answers"]) for it in items] == [(q.text, [q.answer] * 10) for sc in scenes
                                                            for q in sc.questions]


def test_parse_point_reads_seeclick_outputs():
    assert parse_point("(0.25,0.5)", (200, 100)) == (50.0, 50.0)
    assert parse_point("[0.1, 0.2, 0.3, 0.4]", (100, 100)) == pytest.approx((20.0, 30.0))
    assert parse_point("[10, 20, 30, 40]", (100, 100)) == (20.0, 30.0)
    assert parse_point("click at 120, 45", (200, 100)) == (120.0, 45.0)
    assert parse_point("the settings icon", (200, 100)) is None


# ------------------------------------------------------------------------------------------ runs


def test_mme_run_equals_direct_answers_and_hand_score(world, tmp_path):
    from vlmplug.pipeline import generate_info

    model, processor = world
    make_mme(tmp_path / "MME", tmp_path)
    bench = MME()
    specs = [MethodSpec.parse("none"), MethodSpec.parse("fastv:keep_ratio=0.5")]
    results, answers, items = run(bench, model, processor, tmp_path / "MME", specs, tmp_path / "out")
    items = items["all"]
    for spec in specs:
        for it, a in zip(items, answers[spec.label]["all"]):
            direct = generate_info(model, processor, it["images"], it["text"],
                                   methods=None if spec.name == "none" else spec.name,
                                   method_params=spec.params or None, max_new_tokens=bench.max_new_tokens)
            assert a["text"] == direct["text"]
    plain = [a["text"] for a in answers["none"]["all"]]
    # the world model reads these scenes right: "yes" for the present object, "no" for the absent star / circle
    assert plain == ["yes", "yes", "yes", "no"]
    # artwork: one of its two answers right (acc 50, acc+ 0); existence: both right (100 + 100)
    r = results["none"]["all"]
    assert r["subtasks"]["artwork"] == {"acc": 50.0, "acc_plus": 0.0, "score": 50.0, "n": 2}
    assert r["subtasks"]["existence"]["score"] == 200.0
    assert r["perception"] == 250.0 and r["cognition"] == 0 and r["total"] == 250.0
    assert results["fastv:keep_ratio=0.5"]["all"]["image_tokens_kept"] == 32
    assert results["none"]["all"]["image_tokens"] == 64 and results["none"]["all"]["image_tokens_kept"] is None


def test_answers_are_cached_and_resumed(tmp_path, monkeypatch):
    write_world_pope(tmp_path / "data", n=4, seed=1)
    fake = FakeGenerate(lambda prompt: "yes")
    monkeypatch.setattr("vlmplug.pipeline.generate_info", fake)
    spec = MethodSpec.parse("none")
    run(POPE(), None, None, tmp_path / "data", [spec], tmp_path / "out", splits=["random"], limit=3)
    assert len(fake.calls) == 3
    cache = tmp_path / "out" / "answers" / "none__random.jsonl"
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    rows[1]["text"] = "no"  # a cached answer is read back, not recomputed
    cache.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results, answers, _ = run(POPE(), None, None, tmp_path / "data", [spec], tmp_path / "out", splits=["random"])
    assert len(fake.calls) == 3 + 5
    assert [a["text"] for a in answers["none"]["random"]] == ["yes", "no"] + ["yes"] * 6
    # labels yes, no, yes, no, ...: answers yes, no, yes x 6 -> TP 4, FP 3, TN 1, FN 0
    r = results["none"]["random"]
    assert (r["accuracy"], r["precision"], r["recall"]) == (5 / 8, 4 / 7, 1.0)


def test_outputs_and_exports(tmp_path, monkeypatch):
    make_mme(tmp_path / "MME", tmp_path)
    monkeypatch.setattr("vlmplug.pipeline.generate_info", FakeGenerate(lambda p: "Yes, it is."))
    bench = MME()
    specs = [MethodSpec.parse("none")]
    results, answers, items = run(bench, None, None, tmp_path / "MME", specs, tmp_path / "out")
    paths = write_outputs(results, tmp_path / "out", "mme", {"model": "fake"}, bench, items, answers)
    doc = json.loads(paths["json"].read_text())
    # "Yes" to everything: in each subtask one image, golds Yes / No: acc 50, acc+ 0, score 50; total 100
    assert doc["meta"] == {"model": "fake"} and doc["results"]["none"]["all"]["total"] == 100.0
    table = paths["table"].read_text()
    assert "| none | all | 100.0 | 0.0 | 100.0 | 10.0 | 4 |" in table
    assert paths["plot"].stat().st_size > 1000
    from vlmplug.metrics.mme import parse_line

    exported = [dict(parse_line(line), category=f.stem)
                for f in sorted((tmp_path / "out" / "exports" / "none" / "all").glob("*.txt"))
                for line in f.read_text().splitlines()]
    assert len(exported) == 4 and exported[0]["prediction"] == "Yes, it is."
    from vlmplug.metrics import mme

    assert mme(exported)["perception"] == 100.0


def test_vstar_choice_equals_teacher_forced_likelihood(world, tmp_path):
    """The option scores forced through generate equal one forward over prompt + option + EOS (the official
    rule's ingredients), and the choice is the option with the highest mean log-probability."""
    from vlmplug.evaluation.likelihood import continuation_ids
    from vlmplug.pipeline import prepare_inputs

    model, processor = world
    make_vstar(tmp_path / "v", tmp_path)
    results, answers, items = run(VStar(), model, processor, tmp_path / "v", [MethodSpec.parse("none")],
                                  tmp_path / "out")
    tok = processor.tokenizer
    for split in VStar.splits:
        for it, a in zip(items[split], answers["none"][split]):
            ref = []
            for option in it["options"]:
                inputs = prepare_inputs(model, processor, it["images"], it["text"])
                ids = continuation_ids(processor, it["text"], 1, option) + [tok.eos_token_id]
                n = inputs["input_ids"].shape[1]
                inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([ids])], 1)
                inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
                with torch.no_grad():
                    logp = torch.log_softmax(model(**inputs).logits[0].float(), -1)
                ref.append(float(sum(logp[n - 1 + i, t] for i, t in enumerate(ids)) / len(ids)))
            assert a["option_logprobs"] == pytest.approx(ref, abs=1e-4)
            assert a["choice"] == max(range(len(ref)), key=ref.__getitem__)
    # the world model names colours right: option 0 is the scene's colour
    assert results["none"]["direct_attributes"]["accuracy"] == 1.0


def test_grounding_answers_are_the_maps_click(world, tmp_path):
    from vlmplug.grounding import ground

    model, processor = world
    write_world_grounding(tmp_path / "g", n=4, seed=2)
    bench = WorldGrounding()
    specs = [MethodSpec.parse("tag"), MethodSpec.parse("raw:click=peak"), MethodSpec.parse("none")]
    results, answers, items = run(bench, model, processor, tmp_path / "g", specs, tmp_path / "out")
    for it, a_tag, a_raw, a_none in zip(items["world"], *(answers[s.label]["world"] for s in specs)):
        g = ground(model, processor, it["images"][0], it["text"], method="tag", target=it["text"],
                   prompt="What color is the {query}?")
        x0, y0, x1, y1 = g.box
        assert a_tag["point"] == [(x0 + x1) / 2, (y0 + y1) / 2]
        g = ground(model, processor, it["images"][0], it["text"], method="raw", prompt="What color is the {query}?")
        assert a_raw["point"] == list(g.point)
        assert a_none["point"] is None  # the world model answers words, not coordinates
    assert results["none"]["world"]["accuracy"] == 0.0
    assert results["raw:click=peak"]["world"]["accuracy"] > 0.5


# ------------------------------------------------------------------------------------------ CLI


def test_cli_errors_come_before_any_model_loads(tmp_path, monkeypatch, capsys):
    def no_load(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr("vlmplug.loading.load", no_load)
    assert cli.main(["eval", "nope"]) == 2
    assert "available: pope, chair" in capsys.readouterr().err
    assert cli.main(["eval", "mme", "--data", str(tmp_path / "missing"), "--model", "x"]) == 2
    assert "release folder" in capsys.readouterr().err
    assert cli.main(["eval", "mme", "--data", str(tmp_path)]) == 2
    assert "needs --data" in capsys.readouterr().err
    assert cli.main(["eval", "world-pope", "--method", "tag", "--out", str(tmp_path)]) == 2
    assert "grounding method" in capsys.readouterr().err
    assert cli.main(["eval", "world-pope", "--method", "fastvv", "--out", str(tmp_path)]) == 2
    assert "unknown method 'fastvv'" in capsys.readouterr().err
    assert cli.main(["eval", "world-pope", "--method", "fastv", "--param", "keep_ratio=2", "--out", str(tmp_path)]) == 2
    assert "keep_ratio" in capsys.readouterr().err
    assert cli.main(["eval", "world-grounding", "--method", "tag:click=centre", "--out", str(tmp_path)]) == 2
    assert "click='centre'" in capsys.readouterr().err
    assert cli.main(["eval", "world-pope", "--splits", "easy", "--out", str(tmp_path / "o")]) == 2
    assert "unknown split" in capsys.readouterr().err


def test_cli_world_suite_end_to_end(tmp_path, capsys):
    assert cli.main(["eval", "world-vqa", "--scenes", "3", "--method", "none", "fastv", "--param", "keep_ratio=0.5",
                     "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    doc = json.loads((tmp_path / "world-vqa.json").read_text())
    assert doc["meta"]["params"] == {"none": {}, "fastv": {"keep_ratio": 0.5}}
    assert doc["results"]["fastv"]["val"]["image_tokens_kept"] == 32
    assert markdown_table(doc["results"], TextVQA()) in out
    assert (tmp_path / "world-vqa.png").exists() and (tmp_path / "exports" / "fastv" / "val" / "submission.json").exists()


def test_every_benchmark_is_listed():
    assert set(benchmarks()) == {"pope", "chair", "mme", "textvqa", "screenspot", "vstar", "world-pope", "world-vqa",
                                 "world-grounding"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_single_process_result(tmp_path):
    """accelerate launch with two CPU processes (gloo): the same answers and scores as one process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = ["eval", "world-pope", "--scenes", "3", "--splits", "random", "popular", "--method", "none",
            "fastv:keep_ratio=0.25", "--data", str(tmp_path / "data")]
    one = subprocess.run([sys.executable, "-m", "vlmplug.cli", *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    accelerate = Path(sys.executable).with_name("accelerate")
    two = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
                          str(_free_port()), "-m", "vlmplug.cli", *args, "--out", str(tmp_path / "two")], env=env,
                         capture_output=True, text=True, timeout=300)
    # the ranks' own lines (tracebacks, aborts), not the launcher's summary, if it fails
    assert two.returncode == 0, "\n".join(line for line in two.stderr.splitlines() if "rank" in line or "Error" in line
                                          or "terminate" in line)[-4000:]
    a, b = (json.loads((tmp_path / d / "world-pope.json").read_text()) for d in ("one", "two"))
    assert a["meta"]["processes"] == 1 and b["meta"]["processes"] == 2
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds_per_answer"}  # noqa: E731
    assert {l: {s: strip(r) for s, r in per.items()} for l, per in a["results"].items()} == \
        {l: {s: strip(r) for s, r in per.items()} for l, per in b["results"].items()}
    for f in sorted((tmp_path / "one" / "answers").glob("*.jsonl")):
        g = tmp_path / "two" / "answers" / f.name
        rows = lambda p: [{k: v for k, v in json.loads(x).items() if k != "seconds"}  # noqa: E731
                          for x in p.read_text().splitlines()]
        assert rows(f) == rows(g)
    assert not list((tmp_path / "two" / "answers").glob("*.part*"))
