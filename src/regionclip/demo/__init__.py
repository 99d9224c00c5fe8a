"""Gradio web demo (``regionclip demo``; needs the ``demo`` extra: ``pip install 'regionclip[demo]'``).

The request logic (:class:`DemoBackend`) does not import gradio, so it is usable and testable without it; only
:func:`build_demo` / :func:`launch_demo` need gradio, imported at call time.
"""
from .app import (
                  DemoBackend,
                  DemoInputError,
                  DemoResult,
                  boxes_from_strokes,
                  build_demo,
                  launch_demo,
                  parse_typed_boxes,
                  resolve_vocabulary,
)

__all__ = ["DemoBackend", "DemoInputError", "DemoResult", "boxes_from_strokes", "build_demo", "launch_demo",
           "parse_typed_boxes", "resolve_vocabulary"]
