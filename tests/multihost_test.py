"""Multi-host training: two local processes of 4 CPU devices each, joined by jax.distributed
on 127.0.0.1 with gloo collectives, train the tiny model through `python -m t5x_lite.train`'s
path (launch.main). A SIGTERM to one of them during step 2 makes both save step 2 (each its
own input position) and exit 143; rerun, they resume there and finish at step 3.

The reference is one process of 8 devices on the same gin configuration. Reading the task in
one process gives other batches than two hosts reading disjoint halves (seqio shards the
documents before packing and shuffling), so the reference reads both halves itself (shard 0
and shard 1 of 2, each of BATCH_SIZE / 2 rows) and concatenates them in process order, which
is the global batch the two hosts assemble with make_array_from_process_local_data. Both
runs train with plain SGD: the parameters then agree up to the order of float32 sums across
processes (about 2e-7 relative after 3 steps). Adafactor (and Adam) divide by the root of the
second moment, which turns that reduction-order noise on near-zero gradients into differences
of 1e-3 relative after 3 steps; trainer_test bounds that for 8 devices against 1.
"""
import os
import re
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
TIMEOUT_S = 240

# Run in every process: records the first training batch of each shard it reads, then runs
# the train entry point. "reference" reads both shards in one process (see module docstring)
# and afterwards restores both runs' checkpoints into .npz files of parameters.
DRIVER = textwrap.dedent("""
    import hashlib, os, signal, sys
    import gin, jax, numpy as np
    jax.config.update("jax_numpy_rank_promotion", "raise")
    from t5x_lite import eval as eval_lib, launch, models, partitioning, train
    from t5x_lite.data import pipeline

    class FirstReported:  # Training batches that print a digest of their first batch.

        def __init__(self, shard_index, batches):
            self.shard_index, self.batches, self.reported = shard_index, batches, False
            self.taken = 0

        def __iter__(self):
            return self

        def __next__(self):
            batch = next(self.batches)
            self.taken += 1
            if self.taken == int(os.environ.get("SIGTERM_AT_STEP_ON_PROCESS_1", 0)) and \
                    jax.process_index() == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # As a preempted host receives it.
            if not self.reported:
                digest = hashlib.sha1(batch["encoder_input_tokens"].tobytes()).hexdigest()[:16]
                print("first train batch of shard", self.shard_index, digest, flush=True)
                self.reported = True
            return batch

        def state(self):
            return self.batches.state()

        def restore(self, state):
            self.batches.restore(state)

    def host_train_batches(self, seed):
        return FirstReported(jax.process_index(), read_own_shard(self, seed))

    def two_shard_batches(self, split, *, shuffle, seed, repeat, pack=None):
        # Evaluation batches as the two hosts' global batches: both shards' halves.
        shards = [pipeline.get_batches(
            self.mixture_or_task_name, split, dict(self.task_feature_lengths),
            self.batch_size // 2, shuffle=shuffle, seed=seed, repeat=repeat,
            pack=self.pack if pack is None else pack, shard_index=index, num_shards=2)
            for index in range(2)]
        for rows in zip(*shards):
            yield {key: np.concatenate([row[key] for row in rows]) for key in rows[0]}

    class TwoShards:  # Both hosts' shards in one process, each batch the two halves.

        def __init__(self, data, seed):
            self.shards = [FirstReported(index, pipeline.TrainBatches(pipeline.get_dataset(
                data.mixture_or_task_name, "train", dict(data.task_feature_lengths),
                data.batch_size // 2, shuffle=True, seed=seed, repeat=True, pack=data.pack,
                shard_index=index, num_shards=2))) for index in range(2)]

        def __iter__(self):
            return self

        def __next__(self):
            rows = [next(shard) for shard in self.shards]
            return {key: np.concatenate([row[key] for row in rows]) for key in rows[0]}

        def state(self):
            return self.shards[0].state()  # The reference run never resumes.

    def save_params(model_dir, devices, path):
        mesh = partitioning.create_mesh(partitioning.MeshConfig(), devices)
        model_config = gin.get_configurable(models.T5Config)()
        _, step, params = eval_lib.restore_model(model_config, model_dir, mesh)
        assert step == int(sys.argv[3]), step
        np.savez(path, **{jax.tree_util.keystr(key): np.asarray(leaf) for key, leaf
                          in jax.tree_util.tree_leaves_with_path(params)})

    mode, out_dir, flags = sys.argv[1], sys.argv[2], sys.argv[4:]
    read_own_shard = train.DataConfig.train_batches
    if mode == "host":
        train.DataConfig.train_batches = host_train_batches
    else:
        train.DataConfig.train_batches = lambda self, seed: TwoShards(self, seed)
        train.DataConfig.batches = two_shard_batches
    launch.main("t5x_lite.train.run", "multihost test", flags)
    if mode == "reference":
        save_params(f"{out_dir}/reference", jax.devices(), f"{out_dir}/reference.npz")
        save_params(f"{out_dir}/two_hosts", jax.devices(), f"{out_dir}/two_hosts_on_8.npz")
        save_params(f"{out_dir}/two_hosts", jax.devices()[:1], f"{out_dir}/two_hosts_on_1.npz")
""")


def train_flags(tmp_path, model_dir: str) -> list[str]:
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
                 f"CHECKPOINT_PERIOD = {STEPS}", f"EVAL_PERIOD = {STEPS}", "EVAL_STEPS = 1",
                 "LOG_PERIOD = 1", "import optax", "import t5x_lite.train",
                 "t5x_lite.train.run.optimizer = @optax.sgd"]  # See the module docstring.
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


def run_two_hosts(tmp_path, sigterm_at_step: int = 0, status: int = 0) -> list[str]:
    """Both processes' stdout, after they train and checkpoint together and exit with
    `status`; with `sigterm_at_step`, process 1 receives SIGTERM while taking that step's
    batch. One failing stops the other, which would otherwise wait for its partner until
    the timeout."""
    address = f"127.0.0.1:{free_port()}"
    # Each process stands for a slice: the data axis spans both over the (here local) DCN.
    flags = [*train_flags(tmp_path, "two_hosts"),
             "--gin_bindings=partitioning.MeshConfig.dcn_data = 2"]
    logs = [(tmp_path / f"process_{i}.out", tmp_path / f"process_{i}.err") for i in range(2)]
    processes = []
    for index, (out, err) in enumerate(logs):
        with open(out, "w") as stdout, open(err, "w") as stderr:
            processes.append(subprocess.Popen(
                driver_command("host", tmp_path, [
                    *flags, f"--coordinator_address={address}", "--num_processes=2",
                    f"--process_id={index}"]),
                cwd=REPO, stdout=stdout, stderr=stderr, env={
                    **environment(4), "SIGTERM_AT_STEP_ON_PROCESS_1": str(sigterm_at_step)}))
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
    return [out.read_text() for out, _ in logs]


def first_batches(stdout: str) -> dict[int, str]:
    words = [line.split() for line in stdout.splitlines()
             if line.startswith("first train batch of shard")]
    return {int(w[-2]): w[-1] for w in words}


def test_two_hosts_match_one_host_and_checkpoint_restores_anywhere(tmp_path):
    host_outputs = run_two_hosts(tmp_path, sigterm_at_step=2, status=128 + 15)
    saved = tmp_path / "two_hosts" / "checkpoints" / "2"
    assert f"Stopped by a signal on another process after step 2: checkpoint saved in " \
           f"{saved}" in host_outputs[0]
    assert {"process_0-of-2", "process_1-of-2"} <= set(os.listdir(saved / "data"))
    resumed = run_two_hosts(tmp_path)
    assert "Resuming from checkpoint at step 2." in resumed[0]
    reference = subprocess.run(driver_command("reference", tmp_path,
                                              train_flags(tmp_path, "reference")),
                               cwd=REPO, env=environment(8), capture_output=True, text=True,
                               timeout=TIMEOUT_S)
    assert reference.returncode == 0, failure("reference", reference.returncode,
                                              reference.stderr)

    # Process 0 alone speaks and writes metrics; each process read its own shard, the same
    # rows the reference read for that shard.
    assert "Process 0 of 2: 4 local devices, 8 devices in all" in host_outputs[0]
    assert "Mesh {'data': 8, 'fsdp': 1, 'tensor': 1, 'expert': 1}." in host_outputs[0]
    assert f"Finished at step {STEPS}" in resumed[0]
    assert "Process" not in host_outputs[1] and "step" not in host_outputs[1]
    shards = {**first_batches(host_outputs[0]), **first_batches(host_outputs[1])}
    assert sorted(shards) == [0, 1] and shards[0] != shards[1]
    assert first_batches(reference.stdout) == shards

    # One metrics row per logged step (a second writer would double them; step 1, which
    # compiles, has no throughput), and the same losses.
    two_hosts = train_test.metric_rows(tmp_path / "two_hosts", "train")
    one_host = train_test.metric_rows(tmp_path / "reference", "train")
    assert [row["step"] for row in two_hosts] == list(range(1, STEPS + 1))
    assert "tokens_per_second" not in two_hosts[0] and "tokens_per_second" in two_hosts[1]
    np.testing.assert_allclose([r["loss"] for r in two_hosts], [r["loss"] for r in one_host],
                               rtol=1e-5)
    for split in ("validation",):
        np.testing.assert_allclose(
            [r["loss"] for r in train_test.metric_rows(tmp_path / "two_hosts", split)],
            [r["loss"] for r in train_test.metric_rows(tmp_path / "reference", split)],
            rtol=1e-5)

    # The two processes' checkpoint restores the same on 8 devices and on 1, and holds the
    # reference's parameters up to float32 reduction order.
    on_8, on_1 = (np.load(tmp_path / f"two_hosts_on_{n}.npz") for n in (8, 1))
    expected = np.load(tmp_path / "reference.npz")
    assert sorted(on_8.files) == sorted(on_1.files) == sorted(expected.files)
    for name in expected.files:
        np.testing.assert_array_equal(on_8[name], on_1[name], err_msg=name)
        scale = np.max(np.abs(expected[name]))
        np.testing.assert_array_less(np.max(np.abs(on_8[name] - expected[name])),
                                     1e-5 * scale + 1e-30, err_msg=name)


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
