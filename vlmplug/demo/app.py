"""The browser demo: one question about one image, answered plainly and under one or more methods, side by side.

    vlmplug demo [--model ID_OR_PATH] [--port N] [--share]        (or: python demos/app.py ...)

Inputs: an uploaded image or a random world scene (its questions offered as examples), a question, methods with
their parameters (the form of each method is generated from its config's fields and ranges: `param_specs`).
Outputs: the answers with time and token counts, where the model looked (TAG heatmap, box, point), the image tokens
each pruning method kept, and for world scenes (known answers) accuracy against the token budget.

API: `/compare` (image file, question, method, params JSON) -> (plain answer, patched answer, details), e.g.

    from gradio_client import Client, handle_file
    Client("http://127.0.0.1:7860/").predict(handle_file("scene.png"), "What color is the circle?",
                                             "fastv:keep_ratio=0.25", api_name="/compare")

Requires the `demo` extra (gradio); the heatmap needs the `ground` extra (scipy, matplotlib).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import Any

from ..errors import VlmplugError
from .engine import (
    Answer,
    DemoEngine,
    DemoInputError,
    curve_figure,
    grounding_picture,
    kept_picture,
    load_image,
    parse_method,
)

log = logging.getLogger("vlmplug.demo")

#: requests the server runs at once per event (their model work is serialised by the engine's lock)
CONCURRENCY = 8
#: methods ticked when the page opens
DEFAULT_METHODS = ("fastv",)
#: FastV's keep ratio on the opening page: the headline comparison, 25% of the image tokens
DEFAULT_OVERRIDES = {"fastv": {"keep_ratio": 0.25}}
TABLE_HEADERS = ["setting", "answer", "correct", "time (ms)", "prompt tokens", "image tokens kept", "note"]

CSS = """
#input-image img, #pictures img { image-rendering: pixelated; }
#status { min-height: 1.5em; }
"""


def _quiet_environment() -> None:
    """Nothing the demo does may reach the network unasked (analytics, version checks)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def _import_gradio():
    _quiet_environment()
    try:
        import gradio as gr
    except ImportError as e:
        raise ImportError("the demo needs gradio: pip install 'vlmplug[demo]'") from e
    return gr


# ----------------------------------------------------------------------------------------------- widgets
def _widget(gr, spec, value):
    """One form widget for a `ParamSpec` showing `value`: a slider for a closed range, a number box for an open one,
    a checkbox, a dropdown of the allowed choices, or a text box (a Python literal, e.g. a layer selection "2:")."""
    label = spec.name
    if spec.kind in ("float", "int"):
        is_int = spec.kind == "int"
        span = None if not spec.closed else spec.hi - spec.lo
        if span is not None and (not is_int or span <= 1000):
            step = 1 if is_int else (span / 100 if span > 0 else 0.01)
            return gr.Slider(spec.lo, spec.hi, value=value, step=step, label=label)
        bounds = f"[{'-inf' if spec.lo is None else spec.lo}, {'inf' if spec.hi is None else spec.hi}]"
        info = (f"range {bounds}" if (spec.lo is not None or spec.hi is not None) else "") + (
            "; empty: unset" if spec.optional else "")
        return gr.Number(value=value, precision=0 if is_int else None, label=label, info=info or None,
                         placeholder="unset" if spec.optional else None)
    if spec.kind == "bool":
        return gr.Checkbox(value=bool(value), label=label)
    if spec.kind == "choice":
        return gr.Dropdown(choices=list(spec.choices), value=value, label=label)
    if spec.kind == "text":
        return gr.Textbox(value="" if value is None else str(value), label=label)
    return gr.Textbox(value=value, label=label, info="a Python literal, e.g. None, 2, [1, 3] or '2:'")


def _rows(comp) -> list[list]:
    from ..pipeline import normalize_answer

    def row(a: Answer):
        correct = ""
        if comp.expected is not None and not a.error:
            correct = "yes" if normalize_answer(a.text) == normalize_answer(comp.expected) else "no"
        kept = ""
        if a.image_tokens is not None:
            k = a.kept_tokens if a.kept_tokens is not None else a.image_tokens
            kept = f"{k} / {a.image_tokens}"
            if a.kept_share is not None and round(a.kept_share) != k:
                kept += f" (cache: {a.kept_share:.1f})"
        note = a.error or ("" if not a.extra.get("box") else f"crop box {tuple(a.extra['box'])}")
        ms = "" if a.error else f"{a.seconds * 1000:.1f}"
        return [a.label, a.text, correct, ms, "" if a.prompt_tokens is None else a.prompt_tokens, kept, note]

    return [row(comp.plain)] + [row(a) for a in comp.patched]


def _pictures(image, comp) -> list[tuple[Any, str]]:
    out = []
    if comp.grounding is not None:
        g = comp.grounding
        out.append((grounding_picture(g), f"where the model looks (TAG map of the question, plain model): "
                                         f"point {tuple(round(v) for v in g.point)}, box {g.box}"))
    for a in comp.patched:
        if a.kept:
            pic = kept_picture(image, a.kept)
            if pic is not None:
                n = a.kept_share if a.kept_tokens is None or a.kept_tokens == a.image_tokens else a.kept_tokens
                n = f"{n:.1f}" if isinstance(n, float) and not float(n).is_integer() else f"{int(round(n))}"
                out.append((pic, f"{a.label}: {n} of {a.image_tokens} image tokens kept (outlined); pruned darkened"))
    return out


# -------------------------------------------------------------------------------------------------- page
class Page:
    """The form's logic without widgets: which widget value is which method parameter, and one Compare press ->
    the outputs as plain data (so tests and other front ends run exactly what the page runs)."""

    def __init__(self, engine: DemoEngine):
        self.engine = engine
        self.names = engine.method_names()
        #: (method, parameter, ParamSpec, initial value) per parameter widget, in the handler's input order
        self.params: list[tuple[str, str, Any, Any]] = []
        #: (method, exclusive group, initial choice) per "budget given as" radio
        self.budgets: list[tuple[str, tuple[str, ...], str]] = []
        for name in self.names:
            specs = engine.specs(name)
            override = DEFAULT_OVERRIDES.get(name, {})
            for group in sorted({tuple(sorted((s.name, *s.exclusive))) for s in specs if s.exclusive}):
                first = next((k for k in group if k in override), None) or next(
                    (s.name for s in specs if s.name in group and s.value is not None), group[0])
                self.budgets.append((name, group, first))
            for s in specs:
                self.params.append((name, s.name, s, override.get(s.name)))

    def initial_values(self) -> list:
        """The widgets' values on the opening page (what `compare` gets when nothing was touched)."""
        vals = []
        for _, _, s, override in self.params:
            v = s.value if override is None else override
            if s.kind in ("float", "int") and v is None and s.closed and (s.kind == "float" or s.hi - s.lo <= 1000):
                v = s.lo if s.kind == "int" else s.lo + (s.hi - s.lo) / 2  # what the slider shows
            vals.append(repr(s.default) if s.kind == "literal" else v)
        return vals + [first for _, _, first in self.budgets]

    def settings(self, selected, values) -> tuple[list[tuple[str, dict]], list[str]]:
        """The ticked methods' (name, parameters) from the widget values, and the form errors (one per method)."""
        n = len(self.params)
        pvals, bvals = values[:n], values[n:n + len(self.budgets)]
        budgets = {m: b for (m, _, _), b in zip(self.budgets, bvals)}
        settings, problems = [], []
        for m in selected or []:
            raw = {p: v for (mm, p, _, _), v in zip(self.params, pvals) if mm == m}
            try:
                settings.append((m, self.engine.form_params(m, raw, budgets.get(m))))
            except VlmplugError as e:
                problems.append(str(e))
        return settings, problems

    def compare(self, image, question, selected, scene, *values) -> dict:
        """One press of Compare: {"status", "plain", "patched", "rows", "pictures", "figure", "problems"}; a request
        the demo cannot serve gives {"error": message} instead."""
        try:
            settings, problems = self.settings(selected, values)
            comp = self.engine.compare(image, question, settings, scene=scene)
        except (VlmplugError, ValueError) as e:
            return {"error": str(e)}
        except Exception as e:  # noqa: BLE001 - the server answers every request
            log.error("demo request failed:\n%s", traceback.format_exc())
            return {"error": f"{type(e).__name__}: {e}"}
        problems += [f"{a.label}: {a.error}" for a in comp.patched if a.error]
        if comp.grounding_error:
            problems.append(f"heatmap: {comp.grounding_error}")
        if comp.curve and comp.curve.get("errors"):
            problems += [f"budget curve, {k}: {v}" for k, v in comp.curve["errors"].items()]
        lines = [f"Plain: **{comp.plain.text or '(empty)'}**"
                 + (f" (expected: **{comp.expected}**)" if comp.expected is not None else "")]
        lines += [f"{a.label}: **{a.text or '(empty)'}**" for a in comp.patched if not a.error]
        if not selected:
            lines.append("No method ticked: the plain answer only.")
        status = " · ".join(lines) + "".join(f"\n\n**Error:** {p}" for p in problems)
        fig = curve_figure(comp.curve) if comp.curve and comp.curve["methods"] else None
        return dict(status=status, plain=comp.plain.text, patched=next((a.text for a in comp.patched if not a.error), ""),
                    rows=_rows(comp), pictures=_pictures(load_image(image), comp), figure=fig, problems=problems,
                    comparison=comp)


# --------------------------------------------------------------------------------------------------- app
def build_app(model=None, processor=None, model_id: str = "world", *, engine: DemoEngine | None = None,
              max_new_tokens: int | None = None):
    """The demo page (a `gradio.Blocks`) on one model: `model`/`processor` as loaded, else `model_id` is loaded
    ("world": the embedded model, offline). Start it with `launch(app, ...)`. `app.vlmplug_page` is its `Page`."""
    gr = _import_gradio()
    engine = engine or DemoEngine(model, processor, model_id=model_id, max_new_tokens=max_new_tokens)
    page = Page(engine)
    names = page.names
    start_image, start_scene = engine.bundled_scene()
    start_question = start_scene.pop("question")
    initial = page.initial_values()

    with gr.Blocks(title="vlmplug demo", analytics_enabled=False) as app:
        app.vlmplug_page = page
        gr.Markdown(
            f"## vlmplug: the same question, plain and under inference-time methods\n"
            f"Model: **{'the embedded world model (tiny LLaVA, offline)' if engine.is_world else engine.model_id}**. "
            "Tick methods, set their parameters, press **Compare**: the answers with time and token counts side by "
            "side, where the model looked, the image tokens each pruning method kept and, for world scenes (known "
            "answers), accuracy against the token budget. Scripts: the `/compare` endpoint (*Use via API* below).")
        scene_state = gr.State(start_scene)
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                image = gr.Image(value=start_image, type="pil", label="Image", sources=["upload", "clipboard"],
                                 height=320, elem_id="input-image")
                scene_btn = gr.Button("Random world scene", elem_id="random-scene")
                question = gr.Textbox(value=start_question, label="Question", lines=1, elem_id="question")
                examples = gr.Dataset(components=["textbox"], label="Questions about this scene",
                                      samples=[[q] for q, _ in start_scene["questions"]], headers=["question"],
                                      elem_id="scene-questions")
                chosen = gr.CheckboxGroup(choices=names, value=list(DEFAULT_METHODS), label="Methods",
                                          elem_id="methods")
                compare_btn = gr.Button("Compare", variant="primary", elem_id="compare")
                widgets, radios, boxes = [], [], []
                for name in names:
                    with gr.Accordion(f"{name} parameters", open=name in DEFAULT_METHODS,
                                      visible=name in DEFAULT_METHODS) as box:
                        doc = (engine.method_classes()[name].__doc__ or "").strip().splitlines()
                        if doc:
                            gr.Markdown(doc[0])
                        for m, group, first in page.budgets:
                            if m == name:
                                radios.append(gr.Radio(list(group), value=first, label="budget given as"))
                        for m, _, spec, _ in page.params:
                            if m == name:
                                widgets.append(_widget(gr, spec, initial[len(widgets)]))
                    boxes.append(box)
            with gr.Column(scale=3, min_width=420):
                status = gr.Markdown("", elem_id="status")
                with gr.Row():
                    plain_box = gr.Textbox(label="Plain answer", interactive=False, elem_id="plain-answer")
                    patched_box = gr.Textbox(label="Patched answer (first method)", interactive=False,
                                             elem_id="patched-answer")
                table = gr.Dataframe(headers=TABLE_HEADERS, label="Answers, time and tokens", interactive=False,
                                     wrap=True, elem_id="results",
                                     column_widths=["27%", "11%", "9%", "10%", "10%", "14%", "19%"])
                gallery = gr.Gallery(label="Where the model looks; image tokens kept", columns=3, height="auto",
                                     object_fit="contain", elem_id="pictures")
                plot = gr.Plot(label="Accuracy vs image-token budget (this scene's questions)", visible=False,
                               elem_id="budget-plot")
        with gr.Column(visible=False):  # the /compare API's own inputs and outputs
            api_image = gr.File(label="image", type="filepath")
            api_question = gr.Textbox(label="question")
            api_method = gr.Textbox(label="method", value="fastv")
            api_params = gr.Textbox(label="params", value="{}")
            api_plain = gr.Textbox(label="plain answer")
            api_patched = gr.Textbox(label="patched answer")
            api_details = gr.JSON(label="details")
            api_btn = gr.Button("compare (API)")

        # ------------------------------------------------------------------ events
        def show_params(selected):
            selected = set(selected or [])
            return [gr.Accordion(visible=n in selected) for n in names]

        chosen.change(show_params, chosen, boxes, api_visibility="undocumented", queue=False)

        def draw_scene():
            img, scene = engine.random_scene()
            qs = [q for q, _ in scene["questions"]]
            return (img, qs[0], scene, gr.Dataset(samples=[[q] for q in qs], visible=True),
                    f"World scene {scene['seed']}: {len(qs)} questions with known answers (pick one below).")

        scene_btn.click(draw_scene, None, [image, question, scene_state, examples, status],
                        api_visibility="undocumented")

        def forget_scene():
            return None, gr.Dataset(samples=[], visible=False)

        image.upload(forget_scene, None, [scene_state, examples], api_visibility="undocumented", queue=False)
        image.clear(forget_scene, None, [scene_state, examples], api_visibility="undocumented", queue=False)
        examples.click(lambda sample: sample[0] if sample else "", examples, question,
                       api_visibility="undocumented", queue=False)

        def on_compare(img, q, selected, scene, *vals):
            out = page.compare(img, q, selected, scene, *vals)
            if "error" in out:
                gr.Warning(out["error"])
                return f"**Error:** {out['error']}", "", "", [], [], gr.Plot(value=None, visible=False)
            for p in out["problems"]:
                gr.Warning(p)
            return (out["status"], out["plain"], out["patched"], out["rows"], out["pictures"],
                    gr.Plot(value=out["figure"], visible=out["figure"] is not None))

        compare_btn.click(on_compare, [image, question, chosen, scene_state, *widgets, *radios],
                          [status, plain_box, patched_box, table, gallery, plot],
                          api_visibility="undocumented", concurrency_limit=CONCURRENCY)

        def api_compare(file, q, method, params):
            """Answer `question` about the image plainly and under `method` ("fastv", "fastv:keep_ratio=0.25" or
            "none"; `params`: a JSON object of parameters). Returns (plain answer, patched answer, details); on a bad
            request the answers are empty and details["error"] says why."""
            try:
                im = load_image(file)
                name, p = parse_method(method, params)
                if name is not None:
                    engine.config(name, p)  # a bad setting is this request's error, before any answer
                plain = engine.answer(im, q)
                if plain.error:
                    raise DemoInputError(plain.error)
                patched = engine.answer(im, q, name, p) if name is not None else plain
                if patched.error:
                    raise DemoInputError(patched.error)
            except (VlmplugError, ValueError) as e:
                return "", "", {"error": str(e)}
            except Exception as e:  # noqa: BLE001
                log.error("demo API request failed:\n%s", traceback.format_exc())
                return "", "", {"error": f"{type(e).__name__}: {e}"}
            return plain.text, patched.text, {"plain": plain.summary(), "patched": patched.summary(), "error": None}

        api_btn.click(api_compare, [api_image, api_question, api_method, api_params],
                      [api_plain, api_patched, api_details], api_name="compare", concurrency_limit=CONCURRENCY)
    return app


def launch(app, *, host: str = "127.0.0.1", port: int | None = None, share: bool = False, block: bool = True,
           quiet: bool = False):
    """Start the server (`block=False`: return at once; `app.local_url` is the address, `app.close()` stops it)."""
    _quiet_environment()
    return app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block, quiet=quiet,
                      show_error=True, footer_links=["api"], css=CSS)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="vlmplug demo", description="Compare methods side by side in the browser")
    add_arguments(p)
    return run(p.parse_args(argv))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="world", help='"world" (the embedded model, offline; default) or a checkpoint '
                                                   "id / path")
    p.add_argument("--port", type=int, default=None, help="port (default: 7860, or the next free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--share", action="store_true", help="also serve a public gradio.live link (needs the internet)")
    p.add_argument("--dtype", default=None, help="e.g. bfloat16 for real checkpoints")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available, else cpu)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 8 (world), 32 (checkpoints)")


def run(args) -> int:
    try:
        _import_gradio()  # say it is missing before loading a model
    except ImportError as e:
        print(str(e), file=sys.stderr)
        return 2
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        engine = DemoEngine(model_id=args.model, dtype=args.dtype, device=device, max_new_tokens=args.max_new_tokens)
    except (OSError, ValueError, VlmplugError) as e:
        print(f"vlmplug demo: cannot load {args.model!r}: {e}", file=sys.stderr)
        return 2
    app = build_app(engine=engine)
    launch(app, host=args.host, port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
