#!/usr/bin/env bash
# Runs the test suite in a local virtual environment (.venv), installing what the tests need first.
#   bash test.sh            the default suite (under 20 minutes on a 2-core CPU)
#   bash test.sh --slow     only the tests marked slow (SIGKILL/preemption, 8B compile, ...)
#   bash test.sh --all      both
# Extra arguments go to pytest, e.g. `bash test.sh tests/test_model.py -k parity`.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-test
if [ ! -f "$stamp" ] || [ requirements.txt -nt "$stamp" ] || [ requirements-test.txt -nt "$stamp" ] \
    || [ requirements-tpu.txt -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements-test.txt
  touch "$stamp"
fi
marker=(-m "not slow")
case "${1:-}" in
  --slow) marker=(-m slow); shift ;;
  --all) marker=(); shift ;;
esac
exec .venv/bin/python -m pytest -q "${marker[@]}" "$@"
