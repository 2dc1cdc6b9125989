"""The main job and the small commands."""
from vlmplug.cli import main


def test_run_answers_the_bundled_scene(capsys):
    assert main(["run", "--max-new-tokens", "3", "--method", "fastv", "--param", "keep_ratio=0.5"]) == 0
    out = capsys.readouterr().out
    assert "-> plain answer correct" in out
    assert "FastV(layer=2, keep_ratio=0.5" in out and "image tokens kept per image" in out


def test_methods_and_models(capsys):
    assert main(["methods"]) == 0 and main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("record", "fastv", "plphp", "visionzip", "hiprune", "cluster", "qwen2_vl", "llava_next"):
        assert name in out


def test_bad_method_is_reported(capsys):
    assert main(["run", "--method", "fastvv"]) == 2
    assert "unknown method 'fastvv'" in capsys.readouterr().err


def test_ground_writes_a_heatmap_and_prints_point_and_box(tmp_path, capsys):
    import random

    from PIL import Image

    from vlmplug.world.scenes import draw_scene

    sc = draw_scene([("circle", "red", 0.3), ("square", "blue", 0.3)], size=(96, 64), rng=random.Random(1))
    img = tmp_path / "scene.png"
    sc.image.save(img)
    out = tmp_path / "heat.png"
    assert main(["ground", "--image", str(img), "--query", "What color is the circle?", "--tokens", "last",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "point: (" in printed and "box: (" in printed and f"wrote {out}" in printed
    heat = Image.open(out)
    assert heat.size == (96, 64) and heat.mode == "L" and heat.getextrema()[1] == 255
    x0, y0, x1, y1 = sc.objects[0].box
    px, py = (float(v) for v in printed.split("point: (")[1].split(")")[0].split(","))
    assert x0 <= px < x1 and y0 <= py < y1  # the world model looks at the circle
    assert main(["ground", "--image", str(img), "--query", "circle", "--overlay", "--out", str(out)]) == 0
    assert Image.open(out).mode == "RGB"


def test_ground_reports_bad_input(tmp_path, capsys):
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    assert main(["ground", "--image", str(bad), "--query", "x"]) == 2
    assert "cannot read --image" in capsys.readouterr().err
    assert main(["ground", "--image", str(bad), "--query", "x", "--method", "gradcam"]) == 2
    assert "unknown grounding method" in capsys.readouterr().err
    good = tmp_path / "ok.png"
    from PIL import Image

    Image.new("RGB", (64, 64)).save(good)
    assert main(["ground", "--image", str(good), "--query", "What color is the circle?", "--layers", "99",
                 "--out", str(tmp_path / "h.png")]) == 2
    assert "out of range" in capsys.readouterr().err


def test_run_errors_are_one_line_and_exit_2_before_any_work(tmp_path, monkeypatch, capsys):
    """As a newcomer meets them: a parameter out of range, a file that is not an image, a model id that is not in
    the local cache, an unknown method: one line from the library (no traceback), exit 2, and no model loaded for
    what can be checked without one."""
    import vlmplug.loading

    loads = []
    real_load = vlmplug.loading.load
    monkeypatch.setattr(vlmplug.loading, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    assert main(["run", "--method", "fastv", "--param", "keep_ratio=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "keep_ratio=2" in err and "Traceback" not in err
    assert main(["run", "--method", "fastvv"]) == 2
    assert "unknown method 'fastvv'" in capsys.readouterr().err
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    assert main(["run", "--image", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not an image PIL can read" in err
    assert main(["run", "--image", str(tmp_path / "missing.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert loads == []  # none of these loaded a model
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["run", "--model", "nobody/not-a-cached-model", "--image", str(tmp_path / "x.png"), "--prompt", "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err  # the image is checked first
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    assert main(["run", "--model", "nobody/not-a-cached-model", "--image", str(tmp_path / "x.png"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot load 'nobody/not-a-cached-model' (offline" in err


def test_every_method_runs_with_its_defaults_on_the_world_model(capsys):
    """`vlmplug run --method NAME` with no parameters, for every method: the defaults fit the embedded model."""
    import vlmplug

    for name in [*vlmplug.available_methods(), "vicrop", "carve"]:
        rc = main(["run", "--method", name, "--max-new-tokens", "2"])
        out, err = capsys.readouterr()
        assert rc == 0, (name, err)
