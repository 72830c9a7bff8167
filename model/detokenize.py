"""Incremental detokenization: token ids in, final text out, with stop strings held back until decided."""

from __future__ import annotations


class TextStream:
    """Incremental detokenization with stop strings.

    Each new token is decoded together with a few tokens before it (so SentencePiece keeps its word-initial
    spaces and multi-byte characters are decoded whole); text is released only once it is final: an
    incomplete UTF-8 sequence, or a possible beginning of a stop string, waits for the next tokens.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), context: list[int] | None = None, *,
                 include_stop: bool = False, skip_special: bool = True):
        self.tokenizer = tokenizer
        self.stop = stop
        self.include_stop = include_stop  # the matched stop string ends the text instead of being cut
        self.skip_special = skip_special
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids = list(context or [])[-6:]  # the prompt's last tokens, as decoding context
        # A prompt of token ids can end inside a character. Its bytes decode to more replacement characters
        # than the character they later complete, so the text after it would be measured from too far on and
        # lost; such a tail is the prompt's text, not context for the completion's.
        while self.ids and tokenizer.decode(self.ids).endswith("\ufffd"):
            self.ids.pop()
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # completion text decoded so far
        self.released = 0  # characters of `text` already returned

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; returns (newly final text, whether a stop string ended the text)."""
        if not self.skip_special and self.tokenizer.is_special(token):
            self._decode(final=True)  # what came before is final: the special token's text follows it
            self.text += self.tokenizer.token_text(token)
            self.ids, self.prefix_offset, self.read_offset = [], 0, 0
            return self._release(final=False)
        self.ids.append(token)
        self._decode(final=False)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text at the end of generation (an incomplete character is replaced)."""
        self._decode(final=True)
        return self._release(final=True)[0]

    def _decode(self, final: bool) -> None:
        before = self.tokenizer.decode(self.ids[self.prefix_offset: self.read_offset])
        after = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)

    def _release(self, final: bool) -> tuple[str, bool]:
        if self.stop:
            start = max(0, self.released - self.hold)
            hits = [(i, i + len(s) * self.include_stop) for i, s in
                    ((self.text.find(s, start), s) for s in self.stop) if i >= 0]
            if hits:
                end = min(hits)[1]
                out = self.text[self.released: end] if end > self.released else ""
                self.text, self.released = self.text[:end], end
                return out, True
        end = len(self.text) if final else max(self.released, len(self.text) - self.hold)
        out = self.text[self.released: end]
        self.released = end
        return out, False
