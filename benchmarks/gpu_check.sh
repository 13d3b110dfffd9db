#!/usr/bin/env bash
# The one prepared GPU check (issues 19 and 20), at most ~8 minutes on an H200. Run from the repo root on the
# device image (Python 3.12, torch 2.11, transformers 5.17; no decord, av or soundfile), e.g. with the device tool:
#     bash benchmarks/gpu_check.sh
# Writes $OUT (or results/gpu) /gpu_check.json, tests.log and tests.rc.
set -uo pipefail
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
# The test suite on CUDA (video, audio and LLaVA adapters; media tests skip without their extras).
MMMERGE_TEST_DEVICE=cuda timeout 90 python -m pytest -q -x -p no:cacheprovider \
    tests/test_runtime.py tests/test_simulated_cuda.py tests/test_llava*.py > "$OUT/tests.log" 2>&1
echo $? > "$OUT/tests.rc"
tail -3 "$OUT/tests.log"
timeout 380 python -m benchmarks.gpu_check --out "$OUT/gpu_check.json" --budget 350
