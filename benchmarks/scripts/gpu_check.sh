#!/usr/bin/env bash
# The speed targets and the full-schedule accuracy table on a GPU, for a session that is lent one through the
# `device` tool (one H200, 15 minutes of device time in all; its image has torch, timm, tensorboard, scikit-image,
# safetensors, einops, tqdm, but not monai, ignite, fire, nibabel or pydicom).
#
# Prepare here, once (files ignored by git, carried to the device machine):
#   echo /.gpu/ >> .git/info/exclude; mkdir -p .gpu/whl .gpu/cache
#   .venv/bin/pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
#       monai==1.6.1 pytorch-ignite==0.5.5 fire==0.7.1 termcolor==3.3.0 nibabel pydicom
#   cp ~/.cache/fpt_monai/efficientnet_lite0_fpt.safetensors .gpu/cache/   # the demo weights (fpt-monai demo makes them)
# Then two calls, each well inside the 10-minute limit (run: carry [".gpu"], timeout_s 540):
#   bash benchmarks/scripts/gpu_check.sh bench      # parameters, memory (CPU accounting), cache, speed on cuda
#   bash benchmarks/scripts/gpu_check.sh accuracy   # every method at 512 px, 20 epochs, one table
# Results land in $OUT (results.md/json, accuracy.md/json, the log).
set -euo pipefail
part=${1:?give bench or accuracy}
out=${OUT:-gpu_out}
mkdir -p "$out"
if [ -d .gpu/whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 FPT_MONAI_CACHE=$PWD/.gpu/cache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
case "$part" in
  bench)
    python3 -m fpt_monai bench --device cuda --output_dir "$out" 2>&1 | tee "$out/bench.log" ;;
  accuracy)
    python3 -m fpt_monai accuracy --num_epochs 20 --work_dir /tmp/fpt_accuracy --output_dir "$out" 2>&1 \
      | tee "$out/accuracy.log" ;;
  *) echo "unknown part $part: bench or accuracy" >&2; exit 2 ;;
esac
