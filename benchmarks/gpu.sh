#!/usr/bin/env bash
# GPU benchmark on a bare CUDA machine without this repository's environment.
#
#   benchmarks/gpu.sh OUT_DIR [extra `cxrserve bench` options]
#
# Builds the demo model store on the GPU (phantoms, demo training, TorchScript/ONNX
# export: about a minute on an H100), then runs `cxrserve bench --device cuda` on it:
# the naive one-image-at-a-time baseline, in-process batched pipelines and the
# forward-only ceiling, all on the GPU. Wheels the machine lacks (torch-model-archiver,
# pydicom, pylibjpeg and plugins; onnxruntime-gpu for the CUDA provider) are installed
# from ./.whl when present. TorchServe's own GPU workers need Java and torchserve on the
# machine; without them pass `--skip torchserve`.
set -euo pipefail
out=${1:?usage: benchmarks/gpu.sh OUT_DIR [bench options]}
shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, onnxruntime as ort; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'cudnn', torch.backends.cudnn.version(), 'ort', ort.__version__, ort.get_available_providers())" | tee -a "$out/gpu.txt"

work=${CXRSERVE_GPU_WORK:-/tmp/cxrserve-gpu}
start=$(date +%s)
python3 -m cxrserve store build --store "$work/store" --work "$work/build" --device cuda 2>&1 \
  | grep -v "it/s" | tee "$out/store.log"
echo "demo store built on the GPU in $(( $(date +%s) - start )) s" | tee -a "$out/gpu.txt"
python3 -m cxrserve bench --store "$work/store" --work "$work/build" --device cuda --data none \
  --out "$out" --tag gpu "$@" 2>&1 | grep -v "it/s" | tee "$out/bench.log"
