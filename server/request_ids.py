"""X-Request-Id on every answer, errors and refusals included: the client's own when it sent one (so its logs
and ours can be joined), else one made here. The openai SDK shows it as `response._request_id`, as OpenAI's."""

from __future__ import annotations

import re
import uuid

GIVEN = re.compile(rb"[\x21-\x7e]{1,128}")  # a client's id is echoed only if it is short, visible ASCII


class RequestIdMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((value for name, value in scope["headers"] if name == b"x-request-id"), b"")
        request_id = given if GIVEN.fullmatch(given) else f"req_{uuid.uuid4().hex}".encode()
        # for the answer to a defect (error_bodies), which Starlette sends past this middleware
        scope.setdefault("state", {})["request_id"] = request_id.decode()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id)]
            await send(message)

        await self.app(scope, receive, send_with_id)
