"""fp8 (e4m3) weights (issue 21): the codec, Hugging Face fp8 checkpoints, and
quantization="fp8" (each projection quantized per output channel at load).

On the CPU the projections stay fp8 in memory (a checkpoint's codes as they
are where it has a scale per tensor or per channel); the GEMM dequantizes
rows exactly, so the references below are the dequantized weights.

- The codec (backend/fp8.hpp) against torch.float8_e4m3fn: every one of the
  256 codes decodes to torch's value, and 10^6 values plus edge cases encode
  to torch's codes (nearest, ties to even, saturating at 448).
- Checkpoints from tools/make_fp8_checkpoint.py in its three layouts (per
  channel, per tensor, 128 x 128 blocks; a tiny random Llama, blocks of 32
  there): pagedrt's logits against transformers running the same model with
  each weight replaced by torch's dequantization of the file (codes as
  float8_e4m3fn times the scales): relative error <= 1e-4, greedy tokens
  equal, as tests/test_forward.py holds plain checkpoints. Against the
  unquantized model the logits must move (the quantization is not a no-op).
- Errors: a missing scale, a scale of the wrong shape, block scales without
  weight_block_size, and another quant_method, each named.
"""
from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import pytest
import torch

import pagedrt
from pagedrt import _testing
from test_forward import reference_greedy, reference_logits, rel_err, run_request

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
import make_fp8_checkpoint  # noqa: E402

REL_TOL = 1e-4


def test_e4m3_codec_matches_torch():
    from pagedrt._testing import _e4m3_decode, _e4m3_encode
    codes = np.arange(256, dtype=np.uint8)
    ours = _e4m3_decode(codes)
    ref = torch.from_numpy(codes).view(torch.float8_e4m3fn).float().numpy()
    assert np.array_equal(np.isnan(ours), np.isnan(ref)) and np.isnan(ref).sum() == 2  # 0x7F, 0xFF
    assert np.array_equal(ours[~np.isnan(ref)], ref[~np.isnan(ref)])
    rng = np.random.default_rng(0)
    x = np.concatenate([
        (rng.standard_normal(1_000_000) * 40).astype(np.float32),
        (2.0 ** np.arange(-12, 9, 0.125)).astype(np.float32),           # every binade, subnormals too
        ref[np.isfinite(ref)],                                            # every code's value: exact
        (ref[np.isfinite(ref)][:-1] + np.diff(ref[np.isfinite(ref)]) / 2).astype(np.float32),  # ties
        np.array([448, 449, 463.9, 464, 500, 1e9, -1e9, np.inf, -np.inf, 0.0, -0.0], np.float32)])
    mine = _e4m3_encode(np.ascontiguousarray(x))
    want = torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    assert np.array_equal(mine, want), np.flatnonzero(mine != want)[:10]
    assert _e4m3_encode(np.array([1e30, -1e30, 449.0], np.float32)).tolist() == [0x7E, 0xFE, 0x7E]  # saturate


def dequantized_reference(fp8_dir: pathlib.Path, block: int):
    """transformers' LlamaForCausalLM (fp32) holding torch's dequantization of
    every fp8 weight of `fp8_dir`."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM
    tensors = {}
    for f in sorted(fp8_dir.glob("*.safetensors")):
        tensors.update(load_file(f))
    state = {}
    for name, t in tensors.items():
        if name.endswith(("_scale", "_scale_inv")):
            continue
        if t.dtype == torch.float8_e4m3fn:
            w = t.float()
            if name + "_scale" in tensors:
                w = w * tensors[name + "_scale"].float()  # () or (out, 1): broadcasts
            else:
                s = tensors[name + "_scale_inv"].float()
                s = s.repeat_interleave(block, 0).repeat_interleave(block, 1)[:w.shape[0], :w.shape[1]]
                w = w * s
            state[name] = w
        else:
            state[name] = t.float()
    config = json.loads((fp8_dir / "config.json").read_text())
    config.pop("quantization_config")
    model = LlamaForCausalLM.from_pretrained(None, config=type(LlamaForCausalLM.config_class())(**config),
                                             state_dict=state, dtype=torch.float32).eval()
    return model


@pytest.mark.parametrize("scheme", ["channel", "tensor", "block"])
def test_fp8_checkpoint_matches_its_dequantization(tiny_llama, tmp_path, scheme):
    path, model = tiny_llama(num_key_value_heads=2, hidden_size=96, intermediate_size=200)
    out = tmp_path / f"fp8-{scheme}"
    make_fp8_checkpoint.main([str(path), str(out), "--scheme", scheme, "--block", "32"])
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == {"channel": "fbgemm_fp8", "tensor": "compressed-tensors", "block": "fp8"}[scheme]
    ref = dequantized_reference(out, 32)
    prompt = np.random.default_rng(3).integers(3, 320, size=37).tolist()
    kept = "float8_e4m3fn" if scheme != "block" else None  # block scales: dequantized at load
    with pagedrt.Runtime(out, device="cpu", num_threads=2, dtype="float32", activation_dtype="float32") as rt:
        assert rt.model_info.weight_dtype == (kept or "float32") and rt.model_info.quantization == q["quant_method"]
        tokens, logits, _ = run_request(rt, prompt, max_tokens=24, ignore_eos=True, return_logits=True)
    assert tokens == reference_greedy(ref, prompt, 24)
    want = reference_logits(ref, prompt + tokens[:-1])
    assert rel_err(logits, want) <= REL_TOL
    # The quantization moved the logits: this compared fp8 weights, not the originals.
    assert rel_err(logits, reference_logits(model, prompt + tokens[:-1])) > 10 * REL_TOL
    # "auto": the rest in bf16 (its torch_dtype, and fp8 values fit bf16's range)
    with pagedrt.Runtime(out, device="cpu", num_threads=2) as rt:
        assert rt.model_info.weight_dtype == (kept or "bfloat16")
    with pagedrt.Runtime(path, device="cpu", num_threads=2) as rt:
        assert rt.model_info.quantization == ""


def fp8_copy(tiny_llama, tmp_path, scheme="channel"):
    path, _ = tiny_llama(num_key_value_heads=2)
    out = tmp_path / "fp8"
    make_fp8_checkpoint.main([str(path), str(out), "--scheme", scheme, "--block", "32"])
    return out


def edit_safetensors(folder: pathlib.Path, edit):
    """Rewrites every shard (and the index) with edit(name -> (dtype, array)) applied."""
    weight_map = {}
    for f in folder.glob("*.safetensors"):
        tensors = make_fp8_checkpoint.read_safetensors(f)
        edit(tensors)
        make_fp8_checkpoint.write_safetensors(f, tensors)
        weight_map.update({name: f.name for name in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_fp8_checkpoint_errors_name_the_problem(tiny_llama, tmp_path):
    out = fp8_copy(tiny_llama, tmp_path)
    name = "model.layers.1.mlp.down_proj.weight"
    edit_safetensors(out, lambda t: t.pop(name + "_scale", None))
    with pytest.raises(pagedrt.ModelError, match=rf"fp8 tensor '{name}' has no scale"):
        pagedrt.Runtime(out, device="cpu")

    out = fp8_copy(tiny_llama, tmp_path / "b")
    def bad_shape(t):
        if name + "_scale" in t:
            t[name + "_scale"] = ("F32", np.ones((3, 2), np.float32))
    edit_safetensors(out, bad_shape)
    with pytest.raises(pagedrt.ModelError, match=rf"scale '{name}_scale' has shape \[3, 2\]"):
        pagedrt.Runtime(out, device="cpu")

    out = fp8_copy(tiny_llama, tmp_path / "c", scheme="block")
    cfg = json.loads((out / "config.json").read_text())
    del cfg["quantization_config"]["weight_block_size"]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(pagedrt.ModelError, match="no weight_block_size"):
        pagedrt.Runtime(out, device="cpu")

    out = fp8_copy(tiny_llama, tmp_path / "d")
    def nan_code(t):
        if name in t:
            codes = t[name][1].copy()
            codes[2, 5] = 0xFF
            t[name] = ("F8_E4M3", codes)
    edit_safetensors(out, nan_code)
    with pytest.raises(pagedrt.ModelError, match=rf"'{name}': element \(2, 5\) is an e4m3 NaN"):
        pagedrt.Runtime(out, device="cpu")

    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(pagedrt.Unsupported, match="quant_method 'gptq' is not supported"):
        pagedrt.Runtime(out, device="cpu")


def test_compressed_tensors_dense_is_no_quantization(tiny_llama):
    """compressed-tensors' "dense" format (sparsity metadata, plain weights)
    loads as an unquantized checkpoint; its int4 packing is refused by name."""
    path, _ = tiny_llama(num_key_value_heads=2)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "dense"}
    (path / "config.json").write_text(json.dumps(cfg))
    with pagedrt.Runtime(path, device="cpu") as rt:
        assert rt.model_info.quantization == ""
        assert len(rt.generate([[5, 6, 7]], max_tokens=3, temperature=0)[0].token_ids) == 3
    cfg["quantization_config"]["format"] = "pack-quantized"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(pagedrt.Unsupported, match="compressed-tensors format 'pack-quantized'"):
        pagedrt.Runtime(path, device="cpu")


def quantize_rows(w):
    """The reference of quantization="fp8": per row scale max |row| / 448 (fp32; 1 for a
    zero row), codes torch's e4m3 rounding of w / scale. Returns the dequantized fp32 rows."""
    w = np.asarray(w, np.float32)
    amax = np.abs(w).max(1)
    scale = np.where(amax > 0, amax / np.float32(448.0), np.float32(1.0)).astype(np.float32)
    codes = torch.from_numpy((w / scale[:, None]).astype(np.float32)).to(torch.float8_e4m3fn)
    return (codes.float().numpy() * scale[:, None]).astype(np.float32)


@pytest.mark.parametrize("act", ["float32", "bfloat16"])
@pytest.mark.parametrize("n,m,k", [(1, 48, 64), (3, 50, 200), (33, 200, 96), (100, 97, 1536)])
def test_fp8_linear_is_the_product_of_the_quantized_weights(act, n, m, k):
    """The CPU linear on fp8 weights (rows in tasks of 48, dequantized exactly):
    within 1e-5 (relative, fp32 sums) of float64 x @ W^T on the reference
    quantization, with rows of very different scales and a zero row."""
    from pagedrt import _testing
    ops = _testing._Ops("cpu", act)
    rng = np.random.default_rng(n * 1000 + m + k)
    w = (rng.standard_normal((m, k)) * 10.0 ** rng.uniform(-3, 2, (m, 1))).astype(np.float32)
    w[m // 2] = 0.0
    x = rng.standard_normal((n, k)).astype(np.float32)
    if act == "bfloat16":  # the op rounds x to bf16 first
        x = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    ops.set_batch(*(np.zeros(n, np.int32),) * 2, np.zeros(n, np.int64), np.array([0, n], np.int32),
                  np.array([n], np.int32), np.array([0, 1], np.int32), np.array([0], np.int32),
                  np.array([n - 1], np.int32))
    y = ops.linear(x, w, "fp8", True)
    ref = x.astype(np.float64) @ quantize_rows(w).astype(np.float64).T
    assert rel_err(y, ref) <= 1e-5
    assert np.all(y[:, m // 2] == 0)
    assert rel_err(y, x.astype(np.float64) @ w.astype(np.float64).T) > 1e-3  # the weights were rounded


@pytest.mark.parametrize("n", [1, 3, 4, 9])
def test_fp8_linear_widens_every_code_exactly(n):
    """The GEMM's widening of e4m3 codes (bf16 activations: in registers for steps
    of up to 4 tokens, into a bf16 buffer beyond) is exact for every finite code,
    subnormals included: W's rows each hold all 254 finite values (max 448, so the
    scale is 1 and the codes are the values' own), x is one-hot, y is W's columns
    bit for bit."""
    from pagedrt import _testing
    ops = _testing._Ops("cpu", "bfloat16")
    codes = np.array([c for c in range(256) if c & 0x7F != 0x7F], np.uint8)
    vals = torch.from_numpy(codes).view(torch.float8_e4m3fn).float().numpy()
    k, m = 256, 48
    w = np.zeros((m, k), np.float32)
    for r in range(m):
        w[r, :len(vals)] = np.roll(vals, 5 * r)
    for start in range(0, len(vals), n):
        cols = [(start + t) % len(vals) for t in range(n)]
        x = np.zeros((n, k), np.float32)
        x[np.arange(n), cols] = 1.0
        ops.set_batch(*(np.zeros(n, np.int32),) * 2, np.zeros(n, np.int64), np.array([0, n], np.int32),
                      np.array([n], np.int32), np.array([0, 1], np.int32), np.array([0], np.int32),
                      np.array([n - 1], np.int32))
        y = ops.linear(x, w, "fp8", True)
        assert np.array_equal(y, w[:, cols].T), (n, cols)


def test_quantization_fp8_matches_transformers_on_the_quantized_weights(tiny_llama):
    """Runtime(quantization="fp8") on a tiny fp32 model, fp32 activations: logits
    within 1e-4 of transformers holding every projection's reference
    quantization, greedy tokens equal, and far from the unquantized model."""
    path, model = tiny_llama(num_key_value_heads=2, hidden_size=96, intermediate_size=200)
    import copy
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer in ref.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                        layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                lin.weight.copy_(torch.from_numpy(quantize_rows(lin.weight.numpy())))
    prompt = np.random.default_rng(4).integers(3, 320, size=37).tolist()
    with pagedrt.Runtime(path, device="cpu", num_threads=2, dtype="float32", activation_dtype="float32",
                         quantization="fp8") as rt:
        assert rt.model_info.weight_dtype == "float8_e4m3fn" and rt.model_info.quantization == "fp8"
        tokens, logits, _ = run_request(rt, prompt, max_tokens=24, ignore_eos=True, return_logits=True)
    assert tokens == reference_greedy(ref, prompt, 24)
    want = reference_logits(ref, prompt + tokens[:-1])
    assert rel_err(logits, want) <= REL_TOL
    assert rel_err(logits, reference_logits(model, prompt + tokens[:-1])) > 10 * REL_TOL


def test_quantization_is_checked(tiny_llama):
    path, _ = tiny_llama()
    with pytest.raises(pagedrt.InvalidArgument, match="quantization 'int4' is not known"):
        pagedrt.Runtime(path, device="cpu", quantization="int4")


def test_fp8_checkpoint_keeps_unquantized_projections_as_they_are(tiny_llama, tmp_path):
    """A per-channel fp8 checkpoint whose layer-0 o_proj and up_proj were left in
    fp32 (as compressed-tensors' ignore lists leave layers): on the CPU the fp8
    groups keep their codes, o_proj loads unquantized and the gate/up group,
    half fp8, is dequantized: logits within 1e-4 of transformers on exactly
    those weights (quantizing the fp32 ones would move them ~1e-2)."""
    path, model = tiny_llama(num_key_value_heads=2, hidden_size=96, intermediate_size=200)
    out = tmp_path / "fp8-mixed"
    make_fp8_checkpoint.main([str(path), str(out), "--scheme", "channel"])
    keep = {"model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.up_proj.weight"}
    originals = {name: p.detach().numpy().astype(np.float32) for name, p in model.named_parameters() if name in keep}

    def unquantize(tensors):
        for name in keep:
            if name in tensors:
                tensors[name] = ("F32", originals[name])
                tensors.pop(name + "_scale", None)

    edit_safetensors(out, unquantize)
    ref = dequantized_reference(out, 32)
    prompt = np.random.default_rng(5).integers(3, 320, size=30).tolist()
    with pagedrt.Runtime(out, device="cpu", num_threads=2, dtype="float32", activation_dtype="float32") as rt:
        assert rt.model_info.weight_dtype == "float8_e4m3fn"
        tokens, logits, _ = run_request(rt, prompt, max_tokens=12, ignore_eos=True, return_logits=True)
    assert tokens == reference_greedy(ref, prompt, 12)
    assert rel_err(logits, reference_logits(ref, prompt + tokens[:-1])) <= REL_TOL


def test_quantization_fp8_bf16_any_order_is_close_to_the_deterministic_run(tiny_llama):
    """quantization="fp8" with bf16 activations: deterministic=False (on a
    processor with AMX: steps of 5+ tokens on AMX tiles, each 48-row task's
    dequantized rows) gives logits within 2e-2 of deterministic=True (the
    VDPBF16PS kernel for every step) and, where AMX runs, other bits somewhere
    (the two paths are told apart). The widths are large enough for that: at
    hidden 128 and 256 every sum of fp8 x bf16 products came out exact in fp32
    in both orders, and the rows were equal bit for bit."""
    path, _ = tiny_llama(num_key_value_heads=2, hidden_size=512, intermediate_size=1536)
    prompt = np.random.default_rng(6).integers(3, 320, size=40).tolist()
    runs = {}
    for det in (True, False):
        with pagedrt.Runtime(path, device="cpu", num_threads=2, activation_dtype="bfloat16", quantization="fp8",
                             max_num_batched_tokens=16, deterministic=det) as rt:
            assert rt.model_info.deterministic is det
            runs[det] = run_request(rt, prompt, max_tokens=6, ignore_eos=True, return_logits=True)[:2]
    # the first row (the prompt's chunks of 16, 16 and 8 tokens) always; the rest where the tokens agree
    rows = len(runs[True][1]) if runs[True][0] == runs[False][0] else 1
    assert rel_err(runs[False][1][:rows], runs[True][1][:rows]) <= 2e-2
    if _testing._gemm_amx_for_large_steps():
        assert not np.array_equal(runs[False][1][0], runs[True][1][0]), "AMX was expected to sum in another order"
