"""Whether a server searches on the GPU (``device``: auto, cpu, cuda), decided once at start.
Reads what FAISS and torch see (:func:`freshrec.device.resolve_device`); writes nothing."""

from __future__ import annotations

from freshrec.device import DeviceUnavailable, resolve_device


def serving_gpu(requested: str) -> bool:
    """Whether the server searches on the GPU for ``device`` (auto, cpu, cuda): where FAISS has a
    GPU build and sees a GPU (its GPU replica), or else where torch sees one (the exact torch
    search, :class:`recmodels.batcher.TorchExactSearch`). ``cuda`` with neither raises."""
    if requested == "cpu":
        return False
    choice = resolve_device("auto" if requested == "cuda" else requested, need=("faiss", "torch"))
    gpu = choice.faiss_gpu or choice.torch_device == "cuda"
    if requested == "cuda" and not gpu:
        raise DeviceUnavailable("device 'cuda' requested but neither FAISS nor torch sees a GPU: "
                                "on a CUDA machine install the gpu extra (pip install -e "
                                "'.[gpu]') or a CUDA torch, otherwise set device to auto or cpu")
    return gpu
