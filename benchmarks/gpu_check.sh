#!/usr/bin/env bash
# The one prepared GPU check (issues 19 and 20), about 9 minutes on an H200. Run from the repo root on the device
# image (Python 3.12, torch 2.11, transformers 5.17; no decord, av or soundfile), e.g. with the device tool:
#     bash benchmarks/gpu_check.sh
# Writes $OUT (or results/gpu) /gpu_check.json, gpu_check.log, tests.log and tests.rc.
set -uo pipefail
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv > "$OUT/gpu.txt" 2>&1
# The measurements first (kernels vs references, one merge step, host syncs, VideoMAE fused/engine/ceiling, LLaVA,
# Qwen, compiled).
timeout 400 python -m benchmarks.gpu_check --out "$OUT/gpu_check.json" --budget 340 > "$OUT/gpu_check.log" 2>&1
echo "gpu_check rc=$?"
# Then the tests on CUDA (the fused kernels inside models, runtime, LLaVA; media tests skip without their extras).
MMMERGE_TEST_DEVICE=cuda timeout 110 python -m pytest -q -rf -p no:cacheprovider --maxfail=25 \
    tests/test_fused.py tests/test_runtime.py tests/test_engine_rows.py tests/test_llava_rows.py \
    tests/test_llava_runtime.py tests/test_llava.py tests/test_llava_next.py tests/test_llava_onevision.py \
    > "$OUT/tests.log" 2>&1
echo $? > "$OUT/tests.rc"
echo "tests rc=$(cat "$OUT/tests.rc")"; tail -25 "$OUT/tests.log"
python - "$OUT/gpu_check.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
for name, sec in d["sections"].items():
    print(f"== {name} ({sec.get('seconds') or 0:.0f} s){' ERROR ' + sec['error'][-300:] if 'error' in sec else ''}")
    for r in sec["rows"]:
        print("  ", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "output"})
EOF
