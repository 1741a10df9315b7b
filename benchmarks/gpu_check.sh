#!/usr/bin/env bash
# distfd on one GPU, in at most 8 minutes: compiled and CUDA-graph passes, 2 ranks on one GPU, FLUX.1's
# architecture against vanilla and FirstBlockCache, and the SD-1.5 latency benchmark with compiled methods. Every result goes into ONE archive,
# $OUT/gpu_check.tar.gz (plus a copy of its summary, $OUT/gpu_check_summary.txt), written even when a
# section fails or runs out of time.
#
# Run from the repository root on a machine with torch (CUDA) and an H100/H200-class GPU:
#     bash benchmarks/gpu_check.sh                 # OUT defaults to ./gpu-check-out
#
# diffusers on a machine with torch but no diffusers and no network: fetch the wheels on a machine
# that has a network, in the repository root (.whl/ is git-ignored there via .git/info/exclude):
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_17_x86_64 -d .whl diffusers==0.42.1 DeepCache==0.1.1 importlib_metadata==8.7.0
# carry .whl/ to the GPU machine with the working tree; this script then runs (when diffusers is missing)
#     python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# The wheels are pure Python (--platform only satisfies pip). diffusers 0.42.1 needs filelock,
# huggingface-hub>=1.32, numpy, regex, requests, safetensors>=0.8, Pillow: all in the H200 image used
# here (torch 2.11 CUDA 13, transformers 5.17, matplotlib, nvidia-ml-py), as in the 2026-11-29 run.
# importlib_metadata is pinned below 10 (10.x imports lazy-importer, absent there); on Python 3.12
# diffusers does not import it.
#
# Budget (one H200, 2026-11-29): SD-1.5 DDIM-50 latency.py (4 eager methods) 78 s, SDXL 129 s, a
# first torch.compile of SD-1.5 64 s. Sections in priority order, each with its own time limit
# (cut to what is left of GPU_CHECK_BUDGET_S, default 470 s); a failing section is logged and the
# next one runs. GPU_CHECK_DRY_RUN=1 runs the same sections on CPU with tiny sizes and the "eager"
# compile backend (checks the script itself, not the GPU).
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/gpu-check-out}
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
DRY=${GPU_CHECK_DRY_RUN:-0}
PY=${PYTHON:-python3}
START=$(date +%s)
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
SUMMARY=$WORK/summary.txt
mkdir -p "$OUT" "$WORK/results"

finish() {
  echo "total $(( $(date +%s) - START )) s" >>"$SUMMARY"
  cp "$SUMMARY" "$OUT/gpu_check_summary.txt" 2>/dev/null
  tar -czf "$OUT/gpu_check.tar.gz" -C "$WORK" . 2>/dev/null || tar -cf "$OUT/gpu_check.tar" -C "$WORK" .
}
trap finish EXIT

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# section NAME LIMIT_S COMMAND...: runs COMMAND with its output in NAME.log, within min(LIMIT, time left).
section() {
  local name=$1 limit=$2 avail t0 rc
  shift 2
  avail=$(( $(left) - 15 ))
  (( limit > avail )) && limit=$avail
  if (( limit < 20 )); then
    echo "$name: SKIPPED (no time left)" | tee -a "$SUMMARY"
    return 0
  fi
  echo "== $name (limit ${limit}s, $(left)s left)"
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  echo "$name: rc=$rc in $(( $(date +%s) - t0 )) s$( ((rc == 124)) && echo ' (TIMED OUT)')" | tee -a "$SUMMARY"
  tail -n 5 "$WORK/$name.log"
  return 0
}

if [[ $DRY == 1 ]]; then
  DEVICE=cpu; STEPS=10; KEYS=uniform-3; export OMP_NUM_THREADS=1
  LAT_EXTRA=(--size tiny --steps 10 --key-steps uniform-3 --threads 1 --compile-backend eager)
else
  DEVICE=cuda; STEPS=50; KEYS=sd-ddim-50
  LAT_EXTRA=(--size full)
fi

# GPU_CHECK_SECTIONS picks sections (e.g. "latency_sd15_static" for a rerun); all by default.
SECTIONS=${GPU_CHECK_SECTIONS:-compile_check ranks flux latency_sd15 latency_sd15_static latency_sd15_more}
wanted() { [[ " $SECTIONS " == *" $1 "* ]]; }

# 0. Environment.
{
  date -u +%FT%TZ; git -C "$ROOT" rev-parse HEAD 2>/dev/null; git -C "$ROOT" status --short 2>/dev/null | head -20
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
} >"$WORK/env.txt" 2>&1

# 1. diffusers from the carried wheels when it is missing.
if ! "$PY" -c "import diffusers" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >"$WORK/wheels.log" 2>&1
    export PYTHONPATH=/tmp/site:$ROOT
  else
    echo "diffusers missing and no .whl/ carried: see the header" | tee -a "$SUMMARY"
  fi
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$ROOT
"$PY" -c "import torch, diffusers, transformers; print('diffusers', diffusers.__version__, 'transformers', transformers.__version__)" \
  >>"$WORK/env.txt" 2>&1
echo "environment: $(tail -n 1 "$WORK/env.txt")" | tee -a "$SUMMARY"

# 2. Compiled distfd on the embedded model: both compile styles give the eager distfd latents, the
#    planned graphs, nothing compiled by a later call, host syncs per image (vanilla / eager / compiled).
#    aot_eager: dynamo's graphs without inductor's compile time.
#    The paper's key steps: both decoder paths (a one-step group's own rows, gathered rows), 6 graphs.
wanted compile_check && section compile_check 120 "$PY" benchmarks/compile_check.py --device "$DEVICE" --backend aot_eager \
  --steps "$STEPS" --key-steps "$KEYS" --out "$WORK/compile-check-aot_eager.json"

# 3. Two ranks on one GPU over gloo give the one-rank fp16 image (the CUDA path of the runtime).
export PY DEVICE STEPS KEYS WORK
wanted ranks && section ranks 100 bash -c 'set -o pipefail
  "$PY" benchmarks/ranks_check.py --device "$DEVICE" --steps "$STEPS" --key-steps "$KEYS" --out "$WORK/ranks-w1.pt" &&
    "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/ranks_check.py \
      --device "$DEVICE" --backend gloo --steps "$STEPS" --key-steps "$KEYS" --out "$WORK/ranks-w2-gloo.pt" &&
    "$PY" benchmarks/ranks_check.py --compare "$WORK/ranks-w1.pt" "$WORK/ranks-w2-gloo.pt" | tee "$WORK/ranks.json"'

# 3b. FLUX.1-dev's architecture (random weights, bf16, 1024x1024, 28 steps): vanilla, distfd propagate
#    and parallel (default key steps and encoder N), diffusers' FirstBlockCache. About 90 s expected
#    (a 12B-parameter model built in bf16, 24 GB; 3 calls per method); never measured yet.
if [[ $DRY == 1 ]]; then FLUX_ARGS=(--size tiny --device cpu --steps 6 --reps 1); else FLUX_ARGS=(); fi
wanted flux && section flux 180 "$PY" benchmarks/flux_check.py "${FLUX_ARGS[@]}" --out "$WORK/flux-check.json"

# 4-6. SD-1.5 512 DDIM-50 (paper key steps) against torch.compile'd vanilla (default mode, what users
#    compile). distfd compiled with CUDA graphs ("reduce-overhead") compiles one graph per pass shape by
#    default (6 here); "-dynamic" (dynamic=True) compiles 3, so it goes first to fit the budget; the
#    static default follows if time is left (else: GPU_CHECK_SECTIONS=latency_sd15_static on a rerun).
LAT=("$PY" benchmarks/latency.py --arch sd15 --scheduler ddim --reps 3 --no-projection --compile-warmup 2
  --out-dir "$WORK/results" -v "${LAT_EXTRA[@]}")
wanted latency_sd15 && section latency_sd15 280 "${LAT[@]}" \
  --methods vanilla,distfd-parallel,vanilla-compiled,distfd-parallel-compiled-cg-dynamic
wanted latency_sd15_static && section latency_sd15_static 280 "${LAT[@]}" --no-flops \
  --methods vanilla,distfd-parallel,distfd-parallel-compiled-cg
wanted latency_sd15_more && section latency_sd15_more 200 "${LAT[@]}" --no-flops \
  --methods vanilla,distfd-parallel,vanilla-compiled-cg,distfd-parallel-compiled
