#!/usr/bin/env bash
# One GPU session for the predictor's device reads: GPU tests of the predictor and the dense-head
# split; the whole Wan2.1-1.3B forward with the predictor on every layer for this tree and, where
# $OLD names an earlier checkout (a folder with its dbsp/ and benchmarks/), for that one on the
# same machine; then, with ROUNDS=1, predict_rounds.py for this tree. Needs the diffusers wheel in .whl/.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/machine.txt
PYTHONPATH=$PWD timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_predict.py tests/test_kernels.py tests/test_kernels_gpu.py -k "fused or triton or thresholds or dense or full" > $OUT/tests.log 2>&1; tail -1 $OUT/tests.log
E2E="--models wan2.1-1.3b --fixed 128x128@0.2,64x64@0.2,64x1@0.2 --predictor 128x128@0.2,64x64@0.2,64x1@0.2 --repeats 3"
PYTHONPATH=$PWD:/tmp/site timeout 200 python3 benchmarks/bench_e2e.py $E2E --out $OUT/e2e_new > $OUT/e2e_new.log 2>&1; grep -E "^wan2.1-1.3b " $OUT/e2e_new.log
if [ -n "${OLD:-}" ]; then
  PYTHONPATH=$OLD:/tmp/site timeout 200 python3 $OLD/benchmarks/bench_e2e.py $E2E --out $OUT/e2e_old > $OUT/e2e_old.log 2>&1; grep -E "^wan2.1-1.3b " $OUT/e2e_old.log
fi
[ -n "${ROUNDS:-}" ] && { PYTHONPATH=$PWD timeout 100 python3 benchmarks/predict_rounds.py > $OUT/rounds.log 2>&1; cut -c1-400 $OUT/rounds.log; }
true
