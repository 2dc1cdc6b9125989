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
