#!/usr/bin/env bash
# The deepspeed launcher (pip install "distfd[deepspeed]"). It starts each rank as
# `python -m distfd --local_rank=N generate ...`; distfd accepts that and reads LOCAL_RANK instead.
# On a machine without GPUs it starts N CPU processes (gloo).
# Usage: launch/deepspeed.sh 4 --model PATH --prompt "..." --out a.png   (MASTER_PORT picks the port)
set -euo pipefail
ngpu=${1:?number of GPUs}; shift
exec deepspeed --num_gpus "$ngpu" --master_port "${MASTER_PORT:-29500}" --module distfd generate "$@"
