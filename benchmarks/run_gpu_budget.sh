#!/usr/bin/env bash
# One GPU session for the per-key budget search (min_keep / max_keep on the device): the
# predictor's GPU tests; predict_rounds.py with --search for this tree and, where $OLD names an
# earlier dbsp checkout (a folder holding its dbsp/), the same script's --budget rows with that
# dbsp (its PyTorch top-k fix-up) on the same machine; then a kernel profile of the 64x1 call.
# Results under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/machine.txt
PYTHONPATH=$PWD timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_predict.py tests/test_kernels.py \
  -k "budget or triton or thresholds or hopper or fused or record or mixed" > $OUT/tests.log 2>&1; tail -3 $OUT/tests.log
PYTHONPATH=$PWD timeout 200 python3 benchmarks/predict_rounds.py --search ${SEARCH:-16x3,32x2} > $OUT/rounds_new.log 2>&1; cut -c1-2000 $OUT/rounds_new.log
if [ -n "${OLD:-}" ]; then
  PYTHONPATH=$OLD timeout 120 python3 benchmarks/predict_rounds.py --budget > $OUT/rounds_old.log 2>&1; cut -c1-2000 $OUT/rounds_old.log
fi
PYTHONPATH=$PWD timeout 60 python3 benchmarks/profile_predict.py --masks 64x1 --rows 22 > $OUT/profile64x1.txt 2>&1; grep -E "===|Self CUDA time|wall" $OUT/profile64x1.txt
true
