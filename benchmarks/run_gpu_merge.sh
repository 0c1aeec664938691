#!/usr/bin/env bash
# The ring's one-pass merge on the GPU, in one call (~7-8 min on an H100):
#  1. its tests (native Triton) and bench_merge.py (PyTorch merge vs the kernel; one U1R8 ring rank);
#     profile_slicing.py (what a call spends cutting a new mask into local masks);
#  2. the 8-rank emulation, which times every ring step with its merge (REPEATS rounds, default 11),
#     planned with the shipped calibration;
#  3. calibrate_cost_model.py on that run's problems (merge_gbps fitted) -> $OUT/cost_model_merge.json;
#  4. the emulation again (REPEATS2 rounds, default 7; 0 skips it), planned and predicted with that calibration.
# Results under $OUT (8 files).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
{
  timeout 180 python3 -m pytest -q tests/test_dist_layout.py -k merge 2>&1 | tail -4
  echo "tests rc ${PIPESTATUS[0]}"
  timeout 120 python3 benchmarks/bench_merge.py --out $OUT 2>&1
  echo "bench_merge rc $?"
  timeout 90 python3 benchmarks/profile_slicing.py --heads 40 2>&1
  echo "profile_slicing rc $?"
} > $OUT/merge.log
cat $OUT/merge.log
timeout ${T_EMU:-270} python3 benchmarks/bench_sp.py --emulate 8 --layers 2 --repeats ${REPEATS:-11} --out $OUT/sp > $OUT/sp_emulated8.log 2>&1
echo "emulation rc $?"
grep -E "best fixed|speedup|target|agrees|deviation|noise" $OUT/sp_emulated8.log
python3 benchmarks/calibrate_cost_model.py --problems $OUT/sp/sp_problems.csv --device "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" \
  --out $OUT/cost_model_merge.json 2>&1 | tail -2
if [ "${REPEATS2:-7}" != 0 ]; then  # REPEATS2=0 skips it (rescore_sp.py re-predicts step 2's plans on CPU instead)
  timeout ${T_EMU2:-200} python3 benchmarks/bench_sp.py --emulate 8 --layers 2 --repeats ${REPEATS2:-7} --cost-model $OUT/cost_model_merge.json \
    --out /tmp/sp_merge_cm > $OUT/sp_emulated8_merge_cm.log 2>&1
  echo "emulation with the refit rc $?"
  grep -E "best fixed|speedup|target|agrees|deviation|noise" $OUT/sp_emulated8_merge_cm.log
fi
mv $OUT/sp/sp.csv $OUT/sp/sp_problems.csv $OUT/sp/sp_ranks.csv $OUT/ 2>/dev/null
rm -rf $OUT/sp
