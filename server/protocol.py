"""The OpenAI API shape: request schemas, their validation into engine requests, errors, response bodies.

Every parameter is either honoured or refused with a 400 that names it; nothing is silently dropped.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from model.sampling import MAX_LOGPROBS, MAX_SEED, MAX_TEMPERATURE, InvalidParameter, SamplingParams

# A JSON number (an integer is accepted as a float); strings, booleans, NaN and infinities are refused.
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
MAX_STOP_STRINGS = 4


class APIError(Exception):
    """An error answered with the OpenAI error body {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error",
             504: "timeout_error"}
    # Statuses the openai SDK retries (it honours this header): a request that ran out of its own time
    # would only run out again.
    NOT_RETRIED = {504}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = dict(self.headers or {})
        if self.status in self.NOT_RETRIED:
            headers["x-should-retry"] = "false"
        return JSONResponse(self.body(), status_code=self.status, headers=headers)

    @classmethod
    def from_failure(cls, failed) -> APIError:
        """An engine's `Failed` output as the error a client sees."""
        return cls(failed.status, failed.message, code=failed.code.value)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class CompletionRequest(_Strict):
    model: StrictStr | None = None
    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = 16
    temperature: Annotated[Number, Field(ge=0, le=MAX_TEMPERATURE)] = 1.0
    top_p: Annotated[Number, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[StrictInt, Field(ge=-1)] = 0  # extension (vLLM): 0 or -1 disables
    seed: Annotated[StrictInt, Field(ge=0, le=MAX_SEED)] | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0)]] | None = None  # extension (vLLM)
    ignore_eos: StrictBool = False  # extension (vLLM)
    n: StrictInt = 1
    best_of: StrictInt | None = None
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: StrictBool = False
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    return_token_ids: StrictBool = False  # extension (vLLM)
    presence_penalty: Number = 0.0
    frequency_penalty: Number = 0.0
    logit_bias: dict[str, Any] | None = None
    suffix: StrictStr | None = None
    user: StrictStr | None = None  # accepted: written to the access log

    def stop_strings(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
            raise APIError(400, f"'stop' takes up to {MAX_STOP_STRINGS} non-empty strings.", param="stop",
                           code="invalid_value")
        return stop

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """The one conversion to sampling parameters (which check their own ranges)."""
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_k=max(0, self.top_k),
                                  top_p=self.top_p, seed=self.seed, stop_token_ids=tuple(self.stop_token_ids or ()),
                                  ignore_eos=self.ignore_eos, logprobs=self.logprobs)
        except InvalidParameter as error:
            raise APIError(400, str(error), param=error.param, code="invalid_value") from None


class Chunking(_Strict):
    size: StrictInt
    overlap: StrictInt = 0
    return_chunks: StrictBool = False


class EmbeddingRequest(_Strict):
    model: StrictStr | None = None
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: StrictStr | None = None
    pooling: Literal["mean", "first", "last", "max"] = "mean"  # extension
    normalize: StrictBool = True  # extension: OpenAI's embeddings are unit length
    chunking: Chunking | None = None  # extension: inputs longer than the context, pooled over chunks


class TokenizeRequest(_Strict):
    model: StrictStr | None = None
    prompt: StrictStr


class DetokenizeRequest(_Strict):
    model: StrictStr | None = None
    tokens: Annotated[list[StrictInt], Field(max_length=1 << 22)]


def parse(schema: type[BaseModel], body: bytes) -> BaseModel:
    """JSON body -> schema instance, or an APIError naming the offending parameter."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise APIError(400, f"the request body is not valid JSON ({error})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"] if not isinstance(part, int)) or None
        top = str(first["loc"][0]) if first["loc"] else None
        if first["type"] == "extra_forbidden":
            raise APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                           code="unknown_parameter") from None
        if first["type"] == "missing":
            raise APIError(400, f"Missing required parameter: '{param}'.", param=param,
                           code="missing_required_parameter") from None
        code = "invalid_type" if first["type"].endswith("_type") or first["type"] == "union_tag_invalid" \
            else "invalid_value"
        raise APIError(400, f"Invalid value for '{top}': {first['msg']}", param=top, code=code) from None


def unsupported(param: str, message: str) -> APIError:
    return APIError(400, f"'{param}' is not supported by this server: {message}", param=param,
                    code="unsupported_parameter")


def context_error(maximum: int, prompt: int, completion: int, param: str = "prompt") -> APIError:
    return APIError(400, f"This model's maximum context length is {maximum} tokens. However, you requested "
                         f"{prompt + completion} tokens ({prompt} in the prompt, {completion} for the completion). "
                         "Please reduce the length of the prompt or the completion.",
                    param=param, code="context_length_exceeded")
