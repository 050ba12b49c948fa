#!/usr/bin/env bash
# The default test run (not slow, not gpu). pytest exits 5 when it collects no test:
# that is a failure here, never a pass.
set -uo pipefail
VENV=${VENV:-.venv}
"$VENV/bin/python" -m pytest -q "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "run-tests.sh: pytest collected no tests; failing" >&2
  exit 1
fi
exit "$status"
