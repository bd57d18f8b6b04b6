#!/bin/bash
# Multi-host training on a SLURM GPU cluster: one task per node, each driving all of its GPUs;
# jax.distributed finds the coordinator, process count and process id from SLURM's variables.
#
# Usage (arguments go to python -m t5x_lite.train; the repository and its .venv must be on a
# filesystem every node sees, and MODEL_DIR too, since all processes write the checkpoint):
#   sbatch --nodes=4 scripts/launch_slurm.sh --gin_file=gin/models/t5_1_1_base.gin \
#     --gin_file=gin/runs/pretrain.gin --gin.MODEL_DIR="'/shared/runs/base'" \
#     --gin.MIXTURE_OR_TASK_NAME="'c4_span_corruption'" --gin.TRAIN_STEPS=100000
# Inside an salloc allocation, run it with bash instead of sbatch. Process 0 prints the log.
#SBATCH --job-name=t5x_lite
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --output=%x-%j.out
set -euo pipefail

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  echo "error: SLURM_JOB_ID is not set: submit with sbatch (or run inside salloc)" >&2
  exit 2
fi
if [[ $# -eq 0 ]]; then
  echo "error: no training flags: pass e.g. --gin_file=gin/quickstart.gin" >&2
  exit 2
fi
# sbatch runs a copy of this script from the spool directory; SLURM_SUBMIT_DIR is where
# sbatch was called (the repository root, in the usage above).
REPO="${T5X_LITE_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
PYTHON="${REPO}/.venv/bin/python"
if [[ ! -x "$PYTHON" ]]; then
  echo "error: ${PYTHON} not found: submit from the repository root or set T5X_LITE_REPO" >&2
  exit 2
fi
cd "$REPO"
# One task per node (SLURM_NTASKS = nodes > 1) is what makes t5x_lite.launch call
# jax.distributed.initialize(); --kill-on-bad-exit stops the others when one process fails.
exec srun --ntasks-per-node=1 --kill-on-bad-exit=1 "$PYTHON" -m t5x_lite.train "$@"
