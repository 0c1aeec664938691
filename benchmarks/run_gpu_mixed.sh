#!/usr/bin/env bash
# One GPU session after the in-place mixed dense/sparse head path: its GPU tests, then the 8-rank
# emulation twice: run A records the local problems, calibrate_cost_model.py refits the cost model
# from them (mixed-call overhead included), run B measures with that model. Results under $OUT.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/machine.txt
timeout ${T_TEST:-120} python3 -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py -k "dense_heads" > $OUT/mixed_tests.log 2>&1; tail -2 $OUT/mixed_tests.log
timeout ${T_EMU:-200} python3 benchmarks/bench_sp.py --emulate 8 --layers 2 --out $OUT/emu_a > $OUT/emu_a.log 2>&1; grep -E "speedup|target" $OUT/emu_a.log
python3 benchmarks/calibrate_cost_model.py --problems $OUT/emu_a/sp_problems.csv --device "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" --out $OUT/cost_model.json | tail -2
cp $OUT/cost_model.json dbsp/cost_model.json
timeout ${T_EMU:-200} python3 benchmarks/bench_sp.py --emulate 8 --layers 2 --out $OUT/emu_b > $OUT/emu_b.log 2>&1; tail -22 $OUT/emu_b.log
rm -f $OUT/emu_a/*.png $OUT/emu_b/*.png $OUT/emu_a/*.pt $OUT/emu_b/*.pt
