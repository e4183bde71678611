"""Text out of pagedrt: incremental detokenization (byte-level BPE and
sentencepiece) and stop strings, on the real SmolLM2 tokenizer and model."""
from __future__ import annotations

import numpy as np
import pytest

import pagedrt
from pagedrt.detokenizer import IncrementalDetokenizer

SAMPLES = ["Hello, world!", "naïve café — 日本語のテキスト 😀🎉 done", "  two leading spaces",
           "tabs\tand\nnewlines\n\n", "emoji at the end 🙂", "数字 12345 and ünïcödé"]


def wait_idle(rt, seconds=5.0):
    import time
    end = time.monotonic() + seconds
    while time.monotonic() < end and (rt.stats().num_running or rt.stats().num_waiting):
        rt.poll(timeout=0.05)
    return rt.stats()


@pytest.fixture(scope="module")
def tok(smol):
    return pagedrt.Tokenizer.from_model_dir(smol)


@pytest.mark.parametrize("text", SAMPLES)
def test_deltas_never_split_characters_and_add_up(tok, text):
    prompt = tok.encode("Say:", add_special_tokens=False)
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tok, prompt)
    deltas = [d.push([t]) for t in ids]
    deltas.append(d.push([], final=True))
    assert all("\ufffd" not in x for x in deltas)
    full = tok.decode(prompt + ids)
    assert "".join(deltas) == full[len(tok.decode(prompt)):]


def test_sentencepiece_leading_spaces(tmp_path):
    from conftest import train_sentencepiece
    folder = train_sentencepiece(tmp_path / "spm")
    sp = pagedrt.Tokenizer.from_model_dir(folder)
    prompt = sp.encode("the quick")
    ids = sp.encode("brown fox jumps over a lazy dog héllo", add_special_tokens=False)
    assert sp.decode(ids) == "brown fox jumps over a lazy dog héllo"  # alone: no leading space
    d = IncrementalDetokenizer(sp, prompt)
    text = "".join(d.push([t]) for t in ids) + d.push([], final=True)
    assert text == " brown fox jumps over a lazy dog héllo"           # after the prompt: a space


def test_stop_string_spanning_two_tokens(smol):
    with pagedrt.Runtime(smol, device="cpu") as rt:
        base = rt.generate(["The capital of France is"], temperature=0, max_tokens=24)[0]
        tokens = base.token_ids
        pieces = [rt.tokenizer.decode(tokens[:i + 1]) for i in range(len(tokens))]
        # a stop string made of the end of one token and the start of the next
        i = next(i for i in range(2, len(tokens) - 1)
                 if len(pieces[i]) - len(pieces[i - 1]) >= 2 and len(pieces[i + 1]) - len(pieces[i]) >= 2)
        stop = pieces[i][-2:] + pieces[i + 1][len(pieces[i]):len(pieces[i]) + 2]
        assert rt.tokenizer.decode([tokens[i]]).find(stop) < 0  # really spans two tokens
        out = rt.generate(["The capital of France is"], temperature=0, max_tokens=24, stop=[stop])[0]
        assert out.finish_reason == "stop"
        assert out.text == base.text[:base.text.find(stop)]
        assert out.token_ids == tokens[:i + 2]          # through the token that completed it
        kept = rt.generate(["The capital of France is"], temperature=0, max_tokens=24, stop=stop,
                           include_stop_str_in_output=True)[0]
        assert kept.text == base.text[:base.text.find(stop) + len(stop)]
        # the engine ends its copy of the sequence at its next step
        assert wait_idle(rt).blocks_used == 0


def test_streamed_text_equals_the_full_decode(smol):
    with pagedrt.Runtime(smol, device="cpu") as rt:
        msgs = [{"role": "user", "content": "Write one sentence in French with accents."}]
        evs = list(rt.stream(msgs, temperature=0, max_tokens=40))
        ids = [t for e in evs for t in e.token_ids]
        assert all("\ufffd" not in e.text for e in evs)
        assert "".join(e.text for e in evs) == rt.tokenizer.decode(ids)
        assert evs[-1].request_finished and evs[-1].finish_reason in ("stop", "length")


def test_stop_strings_with_n_samples(smol):
    with pagedrt.Runtime(smol, device="cpu") as rt:
        out = rt.generate(["List colours:\n1."], n=3, temperature=1.0, seed=2, max_tokens=40, stop=["\n"])[0]
        assert len(out.outputs) == 3
        for o in out.outputs:
            assert "\n" not in o.text
            assert o.finish_reason in ("stop", "length")
        assert wait_idle(rt).blocks_used == 0


# ── the detokenizer against the tokenizer's full decode, on random streams ──

@pytest.fixture(scope="module")
def tiny_tokenizers(tmp_path_factory, tiny_sp, tok):
    """A byte-level BPE tokenizer.json (367 ids: <unk> <s> </s>, the 256 bytes,
    merges), a sentencepiece model with byte fallback (400 ids, control <s> </s>)
    and SmolLM2's tokenizer.json."""
    from conftest import train_byte_level_bpe
    bpe = train_byte_level_bpe(tmp_path_factory.mktemp("bpe"))
    return {"byte-level BPE": pagedrt.Tokenizer.from_model_dir(bpe),
            "sentencepiece": pagedrt.Tokenizer.from_model_dir(tiny_sp), "SmolLM2": tok}


def stream(tok, prompt, ids, chunks, **kw):
    """The deltas of ids pushed in chunks of the given sizes (cycled), then a final push."""
    d = IncrementalDetokenizer(tok, prompt, **kw)
    deltas, i, k = [], 0, 0
    while i < len(ids):
        n = chunks[k % len(chunks)]
        deltas.append(d.push(ids[i:i + n]))
        i, k = i + n, k + 1
    return deltas + [d.push([], final=True)], d


def random_stream(tok, rng) -> list[int]:
    """Ids of text with characters of 2 to 4 UTF-8 bytes (byte tokens and byte-
    fallback pieces for the tiny tokenizers), with special and control ids (0-2)
    and random ids put in at random places: up to ~300 ids."""
    text = " ".join(rng.choice(SAMPLES + ["é日😀", "the quick brown"], size=int(rng.integers(1, 12))))
    ids = tok.encode(text, add_special_tokens=False)
    for _ in range(int(rng.integers(0, 12))):
        ids.insert(int(rng.integers(0, len(ids) + 1)), int(rng.integers(0, 3)))
    for _ in range(int(rng.integers(0, 6))):
        ids.insert(int(rng.integers(0, len(ids) + 1)), int(rng.integers(0, tok.vocab_size)))
    return ids


@pytest.mark.parametrize("kind", ["byte-level BPE", "sentencepiece", "SmolLM2"])
@pytest.mark.parametrize("skip", [True, False])
def test_incremental_text_is_the_full_decode_for_random_streams(tiny_tokenizers, kind, skip):
    """Random streams (see random_stream), long enough for the window to move
    many times, pushed one at a time and in chunks of up to 5 (speculative
    decoding): the deltas add up to the full decode's text after the prompt's,
    and none ends in half a character unless the full text holds U+FFFD."""
    tok = tiny_tokenizers[kind]
    rng = np.random.default_rng(1)
    prompt = tok.encode("naïve café", add_special_tokens=True)
    for trial in range(60):
        ids = random_stream(tok, rng)
        chunks = [1] if trial % 3 == 0 else rng.integers(1, 6, size=7).tolist()
        deltas, _ = stream(tok, prompt, ids, chunks, skip_special_tokens=skip)
        full = tok.decode(prompt + ids, skip_special_tokens=skip)
        assert "".join(deltas) == full[len(tok.decode(prompt, skip_special_tokens=skip)):], (trial, ids, chunks)
        assert all(not x.endswith("\ufffd") for x in deltas[:-1]) or "\ufffd" in full, (trial, ids)


@pytest.mark.parametrize("kind", ["byte-level BPE", "sentencepiece", "SmolLM2"])
def test_incremental_text_of_real_text_never_splits_a_character(tiny_tokenizers, kind):
    tok = tiny_tokenizers[kind]
    text = " ".join(SAMPLES) * 3
    prompt, ids = tok.encode("Say:"), tok.encode(text, add_special_tokens=False)
    for chunks in ([1], [2, 1, 3]):
        deltas, _ = stream(tok, prompt, ids, chunks)
        assert all("\ufffd" not in x for x in deltas)
        assert "".join(deltas) == tok.decode(prompt + ids)[len(tok.decode(prompt)):]


@pytest.mark.parametrize("kind", ["byte-level BPE", "sentencepiece"])
@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_cut_the_full_decode_at_the_first_match(tiny_tokenizers, kind, include):
    """Whatever the chunks, the text is the full decode cut at the earliest stop
    string (kept with include_stop_str_in_output), nothing is shown past it, and
    a chunk stops being consumed at the token that completed it."""
    tok = tiny_tokenizers[kind]
    rng = np.random.default_rng(2)
    prompt = tok.encode("the quick")
    words = "the quick brown fox jumps over a lazy dog héllo naïve café".split()
    for trial in range(40):
        text = " " + " ".join(rng.choice(words, size=int(rng.integers(3, 30))))
        ids = tok.encode(text, add_special_tokens=False)
        out = tok.decode(prompt + ids)[len(tok.decode(prompt)):]
        stops = ["zz", str(rng.choice(words))[1:4], "ve c" if trial % 2 else "x"]
        chunks = [1] if trial % 3 == 0 else rng.integers(1, 5, size=5).tolist()
        deltas, d = stream(tok, prompt, ids, chunks, stop=stops, include_stop_str_in_output=include)
        hits = [(out.find(s), s) for s in stops if s and out.find(s) >= 0]
        if not hits:
            assert "".join(deltas) == out and not d.stopped
            continue
        i, s = min(hits)
        assert "".join(deltas) == out[:i + (len(s) if include else 0)], (trial, text, stops, chunks)
        assert d.stopped


def test_stop_string_in_a_chunk_consumes_through_its_last_token(tiny_tokenizers):
    tok = tiny_tokenizers["byte-level BPE"]
    prompt = tok.encode("go:")
    ids = tok.encode(" the quick brown fox", add_special_tokens=False)
    pieces = [tok.decode(prompt + ids[:k])[len(tok.decode(prompt)):] for k in range(len(ids) + 1)]
    k = next(k for k in range(len(ids) + 1) if "brown" in pieces[k])    # the token completing "brown"
    d = IncrementalDetokenizer(tok, prompt, stop=["brown"])
    assert d.push(ids) == pieces[k][:pieces[k].find("brown")]
    assert d.stopped and d.consumed == k
    assert d.push(ids[:1]) == "" and d.consumed == 0
