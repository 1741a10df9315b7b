#!/usr/bin/env bash
# One node, N GPUs (or N CPU processes with gloo): every rank loads the pipeline once, rank 0 answers HTTP.
# Usage: launch/serve-torchrun.sh 4 --model stabilityai/stable-diffusion-xl-base-1.0 --port 8000
#   curl -s localhost:8000/health
#   curl -s -X POST localhost:8000/generate -d '{"prompt": "a red fox", "seed": 1}' -o fox.png
# Several requests at once: add --ranks-per-image 1 (one per GPU) or auto (by queue length).
# Stop with SIGTERM or Ctrl-C (torchrun passes it to every rank): the requests in flight finish (at most
# --grace seconds), the queued ones get 503, every rank exits 0.
set -euo pipefail
nproc=${1:?number of processes}; shift
exec torchrun --standalone --nproc-per-node "$nproc" -m distfd serve "$@"
