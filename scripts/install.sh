#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs t5x_lite with the versions CI tested
# (constraints.txt) and the extras named in $1 (default: test). Skips the work when
# setup.py, constraints.txt and the extras are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
extras=${1:-test}
stamp_hash=$({ cat setup.py constraints.txt; echo "$extras"; } | sha256sum | cut -c1-16)
stamp=.venv/.installed-$stamp_hash
if [ -f "$stamp" ]; then exit 0; fi
if [ ! -x .venv/bin/python ]; then
  echo "Creating .venv with $($PYTHON --version)..." >&2
  "$PYTHON" -m venv .venv
fi
echo "Installing t5x_lite and its pinned dependencies into .venv (1 to 3 minutes)..." >&2
log=.venv/install.log
if ! { .venv/bin/python -m pip install --upgrade pip &&
       .venv/bin/python -m pip install -c constraints.txt -e ".[$extras]"; } > "$log" 2>&1; then
  tail -n 30 "$log" >&2
  echo "error: installing into .venv failed (full log: $log); check network access to the package index" >&2
  exit 1
fi
rm -f .venv/.installed-*
touch "$stamp"
