#!/usr/bin/env bash
# One GPU session after plans list each group's dense heads first: the predictor's GPU tests and a
# kernel-level profile of the per-key fine predictors, then the 8-rank emulation twice: run A records the local problems
# (with dense_consecutive), calibrate_cost_model.py refits the cost model from them (the mixed-call
# overhead for consecutive and for scattered dense heads), run B measures with that model.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/machine.txt
timeout ${T_TEST:-90} python3 -m pytest -q -p no:cacheprovider tests/test_predict.py -k "triton or fused or bracket" > $OUT/predict_tests.log 2>&1; tail -1 $OUT/predict_tests.log
timeout ${T_PROF:-90} python3 benchmarks/profile_predict.py > $OUT/profile_predict.txt 2>&1; grep "===" $OUT/profile_predict.txt
timeout ${T_EMU:-220} python3 benchmarks/bench_sp.py --emulate 8 --layers 2 --out $OUT/emu_a > $OUT/emu_a.log 2>&1; grep -E "speedup|target" $OUT/emu_a.log
python3 benchmarks/calibrate_cost_model.py --problems $OUT/emu_a/sp_problems.csv --device "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" --out $OUT/cost_model.json | tail -2
cp $OUT/cost_model.json dbsp/cost_model.json
timeout ${T_EMU:-220} python3 benchmarks/bench_sp.py --emulate 8 --layers 2 --out $OUT/emu_b > $OUT/emu_b.log 2>&1; tail -24 $OUT/emu_b.log
rm -f $OUT/emu_a/*.png $OUT/emu_b/*.png $OUT/emu_a/*.pt $OUT/emu_b/*.pt
ls -R $OUT | head -30
