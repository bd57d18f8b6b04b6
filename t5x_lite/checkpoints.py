"""Orbax checkpoints under MODEL_DIR/checkpoints/<step>/ with two items, `params` and
`opt_state` (so evaluation and inference can restore parameters alone): save every N steps
and at the end, keep the last K, restore the newest directly into its shards."""
import os

import jax.numpy as jnp
import orbax.checkpoint as ocp

from t5x_lite import trainer

ITEMS = ("params", "opt_state")


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


def save(manager: ocp.CheckpointManager, state: trainer.TrainState) -> None:
    step = int(state.step)
    if step in manager.all_steps():
        return
    manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        opt_state=ocp.args.StandardSave(state.opt_state)))


def restore_latest(manager: ocp.CheckpointManager, abstract_state: trainer.TrainState
                   ) -> trainer.TrainState | None:
    """The newest checkpoint laid out like `abstract_state` (ShapeDtypeStructs carrying
    shardings), or None when there is none yet."""
    step = manager.latest_step()
    if step is None:
        return None
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_state.params),
        opt_state=ocp.args.StandardRestore(abstract_state.opt_state)))
    return trainer.TrainState(step=jnp.asarray(step, jnp.int32), params=restored["params"],
                              opt_state=restored["opt_state"])


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
