"""Text out of pagedrt: incremental detokenization (byte-level BPE and
sentencepiece) and stop strings, on the real SmolLM2 tokenizer and model."""
from __future__ import annotations

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
