"""The OpenAI request bodies pagedrt-serve accepts, checked field by field, and
the response objects it returns (OpenAI's names; vLLM's extra sampling fields).

Nothing here touches the engine: a body that fails a check raises APIError
(status 400, the message and ``param`` naming the field) before anything is
submitted.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Optional

from ..errors import InvalidArgument, Unsupported
from ..outputs import TokenLogprob
from ..sampling_params import SamplingParams


class APIError(Exception):
    """An error answered with OpenAI's error object and an HTTP status."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, type: str = "invalid_request_error",
                 code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param)


# Sampling fields: (OpenAI or vLLM name, SamplingParams field, accepted types).
_NUM, _INT, _BOOL = (int, float), (int,), (bool,)
_SAMPLING = [("n", "n", _INT), ("temperature", "temperature", _NUM), ("top_p", "top_p", _NUM),
             ("seed", "seed", _INT), ("presence_penalty", "presence_penalty", _NUM),
             ("frequency_penalty", "frequency_penalty", _NUM), ("top_k", "top_k", _INT), ("min_p", "min_p", _NUM),
             ("repetition_penalty", "repetition_penalty", _NUM), ("min_tokens", "min_tokens", _INT),
             ("ignore_eos", "ignore_eos", _BOOL), ("skip_special_tokens", "skip_special_tokens", _BOOL),
             ("include_stop_str_in_output", "include_stop_str_in_output", _BOOL),
             ("speculative", "speculative", (str,)), ("num_speculative_tokens", "num_speculative_tokens", _INT)]
_GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}  # vLLM's names of the structured-output fields
_COMMON = {"model", "stream", "stream_options", "max_tokens", "stop", "stop_token_ids", "logit_bias", "user",
           "logprobs", "response_format"} | {name for name, _, _ in _SAMPLING} | set(_GUIDED)
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs"}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "suffix"}


def typed(body: dict, name: str, types: tuple, default: Any = None) -> Any:
    """body[name] when it is one of `types` (a bool is not a number), else APIError."""
    if name not in body or body[name] is None:
        return default
    v = body[name]
    ok = isinstance(v, types) and (bool in types or not isinstance(v, bool))
    if not ok:
        want = " or ".join(t.__name__ for t in types)
        raise bad(name, f"must be {'a ' if len(types) == 1 else ''}{want}, got {type(v).__name__} {v!r}"[:300])
    return v


def check_fields(body: dict, allowed: set, where: str) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad(unknown[0], f"unknown or unsupported field for {where} "
                              f"(supported: {', '.join(sorted(allowed))})")


def sampling_params(body: dict, *, chat: bool, prompt_len: int, max_model_len: int,
                    speculative: Optional[str] = None, echo_logprobs: bool = False,
                    defaults: Optional[dict] = None) -> SamplingParams:
    """The request's SamplingParams; every value range is checked by pagedrt itself
    (SamplingParams -> C++ validate), whose message names the field.
    `speculative`: the server's default (--speculative) for a request that sets
    none and can use it (not echo with logprobs). `defaults`: SamplingParams
    fields for those the request omits (the model's generation_config.json
    settings under --generation-config auto)."""
    kw: dict[str, Any] = dict(defaults or {})
    for name, field, types in _SAMPLING:
        v = typed(body, name, types)
        if v is not None:
            kw[field] = v
    room = max(max_model_len - prompt_len, 0)
    max_tokens = typed(body, "max_tokens", _INT)
    if chat:
        max_tokens = typed(body, "max_completion_tokens", _INT, max_tokens)
    kw["max_tokens"] = (room if chat else min(16, room)) if max_tokens is None else max_tokens
    stop = typed(body, "stop", (str, list))
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not all(isinstance(s, str) and s for s in stops):
            raise bad("stop", "must be a non-empty string or a list of them")
        if len(stops) > 16:
            raise bad("stop", f"at most 16 stop strings, got {len(stops)}")
        kw["stop"] = stops
    ids = typed(body, "stop_token_ids", (list,))
    if ids is not None:
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise bad("stop_token_ids", "must be a list of token ids")
        kw["stop_token_ids"] = ids
    bias = typed(body, "logit_bias", (dict,))
    if bias is not None:
        out = {}
        for k, v in bias.items():
            if not (isinstance(k, str) and k.lstrip("-").isdigit()) or isinstance(v, bool) or not isinstance(v, _NUM):
                raise bad("logit_bias", f"must map token ids to numbers, got {k!r}: {v!r}")
            out[int(k)] = float(v)
        kw["logit_bias"] = out
    if chat:
        if typed(body, "logprobs", _BOOL, False):
            kw["logprobs"] = typed(body, "top_logprobs", _INT, 0)
        elif body.get("top_logprobs") is not None:
            raise bad("top_logprobs", "needs logprobs: true")
    else:
        lp = typed(body, "logprobs", _INT)
        if lp is not None:
            kw["logprobs"] = lp
    constraint = structured(body)
    kw.update(constraint)
    if echo_logprobs:  # the prompt's logprobs too (scoring, lm-eval)
        kw["prompt_logprobs"] = kw.get("logprobs")
    if speculative and "speculative" not in kw and not echo_logprobs:
        kw["speculative"] = speculative
    params = SamplingParams(**kw)
    try:
        params._to_core()
    except (InvalidArgument, Unsupported) as e:
        raise APIError(400, str(e), param=_param_of(str(e))) from None
    return params


def structured(body: dict) -> dict:
    """The structured-output SamplingParams fields of OpenAI's response_format
    (json_object, json_schema) and vLLM's guided_* fields; the grammar itself
    is checked at submit (InvalidArgument -> 400)."""
    kw: dict[str, Any] = {}
    rf = typed(body, "response_format", (dict,))
    if rf is not None:
        kind = rf.get("type")
        if kind == "json_object":
            kw["json_object"] = True
        elif kind == "json_schema":
            spec = rf.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise bad("response_format", "json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
            kw["json_schema"] = spec["schema"]
        elif kind != "text":
            raise bad("response_format", f"type must be text, json_object or json_schema, got {kind!r}")
    for name, field in _GUIDED.items():
        if body.get(name) is not None:
            kw[field] = body[name]
    if len(kw) > 1:
        raise bad(sorted(kw)[0], "at most one of response_format and the guided_* fields per request")
    return kw


def _param_of(message: str) -> Optional[str]:
    """The field a pagedrt validation message names (its first word), if any."""
    head = message.split(" ", 1)[0].rstrip(":,")
    return head if head.replace("_", "").isalpha() else None


def chat_messages(body: dict) -> list[dict]:
    """The messages as {"role", "content"} dicts with string content (OpenAI's
    content parts of type "text" are joined)."""
    messages = typed(body, "messages", (list,))
    if not messages:
        raise bad("messages", "a non-empty list of messages is required")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}]", "must be an object with a string 'role'")
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"messages[{i}].content[{j}]", "only parts of type 'text' are supported")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content", "must be a string or a list of text parts")
        out.append({"role": m["role"], "content": content})
    return out


def completion_prompts(body: dict) -> list:
    """/v1/completions' prompt: a string, a list of token ids, or a batch of either."""
    p = body.get("prompt")
    if isinstance(p, str):
        return [p]
    if isinstance(p, list) and p:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            return [p]
        if all(isinstance(s, str) for s in p):
            return list(p)
        if all(isinstance(s, list) and s and all(isinstance(t, int) and not isinstance(t, bool) for t in s) for s in p):
            return list(p)
    raise bad("prompt", "must be a string, a list of token ids, or a non-empty list of either")


# ---- responses ---------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(reason: Optional[str]) -> Optional[str]:
    """pagedrt's reasons as OpenAI's: "stop" (eos, stop string or token) and "length"."""
    return None if reason is None else ("length" if reason == "length" else "stop")


class TokenText:
    """Token ids as the strings and bytes the logprobs objects show."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def entry(self, token_id: int, logprob: float) -> dict:
        s = self(token_id)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}


def chat_logprobs(lps: list[TokenLogprob], text: TokenText) -> dict:
    return {"content": [{**text.entry(lp.token_id, lp.logprob),
                         "top_logprobs": [text.entry(t, v) for t, v in sorted(lp.top_logprobs.items(),
                                                                              key=lambda kv: -kv[1])]}
                        for lp in lps]}


def completion_logprobs(lps: list[TokenLogprob], text: TokenText, offset: int,
                        prompt: Optional[tuple[list[int], list[TokenLogprob]]] = None) -> dict:
    """The legacy logprobs object; with `prompt` (echo: its token ids and their
    prompt logprobs) the prompt's tokens come first, the first one without a
    logprob (it has no context)."""
    entries: list[tuple[int, Optional[float], Optional[dict]]] = []
    if prompt is not None:
        ids, plps = prompt
        entries.append((ids[0], None, None))
        entries += [(lp.token_id, lp.logprob, lp.top_logprobs) for lp in plps]
    entries += [(lp.token_id, lp.logprob, lp.top_logprobs) for lp in lps]
    tokens, offsets = [], []
    for token_id, _, _ in entries:
        offsets.append(offset)
        tokens.append(text(token_id))
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [None if top is None else {text(t): v for t, v in top.items()} for _, _, top in entries],
            "text_offset": offsets}


def created() -> int:
    return int(time.time())
