"""Test-wide settings: strict rank promotion (STYLE.md) and quiet TensorFlow."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The suite runs on the CPU; with libtpu installed (the aot extra, for precompile's tests)
# JAX would otherwise try to start a TPU in every process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite is mostly compilation, which the entry points' single malloc arena slows by about
# 40% (docs/performance.md): glibc as it comes here and in the processes tests start, but
# in tests/host_memory_test.py. Set before anything imports t5x_lite.
os.environ.setdefault("T5X_LITE_SYSTEM_MALLOC", "1")
# One JAX compilation cache for the session and the processes its tests start: many tests
# build the same tiny models, and each would otherwise compile the same steps again.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="t5x_lite_jax_cache_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def small_sentencepiece_vocab(tmp_path_factory):
    """A 1000-piece (+100 sentinel) SentencePiece vocabulary trained once per session on ~300 KB
    of the stdlib corpus (about 1 s), in a temporary cache directory."""
    from t5x_lite.data import vocab

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(vocab.CACHE_ENV_VAR, str(tmp_path_factory.mktemp("sentencepiece")))
        vocabulary = vocab.sentencepiece_vocabulary(vocab_size=1000, max_training_bytes=300_000)
    vocabulary.load_model()
    return vocabulary


@pytest.fixture(scope="session")
def rebuild_from_span_corruption():
    """Returns rebuild(inputs, targets, vocab_size) -> list[int]: the original tokens, with each
    sentinel in `inputs` replaced by the tokens that follow the same sentinel in `targets`."""

    def rebuild(inputs, targets, vocab_size: int) -> list[int]:
        first_sentinel = vocab_size - 100  # DEFAULT_EXTRA_IDS sentinels end the vocabulary.
        spans, current = {}, None
        for token in targets:
            if token >= first_sentinel:
                current = spans.setdefault(int(token), [])
            else:
                current.append(int(token))
        rebuilt = []
        for token in inputs:
            rebuilt.extend(spans[int(token)] if token >= first_sentinel else [int(token)])
        return rebuilt

    return rebuild


@pytest.fixture(scope="session")
def trained_tiny_dir(tmp_path_factory):
    """A MODEL_DIR holding a 10-step checkpoint of t5_1_1_tiny (vocabulary 384) trained on
    train_test's byte-level task, shared by the tests that restore a trained model."""
    from tests import train_test

    train_test.register_sentences_task(tmp_path_factory.mktemp("sentences"))
    model_dir = tmp_path_factory.mktemp("trained_tiny")
    train_test.train_in_process(model_dir, 10)
    return model_dir
