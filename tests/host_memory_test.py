"""host_memory: a train step reuses the pages its previous step freed instead of faulting in
new ones."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from t5x_lite import host_memory

# Page faults of each of 16 t5_1_1_tiny train steps at batch 4 x 256/64, in a new process that
# imports scripts/benchmark.py, which sets malloc up as the entry points do (startup.begin)
# before JAX creates its CPU client.
_STEP_FAULTS = textwrap.dedent("""
    import json, resource, sys
    sys.path.insert(0, "scripts")
    import benchmark  # noqa: F401  (malloc set up)
    import jax
    from bench import presets
    trainer, state, step, batch = presets.train_setup("t5_1_1_tiny", 4, 256, 64, "adamw")
    faults = []
    for _ in range(16):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        state, _ = step(state, batch)
        jax.block_until_ready(state)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps(faults))
""")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def step_faults(**environment) -> list[int]:
    env = {key: value for key, value in os.environ.items()
           if key not in (host_memory.OPT_OUT_VARIABLE, *host_memory.MALLOC_VARIABLES)}
    result = subprocess.run([sys.executable, "-c", _STEP_FAULTS], cwd=REPO, check=True,
                            env={**env, "JAX_PLATFORMS": "cpu", **environment},
                            capture_output=True, text=True, timeout=300)
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_train_steps_reuse_freed_pages():
    # glibc as configured by default maps the step's 160 MB of temporaries anew each step:
    # about 40,000 faults of 4 KiB pages. Reused, steps fault in (almost) nothing, but for
    # the one that starts before its predecessor has freed its block and so gets another
    # (on a busy machine, up to half of them).
    assert min(step_faults(**{host_memory.OPT_OUT_VARIABLE: "1"})[-10:]) > 10_000
    assert sum(faults < 500 for faults in step_faults()[-10:]) >= 5


@pytest.mark.parametrize("variable, value", [(host_memory.OPT_OUT_VARIABLE, "1"),
                                             ("MALLOC_ARENA_MAX", "2"),
                                             ("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")])
def test_skipped_when_opted_out_or_malloc_is_already_tuned(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    assert host_memory.reuse_freed_memory() is False


def test_only_on_the_cpu_and_never_on_import(monkeypatch):
    for platforms, on_cpu in (("cpu", True), ("cuda", False), ("tpu", False),
                              ("cuda,cpu", False)):
        monkeypatch.setenv("JAX_PLATFORMS", platforms)
        assert host_memory.runs_on_cpu() is on_cpu
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    monkeypatch.delenv(host_memory.OPT_OUT_VARIABLE, raising=False)
    assert host_memory.reuse_freed_memory_on_cpu() is False
    # Importing the package (a notebook, another framework beside it) leaves malloc alone.
    probe = ("from t5x_lite import host_memory; calls = []; "
             "host_memory.reuse_freed_memory = lambda: calls.append(1); "
             "import t5x_lite.models, t5x_lite.train, t5x_lite.eval, t5x_lite.infer; "
             "print(len(calls))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0 and result.stdout.split()[-1] == "0", result.stderr[-2000:]
