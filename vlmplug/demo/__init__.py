"""The browser demo: `vlmplug demo` (Gradio; `pip install 'vlmplug[demo]'`).

`vlmplug.demo.engine` computes (no gradio); `vlmplug.demo.app` builds the page (`build_app`, `main`). Importing this
package imports neither gradio nor torch.
"""
from __future__ import annotations

__all__ = ["build_app", "main", "DemoEngine"]


def __getattr__(name):
    if name in ("build_app", "main"):
        from . import app

        return getattr(app, name)
    if name == "DemoEngine":
        from .engine import DemoEngine

        return DemoEngine
    raise AttributeError(f"module 'vlmplug.demo' has no attribute {name!r}")
