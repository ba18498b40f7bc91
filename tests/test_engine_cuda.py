"""The engine on a CUDA device: results stay on the device, agree with the CPU, cause no host
synchronisation, and autocast works. Skipped where there is no GPU."""

import numpy as np
import pytest
import torch
import torchvision
from conftest import hooks_left, small_cnn

import napari_gradcam as ng

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ALL = ng.available_methods()


def _corr(a, b):
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=6).eval()
    x = torch.randn(4, 3, 96, 96)
    return model, x


@pytest.mark.parametrize("method", ALL)
def test_cuda_matches_cpu(resnet, method):
    model, x = resnet
    cpu = ng.explain_batch(model, x, method, targets=[0, 1, 2, 3])
    model.cuda()
    try:
        gpu = ng.explain_batch(model, x.cuda(), method, targets=[0, 1, 2, 3])
    finally:
        model.cpu()
    assert gpu.heatmaps.device.type == "cuda" and gpu.class_ids.device.type == "cuda"
    assert gpu.heatmaps.dtype == torch.float32
    for a, b in zip(cpu.heatmaps.numpy(), gpu.heatmaps.cpu().numpy()):
        if a.std() > 1e-6:
            assert _corr(a, b) > 0.999  # TF32 convolutions on the GPU: close, not bit-equal


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "hirescam", "xgradcam", "layercam"])
def test_gradient_methods_never_synchronise_with_the_host(method):
    model = torchvision.models.resnet18(num_classes=6).eval().cuda()
    x = torch.randn(4, 3, 96, 96, device="cuda")
    ng.explain_batch(model, x, method)  # warm-up: layer discovery runs once and is cached
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ng.explain_batch(model, x, method)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out.heatmaps.is_cuda


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam", "scorecam"])
def test_autocast_on_cuda(amp, method):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=6).eval().cuda()
    x = torch.randn(2, 3, 128, 128, device="cuda")
    full = ng.explain_batch(model, x, method, targets=[1, 4])
    half = ng.explain_batch(model, x, method, targets=[1, 4], amp=amp)
    assert half.heatmaps.dtype == torch.float32 and half.scores.dtype == torch.float32
    assert torch.isfinite(half.heatmaps).all()
    for a, b in zip(full.heatmaps.cpu().numpy(), half.heatmaps.cpu().numpy()):
        assert _corr(a, b) > 0.95
    torch.testing.assert_close(half.scores, full.scores, atol=0.05 * full.scores.abs().max().item(),
                               rtol=0.05)


def test_channels_last_model_and_3d_on_cuda():
    model = torchvision.models.resnet18(num_classes=3).eval().cuda().to(
        memory_format=torch.channels_last)
    x = torch.randn(2, 3, 96, 96, device="cuda").to(memory_format=torch.channels_last)
    out = ng.explain_batch(model, x, "gradcam")
    assert out.heatmaps.shape == (2, 96, 96)
    model3 = small_cnn(in_ch=1, classes=2, dims=3).cuda()
    out3 = ng.explain_batch(model3, torch.randn(2, 1, 8, 16, 16, device="cuda"), "gradcam++")
    assert out3.heatmaps.shape == (2, 8, 16, 16) and out3.heatmaps.is_cuda
    assert hooks_left(model) == 0 and hooks_left(model3) == 0


def test_scorecam_memory_stays_bounded():
    """Masked inputs are made chunk by chunk: peak memory must not grow with N x channels."""
    model = torchvision.models.resnet18(num_classes=4).eval().cuda()

    def peak(n):
        x = torch.randn(n, 3, 128, 128, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ng.explain_batch(model, x, "scorecam", chunk_size=64)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    small, large = peak(1), peak(8)
    # all masked inputs at once would be 8 x 512 x 3 x 128 x 128 x 4 bytes = 805 MB
    assert large < 2 * small + (64 << 20)
