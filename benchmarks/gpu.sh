#!/usr/bin/env bash
# One prepared GPU run (for a session lent an accelerator, e.g. through the `device` tool):
# the CUDA path of the tests, the merge and evaluation benchmarks on the GPU, and the demo's
# search end to end on the GPU. Everything lands flat in ${OUT:-results/gpu}/ (at most 8 files).
# Nothing here runs in CI (CI has no GPU).
#
#   bash benchmarks/gpu.sh     # on a machine with torch+CUDA and the project's dependencies
#
# Where the project's dependencies are missing (a bare CUDA image with torch and transformers),
# put their wheels in .whl/ first; they are installed into /tmp/site. A prebuilt zoo in .gpu/zoo
# (`evomerge zoo build .gpu/zoo`) saves the demo the minute of building one.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-results/gpu}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -f .gpu/zoo/zoo.json ] && export EVOMERGE_ZOO="$PWD/.gpu/zoo"
py=${PYTHON:-python3}
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $py -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda,
torch.cuda.get_device_name(0), "| transformers", transformers.__version__); import os; print(os.cpu_count(), "CPU cores")'
} 2>&1 | tee "$out/machine.txt"

# 1. The CUDA path of the tests: kernel and one-off merges on the GPU against the CPU, the
#    radix-select threshold tables, the evaluator's fast path against real decoding.
timeout 150 $py -m pytest -q -p no:cacheprovider -k "cuda or radix" tests/test_methods.py tests/test_evaluate.py 2>&1 \
  | tail -n 30 | tee "$out/tests-cuda.log"

# 2. Merge kernel per candidate on the GPU (~250M-parameter Llama-shaped models, 3 sources), vs a
#    device memcpy. mergekit is not run here (CPU only, and not installed on a bare image).
timeout 240 $py benchmarks/bench_merge.py --device cuda --layers 32 --no-mergekit --candidates 5 \
  --workdir /tmp/evomerge-bench-gpu --out "$out/bench_merge.md" > "$out/bench_merge.log" 2>&1
tail -n 20 "$out/bench_merge.md" 2>/dev/null || tail -n 20 "$out/bench_merge.log"

# 3. Evaluation on the GPU: evomerge's harness vs the forward-pass floor (lm-eval where installed).
lm=""; $py -c 'import lm_eval' 2> /dev/null || lm="--no-lm-eval"
timeout 90 $py benchmarks/bench_eval.py --device cuda $lm --zoo "${EVOMERGE_ZOO:-/tmp/evomerge-bench-eval/zoo}" \
  --out "$out/bench_eval.md" > /dev/null 2> "$out/bench_eval.log"; tail -n 12 "$out/bench_eval.md"

# 4. The demo's search end to end on the GPU (device: auto), 60 trials.
timeout 150 $py -m evomerge search configs/demo.yaml --out /tmp/gpu-demo --n-trials 60 --device cuda > "$out/demo.log" 2>&1
cp /tmp/gpu-demo/summary.md "$out/demo_summary.md" 2>/dev/null; tail -n 5 "$out/demo.log"
echo "results in $out"
