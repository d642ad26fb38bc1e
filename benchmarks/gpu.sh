#!/usr/bin/env bash
# GPU readiness in one run of under 8 minutes (benchmarks/gpu.py), on the lent GPU machine's own
# python3 with no network: the sparse step against the dense reference in fp32 and bf16, each
# sparsifier's step against its floor and dense reference, tokens/s against sparsify's TopK at
# d 768, F 32768, k 32, batch 4096, and Feature Choice against TopK at batches 16k-64k.
# Exits non-zero if a check fails or a row errs; a row that cannot run is skipped and says why.
#
#   bash benchmarks/gpu.sh                    # from any folder; extra flags go to gpu.py
#   PYTHON=.venv/bin/python bash benchmarks/gpu.sh --device cpu ...   # a rehearsal here
#
# choicesae runs from src/ (PYTHONPATH), not installed. The packages that machine lacks
# (schedulefree, eai-sparsify and what sparsify imports) come as wheels from $WHEELS (default
# wheels/, built here beforehand: docs/performance.md), installed into $SITE; each wheel that
# fails to install is named, and the rows that need it are skipped.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$SECONDS
budget=${BUDGET:-460}  # seconds for everything, leaving a margin under 8 minutes
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-wheels}
SITE=${SITE:-/tmp/choicesae-gpu-site}

rm -rf "$SITE" && mkdir -p "$SITE"
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
    echo "no wheels in $WHEELS/: the rows that need schedulefree or sparsify are skipped"
fi
for wheel in "${wheels[@]}"; do  # one at a time: a wheel that fails stops no other
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --disable-pip-version-check --target "$SITE" "$wheel" >/dev/null 2>&1 \
        || echo "wheel $(basename "$wheel") failed to install: the rows that need it are skipped"
done
[ ${#wheels[@]} -gt 0 ] && echo "installed from $WHEELS/: $(ls "$SITE" | grep -c dist-info) of ${#wheels[@]} wheels"
export PYTHONPATH="$PWD/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # as choicesae sets it, before torch loads
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "nvidia-smi failed or is missing"
limit=$((budget - (SECONDS - start)))
rc=0
# gpu.py starts no row in the last 40 s of its limit; the timeout stops one that overruns
timeout "$limit" "$PYTHON" benchmarks/gpu.py --device cuda --budget "$((limit - 40))" \
    --d-in 768 --num-latents 32768 --k 32 --batch-size 4096 "$@" || rc=$?
if [ "$rc" -eq 124 ]; then
    echo "benchmarks/gpu.py stopped by its ${limit} s timeout"
fi
echo "elapsed: $((SECONDS - start)) s"
exit "$rc"
