"""Who may use the server: the API key on every route but the probes, and CORS only when configured.

The key is checked by an ASGI middleware before any route runs (LitServe's own routes and /openapi.json
included), from `Authorization: Bearer KEY` or `X-API-Key: KEY`. Without `--cors-allow-origin`, no CORS
headers are sent, so a web page on another origin cannot read answers; cross-site "simple" requests are
refused by the JSON-only rule on POST bodies (`OpenAISpec.read_body`).
"""

from __future__ import annotations

import hmac

from starlette.middleware.cors import CORSMiddleware

from .protocol import APIError

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})  # probes and scrapers carry no key


def given_key(headers: dict[str, str]) -> str:
    header = headers.get("authorization", "")
    return header[7:] if header[:7].lower() == "bearer " else headers.get("x-api-key", "")


class APIKeyMiddleware:
    def __init__(self, app, key: str):
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        given = given_key(headers)
        if hmac.compare_digest(given.encode("latin-1"), self.key):
            return await self.app(scope, receive, send)
        message = "Incorrect API key provided." if given else "Missing API key: send 'Authorization: Bearer <key>'."
        response = APIError(401, message, code="invalid_api_key").response()
        await response(scope, receive, send)


def secure(app, api_key: str | None, cors_origins: list[str]) -> None:
    """Add the middlewares (the last added runs first: CORS answers preflights before the key is asked)."""
    if api_key:
        app.add_middleware(APIKeyMiddleware, key=api_key)
    if cors_origins:
        # Any request header: the openai JS SDK sends its own (x-stainless-*), and a fixed list refused its
        # preflight. The origins are what this guards.
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=["Retry-After", "X-Request-Id"])

