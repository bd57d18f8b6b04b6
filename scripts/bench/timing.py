"""Wall-clock timing as every benchmark does it: a call waited for, a train step waited for,
and several implementations timed in turn."""
import time
from typing import Callable


def timed(run: Callable[[], object]) -> float:
    """Wall-clock seconds of `run()`, which must wait for its own results."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def timed_step(train_step: Callable, state, device_batch, after: Callable | None = None):
    """(new state, wall-clock seconds) of one train step, waited for; `after(new state)` runs
    once the step is dispatched, as the training loop saves a checkpoint there."""
    import jax

    start = time.perf_counter()
    state, metrics = train_step(state, device_batch)
    if after is not None:
        after(state)
    jax.block_until_ready((state, metrics))
    return state, time.perf_counter() - start


def time_in_turn(timers: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each timer's seconds in each of `rounds` rounds, the timers called in turn (A B A B
    ...) so that all of them see the machine in the same state (other load, clocks)."""
    seconds = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            seconds[name].append(timer())
    return seconds
