"""Multi-host training through `python -m t5x_lite.train`'s path (launch.main): processes of
CPU devices joined by jax.distributed on 127.0.0.1 with gloo collectives, 8 devices in all.

The input stream is NUM_INPUT_SHARDS = 4 input shards, so the global batches must not depend
on the process count. Two processes of 4 devices train; a SIGTERM to one of them during step 2
makes both save step 2 (each the positions of its own two shards) and exit 143. Copies of
that checkpoint then resume on one process of 8 devices and on four processes of 2, and finish
at step 3. The reference is one process of 8 devices trained without a stop. Every global
batch (train and validation) is digested after assembly, gathered from all processes, and
must be identical across the runs; losses agree up to float32 reduction order. All runs train
with plain SGD: the parameters then agree up to the order of float32 sums across processes
(about 2e-7 relative after 3 steps). Adafactor (and Adam) divide by the root of the second
moment, which turns that reduction-order noise on near-zero gradients into differences of
1e-3 relative after 3 steps; trainer_test bounds that for 8 devices against 1.
"""
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from t5x_lite import launch
from tests import train_test

REPO = train_test.REPO
STEPS = 3
NUM_INPUT_SHARDS = 4
TIMEOUT_S = 300

# Run in every process: prints (from process 0) a digest of every global batch a train or eval
# step receives, then runs the train entry point; process 1 sends itself SIGTERM before step
# SIGTERM_AT_STEP_ON_PROCESS_1. "save_params" restores the runs' checkpoints into .npz files.
DRIVER = textwrap.dedent("""
    import hashlib, os, signal, sys
    import gin, jax, numpy as np
    jax.config.update("jax_numpy_rank_promotion", "raise")
    from jax.experimental import multihost_utils
    from t5x_lite import launch, models, partitioning, trainer, warm_start

    def digest(batch):  # Of the global arrays, gathered from every process.
        hasher = hashlib.sha1()
        for key in sorted(batch):
            hasher.update(np.asarray(multihost_utils.process_allgather(
                batch[key], tiled=True)).tobytes())
        return hasher.hexdigest()[:16]

    def digesting(compile_step, kind):
        def compile(self):
            step = compile_step(self)

            def run(state_or_params, batch):
                label = kind
                if kind == "train":
                    label = f"train {int(state_or_params.step) + 1}"
                    if (int(state_or_params.step) + 1 == int(os.environ.get(
                            "SIGTERM_AT_STEP_ON_PROCESS_1", 0)) and jax.process_index() == 1):
                        os.kill(os.getpid(), signal.SIGTERM)  # As a preempted host gets it.
                line = f"global batch {label} {digest(batch)}"
                if jax.process_index() == 0:
                    print(line, flush=True)
                return step(state_or_params, batch)

            return run
        return compile

    def save_params(model_dir, devices, path):
        mesh_config = partitioning.MeshConfig()
        mesh = partitioning.create_mesh(mesh_config, devices)
        model_config = gin.get_configurable(models.T5Config)()
        _, step, params = warm_start.restore_model(model_config, model_dir, mesh,
                                                   mesh_config.rules)
        assert step == int(sys.argv[3]), step
        np.savez(path, **{jax.tree_util.keystr(key): np.asarray(leaf) for key, leaf
                          in jax.tree_util.tree_leaves_with_path(params)})

    mode, out_dir, flags = sys.argv[1], sys.argv[2], sys.argv[4:]
    trainer.Trainer.compile_train_step = digesting(trainer.Trainer.compile_train_step, "train")
    trainer.Trainer.compile_eval_step = digesting(trainer.Trainer.compile_eval_step, "eval")
    launch.main("t5x_lite.train.run", "multihost test", flags)
    if mode == "save_params":
        for run in ("reference", "on_1", "on_4"):
            save_params(f"{out_dir}/{run}", jax.devices(), f"{out_dir}/{run}_on_8.npz")
        save_params(f"{out_dir}/on_1", jax.devices()[:1], f"{out_dir}/on_1_on_1.npz")
""")


def train_flags(tmp_path, model_dir: str, extra: tuple[str, ...] = ()) -> list[str]:
    """The tiny model on a byte-vocabulary text task that gin registers in every process."""
    corpus = train_test.SENTENCES
    (tmp_path / "train.txt").write_text("\n".join(corpus * 50) + "\n")
    (tmp_path / "validation.txt").write_text("\n".join(corpus * 4) + "\n")
    bindings = [line for line in train_test.bindings(tmp_path / model_dir, STEPS)
                if not line.startswith(("MIXTURE_OR_TASK_NAME", "EVAL_", "CHECKPOINT_", "LOG_"))]
    bindings += ["MIXTURE_OR_TASK_NAME = @tasks.register_text_task()",
                 "tasks.register_text_task.name = 'multihost_bytes'",
                 f"tasks.register_text_task.files = ['{tmp_path / 'train.txt'}']",
                 f"tasks.register_text_task.validation_files = ['{tmp_path / 'validation.txt'}']",
                 "tasks.register_text_task.vocabulary = @vocab.byte_vocabulary()",
                 f"NUM_INPUT_SHARDS = {NUM_INPUT_SHARDS}",
                 f"CHECKPOINT_PERIOD = {STEPS}", f"EVAL_PERIOD = {STEPS}", "EVAL_STEPS = 2",
                 "LOG_PERIOD = 1", "import optax", "import t5x_lite.train",
                 "t5x_lite.train.run.optimizer = @optax.sgd", *extra]  # See the docstring.
    return ["--gin_file=models/t5_1_1_tiny.gin", "--gin_file=runs/pretrain.gin",
            *(f"--gin_bindings={line}" for line in bindings)]


def driver_command(mode: str, tmp_path, flags: list[str]) -> list[str]:
    return [sys.executable, "-c", DRIVER, mode, str(tmp_path), str(STEPS), *flags]


def environment(devices: int) -> dict[str, str]:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def failure(name: str, returncode: int, stderr: str) -> str:
    """-9: killed, on timeout or after its partner failed."""
    return f"{name} exited with {returncode}; stderr tail:\n{stderr[-3000:]}"


def run_hosts(tmp_path, model_dir: str, num_processes: int, sigterm_at_step: int = 0,
              status: int = 0, extra: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """Each process's (stdout, stderr), after they train together over 8 devices and exit
    with `status`; with `sigterm_at_step`, process 1 receives SIGTERM before that step. One
    failing stops the others, which would otherwise wait for it until the timeout."""
    address = f"127.0.0.1:{free_port()}"
    # Each process stands for a slice: the data axis spans them over the (here local) DCN.
    flags = [*train_flags(tmp_path, model_dir, extra),
             f"--gin_bindings=partitioning.MeshConfig.dcn_data = {num_processes}"]
    logs = [(tmp_path / f"{model_dir}_{i}.out", tmp_path / f"{model_dir}_{i}.err")
            for i in range(num_processes)]
    processes = []
    for index, (out, err) in enumerate(logs):
        with open(out, "w") as stdout, open(err, "w") as stderr:
            processes.append(subprocess.Popen(
                driver_command("host", tmp_path, [
                    *flags, f"--coordinator_address={address}",
                    f"--num_processes={num_processes}", f"--process_id={index}"]),
                cwd=REPO, stdout=stdout, stderr=stderr, env={
                    **environment(8 // num_processes),
                    "SIGTERM_AT_STEP_ON_PROCESS_1": str(sigterm_at_step)}))
    deadline = time.monotonic() + TIMEOUT_S
    while (time.monotonic() < deadline and any(p.poll() is None for p in processes)
           and not any(p.poll() not in (None, status) for p in processes)):
        time.sleep(0.5)
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()
    failures = [failure(f"process {index}", process.returncode, err.read_text())
                for index, (process, (_, err)) in enumerate(zip(processes, logs))
                if process.returncode != status]
    assert not failures, "\n".join(failures)
    return [(out.read_text(), err.read_text()) for out, err in logs]


def global_batches(stdout: str) -> list[tuple[str, str]]:
    """(label, digest) of every global batch, in order: ("train 2", ...), ("eval", ...)."""
    return [(" ".join(line.split()[2:-1]), line.split()[-1]) for line in stdout.splitlines()
            if line.startswith("global batch ")]


def test_global_batches_and_resumes_do_not_depend_on_the_process_count(tmp_path):
    stopped = run_hosts(tmp_path, "two_hosts", 2, sigterm_at_step=2, status=128 + 15)
    saved = tmp_path / "two_hosts" / "checkpoints" / "2"
    assert f"Stopped by a signal on another process after step 2: checkpoint saved in " \
           f"{saved}" in stopped[0][0]
    assert sorted(path.name for path in (saved / "data").iterdir() if path.is_dir()) == [
        f"shard_{i:05d}-of-{NUM_INPUT_SHARDS:05d}" for i in range(NUM_INPUT_SHARDS)]
    for run in ("on_1", "on_4"):
        shutil.copytree(tmp_path / "two_hosts", tmp_path / run)
    resumed_on_4 = run_hosts(tmp_path, "on_4", 4)[0][0]
    on_1 = subprocess.run(driver_command("host", tmp_path, train_flags(tmp_path, "on_1")),
                          cwd=REPO, env=environment(8), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert on_1.returncode == 0, failure("on_1", on_1.returncode, on_1.stderr)
    reference = subprocess.run(
        driver_command("save_params", tmp_path, train_flags(tmp_path, "reference")),
        cwd=REPO, env=environment(8), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert reference.returncode == 0, failure("reference", reference.returncode,
                                              reference.stderr)

    # Process 0 alone speaks; each run resumed the two processes' step 2.
    assert "Process 0 of 2: 4 local devices, 8 devices in all" in stopped[0][0]
    assert "Mesh {'data': 8, 'fsdp': 1, 'tensor': 1, 'expert': 1}." in stopped[0][0]
    assert "Process" not in stopped[1][0] and "step" not in stopped[1][0]
    for output in (resumed_on_4, on_1.stdout):
        assert "Resuming from checkpoint at step 2." in output
        assert f"Finished at step {STEPS}" in output

    # The same global batches at every step, whoever read them: validation at step 0 and
    # train steps 1-2 on two processes, then train step 3 and validation at step 3 on one
    # process or on four.
    expected = global_batches(reference.stdout)
    assert [label for label, _ in expected] == [
        "eval", "eval", "train 1", "train 2", "train 3", "eval", "eval"]
    assert global_batches(stopped[0][0]) == expected[:4]
    assert global_batches(resumed_on_4) == global_batches(on_1.stdout) == expected[4:]

    # One metrics row per logged step (a second writer would double them; step 1, which
    # compiles, has no throughput), and the same losses.
    one_host = train_test.metric_rows(tmp_path / "reference", "train")
    for run in ("on_1", "on_4"):
        rows = train_test.metric_rows(tmp_path / run, "train")
        assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
        assert "tokens_per_second" not in rows[0] and "tokens_per_second" in rows[1]
        np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in one_host],
                                   rtol=1e-5)
        np.testing.assert_allclose(
            [r["loss"] for r in train_test.metric_rows(tmp_path / run, "validation")],
            [r["loss"] for r in train_test.metric_rows(tmp_path / "reference", "validation")],
            rtol=1e-5)

    # The resumed runs' checkpoints restore the same on 8 devices and on 1, and hold the
    # uninterrupted run's parameters up to float32 reduction order.
    expected_params = np.load(tmp_path / "reference_on_8.npz")
    runs = {name: np.load(tmp_path / f"{name}.npz") for name in ("on_1_on_8", "on_1_on_1",
                                                                  "on_4_on_8")}
    for name in expected_params.files:
        np.testing.assert_array_equal(runs["on_1_on_8"][name], runs["on_1_on_1"][name])
        scale = np.max(np.abs(expected_params[name]))
        for run in ("on_1_on_8", "on_4_on_8"):
            np.testing.assert_array_less(np.max(np.abs(runs[run][name] - expected_params[name])),
                                         1e-5 * scale + 1e-30, err_msg=f"{run} {name}")


def test_a_process_count_that_does_not_divide_the_input_shards_names_the_ones_that_do(
        tmp_path):
    outputs = run_hosts(tmp_path, "two_hosts", 2, status=2, extra=("NUM_INPUT_SHARDS = 1",))
    for _, stderr in outputs:
        lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert lines == [
            "error: NUM_INPUT_SHARDS = 1 does not divide over the 2 processes that "
            "hold distinct rows of each batch: run on a process count that divides it (1), or "
            "bind NUM_INPUT_SHARDS to a multiple of 2 (another input stream: a run with "
            "checkpoints then resumes only with RESUME_WITHOUT_INPUT_POSITION = True)"], stderr
    assert not (tmp_path / "two_hosts").exists() or not os.listdir(tmp_path / "two_hosts")


@pytest.mark.parametrize("flags, expected", [
    (["--num_processes=2"], "--coordinator_address is missing"),
    (["--coordinator_address=10.0.0.2:8476", "--num_processes=2"], "--process_id is missing"),
    (["--coordinator_address=10.0.0.2", "--num_processes=2", "--process_id=0"],
     "is not HOST:PORT"),
    (["--coordinator_address=h:1", "--num_processes=2", "--process_id=2"],
     "--process_id must be in [0, 2)"),
    (["--coordinator_address=h:1", "--num_processes=two", "--process_id=0"],
     "--num_processes='two' is not an integer"),
])
def test_bad_multihost_flags_name_the_fix(flags, expected):
    with pytest.raises(launch.UsageError, match=re.escape(expected)):
        launch.parse_flags(["--gin_file=quickstart.gin", *flags], "test")


def test_multihost_flags_are_initialize_arguments():
    args = launch.parse_flags(["--gin_file=quickstart.gin", "--coordinator_address=[::1]:8476",
                               "--num_processes=4", "--process_id=3"], "test")
    assert args.distributed == {"coordinator_address": "[::1]:8476", "num_processes": 4,
                                "process_id": 3}
    assert launch.parse_flags(["--gin_file=quickstart.gin"], "test").distributed is None


def test_cluster_detection_reads_slurm_and_tpu_variables(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
        monkeypatch.delenv(name, raising=False)
    assert launch.detected_cluster() is None  # This machine: no cluster, no TPU.
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert launch.detected_cluster() is None  # One task: a single process.
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert launch.detected_cluster() == "SLURM"
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.2,10.0.0.3")
    assert launch.detected_cluster() == "TPU pod"


def test_bad_multihost_flag_is_one_line_from_the_command(tmp_path):
    line = train_test.error_line(train_test.run_train_command(
        *train_test.QUICK, f"--gin.MODEL_DIR='{tmp_path}'", "--num_processes=2",
        "--process_id=0"))
    assert line.startswith("error: --coordinator_address is missing")


@pytest.mark.parametrize("script, env, expected", [
    ("launch_slurm.sh", {}, "SLURM_JOB_ID is not set"),
    ("launch_tpu.sh", {"ZONE": "us-central2-b"}, "TPU_NAME not set"),
])
def test_launch_scripts_parse_and_name_missing_variables(script, env, expected):
    path = os.path.join(REPO, "scripts", script)
    subprocess.run(["bash", "-n", path], check=True, timeout=30)
    clean = {k: v for k, v in os.environ.items()
             if k not in ("SLURM_JOB_ID", "TPU_NAME", "ZONE")}
    result = subprocess.run(["bash", path, "--gin_file=gin/quickstart.gin"], env={**clean, **env},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and expected in result.stderr, result.stderr
