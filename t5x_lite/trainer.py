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
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from t5x_lite import models
from t5x_lite import moe
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
    the same masks as an uninterrupted one. `rules` (the run's MeshConfig.rules) map the
    model's logical axis names to the mesh's axes. With `num_microbatches` > 1 each step
    accumulates the gradients of that many slices of the batch (one slice's activations in
    memory at a time) and applies one update equal to the full batch's.
    """

    model: models.Model
    optimizer: optax.GradientTransformation
    learning_rate: Callable[[jax.Array], jax.Array]
    mesh: Mesh
    rules: partitioning.Rules
    dropout_seed: int = 0
    num_microbatches: int = 1

    def __post_init__(self):
        if self.num_microbatches < 1:
            raise ValueError(f"num_microbatches must be >= 1, got {self.num_microbatches}")

    def _in_mesh(self):
        return mesh_context(self.mesh, self.rules)

    @functools.cached_property
    def state_shardings(self) -> TrainState:
        """NamedShardings of every leaf of the TrainState, derived from logical axis names
        (worked out once per Trainer). Optimizer state follows its parameter's sharding."""
        shardings = param_shardings(self.model, self.mesh, self.rules)
        return TrainState(step=partitioning.replicated(self.mesh), params=shardings,
                          opt_state=optimizer_state_shardings(
                              self.optimizer, self.abstract_state.params, shardings))

    def _init_state(self, rng: jax.Array) -> TrainState:
        return self._fresh_state(self.model.init(rng))

    def _fresh_state(self, params) -> TrainState:
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=self.optimizer.init(params))

    def state_from_params(self, params) -> TrainState:
        """Step 0 with these parameters and a fresh optimizer state, in their shards."""
        with self._in_mesh():
            return jax.jit(self._fresh_state, out_shardings=self.state_shardings)(params)

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

    def _summed_loss_grads(self, params, batch: models.Batch, dropout_rng: jax.Array
                           ) -> tuple[dict[str, jax.Array], Any]:
        """Loss sums and the gradient of the summed (not averaged) loss."""
        def summed_loss(params):
            sums = self.model.loss_sums(params, batch, dropout_rng)
            return sums["loss"], sums

        (_, sums), grads = jax.value_and_grad(summed_loss, has_aux=True)(params)
        return sums, grads

    def _accumulated_grads(self, params, batch: models.Batch, dropout_rng: jax.Array
                           ) -> tuple[dict[str, jax.Array], Any]:
        """`_summed_loss_grads` over `num_microbatches` slices, summed. Slice i holds rows
        i, i + M, i + 2M, ... so every slice stays spread over the batch's devices."""
        count = self.num_microbatches
        if count == 1:
            return self._summed_loss_grads(params, batch, dropout_rng)
        slices = {key: value.reshape(value.shape[0] // count, count, *value.shape[1:])
                  .swapaxes(0, 1) for key, value in batch.items()}

        def add_slice(totals, index_and_slice):
            index, microbatch = index_and_slice
            sums, grads = self._summed_loss_grads(
                params, microbatch, jax.random.fold_in(dropout_rng, index))
            return jax.tree_util.tree_map(jnp.add, totals, (sums, grads)), None

        zeros = jax.tree_util.tree_map(
            jnp.zeros_like, jax.eval_shape(self._summed_loss_grads, params,
                                           jax.tree_util.tree_map(lambda x: x[0], slices),
                                           dropout_rng))
        totals, _ = jax.lax.scan(add_slice, zeros, (jnp.arange(count), slices))
        return totals

    def _train_step(self, state: TrainState, batch: models.Batch
                    ) -> tuple[TrainState, dict[str, jax.Array]]:
        dropout_rng = jax.random.fold_in(jax.random.key(self.dropout_seed), state.step)
        sums, summed_grads = self._accumulated_grads(state.params, batch, dropout_rng)
        weight = jnp.maximum(sums["weight"], 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / weight, summed_grads)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            **per_token_metrics(sums),
            "learning_rate": jnp.asarray(self.learning_rate(state.step), jnp.float32),
            "grad_norm": optax.tree.norm(grads),
        }
        if isinstance(opt_state, optax.ApplyIfFiniteState):
            # The optimizer skipped this update: its gradients were not finite.
            metrics["skipped_steps"] = 1 - opt_state.last_finite.astype(jnp.int32)
            metrics["consecutive_skips"] = opt_state.notfinite_count
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def jitted_train_step(self) -> Callable:
        """The train step, jitted with its shardings (to call inside the mesh, or lower)."""
        shardings = self.state_shardings
        batch_sharding = partitioning.batch_sharding(self.mesh)
        return jax.jit(self._train_step, in_shardings=(shardings, batch_sharding),
                       out_shardings=(shardings, partitioning.replicated(self.mesh)),
                       donate_argnums=0)

    def compile_train_step(self) -> Callable:
        return self._wrap(self.jitted_train_step())

    def jitted_eval_step(self) -> Callable:
        return jitted_eval_step(self.model, self.mesh, self.state_shardings.params)

    def compile_eval_step(self) -> Callable:
        return compile_eval_step(self.model, self.mesh, self.state_shardings.params, self.rules)

    def _wrap(self, compiled: Callable) -> Callable:
        return in_mesh(compiled, self.mesh, self.rules)


def build_trainer(model_config: models.T5Config, learning_rate: optax.ScalarOrSchedule,
                  optimizer: Callable[..., optax.GradientTransformation],
                  mesh_config: partitioning.MeshConfig, seed: int,
                  num_microbatches: int = 1, max_consecutive_skips: int | None = None,
                  devices: list | None = None) -> Trainer:
    """With `max_consecutive_skips` (nan_policy "skip") the optimizer leaves the parameters
    unchanged on a step whose gradients are not finite (optax.apply_if_finite). `devices`
    (default: this process's) may be a topology's, to compile for it (precompile.py)."""
    mesh = model_mesh(model_config, mesh_config, devices)
    if not callable(learning_rate):
        learning_rate = optax.constant_schedule(learning_rate)
    transform = optimizer(learning_rate=learning_rate)
    if max_consecutive_skips is not None:
        transform = optax.apply_if_finite(transform, max_consecutive_skips)
    return Trainer(models.model_for(model_config), transform, learning_rate, mesh,
                   rules=mesh_config.rules, dropout_seed=seed,
                   num_microbatches=num_microbatches)


def model_mesh(model_config: models.T5Config, mesh_config: partitioning.MeshConfig,
               devices: list | None = None) -> Mesh:
    """The mesh of `mesh_config` over `devices` (default: all), checked against the model
    (an MoE's experts must split evenly over the expert axis)."""
    mesh = partitioning.create_mesh(mesh_config, devices)
    moe.check_expert_axis(model_config.moe, mesh.shape["expert"])
    return mesh


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: partitioning.Rules):
    """Enters the mesh and the logical axis rules that activation constraints read."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def in_mesh(fn: Callable, mesh: Mesh, rules: partitioning.Rules) -> Callable:
    def run(*args, **kwargs):
        with mesh_context(mesh, rules):
            return fn(*args, **kwargs)
    return run


def param_shardings(model: models.Model, mesh: Mesh, rules: partitioning.Rules):
    return partitioning.logical_to_sharding(model.logical_axes(), mesh, rules)


def _sharding_for_statistic(leaf, param, sharding: NamedSharding) -> NamedSharding:
    """A parameter's sharding adapted to an optimizer statistic of that parameter: the same
    for a full-shape moment; the spec minus the reduced axis for a factored (Adafactor) row
    or column moment; replicated for anything else (scalars, placeholders)."""
    spec = tuple(sharding.spec) + (None,) * (param.ndim - len(sharding.spec))
    if leaf.shape == param.shape:
        return sharding
    for axis in range(param.ndim):
        if leaf.shape == param.shape[:axis] + param.shape[axis + 1:]:
            return NamedSharding(sharding.mesh, PartitionSpec(*spec[:axis], *spec[axis + 1:]))
    return partitioning.replicated(sharding.mesh)


def optimizer_state_shardings(optimizer: optax.GradientTransformation, abstract_params,
                              shardings):
    """NamedShardings for `optimizer`'s state that follow the parameters' shardings. A state
    leaf belongs to the parameter whose path ends its own path (optax nests the parameter
    tree inside its state, under parameter groups too); other leaves are replicated."""
    abstract_state = jax.eval_shape(optimizer.init, abstract_params)
    mesh = jax.tree_util.tree_leaves(shardings)[0].mesh
    by_path = {_dict_keys(path): (param, sharding) for (path, param), sharding in zip(
        jax.tree_util.tree_leaves_with_path(abstract_params),
        jax.tree_util.tree_leaves(shardings))}

    def sharding_of(path, leaf):
        keys = _dict_keys(path)
        for start in range(len(keys)):  # The longest matching suffix first.
            if keys[start:] in by_path:
                return _sharding_for_statistic(leaf, *by_path[keys[start:]])
        return partitioning.replicated(mesh)

    return jax.tree_util.tree_map_with_path(sharding_of, abstract_state)


def _dict_keys(path) -> tuple:
    return tuple(key.key for key in path if isinstance(key, jax.tree_util.DictKey))


def compile_eval_step(model: models.Model, mesh: Mesh, shardings,
                      rules: partitioning.Rules) -> Callable:
    """Returns fn(params, batch) -> summed loss / z_loss / correct / weight over the batch."""
    return in_mesh(jitted_eval_step(model, mesh, shardings), mesh, rules)


def jitted_eval_step(model: models.Model, mesh: Mesh, shardings) -> Callable:
    return jax.jit(lambda params, batch: model.loss_sums(params, batch),
                   in_shardings=(shardings, partitioning.batch_sharding(mesh)),
                   out_shardings=partitioning.replicated(mesh))


def per_token_metrics(sums: dict) -> dict:
    """Every summed metric divided by the summed target weight ("correct" becomes
    "accuracy"), plus the weight itself as "target_tokens". Works on jax and NumPy values,
    scalars or arrays (an MoE layer's per-expert fractions)."""
    weight = sums["weight"]
    divisor = max(weight, 1.0) if isinstance(weight, float) else jnp.maximum(weight, 1.0)
    metrics = {("accuracy" if key == "correct" else key): value / divisor
               for key, value in sums.items() if key != "weight"}
    return {**metrics, "target_tokens": weight}


def summarize_eval(sums: list[dict[str, jax.Array]]) -> dict:
    """Token-weighted validation metrics over all eval batches (floats, and NumPy arrays for
    per-expert metrics)."""
    totals = {key: np.sum([np.asarray(s[key], np.float64) for s in sums], axis=0)
              for key in sums[0]}
    totals = {key: float(value) if value.ndim == 0 else value for key, value in totals.items()}
    return per_token_metrics(totals)
