"""Device choice: "auto" means CUDA, then Apple MPS, then CPU; a name torch does not know is a clear error."""

from __future__ import annotations

import torch

from ovdet.errors import ModelError


def select_device(device: str | torch.device = "auto") -> torch.device:
    """`"auto"` picks CUDA, then Apple MPS, then CPU; anything else is passed to torch.device."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ModelError(f"Unknown device {device!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"Device {device!r} asked for, but CUDA is not available here: use device='cpu' or 'auto'.")
    return dev
