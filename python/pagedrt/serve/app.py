"""The OpenAI-compatible HTTP application on one Runtime (FastAPI/Starlette;
uvicorn serves it: ``pagedrt-serve``, or ``build_app`` in your own ASGI server).

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models
    POST /tokenize   POST /detokenize   GET /health   GET /metrics

Every request body is checked before anything reaches the engine (protocol.py);
errors are OpenAI error objects. A client that goes away, streaming or not,
releases its request at once: the engine ends it at its next step and frees
its blocks.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from ..errors import InvalidArgument, Unsupported
from . import protocol as P
from .dispatcher import Dispatcher
from .metrics import Metrics


class _Request:
    """The engine requests behind one HTTP request (a batch of prompts: several),
    sharing one event queue; their choices are numbered prompt * n + index."""

    def __init__(self, server: "_Server", n: int):
        self.server, self.n = server, n
        self.queue: asyncio.Queue = asyncio.Queue()
        self.ids: list[str] = []
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.open: set[str] = set()
        self.t0 = time.monotonic()
        self._last: dict[tuple, float] = {}

    def submit(self, ids: list[int], params) -> None:
        s = self.server
        rid = P.new_id("req")
        s.dispatcher.register(rid, self.queue)
        try:
            s.rt.submit(ids, params, request_id=rid)
        except (InvalidArgument, Unsupported) as e:  # a combination this engine does not serve: the client's to change
            s.dispatcher.unregister(rid)
            self.close()
            raise APIError(400, str(e), param=P._param_of(str(e))) from None
        self.ids.append(rid)
        self.open.add(rid)
        self.prompt_tokens += len(ids)

    def choice(self, ev) -> int:
        return self.ids.index(ev.request_id) * self.n + ev.index

    async def events(self, request: Request) -> AsyncIterator:
        """The events of every engine request until all have ended; returns early
        (leaving them open, for close()) when the client disconnects."""
        gone = asyncio.ensure_future(_disconnected(request))
        get = None
        try:
            while self.open:
                get = asyncio.ensure_future(self.queue.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    return
                ev = get.result()
                self._observe(ev)
                if ev.error:
                    raise APIError(500, f"request failed in the engine: {ev.error}", type="internal_error")
                if ev.request_finished:
                    self.open.discard(ev.request_id)
                yield ev
        finally:
            # Cancelled while waiting (a streaming response whose client left
            # is cancelled by the server): the pending get goes too, or it
            # would be destroyed pending ("Task was destroyed but it is pending!").
            gone.cancel()
            if get is not None and not get.done():
                get.cancel()

    def _observe(self, ev) -> None:
        if not ev.token_ids:
            return
        now, key = time.monotonic(), (ev.request_id, ev.index)
        self.completion_tokens += len(ev.token_ids)
        m = self.server.metrics
        if not self._last:
            m.ttft.observe(now - self.t0)
        elif key in self._last:
            m.itl.observe(now - self._last[key])
        self._last[key] = now

    def close(self) -> None:
        """Unregisters every engine request; those still open are released (ended
        at the next step, their blocks freed, their events dropped)."""
        for rid in self.ids:
            self.server.dispatcher.unregister(rid)
            if rid in self.open:
                self.server.rt.release(rid)
        self.open.clear()


APIError = P.APIError


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is read: what comes next is the end)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Server:
    def __init__(self, rt, model_name: str, api_key: Optional[str], max_queue: int, max_body_bytes: int,
                 speculative: Optional[str], sampling_defaults: dict):
        self.rt, self.model_name, self.api_key = rt, model_name, api_key
        self.speculative, self.sampling_defaults = speculative, sampling_defaults
        self.max_queue, self.max_body_bytes = max_queue, max_body_bytes
        self.dispatcher = Dispatcher(rt)
        self.metrics = Metrics(rt, self.dispatcher)
        self.text = P.TokenText(rt.tokenizer)
        self.max_model_len = rt.model_info.max_model_len

    # -- checks ---------------------------------------------------------------------
    async def body(self, request: Request) -> dict:
        size = int(request.headers.get("content-length") or 0)
        if size > self.max_body_bytes:
            raise APIError(413, f"request body of {size} bytes is over the limit of {self.max_body_bytes}")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self.max_body_bytes:
                raise APIError(413, f"request body is over the limit of {self.max_body_bytes} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        return body

    def admit(self) -> None:
        waiting = self.rt.stats().num_waiting
        if waiting >= self.max_queue:
            raise APIError(503, f"the server is at capacity ({waiting} requests waiting); retry shortly",
                           type="server_overloaded", headers={"Retry-After": "1"})

    def encode(self, prompt, param: str) -> list[int]:
        try:
            return self.rt.encode_prompt(prompt)
        except (InvalidArgument, ValueError) as e:
            raise APIError(400, f"{param}: {e}", param=param) from None

    def stream_options(self, body: dict, stream: bool) -> bool:
        opts = P.typed(body, "stream_options", (dict,))
        if opts is None:
            return False
        if not stream:
            raise P.bad("stream_options", "only with stream: true")
        P.check_fields(opts, {"include_usage", "continuous_usage_stats"}, "stream_options")
        return bool(P.typed(opts, "include_usage", (bool,), False))

    # -- chat -------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        body = await self.body(request)
        P.check_fields(body, P.CHAT_FIELDS, "/v1/chat/completions")
        ids = self.encode(P.chat_messages(body), "messages")
        stream = P.typed(body, "stream", (bool,), False)
        include_usage = self.stream_options(body, stream)
        params = P.sampling_params(body, chat=True, prompt_len=len(ids), max_model_len=self.max_model_len,
                                   speculative=self.speculative, defaults=self.sampling_defaults)
        self.admit()
        r = _Request(self, params.n)
        r.submit(ids, params)
        head = {"id": P.new_id("chatcmpl"), "created": P.created(), "model": self.model_name}
        want_lp = params.logprobs is not None
        if stream:
            return StreamingResponse(self._chat_stream(request, r, head, want_lp, include_usage),
                                     media_type="text/event-stream")
        texts, lps, reasons = {}, {}, {}
        try:
            async for ev in r.events(request):
                i = r.choice(ev)
                texts[i] = texts.get(i, "") + ev.text
                lps.setdefault(i, []).extend(ev.logprobs or [])
                if ev.finished:
                    reasons[i] = P.finish_reason(ev.finish_reason)
        finally:
            r.close()
        choices = [{"index": i, "message": {"role": "assistant", "content": texts.get(i, "")},
                    "logprobs": P.chat_logprobs(lps.get(i, []), self.text) if want_lp else None,
                    "finish_reason": reasons.get(i)} for i in range(params.n)]
        return JSONResponse({**head, "object": "chat.completion", "choices": choices,
                             "usage": P.usage(r.prompt_tokens, r.completion_tokens)})

    async def _stream(self, request, r: _Request, head: dict, opening: list, choice, include_usage: bool
                      ) -> AsyncIterator[str]:
        """Server-sent events: the opening choices, then choice(event) for each
        event (None: nothing to send), the usage chunk when asked, [DONE]; an
        engine fault as an error object. The engine requests are closed
        whatever happens (a client gone mid-stream cancels this generator)."""
        try:
            for c in opening:
                yield _sse({**head, "choices": [c]})
            async for ev in r.events(request):
                c = choice(ev)
                if c is not None:
                    yield _sse({**head, "choices": [c]})
            if include_usage:
                yield _sse({**head, "choices": [], "usage": P.usage(r.prompt_tokens, r.completion_tokens)})
            yield "data: [DONE]\n\n"
        except APIError as e:
            yield _sse(e.body())
        finally:
            r.close()

    def _chat_stream(self, request, r: _Request, head, want_lp, include_usage) -> AsyncIterator[str]:
        def choice(ev):
            lp = P.chat_logprobs(ev.logprobs, self.text) if want_lp and ev.logprobs else None
            if not (ev.text or lp or ev.finished):
                return None
            return {"index": r.choice(ev), "delta": {"content": ev.text} if ev.text else {}, "logprobs": lp,
                    "finish_reason": P.finish_reason(ev.finish_reason) if ev.finished else None}
        opening = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None} for i in range(r.n)]
        return self._stream(request, r, {**head, "object": "chat.completion.chunk"}, opening, choice, include_usage)

    # -- completions ----------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        body = await self.body(request)
        P.check_fields(body, P.COMPLETION_FIELDS, "/v1/completions")
        if body.get("suffix") is not None:
            raise P.bad("suffix", "is not supported")
        raw = P.completion_prompts(body)
        prompts = [self.encode(p, "prompt") for p in raw]
        stream = P.typed(body, "stream", (bool,), False)
        include_usage = self.stream_options(body, stream)
        echo = P.typed(body, "echo", (bool,), False)
        longest = max(len(ids) for ids in prompts)
        echo_lp = echo and body.get("logprobs") is not None  # the prompt's logprobs too (scoring, lm-eval)
        if echo_lp and stream:
            raise P.bad("echo", "echo with logprobs is answered without streaming only")
        params = P.sampling_params(body, chat=False, prompt_len=longest, max_model_len=self.max_model_len,
                                   speculative=self.speculative, defaults=self.sampling_defaults, echo_logprobs=echo_lp)
        self.admit()
        r = _Request(self, params.n)
        for ids in prompts:
            r.submit(ids, params)
        echoes = [("" if not echo else p if isinstance(p, str) else
                   self.rt.tokenizer.decode(p) if self.rt.tokenizer else "") for p in raw]
        head = {"id": P.new_id("cmpl"), "object": "text_completion", "created": P.created(), "model": self.model_name}
        want_lp = params.logprobs is not None
        if stream:
            return StreamingResponse(self._completion_stream(request, r, head, echoes, want_lp, include_usage),
                                     media_type="text/event-stream")
        n_choices = len(prompts) * params.n
        texts = {i: echoes[i // params.n] for i in range(n_choices)}
        lps, reasons, prompt_lps = {}, {}, {}
        try:
            async for ev in r.events(request):
                i = r.choice(ev)
                if ev.prompt_logprobs:
                    prompt_lps.setdefault(i // params.n, []).extend(ev.prompt_logprobs)
                texts[i] += ev.text
                lps.setdefault(i, []).extend(ev.logprobs or [])
                if ev.finished:
                    reasons[i] = P.finish_reason(ev.finish_reason)
        finally:
            r.close()
        def logprobs(i):
            k = i // params.n
            prompt = (prompts[k], prompt_lps.get(k, [])) if echo_lp else None
            return P.completion_logprobs(lps.get(i, []), self.text, 0, prompt)
        choices = [{"index": i, "text": texts[i], "logprobs": logprobs(i) if want_lp else None,
                    "finish_reason": reasons.get(i)} for i in range(n_choices)]
        return JSONResponse({**head, "choices": choices, "usage": P.usage(r.prompt_tokens, r.completion_tokens)})

    def _completion_stream(self, request, r, head, echoes, want_lp, include_usage) -> AsyncIterator[str]:
        offsets: dict[int, int] = {}  # text sent so far per choice (logprobs' text_offset)

        def choice(ev):
            i = r.choice(ev)
            lp = P.completion_logprobs(ev.logprobs, self.text, offsets.get(i, 0)) if want_lp and ev.logprobs else None
            offsets[i] = offsets.get(i, 0) + len(ev.text)
            if not (ev.text or lp or ev.finished):
                return None
            return {"index": i, "text": ev.text, "logprobs": lp,
                    "finish_reason": P.finish_reason(ev.finish_reason) if ev.finished else None}
        opening = [{"index": i, "text": echoes[i // r.n], "logprobs": None, "finish_reason": None}
                   for i in range(len(echoes) * r.n) if echoes[i // r.n]]
        return self._stream(request, r, head, opening, choice, include_usage)

    # -- the rest -------------------------------------------------------------------------
    async def tokenize(self, request: Request) -> Response:
        body = await self.body(request)
        P.check_fields(body, {"model", "prompt", "messages", "add_special_tokens"}, "/tokenize")
        if self.rt.tokenizer is None:
            raise APIError(400, "this model has no tokenizer")
        if body.get("messages") is not None:
            ids = self.encode(P.chat_messages(body), "messages")
        else:
            prompt = P.typed(body, "prompt", (str,))
            if prompt is None:
                raise P.bad("prompt", "a string prompt or chat messages are required")
            add = P.typed(body, "add_special_tokens", (bool,), True)
            ids = self.rt.tokenizer.encode(prompt, add_special_tokens=add)
        return JSONResponse({"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids})

    async def detokenize(self, request: Request) -> Response:
        body = await self.body(request)
        P.check_fields(body, {"model", "tokens"}, "/detokenize")
        tokens = P.typed(body, "tokens", (list,))
        if tokens is None or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise P.bad("tokens", "a list of token ids is required")
        if self.rt.tokenizer is None:
            raise APIError(400, "this model has no tokenizer")
        try:
            return JSONResponse({"prompt": self.rt.tokenizer.decode(tokens)})
        except ValueError as e:
            raise P.bad("tokens", str(e)) from None

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": P.created(),
                                            "owned_by": "pagedrt", "max_model_len": self.max_model_len}]}


_PROTECTED = ("/v1/", "/tokenize", "/detokenize")
_ENDPOINTS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/health",
              "/metrics"}


class _Guard:
    """ASGI middleware: the API key (constant-time comparison) on the API paths,
    and every response counted by endpoint and status."""

    def __init__(self, app, server: _Server):
        self.app, self.s = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, status = scope["path"], [500]

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            key = self.s.api_key
            if key is not None and path.startswith(_PROTECTED):
                got = dict(scope["headers"]).get(b"authorization", b"")
                if not hmac.compare_digest(got, f"Bearer {key}".encode()):
                    e = APIError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                 type="authentication_error", code="invalid_api_key")
                    return await JSONResponse(e.body(), status_code=401)(scope, receive, send_counted)
            await self.app(scope, receive, send_counted)
        finally:
            self.s.metrics.requests.labels(path if path in _ENDPOINTS else "other", str(status[0])).inc()


def build_app(rt, *, model_name: str, api_key: Optional[str] = None, max_queue: int = 1024,
              max_body_bytes: int = 8 << 20, speculative: Optional[str] = None,
              sampling_defaults: Optional[dict] = None) -> FastAPI:
    """The ASGI application serving `rt` (a pagedrt.Runtime the caller keeps open
    for the app's lifetime) under the name `model_name`. `speculative` ("ngram"
    or "draft"): speculative decoding for every request that sets none and can
    use it. `sampling_defaults`: SamplingParams fields for those a request
    omits (pagedrt-serve passes the model's generation_config.json settings)."""
    s = _Server(rt, model_name, api_key, max_queue, max_body_bytes, speculative, dict(sampling_defaults or {}))

    @asynccontextmanager
    async def lifespan(app):
        s.dispatcher.start(asyncio.get_running_loop())
        yield
        s.dispatcher.stop()

    app = FastAPI(title="pagedrt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = s

    app.add_middleware(_Guard, server=s)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(Exception)
    async def fault(request: Request, e: Exception):
        return JSONResponse({"error": {"message": f"internal error: {type(e).__name__}: {e}", "type": "internal_error",
                                       "param": None, "code": None}}, status_code=500)

    app.post("/v1/chat/completions")(s.chat)
    app.post("/v1/completions")(s.completions)
    app.post("/tokenize")(s.tokenize)
    app.post("/detokenize")(s.detokenize)
    app.get("/v1/models")(s.models)
    app.get("/health")(lambda: PlainTextResponse(""))
    app.get("/metrics")(lambda: Response(s.metrics.render(), media_type="text/plain; version=0.0.4"))
    return app

