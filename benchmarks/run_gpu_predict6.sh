#!/usr/bin/env bash
# Short GPU check after FUSED_MAX_TILES (the fused emit only for groups of <= 8 tiles): the per-key
# Triton tests and predict_rounds.py's per-key rows. Results under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/machine.txt
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_predict.py -k "triton_passes or fused_emit or chunk_skip" > $OUT/predict_tests.log 2>&1; tail -1 $OUT/predict_tests.log
timeout 90 python3 benchmarks/predict_rounds.py --only "64x16 per-key,64x1 per-key" > $OUT/rounds_final.log 2>&1
grep -o "dense [0-9.]*\|64x[0-9]* per-key[^;]*" $OUT/rounds_final.log | sort
