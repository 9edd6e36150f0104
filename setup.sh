#!/usr/bin/env bash
# Create .venv and install distill_dist with its test extras, from nothing.
# torch is pinned to the CPU build first (any other torch pulls a multi-GB CUDA build on a CPU box);
# on a GPU cluster, install your CUDA torch (2.4 - 2.13) first and run this with TORCH_SPEC=skip.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "$TORCH_SPEC" != skip ]; then .venv/bin/python -m pip install -q "$TORCH_SPEC"; fi
# DeepSpeed's setup.py imports torch, so it must build against the torch just installed.
.venv/bin/python -m pip install -q --no-build-isolation "deepspeed>=0.16"
.venv/bin/python -m pip install -q -e '.[test]'
echo "setup done: $(.venv/bin/python -c 'from importlib.metadata import version as v; print(*(f"{p} {v(p)}" for p in ("torch", "deepspeed", "transformers", "distill-dist")))')"
