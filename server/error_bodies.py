"""OpenAI error bodies for what no route answers itself: unknown routes (404), wrong methods (405), and a
defect that raised (500), whose traceback goes to the log while the client still gets JSON it can read."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import APIError


def install(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, _routing_error)
    app.add_exception_handler(Exception, _defect)


async def _routing_error(request, error: StarletteHTTPException):
    codes = {404: "not_found", 405: "method_not_allowed"}
    message = {404: f"No route {request.url.path}.", 405: f"{request.method} is not allowed on {request.url.path}."}
    answer = APIError(error.status_code, message.get(error.status_code, str(error.detail)),
                      code=codes.get(error.status_code), headers=getattr(error, "headers", None))
    return answer.response()


async def _defect(request, error: Exception):
    request_id = getattr(request.state, "request_id", None)  # so the report can name it
    return APIError(500, "The server failed on this request; the failure is logged. Please report it.",
                    code="internal_error", headers={"X-Request-Id": request_id} if request_id else None).response()
