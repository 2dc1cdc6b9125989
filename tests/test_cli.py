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
