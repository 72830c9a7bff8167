"""Byte and SentencePiece tokenizers, and which one a checkpoint directory selects."""

import sentencepiece

from model.tokenizer import ByteTokenizer, SentencePieceTokenizer, load_tokenizer


def test_bytes_follow_the_enwik8_convention():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("Aé")
    assert ids == [ord("A") + 2, 0xC3 + 2, 0xA9 + 2]
    assert tokenizer.decode(ids + [tokenizer.eos_id, tokenizer.pad_id]) == "Aé"
    assert tokenizer.vocab_size == 258 and tokenizer.decode_bytes(ids[1:2]) == b"\xc3"


def test_sentencepiece_model_in_a_checkpoint_directory(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)))
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "spiece"),
                                             vocab_size=40, model_type="unigram", minloglevel=2)
    tokenizer = load_tokenizer(tmp_path)
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
