#!/usr/bin/env bash
# Create or refresh the project's virtual environment (.venv) and install the package into it.
# Sourced by jobs/run.sh and tests/run.sh; safe to run again (pip runs only when pyproject.toml or
# this file changed).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${HYBRIDGAN_VENV:-$repo/.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv" >&2
  "$python" -m venv "$venv"
fi
# pyproject.toml takes any torch >= 2.4 (a cluster keeps its own build); here, the exact versions the
# project is tested with, installed in the same pip call so that no other torch is ever pulled in.
pins=(torch==2.14.1 torchvision==0.29.1)
stamp="$venv/.hybridgan-installed"
want="$(cat "$repo/pyproject.toml" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing hybridgan and its dependencies into $venv (first time: a few minutes)" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  # The flat layout (hybridgan/ and jobs/ at the repository root next to tests/, configs/ ...) makes
  # setuptools install the editable package through a meta path finder, and it says so with a
  # 10-line "Editable installation." notice that pip (>= 24) shows as a BuildBackendWarning even
  # with -q. It is information only; this filter drops that one warning by its message, nothing else.
  # The extras: test (what the tests import) and deepspeed (tests/test_deepspeed.py launches DeepSpeed).
  PYTHONWARNINGS="ignore:Editable installation." "$venv/bin/python" -m pip install -q -e "$repo[test,deepspeed]" \
    "${pins[@]}" >&2
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
export VIRTUAL_ENV="$venv"
