"""The benchmark workloads (the project's PERFORMANCE.md list), defined once with
fixed seeds. Each function returns prompt token ids and output lengths; no
engine code here. SIZES holds the request counts and lengths per preset:

    tiny   the CI mode (tools/bench.py --tiny): a tiny random model, seconds
    cpu    SmolLM2-135M on 2 cores: the whole default run with peers in ~10 min
    paper  the sizes PERFORMANCE.md states (a GPU's worth of work)

    1 latency   batch 1, one prompt, `new` tokens, greedy, eos ignored
    2 batched   `count` prompts of lo..hi random token ids, `new` each, all at once
    3 mixed     `count` requests, input and output lengths log-normal (long
                tails, ShareGPT-like), random token ids, all at once
    4 sharing   `prompts` prompts of `prompt_len` tokens: n = 1, n = 4, beam 4
    5 prefix    `requests` requests = one `prefix_len` system prompt + their own
                `suffix_len` tokens, `new` each, prefix cache on and off
    6 waste     1 - token slots in use / slots allocated, at the peak of 3
"""
from __future__ import annotations

import copy

import numpy as np

NAMES = ("latency", "batched", "mixed", "sharing", "prefix", "waste")

SIZES = {
    "tiny": dict(latency=dict(prompt_len=32, new=16),
                 batched=dict(count=4, lo=64, hi=200, new=8),
                 mixed=dict(count=8, in_median=40, in_max=200, out_median=8, out_max=48),
                 sharing=dict(prompts=2, prompt_len=64, new=8),
                 prefix=dict(requests=4, prefix_len=128, suffix_len=8, new=4)),
    "cpu": dict(latency=dict(prompt_len=32, new=128),          # as issue 8 states it
                batched=dict(count=32, lo=64, hi=200, new=128),
                mixed=dict(count=32, in_median=200, in_max=1500, out_median=48, out_max=400),
                sharing=dict(prompts=8, prompt_len=512, new=32),
                prefix=dict(requests=8, prefix_len=1024, suffix_len=32, new=16)),
    "paper": dict(latency=dict(prompt_len=128, new=128),
                  batched=dict(count=256, lo=512, hi=512, new=128),
                  mixed=dict(count=1000, in_median=200, in_max=2000, out_median=200, out_max=2000),
                  sharing=dict(prompts=64, prompt_len=512, new=128),
                  prefix=dict(requests=200, prefix_len=1024, suffix_len=32, new=32)),
}

TEXT = ("The history of the printing press begins in the fifteenth century, when movable type "
        "changed how books were made, copied and sold across Europe. ")


def sizes(preset: str, overrides=()) -> dict:
    """SIZES[preset] with "workload.key=int" overrides applied."""
    out = copy.deepcopy(SIZES[preset])
    for item in overrides:
        key, _, value = item.partition("=")
        wl, _, field = key.partition(".")
        if wl not in out or field not in out[wl]:
            raise SystemExit(f"--set {item}: no such size (have {', '.join(f'{w}.{k}' for w in out for k in out[w])})")
        out[wl][field] = int(value)
    return out


def text_prompt(tokenizer, n: int, vocab: int = 0) -> list[int]:
    """n token ids of natural text (the same for every engine); random ids (seeded)
    for a model without a tokenizer (tokenizer None: the GPU's random 8B checkpoint)."""
    if tokenizer is None:
        return np.random.default_rng(n).integers(100, vocab, size=n).tolist()
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(TEXT, add_special_tokens=False)
    return ids[:n]


def latency(tokenizer, prompt_len=32, new=128, vocab=0):
    """Workload 1: batch 1, one prompt, `new` tokens, greedy, eos ignored."""
    return [text_prompt(tokenizer, prompt_len, vocab)], [new]


def batched(tokenizer, count=32, lo=64, hi=200, new=128, seed=0, vocab=0):
    """Workload 2: `count` prompts of lo..hi random token ids, `new` each, submitted at once.

    Random ids, not windows of a text: TEXT is one sentence repeated, so windows
    whose starts differ by its length are the same tokens, and pagedrt's prefix
    cache would skip prefill work that the peers (no cross-request sharing in
    their batch APIs) do. `tokenizer` is unused (kept for a uniform signature)."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(lo, hi + 1, size=count)
    return [rng.integers(100, vocab, size=int(n)).tolist() for n in lens], [new] * count


def lognormal(rng, median, lo, hi, n, sigma=1.0):
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), lo, hi).astype(int)


def mixed(vocab, count=1000, in_median=200, in_max=2000, out_median=200, out_max=2000, seed=0):
    """Workload 3 (and 6): long-tailed lengths (log-normal, sigma 1), random token ids."""
    rng = np.random.default_rng(seed)
    ins = lognormal(rng, in_median, 4, in_max, count)
    outs = lognormal(rng, out_median, 1, out_max, count)
    return [rng.integers(100, vocab, size=int(n)).tolist() for n in ins], [int(n) for n in outs]


def sharing(vocab, prompts=64, prompt_len=512, new=128, seed=0):
    """Workload 4: `prompts` random prompts of `prompt_len` tokens, `new` tokens per sequence."""
    rng = np.random.default_rng(seed)
    return [rng.integers(100, vocab, size=prompt_len).tolist() for _ in range(prompts)], [new] * prompts


def prefix(vocab, requests=200, prefix_len=1024, suffix_len=32, new=32, seed=1):
    """Workload 5: one shared system prompt + a distinct suffix per request."""
    rng = np.random.default_rng(seed)
    system = rng.integers(100, vocab, size=prefix_len).tolist()
    return [system + rng.integers(100, vocab, size=suffix_len).tolist() for _ in range(requests)], [new] * requests


def build(name: str, size: dict, tokenizer, vocab: int):
    """(prompts, max new tokens) of workload `name` ("waste" is the mixed workload's)."""
    s = size["mixed" if name == "waste" else name]
    if name == "latency":
        return latency(tokenizer, **s, vocab=vocab)
    if name == "batched":
        return batched(tokenizer, **s, vocab=vocab)
    if name in ("mixed", "waste"):
        return mixed(vocab, **s)
    return (sharing if name == "sharing" else prefix)(vocab, **s)


# Speculative decoding (issue 23): chat prompts whose answers copy much of the
# prompt (prompt lookup proposes from it), and open-ended ones (it cannot).
_PARAGRAPH = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
              "combined movable metal type, oil-based ink and a wooden screw press. Books that had taken a "
              "scribe months to copy could now be printed by the hundred in weeks, and prices fell so far "
              "that merchants, students and craftsmen could own them.")
_RECORD = ("Order 4471 was placed on 12 March 2024 by Maria Lindqvist, Storgatan 14, 411 38 Gothenburg, "
           "Sweden, for two blue ceramic teapots at 349 SEK each and one bamboo tray at 129 SEK, paid by card, "
           "to be delivered by PostNord within five working days.")
_CODE = ("def moving_average(values, window):\n"
         "    result = []\n"
         "    for i in range(len(values) - window + 1):\n"
         "        total = 0\n"
         "        for j in range(i, i + window):\n"
         "            total = total + values[j]\n"
         "        result.append(total / window)\n"
         "    return result\n")
SPECULATIVE_PROMPTS = {
    "rewrite": [
        "Repeat the following paragraph exactly, word for word:\n\n" + _PARAGRAPH,
        "Rewrite this paragraph in the same words, but with every sentence on its own line:\n\n" + _PARAGRAPH,
    ],
    "extract": [
        "From the text below, list the customer's name, street address, city and the items ordered, "
        "copying the words from the text.\n\n" + _RECORD,
        "Copy the sentence below and then write the order number and the date on separate lines.\n\n" + _RECORD,
    ],
    "edit_code": [
        "Rename the function below to rolling_mean and return it otherwise unchanged:\n\n" + _CODE,
        "Add a docstring to this function and return the whole function:\n\n" + _CODE,
    ],
    "open_ended": [
        "Write a short poem about the sea at night.",
        "Give three ideas for a weekend trip with children.",
    ],
}


# A second set of the same four kinds, three prompts each, never used to
# choose a setting: a default chosen on SPECULATIVE_PROMPTS is checked here
# (`bench_speculative.py --prompts other`).
_PARAGRAPH_2 = ("Photosynthesis takes place mainly in the leaves of green plants. Chlorophyll in the chloroplasts "
                "absorbs light, and the plant uses that energy to turn carbon dioxide from the air and water from "
                "the soil into glucose, releasing oxygen as a by-product. The glucose feeds the plant's growth or "
                "is stored as starch.")
_RECORD_2 = ("Invoice 2093, dated 3 June 2025, from Brightline Office Supply, 88 Harbour Road, Leeds LS2 7QT, to "
             "Kestrel Design Ltd: 10 packs of A4 paper at 4.50 GBP, 3 black toner cartridges at 39.99 GBP, "
             "payment due within 30 days by bank transfer.")
_CODE_2 = ("def count_words(text):\n"
           "    counts = {}\n"
           "    for word in text.split():\n"
           "        word = word.lower()\n"
           "        if word in counts:\n"
           "            counts[word] = counts[word] + 1\n"
           "        else:\n"
           "            counts[word] = 1\n"
           "    return counts\n")
_CODE_3 = ("class Stack:\n"
           "    def __init__(self):\n"
           "        self.items = []\n"
           "\n"
           "    def push(self, item):\n"
           "        self.items.append(item)\n"
           "\n"
           "    def pop(self):\n"
           "        return self.items.pop()\n")
SPECULATIVE_PROMPTS_OTHER = {
    "rewrite": [
        "Copy this paragraph exactly:\n\n" + _PARAGRAPH_2,
        "Fix any spelling mistakes in this text and return it:\n\n" + _PARAGRAPH_2.replace("absorbs", "absorbes"),
        "Put each sentence of this paragraph on a new line:\n\n" + _PARAGRAPH_2,
    ],
    "extract": [
        "List the seller, the buyer and each item with its price, using the words of the text.\n\n" + _RECORD_2,
        "Copy the invoice below, then give its number and date.\n\n" + _RECORD_2,
        "Which address appears in this text? Quote it.\n\n" + _RECORD_2,
    ],
    "edit_code": [
        "Rename the variable counts to freq in this function and return the function:\n\n" + _CODE_2,
        "Add a method peek to this class that returns the last item without removing it. "
        "Return the whole class.\n\n" + _CODE_3,
        "Add comments to this code:\n\n" + _CODE_2,
    ],
    "open_ended": [
        "What are the benefits of regular exercise?",
        "Tell me a short story about a lost dog.",
        "Explain how a rainbow forms.",
    ],
}


# Structured output with speculation: JSON answers under a schema, whose
# values the first two workloads copy from the prompt (`bench_speculative.py
# --prompts json`): (prompt, schema) pairs.
_ORDER_SCHEMA = {"type": "object", "properties": {"order": {"type": "integer"}, "customer": {"type": "string"},
                                                  "street": {"type": "string"}, "city": {"type": "string"},
                                                  "items": {"type": "array", "items": {"type": "string"}}},
                 "required": ["order", "customer", "street", "city", "items"], "additionalProperties": False}
_INVOICE_SCHEMA = {"type": "object", "properties": {"invoice": {"type": "integer"}, "date": {"type": "string"},
                                                    "seller": {"type": "string"}, "buyer": {"type": "string"},
                                                    "address": {"type": "string"}},
                   "required": ["invoice", "date", "seller", "buyer", "address"], "additionalProperties": False}
_PERSON_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                                   "city": {"type": "string"}, "hobbies": {"type": "array",
                                                                                           "items": {"type": "string"}}},
                  "required": ["name", "age", "city", "hobbies"], "additionalProperties": False}
SPECULATIVE_JSON = {
    "extract_json": [
        ("Copy the order number, the customer, the street, the city and the items from this text into JSON.\n\n"
         + _RECORD, _ORDER_SCHEMA),
        ("Copy the invoice number, its date, the seller, the buyer and the seller's address from this text into "
         "JSON.\n\n" + _RECORD_2, _INVOICE_SCHEMA),
    ],
    "invent_json": [
        ("Describe a fictional person as JSON.", _PERSON_SCHEMA),
        ("Invent a customer order as JSON.", _ORDER_SCHEMA),
    ],
}


def speculative_prompts(rt, prompts: dict[str, list[str]] = SPECULATIVE_PROMPTS) -> dict[str, list[list[int]]]:
    """Token ids of each prompt of `prompts` (SPECULATIVE_PROMPTS or
    SPECULATIVE_PROMPTS_OTHER) as a user chat message (the Runtime's chat
    template), by workload."""
    return {name: [rt.encode_prompt([{"role": "user", "content": p}]) for p in texts]
            for name, texts in prompts.items()}
