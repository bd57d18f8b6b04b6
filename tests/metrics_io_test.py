"""metrics_io.LogPeriod: averages over every step, throughput and the input-wait fraction
over the timed steps only (the first step after a start compiles), on a fake clock."""
import jax
import jax.numpy as jnp
import numpy as np

from t5x_lite import metrics_io


def test_log_period_rates_leave_out_the_compiling_step_and_pauses(monkeypatch):
    clock = iter([0.0, 10.0, 16.0])  # Construction, step 1 done (compiled), the log line.
    monkeypatch.setattr(metrics_io.time, "perf_counter", lambda: next(clock))
    period = metrics_io.LogPeriod(start_step=0, tokens_per_step=100)
    period.data_wait = 2.0  # Spent on step 1's batch: before timing starts, so dropped.
    for step, loss in ((1, 4.0), (2, 3.0), (3, 2.0), (4, 1.0)):
        period.add(step, {"loss": np.float32(loss)})
    period.paused, period.data_wait = 1.0, 0.5  # An evaluation; waits for steps 2-4.
    row, seconds_left = period.take_row(step=4, total_steps=10)
    assert row["loss"] == 2.5  # All four steps count in the averages.
    assert row["tokens_per_second"] == 3 * 100 / (16.0 - 10.0 - 1.0)
    assert row["data_wait_fraction"] == 0.5 / 5.0
    assert seconds_left == (16.0 - 10.0) / 3 * 6
    assert (period.rows, period.paused, period.data_wait, period.timed_steps) == ([], 0, 0, 0)


def test_a_wait_for_data_counts_only_once_the_last_step_has_finished():
    @jax.jit
    def slow_step(x):  # About a second of matmuls on 2 cores.
        return jax.lax.fori_loop(0, 1000, lambda _, y: jnp.tanh(y @ y), x)

    x = jnp.full((512, 512), 1e-3)
    jax.block_until_ready(slow_step(x))  # Compiled, so the next call only dispatches.
    period = metrics_io.LogPeriod(start_step=0, tokens_per_step=1)
    running = {"loss": slow_step(x)}
    period.add_data_wait(0.25, running)  # The devices were busy: costs nothing.
    assert period.data_wait == 0.0
    jax.block_until_ready(running)
    period.add_data_wait(0.5, running)
    period.add_data_wait(1.0, None)  # Before the first step.
    assert period.data_wait == 1.5
