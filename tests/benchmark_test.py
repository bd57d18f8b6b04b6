"""scripts/benchmark.py (the package scripts/bench/) prints measurements whose derived figures
follow from the measured ones, keeps stdout to JSON with --json, rejects bad input in one line
with status 2, and imports neither an entry point nor torch where no comparison asks for it."""
import json
import os
import subprocess
import sys
import time

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
    """The --json rows of bench.cli.main(args), run in this process: no interpreter, JAX and
    TensorFlow start-up per test (the subprocess tests keep the command line covered)."""
    from bench import cli

    capsys.readouterr()
    cli.main([*args, "--json"])
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def json_rows(result: subprocess.CompletedProcess) -> list[dict]:
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def t5_1_1_tiny_flops(batch: int, inputs: int, targets: int) -> int:
    """Matmul FLOPs of one t5_1_1_tiny train step written out from gin/models/t5_1_1_tiny.gin's
    widths (d_model 128, 4 heads x 32, gated MLP 512, 2 + 2 layers, vocabulary 32,128): 2 FLOPs
    a multiply-add, backward twice the forward."""
    d, f, v = 128, 512, 32128
    # Per encoder token and layer: q, k, v, o; the gated MLP's 3 matrices; scores and
    # weighted values over `inputs` keys. Then each decoder layer's cross-attention k, v.
    encoder_token = 2 * (2 * (4 * d * d + 3 * d * f) + 4 * inputs * d) + 2 * 4 * d * d
    # Per decoder token and layer: self q, k, v, o and cross q, o; the MLP; self-attention
    # over `targets` keys, cross-attention over `inputs`. Then the logits.
    decoder_token = (2 * (2 * (6 * d * d + 3 * d * f) + 4 * targets * d + 4 * inputs * d)
                     + 2 * d * v)
    return 3 * batch * (inputs * encoder_token + targets * decoder_token)


def test_quick_run_figures_agree_with_its_arguments_the_model_and_the_clock():
    """--quick is `train --preset t5_1_1_tiny --batch 2 --inputs 64 --targets 16 --steps 2
    --warmup 1 --peak-size 1024`: each figure is checked against those arguments, the tiny
    model's widths and the wall-clock time of the process that measured it."""
    start = time.perf_counter()
    result = run_benchmark("--quick")
    wall_seconds = time.perf_counter() - start
    (row,) = json_rows(result)
    assert {key: row[key] for key in ("what", "preset", "implementation", "optimizer",
                                      "dtype", "batch", "inputs", "targets", "steps")} == {
        "what": "train", "preset": "t5_1_1_tiny", "implementation": "t5x_lite",
        "optimizer": "adafactor", "dtype": "float32", "batch": 2, "inputs": 64,
        "targets": 16, "steps": 2}
    step = row["step_seconds"]
    # A step consumes the 2 rows of 64 + 16 token slots the command line asked for.
    np.testing.assert_allclose(row["tokens_per_second"] * step, 2 * (64 + 16), rtol=1e-9)
    np.testing.assert_allclose(row["examples_per_second"] * step, 2, rtol=1e-9)
    # The FLOPs are the model's; MFU is their rate as a share of the measured peak, which
    # no step of a real model reaches.
    assert row["model_flops_per_step"] == t5_1_1_tiny_flops(2, 64, 16)
    np.testing.assert_allclose(row["mfu"] * row["peak_flops"] * step,
                               t5_1_1_tiny_flops(2, 64, 16), rtol=1e-9)
    assert 0 < row["mfu"] < 1
    # Seconds are seconds: the compiling call, the 2 timed steps (their median is their
    # mean) and the 2 timed 1024^3 peak matmuls all ran within the process's lifetime.
    peak_matmul_seconds = 2 * 1024**3 / row["peak_flops"]
    assert 0 < step < row["compile_seconds"]
    assert row["compile_seconds"] + 2 * step + 2 * peak_matmul_seconds < wall_seconds


@pytest.mark.parametrize("preset, batch, inputs", [
    ("t5_1_1_tiny", 8, 512), ("decoder_only_tiny", 8, 512), ("encoder_only_tiny", 8, 512),
    ("longt5_tglobal_tiny", 2, 4096)])
def test_model_flops_formula_is_within_10_percent_of_xla_cost_analysis(preset, batch, inputs):
    """XLA also counts the elementwise work (softmax, norms, the optimizer update), a few
    percent of the step at these shapes; the formula counts the matmuls. The decoder-only
    model's rows hold the 512 inputs and 114 targets concatenated, the encoder-only model's
    the 512 inputs (masked-LM logits at each). At 4096 inputs LongT5's
    transient-global attention (3 x 128 local and 256 global keys a query) costs about a sixth
    of full attention's L x L products: counting those would miss by far more than 10%."""
    import jax
    from bench import presets

    trainer, state, _, batch_arrays = presets.train_setup(preset, batch, inputs, 114)
    cost = jax.jit(trainer._train_step).lower(state, batch_arrays).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    formula = flops.model_flops_per_step(presets.model_config_of(preset), batch, inputs, 114)
    if preset == "t5_1_1_tiny":
        assert formula == t5_1_1_tiny_flops(8, 512, 114)
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
    probe = ("import json, jax.numpy as jnp\n"
             "from bench import peak\n"
             "for m in peak.peak_matmul_operands(jnp.float32, 16):\n"
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


# Modules the train and state subcommands must not import: the entry points (the
# benchmark builds its trainer itself), the data pipeline's (the train step's benchmark runs
# on GPU hosts without TensorFlow or seqio), and the comparison's (torch is for --compare-hf).
NOT_IMPORTED = ("t5x_lite.train", "t5x_lite.eval", "t5x_lite.infer", "t5x_lite.precompile",
                "t5x_lite.inspect_task", "tensorflow", "seqio", "torch", "transformers")


def test_train_and_state_import_no_entry_point_data_pipeline_or_torch():
    probe = ("import json, sys\n"
             "from bench import cli\n"
             "cli.main(['state', '--preset', 't5_1_1_tiny', '--json'])\n"
             "cli.main(['train', '--preset', 't5_1_1_tiny', '--batch', '2', '--inputs', '16',\n"
             "          '--targets', '8', '--steps', '1', '--warmup', '0', '--peak-size', '0',\n"
             "          '--json'])\n"
             f"print(json.dumps([name for name in {NOT_IMPORTED!r} if name in sys.modules]))")
    # Two devices: enough for gin/partitioning/fsdp_tensor.gin's tensor axis.
    result = subprocess.run([sys.executable, "-c", probe], cwd=os.path.dirname(SCRIPT),
                            capture_output=True, text=True, timeout=300,
                            env={**EIGHT_CPU_DEVICES,
                                 "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert result.returncode == 0, result.stderr[-2000:]
    *rows, imported = result.stdout.splitlines()
    assert [json.loads(row)["what"] for row in rows] == ["state"] * 3 + ["train"]
    assert json.loads(imported) == []


def test_remat_rows_are_ratios_to_no_remat(capsys):
    rows = rows_in_process(capsys, "remat", "--preset", "t5_1_1_tiny", "--batch", "2",
                           "--inputs", "16", "--targets", "8", "--steps", "1", "--warmup", "0",
                           "--scan")
    assert [row["remat_policy"] for row in rows] == ["none", "minimal", "full"]
    assert all(row["scan_layers"] for row in rows)
    for row in rows:
        np.testing.assert_allclose(row["time_ratio_to_none"],
                                   row["step_seconds"] / rows[0]["step_seconds"], rtol=1e-9)


def test_memory_rows_grow_linearly_with_local_attention(capsys):
    """The compiled train step's temporaries at 512, 1024 and 2048 input tokens under local
    attention (3 x 128 keys a query): memory linear in L plus a fixed part, so the second
    doubling adds twice what the first added (full attention's [heads, L, L] weights would
    add four times as much)."""
    rows = rows_in_process(capsys, "memory", "--preset", "longt5_local_tiny", "--inputs",
                           "2048", "512", "1024", "--targets", "16", "--attention", "local")
    assert [(row["encoder_attention"], row["inputs"]) for row in rows] == [
        ("local", 512), ("local", 1024), ("local", 2048)]
    temp = [row["temp_bytes"] for row in rows]
    for previous, row in zip(rows, rows[1:]):
        np.testing.assert_allclose(row["temp_growth"], row["temp_bytes"] / previous["temp_bytes"],
                                   rtol=1e-9)
        assert row["total_bytes"] > row["temp_bytes"]  # plus parameters and state
    assert 1.8 < (temp[2] - temp[1]) / (temp[1] - temp[0]) < 2.3


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
