"""The methods that are not contrast extraction (Linear-AcT, function vectors, attribution patching,
Command-V transfer, cross-lingual refusal, PPLM): each in its own ``ui/method_<name>.py`` with
``TITLE``, ``WHERE`` ("extract" or "steer") and ``build(ctx, steer)``, shown as sub-tabs under the
Extract tab or the Steer tab."""

from __future__ import annotations

import gradio as gr

from . import (
    method_attribution,
    method_crosslingual,
    method_function_vectors,
    method_pplm,
    method_transfer,
    method_transport,
)

METHODS = (method_transport, method_function_vectors, method_attribution, method_transfer, method_crosslingual,
           method_pplm)


def build(ctx, steer: dict, where: str) -> None:
    mods = [m for m in METHODS if m.WHERE == where]
    if not mods:
        return
    label = "More ways to find a direction" if where == "extract" else "More ways to steer"
    with gr.Accordion(label, open=False), gr.Tabs():
        for mod in mods:
            with gr.Tab(mod.TITLE):
                mod.build(ctx, steer)
