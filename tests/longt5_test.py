"""LongT5's encoder attention (long_attention.py): local attention against full attention under
a band mask, transient-global attention against global tokens built here, both in float64
NumPy on packed rows; packed examples equal the examples alone; scan and remat change
nothing; 8 CPU devices train as 1. Hugging Face LongT5 (random small models of both kinds,
saved locally) against ours: logits, greedy decodes, export and re-import bit for bit. The
presets have transformers' parameter counts; bad settings are one-line errors."""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from t5x_lite import hf
from t5x_lite import launch
from t5x_lite import layers
from t5x_lite import long_attention
from t5x_lite import models
from t5x_lite import warm_start
from tests import hf_test
from tests import layers_test
from tests import memory_test

RADIUS, GLOBAL_BLOCK = 3, 4  # blocks of 4 tokens; one global token per 4 of a segment
BUCKETS, MAX_DISTANCE = 8, 16
LAYER = layers_test.config()  # D 16, 3 heads of 5
# Three packed rows of 23 tokens (not a whole number of blocks): segments starting inside
# blocks, one shorter than a global block (no global token), whole global blocks with
# leftover tokens (they join the segment's last block), a row of one segment, padding.
SEGMENTS = np.array([[1] * 9 + [2] * 3 + [3] * 8 + [0] * 3,
                     [1] * 23,
                     [1] * 14 + [2] * 6 + [0] * 3], np.int32)


class Attention(nn.Module):
    """An encoder layer's LongT5 attention with the biases a model shares among its layers."""

    transient_global: bool

    @nn.compact
    def __call__(self, x_BLD, segment_ids_BL):
        position = layers.RelativePositionBias(BUCKETS, MAX_DISTANCE, LAYER.num_heads, True,
                                               name="position")
        global_position = (long_attention.GlobalRelativePositionBias(
            BUCKETS, MAX_DISTANCE, LAYER.num_heads, name="global_position")
            if self.transient_global else None)
        bias = long_attention.long_attention_bias(
            segment_ids_BL, RADIUS, position, LAYER.kernels.add_position_bias, jnp.float32,
            global_position, GLOBAL_BLOCK)
        return long_attention.LongSelfAttention(LAYER, self.transient_global, name="attention")(
            x_BLD, bias, True)


def bucket(relative: int) -> int:
    return layers_test.bucket_closed_form(relative, True, BUCKETS, MAX_DISTANCE)


def numpy_global_tokens(segments_L: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
    """(segment id, block index within the segment, positions summed) of a row's global
    tokens, in row order: each segment's tokens cut into whole blocks of GLOBAL_BLOCK, the
    tokens left over added to its last block."""
    tokens = []
    for segment in dict.fromkeys(segments_L[segments_L > 0].tolist()):
        positions = np.flatnonzero(segments_L == segment)
        whole = len(positions) // GLOBAL_BLOCK
        for k in range(whole):
            stop = len(positions) if k == whole - 1 else (k + 1) * GLOBAL_BLOCK
            tokens.append((segment, k, positions[k * GLOBAL_BLOCK:stop]))
    return tokens


def numpy_attention(params, x_BLD, segments_BL, transient_global: bool) -> np.ndarray:
    """Full attention in float64 over each query's keys: those of its segment within RADIUS
    (the band), T5's relative bias; with transient_global also its segment's global tokens,
    their bias by the distance between the query's block and theirs."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    attention, table_RH = p["attention"], p["position"]["rel_embedding"]
    project = lambda x, name: np.einsum("ld,dhk->lhk", x, attention[name]["kernel"])  # noqa
    out = np.zeros(x_BLD.shape)
    for b, (x_LD, segments_L) in enumerate(zip(x_BLD.astype(np.float64), segments_BL)):
        q_LHK, k_LHK, v_LHK = (project(x_LD, name) for name in ("query", "key", "value"))
        globals_ = numpy_global_tokens(segments_L) if transient_global else []
        if globals_:
            sums = np.stack([x_LD[members].sum(0) for _, _, members in globals_])
            normed = sums / np.sqrt(np.mean(sums ** 2, -1, keepdims=True) + 1e-6)
            normed = normed * attention["global_input_norm"]["scale"]
            global_k, global_v = project(normed, "key"), project(normed, "value")
        for i in np.flatnonzero(segments_L > 0):
            keys = [j for j in range(len(segments_L)) if segments_L[j] == segments_L[i]
                    and abs(i - j) <= RADIUS]
            logits = [np.einsum("hk,hk->h", q_LHK[i], k_LHK[j]) + table_RH[bucket(j - i)]
                      for j in keys]
            values = [v_LHK[j] for j in keys]
            own = [g for g, (segment, _, _) in enumerate(globals_) if segment == segments_L[i]]
            if own:
                position = np.sum(segments_L[:i] == segments_L[i])
                block = min(position // GLOBAL_BLOCK, len(own) - 1)
                for g in own:
                    logits.append(np.einsum("hk,hk->h", q_LHK[i], global_k[g])
                                  + p["global_position"]["rel_embedding"][
                                      bucket(globals_[g][1] - block)])
                    values.append(global_v[g])
            logits_SH = np.stack(logits)
            weights_SH = np.exp(logits_SH - logits_SH.max(0))
            weights_SH /= weights_SH.sum(0)
            context_HK = np.einsum("sh,shk->hk", weights_SH, np.stack(values))
            out[b, i] = np.einsum("hk,hkd->d", context_HK, attention["out"]["kernel"])
    return out


@pytest.mark.parametrize("transient_global", [False, True], ids=["local", "transient_global"])
def test_attention_matches_numpy_float64(transient_global):
    x_BLD = np.random.default_rng(0).normal(size=(*SEGMENTS.shape, LAYER.d_model))
    x_BLD = x_BLD.astype(np.float32)
    module = Attention(transient_global)
    variables = nn.unbox(module.init(jax.random.key(1), x_BLD, SEGMENTS))
    got = np.asarray(module.apply(variables, x_BLD, SEGMENTS))
    want = numpy_attention(variables["params"], x_BLD, SEGMENTS, transient_global)
    real = SEGMENTS > 0
    np.testing.assert_allclose(got[real], want[real], rtol=1e-4, atol=1e-5)


def test_global_block_ids_follow_the_numpy_construction():
    ids_BL, segments_BG = long_attention.global_block_ids(jnp.asarray(SEGMENTS), GLOBAL_BLOCK)
    for ids_L, segments_G, segments_L in zip(np.asarray(ids_BL), np.asarray(segments_BG),
                                             SEGMENTS):
        tokens = numpy_global_tokens(segments_L)
        want = np.full(len(segments_L), -1)
        for g, (_, _, members) in enumerate(tokens):
            want[members] = g
        np.testing.assert_array_equal(ids_L, want)
        np.testing.assert_array_equal(segments_G, [segment for segment, _, _ in tokens]
                                      + [0] * (len(segments_G) - len(tokens)))


def long_config(attention: str, **overrides) -> models.T5Config:
    fields = dict(vocab_size=64, d_model=32, num_heads=2, head_dim=8, d_ff=64,
                  num_encoder_layers=2, num_decoder_layers=2,
                  relative_attention_num_buckets=BUCKETS,
                  relative_attention_max_distance=MAX_DISTANCE, local_radius=RADIUS,
                  global_block_size=GLOBAL_BLOCK)
    return models.T5Config(encoder_attention=attention, **{**fields, **overrides})


@pytest.mark.parametrize("attention", ["local", "transient_global"])
def test_packed_examples_equal_the_examples_alone(attention):
    model = models.EncoderDecoderModel(long_config(attention))
    params = model.init(jax.random.key(0))
    tokens = np.random.default_rng(1).integers(2, 64, SEGMENTS.shape) * (SEGMENTS > 0)
    encode = jax.jit(model.encode)
    encoded = np.asarray(encode(params, {"encoder_input_tokens": tokens,
                                         "encoder_segment_ids": SEGMENTS}))
    examples = [(row, np.flatnonzero(segments_L == segment))
                for row, segments_L in enumerate(SEGMENTS)
                for segment in set(segments_L[segments_L > 0].tolist())]
    alone = np.zeros((len(examples), SEGMENTS.shape[1]), np.int32)  # each at the start
    for index, (row, positions) in enumerate(examples):
        alone[index, :len(positions)] = tokens[row, positions]
    encoded_alone = np.asarray(encode(params, {"encoder_input_tokens": alone}))
    for index, (row, positions) in enumerate(examples):
        np.testing.assert_allclose(encoded[row, positions],
                                   encoded_alone[index, :len(positions)], rtol=1e-5,
                                   atol=1e-5)


def test_scan_and_remat_change_nothing():
    """Loss and gradients of the loop without remat, and of nn.scan with full remat (the
    LongAttentionBias, local and global parts, broadcast to the scanned layers)."""
    loop = long_config("transient_global", num_encoder_layers=memory_test.STACKS["encoder"],
                       num_decoder_layers=memory_test.STACKS["decoder"], local_radius=2,
                       global_block_size=2)
    params = models.EncoderDecoderModel(loop).init(jax.random.key(0))
    want = memory_test.loss_and_grads(loop, params)
    scanned = dataclasses.replace(loop, scan_layers=True, remat_policy="full")
    got = memory_test.loss_and_grads(scanned, memory_test.stack_layers(params))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    memory_test.assert_trees_close(memory_test.unstack_layers(got[1]), want[1], rtol=1e-4)


EIGHT_DEVICE_SCRIPT = textwrap.dedent("""
    import dataclasses, json, jax
    from t5x_lite import partitioning
    from tests import partitioning_test as t
    assert len(jax.devices()) == 8
    # Transient-global attention: local attention's blocks and the global tokens.
    config = dataclasses.replace(t.trainer_test.CONFIG, encoder_attention="transient_global",
                                 local_radius=2, global_block_size=3)
    one, _ = t.train(t.make_trainer(partitioning.MeshConfig(), jax.devices()[:1],
                                    model_config=config), 3)
    eight, _ = t.train(t.make_trainer(t.mesh_config("fsdp_tensor", data=2, fsdp=2),
                                      jax.devices(), model_config=config), 3)
    print("RESULTS", json.dumps(t.relative_difference(eight.params, one.params)))
""")


def test_eight_devices_train_as_one():
    """Three train steps on data=2 x fsdp=2 x tensor=2 reach one device's parameters."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", EIGHT_DEVICE_SCRIPT], capture_output=True,
                            text=True, timeout=600, env=env, cwd=os.path.dirname(launch.GIN_DIR))
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULTS "))
    assert json.loads(line[len("RESULTS "):]) <= 1e-5


# --- Hugging Face LongT5 ------------------------------------------------------------------

VOCAB = hf_test.VOCAB
HF_CONFIGS = {
    "local": dict(encoder_attention_type="local", local_radius=3, feed_forward_proj="gated-gelu",
                  tie_word_embeddings=False, num_heads=3, d_kv=16,
                  relative_attention_num_buckets=8, relative_attention_max_distance=16),
    "tglobal": dict(encoder_attention_type="transient-global", local_radius=2,
                    global_block_size=4, feed_forward_proj="relu", tie_word_embeddings=True,
                    num_heads=2, d_kv=12, relative_attention_num_buckets=12,
                    relative_attention_max_distance=20),
}


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def saved(request, tmp_path_factory):
    """(name, transformers LongT5 with random normal weights, its save_pretrained dir)."""
    torch.manual_seed(0)
    config = transformers.LongT5Config(vocab_size=VOCAB, d_model=48, d_ff=80, num_layers=3,
                                       num_decoder_layers=2, dropout_rate=0.0,
                                       decoder_start_token_id=0, **HF_CONFIGS[request.param])
    model = transformers.LongT5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    directory = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(directory, safe_serialization=True)
    return request.param, model, directory


def encoder_inputs(length: int, seed: int = 0) -> np.ndarray:
    """[3, length] tokens, rows 1 and 2 padded after 2/3 and 1/4 of the length."""
    tokens = np.random.default_rng(seed).integers(2, VOCAB, (3, length))
    tokens[1, 2 * length // 3:] = 0
    tokens[2, max(length // 4, 1):] = 0
    return tokens


def hf_logits(model, encoder_tokens, decoder_tokens) -> np.ndarray:
    # LongT5's transient-global attention does arithmetic on the mask: integers, not bools.
    with torch.no_grad():
        return model(input_ids=torch.tensor(encoder_tokens),
                     attention_mask=torch.tensor(encoder_tokens > 0).long(),
                     decoder_input_ids=torch.tensor(decoder_tokens)).logits.numpy()


def test_load_reads_the_long_attention(saved):
    name, _, directory = saved
    config = hf.load_t5(directory)[0].config
    expected = HF_CONFIGS[name]
    assert config.encoder_attention.value == {"local": "local",
                                              "tglobal": "transient_global"}[name]
    assert config.local_radius == expected["local_radius"]
    if name == "tglobal":
        assert config.global_block_size == expected["global_block_size"]


def test_logits_match_transformers(saved):
    """23 tokens: blocks padded, global blocks with leftover tokens; 3: shorter than one
    block and one global block."""
    _, hf_model, directory = saved
    model, params = hf.load_t5(directory)
    logits = jax.jit(model.logits)
    for length in (23, 3):
        encoder_tokens, decoder_tokens = encoder_inputs(length), hf_test.decoder_inputs()
        ours = logits(params, {"encoder_input_tokens": jnp.asarray(encoder_tokens, jnp.int32),
                               "decoder_input_tokens": jnp.asarray(decoder_tokens, jnp.int32)})
        hf_test.assert_logits_close(np.asarray(ours),
                                    hf_logits(hf_model, encoder_tokens, decoder_tokens))


def test_greedy_matches_generate(saved):
    _, hf_model, directory = saved
    model, params = hf.load_t5(directory)
    encoder_tokens = encoder_inputs(21, seed=3)
    tokens, _ = model.predict_batch(params, {"encoder_input_tokens": jnp.asarray(
        encoder_tokens, jnp.int32)}, max_decode_length=10, method="greedy")
    with torch.no_grad():
        output = hf_model.generate(
            input_ids=torch.tensor(encoder_tokens),
            attention_mask=torch.tensor(encoder_tokens > 0).long(), max_new_tokens=10,
            pad_token_id=0, eos_token_id=1, do_sample=False, num_beams=1).numpy()[:, 1:]
    after_eos = np.cumsum(output == 1, axis=1) - (output == 1) > 0
    expected = np.pad(np.where(after_eos, 0, output), ((0, 0), (0, 10 - output.shape[1])))
    np.testing.assert_array_equal(np.asarray(tokens), expected)
    assert len(set(expected.ravel().tolist())) > 3  # real sequences, not one repeated token


def test_export_and_reimport(saved, tmp_path):
    name, _, directory = saved
    model, params = hf.load_t5(directory)
    out = str(tmp_path / "exported")
    hf.save_t5(model, params, out)
    with open(os.path.join(out, "config.json")) as f:
        exported = json.load(f)
    assert exported["model_type"] == "longt5"
    assert exported["encoder_attention_type"] == HF_CONFIGS[name]["encoder_attention_type"]
    reloaded = transformers.LongT5ForConditionalGeneration.from_pretrained(out).eval()
    encoder_tokens, decoder_tokens = encoder_inputs(19, seed=7), hf_test.decoder_inputs(8)
    hf_test.assert_logits_close(
        hf_logits(reloaded, encoder_tokens, decoder_tokens),
        hf_test.our_logits(model, params, encoder_tokens, decoder_tokens))
    model_again, params_again = hf.load_t5(out)
    assert model_again.config == model.config
    flat, flat_again = traverse_util.flatten_dict(params), traverse_util.flatten_dict(params_again)
    assert flat.keys() == flat_again.keys()
    for path in flat:
        np.testing.assert_array_equal(flat_again[path], flat[path], err_msg=str(path))


def test_convert_hf_from_hf_writes_the_long_attention(saved, tmp_path):
    """scripts/convert_hf.py from-hf: its model.gin builds the model it loaded, LongT5's
    attention included, and its checkpoint holds the same parameters."""
    from tests.convert_hf_test import convert_hf
    from tests.finetune_test import newest_params
    _, _, directory = saved
    model, params = hf.load_t5(directory)
    convert_hf.main(["from-hf", "--hf_dir", directory, "--model_dir", str(tmp_path)])
    launch.parse_gin([str(tmp_path / convert_hf.MODEL_GIN)], [])
    try:
        config = gin.get_configurable(models.T5Config)()
    finally:
        gin.clear_config()
    for field in warm_start.ARCHITECTURE_FIELDS:
        ours, theirs = getattr(config, field), getattr(model.config, field)
        if field == "activation":
            ours, theirs = hf.activation_name(ours), hf.activation_name(theirs)
        assert ours == theirs, field
    step, restored = newest_params(tmp_path)
    assert step == 0
    restored = traverse_util.flatten_dict(restored)
    for path, value in traverse_util.flatten_dict(params).items():
        np.testing.assert_array_equal(restored[path], value, err_msg=str(path))


# --- presets and bad input ------------------------------------------------------------------

LONGT5_PRESETS = [f"longt5_{kind}_{size}" for kind in ("local", "tglobal")
                  for size in ("base", "large", "xl")]


@pytest.mark.parametrize("preset", LONGT5_PRESETS)
def test_preset_has_transformers_parameter_count(preset):
    """Against transformers' LongT5 of the exported config, built on the meta device (no
    weights allocated). transformers 5 ties lm_head to the embedding whatever the config
    says; the published untied checkpoints hold their own, counted here."""
    launch.parse_gin([f"models/{preset}.gin"], [])
    try:
        config = gin.get_configurable(models.T5Config)()
    finally:
        gin.clear_config()
    ours = models.count_parameters(jax.eval_shape(models.EncoderDecoderModel(config).init,
                                                  jax.random.key(0)))
    hf_config = hf.config_to_hf(config)
    assert hf_config["encoder_attention_type"] == ("local" if "local" in preset
                                                   else "transient-global")
    with torch.device("meta"):
        hf_model = transformers.LongT5ForConditionalGeneration(
            transformers.LongT5Config(**hf_config))
    theirs = sum(parameter.numel() for parameter in hf_model.parameters())
    if not config.tie_embeddings:
        theirs += hf_model.lm_head.weight.numel()
    assert ours == theirs


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match=r"^T5Config.local_radius must be >= 1, got 0$"):
        long_config("local", local_radius=0)
    with pytest.raises(ValueError, match=r"^T5Config.global_block_size must be >= 1, got 0$"):
        long_config("transient_global", global_block_size=0)
    with pytest.raises(ValueError, match=r"^T5Config.encoder_attention must be one of "):
        long_config("sliding")
    with pytest.raises(ValueError, match="a decoder_only model has no encoder"):
        models.T5Config(architecture="decoder_only", num_encoder_layers=0,
                        encoder_attention="local")
    config = long_config("transient_global")
    config.check_encoder_length(RADIUS + 1)  # fits: one block, one global block
    with pytest.raises(ValueError, match=r"local_radius = 3 does not fit encoder inputs of 3 "
                                         r"tokens .* bind local_radius < 3"):
        config.check_encoder_length(3)
    wide = long_config("transient_global", global_block_size=12)
    with pytest.raises(ValueError, match=r"global_block_size = 12 does not fit encoder inputs "
                                         r"of 10 tokens .* bind global_block_size <= 10"):
        wide.check_encoder_length(10)
    long_config("local", global_block_size=12).check_encoder_length(10)  # no global tokens
