#!/usr/bin/env bash
# Every CUDA test and benchmark of the project, on one CUDA GPU, in under 8 minutes.
#
#   bash experiments/gpu_check.sh [OUT]          # tables and logs go to OUT (default experiments/results/gpu)
#
# Steps (each capped so that the whole run stays under the 8-minute budget; a step that runs out of
# time is marked TIMEOUT and the rest go on):
#   1. the CUDA tests: compiled mask and stochastic kernels (tests/test_gpu.py), the CSR and 2:4 training
#      kernels (tests/test_sparse_compute.py), 2:4 inference export, mask hashes on CUDA, the FSDP1 refusal;
#   2. whole training steps on the CSR kernels against the masked path, ViT-B MLP (768-3072-768, batch 512),
#      bf16 autocast, 95 % and 98 % (experiments/bench_sparse_compute.py --device cuda);
#   3. the same with 2:4 masks: masked vs CSR vs 2:4 semi-structured vs auto, ViT-B MLP and 1024-4096-4096-1024;
#   4. 2:4 semi-structured inference against dense (experiments/bench_semi_structured.py);
#   5. the bf16 overhead row at ResNet-50 224x224 batch 128 (experiments/bench_overhead.py --device cuda),
#      which includes the torch.compile'd mask kernel (gmp_compiled).
# Writes OUT/gpu_check.md (what ran, status, seconds) beside the tables. Without CUDA it runs nothing,
# prints this plan and exits 0. On the project's device machine, bring the folder back in one file:
#   bash experiments/gpu_check.sh && tar czf "$OUT/gpu.tgz" experiments/results/gpu
set -u
cd "$(dirname "$0")/.."
OUT="${1:-experiments/results/gpu}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
BUDGET_S=470  # 7 min 50 s for all steps together

STEPS=(
  "tests|150|python -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py tests/test_sparse_compute.py tests/test_export.py::test_to_semi_structured_on_cuda tests/test_fingerprint.py::test_same_hash_on_cuda tests/test_sharded.py::test_fsdp1_strategy_fails_at_fit_start_on_gpu"
  "csr_training|75|python experiments/bench_sparse_compute.py --device cuda --models vitb_mlp --sparsities 0.95,0.98 --threads 1 --variants masked,csr,auto --rounds 5 --steps 10 --out $OUT"
  "two_four_training|90|python experiments/bench_sparse_compute.py --device cuda --models vitb_mlp,mlp4096 --structure 2:4 --threads 1 --rounds 5 --steps 10 --out $OUT"
  "semi_structured_inference|45|python experiments/bench_semi_structured.py --out $OUT"
  "overhead_resnet50_224_b128|240|python experiments/bench_overhead.py --device cuda --model resnet50 --image-size 224 --batch-size 128 --rounds 2 --steps 4 --profiled-runs 1 --out $OUT"
)

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device here, so nothing was run. On a machine with one CUDA GPU it runs, within ${BUDGET_S} s:"
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name cap cmd <<<"$step"
    echo "  [$name, at most ${cap} s] $cmd"
  done
  echo "and writes the tables and logs to $OUT/."
  exit 0
fi

mkdir -p "$OUT"
START=$(date +%s)
SUMMARY="$OUT/gpu_check.md"
{
  echo "# gpu_check: CUDA tests and benchmarks"
  echo
  echo "$(python -c 'import torch; print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)') | $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "| step | status | seconds | command |"
  echo "|---|---|---|---|"
} >"$SUMMARY"
FAILED=0
for step in "${STEPS[@]}"; do
  IFS='|' read -r name cap cmd <<<"$step"
  left=$((BUDGET_S - ($(date +%s) - START)))
  limit=$((cap < left ? cap : left))
  if ((limit <= 5)); then
    echo "| $name | SKIPPED (no time left) | 0 | \`$cmd\` |" >>"$SUMMARY"
    FAILED=1
    continue
  fi
  echo "== $name (at most ${limit} s): $cmd"
  t0=$(date +%s)
  timeout "$limit" bash -c "$cmd" >"$OUT/$name.log" 2>&1
  rc=$?
  took=$(($(date +%s) - t0))
  case $rc in
    0) status=ok ;;
    124) status=TIMEOUT; FAILED=1 ;;
    *) status="FAILED (exit $rc)"; FAILED=1 ;;
  esac
  tail -n 3 "$OUT/$name.log"
  echo "| $name | $status | $took | \`$cmd\` |" >>"$SUMMARY"
done
echo >>"$SUMMARY"
echo "Total: $(($(date +%s) - START)) s. Logs: <step>.log beside this file." >>"$SUMMARY"
cat "$SUMMARY"
exit $FAILED
