#!/usr/bin/env python3
"""How many tokens a verify step can gain on a workload's greedy answers, for
prompt-lookup proposers up to an oracle (issue 23: is a workload's speed-up
bound by its answers or by the engine?).

    spec_bound.py [--model DIR|FILE.gguf] [--prompts benchmark|other] [--k 8]
                  [--max-tokens 128] [--json OUT.json]

Decodes each prompt of tools/workloads.py's set once, greedy, on the CPU (the
answer does not depend on what is proposed), then replays it step by step:
at each step a proposer looks at the prompt and the answer so far and
proposes up to k tokens; the step takes the proposals that equal the answer's
next tokens plus one (the target's own token). Tokens per step for:

- engine: the engine's rule (engine/ngram.cpp: the most recent earlier
  occurrence of the last n tokens, n from ngram_max 4 down to ngram_min 2;
  its pauses after 8 misses in a row left out, so a bound on it);
- ngram_min 1: the same down to one token;
- every occurrence: every earlier occurrence of the longest matching n-gram
  (n 4 .. 2) proposed at once and the best one counted, as verifying a tree of
  all of them in one step would;
- oracle: every occurrence of every n from 4 down to 1, the best counted:
  the most any lookup in the prompt and answer of n-grams up to 4 can gain.

A speed-up over plain decoding is at most the tokens a step divided by a
verify step's cost in decode steps (docs/speculative.md measures ~1.1 on a
CPU with AMX).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import SPECULATIVE_PROMPTS, SPECULATIVE_PROMPTS_OTHER  # noqa: E402


def occurrences(tokens, n):
    """Starts of the earlier occurrences of the last n tokens, most recent first
    (each followed by at least one token)."""
    tail = tokens[len(tokens) - n:]
    return [i for i in range(len(tokens) - n - 1, -1, -1) if tokens[i:i + n] == tail]


def candidates(tokens, k, n_min, n_max, every_occurrence=False, every_n=False):
    """Proposals (lists of at most k tokens) after `tokens`."""
    out = []
    for n in range(min(n_max, len(tokens) - 1), n_min - 1, -1):
        starts = occurrences(tokens, n)
        if not starts:
            continue
        for i in starts if every_occurrence else starts[:1]:
            out.append(tokens[i + n:i + n + k])
        if not every_n:
            break
    return out


PROPOSERS = {
    "engine": dict(n_min=2, n_max=4),
    "ngram_min 1": dict(n_min=1, n_max=4),
    "every occurrence": dict(n_min=2, n_max=4, every_occurrence=True),
    "oracle": dict(n_min=1, n_max=4, every_occurrence=True, every_n=True),
}


def tokens_per_step(prompt, answer, k, **rule):
    """(steps, verify steps) to produce `answer` after `prompt` with `rule`; the
    first step is the prompt's (its token proposes nothing)."""
    i = steps = int(len(answer) > 0)
    verifies = 0
    while i < len(answer):
        cands = candidates(prompt + answer[:i], k, **rule)
        best = 0
        for c in cands:
            a = 0
            while a < len(c) and i + a < len(answer) and c[a] == answer[i + a]:
                a += 1
            best = max(best, a)
        steps += 1
        verifies += bool(cands)
        i += best + 1
    return steps, verifies


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompts", default="benchmark", choices=["benchmark", "other"])
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import pagedrt

    sets = SPECULATIVE_PROMPTS if args.prompts == "benchmark" else SPECULATIVE_PROMPTS_OTHER
    answers = {}
    with pagedrt.Runtime(args.model, device="cpu", progress=False) as rt:
        for kind, prompts in sets.items():
            outs = rt.generate([[{"role": "user", "content": p}] for p in prompts], max_tokens=args.max_tokens,
                               temperature=0.0)
            answers[kind] = [(list(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in outs]
    res = {"prompts": args.prompts, "k": args.k, "max_tokens": args.max_tokens, "workloads": {}}
    print(f"tokens a step on {args.prompts} prompts' greedy answers, k = {args.k}")
    print(f"{'workload':<12}{'answer tokens':>14}" + "".join(f"{name:>18}" for name in PROPOSERS))
    for kind, pairs in answers.items():
        total = sum(len(a) for _, a in pairs)
        row = {"answer_tokens": total}
        for name, rule in PROPOSERS.items():
            steps = sum(tokens_per_step(p, a, args.k, **rule)[0] for p, a in pairs)
            row[name] = total / steps
        res["workloads"][kind] = row
        print(f"{kind:<12}{total:>14}" + "".join(f"{row[name]:>18.2f}" for name in PROPOSERS), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
