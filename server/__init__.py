"""The HTTP server: LitServe on uvicorn, OpenAI-compatible routes, one continuously batching engine per device.

- `settings`: configuration and the command line;
- `protocol`: request and response schemas, validation, OpenAI error bodies;
- `spec`: the LitSpec: the route table, the checks every request passes, the small routes;
- `completions`, `chat`, `embeddings`: one module per inference route; `generation` turns engine outputs
  into OpenAI bodies and Server-Sent Events;
- `admission`: queue limits, a place held per request until it lets go; `capacity`: the decode cache's plan;
- `engine_client`: the only code that knows LitServe's queues; engine liveness;
- `worker`: the LitAPI that owns the engine (`model.engine`) and the loop that drives it;
- `lifecycle`: phases across processes, the heartbeat, signals, restarts;
- `metrics`: Prometheus metrics (vLLM's names); `openapi`: the documented schema;
- `http_limits`: header size and deadline, connection cap; `security`: the API key and CORS;
  `request_ids`: X-Request-Id; `error_bodies`: OpenAI errors for unknown routes, wrong methods and defects;
- `app`: assembly and run.
"""

__version__ = "0.1.0"
