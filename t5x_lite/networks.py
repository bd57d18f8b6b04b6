"""The Flax networks of the T5 families: the encoder-decoder Transformer, and the
decoder-only and encoder-only stacks built from its parts (embedding, relative position
biases, layer stacks, heads). Pure modules of arrays; models.py wraps them into the loss,
scoring and decoding that training and evaluation call. Batches are described there.

Dimension letters as in layers.py: B batch, L encoder length, T decoder length, S attended
length, D model, V vocab, C classes.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5x_lite import layers
from t5x_lite import long_attention
from t5x_lite import moe as moe_lib

if TYPE_CHECKING:  # models imports this module; the annotation alone needs T5Config.
    from t5x_lite.models import T5Config

Batch = dict[str, jax.Array]


class Transformer(nn.Module):
    """Encoder and decoder stacks sharing one token embedding. With `decode_cache_length`
    > 0 the decoder keeps a key/value cache of that many positions (see decode)."""

    config: T5Config
    decode_cache_length: int = 0

    def setup(self):
        cfg, layer_cfg = self.config, self.config.layer_config()
        self._setup_embedding_and_head(layer_cfg)
        self._setup_encoder(layer_cfg)
        self.decoder_relative_bias = self._relative_bias(False, "decoder_relative_bias")
        self.decoder_layers = self._stack(layers.DecoderLayer, cfg.num_decoder_layers,
                                          "decoder_layer", causal=True,
                                          cache_length=self.decode_cache_length)

    def _setup_encoder(self, layer_cfg: layers.LayerConfig) -> None:
        """The encoder's relative position bias(es), layers and final norm, for `encode`:
        T5's, or LongT5's when config.encoder_attention says so."""
        cfg = self.config
        self.encoder_relative_bias = self._relative_bias(True, "encoder_relative_bias")
        fields = {}
        if cfg.long_encoder:
            fields["attention_block"] = functools.partial(
                long_attention.LongSelfAttention, transient_global=cfg.transient_global)
            if cfg.transient_global:
                self.encoder_global_relative_bias = long_attention.GlobalRelativePositionBias(
                    cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance,
                    cfg.num_heads, cfg.activation_dtype, name="encoder_global_relative_bias")
        self.encoder_layers = self._stack(layers.EncoderLayer, cfg.num_encoder_layers,
                                          "encoder_layer", causal=False, **fields)
        self.encoder_norm = layers.rms_norm(layer_cfg, "encoder_norm")

    def _setup_embedding_and_head(self, layer_cfg: layers.LayerConfig) -> None:
        """What the families share: the kernels, token embedding, final norm, dropout and
        (untied) logits projection (each built only where a family calls it)."""
        cfg = self.config
        self.kernels = layer_cfg.kernels
        self.token_embedder = nn.Embed(
            cfg.vocab_size, cfg.d_model, dtype=cfg.activation_dtype,
            embedding_init=layers.partitioned(nn.initializers.normal(1.0), ("vocab", "embed")))
        self.decoder_norm = layers.rms_norm(layer_cfg, "decoder_norm")
        self.dropout = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
        if not cfg.tie_embeddings:
            self.logits_dense = layers.Kernel(
                (cfg.d_model, cfg.vocab_size),
                layers.partitioned(
                    nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
                    ("embed", "vocab")), name="logits_dense")

    def _relative_bias(self, bidirectional: bool, name: str) -> layers.RelativePositionBias:
        cfg = self.config
        return layers.RelativePositionBias(
            cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance,
            cfg.num_heads, bidirectional, cfg.activation_dtype, self.kernels.precision,
            name=name)

    def _stack(self, layer_class: type[nn.Module], num_layers: int, name: str, causal: bool,
               **fields):
        """num_layers layers named f"{name}_{i}" (sparse where the MoE config says), or with
        scan_layers one module f"{name}s" whose parameters carry a leading layers axis."""
        cfg = self.config
        layer = layers.rematerialised(layer_class, cfg.remat_policy, cfg.scan_layers)
        if cfg.scan_layers:
            return layer(cfg.layer_config(), name=f"{name}s", **fields)
        return [layer(cfg.layer_config(), name=f"{name}_{i}", **fields,
                      **self._mlp_of(i, causal)) for i in range(num_layers)]

    def _mlp_of(self, layer_index: int, causal: bool) -> dict:
        """The MLP arguments of layer `layer_index`: sparse where the MoE config says so."""
        config = self.config.moe
        if config is None or not config.is_sparse(layer_index):
            return {}
        return {"mlp_block": functools.partial(moe_lib.SparseMlp, moe=config, causal=causal),
                "extra_dense_mlp": config.extra_dense_mlp}

    def _embed(self, tokens_BT: jax.Array) -> jax.Array:
        """Token embeddings [B, T, D] in the activation dtype (kernels.Kernels.embed)."""
        return self.kernels.embed(self.token_embedder.embedding, tokens_BT,
                                  self.config.activation_dtype)

    def encode(self, encoder_input_tokens: jax.Array, encoder_segment_ids: jax.Array,
               deterministic: bool = True) -> jax.Array:
        """Returns the encoded inputs [B, L, D]."""
        x_BLD = self.dropout(self._embed(encoder_input_tokens), deterministic)
        x_BLD = self._run_stack(self.encoder_layers, self.config.num_encoder_layers, x_BLD,
                                self._encoder_bias(encoder_segment_ids), encoder_segment_ids,
                                deterministic)
        return self.dropout(self.encoder_norm(x_BLD), deterministic)

    def _encoder_bias(self, segment_ids_BL: jax.Array):
        """What every encoder layer's self-attention takes: the bias [B, H, L, L] of full
        attention, or LongT5's long_attention.LongAttentionBias."""
        cfg, dtype = self.config, self.config.activation_dtype
        if cfg.long_encoder:
            return long_attention.long_attention_bias(
                segment_ids_BL, cfg.local_radius, self.encoder_relative_bias,
                self.kernels.add_position_bias, dtype,
                self.encoder_global_relative_bias if cfg.transient_global else None,
                cfg.global_block_size)
        length = segment_ids_BL.shape[1]
        return self.kernels.add_position_bias(
            self.encoder_relative_bias(length, length),
            layers.mask_to_bias(layers.attention_mask(segment_ids_BL, segment_ids_BL,
                                                      causal=False), dtype))

    def _run_stack(self, stack, num_layers: int, x: jax.Array, *shared) -> jax.Array:
        """Runs a layer stack on x; `shared` (biases, encoder output, segment ids,
        deterministic) is the same for every layer."""
        if self.config.scan_layers:
            return layers.scan_layers(stack, num_layers, x, *shared)
        for layer in stack:
            x = layer(x, *shared)
        return x

    def decode(self, encoded_BLD: jax.Array, encoder_segment_ids: jax.Array,
               decoder_input_tokens: jax.Array, decoder_segment_ids: jax.Array,
               deterministic: bool = True, decode_position: jax.Array | None = None
               ) -> jax.Array:
        """Returns float32 logits [B, T, V] for every decoder position.

        Cached decoding (decode_cache_length > 0, "cache" mutable): a first call without
        `decode_position` creates the cache (an empty self-attention cache, and the projected
        encoder output); then each call passes one token per row [B, 1] at
        `decode_position`, which attends to the cache up to that position.
        """
        cfg = self.config
        dtype = cfg.activation_dtype
        y_BTD = self.dropout(self._embed(decoder_input_tokens), deterministic)
        length = decoder_input_tokens.shape[1]
        if decode_position is None:
            self_bias_BHTT = self.kernels.add_position_bias(
                self.decoder_relative_bias(length, length),
                layers.mask_to_bias(layers.attention_mask(
                    decoder_segment_ids, decoder_segment_ids, causal=True), dtype))
        else:
            cache_length = self.decode_cache_length
            written_S = jnp.arange(cache_length) <= decode_position
            self_bias_BHTT = (self.decoder_relative_bias(length, cache_length, decode_position)
                              + layers.mask_to_bias(written_S[None, None, None, :], dtype))
        cross_bias_BHTL = layers.mask_to_bias(layers.attention_mask(
            decoder_segment_ids, encoder_segment_ids, causal=False), dtype)
        y_BTD = self._run_stack(self.decoder_layers, cfg.num_decoder_layers, y_BTD, encoded_BLD,
                                self_bias_BHTT, cross_bias_BHTL, decoder_segment_ids,
                                deterministic)
        return self._logits(y_BTD, deterministic)

    def _logits(self, y_BTD: jax.Array, deterministic: bool) -> jax.Array:
        """Float32 logits [B, T, V] of the last layer's output: final norm, then the logits
        projection (or the tied embedding)."""
        return self._vocab_logits(self.dropout(self.decoder_norm(y_BTD), deterministic))

    def _vocab_logits(self, y_BTD: jax.Array) -> jax.Array:
        """Float32 logits [B, T, V] of final-normed states: the logits projection (or the
        tied embedding)."""
        cfg = self.config
        if cfg.tie_embeddings:
            # T5 v1.0 rescales before the tied projection (Mesh TensorFlow's convention).
            logits_BTV = self.token_embedder.attend(y_BTD * cfg.d_model ** -0.5)
        else:
            logits_BTV = self.kernels.project(y_BTD, self.logits_dense(), cfg.activation_dtype)
        return layers.constrain(logits_BTV.astype(jnp.float32), ("batch", "length", "vocab"))

    def __call__(self, batch: Batch, deterministic: bool = True) -> jax.Array:
        encoded_BLD = self.encode(batch["encoder_input_tokens"], batch["encoder_segment_ids"],
                                  deterministic)
        return self.decode(encoded_BLD, batch["encoder_segment_ids"],
                           batch["decoder_input_tokens"], batch["decoder_segment_ids"],
                           deterministic)


class DecoderOnlyTransformer(Transformer):
    """One stack of self-attention layers over inputs and targets concatenated; its bias is
    causal, except among decoder_causal_attention positions (a prefix-LM's inputs), which
    see each other. With `decode_cache_length` > 0 each layer keeps a key/value cache of that
    many positions (see cached_positions)."""

    def setup(self):
        cfg, layer_cfg = self.config, self.config.layer_config()
        self._setup_embedding_and_head(layer_cfg)
        # Unidirectional buckets, as T5X's decoder-only: later prefix positions share bucket 0.
        self.decoder_relative_bias = self._relative_bias(False, "decoder_relative_bias")
        self.decoder_layers = self._stack(layers.EncoderLayer, cfg.num_decoder_layers,
                                          "decoder_layer", causal=True,
                                          cache_length=self.decode_cache_length)

    def __call__(self, batch: Batch, deterministic: bool = True) -> jax.Array:
        """Float32 logits [B, T, V] for every position of the batch (teacher forced)."""
        tokens_BT, segment_ids_BT = batch["decoder_input_tokens"], batch["decoder_segment_ids"]
        causal_attention_BT = jnp.zeros_like(segment_ids_BT)
        if self.config.bidirectional_inputs:
            causal_attention_BT = batch.get("decoder_causal_attention", causal_attention_BT)
        length = tokens_BT.shape[1]
        bias_BHTT = self.kernels.add_position_bias(
            self.decoder_relative_bias(length, length),
            layers.mask_to_bias(layers.prefix_lm_mask(segment_ids_BT, causal_attention_BT),
                                self.config.activation_dtype))
        return self._stack_logits(tokens_BT, bias_BHTT, segment_ids_BT, deterministic)

    def cached_positions(self, tokens_BT: jax.Array, offset: jax.Array | int,
                         keys_valid_BS: jax.Array, prompt_length: int) -> jax.Array:
        """Logits [B, T, V] of T positions written to the cache at `offset` (a prompt at 0,
        then one generated token at a time). A position sees the cache's valid keys up to
        itself and, with bidirectional_inputs, every key of the first `prompt_length` (the
        prompt, as a prefix-LM's inputs in training). Needs the cache created first by a
        call of __call__."""
        if not self.config.bidirectional_inputs:
            prompt_length = 0
        length, cache_length = tokens_BT.shape[1], self.decode_cache_length
        query_T, key_S = offset + jnp.arange(length), jnp.arange(cache_length)
        visible_TS = (key_S[None, :] <= query_T[:, None]) | (key_S[None, :] < prompt_length)
        mask_BHTS = keys_valid_BS[:, None, None, :] & visible_TS[None, None]
        bias_BHTS = (self.decoder_relative_bias(length, cache_length, offset)
                     + layers.mask_to_bias(mask_BHTS, self.config.activation_dtype))
        valid_BT = jax.lax.dynamic_slice_in_dim(keys_valid_BS, offset, length, axis=1)
        return self._stack_logits(tokens_BT, bias_BHTS, valid_BT.astype(jnp.int32), True)

    def _stack_logits(self, tokens_BT: jax.Array, bias_BHTS: jax.Array,
                      segment_ids_BT: jax.Array, deterministic: bool) -> jax.Array:
        x_BTD = self.dropout(self._embed(tokens_BT), deterministic)
        x_BTD = self._run_stack(self.decoder_layers, self.config.num_decoder_layers, x_BTD,
                                bias_BHTS, segment_ids_BT, deterministic)
        return self._logits(x_BTD, deterministic)


class EncoderOnlyTransformer(Transformer):
    """T5's encoder alone: the token embedding, bidirectional self-attention layers with the
    encoder's relative position bias (or LongT5's attention, as T5Config.encoder_attention
    says), the final norm, and a head. With num_classes = 0 the
    head gives masked-LM logits [B, L, V] at every position (through the embedding, or untied,
    as the config says); with num_classes > 0, class logits [B, 1, C] of each row's encoding
    mean-pooled over its tokens. Mean pooling because T5 has no [CLS] token whose state could
    stand for the row, and because it is what Sentence-T5 (Ni et al. 2022) found best for T5
    encoders. The head is its own parameter, "classification_head", so a classifier starts
    from a masked-LM checkpoint's shared parameters with only the head fresh."""

    def setup(self):
        cfg, layer_cfg = self.config, self.config.layer_config()
        self._setup_embedding_and_head(layer_cfg)
        self._setup_encoder(layer_cfg)
        if cfg.num_classes:
            self.classification_head = nn.Dense(
                cfg.num_classes, dtype=jnp.float32, param_dtype=jnp.float32,
                kernel_init=layers.partitioned(nn.initializers.variance_scaling(
                    1.0, "fan_in", "truncated_normal"), ("embed", "classes")),
                bias_init=layers.partitioned(nn.initializers.zeros, ("classes",)),
                name="classification_head")

    def __call__(self, batch: Batch, deterministic: bool = True) -> jax.Array:
        """Masked-LM logits [B, L, V], or class logits [B, 1, C] (float32)."""
        segment_ids_BL = batch["encoder_segment_ids"]
        encoded_BLD = self.encode(batch["encoder_input_tokens"], segment_ids_BL, deterministic)
        if not self.config.num_classes:
            return self._vocab_logits(encoded_BLD)
        return self.classify(encoded_BLD, segment_ids_BL)

    def classify(self, encoded_BLD: jax.Array, segment_ids_BL: jax.Array) -> jax.Array:
        """Class logits [B, 1, C]: the head on the mean of each row's encoded tokens (segment
        id > 0; an all-padding row pools to zeros)."""
        valid_BL = (segment_ids_BL > 0).astype(jnp.float32)
        count_B1 = jnp.maximum(jnp.sum(valid_BL, axis=1, keepdims=True), 1.0)
        pooled_BD = jnp.einsum("BLD,BL->BD", encoded_BLD.astype(jnp.float32),
                               valid_BL) / count_B1
        logits_BC = self.classification_head(pooled_BD)
        return layers.constrain(logits_BC[:, None, :], ("batch", "length", "classes"))
