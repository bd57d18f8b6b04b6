"""The T5 model families, encoder-decoder and decoder-only: configuration, Flax modules, and
the model objects that training, evaluation and decoding use (loss, logits, score_batch,
predict_batch). Knows nothing of meshes or gin.

Batches are dicts of int32 arrays. Encoder-decoder: encoder_input_tokens / encoder_segment_ids
[B, L] and decoder_input_tokens / decoder_target_tokens / decoder_loss_weights /
decoder_segment_ids [B, T]. Decoder-only: the decoder_* keys alone, over inputs and targets
concatenated (T = L + targets for prefix-LM), plus decoder_causal_attention [B, T], 1 on the
positions that attend bidirectionally (the inputs; all 0 for a causal LM). Segment id 0 marks
padding; packed rows hold several examples with ids 1, 2, ...
"""
import dataclasses
import enum
import functools
from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5x_lite import choices
from t5x_lite import decoding
from t5x_lite import kernels as kernels_lib
from t5x_lite import layers
from t5x_lite import moe as moe_lib
from t5x_lite import ops

Params = Any
Batch = dict[str, jax.Array]


class Architecture(enum.Enum):
    """T5Config.architecture: which model family the layers form."""

    # An encoder over the inputs and a decoder that attends to it (T5).
    ENCODER_DECODER = "encoder_decoder"
    # One stack of self-attention layers over inputs and targets concatenated: a causal LM,
    # or a prefix-LM whose inputs attend bidirectionally (T5X's DecoderOnlyModel).
    DECODER_ONLY = "decoder_only"


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Architecture of a T5 model. Defaults are T5 v1.1 small (an encoder-decoder); a
    decoder-only model binds architecture = 'decoder_only', num_encoder_layers = 0 and its
    stack's depth as num_decoder_layers (gin/models/decoder_only_*.gin)."""

    architecture: Architecture = Architecture.ENCODER_DECODER
    vocab_size: int = 32128
    d_model: int = 512
    num_heads: int = 6
    head_dim: int = 64
    d_ff: int = 1024
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    activation: Callable[[jax.Array], jax.Array] = jax.nn.gelu
    gated_mlp: bool = True
    tie_embeddings: bool = False
    dropout_rate: float = 0.0
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    activation_dtype: Any = jnp.float32  # float32 or bfloat16; parameters stay float32.
    z_loss: float = 1e-4
    # Memory: what each layer keeps for the backward pass (layers.RematPolicy), and whether
    # the stacks run as one nn.scan over parameters stacked on a leading "layers" axis
    # (compiles one layer instead of all of them; the parameter tree changes shape).
    remat_policy: layers.RematPolicy = layers.RematPolicy.NONE
    scan_layers: bool = False
    # The hot path's kernels (kernels.py), chosen for `kernel_platform` (None or "auto": the
    # backend this process runs on; precompile names its target's). `attention` overrides
    # the platform's choice: "einsum", "xla", "cudnn" or "pallas_tpu" (None or "auto": none).
    attention: kernels_lib.Attention | None = None
    kernel_platform: kernels_lib.Platform | None = None
    # Sparse Mixture-of-Experts MLPs in every moe.sparse_every-th layer; None: a dense model.
    moe: moe_lib.MoeConfig | None = None
    # Decoder-only: the inputs (decoder_causal_attention positions, a prompt when decoding)
    # attend to each other, as a prefix-LM trains; False makes every position causal, as a
    # causal LM trains (gin/objectives/causal_lm.gin; T5X's inputs_bidirectional_attention).
    bidirectional_inputs: bool = True

    def __post_init__(self):
        choices.set_parsed(self, "architecture", Architecture, "T5Config.architecture")
        positive = ("vocab_size", "d_model", "num_heads", "head_dim", "d_ff",
                    "num_decoder_layers", "relative_attention_num_buckets",
                    "relative_attention_max_distance")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"T5Config.{name} must be >= 1, got {getattr(self, name)}")
        self._check_architecture()
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"T5Config.dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if self.z_loss < 0:
            raise ValueError(f"T5Config.z_loss must be >= 0, got {self.z_loss}")
        if jnp.dtype(self.activation_dtype) not in (jnp.dtype(jnp.float32),
                                                    jnp.dtype(jnp.bfloat16)):
            raise ValueError(f"T5Config.activation_dtype must be float32 or bfloat16, got "
                             f"{self.activation_dtype}")
        choices.set_parsed(self, "remat_policy", layers.RematPolicy, "T5Config.remat_policy")
        for name, choice_type in (("attention", kernels_lib.Attention),
                                  ("kernel_platform", kernels_lib.Platform)):
            choices.set_parsed(self, name, choice_type, f"T5Config.{name}", auto=True)
        forced = self.attention not in (None, kernels_lib.Attention.EINSUM)
        if forced and self.dropout_rate > 0:
            raise ValueError(f"T5Config.attention = {self.attention.value!r} has no dropout on "
                             "the attention weights: use 'einsum' with dropout_rate > 0")
        if self.moe is not None and self.scan_layers:
            raise ValueError("T5Config.scan_layers needs identical layers, but moe makes some "
                             "sparse: set T5Config.scan_layers = False for MoE models")

    def _check_architecture(self) -> None:
        if self.decoder_only and self.num_encoder_layers:
            raise ValueError(
                f"T5Config.num_encoder_layers = {self.num_encoder_layers}, but a decoder_only "
                "model has no encoder: bind num_encoder_layers = 0 (its depth is "
                "num_decoder_layers), or architecture = 'encoder_decoder'")
        if not self.decoder_only and not self.bidirectional_inputs:
            raise ValueError("T5Config.bidirectional_inputs = False (a causal LM, "
                             "gin/objectives/causal_lm.gin) is for decoder_only models: use a "
                             "decoder-only preset (gin/models/decoder_only_*.gin)")
        if not self.decoder_only and self.num_encoder_layers < 1:
            raise ValueError(
                f"T5Config.num_encoder_layers must be >= 1 for an encoder_decoder model, got "
                f"{self.num_encoder_layers}: bind architecture = 'decoder_only' for a model "
                "without an encoder")

    @property
    def decoder_only(self) -> bool:
        return self.architecture is Architecture.DECODER_ONLY

    def kernels(self) -> kernels_lib.Kernels:
        return kernels_lib.resolve(self.kernel_platform, self.attention, self.activation_dtype,
                                   self.head_dim, self.dropout_rate)

    def layer_config(self) -> layers.LayerConfig:
        return layers.LayerConfig(
            d_model=self.d_model, num_heads=self.num_heads, head_dim=self.head_dim,
            d_ff=self.d_ff, activation=self.activation, gated_mlp=self.gated_mlp,
            dropout_rate=self.dropout_rate, dtype=self.activation_dtype,
            layer_norm_epsilon=self.layer_norm_epsilon, kernels=self.kernels())


class Transformer(nn.Module):
    """Encoder and decoder stacks sharing one token embedding. With `decode_cache_length`
    > 0 the decoder keeps a key/value cache of that many positions (see decode)."""

    config: T5Config
    decode_cache_length: int = 0

    def setup(self):
        cfg, layer_cfg = self.config, self.config.layer_config()
        self._setup_embedding_and_head(layer_cfg)
        self.encoder_relative_bias = self._relative_bias(True, "encoder_relative_bias")
        self.decoder_relative_bias = self._relative_bias(False, "decoder_relative_bias")
        self.encoder_layers = self._stack(layers.EncoderLayer, cfg.num_encoder_layers,
                                          "encoder_layer", causal=False)
        self.decoder_layers = self._stack(layers.DecoderLayer, cfg.num_decoder_layers,
                                          "decoder_layer", causal=True,
                                          cache_length=self.decode_cache_length)
        self.encoder_norm = layers.rms_norm(layer_cfg, "encoder_norm")

    def _setup_embedding_and_head(self, layer_cfg: layers.LayerConfig) -> None:
        """What both families share: the kernels, token embedding, final norm, dropout and
        (untied) logits projection."""
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
        length = encoder_input_tokens.shape[1]
        bias_BHLL = self.kernels.add_position_bias(
            self.encoder_relative_bias(length, length),
            layers.mask_to_bias(layers.attention_mask(
                encoder_segment_ids, encoder_segment_ids, causal=False),
                self.config.activation_dtype))
        x_BLD = self._run_stack(self.encoder_layers, self.config.num_encoder_layers, x_BLD,
                                bias_BHLL, encoder_segment_ids, deterministic)
        return self.dropout(self.encoder_norm(x_BLD), deterministic)

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
        cfg = self.config
        y_BTD = self.dropout(self.decoder_norm(y_BTD), deterministic)
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


def segment_ids_of(tokens: jax.Array) -> jax.Array:
    """Segment ids for an unpacked batch: 1 on real tokens, 0 on padding."""
    return (tokens > 0).astype(jnp.int32)


def with_segment_ids(batch: Batch) -> Batch:
    """Fills in segment ids for callers that pass unpacked token arrays only."""
    batch = dict(batch)
    if "encoder_input_tokens" in batch:
        batch.setdefault("encoder_segment_ids", segment_ids_of(batch["encoder_input_tokens"]))
    if "decoder_segment_ids" not in batch and "decoder_input_tokens" in batch:
        if "decoder_target_tokens" in batch:
            batch["decoder_segment_ids"] = segment_ids_of(batch["decoder_target_tokens"])
        else:
            # Decoder inputs begin with the start token 0, so zeros cannot mark padding; as
            # the decoder is causal, trailing padding cannot affect earlier positions anyway.
            batch["decoder_segment_ids"] = jnp.ones_like(batch["decoder_input_tokens"])
    return batch


def cross_entropy_sums(logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array,
                       z_loss: float, cross_entropy: Callable = ops.softmax_cross_entropy
                       ) -> dict[str, jax.Array]:
    """Summed (not averaged) loss terms over weighted target tokens, in float32.

    z_loss adds z_loss * log(Z)^2 per token (Chowdhery et al. 2022) to keep logits from
    drifting; it is part of `loss` and reported alone as `z_loss`. `cross_entropy` is the
    backend's (kernels.Kernels.cross_entropy).
    """
    cross_entropy_BT, log_normalizer_BT, correct_BT = cross_entropy(logits_BTV, targets_BT)
    z_loss_BT = z_loss * jnp.square(log_normalizer_BT)
    weights_BT = weights_BT.astype(jnp.float32)
    return {
        "loss": jnp.sum((cross_entropy_BT + z_loss_BT) * weights_BT),
        "z_loss": jnp.sum(z_loss_BT * weights_BT),
        "correct": jnp.sum(correct_BT * weights_BT),
        "weight": jnp.sum(weights_BT),
    }


@dataclasses.dataclass(frozen=True)
class Model:
    """What both families share: pure functions of (params, batch) around the Flax module
    (init, logits, loss, score_batch, predict_batch). Each family adds its `module` and
    `cached_decoder`; model_for picks the family."""

    config: T5Config
    # The predict_batch key of the inputs [B, L] (EOS-terminated, zero-padded).
    inputs_key: ClassVar[str] = "encoder_input_tokens"

    def _init_batch(self) -> Batch:
        # Two tokens: a length every attention kernel takes (cuDNN's backward needs even).
        tokens = jnp.ones((1, 2), jnp.int32)
        return {"encoder_input_tokens": tokens, "encoder_segment_ids": tokens,
                "decoder_input_tokens": tokens, "decoder_segment_ids": tokens}

    def _boxed_init(self, rng: jax.Array) -> Params:
        """Parameters wrapped in Flax's logical-axis boxes; shapes do not depend on lengths."""
        return self.module.init(rng, self._init_batch())["params"]

    def init(self, rng: jax.Array) -> Params:
        return nn.unbox(self._boxed_init(rng))

    def logical_axes(self) -> Params:
        """A PartitionSpec of logical axis names for every parameter, computed abstractly."""
        boxed = jax.eval_shape(self._boxed_init, jax.random.key(0))
        return nn.get_partition_spec(boxed)

    def logits_and_moe_metrics(self, params: Params, batch: Batch,
                               dropout_rng: jax.Array | None = None
                               ) -> tuple[jax.Array, dict[str, dict[str, jax.Array]]]:
        """Float32 logits [B, T, V] and each sparse layer's routing metrics and losses
        ({} for a dense model); dropout is applied only when dropout_rng is given."""
        rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
        logits_BTV, state = self.module.apply(
            {"params": params}, with_segment_ids(batch), deterministic=dropout_rng is None,
            rngs=rngs, mutable=["intermediates"])
        return logits_BTV, moe_lib.layer_metrics(state.get("intermediates", {}))

    def logits(self, params: Params, batch: Batch, dropout_rng: jax.Array | None = None
               ) -> jax.Array:
        return self.logits_and_moe_metrics(params, batch, dropout_rng)[0]

    def loss_sums(self, params: Params, batch: Batch, dropout_rng: jax.Array | None = None
                  ) -> dict[str, jax.Array]:
        """Summed loss terms (see cross_entropy_sums); an MoE model's auxiliary losses and
        routing metrics are added as per-batch values times the target weight, so that
        dividing by the weight, as for every other sum, gives them back."""
        logits_BTV, layer_metrics = self.logits_and_moe_metrics(params, batch, dropout_rng)
        sums = cross_entropy_sums(logits_BTV, batch["decoder_target_tokens"],
                                  batch["decoder_loss_weights"], self.config.z_loss,
                                  self.config.kernels().cross_entropy)
        if layer_metrics:
            moe_sums = moe_lib.metric_sums(layer_metrics, self.config.moe, sums["weight"])
            sums["loss"] = sums["loss"] + moe_sums.pop("moe_loss")
            sums.update(moe_sums)
        return sums

    def loss(self, params: Params, batch: Batch, dropout_rng: jax.Array | None = None
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Mean loss per target token (the sums divided by the number of target tokens)."""
        sums = self.loss_sums(params, batch, dropout_rng)
        return sums["loss"] / jnp.maximum(sums["weight"], 1.0), sums

    def score_batch(self, params: Params, batch: Batch) -> jax.Array:
        """Float32 [B]: each row's summed log-probability (natural log) of its target tokens
        under teacher forcing, counting the positions decoder_loss_weights marks (a packed
        row sums over its examples)."""
        log_probs_BTV = jax.nn.log_softmax(self.logits(params, batch))
        targets_BT = batch["decoder_target_tokens"]
        token_BT = jnp.take_along_axis(log_probs_BTV, targets_BT[..., None], axis=-1)[..., 0]
        return jnp.sum(token_BT * batch["decoder_loss_weights"].astype(jnp.float32), axis=1)

    def predict_batch(self, params: Params, batch: Batch, max_decode_length: int = 64,
                      method: decoding.Method | str = decoding.Method.GREEDY, eos_id: int = 1,
                      **options
                      ) -> tuple[jax.Array, jax.Array]:
        """Decodes targets for the batch's inputs (batch[inputs_key], [B, L]): the inputs
        run once, then one position at a time over a key/value cache.

        `method` is a decoding.Method or its name ("greedy", "beam", "sample"); `options` are
        decoding.DecodeOptions fields (beam_size, alpha, temperature, top_k, top_p, seed).
        Returns tokens int32 [B, max_decode_length] (no start token; 0 after EOS) and scores
        float32 [B]: the summed log-probability of each sequence up to and including EOS
        (for beam search, divided by the length penalty).
        """
        method = decoding.parse_method(method)
        try:
            settings = decoding.DecodeOptions(**options)
        except TypeError:
            raise ValueError(f"unknown decoding option in {sorted(options)}: options are "
                             f"{', '.join(decoding.DecodeOptions.__dataclass_fields__)}"
                             ) from None
        copies = settings.beam_size if method is decoding.Method.BEAM else 1
        step_fn, cache = self.cached_decoder(params, batch, max_decode_length, copies)
        batch_size = batch[self.inputs_key].shape[0]
        # Scanned layers stack their caches on a leading layers axis.
        return decoding.decode(method, step_fn, cache, batch_size, max_decode_length, eos_id,
                               settings, cache_batch_axis=1 if self.config.scan_layers else 0)


@dataclasses.dataclass(frozen=True)
class EncoderDecoderModel(Model):
    """A T5 encoder-decoder."""

    @property
    def module(self) -> Transformer:
        return Transformer(self.config)

    def encode(self, params: Params, batch: Batch) -> jax.Array:
        batch = with_segment_ids(batch)
        return self.module.apply({"params": params}, batch["encoder_input_tokens"],
                                 batch["encoder_segment_ids"], method=Transformer.encode)

    def cached_decoder(self, params: Params, batch: Batch, max_decode_length: int,
                       copies: int = 1) -> tuple[decoding.StepFn, Any]:
        """(step_fn, initial cache) for decoding the batch's encoder inputs: the encoder and
        the decoder's projections of its output run here, once; step_fn(tokens [R, 1],
        position, cache) -> (logits [R, V], cache) runs the decoder on one position, where
        R = B * copies (each row repeated `copies` times in a row, for beam search)."""
        batch = with_segment_ids(batch)
        encoded_RLD = jnp.repeat(self.encode(params, batch), copies, axis=0)
        segment_ids = jnp.repeat(batch["encoder_segment_ids"], copies, axis=0)
        module = Transformer(self.config, decode_cache_length=max_decode_length)

        def run_decoder(tokens, cache=None, position=None):
            variables = {"params": params} if cache is None else {"params": params,
                                                                   "cache": cache}
            return module.apply(variables, encoded_RLD, segment_ids, tokens,
                                jnp.ones_like(tokens), decode_position=position,
                                method=Transformer.decode, mutable=["cache"])

        # A call on one position creates the cache; its logits are not used.
        cache = run_decoder(jnp.zeros((encoded_RLD.shape[0], 1), jnp.int32))[1]["cache"]

        def step_fn(tokens_R1, position, cache):
            logits_R1V, state = run_decoder(tokens_R1, cache, position)
            return logits_R1V[:, 0], state["cache"]

        return step_fn, cache


@dataclasses.dataclass(frozen=True)
class DecoderOnlyModel(Model):
    """A decoder-only T5: a causal LM, or a prefix-LM over inputs and targets concatenated
    (decoder_causal_attention marks the inputs)."""

    inputs_key: ClassVar[str] = "decoder_prompt_tokens"

    @property
    def module(self) -> DecoderOnlyTransformer:
        return DecoderOnlyTransformer(self.config)

    def _init_batch(self) -> Batch:
        tokens = jnp.ones((1, 2), jnp.int32)
        return {"decoder_input_tokens": tokens, "decoder_segment_ids": tokens,
                "decoder_causal_attention": tokens}

    def cached_decoder(self, params: Params, batch: Batch, max_decode_length: int,
                       copies: int = 1) -> tuple[decoding.StepFn, Any]:
        """(step_fn, initial cache) for continuing the prompts batch[inputs_key] [B, L] (the
        inputs, EOS-terminated, zero-padded), as the prefix-LM converter lays out training
        rows: a start token, then the inputs, attending bidirectionally. Each prompt is
        right-aligned to P = L + 1 positions, the padding before it masked, so every row's
        first target is at P (relative position biases see only distances, so the shift
        changes nothing); the prompts run in one pass, here. step_fn at position 0 returns
        the last prompt position's logits; position p > 0 writes its token at P + p - 1."""
        prompt_RP, valid_RP = right_aligned_prompts(batch[self.inputs_key])
        prompt_RP, valid_RP = (jnp.repeat(prompt_RP, copies, axis=0),
                               jnp.repeat(valid_RP, copies, axis=0))
        rows, prompt_length = prompt_RP.shape
        module = DecoderOnlyTransformer(self.config,
                                        decode_cache_length=prompt_length + max_decode_length)
        keys_valid_RS = jnp.concatenate(
            [valid_RP, jnp.ones((rows, max_decode_length), bool)], axis=1)

        def run(tokens, cache, offset):
            return module.apply({"params": params, "cache": cache}, tokens, offset,
                                keys_valid_RS, prompt_length,
                                method=DecoderOnlyTransformer.cached_positions,
                                mutable=["cache"])

        ones = jnp.ones((rows, 1), jnp.int32)
        empty = module.apply({"params": params}, {
            "decoder_input_tokens": ones, "decoder_segment_ids": ones}, mutable=["cache"])[1]
        logits_RPV, state = run(prompt_RP, empty["cache"], 0)
        # Named prompt_*: the same for every beam of a row (decoding.gather_cache).
        cache = {"layers": state["cache"], "prompt_last_logits": logits_RPV[:, -1]}

        def step_fn(tokens_R1, position, cache):
            def next_position(cache):
                logits_R1V, state = run(tokens_R1, cache["layers"],
                                        prompt_length + position - 1)
                return logits_R1V[:, 0], {**cache, "layers": state["cache"]}

            return jax.lax.cond(position == 0, lambda cache: (cache["prompt_last_logits"],
                                                              cache), next_position, cache)

        return step_fn, cache


def right_aligned_prompts(inputs_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Prompts [B, L + 1]: a start token 0 and each row's inputs (its non-zero tokens, which
    come first), moved to end at the last position; and a bool [B, L + 1], True from the
    start token on."""
    batch, length = inputs_BL.shape
    shift_B1 = length - jnp.sum(inputs_BL > 0, axis=1, keepdims=True)
    with_start_BP = jnp.concatenate([jnp.zeros((batch, 1), inputs_BL.dtype), inputs_BL], 1)
    source_BP = jnp.arange(length + 1)[None, :] - shift_B1
    valid_BP = source_BP >= 0
    prompt_BP = jnp.take_along_axis(with_start_BP, jnp.maximum(source_BP, 0), axis=1)
    return jnp.where(valid_BP, prompt_BP, 0), valid_BP


def model_for(config: T5Config) -> Model:
    """The model object of config's family."""
    family = DecoderOnlyModel if config.decoder_only else EncoderDecoderModel
    return family(config)


def count_parameters(params: Params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
