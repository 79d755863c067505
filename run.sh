#!/usr/bin/env bash
# The main job: pre-trains a small Llama 3.1-architecture model on the CPU on an embedded corpus
# (installing what it needs into .venv first). Extra arguments go to `python -m llama.train`, e.g.
#   bash run.sh --data 'my_corpus/*.txt'      the same job on your own files
#   bash run.sh --set optimizer.peak_lr=1e-3  override any config field
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ requirements.txt -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  touch "$stamp"
fi
exec .venv/bin/python -m llama.train --config experiments/cpu_small.py "$@"
