"""The paged CPU forward against transformers (fp32) on tiny random Llamas.

Tolerance: relative error ||ours - ref|| / ||ref|| <= 1e-4 on the logits of
every prompt position and every generated position; greedy tokens identical.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import pagedrt
from pagedrt import _testing
from conftest import run_all

REL_TOL = 1e-4

CASES = {
    "mha-d32": dict(num_attention_heads=4, num_key_value_heads=4),                   # GQA 1, D 32
    "gqa2-d32": dict(num_attention_heads=4, num_key_value_heads=2),                  # GQA 2
    "gqa4-d64": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=1),  # GQA 4, D 64
    "gqa2-d64": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2),  # GQA 2, D 64
    "gqa3-d64": dict(hidden_size=384, num_attention_heads=6, num_key_value_heads=2),  # GQA 3 (SmolLM2's), D 64
    "gqa2-d128": dict(hidden_size=512, num_attention_heads=4, num_key_value_heads=2),  # GQA 2, D 128
    "head_dim-48": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=48),  # explicit head_dim
    "tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "llama3-rope": dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32)),
    "linear-rope": dict(rope_scaling=dict(rope_type="linear", factor=2.0)),
    "bf16": dict(num_key_value_heads=2, dtype="bfloat16"),
}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def run_request(rt, prompt, **params):
    """Submits one request and returns (tokens, logits rows, final event)."""
    rid = rt.submit(list(prompt), pagedrt.SamplingParams(**{"temperature": 0, **params}))
    tokens, logits, last = [], [], None
    while last is None:
        for ev in rt.poll(rid, timeout=1.0):
            tokens += ev.token_ids
            if ev.logits is not None:
                logits.append(ev.logits)
            if ev.finished:
                last = ev
    return tokens, (np.concatenate(logits) if logits else None), last


def reference_greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(torch.argmax(logits)))
    return ids[len(prompt):]


def reference_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_greedy_match_transformers(tiny_llama, case):
    path, model = tiny_llama(**CASES[case])
    rng = np.random.default_rng(1)
    prompt = rng.integers(3, 320, size=37).tolist()  # crosses two 16-token block boundaries
    # fp32 activations: the oracle path (a bf16 checkpoint would pick bf16 ones under
    # "auto" on a processor with AVX-512 BF16)
    with pagedrt.Runtime(path, device="cpu", num_threads=2, activation_dtype="float32") as rt:
        tokens, logits, last = run_request(rt, prompt, max_tokens=64, ignore_eos=True,
                                           return_logits=True)
    assert last.finish_reason == "length"
    assert tokens == reference_greedy(model, prompt, 64)
    # rows: every prompt position, then each generated position but the last
    assert logits.shape == (len(prompt) + 63, 320)
    ref = reference_logits(model, prompt + tokens[:-1])
    assert rel_err(logits[:len(prompt)], ref[:len(prompt)]) <= REL_TOL
    assert rel_err(logits[len(prompt):], ref[len(prompt):]) <= REL_TOL


def test_chunked_prefill_small_blocks_and_batching(tiny_llama):
    """Prompts split into 7-token chunks, 4-token blocks, four requests in flight at once."""
    path, model = tiny_llama(num_key_value_heads=2)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 320, size=n).tolist() for n in (5, 23, 40, 17)]
    with pagedrt.Runtime(path, device="cpu", block_size=4, max_num_batched_tokens=7,
                         num_threads=2) as rt:
        got = run_all(rt, prompts, max_tokens=12, ignore_eos=True, return_logits=True)
        stats = rt.stats()
    assert stats.blocks_used == 0 and stats.blocks_free == stats.num_blocks
    for (tokens, logits), prompt in zip(got, prompts):
        assert tokens == reference_greedy(model, prompt, 12)
        ref = reference_logits(model, prompt + tokens[:-1])
        assert logits.shape == ref.shape
        assert rel_err(logits, ref) <= REL_TOL


@pytest.mark.parametrize("chunk", [None, 8])
def test_last_layer_runs_on_the_logit_rows(tiny_llama, chunk):
    """Past the last layer's attention a step computes only the rows whose
    logits it reads (LlamaModel::queue_step): a 37-token prompt's prefill reads
    one row; in 8-token chunks most chunks read none, and three requests in
    flight make steps of decodes and a chunk. Each generated token's top-5
    logprobs against transformers' log-softmax at its position (relative
    error <= 1e-4) and the greedy tokens equal to transformers'; the same
    requests with every prompt row a logit row (prompt_logprobs: no row
    dropped) give the same tokens."""
    path, model = tiny_llama(num_key_value_heads=2)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 320, size=n).tolist() for n in (37, 21, 9)]
    kw = dict(max_num_batched_tokens=chunk) if chunk else {}
    with pagedrt.Runtime(path, device="cpu", num_threads=2, activation_dtype="float32", **kw) as rt:
        outs = [o.outputs[0] for o in rt.generate(prompts, temperature=0, max_tokens=8, logprobs=5, ignore_eos=True)]
        full = [o.outputs[0] for o in rt.generate(prompts, temperature=0, max_tokens=8, prompt_logprobs=1,
                                                  ignore_eos=True)]
    for prompt, out, every in zip(prompts, outs, full):
        tokens = list(out.token_ids)
        assert tokens == reference_greedy(model, prompt, 8) == list(every.token_ids)
        ref = torch.log_softmax(torch.from_numpy(reference_logits(model, prompt + tokens[:-1])), -1).numpy()
        for i, lp in enumerate(out.logprobs):
            row = ref[len(prompt) - 1 + i]
            top = sorted(lp.top_logprobs)
            assert top == sorted(np.argsort(row)[-5:].tolist()), (i, top)
            assert rel_err([lp.top_logprobs[t] for t in top], row[top]) <= REL_TOL, i


def test_eos_stops_and_max_tokens(tiny_llama):
    path, model = tiny_llama()
    prompt = [5, 9, 11, 200, 17]
    greedy = reference_greedy(model, prompt, 20)
    stop = greedy[6]  # a token the model will produce: treat it as eos
    with pagedrt.Runtime(path, device="cpu") as rt:
        tokens, _, last = run_request(rt, prompt, max_tokens=20, stop_token_ids=[stop])
        assert last.finish_reason == "stop"
        assert tokens == greedy[:greedy.index(stop) + 1]
        tokens, _, last = run_request(rt, prompt, max_tokens=3, ignore_eos=True)
        assert last.finish_reason == "length" and tokens == greedy[:3]


def test_fp32_checkpoint_run_as_bf16_weights(tiny_llama):
    """dtype="bfloat16" rounds the matrices (norms stay fp32); compare with transformers
    on the same rounded weights."""
    path, model_bf = tiny_llama(num_key_value_heads=2)
    with torch.no_grad():
        for p in model_bf.parameters():
            if p.dim() == 2:
                p.copy_(p.to(torch.bfloat16).to(torch.float32))
    prompt = list(range(10, 40))
    with pagedrt.Runtime(path, device="cpu", dtype="bfloat16", activation_dtype="float32") as rt:
        assert rt.model_info.weight_dtype == "bfloat16"
        tokens, logits, _ = run_request(rt, prompt, max_tokens=1, ignore_eos=True,
                                        return_logits=True)
    assert rel_err(logits, reference_logits(model_bf, prompt)) <= REL_TOL


def test_sentencepiece_model_end_to_end(tiny_llama):
    """A text prompt through a sentencepiece tokenizer trained by the test: the ids
    equal transformers' tokenizer for the folder, the tokens transformers' greedy."""
    from transformers import AutoTokenizer

    from conftest import train_sentencepiece

    path, model = tiny_llama(vocab_size=400, num_key_value_heads=2, eos_token_id=2)
    train_sentencepiece(path)
    text = "the quick brown fox jumps over 42 lazy dogs in the café"
    with pagedrt.Runtime(path, device="cpu") as rt:
        ids = rt.encode_prompt(text)
        assert ids == AutoTokenizer.from_pretrained(path)(text)["input_ids"]
        assert ids[0] == 1  # bos, as tokenizer_config's add_bos_token says
        out = rt.generate([text], max_tokens=40, ignore_eos=True, temperature=0)[0]
    assert out.token_ids == reference_greedy(model, ids, 40)
    assert out.text == rt.tokenizer.decode(out.token_ids)


def test_sharded_checkpoint(tmp_path):
    """A checkpoint split into shards through model.safetensors.index.json loads and
    gives the same logits as transformers."""
    from conftest import make_tiny_llama

    path, model = make_tiny_llama(tmp_path / "one", num_key_value_heads=2)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, safe_serialization=True, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    prompt = list(range(7, 30))
    with pagedrt.Runtime(sharded, device="cpu") as rt:
        _, logits, _ = run_request(rt, prompt, max_tokens=1, return_logits=True)
    assert rel_err(logits, reference_logits(model, prompt)) <= REL_TOL


# ---- activation_dtype="bfloat16" ------------------------------------------------------

def bf16r(t: torch.Tensor) -> torch.Tensor:
    """Rounded to the nearest bf16 (ties to even), kept in fp32."""
    return t.to(torch.bfloat16).to(torch.float32)


def reference_logits_bf16_activations(model, ids, linear=None, round_p=False):
    """transformers' weights, fp32 math, values rounded to bf16 wherever pagedrt stores
    a bf16 activation (norm outputs, every projection output, q/k after RoPE, the
    attention output, silu*up) and fp32 where it keeps fp32 (residual, logits).
    linear(x, weight) makes the projections (x @ weight.T unless given; the lm head
    always is). round_p: attention's unnormalized probabilities rounded to bf16
    before P V, the sum taken from the fp32 ones (the CPU's AMX P V)."""
    lin = linear or (lambda x, w: x @ w.T)
    cfg, m = model.config, model.model
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    T = len(ids)

    def norm(x, layer):
        return bf16r(layer.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + layer.variance_epsilon)))

    def rope(x, cos, sin):  # x (T, heads, D)
        x1, x2 = x[..., :D // 2], x[..., D // 2:]
        return bf16r(x * cos[:, None] + torch.cat((-x2, x1), -1) * sin[:, None])

    with torch.no_grad():
        x = m.embed_tokens.weight[ids].clone()  # (T, hidden) fp32 residual
        cos, sin = m.rotary_emb(x[None], torch.arange(T)[None])
        cos, sin = cos[0], sin[0]  # (T, D)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        for L in m.layers:
            a = L.self_attn
            h = norm(x, L.input_layernorm)
            q = rope(bf16r(lin(h, a.q_proj.weight)).view(T, H, D), cos, sin)
            k = rope(bf16r(lin(h, a.k_proj.weight)).view(T, Hkv, D), cos, sin)
            v = bf16r(lin(h, a.v_proj.weight)).view(T, Hkv, D)
            k, v = (t.repeat_interleave(H // Hkv, dim=1) for t in (k, v))
            s = torch.einsum("thd,shd->hts", q, k) / D ** 0.5
            s = s.masked_fill(~causal, float("-inf"))
            if round_p:
                e = torch.exp(s - s.amax(-1, keepdim=True))
                p = bf16r(e) / e.sum(-1, keepdim=True)
            else:
                p = torch.softmax(s, -1)
            o = bf16r(torch.einsum("hts,shd->thd", p, v).reshape(T, H * D))
            x = x + bf16r(lin(o, a.o_proj.weight))
            h = norm(x, L.post_attention_layernorm)
            g, u = bf16r(lin(h, L.mlp.gate_proj.weight)), bf16r(lin(h, L.mlp.up_proj.weight))
            x = x + bf16r(lin(bf16r(torch.nn.functional.silu(g) * u), L.mlp.down_proj.weight))
        return (norm(x, m.norm) @ model.lm_head.weight.T).numpy()


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("case", ["gqa2-d32", "gqa4-d64", "bf16"])
def test_bf16_activations_match_a_bf16_rounding_reference(tiny_llama, case, deterministic):
    """activation_dtype="bfloat16": logits within 8e-3 of a reference that rounds at the
    same points and at least twice as close to it as to fp32 transformers (~1e-2 away:
    the rounding is real). What is left is the order of fp32 sums and the bf16
    roundings it flips (one flipped ulp in an early layer moves every later position
    by ~1e-3). The KV pool holds twice the blocks in the same bytes. deterministic=False
    takes AMX tiles for the prompt's 16-token chunks where the processor has them (its
    P V rounds P to bf16: the reference does too)."""
    path, model = tiny_llama(**CASES[case])
    prompt = list(range(7, 47))
    with pagedrt.Runtime(path, device="cpu", activation_dtype="bfloat16", block_size=4,
                         max_num_batched_tokens=16, kv_cache_bytes=8 << 20, deterministic=deterministic) as rt:
        assert rt.model_info.activation_dtype == "bfloat16"
        tokens, logits, _ = run_request(rt, prompt, max_tokens=6, ignore_eos=True, return_logits=True)
        blocks16 = rt.stats().num_blocks
    with pagedrt.Runtime(path, device="cpu", kv_cache_bytes=8 << 20, block_size=4,
                         activation_dtype="float32") as rt:
        assert rt.model_info.activation_dtype == "float32"
        blocks32 = rt.stats().num_blocks
    assert blocks16 == 2 * blocks32
    ids = prompt + tokens[:-1]
    round_p = not deterministic and _testing._gemm_amx_for_large_steps()  # the AMX P V rounds P to bf16
    err = rel_err(logits, reference_logits_bf16_activations(model, ids, round_p=round_p))
    err32 = rel_err(logits, reference_logits(model, ids))
    assert err <= 8e-3, err
    assert err32 >= 2 * err, (err, err32)


def test_activation_dtype_is_checked(tiny_llama):
    path, _ = tiny_llama()
    with pytest.raises(pagedrt.InvalidArgument, match="activation_dtype 'float16' is not known"):
        pagedrt.Runtime(path, device="cpu", activation_dtype="float16")


def test_auto_activation_dtype_follows_weights_and_processor(tiny_llama):
    """"auto": bf16 activations only for bf16 weights on a processor with native bf16
    products (the avx512bf16 or amx GEMM variant in use), fp32 otherwise."""
    from pagedrt import _testing
    path, _ = tiny_llama()
    native = _testing._gemm_variant() in ("avx512bf16", "amx")
    with pagedrt.Runtime(path, device="cpu", dtype="bfloat16") as rt:
        assert rt.model_info.activation_dtype == ("bfloat16" if native else "float32")
    with pagedrt.Runtime(path, device="cpu") as rt:  # an fp32 checkpoint stays fp32
        assert rt.model_info.activation_dtype == "float32"
