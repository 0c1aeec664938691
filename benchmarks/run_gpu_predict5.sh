#!/usr/bin/env bash
# One GPU session for issue 5's per-key predictor after fusing the last candidates pass with the
# pick and the emit (predict_select.FUSED_EMIT): the predictor's GPU tests, the settings sweep
# (fused vs separate passes, same masks), predict_rounds.py for this tree and, where $OLD names a
# folder holding an earlier dbsp/, for that one; with PROFILE=1 also one 64x1 call's kernels.
# Results under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/machine.txt
PYTHONPATH=$PWD timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_predict.py -k "triton or fused_emit or skip" > $OUT/predict_tests.log 2>&1; tail -1 $OUT/predict_tests.log
(cd benchmarks && PYTHONPATH=$PWD/.. timeout 90 python3 sweep_predict_flags.py > $OUT/sweep_flags.log 2>&1); grep -v Warn $OUT/sweep_flags.log
for run in new_1 old_1; do
  root=$PWD; [ ${run%_*} = old ] && root=${OLD:-}
  [ -z "$root" ] && continue
  PYTHONPATH=$root timeout 80 python3 benchmarks/predict_rounds.py --only "64x16 pooled,64x16 per-key,64x1 per-key" > $OUT/rounds_$run.log 2>&1
  echo "== $run"; grep -o "dense [0-9.]*\|64x[0-9]* per-key[^;]*" $OUT/rounds_$run.log | sort | head -12
done
[ -n "${PROFILE:-}" ] && PYTHONPATH=$PWD timeout 60 python3 benchmarks/profile_predict.py --masks 64x1 > $OUT/profile_64x1.log 2>&1; grep -v Warn $OUT/profile_64x1.log | head -30
