#!/usr/bin/env bash
# Installs into .venv if needed, then runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# aot: libtpu, for the tests that compile for TPU topologies (tests/precompile_test.py).
bash scripts/install.sh test,aot
export TF_CPP_MIN_LOG_LEVEL=3
exec .venv/bin/python -m pytest -q tests "$@"
