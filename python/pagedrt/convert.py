"""GGUF → Hugging Face folder, for Llama-architecture files.

    model.gguf ──GGUFReader──► metadata + (possibly quantized) tensors
        │  dequantize (gguf.quants) → float32 → output dtype
        │  rename blk.N.attn_q → model.layers.N.self_attn.q_proj, …
        │  undo llama.cpp's Q/K row permutation
        ▼
    out_dir/  config.json  generation_config.json  model.safetensors
              tokenizer.json (byte-level BPE) or tokenizer.model (sentencepiece)
              tokenizer_config.json (special tokens, chat template)

The output is an ordinary checkpoint folder: pagedrt loads it like any other,
and so does transformers. Only numpy, gguf and tokenizers are needed.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import secrets
import struct
import sys

import numpy as np

from .errors import InvalidArgument, ModelError

# Bump when the output of the converter changes: models.py keys its cache on it.
# 2: generation_config.json carries the file's sampling settings (general.sampling.*).
CONVERTER_VERSION = "2"

# GGUF's recommended sampling settings (general.sampling.*, written by llama.cpp's
# converters from a model's generation_config.json) → generation_config.json's keys.
_SAMPLING_KEYS = {"temp": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                  "penalty_repeat": "repetition_penalty"}

_DTYPES = {  # name → (safetensors dtype, numpy storage dtype)
    "float32": ("F32", np.dtype("<f4")),
    "float16": ("F16", np.dtype("<f2")),
    "bfloat16": ("BF16", np.dtype("<u2")),  # bf16 bits, stored as uint16
}

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TENSOR_RE = re.compile(r"^(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)$")

GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


def convert_gguf(gguf_path, out_dir, *, dtype: str = "float32", progress: bool = True) -> pathlib.Path:
    """Convert a Llama-architecture GGUF file into a Hugging Face folder at `out_dir`.

    Every tensor is dequantized (Q4_1, Q8_0, F16, … via `gguf.quants`) into
    `dtype` ("float32", "bfloat16" or "float16"). generation_config.json gets
    the file's recommended sampling settings where it has them
    (general.sampling.temp, top_p, top_k, min_p, penalty_repeat, under
    transformers' names). Raises ModelError (a ValueError) naming the file for
    a broken file or an architecture other than llama, InvalidArgument for a
    bad dtype, and NotImplementedError for GGUF features the converter does
    not handle yet.
    """
    import gguf

    if dtype not in _DTYPES:
        raise InvalidArgument(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    path = pathlib.Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises assorted errors on a bad file
        raise ModelError(f"{path}: not a readable GGUF file of {path.stat().st_size:,} bytes, truncated or damaged? "
                         f"({e})") from e
    meta = _Metadata(reader, path)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ModelError(f"{path}: architecture {arch!r} is not supported (only 'llama')")

    tensors = {t.name: t for t in reader.tensors}
    config = _model_config(meta, tensors, path)
    plan = _tensor_plan(tensors, config, path)

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config["torch_dtype"] = config["dtype"] = dtype
    _write_json(out / "config.json", config)
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    gen.update(_sampling(meta, path))
    _write_json(out / "generation_config.json", gen)
    _write_tokenizer(meta, out, config)
    _write_safetensors(out / "model.safetensors", plan, dtype, progress, desc=f"Converting {path.name}")
    return out


class _Metadata:
    """Key/value access to a GGUF file's metadata, with the file name in errors."""

    def __init__(self, reader, path: pathlib.Path):
        self._fields, self.path = reader.fields, path

    def get(self, key: str, default=None):
        field = self._fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str):
        value = self.get(key)
        if value is None:
            raise ModelError(f"{self.path}: missing metadata key {key!r}")
        return value


def _sampling(meta: _Metadata, path: pathlib.Path) -> dict:
    """The file's general.sampling.* settings under generation_config.json's names."""
    out = {}
    for key, name in _SAMPLING_KEYS.items():
        value = meta.get("general.sampling." + key)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ModelError(f"{path}: metadata key 'general.sampling.{key}' is {value!r}, not a number")
        out[name] = int(value) if name == "top_k" else _short_float(value)
    return out


def _short_float(x: float) -> float:
    # GGUF stores these as float32; print the shortest decimal that round-trips (1e-05, not 9.99999974e-06).
    return float(str(np.float32(x)))


def _model_config(meta: _Metadata, tensors: dict, path: pathlib.Path) -> dict:
    a = "llama."
    hidden = int(meta.require(a + "embedding_length"))
    n_head = int(meta.require(a + "attention.head_count"))
    n_kv = int(meta.get(a + "attention.head_count_kv", n_head))
    if "token_embd.weight" not in tensors or "blk.0.attn_q.weight" not in tensors:
        raise ModelError(f"{path}: missing tensor token_embd.weight or blk.0.attn_q.weight")
    q_rows = int(tensors["blk.0.attn_q.weight"].shape[-1])  # GGUF dims are reversed: [in, out]
    head_dim = int(meta.get(a + "attention.key_length", q_rows // max(n_head, 1)))
    if n_head <= 0 or n_kv <= 0 or n_head % n_kv or head_dim * n_head != q_rows or head_dim % 2:
        raise ModelError(f"{path}: inconsistent heads: {n_head} query, {n_kv} kv, attn_q rows {q_rows}")
    if "rope_freqs.weight" in tensors:
        raise NotImplementedError(f"{path}: Llama-3 rope scaling (rope_freqs tensor) is not supported yet")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(meta.require(a + "feed_forward_length")),
        "num_hidden_layers": int(meta.require(a + "block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _short_float(meta.get(a + "attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _short_float(meta.get(a + "rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get(a + "context_length", 2048)),
        "vocab_size": int(tensors["token_embd.weight"].shape[-1]),
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in tensors,
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    scaling = meta.get(a + "rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise NotImplementedError(f"{path}: rope scaling {scaling!r} is not supported yet")
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(meta.require(a + "rope.scaling.factor"))}
    for key, name in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        value = meta.get(f"tokenizer.ggml.{key}_token_id")
        if value is not None:
            config[name] = int(value)
    return config


def _expected_shapes(c: dict) -> dict:
    h, i, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    return {
        "token_embd": (c["vocab_size"], h), "output": (c["vocab_size"], h), "output_norm": (h,),
        "attn_norm": (h,), "ffn_norm": (h,), "attn_q": (q, h), "attn_k": (kv, h), "attn_v": (kv, h),
        "attn_output": (h, q), "ffn_gate": (i, h), "ffn_up": (i, h), "ffn_down": (h, i),
    }  # fmt: skip


def _tensor_plan(tensors: dict, config: dict, path: pathlib.Path) -> list:
    """[(hf_name, hf_shape, loader)] for every tensor; validates names and shapes first."""
    shapes = _expected_shapes(config)
    n_layers = config["num_hidden_layers"]
    required = {"token_embd.weight", "output_norm.weight"}
    required |= {f"blk.{n}.{k}.weight" for n in range(n_layers) for k in _LAYER_NAMES}
    missing = sorted(required - tensors.keys())
    if missing:
        raise ModelError(f"{path}: missing tensors {missing[:5]}{' …' if len(missing) > 5 else ''}")
    plan = []
    for name, t in tensors.items():
        m = _TENSOR_RE.match(name)
        layer, kind, suffix = (m.groups() if m else (None, None, None))
        table = _LAYER_NAMES if layer is not None else _GLOBAL_NAMES
        if kind not in table or (layer is not None and int(layer) >= n_layers):
            raise ModelError(f"{path}: unexpected tensor {name!r}")
        hf = table[kind] if layer is None else f"model.layers.{layer}.{table[kind]}"
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dims innermost first
        want = shapes[kind] if suffix == "weight" else shapes[kind][:1]
        if shape != want:
            raise ModelError(f"{path}: tensor {name!r} has shape {shape}, expected {want}")
        heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}.get(kind)
        plan.append((f"{hf}.{suffix}", shape, _loader(t, shape, heads, path)))
    return plan


def _loader(t, shape: tuple, n_heads: int | None, path: pathlib.Path):
    def load() -> np.ndarray:
        from gguf.quants import dequantize

        try:
            w = dequantize(t.data, t.tensor_type).reshape(shape)
        except NotImplementedError as e:  # a quantization type gguf cannot dequantize
            raise NotImplementedError(f"{path}: tensor {t.name!r}: {e}") from e
        except ValueError as e:  # data that does not fill the shape
            raise ModelError(f"{path}: tensor {t.name!r} is broken ({e})") from e
        return w if n_heads is None else unpermute_rows(w, n_heads)

    return load


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo the row order llama.cpp gives Q and K (and their biases) for its RoPE.

    Within each head HF keeps the rotated halves apart, llama.cpp interleaves them:

        HF     rows per head: x0 x1 … x(d/2-1) | y0 y1 … y(d/2-1)
        GGUF   rows per head: x0 y0 x1 y1 … x(d/2-1) y(d/2-1)

    llama.cpp goes HF → GGUF by viewing rows as (n_heads, 2, d/2) and swapping
    the last two axes; the inverse views them as (n_heads, d/2, 2) and swaps back.
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bits (uint16), rounding to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype="<f4").view(np.uint32)
    rounded = (u + (np.uint32(0x7FFF) + ((u >> 16) & 1))) >> 16  # may wrap only for NaN, fixed below
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    out = np.where(nan, (u >> 16) | 0x0040, rounded)  # keep sign and payload top bits, force quiet
    return out.astype("<u2")


def _cast(w: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return to_bfloat16_bits(w)
    return np.ascontiguousarray(w, dtype=_DTYPES[dtype][1])


# Elements cast and written at a time: the bf16 rounding's uint32 temporaries
# then stay a few MiB, where whole tensors made them several times the largest
# one (SmolLM2's 113 MB fp32 embedding: the conversion's peak RSS 728 MB).
_WRITE_ELEMENTS = 1 << 20


def _write_safetensors(path: pathlib.Path, plan: list, dtype: str, progress: bool, desc: str) -> None:
    """Stream tensors into a safetensors file: a temp file, renamed into place when complete.

    Layout: u64 little-endian header length N | N bytes of JSON, space-padded
    to a multiple of 8 | tensor bytes back to back, in header order.
    """
    st_dtype, np_dtype = _DTYPES[dtype]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in plan:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    items = plan
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(plan, desc=desc, unit="tensor", file=sys.stderr)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:  # not mkstemp: that would make the file owner-only
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, shape, load in items:
                flat = load().reshape(-1)  # cast and written a slice at a time: no whole-tensor temporaries
                for i in range(0, flat.size, _WRITE_ELEMENTS):
                    f.write(_cast(flat[i:i + _WRITE_ELEMENTS], dtype))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_json(path: pathlib.Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ── tokenizer ────────────────────────────────────────────────────────────────


def _write_tokenizer(meta: _Metadata, out: pathlib.Path, config: dict) -> None:
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.require("tokenizer.ggml.tokens")
    types = [int(k) or 1 for k in meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)]  # 0: undefined
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in config and not 0 <= config[key] < len(tokens):
            raise ModelError(f"{meta.path}: {key} {config[key]} is outside the vocabulary ({len(tokens)} tokens)")
    if kind == "gpt2":
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
        _byte_level_bpe(meta, tokens, types, config, add_bos).save(str(out / "tokenizer.json"))
    elif kind == "llama":
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))  # llama.cpp's default for SPM
        (out / "tokenizer.model").write_bytes(_sentencepiece_model(meta, tokens, types))
    else:
        raise NotImplementedError(f"{meta.path}: tokenizer model {kind!r} is not supported (gpt2 or llama)")

    def token(key: str):
        i = config.get(key)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast" if kind == "gpt2" else "LlamaTokenizer",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("pad_token_id"),
        "unk_token": tokens[u] if (u := meta.get("tokenizer.ggml.unknown_token_id")) is not None else None,
        "add_bos_token": add_bos,
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    template = meta.get("tokenizer.chat_template")
    if template is not None:
        tok_config["chat_template"] = template
    _write_json(out / "tokenizer_config.json", tok_config)


# The split regex of Llama-3's tokenizer (and others llama.cpp calls "llama-bpe").
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(pre: str | None, path: pathlib.Path):
    from tokenizers import Regex, pre_tokenizers as pt

    if pre in (None, "default", "gpt-2", "gpt2"):
        return pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        # every numeric character alone, then GPT-2's split: SmolLM2's tokenizer.json and llama.cpp agree
        digits = pt.Digits(individual_digits=True)
        return pt.Sequence([digits, pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe"):
        split = pt.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False)
        return pt.Sequence([split, pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise NotImplementedError(f"{path}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported yet")


def _byte_level_bpe(meta: _Metadata, tokens: list, types: list, config: dict, add_bos: bool):
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a duplicated spelling keeps its first id
    merges = []
    for m in meta.require("tokenizer.ggml.merges"):
        pair = m.split(" ")
        if len(pair) != 2:
            raise ModelError(f"{meta.path}: malformed merge {m!r}")
        merges.append(tuple(pair))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"), meta.path)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == GGUF_CONTROL]
    )
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == GGUF_USER_DEFINED]
    )
    post = [processors.ByteLevel(trim_offsets=False)]
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    bos, eos = config.get("bos_token_id"), config.get("eos_token_id")
    if (add_bos and bos is not None) or (add_eos and eos is not None):
        pre = [tokens[bos]] if add_bos and bos is not None else []
        post_ = [tokens[eos]] if add_eos and eos is not None else []
        single = " ".join(pre + ["$A"] + post_)
        pair = " ".join(pre + ["$A"] + post_ + [p + ":1" for p in pre] + ["$B:1"] + [p + ":1" for p in post_])
        specials = [(t, vocab[t]) for t in dict.fromkeys(pre + post_)]
        post.append(processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials))
    tok.post_processor = post[0] if len(post) == 1 else processors.Sequence(post)
    return tok


def _proto_varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32 values are encoded as 10-byte two's complement
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _proto_field(number: int, value) -> bytes:
    """One protobuf field: bytes/str as length-delimited, float as fixed32, bool/int as varint."""
    if isinstance(value, (bytes, str)):
        data = value.encode() if isinstance(value, str) else value
        return _proto_varint(number << 3 | 2) + _proto_varint(len(data)) + data
    if isinstance(value, float):
        return _proto_varint(number << 3 | 5) + struct.pack("<f", value)
    return _proto_varint(number << 3) + _proto_varint(int(value))


def _sentencepiece_model(meta: _Metadata, tokens: list, types: list) -> bytes:
    """A sentencepiece ModelProto (tokenizer.model) from a GGUF "llama" vocabulary.

    llama.cpp copied each piece's text, score and type out of the original
    model; GGUF token types use sentencepiece's numbering (1 normal, 2 unknown,
    3 control, 4 user-defined, 5 unused, 6 byte), so they go back unchanged.
    Field numbers are those of sentencepiece_model.proto.
    """
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    pieces = b"".join(
        _proto_field(1, _proto_field(1, t) + _proto_field(2, float(s)) + _proto_field(3, k))
        for t, s, k in zip(tokens, scores, types)
    )
    special = ((40, "unknown"), (41, "bos"), (42, "eos"), (43, "padding"))  # unk_id, bos_id, eos_id, pad_id
    ids = {field: meta.get(f"tokenizer.ggml.{key}_token_id", -1) for field, key in special}
    trainer = _proto_field(3, 2) + _proto_field(4, len(tokens))  # model_type = BPE, vocab_size
    trainer += _proto_field(35, 6 in types)  # byte_fallback
    trainer += b"".join(_proto_field(f, int(v)) for f, v in ids.items())
    normalizer = _proto_field(1, "identity")
    charsmap = meta.get("tokenizer.ggml.precompiled_charsmap")
    if charsmap:
        normalizer = _proto_field(1, "custom") + _proto_field(2, bytes(int(b) & 0xFF for b in charsmap))
    normalizer += _proto_field(3, bool(meta.get("tokenizer.ggml.add_space_prefix", True)))
    normalizer += _proto_field(4, False) + _proto_field(5, True)  # remove_extra_whitespaces, escape_whitespaces
    return pieces + _proto_field(2, trainer) + _proto_field(3, normalizer)
