"""What goes into the engine and what comes out of it: one typed definition for the server and `generate`.

Inputs: `GenerateRequest`, `EmbedRequest`, `Cancel`. Outputs, each naming its request by `uid`: `Progress`,
`PromptLogprobs` and `Token` along the way, then exactly one terminal output per request: `Finished`,
`Embeddings` or `Failed`. Token ids travel, not token text: whoever shows them holds the tokenizer.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from .sampling import SamplingParams


class FinishReason(str, enum.Enum):
    STOP = "stop"  # an end token, a stop token or a stop string
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # cancelled: the client left (vLLM's name)


# ---- in ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerateRequest:
    uid: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    stop: tuple[str, ...] = ()  # stop strings (need the engine's tokenizer)
    prompt_logprobs: bool = False  # score the prompt too (echo with logprobs)
    progress: bool = False  # report each prefill layer
    timeout: float | None = None  # seconds from arrival at the engine; None: no deadline
    route: int = 0  # which HTTP process receives the outputs
    n: int = 1  # choices drawn from one prefill (the prompt's cache is copied, not recomputed)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True  # special tokens (end of sequence, padding) add no text


@dataclass(frozen=True)
class EmbedRequest:
    uid: str
    documents: tuple[tuple[int, ...], ...]
    pooling: str = "mean"
    contexts: tuple[int, ...] | None = None  # per document: its first tokens are attended to, not pooled
    timeout: float | None = None
    route: int = 0


@dataclass(frozen=True)
class Cancel:
    uid: str


EngineInput = GenerateRequest | EmbedRequest | Cancel


# ---- out -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Progress:
    uid: str
    layers_done: int
    layers: int
    prompt_tokens: int


@dataclass(frozen=True)
class PromptLogprobs:
    uid: str
    token_logprobs: list[float | None]  # the first prompt token has none
    top_logprobs: list[list[tuple[int, float]] | None]


@dataclass(frozen=True)
class Token:
    uid: str
    token: int
    text: str  # text made final by this token ("" while a character or a possible stop string is incomplete)
    logprob: float
    top_logprobs: list[tuple[int, float]]  # the likeliest `logprobs` tokens, and the chosen one
    index: int = 0  # which of the request's n choices
    finish: FinishReason | None = None  # set on the token that ends its choice


@dataclass(frozen=True)
class Finished:
    """Every choice has ended (each choice's own reason came on its last Token)."""

    uid: str
    reason: FinishReason  # ABORT when cancelled; LENGTH when max_tokens was 0; else the last choice's reason
    prompt_tokens: int
    completion_tokens: int  # over all choices


@dataclass(frozen=True)
class Embeddings:
    uid: str
    vectors: np.ndarray  # (documents, embedding size), float32
    prompt_tokens: int


class ErrorCode(str, enum.Enum):
    INVALID_REQUEST = "invalid_value"
    CONTEXT_LENGTH = "context_length_exceeded"
    TIMEOUT = "timeout"
    INTERNAL = "internal_error"
    ENGINE_DIED = "engine_unavailable"
    SHUTTING_DOWN = "server_shutting_down"


@dataclass(frozen=True)
class Failed:
    uid: str
    status: int  # the HTTP status it maps to
    message: str
    code: ErrorCode


EngineOutput = Progress | PromptLogprobs | Token | Finished | Embeddings | Failed
TERMINAL = (Finished, Embeddings, Failed)
