#!/usr/bin/env bash
# Final short GPU session: compiled FlexAttention test at 128-token blocks, and the Wan2.1-1.3B
# end-to-end forward with the corrected attention attribution. Results: $OUT/final.tgz.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
export PYTHONUNBUFFERED=1
R=/tmp/res; mkdir -p $R
trap 'tar czf $OUT/final.tgz -C $R .' EXIT
timeout 150 python3 benchmarks/bench_e2e.py --models wan2.1-1.3b --fixed 128x1@0.2,64x1@0.2,128x128@0.2,64x64@0.2 --predictor "" --repeats 3 --out $R/e2e > $R/e2e.log 2>&1; tail -16 $R/e2e.log
timeout 75 python3 -m pytest -q tests/test_flex.py -k compiled -p no:cacheprovider > $R/flex.log 2>&1; tail -3 $R/flex.log
