"""Device choice: "auto" = CUDA if available, else MPS, else CPU; never a silent fallback."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn "auto", "cpu", "cuda", "cuda:N", "mps" (or a torch.device) into a usable device.

    An explicit accelerator that isn't there raises ``ValueError`` instead of quietly running on
    the CPU.
    """
    if device is None or (isinstance(device, str) and device.lower() == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device {device!r} is not a device name; use 'auto', 'cpu', 'cuda', 'cuda:N' or "
            "'mps'."
        ) from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} was requested but this PyTorch sees no CUDA GPU; use "
                "device='auto' or 'cpu', or install a CUDA build of PyTorch."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) "
                f"are present (cuda:0 to cuda:{torch.cuda.device_count() - 1})."
            )
    if dev.type == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise ValueError(f"device {device!r} was requested but MPS is not available here.")
    return dev


def describe_device(device: torch.device) -> str:
    """A short human label: 'GPU: NVIDIA H100 (cuda:0)' or 'CPU'."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"GPU: {torch.cuda.get_device_name(index)} (cuda:{index})"
    if device.type == "mps":
        return "GPU: Apple MPS"
    return "CPU"
