#!/usr/bin/env bash
# One GPU session for issue 5's predictor cost after the offsets kernel: the predictor's GPU tests,
# predict_rounds.py (alone and in pipeline) for this tree and, where $OLD names a checkout of an
# earlier dbsp (a folder holding its dbsp/), for that one in the same session; then the 64x16
# call's pieces and a profile. Results under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/machine.txt
PYTHONPATH=$PWD timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_predict.py -k "fused or triton or thresholds" > $OUT/predict_tests.log 2>&1; tail -1 $OUT/predict_tests.log
PYTHONPATH=$PWD timeout 100 python3 benchmarks/predict_rounds.py > $OUT/rounds_new.log 2>&1; cat $OUT/rounds_new.log
if [ -n "${OLD:-}" ]; then
  PYTHONPATH=$OLD timeout 100 python3 benchmarks/predict_rounds.py > $OUT/rounds_old.log 2>&1; cat $OUT/rounds_old.log
fi
PYTHONPATH=$PWD timeout 80 python3 benchmarks/sweep_select.py > $OUT/pieces.log 2>&1; cat $OUT/pieces.log | grep -v pool_blocks
PYTHONPATH=$PWD timeout 60 python3 benchmarks/profile_predict.py --masks 64x16p,64x64 --rows 22 > $OUT/profile.txt 2>&1; grep -E "===|Self CPU time|Self CUDA time" $OUT/profile.txt
