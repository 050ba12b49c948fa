#!/usr/bin/env bash
# The GPU checks in one go (issues 18 and 27): one command on a bare GPU machine with Python 3
# and pip, under 8 minutes on an H100/H200 host with 16 cores (the step limits add up to
# 440 s):
#   0. install what is missing (imagecodecs, tifffile, opencv, pandas, pytest, ...; torch and
#      torchvision too when absent) from the wheels in $WHEELS when given (no registry
#      needed), else from the registry: into the virtualenv when run from one, else into
#      $OUT/py (a user site, which keeps what the machine already has)
#   1. the gpu-marked tests: CUDA vs CPU fingerprints (Aperio, YCbCr, and a cohort mixing
#      Aperio, YCbCr, deflate and a slide with a corrupt tile, in the same batches), nvJPEG
#      against libjpeg-turbo, pinned batches, AMP training steps
#   2. whether nvJPEG honours the Adobe marker of Aperio's R,G,B tiles (check_nvjpeg.py):
#      whether such slides take the GPU path or fall back to the readers
#   3. extraction end to end (bench_extract.py): the real-texture slide and a synthetic 40x
#      slide (20,000 x 15,000 px, 48 links to it: ~40,000 patches), default settings and fp32, with the
#      model-only rates
#   4. training throughput of the fingerprint network against its model-only rate
# Every figure lands in $OUT as soon as it is measured: each step's log as it runs,
# extract.json after each extraction, and a row in figures.md when each step ends. A step
# past its limit is stopped; the others still run.
#
#   bash benchmarks/gpu_check.sh                 # from anywhere in the repository
#   WHEELS=/path/to/wheels OUT=/tmp/gpu PYTHON=python3.11 bash benchmarks/gpu_check.sh
# A wheel folder for a machine without the registry (its Python's version; torch and
# torchvision too if it has none):
#   pip download -d wheels --only-binary=:all: --python-version 3.11 imagecodecs tifffile \
#       opencv-python-headless pyarrow pandas defusedxml pillow click tqdm pytest
# Each step may overrun its limit by the 5 s its kill takes: 465 s at most in all.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d /tmp/gpu-check-XXXX)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
started=$(date +%s)
# The repository first (fpstore runs from here, uninstalled), the caller's path kept.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUSERBASE="$OUT/py" PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
cpu=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)
echo "machine: ${gpu:-no nvidia-smi}; $(nproc) cores, ${cpu}; $("$PY" -V 2>&1); $(date -u +%FT%TZ)" |
    tee "$OUT/machine.txt"
echo "| check | figure |" >"$OUT/figures.md"
echo "|---|---|" >>"$OUT/figures.md"

step() {  # name, seconds, command...: its log written as it runs, then its row
    local name=$1 limit=$2
    shift 2
    local t0
    t0=$(date +%s)
    timeout -k 5 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $(($(date +%s) - t0)) s of $limit (log $OUT/$name.log)"
    tail -3 "$OUT/$name.log"
    rows "$name" "$rc" | tee -a "$OUT/figures.md"
}

install() {  # what these checks import and this Python lacks, and only that
    local missing where
    missing=$("$PY" - <<'EOF'
import importlib.util

need = {  # module: distribution (setup.cfg's lower bounds)
    "torch": "torch==2.12.1", "torchvision": "torchvision==0.27.1", "numpy": "numpy>=1.26",
    "PIL": "pillow>=10", "cv2": "opencv-python-headless>=4.8", "tifffile": "tifffile>=2024.2",
    "imagecodecs": "imagecodecs>=2024.1", "pyarrow": "pyarrow>=15", "pandas": "pandas",
    "defusedxml": "defusedxml", "click": "click>=8.1", "tqdm": "tqdm>=4.66",
    "pytest": "pytest>=8",
}
print(" ".join(d for m, d in need.items() if importlib.util.find_spec(m) is None))
EOF
    )
    if [ -z "$missing" ]; then
        echo "nothing to install"
        return 0
    fi
    # A virtualenv takes them itself; elsewhere a user site under $OUT, seen by every child
    # through PYTHONUSERBASE, and pip skips what the system already has.
    where=$("$PY" -c 'import sys; print("" if sys.prefix != sys.base_prefix else "--user")')
    echo "installing $missing ${where:+(user site $PYTHONUSERBASE)}"
    # shellcheck disable=SC2086  # one word per requirement
    "$PY" -m pip install --quiet $where ${WHEELS:+--no-index --find-links "$WHEELS"} $missing &&
        echo "installed $missing"
}

rows() {  # step name, exit status: its figures as table rows
    "$PY" - "$OUT" "$1" "$2" <<'EOF'
import json, sys
from pathlib import Path

out, name, rc = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
log = (out / f"{name}.log").read_text(errors="replace").strip().splitlines()
last = log[-1] if log else "no output"
document = next((line for line in reversed(log) if line.startswith("{")), "")  # JSON line
status = "" if rc == "0" else f" (exit {rc}{', time limit' if rc in ('124', '137') else ''})"
rows = []
try:
    if name == "install":
        rows.append(("install", last + status))
    elif name == "gpu_tests":
        rows.append(("gpu tests", last + status))
    elif name == "nvjpeg":
        found = json.loads(document)
        rows.append((
            "Aperio R,G,B tiles (APP14 marker) on nvJPEG",
            f"{found['aperio']}: mean difference {found['aperio_with_marker']} with the marker, "
            f"{found['aperio_without_marker']} without; YCbCr tiles {found['ycbcr']} "
            f"(agreement <= {found['agreement']}){status}",
        ))
    elif name == "extract":
        extract = json.loads((out / "extract.json").read_text())
        rows.append(("precision auto", extract["precision_auto"]))
        for variant, rate in extract["model_only"].items():
            rows.append((f"model only, {variant}", f"{rate:,.0f} patches/s"))
        for run in extract.get("runs") or extract["measured"]:
            rows.append((
                f"extract {run['cohort']} {run['run']} ({run['precision']}), "
                f"{run['patches']} patches",
                f"loop {run['loop']:,.0f}/s, whole run {run['whole']:,.0f}/s "
                f"({run['loop_vs_model']:.2f}x model-only); {run['decode']}",
            ))
        if "runs" not in extract:
            rows.append(("extraction", f"cut short after {len(extract['measured'])} run(s){status}"))
    elif name == "train":
        train = json.loads(document)
        rows.append((
            f"training {train['arch']} {train['px']} px, batch {train['batch']}",
            f"pipeline {train['pipeline']:,.0f} images/s vs model-only {train['model_fast']:,.0f}"
            f" = {train['pipeline_vs_model_fast']:.2f}x ({train['precision']}){status}",
        ))
except (OSError, ValueError, KeyError, IndexError) as error:
    rows.append((name, f"no figures ({type(error).__name__}: {error}){status}"))
for key, value in rows:
    print(f"| {key} | {value} |")
EOF
}

export -f install
export PY OUT
step install 80 bash -c install
step gpu_tests 110 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
step nvjpeg 40 "$PY" benchmarks/check_nvjpeg.py --device cuda
step extract 165 "$PY" benchmarks/bench_extract.py --device cuda --synthetic 20000x15000 \
    --copies 48 --seconds 3 --runs default,fp32 --out "$OUT/extract" --json "$OUT/extract.json"
step train 45 "$PY" benchmarks/bench_train.py --device cuda --batch 256 --workers 12 --steps 20

echo "| wall time of this check | $(($(date +%s) - started)) s |" >>"$OUT/figures.md"
echo
echo "$(cat "$OUT/machine.txt")"
cat "$OUT/figures.md"
