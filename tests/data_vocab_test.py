"""Vocabularies: T5 sentinel ids, lossless round trips on source code, and SentencePiece
training that is lazy, cached and reproducible byte for byte."""
import os

import pytest
import tensorflow as tf

from t5x_lite.data import corpora
from t5x_lite.data import vocab

SNIPPETS = [
    "import os\n\n\nclass Reader:\n    def read(self, path):\n        return open(path).read()\n",
    "\tif x == 0x1F:  # tab-indented, trailing spaces   \r\n\t\treturn [1, 22, 333]\n\n",
    "s = 'naïve café — 中文 🙂'\nprint(f\"{s!r:>10}\")\n",
    "    \n  \n\n",
]


def test_sentinels_count_down_from_the_top_id(small_sentencepiece_vocab):
    vocabulary = small_sentencepiece_vocab
    assert vocabulary.vocab_size == 1000 + 100
    assert vocabulary.tokenizer.id_to_piece(vocabulary.vocab_size - 1) == "▁<extra_id_0>"
    assert vocabulary.tokenizer.id_to_piece(vocabulary.vocab_size - 100) == "▁<extra_id_99>"
    assert (vocabulary.pad_id, vocabulary.eos_id, vocabulary.unk_id) == (0, 1, 2)
    assert vocabulary.tokenizer.bos_id() == -1


def test_byte_vocabulary_round_trips_and_ends_with_sentinels():
    vocabulary = vocab.byte_vocabulary()
    assert vocabulary.vocab_size == 3 + 256 + 100
    for snippet in SNIPPETS:
        ids = vocabulary.encode(snippet)
        assert len(ids) == len(snippet.encode("utf-8"))
        assert max(ids) < vocabulary.vocab_size - 100
        assert vocabulary.decode(ids) == snippet


def test_sentencepiece_round_trips_code_exactly(small_sentencepiece_vocab):
    vocabulary = small_sentencepiece_vocab
    texts = list(SNIPPETS)
    for path in corpora.stdlib_files("validation")[:4]:
        with open(path, encoding="utf-8") as f:
            texts.append(f.read())
    for text in texts:
        ids = vocabulary.encode(text)
        assert vocabulary.unk_id not in ids
        assert vocabulary.decode(ids) == text
        tf_ids = vocabulary.encode_tf(tf.constant(text))
        assert vocabulary.decode_tf(tf_ids).numpy().decode("utf-8") == text
    # Newlines and indentation are pieces of their own, not bytes.
    pieces = vocabulary.tokenizer.encode_as_pieces(SNIPPETS[0])
    assert "\n" in pieces and "▁▁▁▁" in pieces


def test_training_is_lazy_cached_and_reproducible(tmp_path, monkeypatch):
    models = []
    for run in ("first", "second"):
        cache_dir = tmp_path / run
        monkeypatch.setenv(vocab.CACHE_ENV_VAR, str(cache_dir))
        vocabulary = vocab.sentencepiece_vocabulary(vocab_size=512, max_training_bytes=200_000)
        assert not cache_dir.exists()  # Constructing trains nothing.
        assert vocabulary.vocab_size == 612
        path = vocabulary.sentencepiece_model_file
        assert os.path.dirname(path) == str(cache_dir) and "sp512_" in os.path.basename(path)
        assert os.listdir(cache_dir) == [os.path.basename(path)]  # No partial files left.
        with open(path, "rb") as f:
            models.append(f.read())
        modified = os.stat(path).st_mtime_ns
        reused = vocab.sentencepiece_vocabulary(vocab_size=512, max_training_bytes=200_000)
        assert reused.sentencepiece_model_file == path and reused.vocab_size == 612
        assert os.stat(path).st_mtime_ns == modified
    assert models[0] == models[1]


def test_training_settings_change_the_cache_file(tmp_path, monkeypatch):
    monkeypatch.setenv(vocab.CACHE_ENV_VAR, str(tmp_path))
    paths = {vocab.sentencepiece_vocabulary(vocab_size=size, max_training_bytes=cap)
             .sentencepiece_model_file for size, cap in [(512, None), (1024, None), (512, 10**5)]}
    assert len(paths) == 3
    assert not os.listdir(tmp_path)


def test_existing_model_path_is_loaded(small_sentencepiece_vocab):
    loaded = vocab.sentencepiece_vocabulary(small_sentencepiece_vocab.sentencepiece_model_file)
    assert loaded.vocab_size == small_sentencepiece_vocab.vocab_size
    assert loaded.encode(SNIPPETS[0]) == small_sentencepiece_vocab.encode(SNIPPETS[0])


def test_missing_model_path_names_the_fix(tmp_path):
    missing = tmp_path / "nope.model"
    message = (f"SentencePiece model {missing} does not exist: pass an existing .model file or "
               "leave model_path unset to train one on the embedded corpus")
    with pytest.raises(FileNotFoundError) as error:
        vocab.sentencepiece_vocabulary(str(missing))
    assert str(error.value) == message


def test_too_small_vocab_size_is_rejected_at_construction():
    with pytest.raises(ValueError, match="vocab_size must be >= 512"):
        vocab.sentencepiece_vocabulary(vocab_size=300)
