"""The OpenAI API shape: request schemas, their validation into engine requests, errors, response bodies.

Every parameter is honoured or refused with a 400 that names it, except the few OpenAI hints and bookkeeping
fields listed on `ChatCompletionRequest` that this model has nothing to do with (reasoning_effort, store, ...).
"""

from __future__ import annotations

import json
import re
import typing
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError,
                      model_validator)

from model.sampling import (MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_PENALTY, MAX_SEED, MAX_TEMPERATURE, InvalidParameter,
                            SamplingParams)

# A JSON number (an integer is accepted as a float); strings, booleans, NaN and infinities are refused.
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
# Bounds on what one request may ask for, so that no parameter costs more than its bytes are worth.
MAX_STOP_STRINGS = 4
MAX_STOP_LENGTH = 256  # characters: streamed text is held back by the longest stop string
MAX_TOKEN_ID_LIST = 1024  # stop_token_ids, logit_bias entries
MAX_ALLOWED_TOKEN_IDS = 1 << 18
MAX_CHOICES = 16  # n and best_of (each choice holds a decode slot)
MAX_PROMPTS = 256  # prompts in one completion request
MAX_MESSAGES = 2048
MAX_EMBEDDING_CHUNKS = 4096  # documents one embedding request becomes after chunking
MAX_RETURNED_CHUNKS = 1024  # chunk vectors returned with return_chunks


class APIError(Exception):
    """An error answered with the OpenAI error body {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             405: "invalid_request_error", 408: "invalid_request_error", 415: "invalid_request_error",
             499: "invalid_request_error",
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


def _optional_fields_are_nullable(schema: dict[str, Any]) -> None:
    """The schema says what `_Strict._null_is_the_default` accepts: null in every optional field."""
    required = set(schema.get("required", ()))
    for name, field in schema.get("properties", {}).items():
        if name in required:
            continue
        choices = field.setdefault("anyOf", [])
        if not choices:  # a single type: move it into the choices, keep title, default and description outside
            choices.append({key: field.pop(key) for key in list(field) if key not in ("anyOf", "title", "default",
                                                                                       "description")})
        if {"type": "null"} not in choices:
            choices.append({"type": "null"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_optional_fields_are_nullable)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """OpenAI documents its optional fields as nullable, null asking for the default, and clients generated
        from its schema send it. A field whose None means something of its own (max_tokens: up to the
        context) keeps it; a required one stays required."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {key: value for key, value in data.items()
                if value is not None or key not in fields or fields[key].is_required()
                or type(None) in typing.get_args(fields[key].annotation)}


class StreamOptions(_Strict):
    include_usage: StrictBool = False  # a last chunk with the usage
    continuous_usage_stats: StrictBool = False  # usage so far on every chunk (vLLM)
    include_progress: StrictBool = False  # extension: ": prefill k/n layers" comments while a long prompt is read
    include_obfuscation: StrictBool = False  # OpenAI's padding against length side channels: none is added here


TokenId = Annotated[StrictInt, Field(ge=0)]


class SamplingFields(_Strict):
    """What completions and chat completions share: sampling, stopping, streaming (OpenAI's and vLLM's)."""

    model: StrictStr | None = None
    temperature: Annotated[Number, Field(ge=0, le=MAX_TEMPERATURE)] = 1.0
    top_p: Annotated[Number, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[StrictInt, Field(ge=-1)] = 0  # vLLM: 0 or -1 disables
    min_p: Annotated[Number, Field(ge=0, le=1)] = 0.0  # vLLM
    seed: Annotated[StrictInt, Field(ge=-MAX_SEED - 1, le=MAX_SEED)] | None = None  # OpenAI's: any int64
    n: Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES)] = 1
    stop: Annotated[StrictStr, Field(max_length=MAX_STOP_LENGTH)] | Annotated[
        list[Annotated[StrictStr, Field(max_length=MAX_STOP_LENGTH)]], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_TOKEN_ID_LIST)] | None = None  # vLLM
    ignore_eos: StrictBool = False  # vLLM
    min_tokens: Annotated[StrictInt, Field(ge=0)] = 0  # vLLM
    include_stop_str_in_output: StrictBool = False  # vLLM
    skip_special_tokens: StrictBool = True  # vLLM
    add_special_tokens: StrictBool = True  # vLLM; either way the same here: our tokenizers add none to text
    truncate_prompt_tokens: Annotated[StrictInt, Field(ge=1)] | None = None  # vLLM: keep the prompt's last k tokens
    presence_penalty: Annotated[Number, Field(ge=-MAX_PENALTY, le=MAX_PENALTY)] = 0.0
    frequency_penalty: Annotated[Number, Field(ge=-MAX_PENALTY, le=MAX_PENALTY)] = 0.0
    repetition_penalty: Annotated[Number, Field(gt=0, le=MAX_PENALTY)] = 1.0  # vLLM
    logit_bias: Annotated[dict[str, Annotated[Number, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]],
                          Field(max_length=MAX_TOKEN_ID_LIST)] | None = None
    allowed_token_ids: Annotated[list[TokenId], Field(max_length=MAX_ALLOWED_TOKEN_IDS)] | None = None  # vLLM
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    return_token_ids: StrictBool = False  # vLLM
    user: StrictStr | None = None  # accepted: written to the access log

    def check_stream_options(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "'stream_options' is only allowed when 'stream' is true.", param="stream_options",
                           code="invalid_value")

    def completion_limit(self) -> int | None:
        """max_tokens, or max_completion_tokens, its newer name. Benchmark clients (guidellm) send both with the
        same value; two different limits are a question this server will not guess the answer to."""
        given = {getattr(self, name) for name in ("max_tokens", "max_completion_tokens")
                 if name in self.model_fields_set and getattr(self, name) is not None}
        if len(given) > 1:
            raise APIError(400, "'max_tokens' and 'max_completion_tokens' differ: send one of them, or the same "
                                "value in both.", param="max_completion_tokens", code="invalid_value")
        return given.pop() if given else self.max_tokens

    def stop_strings(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stop):  # their count and length are bounded by the field
            raise APIError(400, "'stop' strings must not be empty.", param="stop", code="invalid_value")
        return stop

    def sampling_params(self, max_tokens: int, logprobs: int | None, vocab_size: int,
                        defaults: dict[str, float] | None = None, eos_token_id: int | None = None) -> SamplingParams:
        """The one conversion to sampling parameters, which check their own ranges and, against the
        vocabulary, every token id they hold (stop tokens, biases, allowed tokens). `defaults` (the model's
        generation_config.json) fill the fields the request did not set."""
        unset = {name: value for name, value in (defaults or {}).items() if name not in self.model_fields_set}
        if unset:
            return self.model_copy(update=unset).sampling_params(max_tokens, logprobs, vocab_size,
                                                                  eos_token_id=eos_token_id)
        try:
            bias = tuple((int(token), float(value)) for token, value in (self.logit_bias or {}).items())
        except ValueError:
            raise APIError(400, "'logit_bias' keys must be token ids.", param="logit_bias",
                           code="invalid_value") from None
        seed = None if self.seed is None else self.seed % (MAX_SEED + 1)  # OpenAI's seeds may be negative
        try:
            params = SamplingParams(
                max_tokens=max_tokens, temperature=self.temperature, top_k=max(0, self.top_k), top_p=self.top_p,
                seed=seed, stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
                logprobs=logprobs, presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                repetition_penalty=self.repetition_penalty, logit_bias=bias, min_p=self.min_p,
                min_tokens=self.min_tokens,
                allowed_token_ids=tuple(self.allowed_token_ids) if self.allowed_token_ids is not None else None)
            params.validate(vocab_size, eos_token_id)
            return params
        except InvalidParameter as error:
            raise APIError(400, str(error), param=error.param, code="invalid_value") from None


class CompletionRequest(SamplingFields):
    prompt: StrictStr | list[StrictInt] | Annotated[list[StrictStr], Field(max_length=MAX_PROMPTS)] | Annotated[
        list[list[StrictInt]], Field(max_length=MAX_PROMPTS)]
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = 16
    max_completion_tokens: Annotated[StrictInt, Field(ge=0)] | None = None  # the chat name, which some clients send
    best_of: Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES)] | None = None
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: StrictBool = False
    suffix: StrictStr | None = None


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class ContentPart(BaseModel):
    """Any part parses, so that a part this model cannot read (an image) is refused by name, not as a type
    mismatch; keys beside type and text (cache_control) are ignored."""
    type: StrictStr
    text: StrictStr | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: passed to the template as they are

    role: StrictStr
    content: StrictStr | list[ContentPart] | None = None

    def check(self, index: int) -> None:
        """A role OpenAI knows, content present, and content of text only."""
        if self.role not in CHAT_ROLES:
            raise APIError(400, f"messages[{index}].role is '{self.role}'; it must be one of "
                                f"{', '.join(CHAT_ROLES)}.", param=f"messages[{index}].role", code="invalid_value")
        extra = self.model_extra or {}
        calls = extra.get("tool_calls") or extra.get("function_call")
        if self.content is None and not (self.role == "assistant" and calls):
            # OpenAI's rule: only an assistant message that calls tools (or a function, the older form) may
            # leave its content out
            raise APIError(400, f"Missing required parameter: 'messages[{index}].content'.",
                           param=f"messages[{index}].content", code="missing_required_parameter")
        for number, part in enumerate(self.content if isinstance(self.content, list) else []):
            where = f"messages[{index}].content[{number}]"
            if part.type != "text":
                raise unsupported(where, f"content parts of type '{part.type}': this model reads text only")
            if part.text is None:
                raise APIError(400, f"{where} is a text part without 'text'.", param=where,
                               code="missing_required_parameter")

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)  # as vLLM renders text parts
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    add_generation_prompt: StrictBool = True  # vLLM
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM: extra variables for the template
    # Accepted when they ask for nothing this server lacks (`ChatRoute` refuses the rest by name):
    tools: list | None = None
    tool_choice: Any = None
    functions: list | None = None  # OpenAI's older names for tools and tool_choice
    function_call: Any = None
    parallel_tool_calls: StrictBool | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[StrictStr] | None = None
    audio: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    # Hints for models that reason, talk at length or reuse predicted text, and OpenAI's bookkeeping: accepted
    # and ignored (this model does not reason; it stores no completions and has one service tier).
    reasoning_effort: StrictStr | None = None
    verbosity: StrictStr | None = None
    prediction: dict[str, Any] | None = None
    store: StrictBool | None = None
    metadata: Annotated[dict[StrictStr, Annotated[StrictStr, Field(max_length=512)]],
                        Field(max_length=16)] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast"] | None = None
    prompt_cache_key: StrictStr | None = None
    prompt_cache_retention: StrictStr | None = None
    prompt_cache_options: dict[str, Any] | None = None
    safety_identifier: StrictStr | None = None


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
    """vLLM's two forms: a prompt, or the messages of a chat as the chat template renders them."""
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None
    add_generation_prompt: StrictBool = True
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: StrictBool = True  # accepted: this server's tokenizers add no special tokens to text

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise APIError(400, "Send either 'prompt' or 'messages'.", param="prompt",
                           code="missing_required_parameter" if self.prompt is None else "invalid_value")

    def chat(self) -> ChatCompletionRequest:
        return ChatCompletionRequest(messages=self.messages, add_generation_prompt=self.add_generation_prompt,
                                     chat_template_kwargs=self.chat_template_kwargs)


class DetokenizeRequest(_Strict):
    model: StrictStr | None = None
    tokens: Annotated[list[StrictInt], Field(max_length=1 << 22)]


# pydantic names a union's branches in an error's location ("str", "list[ContentPart]"); a request has no
# such fields
_BRANCHES = re.compile(r"str|int|float|bool|none|.*[^\w].*")


def _param_path(location: tuple) -> str | None:
    """An error's location as OpenAI names a parameter: messages[0].content[1].type."""
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not _BRANCHES.fullmatch(str(part)):
            path += f".{part}" if path else str(part)
    return path or None


def parse(schema: type[BaseModel], body: bytes) -> BaseModel:
    """JSON body -> schema instance, or an APIError naming the offending parameter. Whatever the bytes, the
    answer is a 400, never a server error: invalid UTF-8, lone surrogates (valid JSON escapes that no text
    encoding can write), integers of thousands of digits, nesting too deep to parse."""
    try:
        data = json.loads(body)
        if b"\\u" in body:  # only escapes can make a lone surrogate: check the decoded strings then
            json.dumps(data, ensure_ascii=False).encode("utf-8")
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise APIError(400, f"the request body is not valid JSON ({error})", code="invalid_json") from None
    except UnicodeEncodeError:
        raise APIError(400, "the request body holds an unpaired UTF-16 surrogate (a \\ud800-\\udfff escape "
                            "without its pair), which is not text", code="invalid_json") from None
    except ValueError as error:  # int() refuses more than 4300 digits
        raise APIError(400, f"the request body holds a number that cannot be read ({error})",
                       code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        errors = error.errors()
        # A union field reports every branch; the branch of the JSON type that was sent fails on its value (a
        # list too long), the others on their type. Say the value's error, not "should be a string".
        first = next((e for e in errors if not e["type"].endswith("_type")), errors[0])
        param = _param_path(first["loc"])
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


def text_too_long(maximum: int, characters: int, tokens: int, param: str, advice: str) -> APIError:
    """A text refused on its length alone (`Tokenizer.fewest_tokens`): it is at least `tokens` tokens long."""
    return APIError(400, f"This model's maximum context length is {maximum} tokens; this text of {characters:,} "
                         f"characters is at least {tokens:,} tokens. {advice}", param=param,
                    code="context_length_exceeded")


# ---- response bodies (for /openapi.json; the tests validate real responses against them) -----------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None


class CompletionResponse(BaseModel):
    """The body of a completion; a streamed chunk has the same shape (usage only on the last, if asked)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"] | None
    token_ids: list[int] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class EmbeddingChunk(BaseModel):
    start: int
    end: int
    embedding: list[float] | str


class EmbeddingData(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # base64 of little-endian float32 with encoding_format "base64"
    chunks: list[EmbeddingChunk] | None = None


class EmbeddingResponse(BaseModel):
    object: Literal["list"]
    data: list[EmbeddingData]
    model: str
    usage: Usage


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelObject(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int  # vLLM's field: the longest prompt + completion


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelObject]


# What each route reads and answers: /openapi.json is written from these tables.
POST_BODIES: dict[str, tuple[type[BaseModel], type[BaseModel]]] = {
    "/v1/completions": (CompletionRequest, CompletionResponse),
    "/v1/chat/completions": (ChatCompletionRequest, ChatCompletionResponse),
    "/v1/embeddings": (EmbeddingRequest, EmbeddingResponse),
    "/tokenize": (TokenizeRequest, TokenizeResponse),
    "/detokenize": (DetokenizeRequest, DetokenizeResponse),
}
GET_BODIES: dict[str, type[BaseModel]] = {"/v1/models": ModelList, "/v1/models/{model_id}": ModelObject}
