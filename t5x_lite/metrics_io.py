"""Metric sinks: MODEL_DIR/metrics.jsonl (one JSON object per logged step) and TensorBoard
event files, the console line and the parameter table a run prints, and the averaging and
throughput of the per-step metrics between two log lines (LogPeriod)."""
import json
import math
import os
import time
from typing import Any

import jax
import numpy as np

from t5x_lite import optimizers
from t5x_lite import partitioning


class MetricsWriter:
    """Appends rows to metrics.jsonl and writes the same scalars to TensorBoard.

    Only process 0 writes, so multi-host runs produce one file.
    """

    def __init__(self, directory: str):
        self._active = jax.process_index() == 0
        if not self._active:
            return
        import tensorflow as tf  # TensorBoard's writer; imported lazily as it is heavy.
        os.makedirs(directory, exist_ok=True)
        self._path = os.path.join(directory, "metrics.jsonl")
        self._summary_writers = {
            split: tf.summary.create_file_writer(os.path.join(directory, "tensorboard", split))
            for split in ("train", "validation")}
        self._tf = tf

    def write(self, step: int, metrics: dict[str, Any], split: str) -> None:
        """Scalars as numbers; a vector metric (an MoE layer's per-expert fractions) as a list
        in metrics.jsonl and one TensorBoard scalar per entry (`name/007`)."""
        if not self._active:
            return
        values = {name: np.asarray(value, np.float64) for name, value in metrics.items()}
        row = {"step": int(step), "split": split,
               **{name: value.tolist() for name, value in values.items()}}
        with open(self._path, "a") as f:
            f.write(json.dumps(row) + "\n")
        with self._summary_writers[split].as_default():
            for name, value in values.items():
                for tag, scalar in _scalars(name, value):
                    self._tf.summary.scalar(tag, scalar, step=int(step))
        self._summary_writers[split].flush()


def _scalars(name: str, value: np.ndarray) -> list[tuple[str, float]]:
    if value.ndim == 0:
        return [(name, float(value))]
    digits = len(str(value.size - 1))
    return [(f"{name}/{index:0{digits}d}", float(entry))
            for index, entry in enumerate(value.ravel())]


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def format_train_line(step: int, total_steps: int, metrics: dict[str, float],
                      seconds_left: float) -> str:
    # A period holding only the compiling first step has no throughput.
    throughput = (f"{metrics['tokens_per_second']:,.0f}" if "tokens_per_second" in metrics
                  else "-")
    tflops = (f"{metrics['model_tflops_per_device']:.3g}" if "model_tflops_per_device" in metrics
              else "-")
    mfu = f"{metrics['mfu']:.1%}" if "mfu" in metrics else "-"
    return (f"step {step:>6d}/{total_steps}  loss {metrics['loss']:.4f}  "
            f"acc {metrics['accuracy']:.4f}  lr {metrics['learning_rate']:.2e}  "
            f"tok/s {throughput}  TFLOP/s/device {tflops}  mfu {mfu}  "
            f"left {format_duration(seconds_left)}")


MOE_PREFIX = "moe/"
MOST_EXPERTS_LISTED = 16  # Beyond this many, a log line gives the least and most loaded.


def format_task_metrics(values: dict[str, float]) -> str:
    """"bleu 12.34  rouge1 40.10 ..." for task metrics (percentages)."""
    return "  ".join(f"{name} {value:.2f}" for name, value in values.items())


def format_moe_lines(metrics: dict[str, Any]) -> list[str]:
    """One line per sparse MLP layer from `moe/<layer>/<name>` metrics: load-balancing and
    router z-losses, the share of choices dropped for capacity, and the share of tokens each
    expert received (shown as multiples of the even share 1/E when there are many)."""
    layers = sorted({name.split("/")[1] for name in metrics if name.startswith(MOE_PREFIX)},
                    key=lambda layer: (not layer.startswith("encoder"), len(layer), layer))
    lines = []
    for layer in layers:
        def value(name, layer=layer):
            return metrics[f"{MOE_PREFIX}{layer}/{name}"]
        fractions = np.asarray(value("expert_fraction"))
        if fractions.size <= MOST_EXPERTS_LISTED:
            load = "experts " + " ".join(f"{f:.2f}" for f in fractions)
        else:
            load = (f"expert load min {fractions.min() * fractions.size:.2f}x "
                    f"max {fractions.max() * fractions.size:.2f}x of even")
        lines.append(f"    {layer:<16}  balance {value('load_balancing_loss'):.3f}  "
                     f"router z {value('router_z_loss'):.3f}  "
                     f"dropped {value('dropped_fraction'):.1%}  {load}")
    return lines


def _spec_text(spec) -> str:
    return "(" + ", ".join("-" if axis is None else
                           "+".join(axis) if isinstance(axis, tuple) else str(axis)
                           for axis in spec) + ")"


def parameter_table(params: Any, logical_axes: Any = None) -> str:
    """One row per parameter: path, shape, count and, when `params` are ShapeDtypeStructs
    carrying shardings and `logical_axes` (PartitionSpecs of names) are given, its logical
    axes and the mesh axes they map to ("-": not split). Then the total."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    logical = ([None] * len(leaves) if logical_axes is None else jax.tree_util.tree_leaves(
        logical_axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
    rows = []
    for (path, leaf), names in zip(leaves, logical):
        sharding = getattr(leaf, "sharding", None)
        rows.append((optimizers.parameter_path(path),
                     "x".join(str(d) for d in leaf.shape), int(np.prod(leaf.shape)),
                     "" if names is None else _spec_text(names),
                     "" if sharding is None else _spec_text(sharding.spec)))
    width = max(len(row[0]) for row in rows)
    axes_width = max(len(row[3]) for row in rows)
    lines = [f"{'parameter':<{width}}  {'shape':>16}  {'count':>14}  "
             f"{'logical axes':<{axes_width}}  mesh axes".rstrip()]
    lines += [f"{name:<{width}}  {shape:>16}  {count:>14,d}  {names:<{axes_width}}  {mesh}"
              .rstrip() for name, shape, count, names, mesh in rows]
    lines.append(f"{'total':<{width}}  {'':>16}  {sum(row[2] for row in rows):>14,d}")
    return "\n".join(lines)


def state_bytes_line(sharded_state: Any) -> str:
    """Bytes of parameters and optimizer state held by one device, from a TrainState of
    ShapeDtypeStructs that carry their shardings."""
    mib = 2**20
    params = partitioning.per_device_bytes(sharded_state.params) / mib
    optimizer = partitioning.per_device_bytes(sharded_state.opt_state) / mib
    return (f"Per device: parameters {params:,.1f} MiB + optimizer state {optimizer:,.1f} MiB "
            f"= {params + optimizer:,.1f} MiB")


# Per-step metrics that a logged row adds up (the rest it averages).
SUMMED_METRICS = ("skipped_steps",)


def average_metrics(rows: list[dict[str, np.ndarray]]) -> dict:
    """The mean of each metric over the rows (floats, or arrays for per-expert metrics); the
    sum of SUMMED_METRICS. Skipped steps (non-finite, no update) count only as skipped."""
    counted = [row for row in rows if not row.get("skipped_steps", 0)] or rows
    means = {name: np.mean([row[name] for row in counted], axis=0) for name in rows[0]}
    for name in SUMMED_METRICS:
        if name in means:
            means[name] = np.sum([row[name] for row in rows])
    means.pop("consecutive_skips", None)
    return {name: float(value) if np.ndim(value) == 0 else value
            for name, value in means.items()}


class LogPeriod:
    """The per-step metrics since the last log line and the wall-clock time they took (less
    pauses for evaluation and checkpoints), of which `data_wait` seconds went to waiting for
    the input pipeline with nothing left for the devices to run; the first step after a
    start, which compiles, counts in the averages but not in throughput. Throughput is
    tokens per second, model TFLOP/s per device (flops.py's `model_flops_per_step` over
    `devices`) and MFU against the devices' summed bf16 peak `peak_flops` (None: unknown,
    as on CPUs)."""

    def __init__(self, start_step: int, tokens_per_step: int, model_flops_per_step: float = 0.0,
                 devices: int = 1, peak_flops: float | None = None):
        self.start_step, self.tokens_per_step = start_step, tokens_per_step
        self.model_flops_per_step, self.devices = model_flops_per_step, devices
        self.peak_flops = peak_flops
        self.rows: list = []
        self.period_start = self.timed_from = time.perf_counter()
        self.paused, self.data_wait, self.timed_steps = 0.0, 0.0, 0

    def add(self, step: int, metrics: dict) -> None:
        """Records a step's metrics (device arrays; the first step waits for them)."""
        self.rows.append(metrics)
        if step == self.start_step + 1:
            jax.block_until_ready(metrics)
            self.period_start = self.timed_from = time.perf_counter()
            self.data_wait = 0.0
        else:
            self.timed_steps += 1

    def add_data_wait(self, seconds: float, last_step_outputs) -> None:
        """Counts `seconds` spent waiting for a batch, unless the last step dispatched (its
        device arrays `last_step_outputs`; None before the first) was still running when
        the batch came. Steps run asynchronously, so then the devices had work queued the
        whole time and the wait cost nothing."""
        if last_step_outputs is None or all(
                leaf.is_ready() for leaf in jax.tree_util.tree_leaves(last_step_outputs)):
            self.data_wait += seconds

    def fetch(self) -> list[dict]:
        """The rows as NumPy values (waits for their steps to finish)."""
        self.rows = jax.device_get(self.rows)
        return self.rows

    def take_row(self, step: int, total_steps: int) -> tuple[dict, float]:
        """(averaged metrics with tokens_per_second, seconds left) and a new period."""
        row, now = average_metrics(self.fetch()), time.perf_counter()
        if self.timed_steps:
            seconds = now - self.period_start - self.paused
            row["tokens_per_second"] = self.tokens_per_step * self.timed_steps / seconds
            row["data_wait_fraction"] = self.data_wait / seconds
            model_flops_per_second = self.model_flops_per_step * self.timed_steps / seconds
            if model_flops_per_second:
                row["model_tflops_per_device"] = model_flops_per_second / self.devices / 1e12
            if model_flops_per_second and self.peak_flops:
                row["mfu"] = model_flops_per_second / self.peak_flops
        seconds_per_step = (now - self.timed_from) / max(step - self.start_step - 1, 1)
        self.rows, self.period_start, self.timed_steps = [], now, 0
        self.paused = self.data_wait = 0.0
        return row, seconds_per_step * (total_steps - step)
