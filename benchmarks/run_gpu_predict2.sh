#!/usr/bin/env bash
# One GPU session after the per-key predictor's fused thresholds kernel, right-sized expand and
# count-free candidates pass: the predictor's GPU tests, its timing study (with the 64x1 pass
# breakdown), and the planner benchmark on the GPU host (summaries built on CUDA). Results under $OUT.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/machine.txt
timeout ${T_TEST:-100} python3 -m pytest -q -p no:cacheprovider tests/test_predict.py -k "fused or triton or thresholds" > $OUT/predict_tests.log 2>&1; tail -1 $OUT/predict_tests.log
timeout ${T_BENCH:-200} python3 benchmarks/bench_predict.py --studies timing --out $OUT/predict > $OUT/predict.log 2>&1; grep -E "pooled|reuse|per-key|dense SDPA|part" $OUT/predict.log
if [ -n "${PLAN:-}" ]; then
  timeout ${T_PLAN:-150} python3 benchmarks/bench_plan.py --out $OUT/plan > $OUT/plan_gpu.log 2>&1; grep -E "reuse|synchronous|deferred|target" $OUT/plan_gpu.log | head -20
  rm -f $OUT/plan/*.png
fi
rm -f $OUT/predict/*.png
