#!/usr/bin/env bash
# The 8-rank emulation (every workload, the regional one included; 2 layers, 7 rounds) with the
# shipped calibration (dbsp/cost_model.json). With OLD_CM=<json>, then the skewed and regional
# workloads planned and predicted with that calibration, on the same machine. REPEATS sets the timing
# rounds (default 7). Results under $OUT.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/machine.txt
limit=${T_EMU:-540}
if [ -n "${OLD_CM:-}" ]; then limit=${T_EMU:-330}; fi  # both runs within one 600 s call
timeout $limit python3 benchmarks/bench_sp.py --emulate 8 --layers 2 --repeats ${REPEATS:-7} --out $OUT/sp > $OUT/sp_emulated8.log 2>&1
echo "rc $?"
rm -f $OUT/sp/*.pt
grep -E "best fixed|speedup|target|agrees|deviation|noise" $OUT/sp_emulated8.log
if [ -n "${OLD_CM:-}" ]; then
  timeout ${T_OLD:-220} python3 benchmarks/bench_sp.py --emulate 8 --layers 2 --repeats 7 --workloads skewed,regional \
    --cost-model "$OLD_CM" --out /tmp/sp_old > $OUT/sp_emulated8_oldcm.log 2>&1
  echo "rc $?"
  grep -E "best fixed|speedup|target|agrees|deviation" $OUT/sp_emulated8_oldcm.log
fi
