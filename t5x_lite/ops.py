"""Array operations with hand-written backward passes, for the places where autodiff's
version meets a slow path of XLA:CPU (measured in docs/performance.md): reductions over a
leading axis, argmax, transposes, and kernel gradients whose operands XLA transposes itself.
Each is exact and tested against float64 NumPy gradients (tests/ops_test.py; the
cross-entropy through models.cross_entropy_sums in tests/models_test.py).

Dimension letters as in layers.py: B batch, T queries, S keys, H heads, K head dim, V vocab,
N rows (flattened leading dimensions), I / O a kernel's input / output dimensions.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def project(inputs: jax.Array, kernel: jax.Array, dtype: jnp.dtype,
            contracting: int = 1) -> jax.Array:
    """inputs [..., *I] times kernel [*I, *O] -> [..., *O] in `dtype`, I being the kernel's
    first `contracting` dimensions, with a backward pass that transposes the smaller of the
    inputs and the output gradient itself (see _contract_backward). The kernel keeps its
    dimensions, so that their shardings carry over unchanged."""
    lead_shape = inputs.shape[:inputs.ndim - contracting]
    inputs_NI = inputs.astype(dtype).reshape((-1,) + kernel.shape[:contracting])
    output_NO = _contract(contracting, inputs_NI, kernel.astype(dtype))
    return output_NO.reshape(lead_shape + kernel.shape[contracting:])


def project_autodiff(inputs: jax.Array, kernel: jax.Array, dtype: jnp.dtype,
                     contracting: int = 1) -> jax.Array:
    """`project` with autodiff's backward pass, for backends whose compilers lay out the
    transposes themselves (GPUs, TPUs)."""
    return jnp.tensordot(inputs.astype(dtype), kernel.astype(dtype), axes=contracting)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _contract(contracting: int, inputs_NI: jax.Array, kernel_IO: jax.Array) -> jax.Array:
    """inputs [N, *I] . kernel [*I, *O] -> [N, *O]."""
    return jnp.tensordot(inputs_NI, kernel_IO, axes=contracting)


def _contract_forward(contracting, inputs_NI, kernel_IO):
    return _contract(contracting, inputs_NI, kernel_IO), (inputs_NI, kernel_IO)


def _contract_backward(contracting, residuals, gradient_NO):
    """The kernel gradient inputs^T . gradient contracts the major dimension N of both. XLA:CPU
    left alone transposes one operand with a fused copy, often the larger one and in the
    producer's loop (for the 912 x 32,128 logits gradient: 100 ms for the layer's forward
    and backward passes against 62 ms here). The transpose is materialised here, behind an
    optimisation barrier so that XLA cannot fold it back into the matmul."""
    inputs_NI, kernel_IO = residuals
    output_rank = kernel_IO.ndim - contracting
    inputs_gradient_NI = jnp.tensordot(
        gradient_NO, kernel_IO, axes=(tuple(range(1, gradient_NO.ndim)),
                                       tuple(range(contracting, kernel_IO.ndim))))
    if math.prod(inputs_NI.shape[1:]) <= math.prod(gradient_NO.shape[1:]):
        inputs_IN = jax.lax.optimization_barrier(jnp.moveaxis(inputs_NI, 0, -1))
        kernel_gradient_IO = jnp.tensordot(inputs_IN, gradient_NO, axes=1)
    else:
        gradient_ON = jax.lax.optimization_barrier(jnp.moveaxis(gradient_NO, 0, -1))
        kernel_gradient_OI = jnp.tensordot(gradient_ON, inputs_NI, axes=1)
        kernel_gradient_IO = jnp.transpose(
            kernel_gradient_OI, tuple(range(output_rank, kernel_IO.ndim)) + tuple(
                range(output_rank)))
    return inputs_gradient_NI, kernel_gradient_IO


_contract.defvjp(_contract_forward, _contract_backward)


def toeplitz(values_HN: jax.Array, rows: int, columns: int) -> jax.Array:
    """[H, rows, columns] with entry [h, q, k] = values_HN[h, k - q + rows - 1], where
    N = rows + columns - 1: each row is the previous one shifted right by one.

    Tiling the values with one extra entry, period N + 1, and reading the tiling back N
    entries a row starts row q at offset -q modulo N + 1, so a plain reshape and slice do it.
    """
    heads, length = values_HN.shape
    if length != rows + columns - 1:
        raise ValueError(f"toeplitz needs rows + columns - 1 = {rows + columns - 1} values, "
                         f"got {length}")
    period_HM = jnp.pad(values_HN, ((0, 0), (0, 1)))
    tiled_HX = jnp.tile(period_HM, (1, rows))[:, :rows * length]
    return tiled_HX.reshape(heads, rows, length)[:, :, rows - 1:rows - 1 + columns]


@jax.custom_vjp
def add_position_bias(position_bias_1HTS: jax.Array, mask_bias_B1TS: jax.Array) -> jax.Array:
    """position_bias + mask_bias [B, H, T, S], with a backward pass that sums the position
    bias's gradient over the batch as a matmul: XLA:CPU's reduction over a leading axis
    runs about 50 times slower than this (43 ms against 0.9 ms for [8, 4, 512, 512])."""
    return position_bias_1HTS + mask_bias_B1TS


def _add_position_bias_forward(position_bias_1HTS, mask_bias_B1TS):
    return add_position_bias(position_bias_1HTS, mask_bias_B1TS), mask_bias_B1TS.shape[0]


def _add_position_bias_backward(batch_size, gradient_BHTS):
    ones_B = jnp.ones((batch_size,), gradient_BHTS.dtype)
    position_gradient_HTS = jnp.einsum("B,BHTS->HTS", ones_B, gradient_BHTS,
                                       precision=jax.lax.Precision.HIGHEST)
    return (position_gradient_HTS[None].astype(gradient_BHTS.dtype),
            jnp.sum(gradient_BHTS, axis=1, keepdims=True))


add_position_bias.defvjp(_add_position_bias_forward, _add_position_bias_backward)


@jax.custom_vjp
def softmax_attention(query_BTHK: jax.Array, key_BSHK: jax.Array, value_BSHK: jax.Array,
                      bias_BHTS: jax.Array) -> jax.Array:
    """The context [B, T, H, K] = softmax(query . key + bias over S, in float32) . value,
    without dropout, with the backward pass of flash attention done in one block.

    The forward pass divides the context by the softmax's normaliser instead of dividing
    every weight, and the backward pass takes sum_S(weights * weight gradients) as
    sum_K(context * context gradient): two fewer passes over the [B, H, T, S] arrays, which
    bound attention on CPUs by memory traffic (docs/performance.md).
    """
    return _softmax_attention_forward(query_BTHK, key_BSHK, value_BSHK, bias_BHTS)[0]


def _softmax_attention_forward(query_BTHK, key_BSHK, value_BSHK, bias_BHTS):
    logits_BHTS = (jnp.einsum("BTHK,BSHK->BHTS", query_BTHK, key_BSHK).astype(jnp.float32)
                   + bias_BHTS.astype(jnp.float32))
    shifted_BHTS = jnp.exp(logits_BHTS - jnp.max(logits_BHTS, axis=-1, keepdims=True))
    normaliser_BHT = jnp.sum(shifted_BHTS, axis=-1)
    unnormalised_BTHK = jnp.einsum("BHTS,BSHK->BTHK", shifted_BHTS.astype(value_BSHK.dtype),
                                   value_BSHK)
    context_BTHK = (unnormalised_BTHK.astype(jnp.float32)
                    / jnp.transpose(normaliser_BHT, (0, 2, 1))[..., None]
                    ).astype(value_BSHK.dtype)
    return context_BTHK, (query_BTHK, key_BSHK, value_BSHK, bias_BHTS, shifted_BHTS,
                          normaliser_BHT, context_BTHK)


def _softmax_attention_backward(residuals, context_gradient_BTHK):
    (query_BTHK, key_BSHK, value_BSHK, bias_BHTS, shifted_BHTS, normaliser_BHT,
     context_BTHK) = residuals
    dtype = value_BSHK.dtype
    weights_BHTS = shifted_BHTS / normaliser_BHT[..., None]
    gradient_BTHK = context_gradient_BTHK.astype(dtype)
    value_gradient_BSHK = jnp.einsum("BHTS,BTHK->BSHK", weights_BHTS.astype(dtype),
                                     gradient_BTHK)
    weights_gradient_BHTS = jnp.einsum("BTHK,BSHK->BHTS", gradient_BTHK,
                                       value_BSHK).astype(jnp.float32)
    row_dot_BHT = jnp.einsum("BTHK,BTHK->BHT", context_gradient_BTHK.astype(jnp.float32),
                             context_BTHK.astype(jnp.float32))
    logits_gradient_BHTS = weights_BHTS * (weights_gradient_BHTS - row_dot_BHT[..., None])
    logits_gradient = logits_gradient_BHTS.astype(dtype)
    query_gradient_BTHK = jnp.einsum("BHTS,BSHK->BTHK", logits_gradient, key_BSHK)
    key_gradient_BSHK = jnp.einsum("BHTS,BTHK->BSHK", logits_gradient, query_BTHK)
    # A bias broadcast over the batch or the heads takes the gradient summed over them.
    broadcast_axes = tuple(axis for axis, size in enumerate(bias_BHTS.shape) if size == 1)
    bias_gradient = jnp.sum(logits_gradient_BHTS, axis=broadcast_axes, keepdims=True)
    return (query_gradient_BTHK.astype(query_BTHK.dtype), key_gradient_BSHK.astype(key_BSHK.dtype),
            value_gradient_BSHK, bias_gradient.astype(bias_BHTS.dtype))


softmax_attention.defvjp(_softmax_attention_forward, _softmax_attention_backward)


@jax.custom_vjp
def softmax_cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array
                          ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per token: the cross-entropy -log softmax(logits)[target] and log Z = logsumexp(logits)
    [B, T] in float32, and whether the target's logit is the largest (ties count as correct).

    The backward pass is one elementwise pass over the logits, softmax * (g_ce + g_logz)
    - onehot(target) * g_ce, where autodiff of a label lookup scatter-adds into a zero
    [B, T, V] array and copies it; and "correct" needs no argmax, whose variadic reduction
    XLA:CPU runs ten times slower than a max (48 ms against 4.5 ms for 912 x 32,128).
    """
    logits_BTV = logits_BTV.astype(jnp.float32)
    max_BT = jnp.max(logits_BTV, axis=-1)
    log_normalizer_BT = max_BT + jnp.log(
        jnp.sum(jnp.exp(logits_BTV - max_BT[..., None]), axis=-1))
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return log_normalizer_BT - target_logit_BT, log_normalizer_BT, target_logit_BT >= max_BT


def softmax_cross_entropy_autodiff(logits_BTV: jax.Array, targets_BT: jax.Array
                                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`softmax_cross_entropy` for autodiff on GPUs and TPUs: the target's logit is picked
    by a one-hot product, whose gradient is elementwise, where a lookup's is a scatter-add."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    # The shift cancels out of log Z: no gradient through the max (a variadic reduction).
    max_BT = jax.lax.stop_gradient(jnp.max(logits_BTV, axis=-1))
    log_normalizer_BT = max_BT + jnp.log(jnp.sum(jnp.exp(logits_BTV - max_BT[..., None]),
                                                 axis=-1))
    is_target_BTV = (jax.lax.broadcasted_iota(targets_BT.dtype, logits_BTV.shape, 2)
                     == targets_BT[..., None])
    target_logit_BT = jnp.sum(jnp.where(is_target_BTV, logits_BTV, 0.0), axis=-1)
    return log_normalizer_BT - target_logit_BT, log_normalizer_BT, target_logit_BT >= max_BT


def _softmax_cross_entropy_forward(logits_BTV, targets_BT):
    outputs = softmax_cross_entropy(logits_BTV, targets_BT)
    return outputs, (logits_BTV, targets_BT, outputs[1])


def _softmax_cross_entropy_backward(residuals, gradients):
    logits_BTV, targets_BT, log_normalizer_BT = residuals
    cross_entropy_gradient_BT, log_normalizer_gradient_BT, _ = gradients
    softmax_BTV = jnp.exp(logits_BTV.astype(jnp.float32) - log_normalizer_BT[..., None])
    is_target_BTV = (jax.lax.broadcasted_iota(targets_BT.dtype, logits_BTV.shape, 2)
                     == targets_BT[..., None])
    logits_gradient_BTV = (
        softmax_BTV * (cross_entropy_gradient_BT + log_normalizer_gradient_BT)[..., None]
        - jnp.where(is_target_BTV, cross_entropy_gradient_BT[..., None], 0.0))
    targets_gradient = np.zeros(targets_BT.shape, jax.dtypes.float0)
    return logits_gradient_BTV.astype(logits_BTV.dtype), targets_gradient


softmax_cross_entropy.defvjp(_softmax_cross_entropy_forward, _softmax_cross_entropy_backward)
