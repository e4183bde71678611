"""pagedrt.Runtime — the Python face of the C++ engine.

    rt = pagedrt.Runtime()                         # the default model, on the CPU
    rid = rt.submit("Hello", max_tokens=32)
    while True:
        for ev in rt.poll(rid, timeout=0.1):
            print(ev.text, end="")
            if ev.request_finished: ...

Tokenization, detokenization and stop strings happen here, in Python; the
engine sees token ids only. No PyTorch is imported anywhere in pagedrt.
"""
from __future__ import annotations

import asyncio
import os
import sys
import threading
import uuid
from typing import AsyncIterator, Iterable, Iterator, Sequence, Union

from . import _core
from .detokenizer import IncrementalDetokenizer
from .errors import InvalidArgument
from .models import resolve_model
from .outputs import Completion, CompletionOutput, Event, TokenLogprob
from .sampling_params import SamplingParams, generation_settings
from .structured import Constraints, constraint_of, grammar_of, mask_threads
from .tokenizer import Tokenizer

Prompt = Union[str, Sequence[int], Sequence[dict]]


def _token_logprobs(lps) -> list[TokenLogprob]:
    return [TokenLogprob(lp.token, lp.logprob, dict(zip(lp.top_ids, lp.top_logprobs))) for lp in lps]


class _RequestState:
    """Detokenizers and stop strings of one request's sequences."""

    def __init__(self, rt, params: SamplingParams, prompt_ids: list[int]):
        self.rt, self.params, self.prompt_ids = rt, params, prompt_ids
        self.detok: dict[int, IncrementalDetokenizer | None] = {}
        self.finished: set[int] = set()
        self.expected = params.n
        self.logprobs = params.logprobs is not None
        self.prompt_logprobs = params.prompt_logprobs is not None
        self.tracked = self.logprobs or params.beam_width > 1   # cumulative_logprob is meaningful
        self.beams = params.beam_width > 1

    def _detok(self, index):
        d = None
        if self.rt.tokenizer is not None:
            d = IncrementalDetokenizer(
                self.rt.tokenizer, self.prompt_ids, skip_special_tokens=self.params.skip_special_tokens,
                stop=self.params.stop_strings, include_stop_str_in_output=self.params.include_stop_str_in_output)
        self.detok[index] = d
        return d

    def convert(self, row) -> Event | None:
        """A core event (a row of _core.Runtime.poll_rows) as a Python Event, or
        None when it is swallowed (a sequence already ended by a stop string)."""
        (rid, index, tokens, finished, request_finished, reason, error, num_preemptions, time,
         cumulative_logprob, score, spec_proposed, spec_accepted, extra) = row
        if index in self.finished:
            return None
        d = self.detok[index] if index in self.detok else self._detok(index)
        text = ""
        if d is not None:
            text = d.push(tokens, final=finished)
            if d.stopped:
                del tokens[d.consumed:]  # tokens after the one that completed the stop string
                if not finished:
                    # A stop string matched in this event's text: end the sequence here,
                    # keep the tokens through the one that completed it, stop the engine's copy.
                    finished, reason = True, "stop"
                    self.rt._rt.stop_sequence(rid, index)
        logprobs = prompt_logprobs = logits = None
        if extra is not None:
            logits = extra.logits
        if self.logprobs:
            logprobs = _token_logprobs(extra.logprobs)[:len(tokens)] if extra is not None else []
        if self.prompt_logprobs:
            prompt_logprobs = _token_logprobs(extra.prompt_logprobs) if extra is not None else []
        if finished:
            self.finished.add(index)
        # positional, in Event's field order: keywords cost ~0.6 us an event more
        return Event(rid, index, tokens, text, finished, reason if finished else None,
                     (request_finished and finished) or len(self.finished) >= self.expected,
                     num_preemptions, error, time, logprobs, cumulative_logprob if self.tracked else None,
                     prompt_logprobs, score if self.beams else None, logits, spec_proposed, spec_accepted)


class _Output:
    """One sequence's output while its events come: the text's pieces are
    joined once at the end (adding to a str per event copies it each time)."""

    __slots__ = ("out", "texts")

    def __init__(self, index: int):
        self.out, self.texts = CompletionOutput(index, "", [], None), []


def _accumulate(c: Completion, parts: dict[int, _Output], ev: Event) -> None:
    """Folds one event into a completion's per-sequence outputs (see _outputs)."""
    part = parts.get(ev.index)
    if part is None:
        part = parts[ev.index] = _Output(ev.index)
    out = part.out
    if ev.text:
        part.texts.append(ev.text)
    out.token_ids += ev.token_ids
    if ev.logprobs is not None:
        out.logprobs = out.logprobs or []
        out.logprobs += ev.logprobs
    out.cumulative_logprob, out.score = ev.cumulative_logprob, ev.score
    out.spec_proposed, out.spec_accepted = ev.spec_proposed, ev.spec_accepted
    if ev.prompt_logprobs:
        c.prompt_logprobs = c.prompt_logprobs or []
        c.prompt_logprobs += ev.prompt_logprobs
    c.num_preemptions = ev.num_preemptions
    if ev.finished:
        out.finish_reason = ev.finish_reason
        c.error = c.error or ev.error


def _outputs(parts: dict[int, _Output]) -> list[CompletionOutput]:
    """The finished outputs of _accumulate's parts, in index order."""
    outs = []
    for i in sorted(parts):
        parts[i].out.text = "".join(parts[i].texts)
        outs.append(parts[i].out)
    return outs


class _LoadBar:
    """A progress bar over the weights' parts (embedding, layers, head), shown
    only when loading takes more than a second (a small model loads silently)."""

    def __init__(self, name: str):
        self.name, self.bar = name, None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc=f"Loading {self.name}", unit="part", delay=1.0, file=sys.stderr)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.bar.close()


#: The engine's options and their defaults: the C++ RuntimeConfig is their one
#: source (``print(pagedrt.RuntimeConfig())`` shows them).
RuntimeConfig = _core.RuntimeConfig
_OPTIONS = ("device", "dtype", "activation_dtype", "quantization", "kv_cache_dtype", "kv_cache_bytes", "gpu_memory_utilization", "elastic_kv",
            "kv_idle_release_s", "async_scheduling", "block_size",
            "max_num_seqs", "max_num_batched_tokens", "max_model_len", "enable_prefix_caching",
            "preemption_mode", "swap_space_bytes", "kv_watermark", "num_threads",
            "deterministic", "draft_model", "tensor_parallel_size", "devices")


def _point_to_nccl() -> None:
    """Tensor parallelism on CUDA loads NCCL at run time: from
    PAGEDRT_NCCL_LIBRARY, which this sets to the nvidia-nccl wheel's library
    when that is installed and the variable is not set (else the loader's
    path finds libnccl.so.2, or the Runtime says it cannot)."""
    if os.environ.get("PAGEDRT_NCCL_LIBRARY"):
        return
    import importlib.util
    try:
        spec = importlib.util.find_spec("nvidia.nccl")
    except (ImportError, ValueError):
        return
    for folder in (spec.submodule_search_locations or []) if spec else []:
        lib = os.path.join(folder, "lib", "libnccl.so.2")
        if os.path.isfile(lib):
            os.environ["PAGEDRT_NCCL_LIBRARY"] = lib
            return


class Runtime:
    """An inference runtime holding one model, its KV-cache pool and an engine thread.

    Args:
        model: a model folder (Hugging Face layout: config.json, safetensors,
            tokenizer.json or tokenizer.model), a ``.gguf`` file (converted once
            into the cache), or None for the default model (SmolLM2-135M-Instruct).
        progress: say on stderr when a GGUF is converted (once), and show a bar
            while the weights load when that takes more than a second.

    Engine options (keyword arguments; each one left out, or None, takes
    :class:`RuntimeConfig`'s default, shown in brackets):

        device ["auto"]: "auto" (the GPU when one is visible), "cpu" or "cuda".
        dtype ["auto"]: weight dtype: "auto" (fp32 checkpoints stay fp32, others
            bf16), "float32" or "bfloat16".
        activation_dtype ["auto"]: dtype of the activations between ops and of
            the KV cache: "auto" (CUDA: bfloat16; CPU: bfloat16 for bf16 weights
            on a processor with AVX-512 BF16, where it doubles the GEMM rate, else
            float32), "float32" (exact; on CUDA only with dtype="float32") or
            "bfloat16" (half the KV memory; on the CPU the same rounding points as
            the CUDA backend). The residual stream and all accumulation stay fp32.
        quantization [""]: "fp8" quantizes each layer's seven projection
            weights to e4m3 with a scale per output channel at load (no file
            written; embeddings, norms and the lm head stay as they are): half
            the memory of bf16 weights. CPU only so far. "" keeps the
            checkpoint's weights (an fp8 checkpoint with a scale per tensor or
            per channel keeps its codes on the CPU). ``model_info.weight_dtype``
            says "float8_e4m3fn" where the projections are fp8.
        kv_cache_dtype ["auto"]: the KV cache's element type: "auto" (the
            activations') or "fp8" (e4m3 codes with a power-of-two scale per
            token and kv head, dequantized inside the attention kernels: about
            twice bf16's tokens in the same bytes, 3.9 times fp32's;
            ``model_info.kv_cache_dtype`` says which applies). Needs a
            block_size that is a power of two or a multiple of 16.
        kv_cache_bytes [0]: hard cap of the KV pool in bytes (0: 512 MiB on the
            CPU; on a GPU, ``gpu_memory_utilization`` of the memory left after the weights).
        gpu_memory_utilization [0.9]: the fraction of free GPU memory the KV pool
            may take when ``kv_cache_bytes`` is 0.
        elastic_kv [True]: the KV pool's address range is reserved whole and
            its memory mapped in chunks as blocks are needed (CUDA virtual
            memory management; on the CPU, pages as they are touched), up to
            the size above, so a service embedding pagedrt keeps the GPU
            memory it does not use; chunks with no block in use go back after
            ``kv_idle_release_s`` without work. A chunk the device cannot map
            makes the pool full for the moment (requests wait or are
            preempted). ``stats().kv_mapped_bytes`` says what is mapped.
            False: the whole pool is taken at start.
        kv_idle_release_s [10.0]: seconds without work after which an elastic
            pool gives its unused chunks back (0: never), evicting the cached
            prefixes they held.
        async_scheduling ["auto"]: the engine schedules and launches the next
            step while the device runs the current one, and reads the current
            one's tokens after; steps with structured output, penalties, beams,
            n > 1 forks, speculation, returned logits or prompt logprobs run
            one at a time. "auto": on where the device runs steps
            asynchronously (CUDA); "on": also on the CPU (where it gains
            nothing and delays each token's event by a step: for tests); "off".
        block_size [16]: tokens per KV block.
        max_num_seqs [64]: sequences per engine step at most.
        max_num_batched_tokens [2048]: tokens per engine step at most (chunked prefill).
        max_model_len [0]: prompt plus output tokens at most (0: the model's limit).
        enable_prefix_caching [True]: share identical prompt prefixes between requests.
        preemption_mode ["auto"]: when a running request cannot get KV
            blocks, the latest admitted one gives its blocks up: "recompute"
            (freed; its tokens are computed again when it resumes), "swap"
            (copied to host memory and back when it resumes; recompute when
            the swap space is full) or "auto" (swap for a request of several
            sequences, n > 1 or beams, which recomputed would no longer share
            its prompt's blocks; for one sequence the cheaper of the two, by
            the seconds a recomputed token and a swapped block took lately).
            ``stats()`` counts both (``num_preemptions``, ``num_swapped_out``).
        swap_space_bytes [0]: host memory for swapped-out blocks (page-locked
            on CUDA; allocated at the first swap) with preemption_mode "swap"
            or "auto"; 0: as much as the KV pool, at most 4 GiB.
        kv_watermark [0.01]: the fraction of the KV pool's blocks, rounded up
            to whole blocks, that admission leaves free, in [0, 0.5): a waiting
            request starts only if that many blocks stay free once it has the
            blocks its prompt needs (those the prefix cache does not hold; the
            whole prompt also under chunked prefill; one more per further
            sequence of n > 1 or beams), so that a full pool does not admit
            requests only to preempt running ones as they grow. It holds for
            preempted requests coming back too, and is waived while nothing
            runs (a request too large for it runs alone). 0: no watermark.
        num_threads [0]: CPU threads (0: every core the process may run on:
            its affinity mask, at most its cgroup's CPU quota, as a container
            or taskset sets them); on CUDA, the host
            sampler's threads (0: at most 4, leaving the other cores to
            structured output's mask threads).
        deterministic [None]: batch-invariant results: a request's logits have
            the same bits whatever else is in its steps, however its prompt is
            chunked or cached, after preemption, with any number of CPU threads
            (docs/determinism.md). None: the device's default, True on the CPU
            (where it costs nothing measurable) but for bf16 activations on a
            processor with AMX (where False multiplies steps of 5 tokens or
            more on AMX tiles: 3.4x the prefill rate), False on CUDA (where True gives
            up the own small-batch GEMM kernel and split-KV decode attention, and
            raises Unsupported with fp8 weights or cache or tensor_parallel_size
            > 1). ``model_info.deterministic`` says which applies.
        draft_model [""]: a smaller model with the same tokenizer (a folder or a
            .gguf file) for speculative decoding with ``speculative="draft"``
            (docs/speculative.md). It runs on the same device with its own KV
            cache of as many blocks as the model's; ``kv_cache_bytes`` covers both.
        tensor_parallel_size [1]: 1, 2, 4 or 8 ranks, each holding its share
            of every layer's heads and MLP columns, of the vocabulary's
            embedding and lm head rows, and of every KV block's kv heads, with
            one engine, scheduler and block pool (docs/tensor_parallel.md). The
            model's attention heads, kv heads and intermediate size must divide
            by it. On the CPU the ranks are thread teams of ``num_threads`` /
            size exchanging partial sums in memory; on CUDA rank r takes the
            r-th visible GPU and the ranks exchange over NCCL (the
            nvidia-nccl wheel's, or libnccl.so.2; not yet run on several
            GPUs). ``kv_cache_bytes`` is the pool over all ranks.
        devices [[]]: CUDA: the GPU of each rank (indices among those
            visible), as many as ``tensor_parallel_size``, all different;
            [] takes the first ones (one rank: the current GPU).
            ``model_info.devices`` says which run.

    Every method is safe to call from several threads at once.
    """

    def __init__(self, model: str | os.PathLike | None = None, device: str | None = None, *,
                 progress: bool = True, **options) -> None:
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise InvalidArgument(f"unknown Runtime option(s): {', '.join(unknown)} "
                                  f"(the options: {', '.join(_OPTIONS)})")
        config = RuntimeConfig()
        if options.get("draft_model"):
            options["draft_model"] = str(resolve_model(options["draft_model"], progress=progress))
        for name, value in {"device": device, **options}.items():
            if value is not None:
                try:
                    setattr(config, name, value)
                except TypeError as e:
                    raise InvalidArgument(f"Runtime option {name}={value!r}: {e}") from None
        if config.tensor_parallel_size > 1:
            _point_to_nccl()
        self.model_path = resolve_model(model, progress=progress)
        config.model_path = str(self.model_path)
        has_tokenizer = any((self.model_path / f).is_file()
                            for f in ("tokenizer.json", "tokenizer.model"))
        #: None for a folder without tokenizer files: then prompts must be token ids.
        self.tokenizer = Tokenizer.from_model_dir(self.model_path) if has_tokenizer else None
        self._rt = _core.Runtime(config, on_load_progress=_LoadBar(self.model_path.name) if progress else None)
        self.model_info = self._rt.model_info()
        self._lock = threading.Lock()
        self._states: dict[str, _RequestState] = {}
        self._structured: Constraints | None = None
        self._num_threads = config.num_threads

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
            for i, m in enumerate(items):
                if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise InvalidArgument(f"chat message {i} needs a string 'role' and a string 'content', "
                                          f"got {m!r}")
            text = self.tokenizer.apply_chat_template(items, add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False)
        if set(map(type, items)) <= {int}:  # plain ints (the common case): one pass in C, no copy
            return items
        if all(isinstance(t, int) and not isinstance(t, bool) for t in items):
            return [int(t) for t in items]
        raise InvalidArgument("prompt must be a string, a list of token ids, or a list of chat "
                              "messages ({'role': ..., 'content': ...} dicts)")

    def submit(self, prompt: Prompt, params: SamplingParams | None = None,
               request_id: str | None = None, *, by_id: bool = False, **overrides) -> str:
        """Queues a request and returns its id at once.

        ``overrides`` set SamplingParams fields for this call
        (``rt.submit("hi", max_tokens=8, temperature=0)``). With ``by_id=True``
        only ``poll(request_id)`` sees the request's events, from the start;
        otherwise ``poll()`` without an id sees them until the first
        ``poll(request_id)``. A request that can never fit (prompt plus
        ``max_tokens`` beyond ``max_model_len``, or more KV blocks than the pool
        has) raises InvalidArgument naming the numbers.
        """
        return self._submit_ids(self.encode_prompt(prompt), params, request_id, by_id, overrides)

    def _submit_ids(self, ids: list[int], params: SamplingParams | None, request_id: str | None, by_id: bool,
                    overrides: dict) -> str:
        """submit() of a prompt already encoded (encode_prompt's list)."""
        params = (params or SamplingParams()).replace(**overrides) if overrides else (params or SamplingParams())
        if params.stop_strings and self.tokenizer is None:
            raise InvalidArgument("stop strings need a tokenizer; this model folder has none")
        core = params._to_core()
        constraint = constraint_of(params)
        if constraint is not None:  # its matcher exists before the engine can ask for a mask
            grammar = grammar_of(*constraint)
            request_id = request_id or f"c{uuid.uuid4().hex}"
            try:
                self._constraints().add(request_id, grammar)
            except InvalidArgument as e:  # the grammar's kind ("llguidance: ...") named as the field
                raise InvalidArgument(f"{constraint[0]}: {str(e).removeprefix('llguidance: ')}") from None
        try:
            with self._lock:  # registered before any poller can see its events
                rid = self._rt.submit(ids, core, request_id or "", by_id)
                self._states[rid] = _RequestState(self, params, ids)
        except BaseException:
            if constraint is not None:
                self._constraints().release(request_id)
            raise
        return rid

    def _constraints(self) -> Constraints:
        """The structured-output matchers, made (and given to the engine) on first use."""
        with self._lock:
            if self._structured is None:
                eos = (self.model_info.eos_token_ids or [0])[0]
                threads = mask_threads(self.model_info.device, self._num_threads)
                self._structured = Constraints(self.model_path, self.model_info.vocab_size, eos,
                                               threads=threads, tokenizer=self.tokenizer)
                self._structured.install(self._rt)
            return self._structured

    def poll(self, request_id: str | Sequence[str] | None = None, timeout: float = 0.0) -> list[Event]:
        """Events of one request (``poll(rid)``), of several (``poll([rid, ...])``),
        or of every request that nobody polls by id (``poll()``), waiting at most
        `timeout` seconds for the first (the GIL is released while waiting).
        Each event goes to exactly one caller: from the first ``poll(rid)`` on,
        ``poll()`` never returns that request's events. An unknown or finished
        request id raises InvalidArgument. ``poll(0.1)`` means a 0.1 s timeout
        for any request."""
        if isinstance(request_id, (int, float)) and not isinstance(request_id, bool):
            request_id, timeout = None, float(request_id)
        if request_id is None:
            return self._convert(self._rt.poll_rows(None, float(timeout)))
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        with self._lock:
            for rid in ids:
                if rid not in self._states:
                    raise InvalidArgument(f"unknown or finished request id {rid!r}")
        return self._convert(self._rt.poll_rows(ids, float(timeout)))

    def _convert(self, rows) -> list[Event]:
        """A poll's events, all requests' at once, as rows from the core (one
        tuple an event: see _RequestState.convert)."""
        out, states = [], self._states
        with self._lock:
            for row in rows:
                st = states.get(row[0])
                if st is None:  # submitted through _core directly, not through this object
                    continue
                ev = st.convert(row)
                if ev is None:
                    continue
                out.append(ev)
                if ev.request_finished:
                    del states[ev.request_id]
                    if not row[4]:  # ended here by stop strings: the engine's tail is not wanted
                        self._rt.release(ev.request_id)
        return out

    def abort(self, request_id: str) -> bool:
        """Ends a request at the next step; it still gets a final event (reason
        "abort"). Returns True if it was running, False if it had already
        finished (its final event may still be waiting to be polled). An id
        this runtime never had raises InvalidArgument."""
        return self._rt.abort(request_id)

    def release(self, request_id: str) -> bool:
        """Stops reading a request: it ends if still running, and its events,
        queued and to come, are dropped (no final event). Same answers as
        :meth:`abort`. The streaming helpers call this when left early."""
        with self._lock:
            self._states.pop(request_id, None)
        return self._rt.release(request_id)

    def _events(self, rid: str, timeout: float = 0.1) -> Iterator[Event]:
        """One request's events until its last; leaving early releases it."""
        done = False
        try:
            while not done:
                for ev in self.poll(rid, timeout=timeout):
                    done = done or ev.request_finished
                    yield ev
        finally:
            if not done:
                self.release(rid)

    def generate(self, prompts: Prompt | Iterable[Prompt], params: SamplingParams | None = None,
                 **overrides) -> list[Completion]:
        """Submits every prompt, waits for all, and returns their completions in order.
        Safe from any number of threads at once: each call reads only its own requests."""
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and isinstance(prompts[0], (int, dict))):
            prompts = [prompts]
        order: list[Completion] = []
        parts: dict[str, tuple[Completion, dict]] = {}
        pending: set[str] = set()
        try:
            for p in prompts:
                ids = self.encode_prompt(p)
                order.append(Completion(self._submit_ids(ids, params, None, True, overrides), ids, []))
                pending.add(order[-1].request_id)
                parts[order[-1].request_id] = (order[-1], {})
            while pending:  # read all of them as their events come (detokenizing as the engine runs)
                for ev in self.poll(list(pending), timeout=0.1):
                    _accumulate(*parts[ev.request_id], ev)
                    if ev.request_finished:
                        pending.discard(ev.request_id)
        finally:  # left early (an error, Ctrl-C): nobody will read the rest
            for rid in pending:
                self.release(rid)
        for c in order:
            c.outputs = _outputs(parts[c.request_id][1])
        return order

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, **overrides) -> Iterator[Event]:
        """Submits one request and yields its events as they come (``ev.text`` is
        the new text). Leaving the loop early ends the request."""
        yield from self._events(self.submit(prompt, params, by_id=True, **overrides))

    async def astream(self, prompt: Prompt, params: SamplingParams | None = None,
                      **overrides) -> AsyncIterator[Event]:
        """``async for ev in rt.astream(...)``: one request's events without
        blocking the event loop (the waits run in the default executor, with
        the GIL released). Leaving the loop early ends the request."""
        rid = self.submit(prompt, params, by_id=True, **overrides)
        loop = asyncio.get_running_loop()
        done = False
        try:
            while not done:
                for ev in await loop.run_in_executor(None, self.poll, rid, 0.05):
                    done = done or ev.request_finished
                    yield ev
        finally:
            if not done:
                self.release(rid)

    async def agenerate(self, prompt: Prompt, params: SamplingParams | None = None,
                        **overrides) -> Completion:
        """The asyncio form of generate() for one prompt."""
        ids = self.encode_prompt(prompt)
        c, parts = Completion("", ids, []), {}
        async for ev in self.astream(ids, params, **overrides):
            c.request_id = ev.request_id
            _accumulate(c, parts, ev)
        c.outputs = _outputs(parts)
        return c

    def default_sampling_params(self, **overrides) -> SamplingParams:
        """The model's recommended sampling settings (temperature, top_p, top_k,
        min_p, repetition_penalty from its generation_config.json, as vLLM's
        ``LLM.get_default_sampling_params()``; SamplingParams' own defaults for
        those it does not name), `overrides` over them. ``SamplingParams()``
        itself keeps its fixed defaults (temperature 1.0). Raises
        InvalidArgument naming the file and the field for a value it cannot
        take."""
        settings = generation_settings(self.model_path)
        return SamplingParams(**settings).replace(**overrides)  # an unknown override: InvalidArgument naming it

    # -- state ------------------------------------------------------------------------
    def stats(self):
        """KV blocks used/free/cached, slots, waste, prefix hits, preemptions, tok/s."""
        return self._rt.stats()

    def close(self) -> None:
        """Stops the engine; requests in flight end with finish_reason "abort".
        The weights and the KV cache (host or GPU memory) are freed here, not
        when the object is collected."""
        self._rt.close()
        if self._structured is not None:  # the engine holds the matchers' callables until then
            self._rt.set_token_mask_provider(None, None)

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
