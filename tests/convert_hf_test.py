"""scripts/convert_hf.py: a trained MODEL_DIR to a directory transformers loads (the same
logits), and back to a MODEL_DIR holding the same parameters; bad input is one line."""
import importlib.util
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from t5x_lite import hf
from t5x_lite import models
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
