#!/usr/bin/env bash
# One GPU session for issue 5's predictor cost: the predictor tests on CUDA (fused Triton pooled
# path vs the torch path), then bench_predict's timing study at Wan2.1-1.3B 480p (fused and torch
# rows side by side, against dense cuDNN SDPA in the same run), then the Wan2.1-1.3B forward with
# the predictor on every call next to the same density fixed. Needs the diffusers wheel in .whl/.
# Results: $OUT/predict.tgz.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
R=/tmp/res; mkdir -p $R
pack() { tar czf $OUT/predict.tgz -C $R .; }
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/machine.txt; python3 -c 'import torch, triton; print(torch.__version__, triton.__version__)' >> $R/machine.txt
timeout ${T_TEST:-150} python3 -m pytest -q -p no:cacheprovider tests/test_predict.py -k "fused or triton" > $R/predict_tests.log 2>&1; tail -4 $R/predict_tests.log; pack
timeout ${T_BENCH:-240} python3 benchmarks/bench_predict.py --studies timing --out $R/predict > $R/predict.log 2>&1; grep -E "% of dense" $R/predict.log; pack
timeout ${T_E2E:-200} python3 benchmarks/bench_e2e.py --models wan2.1-1.3b --fixed 128x128@0.2,64x64@0.2 --predictor 128x128@0.2,64x64@0.2 --repeats 3 --out $R/e2e > $R/e2e.log 2>&1; tail -16 $R/e2e.log; pack
