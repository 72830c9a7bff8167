"""Token streams for training: raw bytes, or a SentencePiece vocabulary learned from the train split.

A subword vocabulary lets each token cover several bytes (about 3.3 for Python source at 4,096 pieces), so
the same compute reads several times more text and a context of N tokens spans several times N bytes. The
vocabulary is trained to reproduce source exactly: no normalisation, no collapsed spaces, no dummy prefix,
newlines kept inside pieces' sentences, and bytes as the fallback for any character it has no piece for, so
`decode(encode(text)) == text` for every text. Ids 0, 1 and 2 are padding, unknown and end of sequence, as
in the byte tokenizer (where 2 is also the NUL byte that separates files).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from model.tokenizer import ByteTokenizer, SentencePieceTokenizer, Tokenizer

from .corpus import SourceFile

SPIECE = "spiece.model"
SENTENCE_CHARACTERS = 2000  # training sentences: runs of whole lines of about this many characters


def source_text(data: bytes) -> str:
    """A file's text. The few stdlib files that are not UTF-8 (encoding tests) read with replacements."""
    return data.decode("utf-8", errors="replace")


def _sentences(files: list[SourceFile]) -> Iterator[str]:
    for file in files:
        text, start = source_text(file.data), 0
        while start < len(text):
            end = text.find("\n", start + SENTENCE_CHARACTERS)
            end = len(text) if end < 0 else end + 1
            yield text[start:end]
            start = end


def train_sentencepiece(files: list[SourceFile], vocab_size: int, directory: Path, *,
                        sample_sentences: int = 6000, seed: int = 0) -> SentencePieceTokenizer:
    """Learn a BPE vocabulary of `vocab_size` pieces from the files; writes DIRECTORY/spiece.model."""
    import sentencepiece

    sentences = list(_sentences(files))
    order = np.random.default_rng(seed).permutation(len(sentences))[:sample_sentences]
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([sentences[i] for i in sorted(order)]), model_writer=proto,
        vocab_size=vocab_size, model_type="bpe", normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
        split_digits=False, byte_fallback=True, character_coverage=0.9999, max_sentence_length=1 << 16,
        pad_id=0, unk_id=1, eos_id=2, bos_id=-1, num_threads=2, minloglevel=2)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SPIECE).write_bytes(proto.getvalue())
    return SentencePieceTokenizer(directory / SPIECE)


def make_tokenizer(kind: str, files: list[SourceFile], directory: Path) -> Tokenizer:
    """"bytes", or "sentencepiece:N" (trained on `files` once, then read back from DIRECTORY/spiece.model)."""
    if kind == "bytes":
        return ByteTokenizer()
    name, _, size = kind.partition(":")
    if name != "sentencepiece" or not size.isdigit():
        raise ValueError(f"tokenizer must be 'bytes' or 'sentencepiece:N', not {kind!r}")
    if (directory / SPIECE).exists():
        return SentencePieceTokenizer(directory / SPIECE)
    return train_sentencepiece(files, int(size), directory)


def encode_files(files: list[SourceFile], tokenizer: Tokenizer) -> np.ndarray:
    """The files as one id stream, each followed by end of sequence (int64)."""
    if isinstance(tokenizer, ByteTokenizer):  # fast path, and exact for files that are not UTF-8
        data = b"".join(file.data + b"\0" for file in files)
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64) + ByteTokenizer.OFFSET
    ids: list[int] = []
    for file in files:
        ids += tokenizer.encode(source_text(file.data))
        ids.append(tokenizer.eos_id)
    return np.asarray(ids, dtype=np.int64)


def token_bytes(tokenizer: Tokenizer, ids: list[int]) -> np.ndarray:
    """How many bytes of text each id stands for (so bits can be reported per byte); special ids none."""
    return np.asarray([0 if tokenizer.is_special(i) else len(tokenizer.token_bytes(i)) for i in ids], dtype=np.int64)
