#!/usr/bin/env bash
# Formats and lints the package, tests and dev scripts, then type-checks them.
# Pass --check to only report (as CI does).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
[ -x .venv/bin/python ] && py=.venv/bin/python
paths=(synapse_partial_state tests scripts-dev)
if [ "${1:-}" = "--check" ]; then
  "$py" -m ruff format --check "${paths[@]}"
  "$py" -m ruff check "${paths[@]}"
else
  "$py" -m ruff format "${paths[@]}"
  "$py" -m ruff check --fix "${paths[@]}"
fi
"$py" -m mypy
