"""Broken or unsupported model folders: config.json, missing and mis-shaped
tensors. Every case must raise pagedrt.ModelError (a ValueError) naming the
file and the problem, and leave the process serving."""
from __future__ import annotations

import json
import shutil

import pytest
from safetensors.numpy import load_file, save_file

import pagedrt


@pytest.fixture(scope="module")
def good_model(tmp_path_factory):
    from conftest import make_tiny_llama
    path, _ = make_tiny_llama(tmp_path_factory.mktemp("good") / "m", num_key_value_heads=2)
    return path


def clone(src, dst, edit_config=None, edit_tensors=None):
    shutil.copytree(src, dst)
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        tensors = load_file(dst / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, dst / "model.safetensors")
    return dst


def load_error(path) -> str:
    with pytest.raises(pagedrt.ModelError) as info:
        pagedrt.Runtime(path, device="cpu")
    assert isinstance(info.value, ValueError)
    return str(info.value)


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "vocab_size", "intermediate_size"])
def test_missing_required_field(good_model, tmp_path, field):
    path = clone(good_model, tmp_path / "m", edit_config=lambda c: c.pop(field))
    msg = load_error(path)
    assert "config.json" in msg and f"'{field}'" in msg


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c.update(architectures=["GPT2LMHeadModel"]), "GPT2LMHeadModel"),
    (lambda c: c.update(hidden_size="128"), "hidden_size"),
    (lambda c: c.update(num_key_value_heads=3), "num_key_value_heads"),
    (lambda c: c.update(hidden_size=-5), "hidden_size"),
    (lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 2.0}), "yarn"),
    (lambda c: c.update(rope_parameters={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act"),
    (lambda c: c.update(eos_token_id=[2, 99999]), "eos_token_id"),
    (lambda c: c.update(attention_bias=True), "attention_bias"),
])
def test_bad_config_values(good_model, tmp_path, edit, needle):
    path = clone(good_model, tmp_path / "m", edit_config=edit)
    msg = load_error(path)
    assert "config.json" in msg and needle in msg


def test_invalid_json_config(good_model, tmp_path):
    path = clone(good_model, tmp_path / "m")
    (path / "config.json").write_text('{"hidden_size": 128,, }')
    msg = load_error(path)
    assert "config.json" in msg and "invalid JSON at byte 20" in msg


def test_missing_files(good_model, tmp_path):
    path = clone(good_model, tmp_path / "m")
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        pagedrt.Runtime(path, device="cpu")
    path = clone(good_model, tmp_path / "m2")
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        pagedrt.Runtime(path, device="cpu")


def test_missing_tensor(good_model, tmp_path):
    path = clone(good_model, tmp_path / "m",
                 edit_tensors=lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    msg = load_error(path)
    assert "model.layers.1.mlp.up_proj.weight" in msg and "missing" in msg


def test_wrong_shape_tensor(good_model, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:-1]
    msg = load_error(clone(good_model, tmp_path / "m", edit_tensors=edit))
    assert "model.safetensors" in msg and "k_proj" in msg and "shape" in msg


def test_wrong_dtype_tensor(good_model, tmp_path):
    def edit(t):
        t["model.norm.weight"] = t["model.norm.weight"].astype("int32")
    msg = load_error(clone(good_model, tmp_path / "m", edit_tensors=edit))
    assert "model.norm.weight" in msg and "I32" in msg


def test_legacy_rope_scaling_and_mistral(good_model, tmp_path):
    """transformers 4.x spelling (rope_theta + rope_scaling with "type") and the
    Mistral architecture name load; the logits equal the rope_parameters spelling."""
    import numpy as np

    def legacy(c):
        c["architectures"] = ["MistralForCausalLM"]
        c.pop("rope_parameters", None)
        c["rope_theta"] = 10000.0
        c["rope_scaling"] = {"type": "linear", "factor": 2.0}

    def modern(c):
        c["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}

    out = []
    for name, edit in (("legacy", legacy), ("modern", modern)):
        path = clone(good_model, tmp_path / name, edit_config=edit)
        with pagedrt.Runtime(path, device="cpu") as rt:
            rid = rt.submit(list(range(5, 25)), max_tokens=1, return_logits=True, temperature=0)
            rows = []
            while not rows or not done:
                for ev in rt.poll(rid, timeout=1.0):
                    if ev.logits is not None:
                        rows.append(ev.logits)
                    done = ev.finished
            out.append(np.concatenate(rows))
    assert np.array_equal(out[0], out[1])


def test_runtime_keeps_serving_after_bad_requests(good_model):
    with pagedrt.Runtime(good_model, device="cpu", max_model_len=64) as rt:
        with pytest.raises(pagedrt.InvalidArgument, match="outside the vocabulary"):
            rt.submit([1, 2, 10**6])
        with pytest.raises(pagedrt.InvalidArgument, match="empty"):
            rt.submit([])
        with pytest.raises(pagedrt.InvalidArgument, match="max_tokens"):
            rt.submit([1, 2], max_tokens=0)
        with pytest.raises(pagedrt.InvalidArgument, match="logit_bias has token 5 twice"):
            rt.submit([1, 2], logit_bias={"5": 1.0, 5: -1.0})  # "5" and 5 name one token
        with pytest.raises(pagedrt.InvalidArgument, match="max_model_len"):
            rt.submit(list(range(3, 70)))
        with pytest.raises(pagedrt.InvalidArgument, match="no tokenizer"):
            rt.submit("text needs a tokenizer")
        rid = rt.submit([1, 2, 3], max_tokens=4, ignore_eos=True, request_id="x", temperature=0)
        with pytest.raises(pagedrt.InvalidArgument, match="already in use"):
            rt.submit([1, 2, 3], request_id="x")
        got = []
        while not got or not got[-1].finished:
            got += rt.poll(rid, timeout=1.0)
        assert sum(len(e.token_ids) for e in got) == 4 and got[-1].finish_reason == "length"


def test_bad_runtime_arguments(good_model, tmp_path):
    with pytest.raises(pagedrt.InvalidArgument, match="block_size"):
        pagedrt.Runtime(good_model, device="cpu", block_size=0)
    with pytest.raises(pagedrt.InvalidArgument, match="device 'tpu'"):
        pagedrt.Runtime(good_model, device="tpu")
    with pytest.raises(pagedrt.InvalidArgument, match="dtype"):
        pagedrt.Runtime(good_model, device="cpu", dtype="int4")
    with pytest.raises(pagedrt.InvalidArgument, match="kv_cache_bytes"):
        pagedrt.Runtime(good_model, device="cpu", kv_cache_bytes=100)
    with pytest.raises(pagedrt.Unsupported, match="CUDA"):
        pagedrt.Runtime(good_model, device="cuda")


def test_abort_and_close_end_requests(good_model):
    rt = pagedrt.Runtime(good_model, device="cpu")
    a = rt.submit(list(range(3, 30)), max_tokens=400, ignore_eos=True)
    b = rt.submit(list(range(3, 30)), max_tokens=400, ignore_eos=True)
    assert rt.abort(a) is True
    with pytest.raises(pagedrt.InvalidArgument, match="unknown request id 'no-such-request'"):
        rt.abort("no-such-request")
    with pytest.raises(pagedrt.InvalidArgument, match="unknown or finished request id"):
        rt.poll("no-such-request")
    evs = []
    while not any(e.finished and e.request_id == a for e in evs):
        evs += rt.poll(a, timeout=1.0)
    assert evs[-1].finish_reason == "abort"
    rt.close()
    final = [e for e in rt.poll(b, timeout=1.0) if e.finished]
    assert len(final) == 1 and final[0].finish_reason == "abort"
    assert rt.stats().blocks_used == 0
    with pytest.raises(pagedrt.InvalidArgument, match="closed"):
        rt.submit([1, 2, 3])
