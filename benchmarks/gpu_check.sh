#!/usr/bin/env bash
# One prepared run on a lent GPU machine: the whole test suite on the GPU, then bench_engine.py
# in fp32 and bf16, bench_volumes.py (3D), bench_batch.py, bench_targets.py,
# bench_found_cli.py, bench_segmentation.py (2D U-Net), bench_vit.py (ViT / DeiT / Swin) and
# bench_tiles.py (tiled Grad-CAM over synthetic zarr slides of 8192^2 and 20,000^2).
# Everything it prints lands under $OUT. The segmentation and ViT runs need timm (importable
# without its optional huggingface_hub) and, for smp's Unet, segmentation-models-pytorch with
# huggingface_hub and safetensors, in .whl/ like pytorch-grad-cam; without smp the segmentation
# run uses MONAI.
#
# It installs nothing from the network: wheels the machine's image lacks travel in .whl/
# (pytorch-grad-cam and ttach at least: pip wheel --no-deps grad-cam==1.5.7 ttach==0.0.3 -w .whl;
# add the runtime dependencies the image lacks, within the 64 MiB a run may carry). torch,
# torchvision, OpenCV and pytest are already on the image; zarr (and numcodecs) too where the
# image lacks them, for the tiles benchmark. Test files whose imports are missing
# there are reported as collection errors in pytest-gpu.txt; the rest still run.
#
#   STAGE=all|tests|bench   what to run (default all; one command may run 10 minutes, so a
#                           short device budget runs tests and bench as two calls)
#   TESTS="tests/..."       which tests (default: the whole suite)
#   DEVICE=cuda             the benchmarks' device; EXTRA="..." more benchmark arguments
#   BENCH=0                 skip the benchmarks (the CPU dry run in DEVELOPERS.md)
#   BENCHES="engine volumes batch targets segmentation vit tiles"   which benchmark groups
#                           (default: all seven)
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
STAGE=${STAGE:-all}
TESTS=${TESTS:-tests}
DEVICE=${DEVICE:-cuda}
EXTRA=${EXTRA:-}
BENCH=${BENCH:-1}
BENCHES=${BENCHES:-engine volumes batch targets segmentation vit tiles}
want() { case " $BENCHES " in *" $1 "*) return 0;; esac; return 1; }
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
  python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/gpu.txt"

if [ "$STAGE" = all ] || [ "$STAGE" = tests ]; then
    # GUI tests need a display: Xvfb when the image has it (napari's canvas can't render on
    # the offscreen Qt platform; those tests then fail and say so)
    XVFB=""
    command -v xvfb-run > /dev/null && XVFB="xvfb-run -a"
    timeout 540 $XVFB python3 -m pytest -q -p no:cacheprovider -o addopts="" -rfEs \
        --continue-on-collection-errors $TESTS > "$OUT/pytest-gpu-full.txt" 2>&1
    echo "pytest exit status $?" >> "$OUT/pytest-gpu-full.txt"
    tail -60 "$OUT/pytest-gpu-full.txt" | tee "$OUT/pytest-gpu.txt"
fi

if [ "$BENCH" != 0 ] && { [ "$STAGE" = all ] || [ "$STAGE" = bench ]; }; then
    if want volumes; then  # 3D Grad-CAM / 3D inference at 96^3: demo3d and MONAI DenseNet121
        timeout 150 python3 benchmarks/bench_volumes.py --device "$DEVICE" --repeats 20 2>&1 \
            | tee "$OUT/bench-volumes.md"
    fi
    if want engine; then
        timeout 200 python3 benchmarks/bench_engine.py --device "$DEVICE" --repeats 10 \
            --scorecam-model resnet50 --scorecam-bf16 $EXTRA 2>&1 | tee "$OUT/bench-gpu-fp32.md"
        timeout 90 python3 benchmarks/bench_engine.py --device "$DEVICE" --repeats 10 \
            --amp bf16 --no-scorecam --no-peer $EXTRA 2>&1 | tee "$OUT/bench-gpu-bf16.md"
    fi
    if want batch; then  # the batch run end to end vs the engine alone, demo and ResNet-50
        timeout 120 python3 benchmarks/bench_batch.py --device "$DEVICE" --images 256 \
            --rounds 3 --batch-size 32 2>&1 | tee "$OUT/bench-batch-demo.md"
        timeout 120 python3 benchmarks/bench_batch.py --device "$DEVICE" --images 256 \
            --rounds 3 --batch-size 32 --model resnet50 2>&1 | tee "$OUT/bench-batch-resnet50.md"
    fi
    if want targets; then  # "every class found" vs one class: the library, and the batch command
        timeout 90 python3 benchmarks/bench_targets.py --device "$DEVICE" --images 64 \
            --size 384 --rounds 5 2>&1 | tee "$OUT/bench-targets.md"
        timeout 120 python3 benchmarks/bench_found_cli.py --images 96 --rounds 3 2>&1 \
            | tee "$OUT/bench-found-cli.md"
    fi
    if want segmentation; then  # Seg-Grad-CAM / segmentation inference, 2D U-Net at 512^2
        # smp's Unet (resnet34) where the image can import it, else MONAI's UNet
        ARCH=monai
        python3 -c "import segmentation_models_pytorch" 2> /dev/null && ARCH=smp
        timeout 150 python3 benchmarks/bench_segmentation.py --device "$DEVICE" --arch $ARCH \
            --batch 16 --rounds 10 2>&1 | tee "$OUT/bench-segmentation-$ARCH.md"
    fi
    if want vit; then  # transformer Grad-CAM / inference: ViT-Tiny, distilled DeiT-Tiny, Swin-T
        for model in vit_tiny_patch16_224 deit_tiny_distilled_patch16_224 \
                swin_tiny_patch4_window7_224; do
            timeout 60 python3 benchmarks/bench_vit.py --device "$DEVICE" --model "$model" \
                --batch 64 --rounds 10 2>&1 | tee "$OUT/bench-vit-$model.md"
        done
    fi
    if want tiles; then  # tiled Grad-CAM / tiled inference over a synthetic uint8 zarr slide:
        # 8192^2 in interleaved rounds, then the whole-slide case (20,000^2, each contender once
        # in a fresh process, peak memory); slide generation is timed apart, not counted
        timeout 300 python3 benchmarks/bench_tiles.py --device "$DEVICE" --size 8192 \
            --rounds 3 --json "$OUT/bench-tiles-8192.json" 2>&1 | tee "$OUT/bench-tiles-8192.md"
        timeout 420 python3 benchmarks/bench_tiles.py --device "$DEVICE" --size 20000 \
            --json "$OUT/bench-tiles-20000.json" 2>&1 | tee "$OUT/bench-tiles-20000.md"
    fi
fi
