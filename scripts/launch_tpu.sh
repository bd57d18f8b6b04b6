#!/bin/bash
# Multi-host training on a Cloud TPU VM pod slice (e.g. v4-32): runs the same command on every
# worker over gcloud ssh; jax.distributed finds the coordinator and the worker's id from the
# TPU metadata server, so no multi-host flags are needed.
#
# Usage (from your workstation; the repository, with its .venv, must already be at REPO_DIR on
# every worker, and MODEL_DIR must be a directory all workers share, such as an NFS or
# Filestore mount, since every worker writes its part of each checkpoint):
#   TPU_NAME=my-v4-32 ZONE=us-central2-b scripts/launch_tpu.sh \
#     --gin_file=gin/models/t5_1_1_base.gin --gin_file=gin/runs/pretrain.gin \
#     --gin.MODEL_DIR="'/mnt/shared/runs/base'" \
#     --gin.MIXTURE_OR_TASK_NAME="'c4_span_corruption'" --gin.TRAIN_STEPS=100000
# Optional: REPO_DIR (default t5x_lite, relative to the home directory on the workers),
# PROJECT (default: gcloud's configured project).
# Worker 0's output is the run's log; the other workers stay quiet.
set -euo pipefail

missing=()
for name in TPU_NAME ZONE; do
  if [[ -z "${!name:-}" ]]; then missing+=("$name"); fi
done
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "error: ${missing[*]} not set: run e.g." \
    "TPU_NAME=my-v4-32 ZONE=us-central2-b $0 --gin_file=..." >&2
  exit 2
fi
if [[ $# -eq 0 ]]; then
  echo "error: no training flags: pass e.g. --gin_file=gin/quickstart.gin" >&2
  exit 2
fi
if ! command -v gcloud >/dev/null; then
  echo "error: gcloud not found: install the Google Cloud CLI" >&2
  exit 2
fi
REPO_DIR="${REPO_DIR:-t5x_lite}"
# Quote each flag for the remote shell, so gin values such as "'gs://...'" arrive intact.
flags=$(printf ' %q' "$@")
project=()
if [[ -n "${PROJECT:-}" ]]; then project=(--project "$PROJECT"); fi
exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${project[@]}" --worker=all \
  --command "cd ${REPO_DIR} && .venv/bin/python -m t5x_lite.train${flags}"
