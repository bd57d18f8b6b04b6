"""scripts/convert_hf.py: a trained MODEL_DIR to a directory transformers loads (the same
logits, and a tokenizer giving the vocabulary's ids), and back to a MODEL_DIR holding the same
parameters and vocabulary; bad input is one line."""
import difflib
import importlib.util
import os
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers
from flax import traverse_util

from t5x_lite import checkpoints
from t5x_lite import hf
from t5x_lite import launch
from t5x_lite import models
from t5x_lite.data import corpora
from t5x_lite.data import tasks
from tests.finetune_test import newest_params


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "convert_hf.py")
_spec = importlib.util.spec_from_file_location("convert_hf", SCRIPT)
convert_hf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_hf)


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


def test_round_trip_through_transformers(trained_tiny_dir, tmp_path):
    exported, imported = tmp_path / "hf", tmp_path / "imported"
    # The architecture comes from the run's own MODEL_DIR/config.gin.
    convert_hf.main(["to-hf", "--model_dir", str(trained_tiny_dir), "--out", str(exported)])
    config = convert_hf.model_config_from_gin([os.path.join(trained_tiny_dir, "config.gin")])
    model = models.EncoderDecoderModel(config)
    step, params = newest_params(trained_tiny_dir)
    assert step == 10

    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(str(exported)).eval()
    reloaded.lm_head.weight = torch.nn.Parameter(torch.tensor(
        np.asarray(params["logits_dense"]["kernel"]).T.copy()))  # transformers 5 ties it
    encoder_tokens = np.random.default_rng(0).integers(3, 300, (2, 12))
    decoder_tokens = np.random.default_rng(1).integers(3, 300, (2, 5))
    decoder_tokens[:, 0] = 0
    with torch.no_grad():
        theirs = reloaded(input_ids=torch.tensor(encoder_tokens),
                          decoder_input_ids=torch.tensor(decoder_tokens)).logits.numpy()
    ours = np.asarray(model.logits(params, {
        "encoder_input_tokens": jnp.asarray(encoder_tokens, jnp.int32),
        "decoder_input_tokens": jnp.asarray(decoder_tokens, jnp.int32)}))
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())

    convert_hf.main(["from-hf", "--hf_dir", str(exported), "--model_dir", str(imported)])
    step, params_again = newest_params(imported)
    assert step == 0
    flat, flat_again = traverse_util.flatten_dict(params), traverse_util.flatten_dict(params_again)
    assert flat.keys() == flat_again.keys()
    for path in flat:
        np.testing.assert_array_equal(np.asarray(flat_again[path]), np.asarray(flat[path]))
    imported_config = convert_hf.model_config_from_gin([str(imported / "model.gin")])
    for field in ("d_model", "num_heads", "head_dim", "d_ff", "num_encoder_layers",
                  "num_decoder_layers", "gated_mlp", "tie_embeddings", "vocab_size"):
        assert getattr(imported_config, field) == getattr(config, field), field
    assert hf.activation_name(imported_config.activation) == "gelu_new"


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    result = run_script("to-hf", "--model_dir", str(tmp_path / "missing"), "--out", str(out))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'missing' / 'config.gin'} does not exist: pass the run's model "
        "gin file with --gin_file")
    assert not out.exists()


def test_from_hf_refuses_pickles_and_existing_checkpoints(trained_tiny_dir, tmp_path, capsys):
    hf_dir = tmp_path / "pickled"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text('{"model_type": "t5"}')
    (hf_dir / "pytorch_model.bin").write_bytes(b"\x80\x04 not unpickled")
    with pytest.raises(SystemExit) as exit_info:
        convert_hf.main(["from-hf", "--hf_dir", str(hf_dir), "--model_dir",
                         str(tmp_path / "new")])
    assert exit_info.value.code == 2
    assert "only pickled or framework weights, which t5x_lite never loads" in (
        capsys.readouterr().err)
    assert not (tmp_path / "new").exists()
    before = sorted(os.listdir(trained_tiny_dir / "checkpoints"))
    with pytest.raises(SystemExit):
        convert_hf.main(["from-hf", "--hf_dir", str(hf_dir), "--model_dir",
                         str(trained_tiny_dir)])
    assert "already holds checkpoints: choose a new MODEL_DIR" in capsys.readouterr().err
    assert sorted(os.listdir(trained_tiny_dir / "checkpoints")) == before


# Texts the exported tokenizer must encode to the vocabulary's ids and decode back: code with
# indentation (spaces, tabs) and blank lines, leading and trailing spaces, digits, characters
# the model lacks (byte fallback), the UL2 mode tokens, sentinels after a space (seqio's pieces
# "▁<extra_id_N>") and not after one (plain characters then), special pieces' names as text.
TOKENIZER_TEXTS = [
    "def f(x):\n    return x + 1\n",
    "class A:\n\tdef __init__(self):\n\t\tself.x = [1, 2, 3]  # comment\n\n\n",
    "   leading and trailing spaces   ",
    "if x:\r\n        y = 0x7fff * 3.14159e-10\r\n",
    "naïve café — 日本語 😀 Ω≈√ \x00\x7f",
    "[NLU] a mode token, [S2S]x[NLG]",
    "span <extra_id_0> and <extra_id_1>\n <extra_id_99>.",
    "<extra_id_0> at the start, x<extra_id_5>, two  <extra_id_7>",
    "</s> <pad> <unk> <0x41> as text",
    "",
]


def tiny_run(model_dir, spm_path: str) -> None:
    """A MODEL_DIR as training leaves it (a checkpoint and config.gin, here at step 0) for a
    tiny model whose task is registered from gin with the SentencePiece model `spm_path`."""
    config = models.T5Config(vocab_size=1152, d_model=16, num_heads=2, head_dim=8, d_ff=32,
                             num_encoder_layers=1, num_decoder_layers=1)
    params = models.EncoderDecoderModel(config).init(jax.random.key(0))
    manager = checkpoints.create_manager(str(model_dir))
    manager.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
    manager.wait_until_finished()
    (model_dir / "config.gin").write_text(convert_hf.gin_of(config) + f"""
from t5x_lite.data import tasks
from t5x_lite.data import vocab
MIXTURE_OR_TASK_NAME = @tasks.register_task()
tasks.register_task.name = 'convert_hf_test_sentencepiece'
tasks.register_task.vocabulary = @vocab.sentencepiece_vocabulary()
vocab.sentencepiece_vocabulary.model_path = {spm_path!r}
""")


def test_tokenizer_round_trip(small_sentencepiece_vocab, tmp_path, capsys):
    vocabulary = small_sentencepiece_vocab
    spm_path = vocabulary.sentencepiece_model_file
    run, exported, imported = tmp_path / "run", tmp_path / "hf", tmp_path / "imported"
    tiny_run(run, spm_path)
    convert_hf.main(["to-hf", "--model_dir", str(run), "--out", str(exported)])
    assert f"with its tokenizer ({spm_path}, 100 sentinels)" in capsys.readouterr().out
    with open(spm_path, "rb") as f:
        assert (exported / hf.SPIECE_FILE).read_bytes() == f.read()

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(exported), local_files_only=True)
    for text in TOKENIZER_TEXTS:
        ids = list(vocabulary.encode(text)) + [vocabulary.eos_id]
        assert tokenizer(text).input_ids == ids, text
        assert tokenizer.decode(ids, skip_special_tokens=True) == vocabulary.decode(ids) == text
    sentinels = "".join(f" <extra_id_{k}>" for k in range(100))
    assert tokenizer(sentinels).input_ids == [vocabulary.vocab_size - 1 - k
                                              for k in range(100)] + [vocabulary.eos_id]
    # Real code: the same ids but where two segmentations score the same (a run of one
    # repeated character: 20 spaces as 16 + 4 or 4 + 16) or, thousands of tokens in, within
    # the rounding of SentencePiece's float32 running sum; tokenizers sums in float64. About
    # 0.1% of the tokens here (1000 pieces, many whitespace runs), 0.003% of whole stdlib
    # files with the stdlib's 8000-piece vocabulary; a normalization slip would be far more.
    texts = [open(path, encoding="utf-8", errors="replace").read()[:3000]
             for path in corpora.stdlib_files("validation")]
    total = differing = 0
    for text in texts:
        ids, theirs = list(vocabulary.encode(text)) + [1], tokenizer(text).input_ids
        assert tokenizer.decode(theirs, skip_special_tokens=True) == text
        total += len(ids)
        differing += sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(
            None, ids, theirs, autojunk=False).get_opcodes() if tag != "equal")
    assert differing <= 0.01 * total

    # The import makes the tokenizer's model the vocabulary of the tasks gin registers...
    convert_hf.main(["from-hf", "--hf_dir", str(exported), "--model_dir", str(imported)])
    assert (imported / hf.SPIECE_FILE).read_bytes() == (exported / hf.SPIECE_FILE).read_bytes()
    launch.parse_gin([str(imported / "model.gin"), "objectives/span_corruption.gin"],
                     ["SOURCE = 'stdlib'",
                      "tasks.register_task.name = 'convert_hf_test_imported'"])
    try:
        task = tasks.get_task_or_mixture(launch.macro_value("MIXTURE_OR_TASK_NAME"))
    finally:
        gin.clear_config()
    imported_vocabulary = task.output_features["targets"].vocabulary
    assert imported_vocabulary.sentencepiece_model_file == str(imported / hf.SPIECE_FILE)
    assert imported_vocabulary.vocab_size == vocabulary.vocab_size
    for text in TOKENIZER_TEXTS + [sentinels]:
        assert imported_vocabulary.encode(text) == vocabulary.encode(text)
    # ... and exporting the imported run writes the same tokenizer again.
    again = tmp_path / "hf_again"
    convert_hf.main(["to-hf", "--model_dir", str(imported), "--gin_file",
                     str(imported / "model.gin"), "--out", str(again)])
    for name in (hf.SPIECE_FILE, hf.TOKENIZER_FILE, hf.TOKENIZER_CONFIG_FILE,
                 hf.SPECIAL_TOKENS_FILE):
        assert (again / name).read_bytes() == (exported / name).read_bytes(), name
