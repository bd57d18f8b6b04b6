"""Metric sinks: MODEL_DIR/metrics.jsonl (one JSON object per logged step) and TensorBoard
event files, plus the console line and the parameter table a run prints."""
import json
import math
import os
from typing import Any

import jax
import numpy as np


class MetricsWriter:
    """Appends rows to metrics.jsonl and writes the same scalars to TensorBoard.

    Only process 0 writes, so multi-host runs produce one file.
    """

    def __init__(self, model_dir: str):
        self._active = jax.process_index() == 0
        if not self._active:
            return
        import tensorflow as tf  # TensorBoard's writer; imported lazily as it is heavy.
        self._path = os.path.join(model_dir, "metrics.jsonl")
        self._summary_writers = {
            split: tf.summary.create_file_writer(os.path.join(model_dir, "tensorboard", split))
            for split in ("train", "validation")}
        self._tf = tf

    def write(self, step: int, metrics: dict[str, float], split: str) -> None:
        if not self._active:
            return
        row = {"step": int(step), "split": split,
               **{name: float(value) for name, value in metrics.items()}}
        with open(self._path, "a") as f:
            f.write(json.dumps(row) + "\n")
        with self._summary_writers[split].as_default():
            for name, value in metrics.items():
                self._tf.summary.scalar(name, float(value), step=int(step))
        self._summary_writers[split].flush()


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def format_train_line(step: int, total_steps: int, metrics: dict[str, float],
                      seconds_left: float) -> str:
    return (f"step {step:>6d}/{total_steps}  loss {metrics['loss']:.4f}  "
            f"acc {metrics['accuracy']:.4f}  lr {metrics['learning_rate']:.2e}  "
            f"tok/s {metrics['tokens_per_second']:,.0f}  left {format_duration(seconds_left)}")


def parameter_table(params: Any) -> str:
    """One row per parameter (path, shape, count) and the total."""
    rows = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = "/".join(str(getattr(key, "key", key)) for key in path)
        rows.append((name, "x".join(str(d) for d in leaf.shape), int(np.prod(leaf.shape))))
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{'parameter':<{width}}  {'shape':>16}  {'count':>14}"]
    lines += [f"{name:<{width}}  {shape:>16}  {count:>14,d}" for name, shape, count in rows]
    lines.append(f"{'total':<{width}}  {'':>16}  {sum(c for _, _, c in rows):>14,d}")
    return "\n".join(lines)
