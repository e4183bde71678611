"""Incremental detokenization and stop strings, one sequence at a time.

Text is decoded in a window of token ids that starts a few tokens before the
new ones (inside the prompt at first), so that a leading space, a byte-level
BPE character split over several tokens, or a sentencepiece word boundary
comes out exactly as a full decode would give it; a delta that would end in a
half-written UTF-8 character (U+FFFD) waits for the next token.

A token costs one decode of the window: the window's text before it is kept
from the previous decode. The window grows by a token at a time and is cut
back, to the tokens of the last text read, once it holds more than the
tokenizer's window (one more decode then; Tokenizer._stream_decoder weighs a
decode's cost per call against its cost per token), so a token's cost does
not grow with the output:

    ids   [ c c c t t t t t | u u ]    c: context, t: tokens whose text is out,
            ^ window start  ^ read     u: tokens not readable yet (half a character)
    prefix = decode(ids[:read])        the new text: decode(ids)[len(prefix):]

With stop strings, the last ``max(len(stop)) - 1`` characters are held back
while streaming (they could be the start of a stop string); when one matches,
the text is cut there (the stop string itself is dropped unless
``include_stop_str_in_output``). Only text not yet handed out is kept.
"""
from __future__ import annotations

_CONTEXT = 5  # prompt tokens of context before the first output token


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids, *, skip_special_tokens=True, stop=(),
                 include_stop_str_in_output=False):
        self.tokenizer = tokenizer
        self._decode, self._hidden, self._window = tokenizer._stream_decoder(skip_special_tokens)
        self._vocab = tokenizer.vocab_size
        self.ids = self._checked(prompt_ids[-_CONTEXT:])   # the window (see above)
        self.read = len(self.ids)
        self.prefix = self._decode(self.ids)
        self.tail = ""                                     # decoded text not handed out yet
        self.stop = [s for s in stop if s]
        self.include_stop = include_stop_str_in_output
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.stopped = False
        self.consumed = 0   # tokens of the last push() used: all, or those through a stop string

    def _checked(self, token_ids) -> list[int]:
        """The ids as ints, less the hidden ones; ValueError for one out of range."""
        out = []
        for t in token_ids:
            t = self._check(t)
            if t not in self._hidden:
                out.append(t)
        return out

    def _check(self, t) -> int:
        t = int(t)
        if not 0 <= t < self._vocab:
            self.tokenizer.decode([t])  # raises, naming the id and the tokenizer
        return t

    def _stop_hit(self):
        """The first stop string in self.tail, as (index, string), or None."""
        best = None
        for s in self.stop:
            i = self.tail.find(s)
            if i >= 0 and (best is None or (i, s) < best):
                best = (i, s)
        return best

    def push(self, token_ids, final=False) -> str:
        """Adds tokens; returns the new text that can be shown now."""
        if self.stopped:
            self.consumed = 0
            return ""
        self.consumed = len(token_ids)
        ids, prefix = self.ids, self.prefix
        for n, t in enumerate(token_ids, 1):
            t = int(t)
            if not 0 <= t < self._vocab:
                self._check(t)
            if t in self._hidden:
                continue
            ids.append(t)
            full = self._decode(ids)
            if len(full) > len(prefix) and full[-1] != "\ufffd":
                self.tail += full[len(prefix):]
                if len(ids) > self._window:  # cut back to the tokens of this text: one more decode
                    del ids[:self.read]
                    full = self._decode(ids)
                prefix, self.read = full, len(ids)
                # Several tokens at once (speculative decoding): the ones after the
                # token that completes a stop string are not the sequence's.
                if self.stop and n < len(token_ids) and self._stop_hit() is not None:
                    self.consumed = n
                    break
        self.prefix = prefix
        if final and self.read < len(ids):  # flush an incomplete tail as is
            self.tail += self._decode(ids)[len(prefix):]
            self.read = len(ids)
        if not self.stop:
            delta, self.tail = self.tail, ""
            return delta
        hit = self._stop_hit()
        if hit is not None:
            i, s = hit
            self.tail = self.tail[:i + (len(s) if self.include_stop else 0)]
            self.stopped = final = True
        cut = len(self.tail) if final else max(0, len(self.tail) - self.hold)
        delta, self.tail = self.tail[:cut], self.tail[cut:]
        return delta
