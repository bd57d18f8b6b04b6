#!/usr/bin/env bash
# Installs into .venv if needed, then runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# aot: libtpu, for the tests that compile for TPU topologies (tests/precompile_test.py).
bash scripts/install.sh test,aot
export TF_CPP_MIN_LOG_LEVEL=3
# Two worker processes, one per core (CI has 2): most of the suite is XLA compilation, which
# runs on one thread. --dist loadfile keeps each file's tests, and the module fixtures they
# share (a trained run), in one worker.
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile tests "$@"
