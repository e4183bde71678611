"""Incremental detokenization and stop strings, one sequence at a time.

Text is decoded in a sliding window that starts a few tokens before the new
ones (inside the prompt at first), so that a leading space, a byte-level BPE
character split over several tokens, or a sentencepiece word boundary comes
out exactly as a full decode would give it; a delta that would end in a
half-written UTF-8 character (U+FFFD) waits for the next token.

With stop strings, the last ``max(len(stop)) - 1`` characters are held back
while streaming (they could be the start of a stop string); when one matches,
the text is cut there (the stop string itself is dropped unless
``include_stop_str_in_output``).
"""
from __future__ import annotations

_CONTEXT = 5  # tokens of context before the first unread token


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids, *, skip_special_tokens=True, stop=(),
                 include_stop_str_in_output=False):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_ids[-_CONTEXT:])       # context tokens, then outputs
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""                                 # decoded output text so far
        self.emitted = 0                               # characters of self.text handed out
        self.stop = [s for s in stop if s]
        self.include_stop = include_stop_str_in_output
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.stopped = False
        self.consumed = 0   # tokens of the last push() used: all, or those through a stop string

    def _stop_hit(self, start):
        """The first stop string in self.text from `start`, as (index, string), or None."""
        hits = [(self.text.find(s, start), s) for s in self.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        return min(hits) if hits else None

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_ids, final=False) -> str:
        """Adds tokens; returns the new text that can be shown now."""
        if self.stopped:
            self.consumed = 0
            return ""
        before = len(self.text)
        start = max(0, before - self.hold)
        self.consumed = len(token_ids)
        for n, t in enumerate(token_ids, 1):
            self.ids.append(int(t))
            prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
            full = self._decode(self.ids[self.prefix_offset:])
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                self.text += full[len(prefix):]
                self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            # Several tokens at once (speculative decoding): the ones after the
            # token that completes a stop string are not the sequence's.
            if self.stop and n < len(token_ids) and self._stop_hit(start) is not None:
                self.consumed = n
                break
        if final and self.read_offset < len(self.ids):  # flush an incomplete tail as is
            prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
            self.text += self._decode(self.ids[self.prefix_offset:])[len(prefix):]
            self.read_offset = len(self.ids)
        end = len(self.text)
        if self.stop:
            hit = self._stop_hit(start)
            if hit is not None:
                i, s = hit
                self.text = self.text[:i + (len(s) if self.include_stop else 0)]
                self.stopped = True
                final = True
            end = len(self.text) if final else max(self.emitted, len(self.text) - self.hold)
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta
