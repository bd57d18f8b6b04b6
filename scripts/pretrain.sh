#!/usr/bin/env bash
# The quickstart: installs into .venv if needed, pretrains the tiny T5 of gin/quickstart.gin on
# the embedded corpus (the Python standard library's source), evaluates it on the validation
# split, prints a few infillings, and draws the curves to MODEL_DIR/metrics.png.
# Extra arguments go to both entry points, e.g. --gin.TRAIN_STEPS=200 --gin.MODEL_DIR="'/tmp/q'".
# Rerunning resumes from the newest checkpoint; a finished run goes straight to evaluation.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export TF_CPP_MIN_LOG_LEVEL=3
model_dir=runs/quickstart
for arg in "$@"; do
  case "$arg" in --gin.MODEL_DIR=*) model_dir=$(eval echo "${arg#--gin.MODEL_DIR=}");; esac
done
start=$(date +%s)
.venv/bin/python -m t5x_lite.train --gin_file=gin/quickstart.gin "$@"
echo
echo "== Evaluation of the newest checkpoint =="
.venv/bin/python -m t5x_lite.eval --gin_file=gin/quickstart.gin "$@"
.venv/bin/python scripts/plot_metrics.py "$model_dir"
echo "Done in $(( $(date +%s) - start )) s. Metrics: $model_dir/metrics.jsonl; TensorBoard: .venv/bin/tensorboard --logdir $model_dir/tensorboard"
