#!/usr/bin/env bash
# Set up (with test extras) and run the test suite: the README's test command, also run by CI.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" MPLBACKEND=Agg
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
code=$?
set -e
if [ "$code" = 5 ]; then echo "no tests were collected" >&2; exit 1; fi
exit "$code"
