#!/usr/bin/env bash
# Installs moeflow (editable, from this repository) with the test extras into the current Python.
# torch is the user's to bring; when none is installed we take the CPU build
# torch==2.13.0 first, so that the plain `torch>=2.4` requirement never pulls a
# multi-GB CUDA build on a machine without a GPU. Extra extras: MOEFLOW_EXTRAS=bench (DeepSpeed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
say() { echo "setup.sh: $*"; }
if "$PY" -c "import torch" >/dev/null 2>&1; then
  say "using the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  say "no torch in $PY: installing the CPU build torch==2.13.0 (about 200 MB; a minute or more)"
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
EXTRAS="dev${MOEFLOW_EXTRAS:+,$MOEFLOW_EXTRAS}"
say "installing moeflow from $(pwd) in editable mode with extras [$EXTRAS]: pytest, transformers, matplotlib..."
say "(pip is quiet; this takes about a minute when the packages are cached, longer when they download)"
"$PY" -m pip install --quiet -e ".[$EXTRAS]"
say "done: moeflow $("$PY" -c 'import moeflow; print(moeflow.__version__)'). Next: python3 -m pytest -q, or moeflow demo"
