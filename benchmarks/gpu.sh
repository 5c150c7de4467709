#!/usr/bin/env bash
# One prepared GPU run (for a session lent an accelerator, e.g. through the `device` tool):
# the CUDA path of the tests, then the merge and evaluation benchmarks on the GPU.
# Results go to ${OUT:-results/gpu}/. Nothing here runs in CI (CI has no GPU).
#
#   bash benchmarks/gpu.sh            # on a machine with torch+CUDA and the project's dependencies
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-results/gpu}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $py -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
} | tee "$out/machine.txt"
# 1. the CUDA path of the tests (tests marked or named cuda), then the kernel tests with device=cuda
$py -m pytest -q -k "cuda or gpu" tests 2>&1 | tee "$out/tests-cuda.log"
EVOMERGE_TEST_DEVICE=cuda $py -m pytest -q tests/test_methods.py tests/test_merge_cli.py 2>&1 | tee -a "$out/tests-cuda.log"
# 2. benchmarks on the GPU (same scripts as on the CPU, device switched)
$py benchmarks/bench_merge.py --device cuda --out "$out/bench_merge.md" 2>&1 | tail -n 40
$py benchmarks/bench_eval.py --device cuda --threads 8 --out "$out/bench_eval.md" 2>&1 | tail -n 40
echo "results in $out"
