"""pagedrt-serve against the official `openai` client and raw HTTP, on the default
model (SmolLM2-135M-Instruct), loopback only: the API's answers against the
in-process Runtime's, every fault class answered with its 4xx while the server
keeps serving, disconnects freeing blocks, SIGTERM draining, 200 concurrent
streams, and the README's curl and openai examples as written."""
from __future__ import annotations

import asyncio
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

import pagedrt  # noqa: E402

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
MODEL = "SmolLM2-135M-Instruct"
Q = [{"role": "user", "content": "What is the capital of France?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A pagedrt-serve process on a free loopback port."""

    def __init__(self, model, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pagedrt.serve", "--model", str(model), "--device", "cpu", "--port",
             str(self.port), "--log-level", "warning", "--kv-cache-bytes", str(256 << 20), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read()
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("pagedrt-serve did not come up")

    def request(self, method, path, body=None, headers=None, raw: bytes | None = None):
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, r.read().decode(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(), dict(e.headers)

    def get(self, path):
        return self.request("GET", path)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body, **kw)

    def metric(self, name: str) -> float:
        text = self.get("/metrics")[1]
        m = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, flags=re.M)
        assert m, (name, text[:2000])
        return float(m.group(1))

    def wait_idle(self, timeout=10.0) -> None:
        """Until the engine holds no blocks and runs nothing (a freed request)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.metric("pagedrt_kv_blocks_used") == 0 and self.metric("pagedrt_requests_running") == 0:
                return
            time.sleep(0.05)
        raise AssertionError(f"blocks still used: {self.metric('pagedrt_kv_blocks_used')}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def server(smol):
    s = Server(smol)
    yield s
    s.stop()
    # Nothing left behind on the server's log by the module's requests (clients
    # that left mid-stream among them): a task cancelled with its stream used
    # to leave its pending queue read to be destroyed ("Task was destroyed but
    # it is pending!").
    log = s.proc.stdout.read()
    assert "Task was destroyed" not in log and "Traceback" not in log, log[-3000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def rt(smol):
    with pagedrt.Runtime(smol, device="cpu", kv_cache_bytes=256 << 20) as r:
        yield r


def test_chat_matches_the_runtime(client, rt):
    """Greedy chat through the server equals Runtime.generate on the same messages;
    usage counts the chat template's tokens and the answer's."""
    r = client.chat.completions.create(model=MODEL, messages=Q, max_tokens=24, temperature=0)
    want = rt.generate(Q, max_tokens=24, temperature=0)[0]
    assert r.choices[0].message.content == want.text and "Paris" in want.text
    assert r.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
    assert r.usage.prompt_tokens == len(rt.encode_prompt(Q))
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model == MODEL and r.object == "chat.completion"


def test_chat_stream_equals_the_answer(client):
    """The deltas of a stream add up to the non-streamed answer; one finish_reason,
    on the last content chunk; usage in a last chunk without choices."""
    full = client.chat.completions.create(model=MODEL, messages=Q, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=Q, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_n_seed_and_logprobs(client):
    """n = 2 gives two choices; the same seed gives the same samples; logprobs
    list each token with its top alternatives, the token first among them when greedy."""
    kw = dict(model=MODEL, messages=Q, max_tokens=12, temperature=1.0, n=2, seed=1234)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    c = client.chat.completions.create(model=MODEL, messages=Q, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens
    joined, answer = "".join(t.token for t in content), c.choices[0].message.content
    # every generated token, the end-of-sequence one included (its text is not in the answer)
    assert joined == answer or (c.choices[0].finish_reason == "stop" and joined.startswith(answer)
                                and joined[len(answer):] == content[-1].token)
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token and abs(t.top_logprobs[0].logprob - t.logprob) < 1e-6


def test_stop_strings(client):
    r = client.chat.completions.create(model=MODEL, messages=Q, max_tokens=40, temperature=0, stop=["."])
    assert "." not in r.choices[0].message.content and r.choices[0].finish_reason == "stop"


def test_completions(client, rt):
    """Text and token-id prompts, a batch of two with n = 2 (choices prompt * n + i),
    echo, and logprobs with text offsets."""
    prompt = "The capital of France is"
    want = rt.generate(prompt, max_tokens=6, temperature=0)[0]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    assert r.choices[0].text == want.text and r.usage.prompt_tokens == len(rt.encode_prompt(prompt))
    ids = rt.encode_prompt(prompt)
    assert client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0).choices[0].text == want.text
    batch = client.completions.create(model=MODEL, prompt=[prompt, "1, 2, 3,"], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text == want.text[:len(batch.choices[0].text)]
    e = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, echo=True)
    assert e.choices[0].text == prompt + want.text
    lp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=2).choices[0]
    assert "".join(lp.logprobs.tokens) == lp.text
    assert lp.logprobs.text_offset[0] == 0 and all(len(t) == 2 for t in lp.logprobs.top_logprobs)
    # echo + logprobs: the prompt's own logprobs first (scoring, as lm-eval-harness asks for them)
    ev = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0, echo=True,
                                   logprobs=1).choices[0].logprobs
    assert len(ev.tokens) == len(ids) + 1 and ev.token_logprobs[0] is None and ev.top_logprobs[0] is None
    ref = rt.generate([ids], max_tokens=1, temperature=0, prompt_logprobs=1)[0].prompt_logprobs
    assert len(ref) == len(ids) - 1
    assert all(abs(a - b.logprob) < 1e-3 for a, b in zip(ev.token_logprobs[1:len(ids)], ref))
    s = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in s if c.choices) == want.text


def test_structured_output(client):
    """response_format json_schema / json_object and vLLM's guided_choice and
    guided_regex; an invalid one is a 400 naming it."""
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
              "additionalProperties": False}
    r = client.chat.completions.create(model=MODEL, messages=Q, max_tokens=40, temperature=0,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "answer", "schema": schema}})
    if r.choices[0].finish_reason == "stop":
        assert set(json.loads(r.choices[0].message.content)) == {"city"}
    r = client.chat.completions.create(model=MODEL, messages=Q, max_tokens=5, temperature=0,
                                       extra_body={"guided_choice": ["Paris", "Lyon"]})
    assert r.choices[0].message.content in ("Paris", "Lyon")
    r = client.completions.create(model=MODEL, prompt="The year is", max_tokens=6, temperature=0,
                                  extra_body={"guided_regex": " [0-9]{4}"})
    assert re.fullmatch(r" [0-9]{4}", r.choices[0].text)
    with pytest.raises(openai.BadRequestError, match="regex"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body={"guided_regex": "[0-9"})


def test_models_tokenize_detokenize_metrics(server, rt):
    status, body, _ = server.get("/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["id"] == MODEL
    status, body, _ = server.post("/tokenize", {"prompt": "Hello world"})
    toks = json.loads(body)["tokens"]
    assert status == 200 and toks == rt.tokenizer.encode("Hello world")
    assert json.loads(server.post("/tokenize", {"messages": Q})[1])["count"] == len(rt.encode_prompt(Q))
    status, body, _ = server.post("/detokenize", {"tokens": toks})
    assert status == 200 and json.loads(body)["prompt"] == "Hello world"
    status, body, _ = server.post("/v1/completions", {"model": MODEL, "prompt": "The year is", "max_tokens": 6,
                                                      "temperature": 1.0, "seed": 3, "guided_regex": " [0-9]{4}"})
    assert status == 200, body  # a sampled constrained answer: a mask for each of its tokens
    text = server.get("/metrics")[1]
    rows = re.search(r"^pagedrt_structured_mask_rows_total (\S+)$", text, re.M)
    assert rows and float(rows.group(1)) >= 5, rows
    for name in ("pagedrt_http_requests_total", "pagedrt_time_to_first_token_seconds_bucket",
                 "pagedrt_inter_token_latency_seconds_bucket", "pagedrt_requests_waiting", "pagedrt_requests_running",
                 "pagedrt_kv_blocks_used", "pagedrt_kv_waste_ratio", "pagedrt_prefix_cache_hit_ratio",
                 "pagedrt_preemptions_total", "pagedrt_preemptions_swapped_total", "pagedrt_requests_swapped",
                 'pagedrt_swap_blocks_total{direction="out"}', "pagedrt_generation_tokens_per_second",
                 "pagedrt_spec_proposed_tokens_total", "pagedrt_spec_accepted_tokens_total",
                 "pagedrt_structured_mask_seconds_total", "pagedrt_structured_mask_rows_total"):
        assert name in text, name


BAD = [  # (body or raw bytes, status, param or message part)
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"messages": Q, "temperature": "hot"}, 400, "temperature"),
    ({"messages": Q, "temperature": -1}, 400, "temperature"),
    ({"messages": Q, "top_p": 2}, 400, "top_p"),
    ({"messages": Q, "n": 0}, 400, "n"),
    ({"messages": Q, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": Q, "max_tokens": True}, 400, "max_tokens"),
    ({"messages": Q, "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ({"messages": Q, "frobnicate": 1}, 400, "frobnicate"),
    ({"messages": Q, "tools": []}, 400, "tools"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"messages": Q, "model": "gpt-4"}, 404, "model"),
    ({"messages": Q, "max_tokens": 100000}, 400, "max_model_len"),
    ({"messages": Q, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"messages": Q, "speculative": "draft"}, 400, "draft_model"),
    ({"messages": Q, "speculative": "ngram", "num_speculative_tokens": 99}, 400, "num_speculative_tokens"),
]


@pytest.mark.parametrize("body,status,where", BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_their_4xx_and_the_server_keeps_serving(server, body, status, where):
    raw = body if isinstance(body, bytes) else None
    got, text, _ = server.post("/v1/chat/completions", None if raw else body, raw=raw)
    err = json.loads(text)["error"]
    assert got == status and where in (err["message"] + str(err["param"])), (got, text)
    assert err["type"] and "message" in err
    ok, _, _ = server.post("/v1/chat/completions", {"messages": Q, "max_tokens": 2})
    assert ok == 200


def test_huge_body_is_413(server):
    """A body over --max-body-bytes (8 MiB) is refused from its Content-Length,
    unread; the server goes on."""
    data = b'{"prompt": "' + b"a" * (9 << 20) + b'"}'
    s = socket.create_connection(("127.0.0.1", server.port))
    try:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    except (BrokenPipeError, ConnectionResetError):
        pass  # answered and closed before the whole body went out
    s.settimeout(30)
    assert s.recv(4096).split(b"\r\n", 1)[0].endswith(b"413 Request Entity Too Large")
    s.close()
    assert server.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2})[0] == 200


def _open_stream(server, body) -> socket.socket:
    """A raw HTTP request whose answer is left unread (the client then vanishes)."""
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return s


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_frees_its_blocks(server, stream):
    """A client gone mid-answer (streaming or not) releases its request: the
    engine ends it and its KV blocks are free again within a moment."""
    s = _open_stream(server, {"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True,
                              "stream": stream})
    deadline = time.time() + 30
    while server.metric("pagedrt_kv_blocks_used") == 0:  # it is running
        assert time.time() < deadline
        time.sleep(0.02)
    if stream:
        assert b"data:" in s.recv(65536)
    s.close()
    server.wait_idle()
    assert server.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2})[0] == 200


def test_200_concurrent_streams(server):
    """200 streaming clients at once, twice: no errors, every stream ends with a
    finish_reason and [DONE] (the client ends at it), no block held after, and
    the server's memory flat between the rounds."""
    async def one(client, i):
        n, reason = 0, None
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count to {i % 7 + 2}."}], max_tokens=8,
            temperature=0.7, seed=i, stream=True)
        async for c in stream:
            if c.choices:
                n += len(c.choices[0].delta.content or "") > 0
                reason = c.choices[0].finish_reason or reason
        return n, reason

    async def round_():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                                      timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(200)))

    rss = []
    for _ in range(2):
        results = asyncio.run(round_())
        assert len(results) == 200 and all(r in ("stop", "length") for _, r in results)
        assert all(n > 0 for n, _ in results)
        server.wait_idle()
        rss.append(int(re.search(r"VmRSS:\s+(\d+)", pathlib.Path(f"/proc/{server.proc.pid}/status").read_text())
                       .group(1)))
    assert rss[1] - rss[0] < 64 * 1024, rss  # KiB


def test_api_key_and_sigterm_drain(smol):
    """--api-key: 401 without it (or with a wrong one), 200 with it; /health stays open.
    SIGTERM while a stream runs: the stream completes, then the server exits 0."""
    s = Server(smol, "--api-key", "sesame")
    try:
        assert s.post("/v1/completions", {"prompt": "Hi"})[0] == 401
        assert s.post("/v1/completions", {"prompt": "Hi"}, headers={"Authorization": "Bearer nope"})[0] == 401
        assert s.get("/health")[0] == 200
        key = {"Authorization": "Bearer sesame"}
        assert s.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2}, headers=key)[0] == 200
        data = json.dumps({"prompt": "Once upon a time", "max_tokens": 48, "ignore_eos": True,
                           "stream": True}).encode()
        sock = socket.create_connection(("127.0.0.1", s.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sesame\r\n"
                     b"Content-Type: application/json\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n"
                     + data)
        got = sock.recv(65536)
        s.proc.send_signal(signal.SIGTERM)
        sock.settimeout(60)
        while b"[DONE]" not in got:
            more = sock.recv(65536)
            assert more, got[-500:]
            got += more
        sock.close()
        assert got.count(b'"finish_reason": "length"') == 1
        assert s.proc.wait(timeout=30) == 0
    finally:
        s.stop()


def test_speculative_server(smol, rt):
    """--speculative ngram with --draft-model (the model itself): greedy answers
    equal the Runtime's without speculation; a request may ask for the draft
    model instead; structured output is served speculatively too (the same
    answer as the Runtime's without speculation); echo with logprobs is served
    without; /metrics counts the proposals."""
    s = Server(smol, "--speculative", "ngram", "--draft-model", str(smol))
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        msgs = [{"role": "user", "content": "Repeat exactly: the cat sat on the mat, the cat sat on the mat."}]
        want = rt.generate(msgs, max_tokens=24, temperature=0)[0].text
        assert c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, temperature=0)\
            .choices[0].message.content == want
        ngram = s.metric("pagedrt_spec_proposed_tokens_total")
        assert ngram > 0
        r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, temperature=0,
                                      extra_body={"speculative": "draft"})
        assert r.choices[0].message.content == want
        assert s.metric("pagedrt_spec_accepted_tokens_total") >= s.metric("pagedrt_spec_proposed_tokens_total") - ngram
        proposed = s.metric("pagedrt_spec_proposed_tokens_total")
        j = c.chat.completions.create(model=MODEL, messages=Q, max_tokens=40, temperature=0,
                                      response_format={"type": "json_object"})
        assert j.choices[0].message.content == rt.generate(Q, max_tokens=40, temperature=0, json_object=True)[0].text
        assert j.choices[0].message.content.lstrip().startswith("{")
        assert s.metric("pagedrt_spec_proposed_tokens_total") > proposed
        e = c.completions.create(model=MODEL, prompt="The sky is", max_tokens=2, echo=True, logprobs=1, temperature=0)
        assert e.choices[0].logprobs.token_logprobs[0] is None  # the first prompt token has none
    finally:
        s.stop()
    bad = subprocess.run([sys.executable, "-m", "pagedrt.serve", "--model", str(smol), "--speculative", "draft"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--draft-model" in bad.stderr


def test_omitted_sampling_fields_come_from_the_models_generation_config(smol, rt, tmp_path):
    """--generation-config auto (the default): a request that omits temperature gets the model's
    generation_config.json value (0 here: greedy, the Runtime's greedy answer every time); one that
    sets it keeps its own; a bad value stops the server at start naming the file and field."""
    from pagedrt.serve import protocol as P

    body = {"messages": Q}
    p = P.sampling_params(body, chat=True, prompt_len=8, max_model_len=64, defaults={"temperature": 0.0, "top_k": 5})
    assert (p.temperature, p.top_k) == (0.0, 5)
    p = P.sampling_params({**body, "temperature": 0.5}, chat=True, prompt_len=8, max_model_len=64,
                          defaults={"temperature": 0.0})
    assert p.temperature == 0.5 and P.sampling_params(body, chat=True, prompt_len=8, max_model_len=64).temperature == 1.0

    model = tmp_path / "smol-greedy"
    model.mkdir()
    for f in smol.iterdir():
        if f.is_file() and f.name != "generation_config.json":
            (model / f.name).symlink_to(f)
    gen = json.loads((smol / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**gen, "temperature": 0.0}))
    s = Server(model, "--served-model-name", MODEL)
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        want = rt.generate(Q, max_tokens=16, temperature=0)[0].text
        got = [c.chat.completions.create(model=MODEL, messages=Q, max_tokens=16).choices[0].message.content
               for _ in range(3)]
        assert got == [want] * 3
    finally:
        s.stop()
    (model / "generation_config.json").write_text(json.dumps({**gen, "top_p": "high"}))
    bad = subprocess.run([sys.executable, "-m", "pagedrt.serve", "--model", str(model), "--device", "cpu"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "generation_config.json: top_p must be a number" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr


def test_full_queue_is_503_with_retry_after(smol):
    """--max-queue N: while N requests wait for the engine, new ones get 503 with
    Retry-After (N = 0: every one), and nothing reaches the engine."""
    s = Server(smol, "--max-queue", "0")
    try:
        status, text, headers = s.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert status == 503 and headers.get("retry-after") == "1", (status, headers)
        assert json.loads(text)["error"]["type"] == "server_overloaded"
        assert s.get("/health")[0] == 200 and s.metric("pagedrt_kv_blocks_used") == 0
    finally:
        s.stop()


def test_readme_curl_and_openai_examples(server):
    """The README's curl command and openai program, run as written but for the port."""
    text = README.read_text()
    curl = re.search(r"```sh\n(curl .*?)```", text, flags=re.S).group(1).replace("8000", str(server.port))
    out = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "Paris" in json.loads(out.stdout)["choices"][0]["message"]["content"], out
    program = re.search(r"```py\n(.*?)```", text, flags=re.S).group(1).replace("8000", str(server.port))
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and len(out.stdout.split()) >= 5, out
    assert any(c in out.stdout.lower() for c in ("red", "blue", "green", "yellow")), out.stdout


def test_cli_takes_every_runtime_option():
    """Every Runtime option is a pagedrt-serve flag with help (a new option
    without a help entry once kept the server from starting); the tri-state
    deterministic parses as True, False or the engine's default (None)."""
    from pagedrt.runtime import _OPTIONS
    from pagedrt.serve.cli import parser
    p = parser()
    flags = {a.dest: a for a in p._actions}
    for name in _OPTIONS:
        assert name in flags and flags[name].help, name
    assert p.parse_args([]).deterministic is None
    assert p.parse_args(["--deterministic"]).deterministic is True
    assert p.parse_args(["--no-deterministic"]).deterministic is False
    assert p.parse_args([]).kv_watermark == 0.01 and p.parse_args(["--kv-watermark", "0.05"]).kv_watermark == 0.05
    assert p.parse_args([]).devices == [] and p.parse_args(["--devices", "2,0"]).devices == [2, 0]


def test_cli_leaves_a_core_to_the_http_layer(monkeypatch):
    """--threads 0 on a CPU of 8 or more cores gives the engine all cores but
    one (the server's Python would otherwise preempt an engine thread); fewer
    cores, an explicit count, and a CUDA device keep what was asked."""
    from pagedrt.serve import cli
    for cores, device, asked, want in [(16, "cpu", 0, 15), (8, "cpu", 0, 7), (4, "cpu", 0, 0), (2, "cpu", 0, 0),
                                       (16, "cpu", 12, 12), (16, "cuda", 0, 0)]:
        monkeypatch.setattr(cli.os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert cli.engine_threads(asked, device) == want, (cores, device, asked)
