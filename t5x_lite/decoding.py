"""Autoregressive decoding over a key/value cache: greedy, temperature / top-k / top-p
sampling, and beam search with T5X's length penalty. Written against a `step_fn` that maps
(decoder input tokens [B, 1], position, cache) to (logits [B, V], cache); knows nothing of
Flax modules or params. Decoded tokens carry no start token; positions after EOS hold 0.
"""
import dataclasses
import enum
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from t5x_lite import choices


class Method(enum.Enum):
    GREEDY = "greedy"  # the most likely token at each position
    BEAM = "beam"  # beam search with a length penalty
    SAMPLE = "sample"  # a draw from the tempered, top-k / top-p filtered distribution


StepFn = Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
# Log-probability given to hypotheses that must never win (finished or padding beams).
NEVER = -1e9


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """Settings of every method; each method reads its own. `temperature` 0 means greedy;
    `top_k` 0 and `top_p` 1 turn those filters off. `alpha` is beam search's length penalty
    exponent: hypotheses are ranked by log-probability / ((5 + length) / 6) ** alpha."""

    beam_size: int = 4
    alpha: float = 0.6
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | jax.Array = 0  # Sampling's random seed (may be traced).

    def __post_init__(self):
        if not isinstance(self.beam_size, int) or self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: no top-k filter), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.alpha < 0:
            raise ValueError(f"alpha (length penalty) must be >= 0, got {self.alpha}")


def parse_method(method: "Method | str") -> Method:
    """The Method for a member or its name ('beam'); ValueError listing them otherwise."""
    return choices.parse(Method, method, "the decoding method (DECODE_METHOD)")


def filter_logits(logits_BV: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Logits with everything outside the top_k most likely tokens, and outside the smallest
    set of most likely tokens whose probability reaches top_p, set to NEVER."""
    if top_k:
        kth_largest_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_largest_B1, NEVER, logits_BV)
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        cumulative_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
        # A token stays if the mass of the tokens ranked above it is still below top_p.
        keep_BV = (cumulative_BV - jax.nn.softmax(sorted_BV, axis=-1)) < top_p
        threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < threshold_B1, NEVER, logits_BV)
    return logits_BV


def _token_chooser(method: Method, options: DecodeOptions) -> Callable:
    """fn(logits [B, V], rng) -> tokens [B]: argmax, or a draw from the filtered, tempered
    distribution."""
    if method is Method.GREEDY or options.temperature == 0:
        return lambda logits_BV, rng: jnp.argmax(logits_BV, axis=-1)

    def sample(logits_BV, rng):
        filtered_BV = filter_logits(logits_BV / options.temperature, options.top_k,
                                    options.top_p)
        return jax.random.categorical(rng, filtered_BV, axis=-1)

    return sample


def token_by_token(step_fn: StepFn, cache, batch_size: int, max_decode_length: int,
                   eos_id: int, method: Method, options: DecodeOptions
                   ) -> tuple[jax.Array, jax.Array]:
    """Greedy decoding or sampling: one token per step per row until every row has emitted
    EOS or max_decode_length tokens. Returns tokens int32 [B, N] and scores float32 [B], the
    model's (untempered) log-probabilities of the emitted tokens, EOS included."""
    choose = _token_chooser(method, options)

    def not_done(carry):
        position, _, _, finished_B, _, _ = carry
        return (position < max_decode_length) & ~jnp.all(finished_B)

    def step(carry):
        position, tokens_BN, scores_B, finished_B, cache, rng = carry
        previous_B = jnp.where(position == 0, 0, jax.lax.dynamic_index_in_dim(
            tokens_BN, jnp.maximum(position - 1, 0), axis=1, keepdims=False))
        logits_BV, cache = step_fn(previous_B[:, None], position, cache)
        log_probs_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32))
        rng, draw = jax.random.split(rng)
        next_B = choose(log_probs_BV, draw).astype(jnp.int32)
        next_score_B = jnp.take_along_axis(log_probs_BV, next_B[:, None], axis=-1)[:, 0]
        next_B = jnp.where(finished_B, 0, next_B)
        scores_B = scores_B + jnp.where(finished_B, 0.0, next_score_B)
        tokens_BN = jax.lax.dynamic_update_index_in_dim(tokens_BN, next_B, position, axis=1)
        return (position + 1, tokens_BN, scores_B, finished_B | (next_B == eos_id), cache,
                rng)

    initial = (jnp.zeros((), jnp.int32), jnp.zeros((batch_size, max_decode_length), jnp.int32),
               jnp.zeros((batch_size,), jnp.float32), jnp.zeros((batch_size,), bool), cache,
               jax.random.key(options.seed))
    _, tokens_BN, scores_B, _, _, _ = jax.lax.while_loop(not_done, step, initial)
    return tokens_BN, scores_B


def length_penalty(length: jax.Array, alpha: float) -> jax.Array:
    """T5X's (Wu et al. 2016) brevity penalty ((5 + length) / 6) ** alpha."""
    return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def gather_beams(x_BW, indices_BK: jax.Array) -> jax.Array:
    """Beams `indices_BK` of each batch row from an array [B, W, ...]: [B, K, ...]."""
    indices = indices_BK.reshape(indices_BK.shape + (1,) * (x_BW.ndim - 2))
    return jnp.take_along_axis(x_BW, indices, axis=1)


def gather_cache(cache, indices_BW: jax.Array, batch_axis: int = 0):
    """Reorders a cache whose arrays hold W beams per row (B * W rows, row-major, on axis
    `batch_axis`: 1 where layers are stacked first) to the beams `indices_BW`. Cache
    positions (no batch axis) pass through, and so do entries named cross_* or prompt_* (the
    projected encoder output, a prompt's logits: the same for every beam of a row)."""
    batch_size, beams = indices_BW.shape

    def gather(path, x):
        name = jax.tree_util.keystr(path)
        if x.ndim <= batch_axis or "cross_" in name or "prompt_" in name:
            return x
        rows_first = jnp.moveaxis(x, batch_axis, 0)
        gathered = gather_beams(rows_first.reshape(batch_size, beams, *rows_first.shape[1:]),
                                indices_BW).reshape(rows_first.shape)
        return jnp.moveaxis(gathered, 0, batch_axis)
    return jax.tree_util.tree_map_with_path(gather, cache)


def beam_search(step_fn: StepFn, cache, batch_size: int, max_decode_length: int, eos_id: int,
                options: DecodeOptions, cache_batch_axis: int = 0
                ) -> tuple[jax.Array, jax.Array]:
    """Keeps the beam_size most likely unfinished hypotheses per row and the beam_size best
    finished ones (ranked by log-probability / length_penalty). `cache` holds beam_size
    copies of each row ([B * W, ...], row-major). Returns the best finished hypothesis per
    row (the best unfinished one where none finished): tokens int32 [B, N] and its
    length-penalised score float32 [B]."""
    beams, length = options.beam_size, max_decode_length
    # Only beam 0 is live at the start, so the first step does not pick W copies of a token.
    alive_scores_BW = jnp.tile(jnp.asarray([0.0] + [NEVER] * (beams - 1)), (batch_size, 1))
    initial = {
        "position": jnp.zeros((), jnp.int32),
        "alive_tokens": jnp.zeros((batch_size, beams, length), jnp.int32),
        "alive_scores": alive_scores_BW,
        "finished_tokens": jnp.zeros((batch_size, beams, length), jnp.int32),
        "finished_scores": jnp.full((batch_size, beams), NEVER),
        "cache": cache,
    }

    def not_done(state):
        # Stop early once no live hypothesis, even at the best possible final length, can
        # beat the worst finished one (log-probabilities only fall).
        best_possible_B = state["alive_scores"][:, 0] / length_penalty(jnp.asarray(length),
                                                                        options.alpha)
        worst_finished_B = jnp.min(state["finished_scores"], axis=1)
        return (state["position"] < length) & ~jnp.all(worst_finished_B > best_possible_B)

    step = functools.partial(_beam_step, step_fn=step_fn, eos_id=eos_id, alpha=options.alpha,
                             cache_batch_axis=cache_batch_axis)
    return _best_hypotheses(jax.lax.while_loop(not_done, step, initial), options.alpha)


def _beam_step(state: dict, step_fn: StepFn, eos_id: int, alpha: float, cache_batch_axis: int
               ) -> dict:
    """One position of beam search (beam_search's loop body): every alive hypothesis [B, W]
    extended by every token, the best W that go on kept alive and the best W ending in EOS
    merged into the finished ones."""
    batch_size, beams = state["alive_scores"].shape
    position = state["position"]
    previous_BW = jnp.where(position == 0, 0, jax.lax.dynamic_index_in_dim(
        state["alive_tokens"], jnp.maximum(position - 1, 0), axis=2, keepdims=False))
    logits, cache = step_fn(previous_BW.reshape(-1, 1), position, state["cache"])
    log_probs_BWV = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(
        batch_size, beams, -1)
    vocab_size = log_probs_BWV.shape[-1]
    candidates_BX = (state["alive_scores"][:, :, None] + log_probs_BWV).reshape(
        batch_size, -1)
    # 2W candidates always hold W that do not end in EOS.
    scores_BC, flat_BC = jax.lax.top_k(candidates_BX, 2 * beams)
    beam_BC, token_BC = flat_BC // vocab_size, (flat_BC % vocab_size).astype(jnp.int32)
    tokens_BCN = jax.lax.dynamic_update_index_in_dim(
        gather_beams(state["alive_tokens"], beam_BC), token_BC, position, axis=2)
    ends_BC = token_BC == eos_id
    # Alive: the best W candidates that do not end here.
    alive_BW = jax.lax.top_k(jnp.where(ends_BC, NEVER, scores_BC), beams)[1]
    alive_scores_BW = jnp.take_along_axis(jnp.where(ends_BC, NEVER, scores_BC), alive_BW,
                                          axis=1)
    source_BW = jnp.take_along_axis(beam_BC, alive_BW, axis=1)
    # Finished: the best W of the old finished and the candidates ending here.
    penalised_BC = jnp.where(ends_BC, scores_BC, NEVER) / length_penalty(position + 1, alpha)
    pool_scores = jnp.concatenate([state["finished_scores"], penalised_BC], axis=1)
    pool_tokens = jnp.concatenate([state["finished_tokens"], tokens_BCN], axis=1)
    finished_scores_BW, best_BW = jax.lax.top_k(pool_scores, beams)
    return {
        "position": position + 1,
        "alive_tokens": gather_beams(tokens_BCN, alive_BW),
        "alive_scores": alive_scores_BW,
        "finished_tokens": gather_beams(pool_tokens, best_BW),
        "finished_scores": finished_scores_BW,
        "cache": gather_cache(cache, source_BW, cache_batch_axis),
    }


def _best_hypotheses(state: dict, alpha: float) -> tuple[jax.Array, jax.Array]:
    """The best finished hypothesis per row, or the best alive one where none finished:
    tokens [B, N] and length-penalised scores [B]."""
    any_finished_B = state["finished_scores"][:, 0] > NEVER / 2
    alive_penalised_B = state["alive_scores"][:, 0] / length_penalty(state["position"], alpha)
    tokens_BN = jnp.where(any_finished_B[:, None], state["finished_tokens"][:, 0],
                          state["alive_tokens"][:, 0])
    scores_B = jnp.where(any_finished_B, state["finished_scores"][:, 0], alive_penalised_B)
    return tokens_BN, scores_B


def decode(method: Method | str, step_fn: StepFn, cache, batch_size: int, max_decode_length: int,
           eos_id: int, options: DecodeOptions, cache_batch_axis: int = 0
           ) -> tuple[jax.Array, jax.Array]:
    """Dispatches to the method; for "beam", `cache` and step_fn work on B * beam_size rows
    (on axis `cache_batch_axis` of the cache's arrays)."""
    method = parse_method(method)
    if method is Method.BEAM:
        return beam_search(step_fn, cache, batch_size, max_decode_length, eos_id, options,
                           cache_batch_axis)
    return token_by_token(step_fn, cache, batch_size, max_decode_length, eos_id, method,
                          options)

