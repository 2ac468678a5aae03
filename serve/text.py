"""Incremental detokenization with stop strings, for streaming.

Decoding the whole completion each step keeps multi-byte characters and BPE merges right; text
that could still turn into a stop string, or ends in a partial character, is held back until it
cannot.
"""

from __future__ import annotations


class TextTracker:
    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # the completion text so far, stop strings excluded
        self.sent = 0

    def push(self, tokens: list[int]) -> tuple[str, bool]:
        """Take the tokens so far; return (new text safe to send, whether a stop string hit)."""
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        hits = [at for at in (text.find(stop) for stop in self.stop) if at != -1]
        if hits:
            self.text = text[: min(hits)]
            return self._take(len(self.text)), True
        self.text = text
        safe = len(text) - self.holdback
        if text.endswith("\ufffd"):  # a character still being spelled out byte by byte
            safe = min(safe, len(text) - 1)
        return self._take(safe), False

    def flush(self) -> str:
        """Everything not yet sent, at the end of the sequence."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta = self.text[self.sent:upto]
        self.sent = upto
        return delta
