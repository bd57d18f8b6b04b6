"""Orbax checkpoints under MODEL_DIR/checkpoints/<step>/ with three items: `params` and
`opt_state` (so evaluation and inference can restore parameters alone) and `data`, the
position of every input shard, written by the process that reads it (so a resumed run reads
exactly the batches an uninterrupted one would, on any process count that reads whole
shards). Save every N steps and at the end, keep the last K, restore the
newest directly into its shards."""
import dataclasses
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from t5x_lite import optimizers
from t5x_lite import trainer

ITEMS = ("params", "opt_state", "data")


class DataStateHandler(ocp.CheckpointHandler):
    """Writes the input-pipeline positions of this process's input shards ({shard name:
    {file name: bytes}}, taken when the save starts) to <step>/data/<shard name>/; Orbax
    makes the step directory appear only once every item is complete."""

    def save(self, directory: epath.Path, args: "DataStateSave") -> None:
        for shard, files in args.shards.items():
            target = directory / shard
            target.mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                (target / name).write_bytes(data)

    def restore(self, directory: epath.Path, args: "DataStateRestore" = None
                ) -> dict[str, dict[str, bytes]]:
        return {shard: {path.name: path.read_bytes() for path in (directory / shard).iterdir()}
                for shard in args.shards}

    def metadata(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    shards: dict


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    shards: tuple = ()


def checkpoint_dir(model_dir: str) -> str:
    return os.path.join(os.path.abspath(model_dir), "checkpoints")


def create_manager(model_dir: str, keep: int = 3, read_only: bool = False
                   ) -> ocp.CheckpointManager:
    """A manager that keeps the `keep` newest checkpoints; saves run in the background.
    A read-only manager (evaluation, inference) never creates or deletes anything."""
    if keep < 1:
        raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                           read_only=read_only)
    return ocp.CheckpointManager(checkpoint_dir(model_dir), options=options, item_names=ITEMS)


def save(manager: ocp.CheckpointManager, state: trainer.TrainState,
         input_position: dict[str, dict[str, bytes]] | None = None) -> None:
    """Starts saving `state` (in the background) and, given, the positions of this process's
    input shards (pipeline.ShardedBatches.state() taken after the step's batch)."""
    step = int(state.step)
    if step in manager.all_steps():
        return
    items = {"params": ocp.args.StandardSave(state.params),
             "opt_state": ocp.args.StandardSave(state.opt_state)}
    if input_position is not None:
        items["data"] = DataStateSave(input_position)
    manager.save(step, args=ocp.args.Composite(**items))


INCOMPLETE_MARK = ".orbax-checkpoint-tmp"


def complete_steps(model_dir: str) -> list[int]:
    """Steps of the complete checkpoints on disk, oldest first (read afresh, unlike the
    manager's cached list)."""
    directory = checkpoint_dir(model_dir)
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def incomplete_checkpoints(manager: ocp.CheckpointManager) -> list[str]:
    """Names of step directories whose save never finished (the process died mid-save).
    Orbax writes under a temporary name and renames when complete, so these are never read;
    they are left in place, not deleted."""
    directory = epath.Path(manager.directory)
    if not directory.exists():
        return []
    return sorted(path.name for path in directory.iterdir() if INCOMPLETE_MARK in path.name)


def saved_input_shards(manager: ocp.CheckpointManager, step: int) -> list[str]:
    """Names of the input shards whose positions checkpoint `step` holds (none for a
    checkpoint saved without them)."""
    directory = epath.Path(manager.directory) / str(step) / "data"
    if not directory.exists():
        return []
    return sorted(path.name for path in directory.iterdir() if path.is_dir())


def restore_latest(manager: ocp.CheckpointManager, abstract_state: trainer.TrainState,
                   input_shards: Sequence[str] = ()
                   ) -> tuple[trainer.TrainState, dict[str, dict[str, bytes]] | None] | None:
    """The newest checkpoint laid out like `abstract_state` (ShapeDtypeStructs carrying
    shardings) and the saved positions of `input_shards` (None when it lacks any of them:
    saved without positions, or for another shard count), or None when there is no
    checkpoint yet."""
    step = manager.latest_step()
    if step is None:
        return None
    items = {"params": ocp.args.StandardRestore(abstract_state.params),
             "opt_state": ocp.args.StandardRestore(abstract_state.opt_state)}
    has_position = bool(input_shards) and set(input_shards) <= set(
        saved_input_shards(manager, step))
    if has_position:
        items["data"] = DataStateRestore(tuple(input_shards))
    restored = _restore(manager, step, abstract_state.params, items)
    state = trainer.TrainState(step=jnp.asarray(step, jnp.int32), params=restored["params"],
                               opt_state=restored["opt_state"])
    return state, restored["data"] if has_position else None


def _restore(manager: ocp.CheckpointManager, step: int, abstract_params, items: dict) -> dict:
    """Restores `items` of checkpoint `step` after checking that its parameters have the
    shapes of `abstract_params`; a checkpoint that cannot be read is a ValueError naming
    the fix (Orbax would fail deep inside TensorStore)."""
    check_same_model(manager, step, abstract_params)
    try:
        return manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as error:
        raise ValueError(damaged_message(manager, step, error)) from error


def damaged_message(manager: ocp.CheckpointManager, step: int, error: BaseException) -> str:
    path = epath.Path(manager.directory) / str(step)
    # TensorStore appends its whole spec ("See full TensorStore details: ...").
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    reason = reason.split(". See full")[0][:120]
    older = [s for s in manager.all_steps() if s < step]
    then = (f"to go on from step {max(older)}, the newest before it" if older
            else "to start without it")
    return (f"checkpoint {path} cannot be read ({reason}): it is damaged; move it out of "
            f"checkpoints/ (mv {path} {path.parent.parent}/damaged_checkpoint_{step}) {then}")


def check_same_model(manager: ocp.CheckpointManager, step: int, abstract_params) -> None:
    """Raises ValueError naming the first parameter whose shape (or presence) differs between
    checkpoint `step` and `abstract_params`: the directory belongs to another model."""
    saved, wanted = (_shapes_by_name(tree) for tree in
                     (saved_params_metadata(manager, step), abstract_params))
    for name in sorted(saved.keys() | wanted.keys()):
        if saved.get(name) != wanted.get(name):
            raise ValueError(
                f"{epath.Path(manager.directory).parent} holds checkpoints of another model: "
                f"parameter {name} "
                f"is {_shape_text(saved.get(name))} there and {_shape_text(wanted.get(name))} "
                "in the gin model; use that run's model settings (its config.gin) or another "
                "directory")


def _shapes_by_name(tree) -> dict[str, tuple[int, ...]]:
    return {optimizers.parameter_path(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _shape_text(shape: tuple[int, ...] | None) -> str:
    return "absent" if shape is None else "x".join(map(str, shape))


def saved_params_metadata(manager: ocp.CheckpointManager, step: int):
    """The tree of ArrayMetadata (.shape, .dtype) of checkpoint `step`'s parameters, read
    from its metadata alone; ValueError naming the fix when it cannot be read."""
    try:
        return ocp.StandardCheckpointer().metadata(
            os.path.join(str(manager.directory), str(step), "params")).item_metadata.tree
    except Exception as error:
        raise ValueError(damaged_message(manager, step, error)) from error


def latest_step(manager: ocp.CheckpointManager) -> int:
    """The newest checkpoint's step; raises FileNotFoundError when there is none."""
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}: train first, or point "
                                "MODEL_DIR at a directory holding checkpoints/<step>/")
    return step


def params_metadata(manager: ocp.CheckpointManager) -> tuple[int, object]:
    """(step, tree of ArrayMetadata with .shape and .dtype) of the newest checkpoint's
    parameters, read from its metadata alone, for restoring a model whose config is unknown."""
    step = latest_step(manager)
    return step, saved_params_metadata(manager, step)


def restore_params(manager: ocp.CheckpointManager, abstract_params) -> tuple[int, object]:
    """(step, params) of the newest checkpoint; raises FileNotFoundError when there is none."""
    step = latest_step(manager)
    restored = _restore(manager, step, abstract_params,
                        {"params": ocp.args.StandardRestore(abstract_params)})
    return step, restored["params"]
