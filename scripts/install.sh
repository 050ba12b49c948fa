#!/usr/bin/env bash
# Create the virtual environment and install fpstore with its test, lint, Ray and S3 extras
# (the reliability tests run Ray and a local S3 server).
# Also installs Debian's chromium (for the report's browser test) when apt is available
# and we are root; without it that one test is skipped with a message saying so.
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[test,lint,ray,s3]"
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "install.sh: chromium could not be installed; the browser test will be skipped" >&2
fi
"$VENV/bin/fpstore" --version
