#!/usr/bin/env bash
# The 8-rank emulation after the local block layout (a candidate that moves few blocks) and the
# regional workload (block-level imbalance): every workload, 2 layers, 7 rounds. Results under $OUT.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/machine.txt
timeout ${T_EMU:-540} python3 benchmarks/bench_sp.py --emulate 8 --layers 2 --repeats 7 --out $OUT/sp > $OUT/sp_emulated8.log 2>&1
echo "rc $?"
rm -f $OUT/sp/*.pt
grep -E "best fixed|speedup|target|agrees" $OUT/sp_emulated8.log
