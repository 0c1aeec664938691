#!/usr/bin/env bash
# One GPU session for the kernel issue: GPU tests, the side-by-side benchmark on three shapes,
# and Nsight Compute counters for one fine-grained and one block launch. Results: $OUT/kernels.tgz.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=/tmp/res; mkdir -p $R
trap 'tar czf $OUT/kernels.tgz -C $R .' EXIT
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv | tee $R/gpu.txt
timeout 150 python3 -m pytest -q tests/test_kernels_gpu.py tests/test_flex.py -p no:cacheprovider 2>&1 | tee $R/gpu_tests.log | tail -4
timeout 170 python3 benchmarks/bench_kernels.py --shapes wan1.3b-480p --out $R/wan13 > $R/wan13.log 2>&1; tail -60 $R/wan13.log | grep -E "^wan|shape"
timeout 70 python3 benchmarks/bench_kernels.py --shapes wan14b-720p-1of8 --masks 128x128,64x1,128x1 --patterns random --densities 1.0,0.3,0.05 --out $R/wan14 > $R/wan14.log 2>&1; grep -A20 "^shape" $R/wan14.log
timeout 70 python3 benchmarks/bench_kernels.py --shapes hunyuan-720p --masks 128x128,128x1 --patterns random --densities 1.0,0.3 --out $R/hun > $R/hun.log 2>&1; grep -A10 "^shape" $R/hun.log
for m in 64x1 128x128; do
  timeout 50 ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis -k regex:_sparse_fwd_kernel --launch-skip 1 -c 1 python3 benchmarks/profile_kernel.py --mask $m > $R/ncu_$m.txt 2>&1
  grep -E "TFLOPS|Throughput|Duration|L2|Memory" $R/ncu_$m.txt | head -14
done
