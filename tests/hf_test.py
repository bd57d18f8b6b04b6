"""Hugging Face interop against `transformers` (PyTorch, CPU) on randomly initialised models
saved locally: logits, greedy and beam decoding, the save/load round trip, and bad input."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from t5x_lite import hf
from t5x_lite import models
from t5x_lite import moe


VOCAB = 97
# T5 v1.0 (ReLU, tied embeddings) and v1.1 (gated-GELU, own lm_head), with head counts,
# head widths and relative-position buckets unlike any preset's.
CONFIGS = {
    "v1_0": dict(feed_forward_proj="relu", tie_word_embeddings=True, num_heads=5, d_kv=12,
                 relative_attention_num_buckets=12, relative_attention_max_distance=20),
    "v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_heads=3,
                 d_kv=16, relative_attention_num_buckets=8,
                 relative_attention_max_distance=16),
}


def untie_head(model, seed: int):
    """transformers 5 ties lm_head to the embedding whatever the config says; v1.1
    checkpoints have their own, so give the model one by hand."""
    generator = torch.Generator().manual_seed(seed)
    model.lm_head.weight = torch.nn.Parameter(
        torch.randn(model.lm_head.weight.shape, generator=generator))
    model.config.tie_word_embeddings = False


def random_hf_model(name: str, seed: int = 0):
    """A transformers T5 whose weights are all random normal (std 0.3, large enough that
    greedy decoding does not collapse to one token)."""
    torch.manual_seed(seed)
    config = transformers.T5Config(vocab_size=VOCAB, d_model=48, d_ff=80, num_layers=3,
                                   num_decoder_layers=2, dropout_rate=0.0,
                                   decoder_start_token_id=0, **CONFIGS[name])
    model = transformers.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    if not CONFIGS[name]["tie_word_embeddings"]:
        untie_head(model, seed + 1)
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def saved(request, tmp_path_factory):
    """(name, transformers model, its save_pretrained directory)."""
    model = random_hf_model(request.param)
    directory = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(directory)
    return request.param, model, directory


def inputs(batch: int = 3, length: int = 11, seed: int = 0) -> np.ndarray:
    """Encoder tokens [B, L] with padding at the end of row 1."""
    tokens = np.random.default_rng(seed).integers(2, VOCAB, (batch, length))
    tokens[1, 7:] = 0
    return tokens


def hf_logits(model, encoder_tokens: np.ndarray, decoder_tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(encoder_tokens),
                     attention_mask=torch.tensor(encoder_tokens > 0),
                     decoder_input_ids=torch.tensor(decoder_tokens)).logits.numpy()


def our_logits(model, params, encoder_tokens: np.ndarray, decoder_tokens: np.ndarray):
    return np.asarray(model.logits(params, {
        "encoder_input_tokens": jnp.asarray(encoder_tokens, jnp.int32),
        "decoder_input_tokens": jnp.asarray(decoder_tokens, jnp.int32)}))


def assert_logits_close(ours: np.ndarray, theirs: np.ndarray) -> None:
    """Within 1e-4 of the logits' scale (float32 sums in a different order)."""
    scale = np.max(np.abs(theirs))
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * scale)


def decoder_inputs(seed: int = 1) -> np.ndarray:
    tokens = np.random.default_rng(seed).integers(2, VOCAB, (3, 6))
    tokens[:, 0] = 0
    return tokens


def test_load_t5_reads_the_config(saved):
    name, hf_model, directory = saved
    model, _ = hf.load_t5(directory)
    expected = CONFIGS[name]
    assert model.config.num_heads == expected["num_heads"]
    assert model.config.head_dim == expected["d_kv"]
    assert model.config.relative_attention_num_buckets == (
        expected["relative_attention_num_buckets"])
    assert model.config.tie_embeddings == (name == "v1_0")
    assert model.config.gated_mlp == (name == "v1_1")
    assert (model.config.num_encoder_layers, model.config.num_decoder_layers) == (3, 2)


def test_logits_match_transformers(saved):
    _, hf_model, directory = saved
    model, params = hf.load_t5(directory)
    encoder_tokens, decoder_tokens = inputs(), decoder_inputs()
    assert_logits_close(our_logits(model, params, encoder_tokens, decoder_tokens),
                        hf_logits(hf_model, encoder_tokens, decoder_tokens))


def hf_generate(model, encoder_tokens: np.ndarray, length: int, eos_id: int = 1, **options
                ) -> np.ndarray:
    """transformers' generated tokens without the start token, zero-padded to `length`."""
    with torch.no_grad():
        output = model.generate(input_ids=torch.tensor(encoder_tokens),
                                attention_mask=torch.tensor(encoder_tokens > 0),
                                max_new_tokens=length, pad_token_id=0, eos_token_id=eos_id,
                                **options).numpy()[:, 1:]
    # After EOS transformers pads beams with the pad id or repeats EOS; t5x_lite writes 0.
    after_eos = np.cumsum(output == eos_id, axis=1) - (output == eos_id) > 0
    output = np.where(after_eos, 0, output)
    return np.pad(output, ((0, 0), (0, length - output.shape[1])))


def test_greedy_matches_generate(saved):
    _, hf_model, directory = saved
    model, params = hf.load_t5(directory)
    encoder_tokens = inputs(batch=4, seed=3)
    tokens, _ = model.predict_batch(params, {"encoder_input_tokens": jnp.asarray(
        encoder_tokens, jnp.int32)}, max_decode_length=12, method="greedy")
    expected = hf_generate(hf_model, encoder_tokens, 12, do_sample=False, num_beams=1)
    np.testing.assert_array_equal(np.asarray(tokens), expected)
    assert len(set(expected.ravel().tolist())) > 5  # a real sequence, not one repeated token


def test_beam_search_matches_generate_without_eos(saved, tmp_path):
    """The settings where the two beam searches coincide: EOS never wins a place among the
    2k candidates, so every hypothesis runs to the length limit and both rank by summed
    log-probability (any length penalty divides all of them by the same number). With EOS
    in play they differ by design: T5X, and t5x_lite, let an EOS candidate ranked k+1..2k
    finish a hypothesis, where transformers drops it."""
    _, hf_model, directory = saved
    model, params = hf.load_t5(directory)
    encoder_tokens = inputs(batch=4, seed=5)
    no_eos = VOCAB + 1  # an id no logit can produce
    tokens, _ = model.predict_batch(params, {"encoder_input_tokens": jnp.asarray(
        encoder_tokens, jnp.int32)}, max_decode_length=8, method="beam", eos_id=no_eos,
        beam_size=4, alpha=0.6)
    expected = hf_generate(hf_model, encoder_tokens, 8, eos_id=no_eos, do_sample=False,
                           num_beams=4, length_penalty=0.6)
    greedy = hf_generate(hf_model, encoder_tokens, 8, eos_id=no_eos, do_sample=False)
    assert np.any(expected != greedy)  # the beams found something greedy did not
    np.testing.assert_array_equal(np.asarray(tokens), expected)


def test_save_t5_round_trip(saved, tmp_path):
    name, _, directory = saved
    model, params = hf.load_t5(directory)
    out = str(tmp_path / "exported")
    hf.save_t5(model, params, out)
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
    if name == "v1_1":
        with open(os.path.join(out, "config.json")) as f:
            assert json.load(f)["tie_word_embeddings"] is False
        from safetensors.numpy import load_file
        head = load_file(os.path.join(out, "model.safetensors"))["lm_head.weight"]
        reloaded.lm_head.weight = torch.nn.Parameter(torch.tensor(head))
    encoder_tokens, decoder_tokens = inputs(seed=7), decoder_inputs(seed=8)
    assert_logits_close(hf_logits(reloaded, encoder_tokens, decoder_tokens),
                        our_logits(model, params, encoder_tokens, decoder_tokens))
    _, params_again = hf.load_t5(out)
    flat, flat_again = traverse_util.flatten_dict(params), traverse_util.flatten_dict(params_again)
    assert flat.keys() == flat_again.keys()
    for path in flat:
        np.testing.assert_array_equal(flat_again[path], flat[path], err_msg=str(path))


def test_save_t5_of_a_trained_model_loads_in_transformers(tmp_path):
    """A t5x_lite-initialised v1.1 model (not one that came from transformers)."""
    config = models.T5Config(vocab_size=64, d_model=32, num_heads=2, head_dim=8, d_ff=48,
                             num_encoder_layers=2, num_decoder_layers=3, dropout_rate=0.0)
    model = models.EncoderDecoderModel(config)
    import jax
    params = model.init(jax.random.key(0))
    hf.save_t5(model, params, str(tmp_path / "out"))
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(
        str(tmp_path / "out")).eval()
    untie_head(reloaded, 0)
    reloaded.lm_head.weight = torch.nn.Parameter(torch.tensor(
        np.asarray(params["logits_dense"]["kernel"]).T.copy()))
    encoder_tokens = np.random.default_rng(0).integers(2, 64, (2, 9))
    decoder_tokens = np.random.default_rng(1).integers(2, 64, (2, 5))
    assert_logits_close(our_logits(model, params, encoder_tokens, decoder_tokens),
                        hf_logits(reloaded, encoder_tokens, decoder_tokens))


# --- bad input: one clear error, nothing half-written --------------------------------------

def write_config(directory, **fields) -> str:
    os.makedirs(directory, exist_ok=True)
    config = {"model_type": "t5", "vocab_size": 32, "d_model": 8, "d_kv": 4, "num_heads": 2,
              "d_ff": 16, "num_layers": 1, **fields}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return str(directory)


def test_unsupported_architecture(tmp_path):
    directory = write_config(tmp_path, model_type="bart")
    with pytest.raises(hf.HFFormatError, match="model_type 'bart' is not supported"):
        hf.load_t5(directory)


def test_unsupported_activation(tmp_path):
    directory = write_config(tmp_path, feed_forward_proj="gated-silu")
    with pytest.raises(hf.HFFormatError, match="feed_forward_proj 'gated-silu'"):
        hf.load_t5(directory)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf.load_t5(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        hf.load_t5(str(tmp_path))
    directory = write_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        hf.load_t5(directory)


def test_pickled_weights_are_refused(tmp_path):
    directory = write_config(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(hf.HFFormatError, match="never loads: re-save it with save_pretrained"):
        hf.load_t5(directory)


def test_corrupt_safetensors(tmp_path):
    directory = write_config(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(hf.HFFormatError, match="corrupt or truncated"):
        hf.load_t5(directory)


def test_weights_of_another_shape(saved, tmp_path):
    name, _, directory = saved
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    config["d_ff"] = 64
    os.symlink(os.path.join(directory, "model.safetensors"), tmp_path / "model.safetensors")
    write_config(tmp_path, **config)
    with pytest.raises(hf.HFFormatError, match="config and weights do not match"):
        hf.load_t5(str(tmp_path))


def test_moe_models_are_not_exported(tmp_path):
    config = models.T5Config(vocab_size=32, d_model=8, num_heads=2, head_dim=4, d_ff=16,
                             num_encoder_layers=2, num_decoder_layers=2,
                             moe=moe.MoeConfig(num_experts=2))
    with pytest.raises(hf.HFFormatError, match="no Mixture-of-Experts"):
        hf.save_t5(models.EncoderDecoderModel(config), {}, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_save_t5_refuses_to_overwrite(saved, tmp_path):
    _, _, directory = saved
    model, params = hf.load_t5(directory)
    target = write_config(tmp_path / "existing")
    before = open(os.path.join(target, "config.json")).read()
    with pytest.raises(FileExistsError, match="choose an empty output directory"):
        hf.save_t5(model, params, target)
    assert open(os.path.join(target, "config.json")).read() == before


def test_transformers_5_untied_config(tmp_path):
    """transformers 5 saves a T5 built with tie_word_embeddings=False as tied (no lm_head in
    the file) but unscaled (scale_decoder_outputs false): t5x_lite loads it as an untied head
    equal to the embedding."""
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_ff=48, num_layers=2,
                                   num_heads=2, d_kv=8, dropout_rate=0.0,
                                   feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    hf_model = transformers.T5ForConditionalGeneration(config).eval()
    hf_model.save_pretrained(str(tmp_path))
    model, params = hf.load_t5(str(tmp_path))
    assert not model.config.tie_embeddings
    encoder_tokens, decoder_tokens = inputs(), decoder_inputs()
    assert_logits_close(our_logits(model, params, encoder_tokens, decoder_tokens),
                        hf_logits(hf_model, encoder_tokens, decoder_tokens))


def test_tokenizer_files_follow_the_model_normalizer(tmp_path):
    """A SentencePiece model with T5's settings (NFKC, a dummy prefix, extra whitespace
    removed, no byte fallback; t5x_lite's own: tests/convert_hf_test.py) gives the same ids
    through the exported tokenizer as through seqio."""
    import seqio
    import sentencepiece
    from t5x_lite.data import corpora
    lines = [line for path in corpora.stdlib_files("validation")[:4]
             for line in open(path, encoding="utf-8", errors="replace").read().splitlines()
             if line.strip()]
    sentencepiece.SentencePieceTrainer.Train(
        sentence_iterator=iter(lines), model_prefix=str(tmp_path / "t5"), vocab_size=300,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    sp_model = (tmp_path / "t5.model").read_bytes()
    out = tmp_path / "tokenizer"
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "t5"}')
    for name, contents in hf.tokenizer_files(sp_model, 100).items():
        (out / name).write_bytes(contents)
    vocabulary = seqio.SentencePieceVocabulary(str(tmp_path / "t5.model"), extra_ids=100)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    for text in ["  def  f(x):\n\treturn  x ", "ＦＵＬＬ width ﬁ", "▁x", "   ", "",
                 "a <extra_id_0> b <extra_id_99>", "naïve — 日本"]:
        ids = list(vocabulary.encode(text)) + [1]
        assert tokenizer(text).input_ids == ids, text
        if 2 not in ids:  # SentencePiece decodes <unk> as " ⁇ ", transformers drops it
            assert tokenizer.decode(ids, skip_special_tokens=True) == vocabulary.decode(ids)
