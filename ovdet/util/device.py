"""Device choice: "auto" means CUDA, then Apple MPS, then CPU; a name torch does not know is a clear error. Also
torch's default thread count, and arrays brought to the CPU as float32 numpy.

`device_name` answers without importing torch where the answer is certain (a machine with no NVIDIA driver and no
Apple GPU runs "auto" on the CPU), so that a warm start on an exported backend never pays torch's import."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ovdet.errors import ModelError

if TYPE_CHECKING:
    import torch

NVIDIA_DRIVER = "/proc/driver/nvidia/version"  # present on Linux exactly when the NVIDIA kernel driver is loaded
ROCM_DRIVER = "/dev/kfd"  # AMD's ROCm kernel driver (a ROCm build of torch reports its GPUs as CUDA)


def select_device(device: str | torch.device = "auto") -> torch.device:
    """`"auto"` picks CUDA, then Apple MPS, then CPU; anything else is passed to torch.device."""
    import torch

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


def only_cpu_here() -> bool:
    """True when this machine certainly has no GPU torch could use: Linux without the NVIDIA or the ROCm driver
    (macOS may have MPS, and Windows is asked too)."""
    return platform.system() == "Linux" and not os.path.exists(NVIDIA_DRIVER) and not os.path.exists(ROCM_DRIVER)


def device_name(device: Any = "auto") -> str:
    """The device `select_device` would choose, as its name ("cpu", "cuda", "cuda:1", "mps"). "cpu", and "auto" on
    a machine that only has a CPU, are answered without importing torch; everything else asks torch (as does any
    call once torch is imported, so that what torch says always wins)."""
    if device is None:
        device = "auto"
    if isinstance(device, str) and "torch" not in sys.modules:
        if device == "cpu" or (device == "auto" and only_cpu_here()):
            return "cpu"
    return str(select_device(device))


def device_type(name: str) -> str:
    """"cuda" of "cuda:1": the kind of a device name."""
    return name.split(":", 1)[0]


def default_threads() -> int:
    """torch's intra-op thread count, known without importing torch when it is not loaded: what torch has now when it
    is (it may have been set); else $OMP_NUM_THREADS, then $MKL_NUM_THREADS, else the physical cores among the CPUs
    this process may run on, as torch starts with."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.get_num_threads()
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        value = os.environ.get(variable, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(tuple((topology / name).read_text().strip() for name in ("physical_package_id", "core_id")))
        except OSError:
            cores.add(("cpu", str(cpu)))  # no topology to read: count the CPU itself
    return max(1, len(cores))


def cpu_float32(array: Any) -> np.ndarray:
    """`array` (numpy, or a torch tensor on any device, any float dtype) as float32 numpy on the CPU."""
    if hasattr(array, "detach"):
        array = array.detach().float().cpu().numpy()
    return np.asarray(array, dtype=np.float32)
