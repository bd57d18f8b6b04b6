"""The encoder-only family: masked-LM logits and the classification head against a float64 NumPy
forward pass, a packed example equals the example alone, the loss counts the chosen positions
only; BERT masking statistics over thousands of chunks and its loss weights through packing;
classification tasks from local files; and end to end a masked LM that trains, resumes bit for
bit, starts a classifier (head fresh, the rest its checkpoint's) whose evaluated accuracy is
the argmax of its head; bad input is one line."""
import dataclasses
import json

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import eval as eval_lib
from t5x_lite import launch
from t5x_lite import models
from t5x_lite import optimizers
from t5x_lite import partitioning
from t5x_lite import train
from t5x_lite import trainer as trainer_lib
from t5x_lite import warm_start
from t5x_lite.data import corpora
from t5x_lite.data import objectives
from t5x_lite.data import pipeline
from t5x_lite.data import preprocessors
from t5x_lite.data import tasks
from t5x_lite.data import vocab
from tests import decoder_only_train_test
from tests.data_objectives_test import FIRST_SENTINEL, MASK, apply, random_documents
from tests.layers_test import bucket_closed_form, rms64, self_attention_layers64
from tests.train_test import SENTENCES, error_line, metric_rows, run_train_command

VOCAB = 16
CONFIG = models.T5Config(architecture="encoder_only", vocab_size=VOCAB, d_model=32, num_heads=2,
                         head_dim=8, d_ff=64, num_encoder_layers=2, num_decoder_layers=0,
                         relative_attention_num_buckets=8, relative_attention_max_distance=16,
                         tie_embeddings=True)
MODEL = models.model_for(CONFIG)
CLASSIFIER = models.model_for(dataclasses.replace(CONFIG, num_classes=3))


@pytest.fixture(scope="module")
def params():
    # Scaled-up weights give peaked, varied distributions.
    return jax.tree_util.tree_map(lambda x: 3 * x, CLASSIFIER.init(jax.random.key(0)))


def packed_batch() -> dict:
    """Two rows: two packed examples (5 and 4 tokens) then padding, and one of 9 tokens."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, VOCAB, (2, 12)).astype(np.int32)
    segments = np.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 9 + [0] * 3], np.int32)
    tokens[segments == 0] = 0
    return {"encoder_input_tokens": tokens, "encoder_segment_ids": segments}


def numpy_encoded(params, batch) -> np.ndarray:
    """T5's encoder in float64: RMSNorm, attention (no 1/sqrt(K)) with a bidirectional relative
    position bias within each segment, gated-GELU MLP, the final norm."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    tokens, segments = batch["encoder_input_tokens"], batch["encoder_segment_ids"]
    length = tokens.shape[1]

    query, key = np.arange(length)[:, None], np.arange(length)[None, :]
    buckets = np.vectorize(bucket_closed_form)(key - query, True, 8, 16)
    position_bias = p["encoder_relative_bias"]["rel_embedding"][buckets].transpose(2, 0, 1)
    visible = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)
    bias = position_bias[None] + np.where(visible, 0.0, -1e10)[:, None]
    x = self_attention_layers64(p, p["token_embedder"]["embedding"][tokens], bias,
                                [f"encoder_layer_{i}" for i in range(CONFIG.num_encoder_layers)])
    return rms64(x, p["encoder_norm"]["scale"])


def logits(model, params, batch) -> np.ndarray:
    return np.asarray(model.logits(params, {k: jnp.asarray(v) for k, v in batch.items()}))


def mlm_params(params):
    return {name: value for name, value in params.items() if name != "classification_head"}


def test_masked_lm_logits_match_numpy_float64(params):
    batch = packed_batch()
    real = batch["encoder_segment_ids"] > 0
    embedding = np.asarray(params["token_embedder"]["embedding"], np.float64)
    want = numpy_encoded(params, batch) * CONFIG.d_model ** -0.5 @ embedding.T
    np.testing.assert_allclose(logits(MODEL, mlm_params(params), batch)[real], want[real],
                               rtol=1e-4, atol=1e-4)


def test_a_packed_example_equals_the_example_alone(params):
    batch = packed_batch()
    alone = {key: np.zeros_like(value) for key, value in batch.items()}
    alone["encoder_input_tokens"][0, :4] = batch["encoder_input_tokens"][0, 5:9]
    alone["encoder_segment_ids"][0, :4] = 1
    np.testing.assert_allclose(logits(MODEL, mlm_params(params), alone)[0, :4],
                               logits(MODEL, mlm_params(params), batch)[0, 5:9],
                               rtol=1e-5, atol=1e-5)


def test_scanned_layers_equal_the_loop(params):
    stacked = mlm_params(params)
    layer_params = [stacked.pop(f"encoder_layer_{i}") for i in range(2)]
    stacked["encoder_layers"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layer_params)
    scanned = models.model_for(dataclasses.replace(CONFIG, scan_layers=True))
    np.testing.assert_allclose(logits(scanned, stacked, packed_batch()),
                               logits(MODEL, mlm_params(params), packed_batch()),
                               rtol=1e-5, atol=1e-5)


def test_classification_head_is_a_dense_layer_on_the_mean_of_each_rows_tokens(params):
    batch = packed_batch()
    batch["encoder_segment_ids"] = (batch["encoder_segment_ids"] > 0).astype(np.int32)
    valid = batch["encoder_segment_ids"][..., None]
    pooled = (numpy_encoded(params, batch) * valid).sum(1) / valid.sum(1)
    head = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64),
                                  params["classification_head"])
    want = pooled @ head["kernel"] + head["bias"]
    got = logits(CLASSIFIER, params, batch)
    assert got.shape == (2, 1, 3)
    np.testing.assert_allclose(got[:, 0], want, rtol=1e-4, atol=1e-4)


def log_softmax64(x):
    x = np.asarray(x, np.float64)
    return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        x.max(-1, keepdims=True)


def test_the_masked_lm_loss_counts_the_chosen_positions_only(params):
    batch = packed_batch()
    rng = np.random.default_rng(1)
    batch["encoder_target_tokens"] = rng.integers(2, VOCAB, (2, 12)).astype(np.int32)
    batch["encoder_loss_weights"] = ((rng.random((2, 12)) < 0.3)
                                     & (batch["encoder_segment_ids"] > 0)).astype(np.int32)
    model = models.model_for(dataclasses.replace(CONFIG, z_loss=0.0))
    jax_batch = {k: jnp.asarray(v) for k, v in batch.items()}
    loss, sums = model.loss(mlm_params(params), jax_batch)
    log_probs = log_softmax64(logits(model, mlm_params(params), batch))
    picked = np.take_along_axis(log_probs, batch["encoder_target_tokens"][..., None], -1)[..., 0]
    chosen = batch["encoder_loss_weights"] > 0
    assert float(sums["weight"]) == chosen.sum()
    np.testing.assert_allclose(float(loss), -picked[chosen].mean(), rtol=1e-5)
    # Targets elsewhere do not matter.
    other = dict(jax_batch, encoder_target_tokens=jnp.where(
        jnp.asarray(chosen), jax_batch["encoder_target_tokens"], 3))
    assert float(model.loss(mlm_params(params), other)[0]) == float(loss)


def test_the_classifier_loss_is_the_mean_cross_entropy_of_its_real_rows(params):
    batch = packed_batch()
    batch["encoder_segment_ids"] = (batch["encoder_segment_ids"] > 0).astype(np.int32)
    batch["classification_labels"] = np.array([[2], [0]], np.int32)
    # The second row pads a last batch: no weight.
    batch["classification_weights"] = np.array([[1], [0]], np.int32)
    classifier = models.model_for(dataclasses.replace(CLASSIFIER.config, z_loss=0.0))
    jax_batch = {k: jnp.asarray(v) for k, v in batch.items()}
    loss, sums = classifier.loss(params, jax_batch)
    log_probs = log_softmax64(logits(classifier, params, batch)[:, 0])
    np.testing.assert_allclose(float(loss), -log_probs[0, 2], rtol=1e-5)
    assert float(sums["weight"]) == 1.0
    tokens, scores = classifier.predict_batch(params, jax_batch)
    np.testing.assert_array_equal(np.asarray(tokens)[:, 0], log_probs.argmax(-1))
    np.testing.assert_allclose(np.asarray(scores), log_probs.max(-1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(classifier.score_batch(params, jax_batch)),
                               [log_probs[0, 2], 0.0], rtol=1e-5, atol=1e-6)


def test_an_encoder_only_model_generates_nothing_and_reads_only_its_own_layout(params):
    batch = {key: jnp.asarray(value) for key, value in packed_batch().items()}
    with pytest.raises(ValueError, match="an encoder_only masked LM does not generate text"):
        MODEL.predict_batch(mlm_params(params), batch)
    with pytest.raises(ValueError, match="EncoderOnlyModel reads its targets from "
                                         "encoder_target_tokens and encoder_loss_weights"):
        MODEL.score_batch(mlm_params(params), {**batch, "decoder_target_tokens": batch[
            "encoder_input_tokens"], "decoder_loss_weights": batch["encoder_segment_ids"]})


def test_architecture_bindings_that_do_not_fit_are_one_line_errors():
    with pytest.raises(ValueError, match="an encoder_only model has no decoder: bind "
                                         "num_decoder_layers = 0"):
        models.T5Config(architecture="encoder_only")
    with pytest.raises(ValueError, match="num_classes = 2: a classification head .> 0. is for "
                                         "encoder_only models"):
        models.T5Config(num_classes=2)
    with pytest.raises(ValueError, match="bind architecture = 'encoder_only' for a model "
                                         "without a decoder"):
        models.T5Config(num_decoder_layers=0)


def test_presets_have_bert_base_like_parameter_counts():
    """One embedding V x D (logits through it), per layer 4 D A attention + 3 D F gated MLP +
    2 D norms, a final norm and one relative bias 32 x H; base is BERT-base's 110M."""
    counts = {}
    for preset, (d, heads, head_dim, d_ff, num_layers) in {
            "tiny": (128, 4, 32, 512, 4), "base": (768, 12, 64, 2048, 12)}.items():
        gin.clear_config()
        gin.parse_config_file(f"gin/models/encoder_only_{preset}.gin")
        config = gin.get_configurable(models.T5Config)()
        gin.clear_config()
        shapes = jax.eval_shape(models.model_for(config).init, jax.random.key(0))
        closed_form = (32128 * d + num_layers * (4 * d * heads * head_dim + 3 * d * d_ff + 2 * d)
                       + d + 32 * heads)
        assert models.count_parameters(shapes) == closed_form
        counts[preset] = closed_form
    assert counts == {"tiny": 5_162_240, "base": 109_628_544}


# --- Masking ----------------------------------------------------------------------------------

def test_bert_masking_statistics_over_thousands_of_chunks():
    """15% of the tokens chosen; of those 80% masked, 10% a random real token, 10% kept; the
    weights mark every changed position, and nothing else changes."""
    examples = apply(objectives.BertMlm(), random_documents(400, 400), {"inputs": 64})
    assert len(examples) > 2000
    inputs, targets, chosen = (np.concatenate([e[key] for e in examples])
                               for key in ("inputs", "targets", "mlm_weights"))
    chosen = chosen.astype(bool)
    assert all(len(e["inputs"]) == 63 for e in examples[:-1])
    assert abs(chosen.mean() - 0.15) <= 0.01
    masked = chosen & (inputs == MASK)
    replaced = chosen & (inputs != MASK) & (inputs != targets)
    kept = chosen & (inputs == targets)
    # A random draw equals the original 1 time in 256 (its bytes): it counts as kept.
    for part, rate in ((masked, 0.8), (replaced, 0.1 * 255 / 256), (kept, 0.1 + 0.1 / 256)):
        assert abs(part.sum() / chosen.sum() - rate) <= 0.02
    np.testing.assert_array_equal(inputs[~chosen], targets[~chosen])
    assert inputs[replaced].min() >= 3 and inputs[replaced].max() < FIRST_SENTINEL
    # Random replacements spread over the real ids.
    assert len(np.unique(inputs[replaced])) > 200


def test_random_replacements_skip_the_mode_tokens_of_a_sentencepiece_vocabulary(
        small_sentencepiece_vocab):
    """The stdlib vocabulary holds UL2's mode tokens as pieces of their own: never drawn."""
    vocabulary = small_sentencepiece_vocab
    mode_ids = [vocabulary.encode(token) for token in vocab.MODE_TOKENS]
    assert all(len(ids) == 1 for ids in mode_ids)
    drawn = set(preprocessors.replacement_ids(vocabulary))
    real = set(range(3, vocabulary.vocab_size - vocabulary.extra_ids))
    assert drawn == real - {ids[0] for ids in mode_ids}
    assert vocabulary.encode("\n")[0] in drawn


def test_packed_masked_lm_rows_keep_each_examples_weights(tmp_path):
    """Packing short documents: every changed token weighs 1, each example's weights count
    round(0.15 n) of its n tokens, and EOS and padding weigh 0."""
    path = tmp_path / "short.txt"
    path.write_text("\n".join(f"{s} {i}" for i in range(40) for s in SENTENCES[:2]) + "\n")
    name = tasks.register_text_task(
        "encoder_only_short_mlm", [str(path)], objectives.BertMlm(concatenate_documents=False),
        vocabulary=vocab.byte_vocabulary())
    batch = next(pipeline.get_batches(name, "train", {"inputs": 128}, 8, shuffle=False, seed=0,
                                      repeat=False, encoder_only=True))
    assert set(batch) == set(pipeline.ENCODER_ONLY_KEYS)
    inputs, targets, weights, segments = (batch[key] for key in (
        "encoder_input_tokens", "encoder_target_tokens", "encoder_loss_weights",
        "encoder_segment_ids"))
    assert segments.max() >= 2  # Several examples per row.
    assert np.all(weights[inputs != targets] == 1)
    assert np.all(weights[(segments == 0) | (targets == 1)] == 0)
    for row in range(8):
        for segment in range(1, segments[row].max() + 1):
            tokens = int(np.sum(segments[row] == segment)) - 1  # EOS not counted.
            assert weights[row][segments[row] == segment].sum() == max(round(0.15 * tokens), 1)


# --- Classification tasks ---------------------------------------------------------------------

def write_classification_files(directory) -> tuple[str, str]:
    """Each sentence labelled with its index: train JSONL, validation TSV."""
    train_file, validation_file = directory / "train.jsonl", directory / "validation.tsv"
    train_file.write_text("".join(json.dumps({"inputs": s, "label": i}) + "\n"
                                  for _ in range(25) for i, s in enumerate(SENTENCES)))
    validation_file.write_text("".join(f"{s}\t{i}\n" for i, s in enumerate(SENTENCES)))
    return str(train_file), str(validation_file)


def register_classification(directory) -> str:
    train_file, validation_file = write_classification_files(directory)
    return tasks.register_text_task("encoder_only_sentences", [train_file], "classification",
                                    vocab.byte_vocabulary(), validation_files=[validation_file],
                                    num_classes=4)


def test_classification_rows_are_one_example_each_with_its_label(tmp_path):
    name = register_classification(tmp_path)
    assert tasks.num_classes(name) == 4 and not tasks.is_masked_lm(name)
    batch = next(pipeline.get_batches(name, "validation", {"inputs": 64, "targets": 8}, 6,
                                      shuffle=False, seed=0, repeat=False, encoder_only=True))
    assert set(batch) == set(pipeline.CLASSIFICATION_KEYS)
    np.testing.assert_array_equal(batch["classification_labels"][:, 0], [0, 1, 2, 3, 0, 0])
    np.testing.assert_array_equal(batch["classification_weights"][:, 0], [1, 1, 1, 1, 0, 0])
    byte_vocabulary = vocab.byte_vocabulary()
    for row, sentence in enumerate(SENTENCES):
        ids = list(byte_vocabulary.encode(sentence)) + [1]
        np.testing.assert_array_equal(batch["encoder_input_tokens"][row, :len(ids)], ids)
        assert batch["encoder_segment_ids"][row].sum() == len(ids)


def test_a_label_outside_the_classes_names_the_file_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "a", "y": 1}) + "\n" + json.dumps({"text": "b", "y": 4})
                    + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: y 4 is outside the 4 classes: use 0 to "
                                         r"3, or register the task with num_classes > 4"):
        tasks.register_text_task("encoder_only_bad", [str(path)], "classification",
                                 input_field="text", label_field="y", num_classes=4)
    with pytest.raises(ValueError, match="needs num_classes"):
        tasks.register_text_task("encoder_only_bad", [str(path)], "classification")


def test_the_stdlib_choice_classification_label_points_at_the_functions_docstring():
    summaries = dict(corpora._stdlib_summaries("validation"))
    source = tasks.get_task_or_mixture("stdlib_docstring_choice_classification").source
    examples = list(source.get_dataset("validation", shuffle=False).as_numpy_iterator())
    assert len(examples) == len(corpora._stdlib_summaries("validation"))
    for example in examples:
        text = example["inputs"].decode()
        choice_lines, _, question = text.partition("\nquestion:\n")
        choices = [line.split(": ", 1)[1] for line in choice_lines.split("\n")]
        assert [line.split(": ")[0] for line in choice_lines.split("\n")] == [
            f"choice {i}" for i in range(4)]
        assert choices[example["label"]] == summaries[question]
    assert len({int(e["label"]) for e in examples}) == 4


def test_the_families_refuse_each_others_tasks():
    with pytest.raises(ValueError, match="has targets to generate, which an encoder_only model "
                                         "cannot"):
        pipeline.get_dataset("stdlib_span_corruption", "train", {"inputs": 64, "targets": 16},
                             2, shuffle=False, seed=0, repeat=True, encoder_only=True)
    with pytest.raises(ValueError, match="'stdlib_bert_mlm' is a masked-LM task, for "
                                         "encoder_only models"):
        pipeline.get_dataset("stdlib_bert_mlm", "train", {"inputs": 64, "targets": 64}, 2,
                             shuffle=False, seed=0, repeat=True)
    with pytest.raises(ValueError, match=r"an encoder_only model's rows are "
                                         r"TASK_FEATURE_LENGTHS\['inputs'\] tokens, which "
                                         r"\{'targets': 64\} lacks"):
        pipeline.get_dataset("stdlib_bert_mlm", "train", {"targets": 64}, 2, shuffle=False,
                             seed=0, repeat=True, encoder_only=True)


# --- End to end -------------------------------------------------------------------------------

def bindings(model_dir, task: str, train_steps: int) -> list[str]:
    return decoder_only_train_test.bindings(model_dir, task, {"inputs": 64}, train_steps)


def run_in_process(entry_point, gin_files: list[str], bound: list[str]):
    return decoder_only_train_test.run_in_process(entry_point, gin_files, bound,
                                                  "models/encoder_only_tiny.gin")


@pytest.fixture(scope="module")
def masked_lm_runs(tmp_path_factory):
    """A masked LM trained 20 steps at once, and 10 + 10 (stopped, then resumed)."""
    directory = tmp_path_factory.mktemp("masked_lm")
    train_file, validation_file = directory / "train.txt", directory / "validation.txt"
    train_file.write_text("\n".join(SENTENCES * 50) + "\n")
    validation_file.write_text("\n".join(SENTENCES) + "\n")
    task = tasks.register_text_task("encoder_only_bert_mlm", [str(train_file)],
                                    objectives.BertMlm(), vocab.byte_vocabulary(),
                                    validation_files=[str(validation_file)])
    for model_dir, stops in ((directory / "whole", [20]), (directory / "halved", [10, 20])):
        for train_steps in stops:
            run_in_process(train.run, ["runs/pretrain.gin"],
                           bindings(model_dir, task, train_steps))
    return directory


def test_masked_lm_trains_and_resumes_bit_identically(masked_lm_runs):
    whole, halved = (metric_rows(masked_lm_runs / name, "train") for name in ("whole", "halved"))
    assert [row["step"] for row in whole] == [5, 10, 15, 20]
    assert [row["loss"] for row in halved] == [row["loss"] for row in whole]
    assert whole[-1]["loss"] < whole[0]["loss"] - 1.0
    validation = [metric_rows(masked_lm_runs / name, "validation") for name in ("whole", "halved")]
    assert validation[0] == validation[1] and validation[0][-1]["step"] == 20
    assert validation[0][0]["loss"] > validation[0][-1]["loss"]


def restored_params(model_dir, **overrides):
    config = dataclasses.replace(gin_config(), **overrides)
    mesh = partitioning.create_mesh(partitioning.MeshConfig())
    return warm_start.restore_model(config, str(model_dir), mesh,
                                    partitioning.MeshConfig().rules)


def gin_config(**bindings) -> models.T5Config:
    launch.parse_gin(["models/encoder_only_tiny.gin"], ["models.T5Config.vocab_size = 384"])
    try:
        return dataclasses.replace(gin.get_configurable(models.T5Config)(), **bindings)
    finally:
        gin.clear_config()


def test_a_classifier_starts_from_the_masked_lm_with_a_fresh_head(masked_lm_runs):
    config = gin_config(num_classes=4)
    trainer = trainer_lib.build_trainer(config, 1e-3, optimizers.adafactor,
                                        partitioning.MeshConfig(), seed=0)
    state = warm_start.pretrained_state(trainer, str(masked_lm_runs / "whole"), seed=5)
    _, _, masked_lm = restored_params(masked_lm_runs / "whole")
    assert int(state.step) == 0
    params = jax.device_get(state.params)
    head = params.pop("classification_head")
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, jax.device_get(masked_lm))
    fresh = models.model_for(config).init(jax.random.key(5))["classification_head"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, head, jax.device_get(fresh))


def test_fine_tuned_classifier_accuracy_is_the_argmax_of_its_head(masked_lm_runs, tmp_path):
    task = register_classification(tmp_path)
    model_dir = tmp_path / "classifier"
    bound = bindings(model_dir, task, 10) + [
        f"INIT_FROM = '{masked_lm_runs / 'whole'}'", "models.T5Config.num_classes = 4",
        "METRICS_PERIOD = 10"]
    run_in_process(train.run, ["runs/finetune.gin"], bound)
    rows = metric_rows(model_dir, "validation")
    assert [row["step"] for row in rows if "target_tokens" in row] == [0, 10]
    values = run_in_process(eval_lib.run, ["runs/eval.gin"], [
        f"MODEL_DIR = '{model_dir}'", "models.T5Config.vocab_size = 384",
        "models.T5Config.num_classes = 4", "NUM_INFILLINGS = 0"])
    model, _, params = restored_params(model_dir, num_classes=4)
    tokens = np.zeros((4, 64), np.int32)
    for row, sentence in enumerate(SENTENCES):
        ids = list(vocab.byte_vocabulary().encode(sentence)) + [1]
        tokens[row, :len(ids)] = ids
    picked = np.asarray(model.logits(params, {"encoder_input_tokens": jnp.asarray(tokens)})
                        )[:, 0].argmax(-1)
    assert values["accuracy"] == pytest.approx(100 * np.mean(picked == np.arange(4)))
    assert values["target_tokens"] == 4  # Rows: one label each.


def test_an_encoder_only_model_on_a_generation_task_is_one_line():
    line = error_line(run_train_command(
        "--gin_file=gin/models/encoder_only_tiny.gin", "--gin_file=gin/runs/pretrain.gin",
        "--gin.MODEL_DIR='/tmp/never'", "--gin.TRAIN_STEPS=1",
        "--gin.MIXTURE_OR_TASK_NAME='stdlib_span_corruption'"))
    assert ("task 'stdlib_span_corruption' has targets to generate, which an encoder_only "
            "masked LM cannot train on") in line


def test_a_classification_label_outside_the_head_is_one_line():
    line = error_line(run_train_command(
        "--gin_file=gin/models/encoder_only_tiny.gin", "--gin_file=gin/runs/pretrain.gin",
        "--gin.MODEL_DIR='/tmp/never'", "--gin.TRAIN_STEPS=1",
        "--gin.MIXTURE_OR_TASK_NAME='stdlib_docstring_choice_classification'",
        "--gin.models.T5Config.num_classes=3"))
    assert ("has 4 classes (labels 0 to 3), but the model's head has models.T5Config."
            "num_classes = 3: label 3 is outside the head; bind "
            "models.T5Config.num_classes = 4") in line
