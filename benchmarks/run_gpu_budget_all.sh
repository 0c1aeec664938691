#!/usr/bin/env bash
# One GPU call for the per-key budget search: GPU tests, predict_rounds.py with the search (this
# tree) and with $OLD's PyTorch fix-up (same script, older dbsp), and the whole Wan2.1-1.3B forward
# with the predictor for this tree (and $OLD where E2E_OLD=1). Needs the diffusers wheel in .whl/.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/machine.txt
PYTHONPATH=$PWD timeout 130 python3 -m pytest -q -p no:cacheprovider tests/test_predict.py tests/test_kernels.py \
  -k "budget or triton or thresholds or hopper or record or mixed" > $OUT/tests.log 2>&1; tail -2 $OUT/tests.log
PYTHONPATH=$PWD timeout 150 python3 benchmarks/predict_rounds.py --search ${SEARCH:-16x3,32x2} > $OUT/rounds_new.log 2>&1; cut -c1-1500 $OUT/rounds_new.log
[ -n "${OLD:-}" ] && { PYTHONPATH=$OLD timeout 100 python3 benchmarks/predict_rounds.py --budget > $OUT/rounds_old.log 2>&1; cut -c1-1500 $OUT/rounds_old.log; }
E2E="--models wan2.1-1.3b --fixed ${FIXED:-64x1@0.2} --predictor ${PRED:-64x1@0.2,64x16@0.2} --repeats 3"
PYTHONPATH=$PWD:/tmp/site timeout 170 python3 benchmarks/bench_e2e.py $E2E --out $OUT/e2e_new > $OUT/e2e_new.log 2>&1; grep -E "^wan2.1-1.3b " $OUT/e2e_new.log
[ -n "${E2E_OLD:-}" ] && { PYTHONPATH=$OLD:/tmp/site timeout 200 python3 $OLD/benchmarks/bench_e2e.py $E2E --out $OUT/e2e_old > $OUT/e2e_old.log 2>&1; grep -E "^wan2.1-1.3b " $OUT/e2e_old.log; }
true
