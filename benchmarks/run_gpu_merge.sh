#!/usr/bin/env bash
# The ring's one-pass merge on the GPU: its tests (native Triton), bench_merge.py (PyTorch merge vs
# the kernel, and one U1R8 ring rank's steps with each), then the 8-rank emulation, which now times
# every ring step with its merge (run_gpu_sp_regional.sh; REPEATS, T_EMU as there). Results under $OUT.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
{
  timeout 180 python3 -m pytest -q tests/test_dist_layout.py -k merge 2>&1 | tail -4
  echo "tests rc ${PIPESTATUS[0]}"
  timeout 180 python3 benchmarks/bench_merge.py --out $OUT/merge 2>&1
  echo "bench_merge rc $?"
} > $OUT/merge.log
cat $OUT/merge.log
bash benchmarks/run_gpu_sp_regional.sh
rm -f $OUT/sp/sp_speedup.png
