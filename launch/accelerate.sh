#!/usr/bin/env bash
# accelerate launch sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; distfd joins that group.
# Usage: launch/accelerate.sh 4 --model PATH --prompt "..." --out a.png   (GPUs; for CPU ranks use torchrun.sh)
set -euo pipefail
nproc=${1:?number of processes}; shift
exec accelerate launch --multi_gpu --num_processes "$nproc" --num_machines 1 --mixed_precision no --dynamo_backend no \
  -m distfd generate "$@"
