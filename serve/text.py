"""Incremental detokenization with stop strings, for streaming.

Decoding the whole completion at every step would be right but quadratic: a 1,000-token answer
decodes half a million tokens. Instead each step decodes a short window twice — the tokens from
``prefix`` to ``read`` (already turned into text) and from ``prefix`` to the end — and emits the
difference. Starting both at the same token keeps what a decoder does at the start of a string
(a dropped leading space) and BPE merges right; a window that still ends in a partial UTF-8
character (U+FFFD) emits nothing until the character is complete. Text that could still turn
into a stop string is held back until it cannot.
"""

from __future__ import annotations


class TextTracker:
    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # the completion text so far, stop strings excluded
        self.sent = 0
        self._prefix = 0  # the window's first token
        self._read = 0  # tokens before this one are in self.text
        self._tokens: list[int] = []
        self._end = 0  # tokens pushed (the caller's list may grow past it, e.g. by an EOS)
        self._stopped = False

    def push(self, tokens: list[int]) -> tuple[str, bool]:
        """Take the tokens so far; return (new text safe to send, whether a stop string hit)."""
        self._tokens, self._end = tokens, len(tokens)
        if not self._advance(final=False):
            return "", False
        if self._stopped:
            return self._take(len(self.text)), True
        return self._take(len(self.text) - self.holdback), False

    def flush(self) -> str:
        """Everything not yet sent, at the end of the sequence (a partial character included)."""
        if not self._stopped:
            self._advance(final=True)
        return self._take(len(self.text))

    def _advance(self, *, final: bool) -> bool:
        """Append the window's new text to self.text; False if there is none yet."""
        decode, tokens = self.tokenizer.decode, self._tokens
        done = decode(tokens[self._prefix : self._read], skip_special_tokens=True)
        window = decode(tokens[self._prefix : self._end], skip_special_tokens=True)
        if len(window) <= len(done) or (window.endswith("\ufffd") and not final):
            return False  # no text yet, or a character still being spelled out byte by byte
        before = len(self.text)
        self.text += window[len(done) :]
        self._prefix, self._read = self._read, self._end
        # A stop string can only end in the new text: search from where it could start.
        start = max(0, before - self.holdback)
        hits = [at for at in (self.text.find(stop, start) for stop in self.stop) if at != -1]
        if hits:
            self.text, self._stopped = self.text[: min(hits)], True
        return True

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta = self.text[self.sent : upto]
        self.sent = upto
        return delta
