#!/usr/bin/env bash
# accelerate launch sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; distfd joins that group (NCCL on GPUs,
# gloo on CPU: the same command runs N CPU processes on a machine without GPUs).
# Usage: launch/accelerate.sh 4 --model PATH --prompt "..." --out a.png   (MASTER_PORT picks the port)
set -euo pipefail
nproc=${1:?number of processes}; shift
exec accelerate launch --multi_gpu --num_processes "$nproc" --num_machines 1 --mixed_precision no \
  --dynamo_backend no --main_process_port "${MASTER_PORT:-29500}" -m distfd generate "$@"
