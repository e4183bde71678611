"""Per-request decoding parameters (names follow vLLM's SamplingParams)."""
from __future__ import annotations

from dataclasses import dataclass, field

from . import _core


@dataclass
class SamplingParams:
    """How one request decodes.

    Attributes:
        max_tokens: generated tokens at most (>= 1).
        ignore_eos: keep generating past the model's end-of-sequence tokens.
        stop_token_ids: extra token ids that end the request (the token is kept).
        return_logits: experimental, for tests and tools: events carry the raw
            fp32 logits of every position computed for the request.
    """

    max_tokens: int = 16
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    return_logits: bool = False

    def _to_core(self) -> _core.SamplingParams:
        p = _core.SamplingParams()
        p.max_tokens = int(self.max_tokens)
        p.ignore_eos = bool(self.ignore_eos)
        p.stop_token_ids = [int(t) for t in self.stop_token_ids]
        p.return_logits = bool(self.return_logits)
        return p
