"""A T5X user's first day, through the command line as they type it: gin slips caught in one
line (exit 2, MODEL_DIR untouched), their own task module in every entry point, Ctrl-C or
SIGTERM at any moment of start-up (one line, exit 130 / 143, nothing a rerun trips on), out of
memory explained, a quiet start, config.gin with real module names, and t5x_lite.eval's rows
kept apart from training's."""
import json
import os
import resource
import signal
import subprocess
import sys
import time

import gin
import pytest

from t5x_lite import launch
from t5x_lite import models
from tests.bad_input_test import snapshot

QUICK = ["--gin_file=gin/quickstart.gin", "--gin.TRAIN_STEPS=2", "--gin.EVAL_STEPS=1",
         "--gin.NUM_INFILLINGS=1"]


def command(entry: str, *args: str, cwd, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"t5x_lite.{entry}", *args], cwd=cwd,
                          capture_output=True, text=True, preexec_fn=preexec_fn)




@pytest.fixture(scope="module")
def quickstart_dir(tmp_path_factory):
    """A working directory whose runs/quickstart trained two steps, from the command line."""
    cwd = tmp_path_factory.mktemp("first_day")
    result = command("train", *QUICK, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd


def only_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("flag,expected", [
    ("--gin.TRAIN_STEP=3000", "error: --gin.TRAIN_STEP: no gin file reads the macro "
     "TRAIN_STEP (did you mean TRAIN_STEPS?)"),
    ("--gin.MODEL_DIR=runs/quickstart", "error: --gin.MODEL_DIR=runs/quickstart: a string "
     "value needs quotes, which the shell removes unless quoted twice: pass "
     "--gin.MODEL_DIR=\"'runs/quickstart'\""),
    ("--gin.t5x_lite.run_config.LoopConfig.nan_polcy='skip'", "error: --gin.t5x_lite.run_config."
     "LoopConfig.nan_polcy='skip': t5x_lite.run_config.LoopConfig has no parameter 'nan_polcy' "
     "(did you mean nan_policy?)"),
    ("--gin.models.T5Confg.dropout_rate=0.1", "error: --gin.models.T5Confg.dropout_rate=0.1: "
     "models.T5Confg: t5x_lite.models has no 'T5Confg' (did you mean T5Config?)"),
])
def test_gin_slips_are_one_line_and_leave_model_dir_alone(quickstart_dir, flag, expected):
    before = snapshot(quickstart_dir / "runs")
    result = command("train", *QUICK, "--gin.TRAIN_STEPS=4", flag, cwd=quickstart_dir)
    assert result.returncode == 2
    assert only_line(result).startswith(expected)
    assert snapshot(quickstart_dir / "runs") == before


def test_a_macro_nobody_set_names_the_flag(tmp_path):
    result = command("train", "--gin_file=gin/models/t5_1_1_tiny.gin",
                     "--gin_file=gin/runs/pretrain.gin", "--gin.TRAIN_STEPS=3", cwd=tmp_path)
    assert result.returncode == 2
    assert only_line(result) == ("error: MODEL_DIR is not set: pass "
                                 "--gin.MODEL_DIR=\"'runs/my_run'\" (or set it in a gin file)")
    assert os.listdir(tmp_path) == []


def test_fine_tuning_without_init_from_is_refused_before_model_dir_exists(tmp_path):
    result = command("train", "--gin_file=gin/models/t5_1_1_tiny.gin",
                     "--gin_file=gin/runs/finetune.gin", "--gin.MODEL_DIR='run'",
                     "--gin.TRAIN_STEPS=3", "--gin.MIXTURE_OR_TASK_NAME='stdlib_span_corruption'",
                     cwd=tmp_path)
    assert result.returncode == 2
    assert only_line(result).startswith("error: INIT_FROM is not set: fine-tuning starts from")
    assert os.listdir(tmp_path) == []


def test_run_files_in_any_order_take_the_runs_settings(quickstart_dir):
    """infer.gin before or after quickstart.gin, or alone with the model preset: the lengths
    and batch are the run's (128 / 32, 16), and the program says where they came from."""
    outputs = {}
    for name, files in (("after", ["gin/quickstart.gin", "gin/runs/infer.gin"]),
                        ("before", ["gin/runs/infer.gin", "gin/quickstart.gin"]),
                        ("preset", ["gin/runs/infer.gin", "gin/models/t5_1_1_tiny.gin"])):
        result = command("infer", *(f"--gin_file={f}" for f in files),
                         "--gin.models.T5Config.vocab_size=8192",
                         "--gin.MODEL_DIR='runs/quickstart'",
                         f"--gin.INFER_OUTPUT='{name}.jsonl'", "--gin.INFER_MAX_EXAMPLES=3",
                         cwd=quickstart_dir)
        assert result.returncode == 0, result.stderr[-3000:]
        with open(quickstart_dir / f"{name}.jsonl") as f:
            outputs[name] = [json.loads(line) for line in f]
        if name == "preset":
            assert ("Using MIXTURE_OR_TASK_NAME = 'stdlib_span_corruption', TASK_FEATURE_LENGTHS "
                    "= {'inputs': 128, 'targets': 32}, BATCH_SIZE = 16, NUM_INPUT_SHARDS = 1 from "
                    "the training run (runs/quickstart/data.json)") in result.stdout
    assert outputs["after"] == outputs["before"] == outputs["preset"]
    # 128-token inputs hold at most 7 sentinels (15% of 128 in spans of 3), not 28.
    for row in outputs["after"]:
        assert row["input"].count("<extra_id_") <= 8


def test_own_task_module_in_eval_and_infer_and_the_unknown_task_hint(quickstart_dir):
    (quickstart_dir / "first_day_tasks.py").write_text(
        "from t5x_lite.data import tasks\n"
        "tasks.register_task(name='first_day_task', source='stdlib', "
        "objective='span_corruption')\n")
    (quickstart_dir / "imports.gin").write_text("import first_day_tasks\n")
    unknown = command("eval", "--gin_file=gin/quickstart.gin",
                      "--gin.MIXTURE_OR_TASK_NAME='first_day_task'", cwd=quickstart_dir)
    assert unknown.returncode == 2
    assert "pass --module_import=my_tasks" in only_line(unknown)
    for way in (["--module_import=first_day_tasks"], ["--gin_file=imports.gin"]):
        result = command("eval", *way, "--gin_file=gin/quickstart.gin", "--gin.EVAL_STEPS=1",
                         "--gin.MIXTURE_OR_TASK_NAME='first_day_task'", "--gin.NUM_INFILLINGS=0",
                         cwd=quickstart_dir)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Checkpoint step 2: validation loss" in result.stdout
    missing = command("infer", "--module_import=no_such_tasks", "--gin_file=gin/quickstart.gin",
                      cwd=quickstart_dir)
    assert missing.returncode == 2
    assert only_line(missing).startswith("error: --module_import=no_such_tasks: no module")


def test_eval_rows_are_kept_apart_from_trainings(quickstart_dir):
    metrics = quickstart_dir / "runs/quickstart/metrics.jsonl"
    before = metrics.read_bytes()
    result = command("eval", "--gin_file=gin/quickstart.gin", "--gin.EVAL_STEPS=1",
                     "--gin.NUM_INFILLINGS=0", cwd=quickstart_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert metrics.read_bytes() == before
    rows = (quickstart_dir / "runs/quickstart/eval/metrics.jsonl").read_text().splitlines()
    assert json.loads(rows[-1])["step"] == 2 and json.loads(rows[-1])["split"] == "validation"


def test_config_gin_has_real_module_names_and_parses_back(quickstart_dir):
    path = quickstart_dir / "runs/quickstart/config.gin"
    text = path.read_text()
    assert "t5x_lite3" not in text and " as " not in text
    assert "from t5x_lite import run_config\n" in text
    assert "\nrun_config.DataConfig.batch_size = %BATCH_SIZE\n" in text
    launch.parse_gin([str(path)], [])
    try:
        config = gin.get_configurable(models.T5Config)()
        assert gin.query_parameter("BATCH_SIZE/macro.value") == 16
    finally:
        gin.clear_config()
    assert (config.vocab_size, config.num_encoder_layers) == (8192, 2)


def test_a_quiet_start(quickstart_dir):
    result = command("inspect_task", "stdlib_span_corruption", "--n", "1", cwd=quickstart_dir)
    assert result.returncode == 0
    for noise in ("oneDNN", "cudart_stub", "absl::InitializeLog", "cuInit"):
        assert noise not in result.stderr


# A stop at a time (during the imports) or after a start-up line on stdout: the parameter
# table and the mesh line come before the parameters are initialised, the data pipeline
# starts and XLA compiles the steps (about 9 s here). Wall-clock times alone drift into
# training on a faster machine, where a stop saves a checkpoint instead (preemption_test).
@pytest.mark.parametrize("signal_number,after_line,seconds", [
    (signal.SIGINT, None, 0.3), (signal.SIGINT, None, 3.0),
    (signal.SIGTERM, "parameter ", 0.0), (signal.SIGINT, "Mesh ", 2.0)])
def test_a_stop_during_start_up_is_one_line_and_a_rerun_starts(tmp_path, signal_number,
                                                                 after_line, seconds):
    process = subprocess.Popen([sys.executable, "-m", "t5x_lite.train", *QUICK], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    printed = []
    if after_line is not None:
        while not (printed and printed[-1].startswith(after_line)):
            printed.append(process.stdout.readline())
            assert printed[-1], "train ended before printing " + after_line
    time.sleep(seconds)
    process.send_signal(signal_number)
    stdout, stderr = process.communicate(timeout=120)
    assert "validation loss" not in "".join(printed) + stdout
    assert process.returncode == 128 + signal_number, stderr[-3000:]
    assert "Traceback" not in stderr
    name = signal.Signals(signal_number).name
    # tf_text's SentencePiece op logs one INFO line per pipeline, from an input thread that
    # may still be running when the stop line is printed; that copy of SentencePiece has no
    # log-level switch.
    lines = [line for line in stderr.strip().splitlines() if "LOG(INFO)" not in line]
    assert lines[-1] == (
        f"Stopped by {name}: before the first step, nothing was saved; rerun the same command "
        "to start (or resume)")
    model_dir = tmp_path / "runs/quickstart"
    assert not (model_dir / "config.gin").exists() and not (model_dir / "data.json").exists()
    rerun = command("train", *QUICK, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Finished at step 2" in rerun.stdout


def test_out_of_memory_is_one_line_and_leaves_no_config(tmp_path):
    """A real RESOURCE_EXHAUSTED: the process may use 10 GiB of address space, and a batch of
    4,096 sequences asks XLA for more in one buffer."""
    limit = 10 * 2**30

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    result = command("train", *QUICK, "--gin.BATCH_SIZE=4096", cwd=tmp_path,
                     preexec_fn=limit_memory)
    assert result.returncode == 2, result.stderr[-3000:]
    # Before it, at most tensorflow_text's SentencePiece op's own "normalizer.cc" line.
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: out of memory: a step asked for ")
    assert "this host's processes may use 10.0 GiB: lower BATCH_SIZE (4096), raise " \
        "t5x_lite.train.run.num_microbatches (1; " in line
    assert "remat_policy" in line and "gin/partitioning/fsdp.gin" in line
    files = snapshot(tmp_path / "runs/quickstart")
    assert not {"config.gin", "data.json"} & set(files)
