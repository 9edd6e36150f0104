#!/usr/bin/env bash
# Create .venv and install distill_dist with its test extras, from nothing.
# torch is pinned to the CPU build first (any other torch pulls a multi-GB CUDA build on a CPU box);
# on a GPU cluster, install your CUDA torch (2.4 - 2.13) first and run this with TORCH_SPEC=skip.
# TORCH_INDEX_URL: the index torch alone comes from (pip --index-url). Empty (the default): pip's configured
# index, which must then offer the CPU build; on a stock machine, where PyPI's torch is the CUDA build, run
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu ./setup.sh
set -euo pipefail
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}

# pip's torch install, run as `install_torch PIP...` (tests/test_setup_script.py runs it with other commands).
install_torch() {
  if [ "$TORCH_SPEC" = skip ]; then return 0; fi
  if [ -n "$TORCH_INDEX_URL" ]; then "$@" install -q "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
  else "$@" install -q "$TORCH_SPEC"; fi
}
(return 0 2>/dev/null) && return 0  # sourced: the function only

cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
install_torch .venv/bin/python -m pip
# DeepSpeed's setup.py imports torch, so it must build against the torch just installed.
.venv/bin/python -m pip install -q --no-build-isolation "deepspeed>=0.16"
# The edge runtime (extra `edge`): llama-cpp-python builds llama.cpp from source (~9 min on 2 idle cores; pip
# caches the built wheel, so a re-run takes seconds). Its HF -> GGUF converter is not in the installed package:
# take convert_hf_to_gguf.py, its conversion/ package and gguf-py from the same-version sdist into .edge/.
.venv/bin/python -m pip install -q -e '.[test,edge]'
LLAMA_CPP_VERSION=$(.venv/bin/python -c 'from importlib.metadata import version; print(version("llama-cpp-python"))')
EDGE=.edge/llama.cpp-$LLAMA_CPP_VERSION
if [ ! -f "$EDGE/convert_hf_to_gguf.py" ]; then
  sdist=$(mktemp -d)
  .venv/bin/python -m pip download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_CPP_VERSION" -d "$sdist"
  tar -xzf "$sdist/llama_cpp_python-$LLAMA_CPP_VERSION.tar.gz" -C "$sdist" --wildcards \
    '*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/conversion/*' '*/vendor/llama.cpp/gguf-py/*'
  mkdir -p .edge && rm -rf "$EDGE.tmp" && mv "$sdist/llama_cpp_python-$LLAMA_CPP_VERSION/vendor/llama.cpp" "$EDGE.tmp"
  mv "$EDGE.tmp" "$EDGE" && rm -rf "$sdist"
fi
echo "setup done: $(.venv/bin/python -c 'from importlib.metadata import version as v; print(*(f"{p} {v(p)}" for p in ("torch", "deepspeed", "transformers", "llama-cpp-python", "distill-dist")))')"
