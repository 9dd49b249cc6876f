"""The local web app (``mechscope serve``): feature browser, feature pages, prompt inspector, patching, steering,
circuit and probe pages."""

from mechscope.app.server import AppState, create_app, inspect_prompt, load_report, make_steer

__all__ = ["AppState", "create_app", "inspect_prompt", "load_report", "make_steer"]
