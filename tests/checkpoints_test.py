"""checkpoints.py called directly on a hand-built TrainState (no trainer, no model): what is
restored is what was saved, bit for bit (edge-case floats, bfloat16, Adam's NamedTuple state,
the step, the input positions); the newest complete step wins, an interrupted save is skipped
and left in place, pruning keeps the newest K, read-only managers change nothing on disk, and a
checkpoint of another model or a damaged one is a ValueError naming the fix. A child process
with 8 CPU devices restores into shardings: sharded == unsharded, both ways."""
import errno
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5x_lite import checkpoints
from t5x_lite import trainer

# A failed restore abandons TensorStore reads, which report "Event loop is closed" from
# their threads whenever they are collected (bad_input_test's last test says more).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Input-shard positions as pipeline.ShardedBatches.state() gives them: tf.train.Checkpoint
# files per shard, raw bytes (zeros and 0xff included).
POSITIONS = {"shard_00000-of-00002": {"checkpoint": b"model_checkpoint_path: \"iterator\"\n",
                                      "iterator.index": bytes(range(256))},
             "shard_00001-of-00002": {"checkpoint": b"\x00\xff" * 7,
                                      "iterator.data-00000-of-00001": b"\x01" * 1000}}
# Float32 values a lossy or re-typed write would change: a NaN with a payload, -0.0, both
# infinities, the smallest subnormal, the largest finite value.
EDGE_FLOATS = np.array([0x7FC00123, 0x80000000, 0x7F800000, 0xFF800000, 0x00000001, 0x7F7FFFFF],
                       np.uint32).view(np.float32)


def make_state(step: int, seed: int) -> trainer.TrainState:
    """A TrainState whose every leaf holds distinct values: float32 (with EDGE_FLOATS),
    bfloat16 and int32 parameters, and Adam's state (count, mu, nu) filled with noise."""
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(16, 48)).astype(np.float32)
    kernel[0, :EDGE_FLOATS.size] = EDGE_FLOATS
    params = {"encoder": {"kernel": jnp.asarray(kernel),
                          "scale": jnp.asarray(rng.normal(size=(8,)), jnp.bfloat16)},
              "decoder": {"position_ids": jnp.asarray(rng.integers(-2**31, 2**31 - 1, (4, 3)),
                                                      jnp.int32),
                          "bias": jnp.asarray(rng.normal(size=(12,)), jnp.float32)}}
    opt_state = jax.tree.map(
        lambda leaf: jnp.asarray(rng.normal(size=leaf.shape) * 100, leaf.dtype),
        optax.adam(1e-3).init(params))
    return trainer.TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                              opt_state=opt_state)


def abstract(tree):
    """ShapeDtypeStructs carrying each leaf's sharding, as restore expects."""
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                          sharding=leaf.sharding), tree)


def leaf_name(path) -> str:
    """"params/encoder/kernel", "opt_state/0/mu/encoder/kernel" for a pytree key path."""
    return "/".join(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))
                    for key in path)


def bits(tree) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """{leaf name: (dtype, shape, sha256 of the bytes)} of every leaf."""
    return {leaf_name(path): (str(np.asarray(leaf).dtype), np.shape(leaf),
                              hashlib.sha256(np.asarray(leaf).tobytes()).hexdigest())
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_same_state(restored: trainer.TrainState, saved: trainer.TrainState) -> None:
    assert jax.tree.structure(restored) == jax.tree.structure(saved)
    assert bits(restored) == bits(saved)


def save_steps(model_dir, steps, keep: int = 3, positions=None):
    """Saves make_state(step, seed=step) for each of `steps`; returns the manager."""
    manager = checkpoints.create_manager(str(model_dir), keep)
    for step in steps:
        checkpoints.save(manager, make_state(step, seed=step), positions)
        manager.wait_until_finished()
    return manager


def snapshot(directory) -> dict[str, str]:
    """{relative path: content hash} of every file (and every directory, as "dir") under it."""
    files = {}
    for root, names, file_names in os.walk(directory):
        for name in names:
            files[os.path.relpath(os.path.join(root, name), directory)] = "dir"
        for name in file_names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return files


def test_restore_latest_is_bit_identical_with_step_and_input_positions(tmp_path):
    saved = make_state(7, seed=0)
    manager = checkpoints.create_manager(str(tmp_path))
    checkpoints.save(manager, saved, POSITIONS)
    manager.wait_until_finished()
    fresh = checkpoints.create_manager(str(tmp_path), read_only=True)
    restored, positions = checkpoints.restore_latest(fresh, abstract(saved), tuple(POSITIONS))
    assert_same_state(restored, saved)
    edge_row = np.asarray(restored.params["encoder"]["kernel"])[0, :EDGE_FLOATS.size]
    np.testing.assert_array_equal(edge_row.view(np.uint32), EDGE_FLOATS.view(np.uint32))
    assert restored.step.dtype == jnp.int32 and int(restored.step) == 7
    assert positions == POSITIONS
    assert isinstance(restored.opt_state[0], optax.ScaleByAdamState)


def test_restore_latest_is_none_before_any_save_then_the_newest_step(tmp_path):
    manager = checkpoints.create_manager(str(tmp_path))
    assert checkpoints.restore_latest(manager, abstract(make_state(0, seed=0))) is None
    for step in (2, 5):
        checkpoints.save(manager, make_state(step, seed=step))
        manager.wait_until_finished()
    restored, positions = checkpoints.restore_latest(manager, abstract(make_state(0, seed=0)))
    assert_same_state(restored, make_state(5, seed=5))
    assert positions is None
    assert checkpoints.complete_steps(tmp_path) == [2, 5]


def test_saving_a_step_already_on_disk_keeps_the_first_save(tmp_path):
    manager = save_steps(tmp_path, [4])
    checkpoints.save(manager, make_state(4, seed=99), POSITIONS)
    manager.wait_until_finished()
    restored, positions = checkpoints.restore_latest(manager, abstract(make_state(4, seed=4)),
                                                     tuple(POSITIONS))
    assert_same_state(restored, make_state(4, seed=4))
    assert positions is None and checkpoints.saved_input_shards(manager, 4) == []


def test_input_positions_are_given_only_when_every_asked_shard_was_saved(tmp_path):
    manager = save_steps(tmp_path, [1], positions=POSITIONS)
    like = abstract(make_state(1, seed=1))
    first, second = sorted(POSITIONS)
    assert checkpoints.saved_input_shards(manager, 1) == [first, second]
    assert checkpoints.saved_input_shards(manager, 2) == []  # No such checkpoint.
    _, one = checkpoints.restore_latest(manager, like, (second,))
    assert one == {second: POSITIONS[second]}
    # Another shard count (a shard this checkpoint lacks), or no shards asked: no positions.
    for shards in ((first, "shard_00002-of-00003"), ()):
        state, positions = checkpoints.restore_latest(manager, like, shards)
        assert positions is None
        assert_same_state(state, make_state(1, seed=1))


def test_keep_checkpoints_prunes_the_oldest_and_must_be_positive(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # A relative MODEL_DIR, as users pass it.
    manager = save_steps("run", [1, 2, 3, 4], keep=2)
    assert checkpoints.complete_steps("run") == [3, 4]
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["3", "4"]
    assert manager.directory == tmp_path / "run" / "checkpoints"
    for keep in (0, -1):
        with pytest.raises(ValueError, match=f"^keep_checkpoints must be >= 1, got {keep}$"):
            checkpoints.create_manager("other", keep)
    assert not (tmp_path / "other").exists()


def test_interrupted_save_is_skipped_and_left_in_place(tmp_path, monkeypatch):
    """The save of step 3 fails in its last item (as when the disk fills or the process
    dies): Orbax leaves it under its temporary name, which nothing restores or deletes."""
    manager = save_steps(tmp_path, [1, 2], keep=2, positions=POSITIONS)

    def fail(self, directory, args):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    monkeypatch.setattr(checkpoints.DataStateHandler, "save", fail)
    with pytest.raises(OSError) as raised:
        checkpoints.save(manager, make_state(3, seed=3), POSITIONS)
        manager.wait_until_finished()
    monkeypatch.undo()
    # From Orbax's background thread with its errno, which faults.disk_full_explained reads.
    assert raised.value.errno == errno.ENOSPC
    unfinished = "3.orbax-checkpoint-tmp"  # Orbax's name for a save not yet finalized.
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2", unfinished]
    assert checkpoints.incomplete_checkpoints(manager) == [unfinished]
    assert checkpoints.complete_steps(tmp_path) == [1, 2]
    leftover = tmp_path / "checkpoints" / unfinished
    before = snapshot(leftover)
    resumed = checkpoints.create_manager(str(tmp_path), keep=1)
    restored, positions = checkpoints.restore_latest(resumed, abstract(make_state(0, 0)),
                                                     tuple(POSITIONS))
    assert_same_state(restored, make_state(2, seed=2))
    assert positions == POSITIONS
    checkpoints.save(resumed, make_state(4, seed=4))  # Prunes 1 and 2 (keep=1), not the leftover.
    resumed.wait_until_finished()
    assert checkpoints.complete_steps(tmp_path) == [4]
    assert checkpoints.incomplete_checkpoints(resumed) == [unfinished]
    assert snapshot(leftover) == before


def test_read_only_manager_creates_saves_and_deletes_nothing(tmp_path):
    missing = tmp_path / "never_trained"
    empty = checkpoints.create_manager(str(missing), read_only=True)
    assert checkpoints.restore_latest(empty, abstract(make_state(0, 0))) is None
    assert checkpoints.incomplete_checkpoints(empty) == []
    assert checkpoints.complete_steps(missing) == []
    fix = (f"no checkpoint in {missing}/checkpoints: train first, or point MODEL_DIR at a "
           "directory holding checkpoints/<step>/")
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(fix)}$"):
        checkpoints.params_metadata(empty)
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(fix)}$"):
        checkpoints.restore_params(empty, abstract(make_state(0, 0).params))
    assert not missing.exists()

    save_steps(tmp_path / "run", [1, 2, 3])
    before = snapshot(tmp_path / "run")
    reader = checkpoints.create_manager(str(tmp_path / "run"), keep=1, read_only=True)
    restored, _ = checkpoints.restore_latest(reader, abstract(make_state(0, 0)))
    assert_same_state(restored, make_state(3, seed=3))
    checkpoints.save(reader, make_state(4, seed=4))
    reader.wait_until_finished()
    assert snapshot(tmp_path / "run") == before


def test_restore_params_and_params_metadata_read_the_newest_parameters(tmp_path):
    save_steps(tmp_path, [1, 2])
    reader = checkpoints.create_manager(str(tmp_path), read_only=True)
    saved = make_state(2, seed=2).params
    step, metadata = checkpoints.params_metadata(reader)
    assert step == 2
    assert ({leaf_name(path): (str(np.dtype(leaf.dtype)), tuple(leaf.shape))
             for path, leaf in jax.tree_util.tree_flatten_with_path(metadata)[0]}
            == {name: (dtype, shape) for name, (dtype, shape, _) in bits(saved).items()})
    step, params = checkpoints.restore_params(reader, abstract(saved))
    assert step == 2
    assert jax.tree.structure(params) == jax.tree.structure(saved)
    assert bits(params) == bits(saved)


@pytest.mark.parametrize("change, named", [
    (lambda p: {**p, "encoder": {**p["encoder"], "kernel": jnp.zeros((16, 32))}},
     "parameter encoder/kernel is 16x48 there and 16x32 in the gin model"),
    (lambda p: {**p, "decoder": {**p["decoder"], "extra": jnp.zeros((5,))}},
     "parameter decoder/extra is absent there and 5 in the gin model"),
    (lambda p: {**p, "encoder": {"kernel": p["encoder"]["kernel"]}},
     "parameter encoder/scale is 8 there and absent in the gin model"),
])
def test_another_model_is_refused_naming_the_first_differing_parameter(tmp_path, change, named):
    save_steps(tmp_path, [1])
    before = snapshot(tmp_path)
    reader = checkpoints.create_manager(str(tmp_path), read_only=True)
    state = make_state(1, seed=1)
    wanted = "^" + re.escape(f"{tmp_path} holds checkpoints of another model: {named}; use "
                             "that run's model settings (its config.gin) or another "
                             "directory") + "$"
    with pytest.raises(ValueError, match=wanted):
        checkpoints.restore_params(reader, abstract(change(state.params)))
    with pytest.raises(ValueError, match=wanted):
        checkpoints.restore_latest(reader, abstract(state.replace(params=change(state.params))))
    assert snapshot(tmp_path) == before


def damage_data(model_dir, step: int) -> None:
    """Cuts the largest file of checkpoint `step`'s parameters in half: the data file holding
    the 3 KB kernel (the metadata stays readable)."""
    files = [os.path.join(root, name) for root, _, names in
             os.walk(os.path.join(model_dir, "checkpoints", str(step), "params"))
             for name in names]
    largest = max(files, key=os.path.getsize)
    os.truncate(largest, os.path.getsize(largest) // 2)
    manager = checkpoints.create_manager(str(model_dir), read_only=True)
    assert checkpoints.params_metadata(manager)[0] == step


def damaged_line(model_dir, step: int, then: str) -> str:
    """The one-line ValueError, as a pattern (the reason in parentheses is TensorStore's)."""
    path = f"{model_dir}/checkpoints/{step}"
    return (f"^{re.escape(f'checkpoint {path} cannot be read (')}[^\n]+"
            + re.escape(f"): it is damaged; move it out of checkpoints/ (mv {path} "
                        f"{model_dir}/damaged_checkpoint_{step}) {then}") + "$")


def test_damaged_checkpoint_names_the_newest_older_step_and_is_left_in_place(tmp_path):
    save_steps(tmp_path, [1, 2])
    damage_data(tmp_path, 2)
    before = snapshot(tmp_path)
    reader = checkpoints.create_manager(str(tmp_path), read_only=True)
    with pytest.raises(ValueError, match=damaged_line(
            tmp_path, 2, "to go on from step 1, the newest before it")):
        checkpoints.restore_latest(reader, abstract(make_state(0, 0)))
    assert snapshot(tmp_path) == before
    # Doing what the line says: step 1 restores.
    os.rename(tmp_path / "checkpoints" / "2", tmp_path / "damaged_checkpoint_2")
    restored, _ = checkpoints.restore_latest(
        checkpoints.create_manager(str(tmp_path), read_only=True), abstract(make_state(0, 0)))
    assert_same_state(restored, make_state(1, seed=1))


def test_damaged_only_checkpoint_says_to_start_without_it(tmp_path):
    save_steps(tmp_path, [3])
    damage_data(tmp_path, 3)
    reader = checkpoints.create_manager(str(tmp_path), read_only=True)
    with pytest.raises(ValueError, match=damaged_line(tmp_path, 3, "to start without it")):
        checkpoints.restore_params(reader, abstract(make_state(0, 0).params))
    # Metadata that cannot be read: the same line, from params_metadata too.
    os.remove(tmp_path / "checkpoints" / "3" / "params" / "_METADATA")
    for read in (lambda: checkpoints.params_metadata(reader),
                 lambda: checkpoints.restore_latest(reader, abstract(make_state(0, 0)))):
        with pytest.raises(ValueError, match=damaged_line(tmp_path, 3, "to start without it")):
            read()
    assert os.path.isdir(tmp_path / "checkpoints" / "3" / "params")


# In a process of 8 CPU devices: restores step 1 (saved here on one device) into a 2x4 mesh,
# saves it from there as step 2, and prints each leaf's digest, sharding and shard shapes.
SHARDED_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from t5x_lite import checkpoints
    from tests import checkpoints_test as t

    assert len(jax.devices()) == 8
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    spec = lambda leaf: P("data", "model") if leaf.ndim == 2 and leaf.shape[0] % 2 == 0 and \\
        leaf.shape[1] % 4 == 0 else P("model") if leaf.ndim == 1 and leaf.shape[0] % 4 == 0 \\
        else P()
    like = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(
        leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, spec(leaf))), t.make_state(0, 0))
    manager = checkpoints.create_manager(sys.argv[1])
    restored, _ = checkpoints.restore_latest(manager, like)
    arrays = (restored.params, restored.opt_state)  # The step is a host-side counter.
    layout = {name: [list(leaf.sharding.spec), sorted({s.data.shape for s in
                                                      leaf.addressable_shards})]
              for name, leaf in zip(t.bits(arrays), jax.tree.leaves(arrays))}
    assert all(a.sharding == b.sharding for a, b in zip(
        jax.tree.leaves(arrays), jax.tree.leaves((like.params, like.opt_state))))
    checkpoints.save(manager, restored.replace(step=restored.step + 1))
    manager.wait_until_finished()
    print("RESULT", json.dumps({"bits": t.bits(restored), "layout": layout}))
""")


def test_sharded_restore_and_save_equal_the_unsharded_state(tmp_path):
    saved = make_state(1, seed=1)
    save_steps(tmp_path, [1])
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, str(tmp_path)],
                            capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.split("RESULT ", 1)[1])
    assert {name: (dtype, tuple(shape), digest) for name, (dtype, shape, digest)
            in out["bits"].items()} == bits(saved)
    assert out["layout"]["0/encoder/kernel"] == [["data", "model"], [[8, 12]]]
    assert out["layout"]["0/encoder/scale"] == [["model"], [[2]]]
    assert out["layout"]["0/decoder/position_ids"] == [[], [[4, 3]]]
    # Step 2 was written from the 8 shards; here, on one device, it reads back bit for bit.
    restored, _ = checkpoints.restore_latest(checkpoints.create_manager(str(tmp_path)),
                                             abstract(saved))
    assert int(restored.step) == 2
    assert bits(restored.params) == bits(saved.params)
    assert bits(restored.opt_state) == bits(saved.opt_state)
