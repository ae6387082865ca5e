#!/bin/bash
# The GPU checks in one call of a lent device machine (the `device` tool; RESULTS.md has the
# figures). That machine has its own python3 with torch but no DeepSpeed and no registry: the
# wheels in .whl/ (deepspeed 0.19.8 and what it needs beyond that image, fetched here with
# `pip download`) travel with the call. Everything written goes to $OUT.
#   device run: bash benchmarks/device_run.sh [diagnose]   (carry: .whl)
set -o pipefail
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$OUT/env.txt" || exit 1
if [ "${1:-bench}" = diagnose ]; then  # the second call: why sampling and training are as measured
  # 14th session: bf16 not repeatable with PyTorch's kernel choice, fp32 repeatable. Next: is it
  # cuDNN's fused attention (picked for bf16 only)?
  for opts in "--sdpa no-cudnn" "--sdpa math" "--sdpa no-cudnn --deterministic"; do
    timeout 90 python3 benchmarks/check_batch_invariance.py $opts 2>&1 | tee -a "$OUT/invariance.md"
  done
  timeout 150 python3 benchmarks/profile_step.py --preset XL --batches 16,32 2>&1 \
    | tee "$OUT/profile.log" | grep -v "^\[\|Warning\|warn"
  exit 0
fi
timeout "${CHECK_TIMEOUT:-120}" python3 benchmarks/check_batch_invariance.py 2>&1 | tee "$OUT/invariance.md"
timeout "${BENCH_TIMEOUT:-470}" python3 benchmarks/bench_gpu.py --budget-s "${BUDGET_S:-420}" \
  --out "$OUT/gpu.md" 2>&1 | tee "$OUT/bench.log" | grep -v "^\[\|^ \|^$\|Warning\|warn"
echo "exit ${PIPESTATUS[0]}"
