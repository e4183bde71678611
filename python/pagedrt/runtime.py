"""pagedrt.Runtime — the Python face of the C++ engine.

    rt = pagedrt.Runtime()                         # the default model, on the CPU
    rid = rt.submit("Hello", max_tokens=32)
    while True:
        for ev in rt.poll(timeout=0.1):
            ...                                    # ev.token_ids, ev.finished, ...

Tokenization happens here, in Python; the engine sees token ids only. No
PyTorch is imported anywhere in pagedrt.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Iterable, Sequence, Union

from . import _core
from .errors import InvalidArgument
from .models import resolve_model
from .sampling_params import SamplingParams
from .tokenizer import Tokenizer

Prompt = Union[str, Sequence[int], Sequence[dict]]


@dataclass
class Completion:
    """The result of one request from :meth:`Runtime.generate`."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    error: str | None = None


class Runtime:
    """An inference runtime holding one model, its KV-cache pool and an engine thread.

    Args:
        model: a model folder (Hugging Face layout: config.json, safetensors,
            tokenizer.json or tokenizer.model), a ``.gguf`` file (converted once
            into the cache), or None for the default model (SmolLM2-135M-Instruct).
        device: "auto", "cpu" or "cuda".
        dtype: weight dtype: "auto" (fp32 checkpoints stay fp32, others bf16),
            "float32" or "bfloat16". Activations are always fp32 on the CPU.
        kv_cache_bytes: hard cap of the KV pool in bytes (0: 512 MiB on the CPU).
        block_size: tokens per KV block.
        max_num_seqs: sequences per engine step at most.
        max_num_batched_tokens: tokens per engine step at most (chunked prefill).
        max_model_len: prompt plus output tokens at most (0: the model's limit).
        enable_prefix_caching: share identical prompt prefixes between requests.
        num_threads: CPU threads (0: all cores).
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        device: str = "auto",
        *,
        dtype: str = "auto",
        kv_cache_bytes: int = 0,
        block_size: int = 16,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        max_model_len: int = 0,
        enable_prefix_caching: bool = True,
        num_threads: int = 0,
    ) -> None:
        self.model_path = resolve_model(model)
        has_tokenizer = any((self.model_path / f).is_file()
                            for f in ("tokenizer.json", "tokenizer.model"))
        #: None for a folder without tokenizer files: then prompts must be token ids.
        self.tokenizer = Tokenizer.from_model_dir(self.model_path) if has_tokenizer else None
        self._rt = _core.Runtime(
            str(self.model_path), device=device, dtype=dtype, kv_cache_bytes=kv_cache_bytes,
            block_size=block_size, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching, num_threads=num_threads)
        self.model_info = self._rt.model_info()

    # -- requests ---------------------------------------------------------------------
    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids for a text, a list of token ids, or chat messages.

        Chat messages (a list of {"role", "content"} dicts) are rendered with the
        model's chat template (with the generation prompt) and encoded without
        adding special tokens again, as transformers does.
        """
        items = None if isinstance(prompt, str) else list(prompt)
        is_chat = bool(items) and all(isinstance(m, dict) for m in items)
        if (isinstance(prompt, str) or is_chat) and self.tokenizer is None:
            raise InvalidArgument(f"{self.model_path}: no tokenizer.json or tokenizer.model, "
                                  "so prompts must be token ids")
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if is_chat:
            text = self.tokenizer.apply_chat_template(items, add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in items):
            return [int(t) for t in items]
        raise InvalidArgument("prompt must be a string, a list of token ids, or a list of chat "
                              "messages ({'role': ..., 'content': ...} dicts)")

    def submit(self, prompt: Prompt, params: SamplingParams | None = None,
               request_id: str | None = None, **overrides) -> str:
        """Queues a request and returns its id at once.

        ``overrides`` set SamplingParams fields for this call
        (``rt.submit("hi", max_tokens=8)``).
        """
        params = params or SamplingParams()
        if overrides:
            fields = params.__dataclass_fields__
            unknown = [k for k in overrides if k not in fields]
            if unknown:
                raise InvalidArgument(f"unknown sampling parameter(s): {', '.join(unknown)}")
            params = SamplingParams(**{**params.__dict__, **overrides})
        ids = self.encode_prompt(prompt)
        return self._rt.submit(ids, params._to_core(), request_id or "")

    def poll(self, request_id: str | None = None, timeout: float = 0.0) -> list:
        """Events for any request (or only `request_id`), waiting at most `timeout` seconds."""
        if request_id is None:
            return self._rt.poll(float(timeout))
        return self._rt.poll_request(request_id, float(timeout))

    def abort(self, request_id: str) -> bool:
        """Ends a request at the next step; it still gets a final event (reason "abort")."""
        return self._rt.abort(request_id)

    def generate(self, prompts: Prompt | Iterable[Prompt], params: SamplingParams | None = None,
                 **overrides) -> list[Completion]:
        """Submits every prompt, waits for all, and returns their completions in order."""
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and isinstance(prompts[0], (int, dict))):
            prompts = [prompts]
        order, state = [], {}
        for p in prompts:
            ids = self.encode_prompt(p)
            rid = self.submit(ids, params, **overrides)
            order.append(rid)
            state[rid] = Completion(rid, ids, [], "", "")
        pending = set(order)
        while pending:
            for ev in self.poll(timeout=0.05):
                c = state.get(ev.request_id)
                if c is None:
                    continue
                c.token_ids.extend(ev.token_ids)
                if ev.finished:
                    c.finish_reason = ev.finish_reason
                    c.error = ev.error
                    pending.discard(ev.request_id)
        for c in state.values():
            c.text = self.tokenizer.decode(c.token_ids) if self.tokenizer else ""
        return [state[r] for r in order]

    # -- state ------------------------------------------------------------------------
    def stats(self):
        """KV blocks used/free, slots used, queue lengths, preemptions, token counts."""
        return self._rt.stats()

    def close(self) -> None:
        """Stops the engine; requests in flight end with finish_reason "abort"."""
        self._rt.close()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
