#!/usr/bin/env bash
# One GPU session for issue 5's per-key predictor after the chunk-level group skip: the budget
# search rows of predict_rounds.py for this tree and, where $OLD names a folder holding an earlier
# dbsp/, for that one, in alternating order; the per-pass launch sweep; the predictor's GPU tests.
# (The skip-mode sweep itself is benchmarks/sweep_predict_flags.py.) Results under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/machine.txt
for run in 1 2; do
  for tree in new old; do
    if [ $tree = old ] && [ -z "${OLD:-}" ]; then continue; fi
    root=$PWD; [ $tree = old ] && root=$OLD
    PYTHONPATH=$root timeout 150 python3 benchmarks/predict_rounds.py --budget > $OUT/budget_${tree}_$run.log 2>&1
    echo "== $tree, run $run"; grep -o "64x[0-9]* per-key[^;]*" $OUT/budget_${tree}_$run.log | grep -v "^64x16 per-key alone" | sort | head -12
  done
done
(cd benchmarks && PYTHONPATH=$PWD/.. timeout 150 python3 sweep_predict_warps.py > $OUT/warps.log 2>&1); grep -v Warn $OUT/warps.log
PYTHONPATH=$PWD timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_predict.py > $OUT/predict_tests.log 2>&1; tail -1 $OUT/predict_tests.log
