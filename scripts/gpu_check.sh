#!/usr/bin/env bash
# moeflow's GPU checks in one command, on a machine with a CUDA GPU (one is enough):
#   1. the tests marked `gpu` (tests/test_gpu.py): NCCL dispatch/combine (bf16, FP8) against the
#      reference, low-latency mode captured in a CUDA graph and replayed, the NVSHMEM
#      symmetric-memory slot exchange, grouped-GEMM experts and MoELayer in bf16;
#   2. benchmarks/bench_gpu.py: world-size-1 dispatch + combine of 4096 x 7168 bf16 against the
#      memory-bandwidth floor of the bytes it must move.
# Writes one JSON of figures (test outcomes, timings, device) and prints its path. Under 8 minutes.
#
#   scripts/gpu_check.sh [OUT_DIR]      (default OUT_DIR: ./gpu_check)
set -uo pipefail
OUT_DIR=${1:-${OUT:-$PWD/gpu_check}}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)  # relative to where it was called from
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
JSON="$OUT_DIR/gpu_check.json"
rm -f "$OUT_DIR"/{tests.xml,tests.log,bench.json,bench.log,gpu_check.json}  # never report an older run's
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

fail() { echo "gpu_check: FAILED: $*" >&2; exit 2; }

"$PY" - <<'EOF' || fail "no usable CUDA device (see the line above); this script needs a GPU"
import sys
try:
    import pytest, torch  # noqa: F401
except ImportError as e:
    sys.exit(f"gpu_check: {e.name} is not installed (pip install -e '.[test]')")
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device (torch.version.cuda={torch.version.cuda}, "
             "CUDA_VISIBLE_DEVICES and the driver decide)")
print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.device_count()} device(s)")
EOF

# The symmetric-memory exchange is opt-in (process-wide settings; docs/scale.md): opted in here,
# with one block per peer, so that its tests run; they skip, saying why, where it cannot.
export TORCH_SYMMMEM=${TORCH_SYMMMEM:-NVSHMEM} TORCH_SYMMMEM_NBLOCKS=${TORCH_SYMMMEM_NBLOCKS:-1}
t0=$(date +%s)
# SIGINT first: pytest then still writes its JUnit file (a SIGTERM would lose every result)
timeout -s INT -k 15 330 "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -rA \
    --junitxml="$OUT_DIR/tests.xml" 2>&1 | tee "$OUT_DIR/tests.log"
tests_rc=${PIPESTATUS[0]}
timeout -s INT -k 10 110 "$PY" benchmarks/bench_gpu.py --json "$OUT_DIR/bench.json" 2>&1 | tee "$OUT_DIR/bench.log"
bench_rc=${PIPESTATUS[0]}

"$PY" - "$OUT_DIR" "$tests_rc" "$bench_rc" "$(( $(date +%s) - t0 ))" <<'EOF'
import json, os, sys
import xml.etree.ElementTree as ET
out, tests_rc, bench_rc, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
tests = {}
if os.path.exists(f"{out}/tests.xml"):
    for case in ET.parse(f"{out}/tests.xml").iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = child.tag + ": " + (child.get("message") or "")[:300]
            elif child.tag == "skipped":
                outcome = "skipped: " + (child.get("message") or "")[:300]
        tests[case.get("name")] = outcome
bench = json.load(open(f"{out}/bench.json")) if os.path.exists(f"{out}/bench.json") else None
report = dict(tests_exit_code=tests_rc, bench_exit_code=bench_rc, seconds=seconds, tests=tests, bench=bench)
json.dump(report, open(f"{out}/gpu_check.json", "w"), indent=2)
EOF
echo "gpu_check: figures in $JSON (tests exit $tests_rc, benchmark exit $bench_rc)"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] || fail "see $OUT_DIR/tests.log and $OUT_DIR/bench.log"
