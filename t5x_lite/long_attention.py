"""LongT5's encoder self-attention (Guo et al. 2022): local attention, each token attending to
the tokens of its packed segment within `local_radius` of it, and transient-global attention,
which adds one global token per `global_block_size` tokens of the segment (their sum, normed).
The decoder, and everything else of the model, is T5's (layers.py).

Local attention runs blockwise, so memory grows linearly with the length: the inputs are cut
into blocks of C = local_radius + 1 tokens (padded to a whole number of blocks), and each
block's queries attend to the keys of three blocks, the previous, its own and the next
(3C keys, G global ones after them), masked to |query - key| <= local_radius. The blocks fold
into the batch dimension, so the backend's attention kernel (kernels.py) runs on them.

Dimension letters as in layers.py, and: C block length, N = B x blocks (query blocks),
G global tokens (L // global_block_size), n blocks per row.
"""
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from t5x_lite import layers


@flax.struct.dataclass
class LongAttentionBias:
    """What every layer of a LongT5 encoder shares, built once by `long_attention_bias`: the
    bias [N, H, C, 3C + G] of each query block over its three neighbour blocks (and the G
    global tokens, G = 0 for local attention), and each token's global block [B, L] (-1:
    none; None for local attention), along which the layers sum their inputs into global
    tokens."""

    bias_NHCS: jax.Array
    global_block_BL: jax.Array | None = None


def split_into_blocks(x_BL: jax.Array, block_length: int, pad_value=0) -> jax.Array:
    """[B, L, ...] -> [B, n, C, ...], the length padded with `pad_value` to n x C."""
    padding = -x_BL.shape[1] % block_length
    x_BL = jnp.pad(x_BL, [(0, 0), (0, padding)] + [(0, 0)] * (x_BL.ndim - 2),
                   constant_values=pad_value)
    return x_BL.reshape(x_BL.shape[0], -1, block_length, *x_BL.shape[2:])


def three_blocks(x_BnC: jax.Array, pad_value=0) -> jax.Array:
    """[B, n, C, ...] -> [B, n, 3C, ...]: each block after the previous one and before the
    next (blocks of `pad_value` beyond the ends)."""
    padded = jnp.pad(x_BnC, [(0, 0), (1, 1)] + [(0, 0)] * (x_BnC.ndim - 2),
                     constant_values=pad_value)
    return jnp.concatenate([padded[:, :-2], padded[:, 1:-1], padded[:, 2:]], axis=2)


def local_mask(segment_ids_BL: jax.Array, block_length: int) -> jax.Array:
    """Boolean [B, n, C, 3C]: query i of a block sees key j of its three neighbour blocks when
    |i - j| < C, both belong to one segment and the key is not padding (segment id 0)."""
    queries_BnC = split_into_blocks(segment_ids_BL, block_length)
    keys_BnS = three_blocks(queries_BnC)
    key_S = jnp.arange(3 * block_length)
    query_C = jnp.arange(block_length, 2 * block_length)
    near_CS = jnp.abs(key_S[None, :] - query_C[:, None]) < block_length
    same_segment = queries_BnC[..., :, None] == keys_BnS[..., None, :]
    return same_segment & (keys_BnS[..., None, :] > 0) & near_CS[None, None]


def global_block_ids(segment_ids_BL: jax.Array, block_size: int
                     ) -> tuple[jax.Array, jax.Array]:
    """Each token's global block [B, L] and each global block's segment id [B, G], for
    G = L // block_size global blocks a row.

    Within a segment, tokens k x block_size ... (k + 1) x block_size - 1 of it form its k-th
    global block; the tokens after its last whole block join that block, and a segment
    shorter than block_size has none (-1), as padding has (Hugging Face's LongT5 for a row
    of one segment, flaxformer's fixed blocks). A packed row numbers the blocks of its
    segments one after another, so at most G exist; the rest have segment id 0.
    """
    batch, length = segment_ids_BL.shape
    num_globals = length // block_size
    position_L = jnp.arange(length)
    starts_BL = jnp.concatenate([jnp.ones((batch, 1), bool),
                                 segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1]], axis=1)
    start_BL = jax.lax.cummax(jnp.where(starts_BL, position_L[None, :], 0), axis=1)
    in_segment_BL = position_L[None, :] - start_BL
    real_BL = segment_ids_BL > 0
    # A token's block is whole when the block's last position lies in the same segment.
    block_end_BL = position_L[None, :] + block_size - 1 - in_segment_BL % block_size
    end_segment_BL = jnp.take_along_axis(segment_ids_BL, jnp.minimum(block_end_BL, length - 1),
                                         axis=1)
    whole_BL = real_BL & (block_end_BL < length) & (end_segment_BL == segment_ids_BL)
    ends_BL = (real_BL & (in_segment_BL % block_size == block_size - 1)).astype(jnp.int32)
    earlier_BL = jnp.cumsum(ends_BL, axis=1) - ends_BL  # whole blocks ended before
    ids_BL = jnp.where(whole_BL, earlier_BL,
                       jnp.where(real_BL & (in_segment_BL >= block_size), earlier_BL - 1, -1))
    segments_BG = jax.vmap(lambda segments, ids: jax.ops.segment_max(
        segments, jnp.where(ids < 0, num_globals, ids), num_segments=num_globals + 1))(
        segment_ids_BL, ids_BL)[:, :num_globals]
    return ids_BL.astype(jnp.int32), jnp.maximum(segments_BG, 0)


def sum_global_blocks(x_BLD: jax.Array, global_block_BL: jax.Array, num_globals: int,
                      precision: jax.lax.Precision | None = None) -> jax.Array:
    """The global tokens' inputs [B, G, D] in float32: the sum of each block's tokens (none
    of the tokens without one, block -1). A one-hot matmul, as Hugging Face's LongT5 sums
    them, not a segment sum: that is a scatter-add in every layer, forward and backward,
    serialised on colliding atomics on GPUs."""
    one_hot_BLG = jax.nn.one_hot(global_block_BL, num_globals, dtype=jnp.float32)
    return jnp.einsum("BLG,BLD->BGD", one_hot_BLG, x_BLD.astype(jnp.float32),
                      precision=precision)


class GlobalRelativePositionBias(nn.Module):
    """Transient-global attention's bias of a token towards each global token: a learned
    scalar per (bucket, head) of the distance in global blocks from the token's block to
    the global token's, shared by all layers (HF's global_relative_attention_bias)."""

    num_buckets: int
    max_distance: int
    num_heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, global_block_XT: jax.Array, num_globals: int) -> jax.Array:
        """The bias [..., H, T, G] for tokens whose global blocks are global_block [..., T]."""
        table_RH = self.param(
            "rel_embedding",
            layers.partitioned(nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
                               ("relpos_buckets", "heads")),
            (self.num_buckets, self.num_heads), jnp.float32)
        global_G = jnp.arange(num_globals).reshape((1,) * global_block_XT.ndim + (-1,))
        relative_XTG = global_G - global_block_XT[..., None]
        buckets_XTG = layers.relative_position_bucket(relative_XTG, True, self.num_buckets,
                                                      self.max_distance)
        bias_XTGH = jnp.take(table_RH.astype(self.dtype), buckets_XTG, axis=0)
        return jnp.moveaxis(bias_XTGH, -1, -3)


def long_attention_bias(segment_ids_BL: jax.Array, local_radius: int,
                        position_bias: layers.RelativePositionBias, add_position_bias,
                        dtype: jnp.dtype,
                        global_position_bias: GlobalRelativePositionBias | None = None,
                        global_block_size: int = 0) -> LongAttentionBias:
    """The bias of a LongT5 encoder's layers: the relative position bias of T5 between each
    query block and its three neighbour blocks plus the local mask (`add_position_bias` is
    kernels.Kernels.add_position_bias); with `global_position_bias` (transient-global), the
    bias towards the global tokens of each token's own segment after them."""
    block = local_radius + 1
    batch = segment_ids_BL.shape[0]
    mask_BnCS = local_mask(segment_ids_BL, block)
    blocks = mask_BnCS.shape[1]
    local_NHCS = add_position_bias(
        position_bias(block, 3 * block, block),
        layers.mask_to_bias(mask_BnCS.reshape(batch * blocks, 1, block, 3 * block), dtype))
    if global_position_bias is None:
        return LongAttentionBias(local_NHCS)
    global_block_BL, segments_BG = global_block_ids(segment_ids_BL, global_block_size)
    num_globals = segments_BG.shape[1]
    queries_BnC = split_into_blocks(segment_ids_BL, block)
    visible_BnCG = ((queries_BnC[..., None] == segments_BG[:, None, None, :])
                    & (queries_BnC[..., None] > 0))
    side_BnHCG = (global_position_bias(split_into_blocks(global_block_BL, block, -1),
                                       num_globals)
                  + layers.mask_to_bias(visible_BnCG[:, :, None], dtype))
    side_NHCG = side_BnHCG.reshape(batch * blocks, *side_BnHCG.shape[2:])
    return LongAttentionBias(jnp.concatenate([local_NHCS, side_NHCG.astype(local_NHCS.dtype)],
                                             axis=-1), global_block_BL)


class LongSelfAttention(nn.Module):
    """LongT5's encoder self-attention over a LongAttentionBias, with MultiHeadAttention's
    projections (query, key, value, out) and, for transient-global attention, a norm of the
    global tokens' inputs per layer (global_input_norm), whose keys and values the same
    projections give."""

    config: layers.LayerConfig
    transient_global: bool = False

    @nn.compact
    def __call__(self, x_BLD: jax.Array, bias: LongAttentionBias,
                 deterministic: bool) -> jax.Array:
        cfg = self.config
        batch, length = x_BLD.shape[:2]
        block = bias.bias_NHCS.shape[-2]
        query, key, value = (layers.attention_projection(cfg, name, scale) for name, scale in
                             (("query", 1.0 / cfg.head_dim), ("key", 1.0), ("value", 1.0)))
        axes = ("batch", "length", "heads", "kv")

        def folded(x_BnXHK):  # blocks into the batch dimension: [N, X, H, K]
            return layers.constrain(
                x_BnXHK.reshape(x_BnXHK.shape[0] * x_BnXHK.shape[1], *x_BnXHK.shape[2:]),
                axes)

        query_NCHK = folded(split_into_blocks(query(x_BLD), block))
        key_NSHK = folded(three_blocks(split_into_blocks(key(x_BLD), block)))
        value_NSHK = folded(three_blocks(split_into_blocks(value(x_BLD), block)))
        if self.transient_global:
            num_globals = bias.bias_NHCS.shape[-1] - 3 * block
            globals_BGD = layers.rms_norm(cfg, "global_input_norm")(sum_global_blocks(
                x_BLD, bias.global_block_BL, num_globals, cfg.kernels.precision))
            blocks = query_NCHK.shape[0] // batch

            def each_block(x_BGHK):  # the same global keys and values for every block
                return folded(jnp.broadcast_to(x_BGHK[:, None],
                                               (batch, blocks, *x_BGHK.shape[1:])))

            key_NSHK = jnp.concatenate([key_NSHK, each_block(key(globals_BGD))], axis=1)
            value_NSHK = jnp.concatenate([value_NSHK, each_block(value(globals_BGD))], axis=1)
        context_NCHK = layers.attend(cfg, query_NCHK, key_NSHK, value_NSHK, bias.bias_NHCS,
                                     deterministic)
        context_BLHK = context_NCHK.reshape(batch, -1, *context_NCHK.shape[2:])[:, :length]
        return layers.output_projection(cfg)(context_BLHK)
