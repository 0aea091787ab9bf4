#!/usr/bin/env bash
# Set up (with test extras) and run the test suite: the README's test command, also run by CI.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# Headless Chromium for the web-page test (skipped with a reason when it cannot be installed).
if ! command -v chromedriver >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && apt-get install -y -qq chromium chromium-driver; } >/dev/null 2>&1 \
    || echo "test.sh: could not install chromium; the browser test will be skipped" >&2
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" MPLBACKEND=Agg
set +e
.venv/bin/python -m pytest -p no:cacheprovider "$@"
code=$?
set -e
if [ "$code" = 5 ]; then echo "no tests were collected" >&2; exit 1; fi
exit "$code"
