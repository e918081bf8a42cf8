"""Serving the lab to other programs: an OpenAI-compatible chat endpoint (``openai``) and the MCP
tools (``mcp``), both inside the app's process and behind its model queue."""
