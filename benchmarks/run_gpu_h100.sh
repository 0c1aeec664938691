#!/usr/bin/env bash
# One H100 session after the gather-load options (PREFETCH, OFF32) joined the autotuner: the
# Wan2.1-1.3B end-to-end forward (issue 8), the gather sweep, the GPU kernel tests at benchmark
# shapes, and the planner's CUDA summary path. Needs the diffusers wheel in .whl/. Results:
# $OUT/h100.tgz, refreshed after every step.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
export PYTHONUNBUFFERED=1
R=/tmp/res; mkdir -p $R
pack() { tar czf $OUT/h100.tgz -C $R .; }
timeout 240 python3 benchmarks/bench_e2e.py --models wan2.1-1.3b --fixed 64x1@0.2,128x1@0.2,128x128@0.2 --predictor "" --repeats 3 --out $R/e2e > $R/e2e.log 2>&1; tail -14 $R/e2e.log; pack
timeout 60 python3 benchmarks/sweep_gather.py --masks 64x1@0.2,128x1@0.2,64x1@0.3 --out $R/gather > $R/gather.log 2>&1; grep -E "cuDNN|prefetch=(True|False) +off32=(True|False)" $R/gather.log | head -30; pack
timeout 30 python3 -m pytest -q -p no:cacheprovider tests/test_plan.py -m gpu > $R/plan_cuda.log 2>&1; tail -2 $R/plan_cuda.log; pack
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py -k "32760 and (64-1 or 128-128)" > $R/gputests.log 2>&1; tail -3 $R/gputests.log; pack
