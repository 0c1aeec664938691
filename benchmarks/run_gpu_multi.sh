#!/usr/bin/env bash
# GPU sessions for issue 10 and the system issues, as named steps (default: all, in this order):
#   sp_real  torchrun benchmarks/bench_sp.py --real on every GPU (NCCL)
#   e2e_sp   torchrun benchmarks/bench_e2e_sp.py: dbsp vs diffusers' context parallelism
#   nccl     pytest tests/test_nccl.py (sp_attention over NCCL vs one GPU)
#   emu8     benchmarks/bench_sp.py --emulate 8 on GPU 0 (records every local problem)
#   gather   benchmarks/sweep_gather.py on GPU 0 (the kernel's gather load options)
#   gputests pytest tests/test_kernels_gpu.py tests/test_kernels.py on GPU 0
# e.g. STEPS="nccl gather" bash benchmarks/run_gpu_multi.sh. Needs the diffusers wheel in .whl/.
# NVLink multicast stays off (the device docs require it). Results: $OUT/multi.tgz, refreshed after
# every step so a time-out keeps what finished.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
N=$(python3 -c 'import torch; print(torch.cuda.device_count())')
R=/tmp/res; mkdir -p $R
pack() { tar czf $OUT/multi.tgz -C $R .; }
{ nvidia-smi; nvidia-smi topo -m; python3 -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.nccl.version())'; } > $R/machine.txt 2>&1
echo "GPUs: $N"
for step in ${STEPS:-sp_real e2e_sp nccl emu8 gather gputests}; do
  case $step in
    sp_real) timeout ${T_SP:-170} torchrun --nproc_per_node $N benchmarks/bench_sp.py --real --layers ${LAYERS:-3} --out $R/sp_real > $R/sp_real.log 2>&1; tail -12 $R/sp_real.log ;;
    e2e_sp) timeout ${T_E2E:-170} torchrun --nproc_per_node $N benchmarks/bench_e2e_sp.py --out $R/e2e_sp > $R/e2e_sp.log 2>&1; tail -25 $R/e2e_sp.log ;;
    nccl) timeout ${T_TEST:-90} python3 -m pytest -q -s -p no:cacheprovider tests/test_nccl.py > $R/test_nccl.log 2>&1; grep -E "passed|failed|rror" $R/test_nccl.log | tail -5 ;;
    emu8) CUDA_VISIBLE_DEVICES=0 timeout ${T_EMU:-240} python3 benchmarks/bench_sp.py --emulate 8 --layers 2 --out $R/sp_emu8 > $R/sp_emu8.log 2>&1; tail -18 $R/sp_emu8.log ;;
    gather) CUDA_VISIBLE_DEVICES=0 timeout ${T_GATHER:-150} python3 benchmarks/sweep_gather.py --out $R/gather > $R/gather.log 2>&1; cat $R/gather.log | tail -40 ;;
    gputests) CUDA_VISIBLE_DEVICES=0 timeout ${T_GPUTESTS:-150} python3 -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py tests/test_kernels.py > $R/gputests.log 2>&1; tail -3 $R/gputests.log ;;
    *) echo "unknown step $step" ;;
  esac
  pack
done
