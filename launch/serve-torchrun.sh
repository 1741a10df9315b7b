#!/usr/bin/env bash
# One node, N GPUs (or N CPU processes with gloo): every rank loads the pipeline once, rank 0 answers HTTP.
# Usage: launch/serve-torchrun.sh 4 --model stabilityai/stable-diffusion-xl-base-1.0 --port 8000
#   curl -s localhost:8000/health
#   curl -s -X POST localhost:8000/generate -d '{"prompt": "a red fox", "seed": 1}' -o fox.png
# Stop with SIGTERM or Ctrl-C (torchrun passes it to every rank): the request in flight finishes, the
# queued ones get 503, every rank exits 0.
set -euo pipefail
nproc=${1:?number of processes}; shift
exec torchrun --standalone --nproc-per-node "$nproc" -m distfd serve "$@"
