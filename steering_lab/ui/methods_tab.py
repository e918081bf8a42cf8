"""The methods that are not contrast extraction (Linear-AcT, function vectors, attribution patching,
Command-V transfer, cross-lingual refusal, PPLM): each in its own ``ui/method_<name>.py`` with
``TITLE``, ``WHERE`` ("extract" or "steer") and ``build(ctx, steer)``, shown as sub-tabs under the
Extract tab or the Steer tab."""

from __future__ import annotations

import importlib

import gradio as gr

METHODS = ("transport", "function_vectors", "attribution", "transfer", "crosslingual", "pplm")


def _modules():
    found = []
    for name in METHODS:
        full = f"{__package__}.method_{name}"
        try:
            found.append(importlib.import_module(full))
        except ModuleNotFoundError as exc:
            if exc.name != full:  # a real import error inside the module: show it
                raise
    return found


def build(ctx, steer: dict, where: str) -> None:
    mods = [m for m in _modules() if m.WHERE == where]
    if not mods:
        return
    label = "More ways to find a direction" if where == "extract" else "More ways to steer"
    with gr.Accordion(label, open=False), gr.Tabs():
        for mod in mods:
            with gr.Tab(mod.TITLE):
                mod.build(ctx, steer)
