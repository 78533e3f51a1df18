#!/usr/bin/env bash
# GPU validation (issue 14): bash scripts/gpu_check.sh [--dry-run] OUTDIR
# Runs with what the GPU machine has (PYTHONPATH=., no install, no network); every step is
# time-boxed and the report (OUTDIR/report.md, results.json) is rewritten after each one.
# The device command: bash scripts/gpu_check.sh $OUT/gpu   (timeout_s ~560; the run keeps to 530 s)
set -uo pipefail
cd "$(dirname "$0")/.."
dry=()
if [ "${1:-}" = "--dry-run" ]; then dry=(--dry-run); shift; fi
out="${1:?usage: gpu_check.sh [--dry-run] OUTDIR}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# an outer limit a little over the runner's own budget, in case the runner itself hangs
limit=$([ ${#dry[@]} -gt 0 ] && echo 300 || echo 545)
timeout -k 5 "$limit" python3 scripts/gpu_check.py "${dry[@]}" "$out"
status=$?
[ -f "$out/report.md" ] && head -c 10000 "$out/report.md"
exit $status
