"""Tokenizers: raw bytes (the enwik8 convention) and SentencePiece (`spiece.model`)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int | None
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_text(self, token: int) -> str: ...

    def token_bytes(self, token: int) -> bytes: ...

    def is_special(self, token: int) -> bool: ...

    def fewest_tokens(self, text: str) -> int:
        """A lower bound on len(encode(text)) found without encoding: a server refuses a text far too long for
        its context before the seconds that encoding megabytes takes."""
        ...


def byte_text(byte: int) -> str:
    """A token that stands for one byte, as OpenAI's API writes it: ASCII as itself, else bytes:\\xNN (one byte
    of a longer character is not text on its own)."""
    return chr(byte) if byte < 128 else f"bytes:\\x{byte:02x}"


class ByteTokenizer:
    """id = byte + 2; 0 is padding, 1 unused, 2 end of sequence (so a NUL byte reads as end of sequence)."""

    OFFSET = 2
    vocab_size = 256 + OFFSET
    pad_id = 0
    eos_id = 2

    def encode(self, text: str) -> list[int]:
        return [byte + self.OFFSET for byte in text.encode("utf-8")]

    def fewest_tokens(self, text: str) -> int:
        return len(text)  # a token per byte, and a character is one to four bytes

    def decode_bytes(self, ids: list[int]) -> bytes:
        """The bytes behind ids, special ids dropped (a stream decodes these incrementally)."""
        return bytes(i - self.OFFSET for i in ids if self.OFFSET < i < self.vocab_size)

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def is_special(self, token: int) -> bool:
        return not self.OFFSET < token < self.vocab_size

    def token_text(self, token: int) -> str:
        """One token as a string for logprobs (bytes that are not ASCII are written as in OpenAI's API)."""
        if token == self.eos_id:
            return "</s>"
        if not self.OFFSET < token < self.vocab_size:
            return ""
        return byte_text(token - self.OFFSET)

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for (a special token: its name's)."""
        if self.is_special(token):
            return self.token_text(token).encode()
        return bytes([token - self.OFFSET])


WORD_BOUNDARY = "\u2581"  # SentencePiece's mark for a space


class SentencePieceTokenizer:
    def __init__(self, model_file: str | Path):
        import sentencepiece

        self.processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.vocab_size = self.processor.get_piece_size()
        eos = self.processor.eos_id()
        self.eos_id = eos if eos >= 0 else None
        pad = self.processor.pad_id()
        self.pad_id = pad if pad >= 0 else 0
        self._widest_piece = self._widest_piece_characters()

    def _widest_piece_characters(self) -> int | None:
        """The most characters one token covers (a word-boundary mark is one space), or None when a token may
        cover any number: an unknown piece stands for unknown text when there are no byte pieces to spell it."""
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto.FromString(self.processor.serialized_model_proto())
        normalizer = proto.normalizer_spec
        if normalizer.name != "identity" or normalizer.remove_extra_whitespaces or not proto.trainer_spec.byte_fallback:
            return None  # a normalizer may shorten the text it encodes
        texts = [self.processor.id_to_piece(i) for i in range(self.vocab_size)
                 if not (self.processor.is_control(i) or self.processor.is_byte(i) or self.processor.is_unknown(i))]
        return max((len(piece) for piece in texts), default=1)

    def fewest_tokens(self, text: str) -> int:
        if self._widest_piece is None:
            return min(1, len(text))
        return -(-len(text) // self._widest_piece)

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text, out_type=int)

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode([i for i in ids if 0 <= i < self.vocab_size])

    def token_text(self, token: int) -> str:
        """One token as a string for logprobs: its text (the piece with its word-boundary mark as the space it
        stands for), a byte-fallback piece as `byte_text`, a control piece by its name."""
        if not 0 <= token < self.vocab_size:
            return ""
        if self.processor.is_byte(token):
            return byte_text(self._byte(token))
        piece = self.processor.id_to_piece(token)
        return piece if self.processor.is_control(token) or self.processor.is_unknown(token) else \
            piece.replace(WORD_BOUNDARY, " ")

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for (a control piece: its name's)."""
        if 0 <= token < self.vocab_size and self.processor.is_byte(token):
            return bytes([self._byte(token)])
        return self.token_text(token).encode()

    def _byte(self, token: int) -> int:
        return int(self.processor.id_to_piece(token)[3:5], 16)  # byte-fallback pieces are named <0xNN>

    def is_special(self, token: int) -> bool:
        return not 0 <= token < self.vocab_size or self.processor.is_control(token)


def load_tokenizer(checkpoint: str | Path | None) -> Tokenizer:
    """The tokenizer a checkpoint directory ships (spiece.model), else bytes."""
    if checkpoint is not None and (Path(checkpoint) / "spiece.model").exists():
        return SentencePieceTokenizer(Path(checkpoint) / "spiece.model")
    return ByteTokenizer()
