"""Autoregressive decoding for encoder-decoder models, written against a `logits_fn` that maps
decoder input tokens [B, T] to logits [B, T, V]; knows nothing of Flax modules or params."""
from typing import Callable

import jax
import jax.numpy as jnp

METHODS = ("greedy",)


def greedy_decode(logits_fn: Callable[[jax.Array], jax.Array], batch_size: int,
                  max_decode_length: int, eos_id: int) -> tuple[jax.Array, jax.Array]:
    """Picks the most likely token at each step until EOS or max_decode_length.

    Each step reruns the decoder on the whole prefix (O(T^2) work) rather than caching keys
    and values; that is exact and cheap at the short target lengths of span corruption.
    Returns tokens int32 [B, T] (0 after EOS) and scores float32 [B], the summed
    log-probabilities of the emitted tokens including EOS.
    """

    def step(position, carry):
        tokens_BT, scores_B, finished_B = carry
        # Decoder inputs are the targets shifted right, with 0 as the start token.
        decoder_inputs_BT = jnp.pad(tokens_BT, ((0, 0), (1, 0)))[:, :-1]
        logits_BV = jax.lax.dynamic_index_in_dim(logits_fn(decoder_inputs_BT), position,
                                                 axis=1, keepdims=False)
        log_probs_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32))
        next_B = jnp.argmax(log_probs_BV, axis=-1).astype(jnp.int32)
        next_score_B = jnp.take_along_axis(log_probs_BV, next_B[:, None], axis=-1)[:, 0]
        next_B = jnp.where(finished_B, 0, next_B)
        scores_B = scores_B + jnp.where(finished_B, 0.0, next_score_B)
        tokens_BT = jax.lax.dynamic_update_index_in_dim(tokens_BT, next_B, position, axis=1)
        return tokens_BT, scores_B, finished_B | (next_B == eos_id)

    initial = (jnp.zeros((batch_size, max_decode_length), jnp.int32),
               jnp.zeros((batch_size,), jnp.float32), jnp.zeros((batch_size,), bool))
    tokens_BT, scores_B, _ = jax.lax.fori_loop(0, max_decode_length, step, initial)
    return tokens_BT, scores_B
