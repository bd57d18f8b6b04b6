"""Vocabularies: SentencePiece (load a given model, or train one on the embedded corpus on first
use and cache it) and bytes. Both reserve pad=0, eos=1, unk=2 and end with `extra_ids` sentinels
in T5's order: sentinel k is id `vocab_size - 1 - k`. Also the class ids of classification tasks.
"""
import hashlib
import io
import os
import platform
import sys
import tempfile
import threading
import time
from typing import Iterator, Sequence

from absl import logging
import seqio
import sentencepiece as spm
import tensorflow as tf

from t5x_lite.data import corpora

DEFAULT_EXTRA_IDS = 100
# UL2's paradigm tokens (Tay et al. 2022): single pieces of every vocabulary trained here, so a
# denoiser's mode costs one input token and can be named at fine-tuning and inference time.
MODE_TOKENS = ("[NLU]", "[NLG]", "[S2S]")
CACHE_ENV_VAR = "T5X_LITE_CACHE"
MIN_TRAINED_VOCAB_SIZE = 512
# Training chunks of this many lines keep "\n" inside the text SentencePiece sees.
_LINES_PER_TRAINING_CHUNK = 8

# Settings that make the model lossless on source code and training reproducible byte for byte:
# identity normalization and no whitespace collapsing keep indentation, "\n" and the UL2 mode
# tokens are pieces of their own, unseen characters fall back to UTF-8 bytes instead of <unk>,
# and all chunks are used in corpus order with a fixed thread count (no sampling).
_TRAINER_SETTINGS = dict(
    model_type="unigram",
    character_coverage=0.9995,
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    user_defined_symbols=["\n", *MODE_TOKENS],
    input_sentence_size=0,
    shuffle_input_sentence=False,
    max_sentence_length=1 << 16,
    num_threads=2,
    pad_id=0,
    eos_id=1,
    unk_id=2,
    bos_id=-1,
)
_training_lock = threading.Lock()


def _training_chunks(max_training_bytes: int | None) -> Iterator[str]:
    """Multi-line chunks of the stdlib train split in sorted file order.

    With `max_training_bytes`, every k-th chunk is kept (k chosen from the corpus size) so a
    capped corpus still samples every file the same way on every run.
    """
    paths = corpora.stdlib_files("train")
    stride = 1
    if max_training_bytes is not None:
        total_bytes = sum(os.path.getsize(path) for path in paths)
        stride = max(1, -(-total_bytes // max_training_bytes))
    chunk_index = 0
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines(keepends=True)
        for start in range(0, len(lines), _LINES_PER_TRAINING_CHUNK):
            if chunk_index % stride == 0:
                yield "".join(lines[start:start + _LINES_PER_TRAINING_CHUNK])
            chunk_index += 1


def train_stdlib_sentencepiece(output_path: str, vocab_size: int,
                               max_training_bytes: int | None = None) -> None:
    """Trains a unigram SentencePiece model of `vocab_size` pieces (without sentinels) on the
    stdlib train split and writes it atomically to `output_path`."""
    model = io.BytesIO()
    start = time.perf_counter()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=_training_chunks(max_training_bytes), model_writer=model,
        vocab_size=vocab_size, minloglevel=2, **_TRAINER_SETTINGS)
    logging.info("Trained a %d-piece SentencePiece model in %.1f s", vocab_size,
                 time.perf_counter() - start)
    directory = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(directory, exist_ok=True)
    # Rename a finished temp file into place so concurrent readers never see a partial model.
    fd, temp_path = tempfile.mkstemp(dir=directory, suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.getvalue())
        os.chmod(temp_path, 0o644)  # mkstemp's 0600 would hide a shared cache from other users.
        os.replace(temp_path, output_path)
    except BaseException:
        os.unlink(temp_path)
        raise


def _cached_model_path(vocab_size: int, max_training_bytes: int | None) -> str:
    """The cache file for these settings; the stdlib (hence the corpus) varies with Python."""
    settings = repr((sorted(_TRAINER_SETTINGS.items()), _LINES_PER_TRAINING_CHUNK,
                     max_training_bytes, platform.python_version(), spm.__version__))
    digest = hashlib.sha256(settings.encode("utf-8")).hexdigest()[:12]
    cache_dir = os.environ.get(CACHE_ENV_VAR) or os.path.expanduser("~/.cache/t5x_lite")
    return os.path.join(cache_dir, f"stdlib_sp{vocab_size}_{digest}.model")


class _StdlibSentencePieceVocabulary(seqio.SentencePieceVocabulary):
    """A SentencePieceVocabulary whose model file is trained on the stdlib when first needed,
    so that importing and registering tasks stays cheap."""

    def __init__(self, vocab_size: int, extra_ids: int, max_training_bytes: int | None):
        self._training_vocab_size = vocab_size
        self._max_training_bytes = max_training_bytes
        super().__init__(_cached_model_path(vocab_size, max_training_bytes), extra_ids=extra_ids)

    def _model_context(self):
        if not self._model and not os.path.exists(self.sentencepiece_model_file):
            with _training_lock:
                if not os.path.exists(self.sentencepiece_model_file):
                    # Printed, not logged: it is a one-time pause of about 30 s that a user
                    # should see explained even when library logs are silenced.
                    print(f"Training a {self._training_vocab_size}-piece SentencePiece "
                          "vocabulary on the embedded corpus (first run only) into "
                          f"{self.sentencepiece_model_file}", file=sys.stderr, flush=True)
                    train_stdlib_sentencepiece(self.sentencepiece_model_file,
                                               self._training_vocab_size,
                                               self._max_training_bytes)
        return super()._model_context()


def sentencepiece_vocabulary(model_path: str | None = None, vocab_size: int = 8000,
                             extra_ids: int = DEFAULT_EXTRA_IDS, *,
                             max_training_bytes: int | None = None
                             ) -> seqio.SentencePieceVocabulary:
    """A SentencePiece vocabulary of `vocab_size + extra_ids` ids.

    Args:
      model_path: an existing `.model` file (local or any tf.io.gfile path); `vocab_size` and
        `max_training_bytes` are then ignored. None: a model trained on the stdlib train split
        the first time the vocabulary is used, cached under $T5X_LITE_CACHE (default
        ~/.cache/t5x_lite) and reused after.
      vocab_size: pieces of the trained model, including pad/eos/unk and 256 byte pieces.
      extra_ids: sentinels appended after the model's pieces.
      max_training_bytes: train on about this many bytes of the corpus (every k-th chunk);
        None uses all of it (12 MB; 8000 pieces take about 30 s on 2 CPU cores).
    """
    if model_path is not None:
        if not tf.io.gfile.exists(model_path):
            raise FileNotFoundError(
                f"SentencePiece model {model_path} does not exist: pass an existing .model file "
                "or leave model_path unset to train one on the embedded corpus")
        vocabulary = seqio.SentencePieceVocabulary(model_path, extra_ids=extra_ids)
        try:
            vocabulary.load_model()
        except Exception as error:  # protobuf's DecodeError, SentencePiece's RuntimeError.
            raise ValueError(f"SentencePiece model {model_path} is corrupt or not a "
                             f"SentencePiece model ({type(error).__name__}): pass a .model file "
                             "written by spm_train, or leave model_path unset to train one on "
                             "the embedded corpus") from None
        return vocabulary
    if vocab_size < MIN_TRAINED_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_TRAINED_VOCAB_SIZE} to hold pad/eos/unk, "
                         f"256 byte pieces and the corpus characters, got {vocab_size}")
    return _StdlibSentencePieceVocabulary(vocab_size, extra_ids, max_training_bytes)


def byte_vocabulary(extra_ids: int = DEFAULT_EXTRA_IDS) -> seqio.ByteVocabulary:
    """UTF-8 bytes shifted by 3 (ids 3..258) followed by `extra_ids` sentinels."""
    return seqio.ByteVocabulary(extra_ids=extra_ids)


class ClassLabels(seqio.PassThroughVocabulary):
    """The targets "vocabulary" of a classification task: its class ids 0 .. num_classes - 1,
    passed through unchanged (a target is one id, the label; there is no EOS)."""

    def __init__(self, num_classes: int):
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        super().__init__(size=num_classes, eos_id=None)

    @property
    def num_classes(self) -> int:
        return self.vocab_size


def show_ids(vocabulary: seqio.Vocabulary, ids: Sequence[int]) -> str:
    """Decodes ids up to EOS (padding skipped), rendering sentinels as <extra_id_N>; mode
    tokens such as [NLU] decode as themselves."""
    ids = [int(i) for i in ids]
    if vocabulary.eos_id in ids:
        ids = ids[:ids.index(vocabulary.eos_id)]
    pieces, run = [], []
    for token in ids + [None]:
        is_sentinel = token is not None and token >= vocabulary.vocab_size - vocabulary.extra_ids
        if token is None or is_sentinel:
            if run:
                pieces.append(vocabulary.decode(run))
                run = []
            if is_sentinel:
                pieces.append(f"<extra_id_{vocabulary.vocab_size - 1 - token}>")
        elif token > 0:
            run.append(token)
    return "".join(pieces)
