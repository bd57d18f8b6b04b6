"""Orbax checkpoints under MODEL_DIR/checkpoints/<step>/ with three items: `params` and
`opt_state` (so evaluation and inference can restore parameters alone) and `data`, each
process's input-pipeline position (so a resumed run reads exactly the batches an
uninterrupted one would). Save every N steps and at the end, keep the last K, restore the
newest directly into its shards."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from t5x_lite import trainer

ITEMS = ("params", "opt_state", "data")


class DataStateHandler(ocp.CheckpointHandler):
    """Writes each process's input-pipeline state ({file name: bytes}, taken when the save
    starts) to <step>/data/process_<i>-of-<n>/; Orbax makes the step directory appear only
    once every item is complete."""

    @staticmethod
    def _process_dir(directory: epath.Path) -> epath.Path:
        return directory / f"process_{jax.process_index()}-of-{jax.process_count()}"

    def save(self, directory: epath.Path, args: "DataStateSave") -> None:
        target = self._process_dir(directory)
        target.mkdir(parents=True, exist_ok=True)
        for name, data in args.files.items():
            (target / name).write_bytes(data)

    def restore(self, directory: epath.Path, args: "DataStateRestore" = None
                ) -> dict[str, bytes]:
        source = self._process_dir(directory)
        if not source.exists():
            raise FileNotFoundError(f"{directory} holds no input state for process "
                                    f"{jax.process_index()} of {jax.process_count()}: resume "
                                    "with the process count that saved it")
        return {path.name: path.read_bytes() for path in source.iterdir()}

    def metadata(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    files: dict


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


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
         data_state: dict[str, bytes] | None = None) -> None:
    """Starts saving `state` (in the background) and, given, this process's input position
    `data_state` (pipeline.TrainBatches.state() taken after the step's batch)."""
    step = int(state.step)
    if step in manager.all_steps():
        return
    items = {"params": ocp.args.StandardSave(state.params),
             "opt_state": ocp.args.StandardSave(state.opt_state)}
    if data_state is not None:
        items["data"] = DataStateSave(data_state)
    manager.save(step, args=ocp.args.Composite(**items))


INCOMPLETE_MARK = ".orbax-checkpoint-tmp"


def incomplete_checkpoints(manager: ocp.CheckpointManager) -> list[str]:
    """Names of step directories whose save never finished (the process died mid-save).
    Orbax writes under a temporary name and renames when complete, so these are never read;
    they are left in place, not deleted."""
    directory = epath.Path(manager.directory)
    if not directory.exists():
        return []
    return sorted(path.name for path in directory.iterdir() if INCOMPLETE_MARK in path.name)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: trainer.TrainState
                   ) -> tuple[trainer.TrainState, dict[str, bytes] | None] | None:
    """The newest checkpoint laid out like `abstract_state` (ShapeDtypeStructs carrying
    shardings) and this process's saved input position (None for a checkpoint saved
    without one), or None when there is no checkpoint yet."""
    step = manager.latest_step()
    if step is None:
        return None
    items = {"params": ocp.args.StandardRestore(abstract_state.params),
             "opt_state": ocp.args.StandardRestore(abstract_state.opt_state)}
    has_data = (epath.Path(manager.directory) / str(step) / "data").exists()
    if has_data:
        items["data"] = DataStateRestore()
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    state = trainer.TrainState(step=jnp.asarray(step, jnp.int32), params=restored["params"],
                               opt_state=restored["opt_state"])
    return state, restored["data"] if has_data else None


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
    metadata = ocp.StandardCheckpointer().metadata(
        os.path.join(str(manager.directory), str(step), "params"))
    return step, metadata.item_metadata.tree


def restore_params(manager: ocp.CheckpointManager, abstract_params) -> tuple[int, object]:
    """(step, params) of the newest checkpoint; raises FileNotFoundError when there is none."""
    step = latest_step(manager)
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params)))
    return step, restored["params"]
