"""Incremental detokenization, as vLLM does it: the text each new token adds, decoded from a short
window of ids instead of the whole answer again (which makes streaming quadratic in its length).

The window is ``ids[prefix_offset:]``: the tokens whose text was emitted last (kept as context,
for decoders whose output depends on neighbouring tokens) and the tokens after them
(``read_offset`` on). The window's text minus the context's text is the new text.

A byte-level tokenizer may split one character over several tokens; until the last one arrives
the window's text ends in U+FFFD. Only that trailing incomplete sequence is held back, and the
window keeps its tokens until it completes; the text before it is final, because UTF-8
resynchronizes at the next lead byte. So the deltas add up to exactly
``tokenizer.decode(ids, skip_special_tokens=True)``, except an incomplete sequence at the very
end, which a full decode at the finish flushes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

REPLACEMENT_CHAR = "\ufffd"


@dataclass
class IncrementalDetokenizer:
    """Per-sequence decoding state; ``step`` after each appended token."""

    skip_special_tokens: bool = True
    prefix_offset: int = 0  # first context token
    read_offset: int = 0  # first token after the context
    returned: int = 0  # characters past the context already returned while a character is incomplete

    def step(self, tokenizer: Any, ids: list[int]) -> str:
        """The final text that ``ids[-1]`` (just appended to ``ids``) adds; "" while it only starts a character."""
        prefix = tokenizer.decode(ids[self.prefix_offset:self.read_offset], skip_special_tokens=self.skip_special_tokens)
        text = tokenizer.decode(ids[self.prefix_offset:], skip_special_tokens=self.skip_special_tokens)
        incomplete = text.endswith(REPLACEMENT_CHAR)
        if incomplete:
            text = text[:-1]
        start = len(prefix) + self.returned
        if len(text) < start:  # a decoder that rewrote the context's text: wait for more tokens
            return ""
        new = text[start:]
        if incomplete:
            self.returned += len(new)
        else:
            self.prefix_offset, self.read_offset, self.returned = self.read_offset, len(ids), 0
        return new
