#!/usr/bin/env bash
# The whole GPU check of issue #4 in one call of the device tool (docs/benchmarks.md says how
# to call it). Installs nothing: the device image has torch (CUDA), transformers, hypothesis,
# pytest-xdist, statsmodels, safetensors and scipy (/work/.library/device/KINDS.md).
#
# Stages, each under its own `timeout`, the optional ones only while the elapsed time allows,
# so that the script ends within ~7.5 minutes even when every stage hits its limit
# (expected: 3-4 minutes on an H100 or H200):
#   1. pytest --run-gpu -m gpu on property_tests and tests/{fisher_fast,fisher_ref,fishercheck}
#      (the estimators, group Fisher and attention properties against the float64 oracle on CUDA)
#   2. the issue's benchmark: GPT-2-small shape, untied 50257 head, float32, 64 x 256, with all
#      baselines (fwd+bwd, fisher, groups, loop, vmap) in the same process
#   3. (optional) the conformance properties on CUDA (tests/conformance, gpu-marked)
#   4. (optional) fisher and groups with one chunk of 64 rows (the chunk heuristic out of play)
#   5. (optional) per-head group Fisher (--groups heads)
#   6. (optional) the bf16 fast path (autocast) beside float32: fwd+bwd and fisher, each way
# TF32 is off everywhere: the tests' conftest turns it off, the benchmark does too, and
# NVIDIA_TF32_OVERRIDE=0 forbids it at the cuBLAS/cuDNN level.
#
# Writes under $OUT (at most 8 files, one level): env.txt, pytest_gpu.log, bench.log,
# bench_default.json, bench_chunk64.json, bench_heads.json, bench_bf16.json,
# gpu_check.json (summary).

set -u -o pipefail
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
read -r -a EXTRA <<< "${BENCH_EXTRA:-}"  # local smoke test only, e.g. "--layers 1 --vocab 50"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NVIDIA_TF32_OVERRIDE=0
export HYPOTHESIS_PROFILE=gpu FISHERCHECK_GPU=1
SECONDS=0
declare -A RC

{
  date -u +"date_utc %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  $PY -c "import torch, transformers, hypothesis; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name()); print('transformers', transformers.__version__, 'hypothesis', hypothesis.__version__)" 2>&1
  $PY -m pip list 2>/dev/null | grep -iE "^(pytest|pytest-xdist|statsmodels|safetensors|scipy|numpy) " 
} > "$OUT/env.txt"
cat "$OUT/env.txt"

stage() {  # stage NAME LIMIT_S LOGFILE COMMAND...
  local name=$1 limit=$2 log=$3; shift 3
  echo "=== $name (limit ${limit}s, elapsed ${SECONDS}s)" | tee -a "$OUT/$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$log"
  RC[$name]=${PIPESTATUS[0]}
  echo "=== $name rc=${RC[$name]} elapsed ${SECONDS}s" | tee -a "$OUT/$log"
}

PYTEST=($PY -m pytest -q --run-gpu -m gpu -n 4 -p no:cacheprovider --continue-on-collection-errors)
stage tests_gpu 150 pytest_gpu.log "${PYTEST[@]}" property_tests tests/fisher_fast tests/fisher_ref tests/fishercheck
stage bench_default 150 bench.log $PY benchmarks/bench_fisher.py --repeats 5 "${EXTRA[@]}" \
  --json-out "$OUT/bench_default.json"
if (( SECONDS < 300 )); then
  stage conformance_gpu 90 pytest_gpu.log "${PYTEST[@]}" tests/conformance
fi
if (( SECONDS < 340 )); then
  stage bench_chunk64 45 bench.log $PY benchmarks/bench_fisher.py --repeats 5 --chunk 64 "${EXTRA[@]}" \
    --methods fwd+bwd,fisher,groups --json-out "$OUT/bench_chunk64.json"
fi
if (( SECONDS < 370 )); then
  stage bench_heads 35 bench.log $PY benchmarks/bench_fisher.py --repeats 5 --groups heads "${EXTRA[@]}" \
    --methods fwd+bwd,groups --json-out "$OUT/bench_heads.json"
fi
if (( SECONDS < 390 )); then
  stage bench_bf16 45 bench.log $PY benchmarks/bench_fisher.py --repeats 5 "${EXTRA[@]}" \
    --methods fwd+bwd,fwd+bwd-bf16,fisher,fisher-bf16 --json-out "$OUT/bench_bf16.json"
fi

rcs=""
for k in "${!RC[@]}"; do rcs+="\"$k\": ${RC[$k]}, "; done
$PY - "$OUT" "{${rcs%, }}" "$SECONDS" <<'EOF'
import json, os, re, sys
out, rcs, seconds = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
summary = {"return_codes": rcs, "seconds": seconds, "pytest": [], "bench": {}}
log = os.path.join(out, "pytest_gpu.log")
if os.path.exists(log):
    summary["pytest"] = re.findall(r"^=*\s*(\d+ (?:passed|failed|errors?|skipped).*?) in [\d.]+s",
                                   open(log).read(), re.M)
for name in ("bench_default", "bench_chunk64", "bench_heads", "bench_bf16"):
    path = os.path.join(out, f"{name}.json")
    if os.path.exists(path):
        d = json.load(open(path))
        summary["bench"][name] = {r["method"]: {k: r.get(k) for k in ("samples_per_s", "peak_bytes", "error")}
                                  | d["ratios"].get(r["method"], {}) for r in d["results"]}
        summary.setdefault("environment", d["environment"])
json.dump(summary, open(os.path.join(out, "gpu_check.json"), "w"), indent=1)
print(json.dumps(summary, indent=1))
EOF
echo "gpu_check done in ${SECONDS}s: ${rcs%, }"
