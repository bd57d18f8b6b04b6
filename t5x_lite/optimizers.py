"""Optimizers and learning-rate schedules as optax transformations. Gin picks one of these
functions; the trainer only sees the resulting `optax.GradientTransformation`."""
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax


def rsqrt_schedule(base_learning_rate: float = 1.0, warmup_steps: int = 10_000
                   ) -> optax.Schedule:
    """T5's schedule: base / sqrt(max(step, warmup_steps)), i.e. constant, then 1/sqrt decay.

    With the defaults the rate is 0.01 for 10k steps, as in T5 pretraining.
    """
    if warmup_steps < 1:
        raise ValueError(f"rsqrt_schedule warmup_steps must be >= 1, got {warmup_steps}")

    def schedule(step):
        return base_learning_rate * jnp.reciprocal(jnp.sqrt(jnp.maximum(step, warmup_steps)))

    return schedule


def linear_warmup_cosine_schedule(peak_learning_rate: float, warmup_steps: int,
                                  total_steps: int, end_fraction: float = 0.1
                                  ) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak_learning_rate, warmup_steps=warmup_steps,
        decay_steps=total_steps, end_value=peak_learning_rate * end_fraction)


def adafactor(learning_rate: optax.ScalarOrSchedule = rsqrt_schedule(),
              decay_rate: float = 0.8, clipping_threshold: float | None = 1.0,
              multiply_by_parameter_scale: bool = True, weight_decay_rate: float | None = None
              ) -> optax.GradientTransformation:
    """Adafactor as T5 pretrains with it: factored second moments, no momentum, update
    clipping at RMS 1, and steps scaled by each parameter's RMS."""
    return optax.adafactor(learning_rate=learning_rate, decay_rate=decay_rate,
                           clipping_threshold=clipping_threshold,
                           multiply_by_parameter_scale=multiply_by_parameter_scale,
                           momentum=None, weight_decay_rate=weight_decay_rate)


def adamw(learning_rate: optax.ScalarOrSchedule = 1e-3, b1: float = 0.9, b2: float = 0.98,
          eps: float = 1e-8, weight_decay: float = 0.01, max_grad_norm: float | None = 1.0
          ) -> optax.GradientTransformation:
    """AdamW, with global-norm gradient clipping first when max_grad_norm is set."""
    steps = [optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)]
    if max_grad_norm is not None:
        steps.insert(0, optax.clip_by_global_norm(max_grad_norm))
    return optax.chain(*steps)


def parameter_path(path) -> str:
    """"encoder_layer_0/mlp/wi_0/kernel" for a pytree key path."""
    return "/".join(str(getattr(key, "key", key)) for key in path)


def with_parameter_groups(optimizer: Callable[..., optax.GradientTransformation],
                          learning_rate: optax.ScalarOrSchedule,
                          frozen: Sequence[str] = (),
                          rate_scales: Sequence[tuple[str, float]] = ()
                          ) -> optax.GradientTransformation:
    """`optimizer(learning_rate)` applied per parameter group, chosen by regular expressions
    searched in each parameter's path ("decoder_layer_1/mlp/wo/kernel"): parameters matching
    a `frozen` pattern never change; those matching a `rate_scales` pattern (the first that
    matches) train at that multiple of the learning rate (e.g. layer-wise decay); the rest
    train as usual."""
    schedule = learning_rate if callable(learning_rate) else optax.constant_schedule(
        learning_rate)
    for pattern in [*frozen, *(pattern for pattern, _ in rate_scales)]:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"parameter pattern {pattern!r} is not a regular expression "
                             f"({error})") from None

    def label(path, _) -> str:
        name = parameter_path(path)
        if any(re.search(pattern, name) for pattern in frozen):
            return "frozen"
        for index, (pattern, _) in enumerate(rate_scales):
            if re.search(pattern, name):
                return f"group_{index}"
        return "default"

    transforms = {"frozen": optax.set_to_zero(), "default": optimizer(learning_rate=schedule)}
    for index, (_, scale) in enumerate(rate_scales):
        transforms[f"group_{index}"] = optimizer(
            learning_rate=lambda step, scale=scale: scale * schedule(step))
    return optax.multi_transform(
        transforms, lambda params: jax.tree_util.tree_map_with_path(label, params))
