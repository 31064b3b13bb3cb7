"""The one CPU/GPU decision: ``auto|cpu|cuda`` -> what torch, cupy and FAISS should use.

Made once at start-up and passed down. ``auto`` takes the GPU where the libraries see one and falls
back to the CPU with a log line; ``cuda`` fails at once, with what to install, when a GPU library or
device is missing. Artifacts are always saved device-neutral (numpy/CPU), so a GPU-trained model
serves on a CPU box.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


class DeviceUnavailable(RuntimeError):
    """``device: cuda`` was asked for and this machine cannot provide it."""


@dataclass(frozen=True)
class DeviceChoice:
    requested: str
    faiss_gpu: bool
    torch_device: str  # "cuda" or "cpu"
    cupy: bool

    @property
    def name(self) -> str:
        return "cuda" if (self.faiss_gpu or self.torch_device == "cuda" or self.cupy) else "cpu"


def _faiss_gpus() -> int:
    if importlib.util.find_spec("faiss") is None:
        return 0
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get else 0


def _torch_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def _cupy_cuda() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # cupy present but no usable device/driver
        return False


def resolve_device(requested: str, need: tuple[str, ...] = ("faiss",)) -> DeviceChoice:
    """Resolve ``requested`` for the libraries in ``need`` (any of faiss, torch, cupy)."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {requested!r}")
    if requested == "cpu":
        choice = DeviceChoice("cpu", False, "cpu", False)
    else:
        found = {"faiss": _faiss_gpus() > 0 if "faiss" in need else False,
                 "torch": _torch_cuda() if "torch" in need else False,
                 "cupy": _cupy_cuda() if "cupy" in need else False}
        if requested == "cuda":
            missing = [lib for lib in need if not found[lib]]
            if missing:
                raise DeviceUnavailable(
                    f"device 'cuda' requested but {missing} see no GPU: on a CUDA machine install "
                    "the gpu extra (pip install -e '.[gpu]'), otherwise set device to auto or cpu")
        choice = DeviceChoice(requested, found["faiss"], "cuda" if found["torch"] else "cpu",
                              found["cupy"])
        if requested == "auto" and choice.name == "cpu":
            log.warning("device auto: no GPU visible to %s; using the CPU", "/".join(need))
    log.info("device %s -> %s (faiss gpu: %s, torch: %s, cupy: %s)", requested, choice.name,
             choice.faiss_gpu, choice.torch_device, choice.cupy)
    return choice
