#!/usr/bin/env bash
# The GPU check, on one GPU of a node with CUDA torch, transformers, accelerate and Triton preinstalled
# (Python 3.12) and no network: installs the wheels bench/gpu_wheels.sh filled beforehand into a --target
# folder (nothing goes into the node's Python), then runs bench/gpu_check.py, which runs every section in a
# process of its own. OUT is a folder (created if missing); what lands there:
#   gpu_check.json  every section's figures, or its error, rewritten as each section ends
#   pytest.log      `pytest -m gpu tests/test_gpu.py` (the pytest_gpu section)
#   sections.log    each section process's own output
#   install.log     pip's output
# One total time budget, BUDGET_S seconds (default 510), the install included: printed first; a section that
# would run past it is stopped, later ones are recorded as skipped.
#
#   WHEELS=/path/to/gpu_wheels OUT=/path/to/folder bash bench/gpu_check.sh [gpu_check.py options]
#   WHEELS=none OUT=... bash bench/gpu_check.sh --smoke     # no install: everything importable already (CI, CPU)
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${WHEELS:-$REPO/gpu_wheels}"
OUT="${OUT:-$REPO/gpu_check_out}"
SITE="${SITE:-/tmp/distill_dist_site}"
PYTHON="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-510}"
# The node's image has newer pytest plugins than the shipped pytest: none is loaded unless named.
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT" || { echo "gpu_check: cannot create the folder OUT=$OUT"; exit 2; }
OUT="$(cd "$OUT" && pwd)"
cd "$REPO"
t0=$(date +%s)
echo "gpu_check: budget ${BUDGET_S} s in all, the install included; results in $OUT/gpu_check.json"
install_rc=0
if [ "$WHEELS" = none ]; then
    export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
else
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    shopt -u nullglob
    rm -rf "$SITE"
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "gpu_check: no wheels in WHEELS=$WHEELS (bench/gpu_wheels.sh fills it; WHEELS=none skips the install)" | tee "$OUT/install.log"
        install_rc=2
    else
        "$PYTHON" -m pip install --no-index --no-deps --no-compile --target "$SITE" "${wheels[@]}" > "$OUT/install.log" 2>&1
        install_rc=$?
    fi
    export PYTHONPATH="$REPO/src:$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH" DD_GPU_CHECK_SITE="$SITE"
fi
install_s=$(( $(date +%s) - t0 ))
[ "$install_rc" -eq 0 ] || echo "gpu_check: wheel install failed (exit $install_rc, see $OUT/install.log); the sections run and record what is missing"
"$PYTHON" bench/gpu_check.py --out-dir "$OUT" --budget-s $(( BUDGET_S - install_s )) --install-s "$install_s" \
    --install-rc "$install_rc" "$@"
rc=$?
echo "gpu_check: $(( $(date +%s) - t0 )) s in all (install ${install_s} s), exit $rc; results in $OUT/gpu_check.json"
exit $rc
