"""The demo (vlmplug/demo): parameter introspection, the engine, and the Gradio app driven over HTTP by gradio_client.

The app tests launch the real server on a free local port (one server for this module and the browser test:
`shared_server`) and call its `/compare` endpoint as a script would.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import math
import os
import socket
import subprocess
import sys


import pytest

from vlmplug.errors import MethodConfigError
from vlmplug.methods.base import param_specs
from vlmplug.pipeline import pipeline_methods
from vlmplug.registry import method_registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # gradio vs pandas 3
QUESTION = "What color is the circle?"  # the bundled scene's question; answer "red", plainly and under FastV at 25%


def _all_configs():
    return {**method_registry(), **{n: cls for n, (cls, _) in pipeline_methods().items()}}


# ------------------------------------------------------------------------------------ param_specs
def test_every_field_of_every_method_has_a_spec():
    for name, cls in _all_configs().items():
        specs = param_specs(cls)
        assert [s.name for s in specs] == [f.name for f in dataclasses.fields(cls) if f.init], name
        for s in specs:
            assert s.kind in ("float", "int", "bool", "choice", "text", "literal"), (name, s)
            if s.kind == "choice":
                assert s.value in s.choices, (name, s)


def test_specs_know_the_ranges_and_choices_the_configs_check():
    fastv = {s.name: s for s in param_specs(method_registry()["fastv"])}
    assert (fastv["keep_ratio"].kind, fastv["keep_ratio"].lo, fastv["keep_ratio"].hi) == ("float", 0.0, 1.0)
    assert fastv["keep_ratio"].value == 0.5 and fastv["keep_ratio"].default is None  # filled in by __post_init__
    assert fastv["keep_ratio"].optional and fastv["keep_ratio"].exclusive == ("keep_tokens",)
    assert (fastv["keep_tokens"].kind, fastv["keep_tokens"].lo, fastv["keep_tokens"].hi) == ("int", 0, None)
    assert (fastv["layer"].kind, fastv["layer"].lo) == ("int", 1)
    assert fastv["scores"].choices == ("last", "all")
    # an Optional field checked only when given: found with a probe value (VisionZip's default is keep_tokens=64)
    vz = {s.name: s for s in param_specs(method_registry()["visionzip"])}
    assert (vz["keep_ratio"].lo, vz["keep_ratio"].hi, vz["keep_ratio"].value) == (0.0, 1.0, None)
    vhr = {s.name: s for s in param_specs(method_registry()["vhr"])}
    assert vhr["outlier_filter"].kind == "bool" and vhr["layers"].kind == "literal"


def _outside(spec, side):
    if spec.kind == "int":
        return spec.lo - 1 if side == "lo" else spec.hi + 1
    return math.nextafter(spec.lo, -math.inf) if side == "lo" else math.nextafter(spec.hi, math.inf)


def test_recorded_ranges_are_the_ones_enforced():
    """Just outside every recorded bound is refused; each bound itself passes the range check (a cross-field rule,
    e.g. PLPHP's beta <= alpha, may still refuse it: then its message is not the range's)."""
    checked = accepted = 0
    for name, cls in method_registry().items():
        for s in param_specs(cls):
            if s.kind not in ("int", "float"):
                continue
            for side in ("lo", "hi"):
                bound = getattr(s, side)
                if bound is None:
                    continue
                checked += 1
                with pytest.raises(MethodConfigError, match=f"{s.name}=.*(out of range|must be)"):
                    cls.from_params(**{s.name: _outside(s, side)})
                try:
                    cls.from_params(**{s.name: bound})
                    accepted += 1
                except MethodConfigError as e:
                    assert "out of range" not in str(e) and "must be a finite" not in str(e), (name, s.name, e)
    assert checked >= 40 and accepted >= checked - 2


def test_param_specs_refuses_a_non_dataclass():
    with pytest.raises(TypeError):
        param_specs(int)


# ------------------------------------------------------------------------------------ no gradio on import
def test_importing_vlmplug_and_its_cli_never_imports_gradio():
    code = ("import sys, vlmplug, vlmplug.cli, vlmplug.demo, vlmplug.demo.engine, vlmplug.demo.app; "
            "vlmplug.cli.main(['methods']); print([m for m in sys.modules if m.split('.')[0] == 'gradio'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_demo_command_is_registered(capsys):
    from vlmplug import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--model" in out and "--port" in out and "--share" in out


# ----------------------------------------------------------------------------------------- engine
_SHARED: dict = {}


def shared_engine():
    """One world model for the module (and the browser test)."""
    if "engine" not in _SHARED:
        from vlmplug.demo.engine import DemoEngine

        _SHARED["engine"] = DemoEngine(model_id="world")
    return _SHARED["engine"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shared_server():
    """(app, url): the demo launched on a free local port, shared by the tests of this process, closed at exit."""
    if "server" not in _SHARED:
        pytest.importorskip("gradio", reason="the demo needs the demo extra (gradio)")
        from vlmplug.demo.app import build_app, launch

        app = build_app(engine=shared_engine())
        launch(app, port=_free_port(), block=False, quiet=True)
        atexit.register(app.close)
        _SHARED["server"] = (app, app.local_url)
    return _SHARED["server"]


@pytest.fixture(scope="module")
def engine():
    return shared_engine()


@pytest.fixture(scope="module")
def bundled(engine):
    return engine.bundled_scene()


def test_form_values_become_parameters(engine):
    fp = engine.form_params
    # the form's budget radio picks one of keep_ratio / keep_tokens; values at the declared default are left out
    assert fp("fastv", {"layer": 2, "keep_ratio": 0.25, "keep_tokens": None, "scores": "last"}, "keep_ratio") == \
        {"keep_ratio": 0.25}
    assert fp("pool", {"keep_ratio": 0.5, "keep_tokens": 8.0}, "keep_tokens") == {"keep_tokens": 8}
    assert fp("var", {"layers": "None", "sink_dims": "[3, 5]", "variant": "paper", "n_sink_dims": 2.0}) == \
        {"sink_dims": [3, 5], "variant": "paper"}
    assert fp("act", {"layers": "2:"}) == {"layers": "2:"}  # not a literal: the string
    with pytest.raises(MethodConfigError, match="whole number"):
        fp("fastv", {"layer": 2.5})
    with pytest.raises(MethodConfigError, match="unknown parameter"):
        fp("fastv", {"nope": 1})


def test_parse_method_and_bad_inputs():
    from vlmplug.demo.engine import DemoInputError, load_image, parse_method

    assert parse_method("fastv:keep_ratio=0.25,layer=2") == ("fastv", {"keep_ratio": 0.25, "layer": 2})
    assert parse_method("fastv", '{"keep_ratio": 0.5}') == ("fastv", {"keep_ratio": 0.5})
    assert parse_method("none") == (None, {})
    with pytest.raises(MethodConfigError, match="JSON"):
        parse_method("fastv", "{keep_ratio: 1")
    with pytest.raises(DemoInputError, match="no image"):
        load_image(None)
    with pytest.raises(DemoInputError, match="not an image"):
        load_image(os.path.join(ROOT, "pyproject.toml"))


def test_compare_on_the_bundled_scene(engine, bundled):
    from vlmplug.demo.engine import curve_figure, grounding_picture, kept_picture

    image, scene = bundled
    comp = engine.compare(image, QUESTION, [("fastv", {"keep_ratio": 0.25}), ("pai", {}), ("fastv", {"layer": 99})],
                          scene=scene)
    assert comp.expected == "red" and comp.plain.text == "red"
    fastv, pai, deep = comp.patched
    assert (fastv.text, fastv.kept_tokens, fastv.image_tokens, fastv.prompt_tokens) == ("red", 16, 64, 75)
    assert pai.kept is None and pai.kept_tokens is None  # not a pruning method: nothing to draw
    assert "this model allows" in deep.error  # refused when applied to this model (too few layers): a message
    # the kept tokens: 16 of the 8x8 grid, in the image's pixels
    shares = [s for v in fastv.kept[0]["views"] for s in v["share"]]
    assert len(shares) == 64 and sum(shares) == 16 and fastv.kept_share == 16
    pic = kept_picture(image, fastv.kept)
    assert pic.size == (384, 384)
    assert grounding_picture(comp.grounding).size == (384, 384)
    # accuracy against the budget over the scene's five questions: FastV's line, keep ratios 1 .. 1/8
    points = comp.curve["methods"]["fastv"]
    assert [round(k) for k, _ in points] == [64, 32, 16, 8] and comp.curve["plain"] == 1.0
    assert all(0 <= acc <= 1 for _, acc in points)
    assert curve_figure(comp.curve).axes


def test_kv_pruning_draws_the_share_of_cache_heads(engine, bundled):
    image, _ = bundled
    a = engine.answer(image, QUESTION, "plphp", {"keep_ratio": 0.25})
    assert a.error is None and a.kept is not None
    shares = [s for v in a.kept[0]["views"] for s in v["share"]]
    assert any(0 < s < 1 for s in shares) or 0 < a.kept_share < 64


def test_random_scenes_offer_their_questions(engine):
    image, scene = engine.random_scene(seed=7)
    assert image.size == (64, 64) and scene["seed"] == 7
    assert scene["questions"] and all(isinstance(q, str) and a for q, a in scene["questions"])
    assert engine.random_scene(seed=7)[1] == scene


# -------------------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def server():
    pytest.importorskip("gradio_client", reason="the demo tests need gradio_client (dev extra)")
    return shared_server()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server[1], verbose=False)


@pytest.fixture(scope="module")
def scene_png():
    from vlmplug.world import SAMPLES_DIR

    return str(SAMPLES_DIR / "scene.png")


def _compare(client, png, method, question=QUESTION, params="{}"):
    from gradio_client import handle_file

    return client.predict(handle_file(png), question, method, params, api_name="/compare")


def test_compare_endpoint_plain_and_fastv(client, scene_png):
    plain, patched, details = _compare(client, scene_png, "fastv:keep_ratio=0.25")
    assert (plain, patched) == ("red", "red") and details["error"] is None
    assert details["patched"]["kept_tokens"] == 16 and details["patched"]["prompt_tokens"] == 75
    assert details["plain"]["kept_tokens"] is None and details["plain"]["image_tokens"] == 64
    # the parameters may come as JSON instead; "none" answers plainly
    assert _compare(client, scene_png, "fastv", params='{"keep_ratio": 0.25}')[:2] == ("red", "red")
    assert _compare(client, scene_png, "none")[:2] == ("red", "red")
    assert "compare" in {k.strip("/") for k in client.view_api(print_info=False, return_format="dict")
                         ["named_endpoints"]}


SETTINGS = ["fastv:keep_ratio=0.25", "pool:keep_ratio=0.25", "random:keep_ratio=0.5,seed=3", "visionzip:keep_tokens=8",
            "plphp:keep_ratio=0.25", "cluster:keep_ratio=0.125", "pai", "fastv:keep_tokens=4,layer=1"]


def _key(result):
    plain, patched, d = result
    assert d["error"] is None, d["error"]
    p = d["patched"]
    return plain, patched, p["prompt_tokens"], p["image_tokens"], p["kept_tokens"], p["kept_share"]


def test_concurrent_requests_answer_as_each_alone(client, scene_png):
    from gradio_client import handle_file

    alone = {m: _key(_compare(client, scene_png, m)) for m in SETTINGS}
    assert len({v[1] for v in alone.values()}) > 1  # the settings answer differently: a leak would show
    assert len({v[4] for v in alone.values()}) > 2
    jobs = {m: client.submit(handle_file(scene_png), QUESTION, m, "{}", api_name="/compare") for m in SETTINGS}
    together = {m: _key(job.result(timeout=120)) for m, job in jobs.items()}
    assert together == alone
    # several at once from separate clients too, each setting twice
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = {pool.submit(_compare, client, scene_png, m): m for m in SETTINGS * 2}
        for f in concurrent.futures.as_completed(futures):
            assert _key(f.result()) == alone[futures[f]]


def test_bad_requests_are_messages_and_the_server_lives_on(client, scene_png, tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is not a picture")
    cases = [
        (str(not_image), "fastv", QUESTION, "{}", "not an image"),
        (scene_png, "nosuchmethod", QUESTION, "{}", "unknown method 'nosuchmethod'"),
        (scene_png, "fastv:keep_ratio=1.5", QUESTION, "{}", "keep_ratio=1.5 is out of range"),
        (scene_png, "fastv", QUESTION, '{"layer": 0}', "layer=0 is out of range"),
        (scene_png, "fastv", QUESTION, "{not json", "JSON"),
        (scene_png, "fastv", QUESTION, '{"nope": 1}', "unknown parameter"),
        (scene_png, "fastv", "   ", "{}", "no question"),
        (scene_png, "fastv:layer=99", QUESTION, "{}", "this model allows"),
    ]
    for png, method, question, params, message in cases:
        plain, patched, details = _compare(client, png, method, question, params)
        assert (plain, patched) == ("", "") and message in details["error"], (method, details)
    assert _compare(client, scene_png, "fastv:keep_ratio=0.25")[:2] == ("red", "red")


def test_the_page_compare_button(server, bundled):
    """What the page's Compare button runs (`Page.compare`, with the opening page's widget values): answers, table,
    pictures and the budget plot; a missing image or a bad parameter is a message, not an exception."""
    page = server[0].vlmplug_page
    image, scene = bundled
    values = page.initial_values()
    out = page.compare(image, QUESTION, ["fastv"], scene, *values)
    assert (out["plain"], out["patched"], out["problems"]) == ("red", "red", [])
    assert out["rows"][1][:3] == ["fastv:keep_ratio=0.25", "red", "yes"] and out["rows"][1][5] == "16 / 64"
    assert len(out["pictures"]) == 2 and "16 of 64 image tokens kept" in out["pictures"][1][1]
    assert out["figure"] is not None
    assert "no image" in page.compare(None, QUESTION, ["fastv"], None, *values)["error"]
    i = next(i for i, (m, p, _, _) in enumerate(page.params) if (m, p) == ("fastv", "layer"))
    bad = list(values)
    bad[i] = 0
    out = page.compare(image, QUESTION, ["fastv", "pool"], None, *bad)
    assert out["plain"] == "red" and out["patched"] and out["figure"] is None  # pool still answers; no scene, no plot
    assert any("layer=0 is out of range" in p for p in out["problems"])
