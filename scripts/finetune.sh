#!/usr/bin/env bash
# The fine-tuning demo: installs into .venv if needed, fine-tunes the quickstart checkpoint
# (runs/quickstart; pretrained first by scripts/pretrain.sh when missing) on stdlib_docstrings
# (a standard-library function -> the first line of its docstring) with gin/docstrings.gin,
# evaluates it, and prints BLEU and ROUGE on the held-out functions before and after.
# Extra arguments go to both entry points, e.g. --gin.TRAIN_STEPS=300 --gin.MODEL_DIR="'/tmp/d'".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export TF_CPP_MIN_LOG_LEVEL=3
model_dir=runs/docstrings
init_from=runs/quickstart
for arg in "$@"; do
  case "$arg" in
    --gin.MODEL_DIR=*) model_dir=$(eval echo "${arg#--gin.MODEL_DIR=}");;
    --gin.INIT_FROM=*) init_from=$(eval echo "${arg#--gin.INIT_FROM=}");;
  esac
done
if [ "$init_from" = runs/quickstart ] && [ ! -d runs/quickstart/checkpoints ]; then
  echo "No quickstart checkpoint in runs/quickstart: pretraining it first (scripts/pretrain.sh)."
  bash scripts/pretrain.sh
fi
start=$(date +%s)
.venv/bin/python -m t5x_lite.train --gin_file=gin/docstrings.gin "$@"
echo
echo "== Evaluation of the newest checkpoint =="
.venv/bin/python -m t5x_lite.eval --gin_file=gin/docstrings.gin "$@"
echo
.venv/bin/python scripts/plot_metrics.py "$model_dir" --before-after
echo "Done in $(( $(date +%s) - start )) s. Metrics: $model_dir/metrics.jsonl"
