"""/openapi.json with every POST route's request and response bodies and the model routes' answers, from the
pydantic models in `protocol` (the routes read raw bodies, so FastAPI cannot see them by itself). Swagger UI and ReDoc load
their scripts from a CDN, blank on a machine without internet: they are off."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .protocol import GET_BODIES, POST_BODIES, ErrorResponse

REF = "#/components/schemas/{model}"
ERRORS = {"400": "Invalid request", "401": "Missing or wrong API key", "404": "Unknown model",
          "408": "Body not received within --body-timeout", "413": "Body too large",
          "415": "Body not application/json", "429": "Queue full (Retry-After)",
          "503": "Loading, restarting or shutting down", "504": "Deadline passed"}


def document(app: FastAPI, title: str, version: str) -> None:
    app.router.routes = [route for route in app.router.routes
                         if getattr(route, "path", None) not in ("/docs", "/docs/oauth2-redirect", "/redoc")]

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=title, version=version, routes=app.routes,
                                 description="OpenAI-compatible completions, chat completions and embeddings "
                                             "served by a Reformer.")
            for methods in schema["paths"].values():
                methods.pop("head", None)  # the GET beside it says it all (and would repeat its operationId)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            error = _reference(ErrorResponse, components)
            for path, (request_model, response_model) in POST_BODIES.items():
                operation = schema["paths"][path]["post"]
                operation["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": _reference(request_model, components)}}}
                responses = {"200": {"description": "OK", "content": {
                    "application/json": {"schema": _reference(response_model, components)}}}}
                if path in ("/v1/completions", "/v1/chat/completions"):
                    responses["200"]["content"]["text/event-stream"] = {
                        "schema": {"type": "string", "description": "with stream: true, `data: <chunk>` events "
                                                                   "of this shape, then `data: [DONE]`"}}
                for status, description in ERRORS.items():
                    responses[status] = {"description": description,
                                         "content": {"application/json": {"schema": error}}}
                operation["responses"] = responses
            for path, response_model in GET_BODIES.items():
                schema["paths"][path]["get"]["responses"] = {
                    "200": {"description": "OK", "content": {
                        "application/json": {"schema": _reference(response_model, components)}}},
                    **({"404": {"description": ERRORS["404"], "content": {"application/json": {"schema": error}}}}
                       if "{model_id}" in path else {})}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _reference(model, components: dict) -> dict:
    schema = model.model_json_schema(ref_template=REF)
    components.update(schema.pop("$defs", {}))
    components[model.__name__] = schema
    return {"$ref": REF.format(model=model.__name__)}
