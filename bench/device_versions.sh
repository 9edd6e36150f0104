#!/usr/bin/env bash
# The core CPU tests against the GPU image's versions, where the registries carry builds that run here: the
# image's transformers (bench/gpu_wheels.txt, "# image:" line) and the huggingface_hub < 2 it needs, installed
# into a --target folder in front of this environment. torch stays this environment's: PyPI's torch 2.11
# wheels are CUDA builds (530.7 MB for cp312, plus the CUDA libraries), and no CPU build of it is reachable
# from PyPI; Python 3.12 is checked by tests/test_dependency_bounds.py (every file compiles under it).
#
#   bash bench/device_versions.sh [pytest args]      # default: the core CPU tests below, multi-rank ones left out
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TARGET="${TARGET:-/tmp/dd_device_versions}"
tf=$(sed -n 's/^# image:.* transformers \([0-9.]*\).*/\1/p' "$REPO/bench/gpu_wheels.txt")
rm -rf "$TARGET"
mkdir -p "$TARGET/wheels"
# Resolved together (consistent versions), then only what this environment lacks at those versions is installed.
"$PYTHON" -m pip download -q --only-binary=:all: -d "$TARGET/wheels" "transformers==$tf.*" "huggingface_hub<2"
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$TARGET/site" \
    "$TARGET"/wheels/{transformers,huggingface_hub,httpx,httpcore,h11,anyio,idna,certifi,hf_xet,click}-*.whl
cd "$REPO"
export PYTHONPATH="$TARGET/site:$REPO/src" PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
"$PYTHON" -c "import transformers, huggingface_hub, torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'huggingface_hub', huggingface_hub.__version__, 'from', transformers.__file__)"
if [ $# -eq 0 ]; then
    set -- tests/test_prune.py tests/test_data.py tests/test_evaluate.py tests/test_losses.py tests/test_gpu_ready.py \
        tests/test_fingerprint.py tests/test_dependency_bounds.py -m "not multirank"
fi
"$PYTHON" -m pytest -q -p no:cacheprovider "$@"
