#!/usr/bin/env bash
# Creates .venv and installs everything (no TensorFlow). Idempotent.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -r requirements-dev.txt
# neural-tangents' declared dependency tf2jax pulls in ~2 GB of TensorFlow;
# it needs only jax and frozendict (lensllm_jax.theory.nt_compat does the rest).
.venv/bin/python -m pip install -q --no-deps neural-tangents==0.6.5
.venv/bin/python -m pip install -q --no-deps -e .
if .venv/bin/python -m pip list 2>/dev/null | grep -qi '^tensorflow '; then
  echo "setup.sh: tensorflow got installed; it must not be" >&2
  exit 1
fi
echo "setup.sh: environment ready in .venv"
