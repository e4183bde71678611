"""What pagedrt hands back: streaming events and finished completions."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass
class TokenLogprob:
    """A generated token's log-probability (log-softmax of the raw logits) and the top k."""

    token_id: int
    logprob: float
    top_logprobs: dict[int, float] = field(default_factory=dict)


@dataclass
class Event:
    """One sequence's progress since its last event.

    Sampling streams tokens as they come; beam search sends one final event per
    returned beam (``index`` = rank, best first) with its whole output.
    """

    request_id: str
    index: int                      # sample index (n > 1) or beam rank
    token_ids: list[int]            # new tokens
    text: str                       # new text (incremental detokenization)
    finished: bool                  # the last event of this sequence
    finish_reason: Optional[str]    # "stop", "length", "abort", "error" when finished
    request_finished: bool          # the last event of the whole request
    num_preemptions: int = 0
    error: Optional[str] = None
    time: float = 0.0               # when the engine emitted it, on time.monotonic()'s clock
    logprobs: Optional[list[TokenLogprob]] = None
    cumulative_logprob: Optional[float] = None
    #: prompt_logprobs set: prompt tokens 1, 2, ... as their positions are computed
    #: (all of them by the first event with a generated token)
    prompt_logprobs: Optional[list[TokenLogprob]] = None
    score: Optional[float] = None   # beams: cumulative_logprob / length ** length_penalty
    logits: Optional[np.ndarray] = None  # return_logits only: (rows, vocab)
    #: speculative decoding: this sequence's proposed tokens verified so far, and of those accepted
    spec_proposed: int = 0
    spec_accepted: int = 0


@dataclass
class CompletionOutput:
    """One finished sequence of a request."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: Optional[str]
    cumulative_logprob: Optional[float] = None
    logprobs: Optional[list[TokenLogprob]] = None
    score: Optional[float] = None
    spec_proposed: int = 0          # speculative decoding: proposals verified
    spec_accepted: int = 0          # ... and accepted


@dataclass
class Completion:
    """A finished request from :meth:`Runtime.generate`: ``outputs`` holds its
    sequences (n samples or the best beams, in index order); ``text``,
    ``token_ids`` and ``finish_reason`` are those of ``outputs[0]``."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    error: Optional[str] = None
    num_preemptions: int = 0
    #: prompt_logprobs set: one per prompt token after the first
    prompt_logprobs: Optional[list[TokenLogprob]] = None

    @property
    def text(self) -> str:
        return self.outputs[0].text if self.outputs else ""

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids if self.outputs else []

    @property
    def finish_reason(self) -> Optional[str]:
        return self.outputs[0].finish_reason if self.outputs else None
