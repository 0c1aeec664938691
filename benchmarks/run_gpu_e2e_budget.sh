#!/usr/bin/env bash
# The whole Wan2.1-1.3B forward with the predictor on every layer (no reuse; bench_e2e's
# predictors cap rows at max_keep = density x tiles) for this tree and, where $OLD names an
# earlier checkout (a folder with its dbsp/ and benchmarks/), for that one on the same machine.
# Needs the diffusers wheel in .whl/. Results under $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/machine.txt
E2E="--models wan2.1-1.3b --fixed ${FIXED:-64x1@0.2,64x16@0.2} --predictor ${PRED:-64x1@0.2,64x16@0.2,128x128@0.2} --repeats 3"
PYTHONPATH=$PWD:/tmp/site timeout 260 python3 benchmarks/bench_e2e.py $E2E --out $OUT/e2e_new > $OUT/e2e_new.log 2>&1; grep -E "^wan2.1-1.3b " $OUT/e2e_new.log
if [ -n "${OLD:-}" ]; then
  PYTHONPATH=$OLD:/tmp/site timeout 260 python3 $OLD/benchmarks/bench_e2e.py $E2E --out $OUT/e2e_old > $OUT/e2e_old.log 2>&1; grep -E "^wan2.1-1.3b " $OUT/e2e_old.log
fi
true
