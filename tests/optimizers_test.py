"""Schedules and optimizer wiring against closed forms."""
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5x_lite import optimizers


def test_rsqrt_schedule_is_constant_then_inverse_square_root():
    schedule = optimizers.rsqrt_schedule(base_learning_rate=1.0, warmup_steps=10_000)
    for step, want in [(0, 0.01), (5_000, 0.01), (10_000, 0.01), (40_000, 0.005),
                       (1_000_000, 0.001)]:
        np.testing.assert_allclose(float(schedule(jnp.asarray(step))), want, rtol=1e-6)
    with pytest.raises(ValueError, match="warmup_steps"):
        optimizers.rsqrt_schedule(warmup_steps=0)


def test_adamw_first_step_matches_closed_form():
    # Adam's first step is lr * g / (|g| + eps) after bias correction, plus decoupled decay.
    params = {"w": jnp.array([1.0, -2.0, 0.5])}
    grads = {"w": jnp.array([0.3, -0.1, 0.0])}
    optimizer = optimizers.adamw(learning_rate=0.1, weight_decay=0.01, max_grad_norm=None)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    g, p = np.asarray(grads["w"], np.float64), np.asarray(params["w"], np.float64)
    want = -0.1 * (g / (np.abs(g) + 1e-8) + 0.01 * p)
    np.testing.assert_allclose(np.asarray(updates["w"]), want, rtol=1e-5, atol=1e-7)


def test_adamw_clips_the_global_gradient_norm_first():
    params = {"w": jnp.zeros(2)}
    grads = {"w": jnp.array([300.0, 400.0])}  # Global norm 500, clipped to 1.
    optimizer = optimizers.adamw(learning_rate=0.1, b1=0.9, weight_decay=0.0, max_grad_norm=1.0)
    _, state = optimizer.update(grads, optimizer.init(params), params)
    # Adam's first moment after one step is (1 - b1) * the gradient it saw.
    np.testing.assert_allclose(np.asarray(optax.tree.get(state, "mu")["w"]),
                               0.1 * np.array([0.6, 0.8]), rtol=1e-6)
