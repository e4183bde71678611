"""transformers' KV cache argument, by the name the installed version takes.

`cache` in transformers 5.x, `past_key_values` before (deprecated since):
the references that decode with transformers' own cache (tools/bench.py's
latency, tools/hf_bf16_divergence.py, tests/test_smollm2.py) pass it in and
read it back under this name."""
from __future__ import annotations

import inspect


def cache_arg(model) -> str:
    """The keyword of `model.forward` that takes (and the output field that gives) the KV cache."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
