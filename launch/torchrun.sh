#!/usr/bin/env bash
# One node, N GPUs (or N CPU processes with gloo): every rank loads the pipeline, rank 0 writes the PNG.
# Usage: launch/torchrun.sh 4 --model runwayml/stable-diffusion-v1-5 --prompt "a red fox" --steps 50 --out fox.png
# A batch: launch/torchrun.sh 4 --model PATH --prompts-file prompts.txt --out-dir images [--ranks-per-image 1]
set -euo pipefail
nproc=${1:?number of processes}; shift
exec torchrun --standalone --nproc-per-node "$nproc" -m distfd generate "$@"
