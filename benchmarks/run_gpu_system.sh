#!/usr/bin/env bash
# One GPU session for the system issues: end-to-end Wan forward (issue 8), emulated 8-rank sequence
# parallelism (issue 7), predictor cost (issue 5), planner cost on the GPU (issue 6).
# Needs the diffusers wheel carried in .whl/. Results: $OUT/system.tgz.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
export PYTHONUNBUFFERED=1
R=/tmp/res; mkdir -p $R
trap 'tar czf $OUT/system.tgz -C $R .' EXIT
timeout 210 python3 benchmarks/bench_e2e.py --out $R/e2e > $R/e2e.log 2>&1; tail -25 $R/e2e.log
timeout 240 python3 benchmarks/bench_sp.py --emulate 8 --layers 2 --out $R/sp > $R/sp.log 2>&1; tail -25 $R/sp.log
timeout 100 python3 benchmarks/bench_predict.py --studies timing,reuse --out $R/predict > $R/predict.log 2>&1; tail -20 $R/predict.log
timeout 60 python3 benchmarks/bench_plan.py --device cuda --repeat 3 --steps 20 --out $R/plan > $R/plan.log 2>&1; tail -12 $R/plan.log
