"""Tensor parallelism on the CPU backend (issue 24, docs/tensor_parallel.md):
each rank holds its shard of every tensor (model/tp_plan.hpp) and the ranks
exchange partial sums in memory. The sharded forward is checked against the
unsharded one and against transformers (fp32) on tiny random Llamas whose
shapes divide by 2, 4 and 8, with vocabularies that do not (the last rank's
rows are padded).

Tolerances: fp32, relative error ||ours - ref|| / ||ref|| <= 1e-4 against
transformers (as tests/test_forward.py) and greedy tokens identical; bf16
activations round each rank's partial sums before they are added, so there
the prompt's logits are compared with TP = 1 at 2e-2 (bf16's 2^-8 steps
over a few roundings); fp8 weights keep the unsharded codes and scales, so
TP = 2 is compared with TP = 1 at 1e-4."""
from __future__ import annotations

import numpy as np
import pytest

import pagedrt
from conftest import finished_events, run_all
from test_forward import reference_greedy, reference_logits, rel_err, run_request

REL_TOL = 1e-4

# name: (checkpoint, tensor_parallel_size)
CASES = {
    "tp2-gqa2": (dict(num_attention_heads=4, num_key_value_heads=2), 2),
    "tp2-tied": (dict(num_key_value_heads=2, tie_word_embeddings=True, vocab_size=321), 2),
    "tp4-mha-odd-vocab": (dict(num_attention_heads=4, num_key_value_heads=4, vocab_size=322), 4),
    "tp8-d32": (dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=8, vocab_size=330), 8),
    "tp4-gqa2-d64": (dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=4, intermediate_size=512), 4),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_forward_matches_transformers_and_unsharded(tiny_llama, case):
    ckpt, tp = CASES[case]
    path, model = tiny_llama(**ckpt)
    vocab = ckpt.get("vocab_size", 320)
    prompt = np.random.default_rng(3).integers(3, vocab, size=37).tolist()
    got = {}
    for size in (1, tp):
        with pagedrt.Runtime(path, device="cpu", num_threads=2, activation_dtype="float32",
                             tensor_parallel_size=size) as rt:
            assert rt.model_info.tensor_parallel_size == size
            got[size] = run_request(rt, prompt, max_tokens=24, ignore_eos=True, return_logits=True)
            stats = rt.stats()
        assert stats.blocks_used == 0 and stats.blocks_free == stats.num_blocks
    tokens, logits, last = got[tp]
    assert last.finish_reason == "length"
    assert tokens == reference_greedy(model, prompt, 24) == got[1][0]
    ref = reference_logits(model, prompt + tokens[:-1])
    assert logits.shape == ref.shape
    assert rel_err(logits, ref) <= REL_TOL
    # the sharded sums differ from the unsharded ones only in rounding
    assert rel_err(logits, got[1][1]) <= REL_TOL


@pytest.mark.parametrize("kind", ["bf16", "fp8"])
def test_sharded_forward_reduced_precision(tiny_llama, kind):
    """bf16 activations: each rank's partial sums are rounded to bf16 before
    they are added, so TP = 2 is within bf16 rounding of TP = 1 (2e-2). fp8
    weights (quantization="fp8", fp32 activations): o_proj and down are
    quantized whole before their columns are cut, so every rank's codes and
    scales are the unsharded ones and TP = 2 equals TP = 1 up to summation
    order (1e-4)."""
    path, model = tiny_llama(num_attention_heads=4, num_key_value_heads=2, dtype="bfloat16")
    prompt = np.random.default_rng(4).integers(3, 320, size=40).tolist()
    opts = dict(activation_dtype="bfloat16") if kind == "bf16" else dict(quantization="fp8", activation_dtype="float32")
    got = {}
    for size in (1, 2):
        with pagedrt.Runtime(path, device="cpu", num_threads=2, tensor_parallel_size=size, **opts) as rt:
            got[size] = run_request(rt, prompt, max_tokens=1, ignore_eos=True, return_logits=True)[1]
    if kind == "bf16":
        assert rel_err(got[2], got[1]) <= 2e-2
        assert rel_err(got[2], reference_logits(model, prompt)) <= 2e-2
    else:  # TP = 1's fp8 against its own reference: tests/test_fp8.py
        assert rel_err(got[2], got[1]) <= REL_TOL


def test_engine_features_under_tensor_parallelism(tiny_llama):
    """Chunked prefill over 4-token blocks, a shared prefix in the cache, n > 1
    forks (copy-on-write of every rank's blocks), and preemption by recompute
    and by swap (every rank's blocks to host memory and back): greedy tokens
    equal transformers', seeded samples equal TP = 1's, and the pool is whole
    after."""
    path, model = tiny_llama(num_attention_heads=4, num_key_value_heads=2)
    rng = np.random.default_rng(5)
    shared = rng.integers(3, 320, size=24).tolist()
    prompts = [shared + rng.integers(3, 320, size=int(n)).tolist() for n in (3, 11, 30, 17, 9, 22)]
    refs = [reference_greedy(model, p, 20) for p in prompts]
    # a pool of 24 blocks of 4 tokens (two ranks' kv heads each): six requests
    # of up to 74 tokens cannot all fit
    block_bytes = 2 * 2 * (2 * 32) * 4 * 4  # layers, K and V, kv heads x D, 4 tokens, fp32
    for mode in ("recompute", "swap"):
        with pagedrt.Runtime(path, device="cpu", num_threads=2, activation_dtype="float32", tensor_parallel_size=2,
                             block_size=4, max_num_batched_tokens=7, kv_cache_bytes=24 * block_bytes,
                             preemption_mode=mode) as rt:
            assert rt.stats().num_blocks == 24
            got = run_all(rt, prompts, max_tokens=20, ignore_eos=True)
            stats = rt.stats()
        assert [t for t, _ in got] == refs, mode
        assert stats.num_preemptions > 0, mode
        if mode == "swap":
            assert stats.num_swapped_out > 0
        assert stats.blocks_used == 0 and stats.blocks_free == stats.num_blocks
    samples = {}
    for size in (1, 2):
        with pagedrt.Runtime(path, device="cpu", num_threads=2, activation_dtype="float32", tensor_parallel_size=size,
                             block_size=4) as rt:
            first = run_all(rt, prompts[:2], max_tokens=8, ignore_eos=True)
            again = run_all(rt, prompts[:2], max_tokens=8, ignore_eos=True)  # the prompts' blocks cached now
            assert rt.stats().prefix_hits > 0
            assert again == first and [t for t, _ in first] == [r[:8] for r in refs[:2]]
            rid = rt.submit(prompts[2], pagedrt.SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=12,
                                                               ignore_eos=True))
            outs = {}
            for ev in finished_events(rt, [rid]):
                outs.setdefault(ev.index, []).extend(ev.token_ids)
            samples[size] = outs
            assert rt.stats().blocks_used == 0
    assert samples[2] == samples[1]


def test_async_scheduling_under_tensor_parallelism(tiny_llama):
    """async_scheduling="on" (the CPU's test mode): a step's tokens are fed to
    every rank from the host; the greedy tokens are transformers'."""
    path, model = tiny_llama(num_attention_heads=4, num_key_value_heads=2)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, 320, size=int(n)).tolist() for n in (4, 19, 33)]
    with pagedrt.Runtime(path, device="cpu", num_threads=2, activation_dtype="float32", tensor_parallel_size=2,
                         async_scheduling="on") as rt:
        got = run_all(rt, prompts, max_tokens=16, ignore_eos=True)
        assert rt.stats().async_steps > 0
    assert [t for t, _ in got] == [reference_greedy(model, p, 16) for p in prompts]


def test_structured_output_under_tensor_parallelism(tiny_sp):
    """Constrained requests at TP = 2 (the masks filled beside the ranks'
    forwards, which lend them cores together): regexes and choices hold,
    and each seeded answer equals TP = 1's."""
    import re
    answers = {}
    for size in (1, 2):
        with pagedrt.Runtime(tiny_sp, device="cpu", num_threads=2, activation_dtype="float32",
                             tensor_parallel_size=size) as rt:
            got = []
            for seed in range(3):
                c = rt.generate("the quick", max_tokens=40, temperature=1.0, seed=seed, regex=r"x=[0-9]{1,3};")[0]
                assert c.finish_reason == "stop" and re.fullmatch(r"x=[0-9]{1,3};", c.text), c.text
                d = rt.generate("the quick", max_tokens=40, temperature=1.0, seed=seed, choice=["hello world", "bye"])[0]
                assert d.text in ("hello world", "bye") and d.finish_reason == "stop", d.text
                got += [c.text, d.text]
            answers[size] = got
            assert rt.stats().mask_rows > 0
    assert answers[2] == answers[1]


def test_sharded_logits_are_batch_invariant(tiny_llama):
    """deterministic (the CPU's default) holds across ranks: the ranks' sums
    are added in rank order, so a request's logits rows have the same bits
    alone and among neighbours with another chunking."""
    path, _ = tiny_llama(num_attention_heads=4, num_key_value_heads=2)
    rng = np.random.default_rng(6)
    target = rng.integers(3, 320, size=33).tolist()
    others = [rng.integers(3, 320, size=int(n)).tolist() for n in (5, 40, 12)]
    kw = dict(device="cpu", num_threads=2, tensor_parallel_size=2, activation_dtype="float32")
    with pagedrt.Runtime(path, **kw) as rt:
        alone = run_all(rt, [target], max_tokens=10, ignore_eos=True, return_logits=True)[0]
    with pagedrt.Runtime(path, max_num_batched_tokens=9, **kw) as rt:
        mixed = run_all(rt, [*others[:2], target, others[2]], max_tokens=10, ignore_eos=True, return_logits=True)[2]
    assert alone[0] == mixed[0]
    assert np.array_equal(alone[1], mixed[1])


def test_tensor_parallel_errors(tiny_llama):
    path, _ = tiny_llama(num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(pagedrt.InvalidArgument, match="tensor_parallel_size must be 1, 2, 4 or 8, got 3"):
        pagedrt.Runtime(path, device="cpu", tensor_parallel_size=3)
    with pytest.raises(pagedrt.InvalidArgument,
                       match=r"tensor_parallel_size 4 does not divide the model's num_key_value_heads \(2\)"):
        pagedrt.Runtime(path, device="cpu", tensor_parallel_size=4)
    odd, _ = tiny_llama(num_attention_heads=4, num_key_value_heads=4, intermediate_size=250)
    with pytest.raises(pagedrt.InvalidArgument, match=r"does not divide the model's intermediate_size \(250\)"):
        pagedrt.Runtime(odd, device="cpu", tensor_parallel_size=4)
    with pytest.raises(pagedrt.Unsupported, match="draft_model with tensor_parallel_size 2"):
        pagedrt.Runtime(path, device="cpu", tensor_parallel_size=2, draft_model=str(path))
    with pytest.raises(pagedrt.InvalidArgument, match="devices names GPUs .*device is 'cpu'"):
        pagedrt.Runtime(path, device="cpu", devices=[0])
    with pytest.raises(pagedrt.InvalidArgument, match="devices has 1 GPUs for tensor_parallel_size 2: one a rank"):
        pagedrt.Runtime(path, device="cuda", tensor_parallel_size=2, devices=[0])
    with pytest.raises(pagedrt.InvalidArgument, match="unknown Runtime option"):
        pagedrt.Runtime(path, device="cpu", gpus=[0])
    with pagedrt.Runtime(path, device="cpu", tensor_parallel_size=2) as rt:
        assert rt.model_info.devices == []  # no GPUs on the CPU
    from pagedrt import _core
    if not _core.cuda_built():
        with pytest.raises(pagedrt.Unsupported, match="this pagedrt build has no CUDA backend"):
            pagedrt.Runtime(path, device="cuda", tensor_parallel_size=2)
    elif _core.cuda_device_count() < 2:  # the single-GPU machine (tests/test_cuda_tp.py: several)
        with pytest.raises(pagedrt.InvalidArgument,
                           match=f"tensor_parallel_size 2 needs 2 GPUs; {_core.cuda_device_count()} visible"):
            pagedrt.Runtime(path, device="cuda", tensor_parallel_size=2)
