"""The kernels the hot path runs, chosen once per backend when a model is built (T5Config.
kernels()): attention, projections, the cross-entropy, the position bias's sum over the batch,
the token-embedding lookup and the precision of the one-hot matmuls that stand in for gathers
(the relative-bias lookup, LongT5's global-token sums).

- CPU: ops.py's hand-written backward passes, which dodge slow paths of XLA:CPU (transposes,
  leading-axis reductions, argmax; docs/performance.md), attention spelled out in einsums.
- GPU: cuDNN's fused attention (jax.nn.dot_product_attention) with the T5 bias and masks as
  one additive bias; plain autodiff elsewhere, default precision.
- TPU: Pallas flash attention with the bias; plain autodiff; the embedding lookup as a one-hot
  matmul, as T5X does on TPUs, whose backward pass is a matmul instead of a scatter-add.

Where a choice cannot take the model (cuDNN needs bfloat16 or float16 and a head dim that is
a multiple of 8 up to 128), the attention is XLA's, and the reason is said once per process.
Dropout on the attention weights (training with dropout_rate > 0) always goes through the
spelled-out einsums (layers.MultiHeadAttention).
"""
import dataclasses
import enum
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from t5x_lite import choices
from t5x_lite import ops


class Platform(enum.Enum):
    CPU = "cpu"
    GPU = "gpu"
    TPU = "tpu"


class Attention(enum.Enum):
    """How training and evaluation attend (decoding always uses the einsums)."""

    EINSUM = "einsum"  # ops.softmax_attention; autodiff through einsums with dropout
    XLA = "xla"  # jax.nn.dot_product_attention(implementation="xla")
    CUDNN = "cudnn"  # cuDNN's fused flash attention (NVIDIA GPUs)
    PALLAS_TPU = "pallas_tpu"  # jax.experimental.pallas.ops.tpu.flash_attention


class Embedding(enum.Enum):
    GATHER = "gather"  # a lookup; its backward pass scatter-adds (float32 on GPUs)
    ONE_HOT = "one_hot"  # a one-hot matmul; its backward pass is a matmul


# The bias of a masked (query, key) pair: zeroes its weight in float32 and bfloat16.
MASKED_LOGIT = -1e10
# cuDNN's flash attention (jax._src.cudnn.fused_attention_stablehlo.check_is_flash_attention).
CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
CUDNN_MAX_HEAD_DIM = 128  # 256 on Hopper; 128 holds on every GPU cuDNN's kernel runs on.
# Pallas flash attention's blocks (BlockSizes.get_default): lengths are padded to a multiple.
PALLAS_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The resolved choices. Callables take the shapes ops.py documents."""

    platform: Platform
    attention: Attention
    embedding: Embedding
    project: Callable  # (inputs [..., *I], kernel [*I, *O], dtype, contracting) -> [..., *O]
    add_position_bias: Callable  # (position [1, H, T, S], mask [B, 1, T, S]) -> [B, H, T, S]
    cross_entropy: Callable  # (logits [B, T, V], targets [B, T]) -> 3 x [B, T]
    precision: jax.lax.Precision
    # What differs from the platform's first choices and why, said once at start-up; or "".
    note: str = ""

    def attend(self, query_BTHK: jax.Array, key_BSHK: jax.Array, value_BSHK: jax.Array,
               bias_BHTS: jax.Array) -> jax.Array:
        """softmax(query . key + bias over S) . value: the context [B, T, H, K]."""
        return ATTENTION_FUNCTIONS[self.attention](query_BTHK, key_BSHK, value_BSHK,
                                                   bias_BHTS)

    def embed(self, table_VD: jax.Array, tokens_BT: jax.Array, dtype) -> jax.Array:
        """Rows of the float32 table [V, D] for tokens [B, T], in `dtype`: [B, T, D]."""
        if self.embedding is Embedding.ONE_HOT:
            one_hot_BTV = jax.nn.one_hot(tokens_BT, table_VD.shape[0], dtype=dtype)
            return jnp.einsum("BTV,VD->BTD", one_hot_BTV, table_VD.astype(dtype))
        # Looked up in float32: GPUs scatter-add float32 natively but emulate bfloat16.
        return jnp.take(table_VD, tokens_BT, axis=0).astype(dtype)


def platform_of(name: str) -> Platform:
    """The Platform of a JAX backend name (jax.default_backend(): 'cuda' and 'rocm' are
    GPUs)."""
    return Platform.GPU if name in ("cuda", "rocm") else Platform(name)


def resolve(platform: Platform | str | None, attention: Attention | str | None, dtype,
            head_dim: int, dropout_rate: float) -> Kernels:
    """The kernels for a model on `platform` (None or "auto": this process's backend), with
    `attention` (None or "auto": the platform's choice) when the model allows it."""
    platform = choices.parse(Platform, platform, "T5Config.kernel_platform", auto=True)
    platform = platform or platform_of(jax.default_backend())
    forced = choices.parse(Attention, attention, "T5Config.attention", auto=True)
    if platform is Platform.CPU:
        kernels = Kernels(platform, Attention.EINSUM, Embedding.GATHER, ops.project,
                          ops.add_position_bias, ops.softmax_cross_entropy,
                          jax.lax.Precision.HIGHEST)
    else:
        embedding = Embedding.ONE_HOT if platform is Platform.TPU else Embedding.GATHER
        first_choice = Attention.PALLAS_TPU if platform is Platform.TPU else Attention.CUDNN
        kernels = Kernels(platform, first_choice, embedding, ops.project_autodiff,
                          jnp.add, ops.softmax_cross_entropy_autodiff,
                          jax.lax.Precision.DEFAULT)
    if forced is not None:
        reason = _unfit(forced, jnp.dtype(dtype), head_dim)
        if reason:
            raise ValueError(f"T5Config.attention={forced.value!r}: {forced.value} "
                             f"attention {reason}; T5Config.attention='auto' falls back to "
                             "XLA's attention")
        return dataclasses.replace(kernels, attention=forced)
    reason = _unfit(kernels.attention, jnp.dtype(dtype), head_dim)
    if reason:
        kernels = dataclasses.replace(
            kernels, attention=Attention.XLA,
            note=f"{kernels.attention.value} attention {reason}: XLA's attention instead")
    elif dropout_rate > 0 and platform is not Platform.CPU:
        kernels = dataclasses.replace(kernels, note=(
            f"training steps attend through einsums, for dropout on the weights (dropout_rate "
            f"{dropout_rate}); evaluation uses {kernels.attention.value} attention"))
    say_once(kernels.note)
    return kernels


def _unfit(attention: Attention, dtype: np.dtype, head_dim: int) -> str:
    """Why `attention` cannot run this model, or ""."""
    if attention is Attention.CUDNN and dtype not in CUDNN_DTYPES:
        return f"needs bfloat16 activations (activation_dtype {dtype})"
    if attention is Attention.CUDNN and (head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM):
        return f"needs a head dim that is a multiple of 8 up to {CUDNN_MAX_HEAD_DIM} ({head_dim})"
    if attention is Attention.PALLAS_TPU and head_dim > PALLAS_BLOCK and head_dim % PALLAS_BLOCK:
        return f"needs a head dim up to {PALLAS_BLOCK} or a multiple of it ({head_dim})"
    return ""


@functools.cache
def say_once(note: str) -> None:
    if note:
        print(f"Attention: {note}.", flush=True)


def _xla_attention(query_BTHK, key_BSHK, value_BSHK, bias_BHTS):
    # T5 folds 1/sqrt(K) into the query initialiser: scale 1.
    return jax.nn.dot_product_attention(query_BTHK, key_BSHK, value_BSHK,
                                        bias=bias_BHTS.astype(query_BTHK.dtype), scale=1.0,
                                        implementation="xla")


def _cudnn_attention(query_BTHK, key_BSHK, value_BSHK, bias_BHTS):
    """cuDNN's kernel; its backward pass with a bias needs even lengths, so an odd length
    goes to XLA's attention (decided while tracing, from static shapes)."""
    if query_BTHK.shape[1] % 2 or key_BSHK.shape[1] % 2:
        say_once(f"cudnn attention needs even lengths with a bias (queries "
                          f"{query_BTHK.shape[1]}, keys {key_BSHK.shape[1]}): XLA's "
                          "attention for those")
        return _xla_attention(query_BTHK, key_BSHK, value_BSHK, bias_BHTS)
    return jax.nn.dot_product_attention(query_BTHK, key_BSHK, value_BSHK,
                                        bias=bias_BHTS.astype(query_BTHK.dtype), scale=1.0,
                                        implementation="cudnn")


def _pallas_tpu_attention(query_BTHK, key_BSHK, value_BSHK, bias_BHTS):
    """Pallas flash attention. XLA cannot partition a Mosaic kernel, so under a mesh it runs
    per device in a shard_map: rows split as the "batch" axis is, heads as "heads"."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return _pallas_tpu_attention_local(query_BTHK, key_BSHK, value_BSHK, bias_BHTS)

    def spec(logical_axes, shape):
        # A broadcast (size-1) dimension of the bias stays whole on every device.
        mesh_axes = nn.logical_to_mesh_axes(logical_axes)
        return PartitionSpec(*(None if size == 1 else axes
                               for axes, size in zip(mesh_axes, shape)))

    qkv_axes = ("batch", "length", "heads", "kv")
    in_specs = (spec(qkv_axes, query_BTHK.shape), spec(qkv_axes, key_BSHK.shape),
                spec(qkv_axes, value_BSHK.shape),
                spec(("batch", "heads", "length", None), bias_BHTS.shape))
    return jax.shard_map(_pallas_tpu_attention_local, mesh=mesh, in_specs=in_specs,
                         out_specs=in_specs[0], check_vma=False)(
        query_BTHK, key_BSHK, value_BSHK, bias_BHTS)


def _pallas_tpu_attention_local(query_BTHK, key_BSHK, value_BSHK, bias_BHTS):
    """Pallas flash attention, whose blocks are PALLAS_BLOCK long: queries and keys are padded
    to a multiple of it, padded keys masked by the bias, padded queries dropped."""
    from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash

    batch, queries, heads, _ = query_BTHK.shape
    keys = key_BSHK.shape[1]
    padded_queries, padded_keys = (-(-n // PALLAS_BLOCK) * PALLAS_BLOCK for n in (queries, keys))

    def heads_major(x_BLHK, length):
        x_BHLK = jnp.transpose(x_BLHK, (0, 2, 1, 3))
        return jnp.pad(x_BHLK, ((0, 0), (0, 0), (0, length - x_BHLK.shape[2]), (0, 0)))

    bias_BHTS = jnp.broadcast_to(bias_BHTS, (batch, heads, queries, keys))
    bias_BHTS = jnp.pad(bias_BHTS, ((0, 0), (0, 0), (0, padded_queries - queries),
                                    (0, padded_keys - keys)), constant_values=MASKED_LOGIT)
    context_BHTK = pallas_flash.flash_attention(
        heads_major(query_BTHK, padded_queries), heads_major(key_BSHK, padded_keys),
        heads_major(value_BSHK, padded_keys), ab=bias_BHTS.astype(query_BTHK.dtype),
        sm_scale=1.0)
    return jnp.transpose(context_BHTK[:, :, :queries], (0, 2, 1, 3))

ATTENTION_FUNCTIONS = {
    Attention.EINSUM: ops.softmax_attention,
    Attention.XLA: _xla_attention,
    Attention.CUDNN: _cudnn_attention,
    Attention.PALLAS_TPU: _pallas_tpu_attention,
}

# What a LayerConfig built without a model's choice runs: the CPU's kernels.
CPU_KERNELS = resolve(Platform.CPU, None, jnp.float32, 64, 0.0)
