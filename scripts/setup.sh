#!/usr/bin/env bash
# Install deepmetric into ./.venv on a fresh machine.
#   bash scripts/setup.sh          # library + command line
#   bash scripts/setup.sh test     # plus the test/benchmark extras (pytest, hypothesis, PML 2.9.0)
# torch==2.13.0 is installed FIRST: it resolves to the local CPU wheel, so no multi-GB CUDA build of torch is
# ever downloaded; every later requirement (torch>=2.2) is then already satisfied. numpy comes with it so
# that importing torch to check its version does not warn about a missing numpy.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" "torch==2.13.0" numpy 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__" \
  || { echo "setup: torch 2.13.0 did not install" >&2; exit 1; }
if [ -n "$extras" ]; then spec=".[$extras]"; else spec="."; fi
"${pip[@]}" -e "$spec" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import deepmetric, faiss, sklearn, matplotlib" \
  || { echo "setup: deepmetric did not install" >&2; exit 1; }

# Fashion-MNIST (the default job's data) from Debian's dataset-fashion-mnist package, when it is missing.
fm=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$fm" ] && [ -z "${DEEPMETRIC_DATA:-}" ] && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then sudo=(); elif command -v sudo >/dev/null 2>&1; then sudo=(sudo -n); else sudo=(); fi
  if [ "$(id -u)" = 0 ] || [ ${#sudo[@]} -gt 0 ]; then
    { "${sudo[@]}" apt-get update -qq && "${sudo[@]}" apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1 \
      || echo "setup: could not apt-get install dataset-fashion-mnist; set DEEPMETRIC_DATA to a folder with the IDX files" >&2
  fi
fi
echo "setup: deepmetric installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
