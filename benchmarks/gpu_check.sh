#!/usr/bin/env bash
# One prepared run on a lent GPU machine (see DEVELOPERS notes in benchmarks/RESULTS.md):
# the engine's tests on CUDA, bench_engine.py in fp32 and bf16, bench_batch.py. Writes to $OUT.
# It installs nothing from the network: pytorch-grad-cam and ttach travel as wheels in .whl/
# (pip wheel --no-deps grad-cam==1.5.7 ttach==0.0.3 -w .whl); torch, torchvision, OpenCV,
# scikit-learn and pytest are already on the machine's image.
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}   # DEVICE=cpu EXTRA="--batch 2 ..." for a dry run on a CPU machine
EXTRA=${EXTRA:-}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider -x -o addopts="" \
    tests/test_engine_cuda.py tests/test_engine_golden.py tests/test_engine_behaviour.py \
    tests/test_parity_pytorch_grad_cam.py 2>&1 | tail -25 | tee "$OUT/pytest-gpu.txt"
timeout 200 python3 benchmarks/bench_engine.py --device "$DEVICE" --repeats 10 \
    --scorecam-model resnet50 --scorecam-bf16 $EXTRA 2>&1 | tee "$OUT/bench-gpu-fp32.md"
timeout 90 python3 benchmarks/bench_engine.py --device "$DEVICE" --repeats 10 --amp bf16 \
    --no-scorecam --no-peer $EXTRA 2>&1 | tee "$OUT/bench-gpu-bf16.md"
# the batch pipeline vs the engine alone (issue 7), demo model and ResNet-50
timeout 120 python3 benchmarks/bench_batch.py --device "$DEVICE" --images 256 --rounds 3 \
    --batch-size 32 2>&1 | tee "$OUT/bench-batch-demo.md"
timeout 120 python3 benchmarks/bench_batch.py --device "$DEVICE" --images 256 --rounds 3 \
    --batch-size 32 --model resnet50 2>&1 | tee "$OUT/bench-batch-resnet50.md"
