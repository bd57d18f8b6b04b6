"""scripts/benchmark.py prints measurements whose derived figures follow from the measured
ones, keeps stdout to JSON with --json, and rejects bad input in one line with status 2."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from t5x_lite import flops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "benchmark.py")
sys.path.insert(0, os.path.dirname(SCRIPT))


def run_benchmark(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


def rows_in_process(capsys, *args: str) -> list[dict]:
    """The --json rows of benchmark.main(args), run in this process: no interpreter, JAX and
    TensorFlow start-up per test (the subprocess tests keep the command line covered)."""
    import benchmark

    capsys.readouterr()
    benchmark.main([*args, "--json"])
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def json_rows(result: subprocess.CompletedProcess) -> list[dict]:
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


QUICK_FIELDS = ("step_seconds", "tokens_per_second", "examples_per_second", "compile_seconds",
                "model_flops_per_step", "peak_flops", "mfu", "batch", "inputs", "targets",
                "steps")


def test_quick_run_gives_every_train_figure_and_they_follow_from_the_median_step():
    (row,) = json_rows(run_benchmark("--quick"))
    assert {key: row[key] for key in ("what", "preset", "implementation", "optimizer",
                                      "dtype", "batch", "inputs", "targets", "steps")} == {
        "what": "train", "preset": "t5_1_1_tiny", "implementation": "t5x_lite",
        "optimizer": "adafactor", "dtype": "float32", "batch": 2, "inputs": 64,
        "targets": 16, "steps": 2}
    assert all(row[key] > 0 for key in QUICK_FIELDS), row
    assert row["step_seconds"] < row["compile_seconds"]
    np.testing.assert_allclose(row["tokens_per_second"], 2 * (64 + 16) / row["step_seconds"],
                               rtol=1e-6)
    np.testing.assert_allclose(row["examples_per_second"], 2 / row["step_seconds"], rtol=1e-6)
    np.testing.assert_allclose(row["mfu"], row["model_flops_per_step"] / row["step_seconds"]
                               / row["peak_flops"], rtol=1e-6)


def test_model_flops_formula_is_within_10_percent_of_xla_cost_analysis():
    """XLA also counts the elementwise work (softmax, norms, the optimizer update), a few
    percent of the step at these shapes; the formula counts the matmuls."""
    import jax
    import benchmark

    trainer, state, _, batch = benchmark.train_setup("t5_1_1_tiny", 8, 512, 114)
    cost = jax.jit(trainer._train_step).lower(state, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    formula = flops.model_flops_per_step(benchmark.model_config_of("t5_1_1_tiny"), 8, 512, 114)
    assert formula == 3 * 8 * (512 * (2 * (2 * (4 * 128 * 128 + 3 * 128 * 512) + 4 * 512 * 128)
                                      + 2 * 4 * 128 * 128)
                               + 114 * (2 * (2 * (6 * 128 * 128 + 3 * 128 * 512)
                                             + 4 * 114 * 128 + 4 * 512 * 128)
                                        + 2 * 128 * 32128))
    assert abs(cost["flops"] / formula - 1) < 0.10, (cost["flops"], formula)


def test_compare_hf_trains_both_and_gives_the_ratio(capsys):
    rows = rows_in_process(capsys, "train", "--preset", "t5_1_1_tiny", "--batch", "2",
                           "--inputs", "16", "--targets", "8", "--steps", "2", "--warmup", "0",
                           "--peak-size", "0", "--compare-hf")
    assert [row["implementation"] for row in rows] == ["t5x_lite", "transformers"]
    assert all(row["optimizer"] == "adamw" and row["dtype"] == "float32" for row in rows)
    np.testing.assert_allclose(rows[0]["ratio_to_transformers"],
                               rows[1]["step_seconds"] / rows[0]["step_seconds"], rtol=1e-9)


def test_input_rate_is_rows_over_seconds_on_one_core():
    (row,) = json_rows(run_benchmark("input", "--tasks", "stdlib_span_corruption_bytes",
                                     "--inputs", "32", "--targets", "16", "--batch", "4",
                                     "--seconds", "2", "--cores", "1", "--json"))
    assert {key: row[key] for key in ("what", "task", "cores", "batch", "inputs", "targets")
            } == {"what": "input", "task": "stdlib_span_corruption_bytes", "cores": 1,
                  "batch": 4, "inputs": 32, "targets": 16}
    assert row["batches"] >= 1 and row["examples"] == 4 * row["batches"]
    assert row["seconds"] >= 2
    # Pinned to one core, the process cannot use more CPU time than wall time (plus ticks).
    assert 0 < row["cpu_seconds"] <= 1.05 * row["seconds"]
    np.testing.assert_allclose(row["examples_per_second"], row["examples"] / row["seconds"],
                               rtol=1e-6)


@pytest.mark.parametrize("args, expected", [
    (["input", "--tasks", "no_such_task", "--seconds", "1"], "stdlib_span_corruption"),
    (["train", "--preset", "no_such_preset"], "t5_1_1_small"),
    (["train", "--preset", "t5_1_1_tiny", "--batch", "0"], "--batch"),
    (["moe", "--preset", "t5_1_1_tiny"], "switch_tiny"),
    (["no_such_command"], "train"),
    ([], "no subcommand"),
])
def test_bad_input_is_one_error_line(args, expected):
    result = run_benchmark(*args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


EIGHT_CPU_DEVICES = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu",
                     "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def test_the_peak_matmul_runs_on_every_device_at_once():
    """peak_flops counts size^3 per device: each of the 8 devices must hold its own pair of
    matrices, or 8 CPU devices sharing the same cores would be credited 8 times over."""
    probe = ("import json, benchmark, jax.numpy as jnp\n"
             "for m in benchmark.peak_matmul_operands(jnp.float32, 16):\n"
             "    print(json.dumps(sorted([s.device.id, list(s.data.shape)]\n"
             "                            for s in m.addressable_shards)))")
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=os.path.dirname(SCRIPT), capture_output=True,
        text=True, timeout=300,
        env=EIGHT_CPU_DEVICES)
    assert result.returncode == 0, result.stderr[-2000:]
    shards = [json.loads(line) for line in result.stdout.splitlines()]
    assert shards == [[[device, [1, 16, 16]] for device in range(8)]] * 2


def test_state_bytes_shrink_with_fsdp_on_eight_devices():
    result = subprocess.run(
        [sys.executable, SCRIPT, "state", "--preset", "t5_1_1_tiny", "--json"], cwd=REPO,
        capture_output=True, text=True, timeout=300,
        env=EIGHT_CPU_DEVICES)
    rows = {row["rules"]: row for row in json_rows(result)}
    assert set(rows) == {"data", "fsdp", "fsdp_tensor"}
    assert rows["fsdp"]["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1, "expert": 1}
    # Everything but the small relative-position tables and counters is split 8 ways.
    assert 0.125 <= rows["fsdp"]["ratio_to_data"] < 0.14
    assert 0.125 <= rows["fsdp_tensor"]["ratio_to_data"] < 0.14
    for row in rows.values():
        np.testing.assert_allclose(
            row["total_mib"], (row["parameter_bytes"] + row["optimizer_bytes"]) / 2**20)


def test_remat_rows_are_ratios_to_no_remat(capsys):
    rows = rows_in_process(capsys, "remat", "--preset", "t5_1_1_tiny", "--batch", "2",
                           "--inputs", "16", "--targets", "8", "--steps", "1", "--warmup", "0",
                           "--scan")
    assert [row["remat_policy"] for row in rows] == ["none", "minimal", "full"]
    assert all(row["scan_layers"] for row in rows)
    for row in rows:
        np.testing.assert_allclose(row["time_ratio_to_none"],
                                   row["step_seconds"] / rows[0]["step_seconds"], rtol=1e-9)


def test_moe_rows_set_switch_tiny_beside_its_dense_counterpart(capsys):
    rows = rows_in_process(capsys, "moe", "--preset", "switch_tiny", "--batch", "2",
                           "--inputs", "16", "--targets", "8", "--steps", "2", "--warmup", "1")
    assert [row["preset"] for row in rows] == ["t5_1_1_tiny", "switch_tiny"]
    dense, sparse = rows
    # Top-1 over 8 experts: a token passes through the dense model's weights plus the two
    # routers (128 x 8 each); the other 7 experts of each sparse MLP sit idle.
    assert dense["parameters"] == dense["active_parameters"]
    assert sparse["active_parameters"] == dense["parameters"] + 2 * 128 * 8
    mlp = 3 * 128 * 512
    assert sparse["parameters"] == dense["parameters"] + 2 * (7 * mlp + 128 * 8)
    for row in rows:
        np.testing.assert_allclose(row["dispatch_overhead"],
                                   row["step_seconds"] / dense["step_seconds"], rtol=1e-9)


def test_decode_rows_are_tokens_over_seconds(capsys):
    rows = rows_in_process(capsys, "decode", "--preset", "t5_1_1_tiny", "--batch", "2",
                           "--inputs", "16", "--targets", "4", "--repeats", "1",
                           "--beam-size", "3", "--compare-hf")
    assert [(row["implementation"], row["method"], row.get("beam_size")) for row in rows] == [
        ("t5x_lite", "greedy", None), ("transformers", "greedy", None),
        ("t5x_lite", "beam", 3), ("transformers", "beam", 3)]
    for row in rows:
        np.testing.assert_allclose(row["tokens_per_second"], 2 * 4 / row["decode_seconds"],
                                   rtol=1e-9)
    for ours, theirs in (rows[0:2], rows[2:4]):
        np.testing.assert_allclose(ours["ratio_to_transformers"],
                                   ours["tokens_per_second"] / theirs["tokens_per_second"],
                                   rtol=1e-9)


def test_checkpoint_rows_time_the_step_that_starts_a_save(tmp_path, capsys):
    (row,) = rows_in_process(capsys, "checkpoint", "--preset", "t5_1_1_tiny", "--batch", "2",
                             "--inputs", "16", "--targets", "8", "--saves", "2",
                             "--steps-between", "2", "--dir", str(tmp_path))
    assert row["what"] == "checkpoint" and row["saves"] == 2
    assert 0 < row["step_seconds"] and 0 < row["save_step_seconds"]
    np.testing.assert_allclose(row["save_step_slowdown"],
                               row["save_step_seconds"] / row["step_seconds"] - 1, rtol=1e-9)
    assert row["below_20_percent"] == (row["save_step_slowdown"] < 0.2)
    assert row["steps_during_save"] >= 0 and row["blocking_save_seconds"] > 0
    # The arrays, uncompressed, plus metadata and the input position (its shuffle buffer of
    # documents: about 2 MiB here).
    assert row["state_mib"] < row["checkpoint_mib"] < row["state_mib"] + 8
    assert not os.listdir(tmp_path)  # The temporary directory is removed.
