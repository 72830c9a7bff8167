"""The HTTP server (LitServe on uvicorn, OpenAI-compatible routes): built by issue #3 on top of `model`."""
