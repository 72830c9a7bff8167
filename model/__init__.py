"""Reformer core: a reference-exact model, cached-bucket incremental decoding, sampling and embeddings."""

from .checkpoint import load_model, save_model
from .config import ConfigError, ReformerConfig
from .decode import ContextLengthError, Decoder
from .embed import embed
from .generate import GenerationOutput, generate
from .reformer import ReformerLM
from .sampling import Sampler, SamplingParams
from .tokenizer import ByteTokenizer, SentencePieceTokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer", "ConfigError", "ContextLengthError", "Decoder", "GenerationOutput", "ReformerConfig",
    "ReformerLM", "Sampler", "SamplingParams", "SentencePieceTokenizer", "embed", "generate", "load_model",
    "load_tokenizer", "save_model",
]
