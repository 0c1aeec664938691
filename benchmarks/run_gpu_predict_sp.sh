#!/usr/bin/env bash
# One GPU session: predictor tests on CUDA and the timing study (issue 5),
# then the 8-rank emulation with the recalibrated cost model (issue 7). Results under $OUT.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/machine.txt
timeout ${T_TEST:-100} python3 -m pytest -q -p no:cacheprovider tests/test_predict.py -k "fused or triton" > $OUT/predict_tests.log 2>&1; tail -2 $OUT/predict_tests.log
timeout ${T_BENCH:-150} python3 benchmarks/bench_predict.py --studies timing --out $OUT/predict > $OUT/predict.log 2>&1; grep -E "pooled|reuse|per-key|dense SDPA" $OUT/predict.log
timeout ${T_EMU:-300} python3 benchmarks/bench_sp.py --emulate 8 --layers 2 --out $OUT/sp_emu8 > $OUT/sp_emu8.log 2>&1; tail -22 $OUT/sp_emu8.log
