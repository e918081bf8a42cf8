"""Launch the app with what it serves besides the UI: the MCP tools (``mcp=True``) and the
OpenAI-compatible routes (on unless ``openai=False``). Used by ``python app.py`` and by the tests."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def launch(demo, ctx, *, mcp: bool | None = None, openai: bool = True, api_key: str | None = None,
           **launch_kwargs) -> str:
    """``demo.launch(prevent_thread_lock=True, mcp_server=mcp, ...)``, then the ``/v1`` routes on the
    same server. Returns the local URL; the caller blocks (``demo.block_thread()``) or closes."""
    from . import openai as openai_routes

    demo.launch(prevent_thread_lock=True, mcp_server=mcp, **launch_kwargs)
    url = demo.local_url.rstrip("/")
    if openai:
        openai_routes.mount(demo.app, ctx, demo, api_key=api_key)
        log.info("OpenAI-compatible endpoint: %s/v1 (model %r%s)", url, openai_routes.model_id(ctx.lm),
                 ", API key required" if api_key else "")
    if mcp:
        log.info("MCP server (streamable HTTP): %s/gradio_api/mcp/", url)
    return url
