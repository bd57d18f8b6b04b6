"""Train state, the jitted train and eval steps, and their shardings over the mesh.
Knows nothing of gin, files or the input pipeline: it maps (state, batch) to (state, metrics).
"""
import contextlib
import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from t5x_lite import models
from t5x_lite import partitioning


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class Trainer:
    """Owns the compiled steps for one model, optimizer and mesh.

    `learning_rate` is the schedule inside `optimizer`, kept to report the rate per step.
    Dropout randomness is derived from `dropout_seed` and the step, so a resumed run draws
    the same masks as an uninterrupted one.
    """

    model: models.EncoderDecoderModel
    optimizer: optax.GradientTransformation
    learning_rate: Callable[[jax.Array], jax.Array]
    mesh: Mesh
    dropout_seed: int = 0

    def _in_mesh(self):
        return mesh_context(self.mesh)

    @functools.cached_property
    def state_shardings(self) -> TrainState:
        """NamedShardings of every leaf of the TrainState, derived from logical axis names
        (worked out once per Trainer)."""
        abstract = self.abstract_state
        # Optimizer leaves that mirror a parameter's shape take its sharding (parameters of
        # equal shape here also share logical axes); factored Adafactor statistics and
        # scalars are small and stay replicated.
        shardings = param_shardings(self.model, self.mesh)
        shape_to_sharding = {}
        for leaf, sharding in zip(jax.tree_util.tree_leaves(abstract.params),
                                  jax.tree_util.tree_leaves(shardings)):
            shape_to_sharding.setdefault(leaf.shape, sharding)
        replicated = partitioning.replicated(self.mesh)
        opt_shardings = jax.tree_util.tree_map(
            lambda leaf: shape_to_sharding.get(leaf.shape, replicated)
            if leaf.ndim > 1 else replicated, abstract.opt_state)
        return TrainState(step=replicated, params=shardings, opt_state=opt_shardings)

    def _init_state(self, rng: jax.Array) -> TrainState:
        params = self.model.init(rng)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=self.optimizer.init(params))

    @functools.cached_property
    def abstract_state(self) -> TrainState:
        return jax.eval_shape(self._init_state, jax.random.key(0))

    def sharded_abstract_state(self) -> TrainState:
        return partitioning.with_shardings(self.abstract_state, self.state_shardings)

    def init_state(self, seed: int) -> TrainState:
        """Initialises parameters directly in their shards (no host-side full copy)."""
        with self._in_mesh():
            init = jax.jit(self._init_state, out_shardings=self.state_shardings)
            return init(jax.random.key(seed))

    def _train_step(self, state: TrainState, batch: models.Batch
                    ) -> tuple[TrainState, dict[str, jax.Array]]:
        dropout_rng = jax.random.fold_in(jax.random.key(self.dropout_seed), state.step)

        def loss_fn(params):
            return self.model.loss(params, batch, dropout_rng)

        (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        weight = jnp.maximum(sums["weight"], 1.0)
        metrics = {
            "loss": loss,
            "z_loss": sums["z_loss"] / weight,
            "accuracy": sums["correct"] / weight,
            "target_tokens": sums["weight"],
            "learning_rate": jnp.asarray(self.learning_rate(state.step), jnp.float32),
            "grad_norm": optax.tree.norm(grads),
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def compile_train_step(self) -> Callable:
        shardings = self.state_shardings
        batch_sharding = partitioning.batch_sharding(self.mesh)
        step = jax.jit(self._train_step, in_shardings=(shardings, batch_sharding),
                       out_shardings=(shardings, partitioning.replicated(self.mesh)),
                       donate_argnums=0)
        return self._wrap(step)

    def compile_eval_step(self) -> Callable:
        return compile_eval_step(self.model, self.mesh, self.state_shardings.params)

    def _wrap(self, compiled: Callable) -> Callable:
        return in_mesh(compiled, self.mesh)


@contextlib.contextmanager
def mesh_context(mesh: Mesh):
    """Enters the mesh and the logical axis rules that activation constraints read."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.LOGICAL_AXIS_RULES):
        yield


def in_mesh(fn: Callable, mesh: Mesh) -> Callable:
    def run(*args, **kwargs):
        with mesh_context(mesh):
            return fn(*args, **kwargs)
    return run


def param_shardings(model: models.EncoderDecoderModel, mesh: Mesh):
    return partitioning.logical_to_sharding(model.logical_axes(), mesh)


def compile_eval_step(model: models.EncoderDecoderModel, mesh: Mesh, shardings) -> Callable:
    """Returns fn(params, batch) -> summed loss / z_loss / correct / weight over the batch."""
    step = jax.jit(lambda params, batch: model.loss_sums(params, batch),
                   in_shardings=(shardings, partitioning.batch_sharding(mesh)),
                   out_shardings=partitioning.replicated(mesh))
    return in_mesh(step, mesh)


def summarize_eval(sums: list[dict[str, jax.Array]]) -> dict[str, float]:
    """Token-weighted validation loss and accuracy over all eval batches."""
    totals = {key: float(sum(float(s[key]) for s in sums)) for key in sums[0]}
    weight = max(totals["weight"], 1.0)
    return {"loss": totals["loss"] / weight, "z_loss": totals["z_loss"] / weight,
            "accuracy": totals["correct"] / weight, "target_tokens": totals["weight"]}
