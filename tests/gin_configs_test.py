"""Every gin file parses, finalizes, and builds a model that runs a forward pass; presets have
the published parameter counts."""
import dataclasses
import glob
import os
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import pytest

from t5x_lite import launch
from t5x_lite import models
from t5x_lite import run_config
from t5x_lite.data import tasks

GIN_DIR = launch.GIN_DIR
REQUIRED_MACROS = ["MODEL_DIR = '/tmp/unused'", "MIXTURE_OR_TASK_NAME = 'stdlib_span_corruption'",
                   "TRAIN_STEPS = 1", "INIT_FROM = '/tmp/unused'",
                   "INFER_OUTPUT = '/tmp/unused.jsonl'"]

# Published T5 parameter counts (the Hugging Face checkpoints' totals, vocabulary 32,128).
PUBLISHED_COUNTS = {
    "t5_1_1_small": 76_961_152,
    "t5_1_1_base": 247_577_856,
    "t5_1_1_large": 783_150_080,
    "t5_1_1_xl": 2_849_757_184,
    # The published XXL config gives 11.14B; "11.3B" often quoted is T5 v1.0 11B's count.
    "t5_1_1_xxl": 11_135_332_352,
    "t5_1_0_small": 60_506_624,
    "t5_1_0_base": 222_903_552,
    "t5_1_0_large": 737_668_096,
    "t5_1_0_3b": 2_851_598_336,
    "t5_1_0_11b": 11_307_321_344,
}
PRESETS = sorted(os.path.basename(p)[:-4] for p in glob.glob(f"{GIN_DIR}/models/*.gin"))
# gin/*.gin runs that include their model themselves.
WHOLE_RUNS = ("quickstart.gin", "docstrings.gin")
# Small enough to run for real on CPU; larger presets run the forward pass abstractly.
CONCRETE = {"t5_1_1_tiny", "t5_1_1_small", "t5_1_0_small"}


# Objective files for one family, composed with its tiny preset, and the model setting each
# makes on purpose (a causal LM decodes and scores causally).
DECODER_ONLY_FILES = {"objectives/causal_lm.gin": {"bidirectional_inputs": False}}
ENCODER_ONLY_FILES = {"objectives/bert_mlm.gin": {}}


def model_from_gin(files: list[str], bindings: list[str]) -> models.Model:
    launch.parse_gin(files, bindings)
    return models.model_for(gin.get_configurable(models.T5Config)())


def forward(model: models.Model, params):
    """Logits [2, 8, V]; an encoder-only model's are its inputs' [2, 16, V]."""
    batch = {"encoder_input_tokens": jnp.ones((2, 16), jnp.int32),
             "decoder_input_tokens": jnp.ones((2, 8), jnp.int32)}
    return model.logits(params, batch)


@pytest.mark.parametrize("preset", PRESETS)
def test_model_preset_builds_and_runs(preset):
    model = model_from_gin([f"models/{preset}.gin", "runs/pretrain.gin"], REQUIRED_MACROS)
    if preset in CONCRETE:
        params = model.init(jax.random.key(0))
        logits = forward(model, params)
        assert bool(jnp.all(jnp.isfinite(logits)))
    else:
        params = jax.eval_shape(model.init, jax.random.key(0))
        logits = jax.eval_shape(lambda p: forward(model, p), params)
    length = 16 if model.config.encoder_only else 8
    assert logits.shape == (2, length, model.config.vocab_size)
    if preset in PUBLISHED_COUNTS:
        assert models.count_parameters(params) == PUBLISHED_COUNTS[preset]
    gin.clear_config()


@pytest.mark.parametrize("path", sorted(
    os.path.relpath(p, GIN_DIR) for p in glob.glob(f"{GIN_DIR}/**/*.gin", recursive=True)
    if "/models/" not in p))
def test_run_file_leaves_the_models_computation_alone(path):
    """A run, objective or partitioning file composed after a model preset parses, finalizes
    and leaves the model computing exactly what the preset alone computes (files never reset
    what another file set); the whole runs in gin/ train the tiny preset with their own
    vocabulary's size."""
    tiny = ("models/decoder_only_tiny.gin" if path in DECODER_ONLY_FILES else
            "models/encoder_only_tiny.gin" if path in ENCODER_ONLY_FILES else
            "models/t5_1_1_tiny.gin")
    includes = [] if path in WHOLE_RUNS else [tiny]
    model = model_from_gin(includes + [path], [] if path == "quickstart.gin" else REQUIRED_MACROS)
    assert gin.config_is_locked()
    gin.clear_config()
    vocab_size = ["models.T5Config.vocab_size = 8192"] if path in WHOLE_RUNS else []
    preset = model_from_gin([tiny], vocab_size)
    gin.clear_config()
    assert model.config == dataclasses.replace(preset.config,
                                               **DECODER_ONLY_FILES.get(path, {}))
    params = preset.init(jax.random.key(0))
    logits = forward(model, params)
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert bool(jnp.all(logits == forward(preset, params)))


def test_quickstart_binds_the_t5x_macros():
    launch.parse_gin(["quickstart.gin"], ["TRAIN_STEPS = 7", "BATCH_SIZE = 4"])
    assert gin.get_configurable(run_config.LoopConfig)().train_steps == 7
    assert gin.get_configurable(run_config.DataConfig)().batch_size == 4
    gin.clear_config()


def test_parses_from_a_directory_whose_folders_shadow_gin_paths(tmp_path):
    # A MODEL_DIR named runs/ in the working directory once made gin's package-resource
    # reader take 'runs/pretrain.gin' for a file inside a namespace package, and crash.
    for name in ("runs", "models", "gin_models"):
        (tmp_path / name).mkdir()
    script = ("from t5x_lite import launch; "
              f"launch.parse_gin([{launch.GIN_DIR + '/quickstart.gin'!r}], []); print('parsed')")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "parsed" in result.stdout, result.stderr[-2000:]


def registered_name(files: list[str], bindings: list[str]) -> str:
    """The MIXTURE_OR_TASK_NAME these gin files give, registering it as training would."""
    launch.parse_gin(files, bindings)
    try:
        return gin.get_configurable(run_config.DataConfig)().mixture_or_task_name
    finally:
        gin.clear_config()


@pytest.mark.parametrize("objective", ["span_corruption", "ul2", "prefix_lm", "bart", "bert_mlm"])
def test_objective_files_register_the_source_and_objective(objective):
    name = registered_name(["quickstart.gin", f"objectives/{objective}.gin"],
                           ["SOURCE = 'wikipedia'"])
    assert name == f"wikipedia_{objective}"
    provider = tasks.get_task_or_mixture(name)
    assert provider.output_features["targets"].vocabulary.extra_ids == 100


def test_objective_settings_come_from_gin():
    name = registered_name(["quickstart.gin", "objectives/ul2.gin"], [
        "objectives.UL2.denoisers = [{'rate': 3, 'noise_density': 0.3, "
        "'mean_noise_span_length': 5.0}, {'rate': 1, 'prefix_lm': True, 'mode_token': '[S2S]'}]",
        "objectives.UL2.concatenate_documents = False"])
    mixture = tasks.get_task_or_mixture(name)
    rates = {task.name: mixture.get_rate(task) for task in mixture.tasks}
    assert rates == {"stdlib_ul2.span5_density0.3": 3, "stdlib_ul2.s2s_prefix_lm": 1}
    chunking = tasks.get_task_or_mixture("stdlib_ul2.span5_density0.3").preprocessors[2]
    assert chunking.keywords == {"noise_density": 0.3, "mean_noise_span_length": 5.0,
                                 "num_prefix_tokens": 0, "concatenate_documents": False}
    tasks.register_task(source="stdlib", objective="ul2")  # Restore the built-in mixture.


def test_a_mixture_can_be_registered_from_gin():
    name = registered_name(["quickstart.gin"], [
        "MIXTURE_OR_TASK_NAME = @tasks.register_mixture()",
        "tasks.register_mixture.name = 'gin_test_mixture'",
        "tasks.register_mixture.tasks_and_rates = "
        "[('c4_span_corruption', 0.7), ('wikipedia_span_corruption', 0.3)]"])
    mixture = tasks.get_task_or_mixture(name)
    assert {task.name: mixture.get_rate(task) for task in mixture.tasks} == {
        "c4_span_corruption": 0.7, "wikipedia_span_corruption": 0.3}
