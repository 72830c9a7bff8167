"""Byte and SentencePiece tokenizers, and which one a checkpoint directory selects."""

import ast
from pathlib import Path

import sentencepiece

from model.tokenizer import ByteTokenizer, SentencePieceTokenizer, load_tokenizer


def small_vocabulary(directory: Path, model_type: str):
    """A 40-piece SentencePiece model (no byte fallback) trained in `directory`, loaded as a checkpoint's."""
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)))
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(directory / "spiece"),
                                             vocab_size=40, model_type=model_type, minloglevel=2)
    return load_tokenizer(directory)


def test_bytes_follow_the_enwik8_convention():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("Aé")
    assert ids == [ord("A") + 2, 0xC3 + 2, 0xA9 + 2]
    assert tokenizer.decode(ids + [tokenizer.eos_id, tokenizer.pad_id]) == "Aé"
    assert tokenizer.vocab_size == 258 and tokenizer.decode_bytes(ids[1:2]) == b"\xc3"


def test_sentencepiece_model_in_a_checkpoint_directory(tmp_path):
    tokenizer = small_vocabulary(tmp_path, "unigram")
    assert isinstance(tokenizer, SentencePieceTokenizer)
    ids = tokenizer.encode("the lazy fox")
    assert all(0 <= i < tokenizer.vocab_size for i in ids) and tokenizer.decode(ids) == "the lazy fox"
    assert tokenizer.eos_id == 2
    assert isinstance(load_tokenizer(tmp_path / "elsewhere"), ByteTokenizer)


def test_token_text_and_bytes_are_what_each_token_stands_for():
    """Logprobs show each token's text and bytes as OpenAI's API does: the default model's pieces with their
    word-boundary mark as a space, byte-fallback pieces as the byte itself (bytes:\\xNN when not ASCII); the
    tokens' bytes join back into the text."""
    tokenizer = load_tokenizer("model/default")
    text = 'def the(x):\n\treturn "é😀"  # ok'
    ids = tokenizer.encode(text)
    assert b"".join(tokenizer.token_bytes(i) for i in ids) == text.encode()
    texts = [tokenizer.token_text(i) for i in ids]
    assert " the" in texts and "bytes:\\xc3" in texts and not any("\u2581" in t or "<0x" in t for t in texts)
    assert tokenizer.token_text(tokenizer.eos_id) == "</s>"
    byte = ByteTokenizer()
    assert [byte.token_text(i) for i in byte.encode("aé")] == ["a", "bytes:\\xc3", "bytes:\\xa9"]
    assert b"".join(byte.token_bytes(i) for i in byte.encode("aé")) == "aé".encode()


def test_fewest_tokens_is_a_bound_that_encoding_never_beats():
    """The bound a server refuses long texts by: never above the real count, and reached by the widest piece."""
    subwords = load_tokenizer("model/default")
    texts = ["", "x", " " * 1600, "\n" * 500, "assertIsInstance" * 40, "é😀\t" * 300,
             Path(ast.__file__).read_text(), Path(sentencepiece.__file__).read_text()]
    for tokenizer in (subwords, ByteTokenizer()):
        for text in texts:
            assert tokenizer.fewest_tokens(text) <= len(tokenizer.encode(text)), (tokenizer, text[:20])
    assert subwords.fewest_tokens(" " * 1600) == len(subwords.encode(" " * 1600)) == 100  # 16-space pieces
    assert ByteTokenizer().fewest_tokens("é" * 10) == 10


def test_fewest_tokens_makes_no_claim_for_a_vocabulary_without_byte_pieces(tmp_path):
    """Without byte fallback an unknown piece may stand for any run of text: the bound is one token."""
    tokenizer = small_vocabulary(tmp_path, "bpe")
    assert tokenizer.fewest_tokens("zzzzzzzz" * 100) == 1 and tokenizer.fewest_tokens("") == 0
