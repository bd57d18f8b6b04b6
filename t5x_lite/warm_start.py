"""Where a training run's state comes from, chosen once at its start: the newest checkpoint
in MODEL_DIR with its input position (resume); else the parameters of another run or a Hugging
Face directory (fine-tuning, INIT_FROM); else a dense run's parameters copied into every expert
(sparse upcycling, UPCYCLE_FROM); else a fresh initialisation. Also the newest parameters that
evaluation and inference restore."""
import dataclasses
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from t5x_lite import checkpoints
from t5x_lite import hf
from t5x_lite import models
from t5x_lite import optimizers
from t5x_lite import partitioning
from t5x_lite import run_config
from t5x_lite import trainer as trainer_lib
from t5x_lite.data import pipeline

say = run_config.say


def restore_or_init(trainer: trainer_lib.Trainer, manager, seed: int,
                    upcycle_from: str | None = None, init_from: str | None = None,
                    input_shards: Sequence[str] = ()
                    ) -> tuple[trainer_lib.TrainState, dict | None]:
    """The newest checkpoint in MODEL_DIR with the saved positions of `input_shards` (None
    when it lacks any of them); else step 0 from the parameters of `init_from`'s newest
    checkpoint, or upcycled from `upcycle_from`'s; else a fresh initialisation (no input
    position: the pipeline starts at the beginning)."""
    for name in checkpoints.incomplete_checkpoints(manager):
        say(f"Skipping {name} in {manager.directory}: an interrupted save, never complete "
            "(left in place).")
    restored = checkpoints.restore_latest(manager, trainer.sharded_abstract_state(),
                                          input_shards)
    if restored is not None:
        say(f"Resuming from checkpoint at step {int(restored[0].step)}.")
        return restored
    if init_from:
        return pretrained_state(trainer, init_from, seed), None
    if upcycle_from:
        return upcycled_state(trainer, upcycle_from, seed), None
    return trainer.init_state(seed), None


def pretrained_state(trainer: trainer_lib.Trainer, model_dir: str, seed: int = 0
                     ) -> trainer_lib.TrainState:
    """Step 0 with the parameters of the newest checkpoint in `model_dir` (a MODEL_DIR, or a
    Hugging Face T5 directory, of this architecture) and a fresh optimizer state: the start
    of a fine-tuning run. A classifier from a masked LM's checkpoint takes every parameter
    they share; its head starts as a fresh run's with `seed` would (see swapped_heads)."""
    if os.path.isfile(os.path.join(model_dir, hf.CONFIG_FILE)):
        return hf_state(trainer, model_dir)
    manager = checkpoints.create_manager(model_dir, read_only=True)
    abstract = trainer.sharded_abstract_state().params
    try:
        step, saved = checkpoints.params_metadata(manager)
    except FileNotFoundError:
        raise FileNotFoundError(f"INIT_FROM {model_dir!r} holds no checkpoint: point it at the "
                                "MODEL_DIR of the pretraining run") from None
    fresh, left = swapped_heads(abstract, saved)
    if not fresh and not left:
        # Any other difference is an error naming the first parameter that differs.
        step, params = checkpoints.restore_params(manager, abstract)
        say(f"Initialised from the checkpoint at step {step} in {model_dir}: parameters only, "
            "fresh optimizer state, step 0.")
        return trainer.state_from_params(params)
    params = with_fresh_heads(trainer, manager, saved, seed)
    say(f"Initialised from the checkpoint at step {step} in {model_dir}: every parameter but "
        f"{', '.join(fresh)} (fresh, as the model's new head)"
        + (f"; left the checkpoint's {', '.join(left)} unused" if left else "")
        + ": parameters only, fresh optimizer state, step 0.")
    return trainer.state_from_params(params)


# Heads a fine-tuning run swaps when a classifier starts from a masked LM's checkpoint: the
# classifier's head (models.EncoderOnlyTransformer) is not in the checkpoint and starts fresh;
# the masked LM's untied logits projection is not in the classifier and stays behind.
FRESH_HEADS = ("classification_head",)
LEFT_HEADS = ("logits_dense",)


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    return {optimizers.parameter_path(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def swapped_heads(abstract_params, saved_params) -> tuple[list[str], list[str]]:
    """(the model's heads a checkpoint lacks, the checkpoint's heads the model lacks) when
    those are all the two trees differ by and they are FRESH_HEADS and LEFT_HEADS, the
    parameters they share having the same shapes; else ([], []), for restore_params to
    report the first difference."""
    ours, theirs = _shapes(abstract_params), _shapes(saved_params)
    fresh = sorted({name.split("/")[0] for name in ours.keys() - theirs.keys()})
    left = sorted({name.split("/")[0] for name in theirs.keys() - ours.keys()})
    shared_alike = all(ours[name] == theirs[name] for name in ours.keys() & theirs.keys())
    if fresh and set(fresh) <= set(FRESH_HEADS) and set(left) <= set(LEFT_HEADS) and \
            shared_alike:
        return fresh, left
    return [], []


def with_fresh_heads(trainer: trainer_lib.Trainer, manager, saved_params, seed: int):
    """The checkpoint's parameters where the model has them, restored into the model's
    shards (what the model lacks, replicated, then dropped), and a fresh initialisation with
    `seed` for the rest."""
    shardings = {optimizers.parameter_path(path): sharding for path, sharding in
                 jax.tree_util.tree_leaves_with_path(trainer.state_shardings.params)}
    abstract = jax.tree_util.tree_map_with_path(
        lambda path, leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=shardings.get(
            optimizers.parameter_path(path), partitioning.replicated(trainer.mesh))),
        saved_params)
    _, restored = checkpoints.restore_params(manager, abstract)
    restored = {optimizers.parameter_path(path): leaf
                for path, leaf in jax.tree_util.tree_leaves_with_path(restored)}
    with trainer_lib.mesh_context(trainer.mesh, trainer.rules):
        fresh = jax.jit(trainer.model.init, out_shardings=trainer.state_shardings.params)(
            jax.random.key(seed))
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: restored.get(optimizers.parameter_path(path), leaf), fresh)


# T5Config fields that change what the parameters compute; the rest (dropout, dtype, remat,
# z-loss) are the fine-tuning run's own choice.
ARCHITECTURE_FIELDS = ("architecture", "vocab_size", "d_model", "num_heads", "head_dim", "d_ff",
                       "num_encoder_layers", "num_decoder_layers", "activation", "gated_mlp",
                       "tie_embeddings", "relative_attention_num_buckets",
                       "relative_attention_max_distance", "layer_norm_epsilon",
                       "encoder_attention", "local_radius", "global_block_size")


def hf_state(trainer: trainer_lib.Trainer, hf_dir: str) -> trainer_lib.TrainState:
    """Step 0 with the parameters of a Hugging Face T5 directory, sharded like the trainer's."""
    hf_model, params = hf.load_t5(hf_dir)
    ours = trainer.model.config
    for field in ARCHITECTURE_FIELDS:
        theirs, mine = getattr(hf_model.config, field), getattr(ours, field)
        if field == "activation":
            theirs, mine = hf.activation_name(theirs), hf.activation_name(mine)
        theirs, mine = (getattr(value, "value", value) for value in (theirs, mine))
        if theirs != mine:
            raise ValueError(f"INIT_FROM {hf_dir!r} has {field} = {theirs}, the gin model "
                             f"{mine}: bind models.T5Config.{field} = {theirs} (or use the "
                             f"matching gin/models/ preset)")
    if ours.scan_layers or ours.moe is not None:
        raise ValueError("a Hugging Face T5 has separate dense layers: fine-tune it with "
                         "models.T5Config.scan_layers = False and moe = None")
    params = jax.device_put(params, trainer.state_shardings.params)
    say(f"Initialised from the Hugging Face T5 in {hf_dir}: parameters only, fresh optimizer "
        "state, step 0.")
    return trainer.state_from_params(params)


def check_upcycling(model_config: models.T5Config, upcycle_from: str | None) -> None:
    if not upcycle_from:
        return
    if model_config.moe is None:
        raise ValueError("upcycle_from needs an MoE model: bind models.T5Config.moe (e.g. "
                         "include gin/models/switch_tiny.gin)")
    if model_config.moe.extra_dense_mlp:
        raise ValueError("upcycling copies each dense MLP into the experts, but "
                         "moe.MoeConfig.extra_dense_mlp adds MLPs the dense model lacks: set "
                         "it to False")
    try:
        checkpoints.latest_step(checkpoints.create_manager(upcycle_from, read_only=True))
    except FileNotFoundError:
        raise FileNotFoundError(f"UPCYCLE_FROM {upcycle_from!r} holds no checkpoint: point it "
                                "at the MODEL_DIR of a dense run that has saved one") from None


def upcycled_state(trainer: trainer_lib.Trainer, dense_model_dir: str, seed: int
                   ) -> trainer_lib.TrainState:
    """Step 0 of an MoE run whose parameters are the dense run's newest checkpoint, every
    expert a copy of its layer's dense MLP and routers freshly initialised (upcycle),
    with a fresh optimizer state. The dense parameters are restored into shards."""
    manager = checkpoints.create_manager(dense_model_dir, read_only=True)
    step, metadata = checkpoints.params_metadata(manager)
    param_shardings = trainer.state_shardings.params
    shardings = dense_shardings(param_shardings)
    abstract = jax.tree_util.tree_map_with_path(
        lambda path, leaf: jax.ShapeDtypeStruct(
            leaf.shape, leaf.dtype, sharding=shardings.get(
                optimizers.parameter_path(path), partitioning.replicated(trainer.mesh))), metadata)
    _, dense_params = checkpoints.restore_params(manager, abstract)
    with trainer_lib.mesh_context(trainer.mesh, trainer.rules):
        # The same router initialisation as a fresh MoE run with this seed.
        fresh_params = jax.jit(trainer.model.init, out_shardings=param_shardings)(
            jax.random.key(seed))
        params = jax.jit(upcycle, out_shardings=param_shardings)(fresh_params, dense_params)
    say(f"Upcycled from the dense checkpoint at step {step} in {dense_model_dir}: every "
        "expert starts as its layer's dense MLP, routers fresh.")
    return trainer.state_from_params(params)


def train_batches(data: run_config.DataConfig, mesh, seed: int, start_step: int,
                  input_position: dict | None, manager) -> pipeline.ShardedBatches:
    """The training batches, from the saved position when the checkpoint has one for every
    input shard this process reads, so a resumed run reads exactly what an uninterrupted one
    would. A checkpoint saved for another shard count is an error naming the fix, unless
    data.resume_without_input_position starts the stream anew."""
    if input_position is not None or start_step == 0:
        batches = data.batches("train", mesh, shuffle=True, seed=seed, repeat=True)
        if input_position is not None:
            batches.restore(input_position)
        return batches
    saved = checkpoints.saved_input_shards(manager, start_step)
    if not saved:
        # A checkpoint from before input positions were saved: fresh examples, not a replay.
        say(f"The checkpoint at step {start_step} holds no input position: reading batches "
            f"shuffled with seed {seed} + {start_step} instead.")
    elif not data.resume_without_input_position:
        saved_count = saved_shard_count(saved)
        anew = ("RESUME_WITHOUT_INPUT_POSITION = True to resume its parameters and optimizer "
                "state on a new input stream")
        fix = (f"{plural(saved_count, 'input shard')}, this run reads NUM_INPUT_SHARDS = "
               f"{data.num_input_shards}: bind NUM_INPUT_SHARDS = {saved_count} to resume "
               f"exactly, or bind {anew}" if saved_count else
               f"each process, as an earlier t5x_lite saved them ({', '.join(saved)}): "
               f"bind {anew}")
        raise ValueError(f"checkpoint {manager.directory}/{start_step} holds input positions "
                         f"for {fix}")
    else:
        shards, saved_shards = (plural(count, "input shard")
                                for count in (data.num_input_shards, len(saved)))
        say(f"WARNING: resuming step {start_step}'s parameters and optimizer state on a NEW "
            f"input stream (seed {seed} + {start_step}, {shards}), not the saved positions of "
            f"{saved_shards}: the batches from here on differ from an uninterrupted run's "
            "(RESUME_WITHOUT_INPUT_POSITION = True).")
    return data.batches("train", mesh, shuffle=True, seed=seed + start_step, repeat=True)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def saved_shard_count(names: Sequence[str]) -> int | None:
    """The shard count in saved position names (pipeline.shard_name); None for positions an
    earlier t5x_lite saved per process."""
    if all(name.startswith("shard_") for name in names):
        return int(names[0].rpartition("-of-")[2])
    return None


@dataclasses.dataclass(frozen=True)
class RestoredRun:
    """A trained MODEL_DIR ready to evaluate or decode: the model on its mesh, the newest
    checkpoint's step and parameters, and the data settings (DataConfig.as_trained)."""

    model: models.Model
    mesh: Mesh
    step: int
    params: Any
    data: run_config.DataConfig


def restore_run(model_config: models.T5Config, data: run_config.DataConfig, model_dir: str,
                mesh_config: partitioning.MeshConfig) -> RestoredRun:
    mesh = trainer_lib.model_mesh(model_config, mesh_config)
    model, step, params = restore_model(model_config, model_dir, mesh, mesh_config.rules)
    data = data.as_trained(model_dir).for_model(model_config)
    # After the restore, so a missing checkpoint is reported before any vocabulary training.
    run_config.check_vocabulary(model_config, data)
    return RestoredRun(model, mesh, step, params, data)


def restore_model(model_config: models.T5Config, model_dir: str, mesh,
                  rules: partitioning.Rules) -> tuple[models.Model, int, Any]:
    """The model, the step of its newest checkpoint, and the parameters sharded on `mesh`."""
    model = models.model_for(model_config)
    shardings = trainer_lib.param_shardings(model, mesh, rules)
    abstract = partitioning.with_shardings(jax.eval_shape(model.init, jax.random.key(0)),
                                           shardings)
    if not os.path.isdir(checkpoints.checkpoint_dir(model_dir)):
        raise FileNotFoundError(f"no checkpoints in {os.path.abspath(model_dir)}: train first "
                                "(python -m t5x_lite.train with the same gin files)")
    manager = checkpoints.create_manager(model_dir, read_only=True)
    step, params = checkpoints.restore_params(manager, abstract)
    return model, step, params


def upcycle(moe_params, dense_params):
    """MoE parameters from a dense model's (sparse upcycling, Komatsuzaki et al. 2023): every
    expert kernel is a copy of the dense MLP kernel at the same path without "experts";
    routers keep their fresh initialisation; everything else is copied. Works on
    ShapeDtypeStructs too (for shapes only). Raises ValueError naming the first parameter
    the dense tree cannot supply."""
    dense = {optimizers.parameter_path(path): leaf
             for path, leaf in jax.tree_util.tree_leaves_with_path(dense_params)}

    def take(path, moe_leaf):
        keys = [getattr(key, "key", key) for key in path]
        if "router" in keys:
            return moe_leaf
        source_keys = [key for key in keys if key != "experts"]
        name = "/".join(source_keys)
        if name not in dense:
            raise ValueError(f"the dense checkpoint has no parameter {name} for MoE parameter "
                             f"{'/'.join(keys)}: upcycle from a checkpoint of the same dense "
                             "architecture")
        source = dense[name]
        expected = moe_leaf.shape[1:] if "experts" in keys else moe_leaf.shape
        if tuple(source.shape) != tuple(expected):
            raise ValueError(f"dense parameter {name} has shape {tuple(source.shape)}, but "
                             f"{'/'.join(keys)} needs {tuple(expected)}: upcycle from a "
                             "checkpoint of the same dense architecture")
        if "experts" in keys:
            return jnp.broadcast_to(jnp.asarray(source, moe_leaf.dtype)[None], moe_leaf.shape)
        return jnp.asarray(source, moe_leaf.dtype)

    return jax.tree_util.tree_map_with_path(take, moe_params)


def dense_shardings(moe_shardings) -> dict:
    """{a dense parameter's path (optimizers.parameter_path): its sharding} for the dense
    parameters `upcycle` reads, from the MoE parameters' NamedShardings (an expert kernel's
    minus the expert dimension), so a dense checkpoint can be restored straight into matching
    shards."""
    found = {}
    for path, sharding in jax.tree_util.tree_leaves_with_path(moe_shardings):
        keys = [getattr(key, "key", key) for key in path]
        if "router" in keys:
            continue
        spec = tuple(sharding.spec)
        if "experts" in keys:
            keys, spec = [key for key in keys if key != "experts"], spec[1:]
        name = "/".join(keys)
        found[name] = jax.sharding.NamedSharding(sharding.mesh,
                                                 jax.sharding.PartitionSpec(*spec))
    return found
