#!/usr/bin/env bash
# The GPU checks in one go (issue 18), under 8 minutes on an H100/H200 host with 16 cores:
#   1. the gpu-marked tests (CUDA vs CPU fingerprints, nvJPEG, pinned batches, AMP steps)
#   2. extraction end to end on a full-size synthetic 40x slide (40,000 x 30,000 px, 16
#      links to it) and on the real-texture slide, default settings and fp32, with the
#      model-only rates (bench_extract.py)
#   3. training throughput of the fingerprint network against its model-only rate
# and one table with the machine's name. Each step has its own time limit, so a hang in
# one still leaves the others' figures.
#
#   bash benchmarks/gpu_check.sh                 # from the repository root
#   PYTHON=.venv/bin/python OUT=/tmp/gpu bash benchmarks/gpu_check.sh
#
# Needs torch + torchvision with CUDA, and what bench_extract.py imports (numpy, pyarrow,
# tifffile + imagecodecs, opencv, click, tqdm, scipy, pytest).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-$(mktemp -d /tmp/gpu-check-XXXX)}
mkdir -p "$OUT"
started=$(date +%s)
gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
echo "machine: ${gpu:-no nvidia-smi}; $(nproc) cores, ${cpu}; $(date -u +%FT%TZ)" | tee "$OUT/machine.txt"

step() {  # name, seconds, command...
    local name=$1 limit=$2
    shift 2
    local t0=$(date +%s)
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $(( $(date +%s) - t0 )) s (log $OUT/$name.log)"
    tail -4 "$OUT/$name.log"
}

step gpu_tests 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
step extract 330 "$PY" benchmarks/bench_extract.py --device cuda --synthetic 40000x30000 \
    --copies 16 --seconds 5 --out "$OUT/extract" --json "$OUT/extract.json"
step train 90 sh -c "'$PY' benchmarks/bench_train.py --device cuda --batch 256 --workers 12 \
    --steps 20 > '$OUT/train.json'"

"$PY" - "$OUT" "$(( $(date +%s) - started ))" <<'EOF'
import json, sys
from pathlib import Path

out, seconds = Path(sys.argv[1]), sys.argv[2]
rows = [("machine", (out / "machine.txt").read_text().strip().removeprefix("machine: "))]
tests = (out / "gpu_tests.log").read_text().strip().splitlines()
rows.append(("gpu tests", tests[-1] if tests else "no output"))
try:
    extract = json.loads((out / "extract.json").read_text())
    rows.append(("precision auto", extract["precision_auto"]))
    for name, rate in extract["model_only"].items():
        rows.append((f"model only, {name}", f"{rate:,.0f} patches/s"))
    for run in extract["runs"]:
        rows.append((
            f"extract {run['cohort']} {run['run']} ({run['precision']}), {run['patches']} patches",
            f"loop {run['loop']:,.0f}/s, whole run {run['whole']:,.0f}/s "
            f"({run['loop_vs_model']:.2f}x model-only); {run['decode']}",
        ))
except (OSError, ValueError, KeyError) as error:
    rows.append(("extraction", f"no figures ({error})"))
try:
    train = json.loads((out / "train.json").read_text().strip().splitlines()[-1])
    rows.append((
        f"training {train['arch']} {train['px']} px, batch {train['batch']}",
        f"pipeline {train['pipeline']:,.0f} images/s vs model-only {train['model_fast']:,.0f} "
        f"= {train['pipeline_vs_model_fast']:.2f}x ({train['precision']})",
    ))
except (OSError, ValueError, KeyError, IndexError) as error:
    rows.append(("training", f"no figures ({error})"))
rows.append(("wall time of this check", f"{seconds} s"))
width = max(len(k) for k, _ in rows)
print()
for key, value in rows:
    print(f"| {key.ljust(width)} | {value} |")
EOF
