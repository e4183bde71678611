"""Per-request decoding parameters (names and meanings follow vLLM's SamplingParams).

How a token is picked, in this order: ``logit_bias`` is added; while fewer than
``min_tokens`` are generated, eos and ``stop_token_ids`` are banned;
``repetition_penalty`` (prompt and output tokens: logit > 0 ? logit / p : logit * p),
then ``frequency_penalty`` (minus f × count in the output) and ``presence_penalty``
(minus p if present in the output); then ``temperature == 0`` takes the largest
logit, otherwise logits / temperature, softmax, keep the ``top_k`` most likely, then
the smallest set reaching ``top_p``, then those with probability >= ``min_p`` × the
largest, renormalise and draw (from a stream seeded by ``seed`` if given).

Beam search (``beam_width > 1``) follows transformers' ``generate(num_beams=...)``:
``length_penalty`` and ``early_stopping`` mean what they mean there, and the best
``n`` beams are returned.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional, Union

from . import _core
from .errors import InvalidArgument
from .structured import constraint_of


# generation_config.json's sampling keys (generation_settings; pagedrt-chat's flags of the same names).
_GENERATION_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass
class SamplingParams:
    """How one request decodes. Invalid values raise InvalidArgument naming the field."""

    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: Optional[int] = None
    #: the logprob of every prompt token after the first (and the top k at its
    #: position), on Event.prompt_logprobs; such a request reuses no cached prefix
    prompt_logprobs: Optional[int] = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    skip_special_tokens: bool = True
    #: Structured output (at most one; pagedrt.structured, enforced by llguidance in
    #: the sampler): a JSON schema (dict or its text), any JSON object, a regex
    #: the whole answer matches, one of a list of strings, or a Lark grammar
    #: (llama.cpp GBNF is converted).
    json_schema: Union[dict, str, None] = None
    json_object: bool = False
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    beam_width: int = 1
    length_penalty: float = 1.0
    early_stopping: Union[bool, str] = False
    #: Experimental, for tests and tools: events carry the raw fp32 logits of
    #: every position computed for the request.
    return_logits: bool = False
    #: Speculative decoding (docs/speculative.md): "ngram" proposes the
    #: continuation of the longest recent n-gram (``ngram_max`` down to
    #: ``ngram_min`` tokens) found earlier in the prompt or output, up to
    #: ``num_speculative_tokens`` tokens, verified in one forward: greedy output is
    #: exactly the same as without, sampled output has the same distribution.
    #: "draft" has the Runtime's ``draft_model`` propose them (greedy steps of
    #: the smaller model).
    speculative: Optional[str] = None
    num_speculative_tokens: int = 8
    #: 2: a single matching token predicts poorly (docs/speculative.md).
    ngram_min: int = 2
    ngram_max: int = 4

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def replace(self, **changes) -> "SamplingParams":
        unknown = sorted(changes.keys() - _FIELDS)
        if unknown:
            raise InvalidArgument(f"unknown sampling parameter(s): {', '.join(unknown)}")
        return SamplingParams(**{**self.__dict__, **changes})  # once a submit with overrides: no fields() walk

    def _to_core(self) -> _core.SamplingParams:
        """The C++ parameters; the C++ side checks every numeric range."""
        def whole(name, value):
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidArgument(f"{name} must be an integer, got {value!r}")
            if not -2**31 <= value < 2**31:
                raise InvalidArgument(f"{name} is out of range: {value}")
            return value

        def number(name, value):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidArgument(f"{name} must be a number, got {value!r}")
            return float(value)

        p = _core.SamplingParams()
        p.n = whole("n", self.n)
        p.temperature = number("temperature", self.temperature)
        p.top_k = whole("top_k", self.top_k)
        p.top_p = number("top_p", self.top_p)
        p.min_p = number("min_p", self.min_p)
        p.repetition_penalty = number("repetition_penalty", self.repetition_penalty)
        p.presence_penalty = number("presence_penalty", self.presence_penalty)
        p.frequency_penalty = number("frequency_penalty", self.frequency_penalty)
        if self.seed is not None:
            seed = self.seed
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
                raise InvalidArgument(f"seed must be an integer in [0, 2**64), got {seed!r}")
            p.has_seed, p.seed = True, seed
        p.max_tokens = whole("max_tokens", self.max_tokens)
        p.min_tokens = whole("min_tokens", self.min_tokens)
        p.ignore_eos = bool(self.ignore_eos)
        p.stop_token_ids = [whole("stop_token_ids[]", t) for t in self.stop_token_ids]
        p.logprobs = None if self.logprobs is None else whole("logprobs", self.logprobs)
        p.prompt_logprobs = None if self.prompt_logprobs is None else whole("prompt_logprobs", self.prompt_logprobs)
        if not isinstance(self.logit_bias, dict):
            raise InvalidArgument("logit_bias must be a dict {token_id: bias}")
        p.logit_bias = [(whole("logit_bias key", int(k) if isinstance(k, str) and k.lstrip('-').isdigit() else k),
                         number(f"logit_bias[{k}]", v)) for k, v in self.logit_bias.items()]
        for s in self.stop_strings:
            if not isinstance(s, str) or not s:
                raise InvalidArgument(f"stop must be non-empty strings, got {s!r}")
        p.beam_width = whole("beam_width", self.beam_width)
        p.length_penalty = number("length_penalty", self.length_penalty)
        es = self.early_stopping
        if es not in (False, True, "never"):
            raise InvalidArgument(f'early_stopping must be False, True or "never", got {es!r}')
        p.early_stopping = {False: 0, True: 1, "never": 2}[es]
        if self.stop_strings and self.beam_width > 1:
            raise InvalidArgument("stop strings are not supported with beam search (use stop_token_ids)")
        p.return_logits = bool(self.return_logits)
        if self.speculative is not None and not isinstance(self.speculative, str):
            raise InvalidArgument(f'speculative must be "ngram", "draft" or None, got {self.speculative!r}')
        p.speculative = self.speculative or ""
        p.num_speculative_tokens = whole("num_speculative_tokens", self.num_speculative_tokens)
        p.ngram_min = whole("ngram_min", self.ngram_min)
        p.ngram_max = whole("ngram_max", self.ngram_max)
        p.masked = constraint_of(self) is not None
        p.validate()  # ranges, each named, in C++; token ids are checked at submit
        return p


_FIELDS = frozenset(f.name for f in fields(SamplingParams))


def generation_settings(path) -> dict:
    """The sampling settings a generation_config.json names (`path`: the
    file, or a model folder holding it), as SamplingParams fields:
    ``temperature``, ``top_p``, ``top_k``, ``min_p`` and
    ``repetition_penalty`` where present and not null; {} for a missing file.
    A value that is not a number, or out of range, raises InvalidArgument
    naming the file and the field."""
    import json
    import pathlib

    path = pathlib.Path(path)
    if path.is_dir():
        path = path / "generation_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"{path}: not readable as JSON ({e})") from None
    if not isinstance(config, dict):
        raise InvalidArgument(f"{path}: not a JSON object")
    found = {k: config[k] for k in _GENERATION_KEYS if config.get(k) is not None}
    for k, v in found.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InvalidArgument(f"{path}: {k} must be a number, got {v!r}")
        if k == "top_k" and v != int(v):
            raise InvalidArgument(f"{path}: top_k must be a whole number, got {v!r}")
        found[k] = int(v) if k == "top_k" else float(v)  # top_k 0: off, as in transformers
    try:
        SamplingParams(**found)._to_core()  # the ranges, checked where every request's are
    except InvalidArgument as e:
        raise InvalidArgument(f"{path}: {e}") from None
    return found
