"""The HTTP server: LitServe on uvicorn, OpenAI-compatible routes, one continuously batching engine per device.

- `settings`: configuration and the command line;
- `protocol`: request schemas, validation, OpenAI error bodies;
- `engine`: the scheduler (prefill, embeddings and decode steps interleaved, cancellation, deadlines);
- `worker`: the LitAPI that owns the engine and the ContinuousBatchingLoop subclass that drives it;
- `spec`: the LitSpec with the HTTP routes, admission control and streaming;
- `metrics`: Prometheus metrics (vLLM's names);
- `app`: assembly, run, graceful drain on SIGTERM.
"""
