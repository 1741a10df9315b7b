#!/usr/bin/env bash
# The deepspeed launcher (pip install "distfd[deepspeed]"); it appends --local_rank, which distfd accepts.
# Usage: launch/deepspeed.sh 4 --model PATH --prompt "..." --out a.png
set -euo pipefail
ngpu=${1:?number of GPUs}; shift
exec deepspeed --num_gpus "$ngpu" --module distfd generate "$@"
