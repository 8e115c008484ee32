#!/usr/bin/env bash
# selftune's GPU checks, in one command for a machine with a CUDA device and PyTorch installed:
#   the CUDA tests (tests/test_cuda.py), the DDP example over NCCL, and the per-step cost on the
#   device (overhead_cuda.py).  Logs and results go to $OUT (default bench-results/gpu/latest).
# Needs the benchmark's data in $SELFTUNE_CACHE (default .cache), since such a machine may have no
# network: copy ~/.cache/selftune there from a machine that ran the benchmark.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench-results/gpu/latest}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 SELFTUNE_CACHE=${SELFTUNE_CACHE:-$PWD/.cache}
# deterministic cuBLAS: the replay test compares weights bit for bit
export CUBLAS_WORKSPACE_CONFIG=:4096:8
PY=${PY:-python3}
status=0
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} | tee "$OUT/env.txt"
$PY -m pytest -p no:cacheprovider -rA tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log" || status=1
rm -rf /tmp/selftune-ddp
$PY -m torch.distributed.run --standalone --nproc_per_node=1 examples/ddp_shakespeare.py \
  --device cuda --steps 300 --eval-every 100 --run-dir /tmp/selftune-ddp 2>&1 \
  | tee "$OUT/ddp.log" || status=1
$PY bench-results/gpu/overhead_cuda.py --out "$OUT" 2>&1 | tee "$OUT/overhead.log" || status=1
exit $status
