"""Transformer building blocks of T5: embeddings, RMSNorm, attention with relative position
bias and packing masks, MLPs, and the memory transforms of a layer stack (remat, scan). Every
parameter and key activation carries logical axis names; this module knows nothing of meshes,
losses or training.

Dimension letters: B batch, L encoder length, T decoder length, S attended length (L or T),
D model, H heads, K head dim, F mlp, V vocab, R relative-position buckets.
"""
import dataclasses
import enum
import functools
import inspect
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5x_lite import kernels as kernels_lib
from t5x_lite import ops

MASKED_LOGIT = kernels_lib.MASKED_LOGIT


def partitioned(init: Callable, logical_axes: tuple[str, ...]) -> Callable:
    return nn.with_logical_partitioning(init, logical_axes)


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
    return nn.with_logical_constraint(x, logical_axes)


@dataclasses.dataclass(frozen=True)
class LayerConfig:
    """The fields a Transformer layer uses; models.T5Config holds and validates them."""

    d_model: int
    num_heads: int
    head_dim: int
    d_ff: int
    activation: Callable[[jax.Array], jax.Array]
    gated_mlp: bool
    dropout_rate: float
    dtype: jnp.dtype
    layer_norm_epsilon: float = 1e-6
    # The backend's kernels (kernels.py): CPU's unless the model says otherwise.
    kernels: kernels_lib.Kernels = kernels_lib.CPU_KERNELS


def relative_position_bucket(relative_position: np.ndarray | jax.Array, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> jax.Array:
    """Maps (key position - query position) to a bucket id in [0, num_buckets).

    Half the buckets (per direction, when bidirectional) hold exact small distances; the rest
    cover distances up to `max_distance` on a log scale (Raffel et al. 2020, section 2.1).
    """
    relative_position = jnp.asarray(relative_position)
    bucket = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket = jnp.where(relative_position > 0, num_buckets, 0)
        distance = jnp.abs(relative_position)
    else:
        distance = jnp.maximum(-relative_position, 0)
    max_exact = num_buckets // 2
    # Clamp before the log so distance 0 never reaches it; those entries take the exact branch.
    log_ratio = jnp.log(jnp.maximum(distance, max_exact).astype(jnp.float32) / max_exact)
    large = max_exact + (log_ratio / np.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(relative_position.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return bucket + jnp.where(distance < max_exact, distance, large)


class RelativePositionBias(nn.Module):
    """Learned scalar bias per (bucket, head), shared by all layers of one stack."""

    num_buckets: int
    max_distance: int
    num_heads: int
    bidirectional: bool
    dtype: jnp.dtype = jnp.float32
    # HIGHEST keeps the float32 table exact on CPUs; accelerators take their default.
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, query_length: int, key_length: int,
                 query_offset: jax.Array | int = 0) -> jax.Array:
        """Returns the bias [1, H, T, S] for queries at positions query_offset + [0, T).

        The bias depends only on key - query, one of N = T + S - 1 values: the N biases are
        looked up, then laid out as a Toeplitz matrix by reshaping, which is exact and needs
        neither a [T, S] gather (its backward pass scatter-adds T x S values into R rows,
        serialised on colliding atomics on GPUs) nor a [T, S, R] one-hot (memory-bound on
        CPUs).
        """
        table_RH = self.param(
            "rel_embedding",
            partitioned(nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
                        ("relpos_buckets", "heads")),
            (self.num_buckets, self.num_heads), jnp.float32)
        relative_position_N = jnp.arange(-(query_length - 1), key_length) - query_offset
        buckets_N = relative_position_bucket(relative_position_N, self.bidirectional,
                                             self.num_buckets, self.max_distance)
        # A one-hot matmul over N rows, not a gather, for the same reason; exact.
        one_hot_NR = jax.nn.one_hot(buckets_N, self.num_buckets, dtype=self.dtype)
        bias_HN = jnp.einsum("NR,RH->HN", one_hot_NR, table_RH.astype(self.dtype),
                             precision=self.precision)
        return ops.toeplitz(bias_HN, query_length, key_length)[None]


def attention_mask(query_segment_ids: jax.Array, key_segment_ids: jax.Array,
                   causal: bool) -> jax.Array:
    """Boolean [B, 1, T, S]: a query attends to non-padding keys of its own packed segment.

    Segment id 0 marks padding; causal masking uses positions within the packed row, which
    within one segment orders tokens exactly as the unpacked example would.
    """
    same_segment = query_segment_ids[:, :, None] == key_segment_ids[:, None, :]
    mask = same_segment & (key_segment_ids[:, None, :] > 0) & (query_segment_ids[:, :, None] > 0)
    if causal:
        query_length, key_length = query_segment_ids.shape[1], key_segment_ids.shape[1]
        mask &= jnp.tril(jnp.ones((query_length, key_length), dtype=bool))[None]
    return mask[:, None]


def prefix_lm_mask(segment_ids_BT: jax.Array, causal_attention_BT: jax.Array) -> jax.Array:
    """Boolean [B, 1, T, T] of a decoder-only model: causal within each packed segment, and
    bidirectional among the positions whose decoder_causal_attention is 1 (a prefix-LM's
    inputs; T5X's make_decoder_mask)."""
    prefix_BT = causal_attention_BT > 0
    both_prefix = prefix_BT[:, None, :, None] & prefix_BT[:, None, None, :]
    return (attention_mask(segment_ids_BT, segment_ids_BT, causal=True)
            | (attention_mask(segment_ids_BT, segment_ids_BT, causal=False) & both_prefix))


def mask_to_bias(mask: jax.Array, dtype: jnp.dtype) -> jax.Array:
    return jnp.where(mask, 0.0, MASKED_LOGIT).astype(dtype)


def attention_projection(config: LayerConfig, name: str, stddev_scale: float) -> nn.Einsum:
    """The query, key or value projection [B, T, D] -> [B, T, H, K] named `name`."""
    init = nn.initializers.variance_scaling(stddev_scale, "fan_in", "normal",
                                            in_axis=-3, out_axis=(-2, -1))
    return nn.Einsum((config.d_model, config.num_heads, config.head_dim), "BTD,DHK->BTHK",
                     use_bias=False, name=name, dtype=config.dtype,
                     kernel_init=partitioned(init, ("embed", "heads", "kv")))


def output_projection(config: LayerConfig) -> Callable[[jax.Array], jax.Array]:
    """The attention's output projection "out": context [B, T, H, K] -> [B, T, D]."""
    init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=(-3, -2),
                                            out_axis=-1)
    einsum = nn.Einsum((config.num_heads, config.head_dim, config.d_model), "BTHK,HKD->BTD",
                       use_bias=False, name="out", dtype=config.dtype,
                       kernel_init=partitioned(init, ("heads", "kv", "embed")))
    return lambda context_BTHK: constrain(einsum(context_BTHK), ("batch", "length", "embed"))


def attend(config: LayerConfig, query_BTHK: jax.Array, key_BSHK: jax.Array,
           value_BSHK: jax.Array, bias_BHTS: jax.Array, deterministic: bool) -> jax.Array:
    """The context [B, T, H, K]: the backend's attention kernel, or with dropout on the
    weights (training, dropout_rate > 0) the einsums spelled out, through autodiff. Call from
    within a compact method: the dropout belongs to the calling module."""
    if deterministic or not config.dropout_rate:
        return config.kernels.attend(query_BTHK, key_BSHK, value_BSHK, bias_BHTS)
    logits_BHTS = jnp.einsum("BTHK,BSHK->BHTS", query_BTHK, key_BSHK)
    return softmax_dropout_attend(config, logits_BHTS, bias_BHTS, "BSHK", value_BSHK,
                                  deterministic)


def softmax_dropout_attend(config: LayerConfig, logits_BHTS: jax.Array, bias_BHTS: jax.Array,
                           values_layout: str, values: jax.Array,
                           deterministic: bool) -> jax.Array:
    """The context [B, T, H, K]: softmax(logits + bias) over S, dropout, times the values."""
    # Softmax in float32: bfloat16 loses the small probabilities that long contexts need.
    logits_BHTS = logits_BHTS.astype(jnp.float32) + bias_BHTS.astype(jnp.float32)
    weights_BHTS = jax.nn.softmax(logits_BHTS, axis=-1).astype(config.dtype)
    weights_BHTS = nn.Dropout(config.dropout_rate)(weights_BHTS, deterministic=deterministic)
    return jnp.einsum(f"BHTS,{values_layout}->BTHK", weights_BHTS, values)


class MultiHeadAttention(nn.Module):
    """T5 attention: no 1/sqrt(K) logit scaling (it is folded into the query initialiser).

    Decoding keeps a "cache" collection. With `cache_length` > 0 (decoder self-attention)
    the first call creates a zero key/value cache of that many positions; each later call
    takes one position [B, 1, D], writes its key and value at the cache's index and attends
    over the whole cache (the bias masks positions not yet written). With
    `cache_projected_inputs` (attention to the encoder output) the first call stores the
    projected keys and values of `inputs_kv`, and later calls reuse them instead of
    projecting the encoder output again at every position.
    """

    config: LayerConfig
    cache_length: int = 0
    cache_projected_inputs: bool = False

    @nn.compact
    def __call__(self, inputs_q_BTD: jax.Array, inputs_kv_BSD: jax.Array, bias_BHTS: jax.Array,
                 deterministic: bool) -> jax.Array:
        cfg = self.config
        projection = functools.partial(attention_projection, cfg)
        query_BTHK = constrain(projection("query", 1.0 / cfg.head_dim)(inputs_q_BTD),
                               ("batch", "length", "heads", "kv"))
        if self.cache_projected_inputs or self.cache_length:
            # Decoding: keys [B, H, K, S] and values [B, H, S, K], the layouts in which one
            # query position attends without transposing the cache at every step.
            key_BHKS, value_BHSK = self._decoding_keys_values(
                inputs_kv_BSD, lambda name: projection(name, 1.0))
            logits_BHTS = jnp.einsum("BTHK,BHKS->BHTS", query_BTHK, key_BHKS)
            context_BTHK = softmax_dropout_attend(cfg, logits_BHTS, bias_BHTS, "BHSK",
                                                  value_BHSK, deterministic)
        else:
            key_BSHK = constrain(projection("key", 1.0)(inputs_kv_BSD),
                                 ("batch", "length", "heads", "kv"))
            value_BSHK = constrain(projection("value", 1.0)(inputs_kv_BSD),
                                   ("batch", "length", "heads", "kv"))
            context_BTHK = attend(cfg, query_BTHK, key_BSHK, value_BSHK, bias_BHTS,
                                  deterministic)
        return output_projection(cfg)(context_BTHK)

    def _decoding_keys_values(self, inputs_kv_BSD: jax.Array, projection: Callable
                              ) -> tuple[jax.Array, jax.Array]:
        """Keys [B, H, K, S] and values [B, H, S, K] to attend to while decoding: the
        projected encoder output, stored by the first call and reused after; or the
        self-attention cache with this call's positions written at its index."""
        if self.cache_projected_inputs and self.has_variable("cache", "cross_key"):
            return (self.get_variable("cache", "cross_key"),
                    self.get_variable("cache", "cross_value"))
        key_BHKS = jnp.transpose(projection("key")(inputs_kv_BSD), (0, 2, 3, 1))
        value_BHSK = jnp.transpose(projection("value")(inputs_kv_BSD), (0, 2, 1, 3))
        if self.cache_projected_inputs:
            if self.is_mutable_collection("cache"):
                self.put_variable("cache", "cross_key", key_BHKS)
                self.put_variable("cache", "cross_value", value_BHSK)
            return key_BHKS, value_BHSK
        return self._cached(key_BHKS, value_BHSK)

    def _cached(self, key_BHKT: jax.Array, value_BHTK: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
        """The self-attention cache (cache_length positions) after writing this call's T
        positions at its index; the first call creates it empty and attends to its own."""
        initialized = self.has_variable("cache", "cached_key")
        batch, heads, head_dim, _ = key_BHKT.shape
        cached_key = self.variable("cache", "cached_key", jnp.zeros,
                                   (batch, heads, head_dim, self.cache_length), key_BHKT.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros,
                                     (batch, heads, self.cache_length, head_dim),
                                     value_BHTK.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        if not initialized:
            return key_BHKT, value_BHTK
        position = index.value
        cached_key.value = jax.lax.dynamic_update_slice_in_dim(cached_key.value, key_BHKT,
                                                               position, axis=3)
        cached_value.value = jax.lax.dynamic_update_slice_in_dim(cached_value.value,
                                                                 value_BHTK, position, axis=2)
        index.value = position + key_BHKT.shape[3]
        return cached_key.value, cached_value.value


class Mlp(nn.Module):
    """Feed-forward block: gated (T5 v1.1, act(x W0) * (x W1)) or plain (T5 v1.0, act(x W)).

    With `num_experts` > 0 it is that many independent MLPs applied to expert inputs
    [E, G, C, D] (moe.SparseMlp's experts): each kernel gains a leading expert dimension.
    `valid_BT` is accepted so that dense and sparse MLPs are called alike; a dense MLP
    treats every token the same.
    """

    config: LayerConfig
    num_experts: int = 0

    @nn.compact
    def __call__(self, inputs: jax.Array, deterministic: bool,
                 valid_BT: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        if self.num_experts:
            lead, kernel_lead, kernel_shape = "EGC", "E", (self.num_experts,)
            lead_axes, kernel_axes = ("expert", "expert_group", None), ("expert",)
        else:
            lead, kernel_lead, kernel_shape, lead_axes, kernel_axes = "BT", "", (), (
                "batch", "length"), ()
        # fan_in is the input width alone: every expert starts like a dense MLP.
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                batch_axis=(0,) if self.num_experts else ())

        def dense(shape: tuple[int, int], name: str, axes: tuple[str, str]) -> nn.Einsum:
            return nn.Einsum(kernel_shape + shape, f"{lead}X,{kernel_lead}XY->{lead}Y",
                             use_bias=False, name=name, dtype=cfg.dtype,
                             kernel_init=partitioned(init, kernel_axes + axes))

        up = (cfg.d_model, cfg.d_ff)
        if cfg.gated_mlp:
            # One matmul against both kernels stacked [.., D, 2, F]: on CPU the backward pass
            # then needs no transposed copy to add the two input gradients (docs/performance.md).
            kernel_init = partitioned(init, kernel_axes + ("embed", "mlp"))
            kernels = jnp.stack([Kernel(kernel_shape + up, kernel_init, name=name)()
                                 for name in ("wi_0", "wi_1")], axis=-2).astype(cfg.dtype)
            if self.num_experts:
                both = jnp.einsum(f"{lead}X,{kernel_lead}XWY->{lead}WY",
                                  inputs.astype(cfg.dtype), kernels)
            else:
                both = cfg.kernels.project(inputs, kernels, cfg.dtype)
            hidden = cfg.activation(both[..., 0, :]) * both[..., 1, :]
        else:
            hidden = cfg.activation(dense(up, "wi", ("embed", "mlp"))(inputs))
        hidden = constrain(hidden, lead_axes + ("mlp",))
        hidden = nn.Dropout(cfg.dropout_rate)(hidden, deterministic=deterministic)
        output = dense((cfg.d_ff, cfg.d_model), "wo", ("mlp", "embed"))(hidden)
        return constrain(output, lead_axes + ("embed",))


class Kernel(nn.Module):
    """A float32 parameter "kernel" of `shape`, for layers that combine kernels before
    multiplying (its path matches nn.Einsum's: <name>/kernel)."""

    shape: tuple[int, ...]
    init: Callable

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("kernel", self.init, self.shape, jnp.float32)


def rms_norm(config: LayerConfig, name: str | None = None) -> nn.RMSNorm:
    """T5's layer norm: scale only, no mean subtraction, statistics in float32."""
    return nn.RMSNorm(epsilon=config.layer_norm_epsilon, dtype=config.dtype,
                      param_dtype=jnp.float32, name=name,
                      scale_init=partitioned(nn.initializers.ones, ("embed",)))


def feed_forward(x_BTD: jax.Array, valid_BT: jax.Array, deterministic: bool,
                 config: LayerConfig, mlp_block: Callable[..., nn.Module],
                 extra_dense_mlp: bool) -> jax.Array:
    """The MLP sublayer(s) of a layer, pre-norm and residual: `mlp_block` (Mlp, or a sparse
    MLP from moe.py), after one more dense MLP when `extra_dense_mlp` (ST-MoE). Call from
    within a compact method: the submodules belong to the calling layer."""
    dropout = nn.Dropout(config.dropout_rate, broadcast_dims=(-2,))
    if extra_dense_mlp:
        normed_BTD = rms_norm(config, "pre_extra_mlp_norm")(x_BTD)
        x_BTD = x_BTD + dropout(Mlp(config, name="extra_mlp")(normed_BTD, deterministic),
                                deterministic)
    normed_BTD = rms_norm(config, "pre_mlp_norm")(x_BTD)
    return x_BTD + dropout(mlp_block(config, name="mlp")(normed_BTD, deterministic, valid_BT),
                           deterministic)


class EncoderAttention(enum.Enum):
    """T5Config.encoder_attention: what an encoder token attends to (LongT5, Guo et al. 2022,
    in long_attention.py for the other two)."""

    FULL = "full"  # every token of its segment (T5)
    LOCAL = "local"  # the tokens of its segment within local_radius of it
    # Those, and one global token per global_block_size tokens of its segment: their sum.
    TRANSIENT_GLOBAL = "transient_global"


class EncoderLayer(nn.Module):
    """Self-attention then MLP: an encoder's layer, and a decoder-only model's (whose bias
    makes it causal). `valid_BL` marks real (non-padding) tokens for sparse MLPs. With
    `cache_length` > 0 (decoder-only decoding) the self-attention keeps a key/value cache of
    that many positions, as DecoderLayer's does. `attention_block` replaces MultiHeadAttention
    by LongT5's (long_attention.LongSelfAttention, whose bias is a LongAttentionBias)."""

    config: LayerConfig
    mlp_block: Callable[..., nn.Module] = Mlp
    extra_dense_mlp: bool = False
    cache_length: int = 0
    attention_block: Callable[..., nn.Module] | None = None

    @nn.compact
    def __call__(self, x_BLD: jax.Array, bias_BHLL, valid_BL: jax.Array,
                 deterministic: bool) -> jax.Array:
        cfg = self.config
        dropout = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
        normed_BLD = rms_norm(cfg, "pre_attention_norm")(x_BLD)
        if self.attention_block is None:
            attended_BLD = MultiHeadAttention(cfg, self.cache_length, name="attention")(
                normed_BLD, normed_BLD, bias_BHLL, deterministic)
        else:
            attended_BLD = self.attention_block(cfg, name="attention")(
                normed_BLD, bias_BHLL, deterministic)
        x_BLD = x_BLD + dropout(attended_BLD, deterministic)
        x_BLD = feed_forward(x_BLD, valid_BL, deterministic, cfg, self.mlp_block,
                             self.extra_dense_mlp)
        return constrain(x_BLD, ("batch", "length", "embed"))


class DecoderLayer(nn.Module):
    """Causal self-attention, attention to the encoder output, then MLP. With `cache_length`
    > 0 (decoding one position at a time) the self-attention keeps that many positions of
    keys and values in a cache, and the attention to the encoder output its projections."""

    config: LayerConfig
    mlp_block: Callable[..., nn.Module] = Mlp
    extra_dense_mlp: bool = False
    cache_length: int = 0

    @nn.compact
    def __call__(self, y_BTD: jax.Array, encoded_BLD: jax.Array, self_bias_BHTT: jax.Array,
                 cross_bias_BHTL: jax.Array, valid_BT: jax.Array,
                 deterministic: bool) -> jax.Array:
        cfg = self.config
        dropout = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
        normed_BTD = rms_norm(cfg, "pre_self_attention_norm")(y_BTD)
        y_BTD = y_BTD + dropout(
            MultiHeadAttention(cfg, self.cache_length, name="self_attention")(
                normed_BTD, normed_BTD, self_bias_BHTT, deterministic),
            deterministic)
        normed_BTD = rms_norm(cfg, "pre_cross_attention_norm")(y_BTD)
        y_BTD = y_BTD + dropout(
            MultiHeadAttention(cfg, cache_projected_inputs=self.cache_length > 0,
                               name="encoder_decoder_attention")(
                normed_BTD, encoded_BLD, cross_bias_BHTL, deterministic), deterministic)
        y_BTD = feed_forward(y_BTD, valid_BT, deterministic, cfg, self.mlp_block,
                             self.extra_dense_mlp)
        return constrain(y_BTD, ("batch", "length", "embed"))


class RematPolicy(enum.Enum):
    """T5Config.remat_policy: what a rematerialised layer keeps for the backward pass."""

    # Keep everything: the layer is not wrapped in nn.remat at all.
    NONE = "none"
    # Keep only the outputs of the weight matmuls (q/k/v/out projections, MLP wi/wo): as
    # dot_generals they have no batch dimensions, while the attention logits and context
    # einsums are batched over B and H and are not kept. checkpoint_dots would also keep
    # those [B, H, T, S] logits, the one activation that grows with length squared.
    MINIMAL = "minimal"
    # Keep nothing: the whole layer is recomputed from its input in the backward pass.
    FULL = "full"


CHECKPOINT_POLICIES = {
    RematPolicy.MINIMAL: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    RematPolicy.FULL: jax.checkpoint_policies.nothing_saveable,
}


def rematerialised(layer_class: type[nn.Module], policy: RematPolicy, scanned: bool
                   ) -> type[nn.Module]:
    """`layer_class`, recomputed in the backward pass as `policy` says. Its __call__'s
    `deterministic` argument chooses Python branches (dropout), so it is static: found by
    name, wherever it stands."""
    if policy is RematPolicy.NONE:
        return layer_class
    # Counting self as 0, as nn.remat does.
    argnum = list(inspect.signature(layer_class.__call__).parameters).index("deterministic")
    # Inside nn.scan the loop body already keeps XLA from merging the recomputation back into
    # the forward pass; prevent_cse's barriers would only cost time (nn.remat's docstring).
    return nn.remat(layer_class, policy=CHECKPOINT_POLICIES[policy], prevent_cse=not scanned,
                    static_argnums=(argnum,))


def scan_layers(layer: nn.Module, num_layers: int, x: jax.Array, *shared) -> jax.Array:
    """Applies `layer` num_layers times, each time with its own slice of parameters.

    The parameters are stacked along a new leading logical axis "layers"; `shared` (biases,
    encoder output, `deterministic`) are broadcast to every layer. Each layer draws its own
    dropout masks.
    """
    def body(module: nn.Module, carry: jax.Array, *args) -> tuple[jax.Array, None]:
        return module(carry, *args), None

    scanned = nn.scan(body, variable_axes={"params": 0, "intermediates": 0, "cache": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast,) * len(shared), length=num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(layer, x, *shared)[0]
