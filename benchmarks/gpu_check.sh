#!/usr/bin/env bash
# The first GPU run of moezoo's Triton expert kernels, in one go (under 5 minutes on one H100/H200,
# no internet needed; a peers/ folder with scattermoe travels with the repository when present):
#
#   1. the kernel tests compiled (TRITON_INTERPRET=0): forward and every gradient against the torch
#      backend and a float64 loop, in bf16, fp16, fp32 with TF32 and exact fp32;
#   2. benchmarks/kernels.py on the V-MoE-B, fine-grained and Mixtral-like shapes (bf16, the
#      smallest first) under a time budget, writing its JSON (device name included) after every
#      method.
#
# Every part runs even when an earlier one fails; a summary comes last. Logs and JSON go to
# ${OUT:-benchmarks/results}.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu      # the same steps on the CPU: interpreter, a tiny shape
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
MODE="${1:-gpu}"
# The tests that need the GPU most (real tiles, TF32, 16-bit rounding) run first, the rest after.
FIRST="medium_shape or tf32 or low_precision"
case "$MODE" in
  gpu) export TRITON_INTERPRET=0
       BENCH=(--device cuda --dtype bf16 --shapes vmoe_b,fine_grained,mixtral --warmup 2 --iters 10
              --time-budget "${BENCH_BUDGET:-90}")
       BENCH_JSON="$OUT/kernels_gpu.json"
       # Each part is stopped at its limit (pytest then reports what ran): 100 + 60 + 120 s at most.
       FIRST_LIMIT=100 REST_LIMIT=60 BENCH_LIMIT=$(( ${BENCH_BUDGET:-90} + 30 )) ;;
  --cpu) export TRITON_INTERPRET=1
       # fp32: the interpreter's numpy dot cannot read bf16, which ScatterMoE does not work around
       BENCH=(--device cpu --dtype fp32 --shapes tiny_gated,tiny_bias --tokens 32 --warmup 0 --iters 1
              --time-budget 120)
       BENCH_JSON="$OUT/kernels_cpu_check.json"
       FIRST_LIMIT=300 REST_LIMIT=600 BENCH_LIMIT=300 ;;
  *) echo "usage: $0 [--cpu]" >&2; exit 2 ;;
esac

declare -a SUMMARY
part() {  # part NAME LIMIT_S COMMAND...: run with a wall-clock limit, log to $OUT/gpu_check_NAME.log
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "== $name: $*"
  timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT/gpu_check_$name.log"
  local rc=${PIPESTATUS[0]}
  local verdict=ok
  [ "$rc" -ne 0 ] && verdict="FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ', time limit'))"
  SUMMARY+=("$name: $verdict in $((SECONDS - start)) s")
}

if [ "$MODE" = gpu ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/gpu_check_device.log"
fi
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"

PYTEST=(python -m pytest -q -p no:cacheprovider -o addopts="" -m "not slow" -rs tests/kernels/test_triton.py)
part tests_first "$FIRST_LIMIT" "${PYTEST[@]}" -k "$FIRST"
part tests_rest "$REST_LIMIT" "${PYTEST[@]}" -k "not ($FIRST)"
part benchmark "$BENCH_LIMIT" python benchmarks/kernels.py "${BENCH[@]}" --out "$BENCH_JSON"

echo "== summary"
printf '%s\n' "${SUMMARY[@]}"
for log in tests_first tests_rest; do
  echo "$log: $(grep -E "passed|failed|error|no tests ran" "$OUT/gpu_check_$log.log" | tail -1)"
done
python - "$BENCH_JSON" <<'EOF'
import json, sys
try:
    report = json.load(open(sys.argv[1]))
except (OSError, ValueError) as error:
    sys.exit(f"no benchmark JSON: {error}")
print("device:", report["device"])
for name, entry in report["shapes"].items():
    for method, result in entry.get("results", {}).items():
        print(f"  {name:13} {method:14} fwd {result['fwd_ms']:9.3f} ms  fwd+bwd {result['fwd_bwd_ms']:9.3f} ms"
              f"  {result['fwd_bwd_tflops']:8.2f} TFLOP/s")
    for method, diff in entry.get("max_rel_diff_vs_moezoo_torch", {}).items():
        print(f"  {name:13} {method:14} max rel diff vs moezoo torch: out {diff['out']:.2e}, dx {diff['dx']:.2e}")
    for target, verdict in entry.get("targets", {}).items():
        value = verdict["value"]
        print(f"  {name:13} {target:28} {'-' if value is None else f'{value:.3f}':>7}  met: {verdict['met']}")
    for method, note in entry.get("notes", {}).items():
        print(f"  {name:13} note {method}: {note}")
EOF
