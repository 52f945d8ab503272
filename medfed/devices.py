"""Where tensors live and in what precision: the device a setting names, batches moved to it, bf16 autocast,
memory released between simulated sites, and what the run directory records about the machine.

A device setting is ``auto`` (the first visible GPU when CUDA has one, else the CPU), ``cpu``, ``cuda`` or
``cuda:N``. Asking for a GPU that is not there is a `ConfigError` (exit 2), never a silent fall-back to the CPU:
a run that was meant for a GPU and crawls on a CPU wastes a day. Under Ray with GPUs per simulated site
(``--client-gpus``), Ray sets each worker's ``CUDA_VISIBLE_DEVICES``, so ``cuda`` there is the worker's own GPU.

Random draws stay on the CPU generators the run seeds (`medfed.task.model_setup.generator`): models are
initialised on the CPU and moved, so a seed gives the same initial weights on every device.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import platform
from collections.abc import Iterator
from typing import Any

import torch

from medfed.constants import Precision
from medfed.exceptions import ConfigError

LIBRARIES = ("torch", "flwr", "opacus", "peft", "monai", "numpy", "ray", "pydicom", "nibabel", "cryptography")
"""The libraries whose versions a run directory records."""


def resolve_device(setting: str, *, where: str = "device") -> torch.device:
    """The `torch.device` a setting names (``auto``, ``cpu``, ``cuda``, ``cuda:N``).

    Raises:
        ConfigError: an unknown setting, or a GPU asked for that this machine (or this Ray worker) does not have.
    """
    value = setting.strip().lower()
    if value in ("auto", ""):
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if value == "cpu":
        return torch.device("cpu")
    if value == "cuda" or value.startswith("cuda:"):
        index_text = value.partition(":")[2] or "0"
        if not index_text.isdigit():
            raise ConfigError(f"{where} must be auto, cpu, cuda or cuda:N; got {setting!r}")
        if not torch.cuda.is_available():
            raise ConfigError(f"{where} {setting} asks for a GPU, but torch finds no CUDA device here "
                              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); "
                              "use --device cpu or auto")
        index, count = int(index_text), torch.cuda.device_count()
        if index >= count:
            raise ConfigError(f"{where} {setting}: this machine has {count} CUDA device(s), numbered 0..{count - 1}")
        return torch.device("cuda", index)
    raise ConfigError(f"{where} must be auto, cpu, cuda or cuda:N; got {setting!r}")


def prepare_device(device: torch.device) -> None:
    """Per-process settings for ``device``: on a GPU, cuDNN picks the fastest convolution algorithms for the run's
    fixed shapes (``cudnn.benchmark``), and TF32 is turned off for convolutions and matrix products (torch 2.13 allows
    it for cuDNN convolutions by default), so fp32 phases (DP-SGD, evaluation) compute in fp32 as on the CPU."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def use_bf16(precision: str, device: torch.device, *, private: bool) -> bool:
    """Whether a phase runs its forward passes under bf16 autocast: never under DP-SGD (per-example gradients
    and clipping stay fp32); ``auto`` on a GPU that supports bf16; ``bf16`` on any device."""
    if private:
        return False
    mode = Precision(precision)
    if mode == Precision.BF16:
        return True
    if mode == Precision.AUTO:
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return False


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on ``device`` when ``enabled``, else nothing (a no-op context)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``: from the CPU to a GPU through pinned memory without blocking the host (the copy
    overlaps the work already queued); unchanged when it is already there."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def device_generator(gen: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded from ``gen`` (one draw): for large random tensors made on a GPU. On the CPU,
    ``gen`` itself (no draw, so CPU runs draw exactly what they did before)."""
    if device.type == "cpu":
        return gen
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    return torch.Generator(device=device).manual_seed(seed)


def release_memory(device: torch.device) -> None:
    """Return the GPU's cached blocks to the driver once a site's work is done (its tensors were freed when its
    round returned), so the next simulated site on this worker, or another process sharing the GPU, has the memory.
    Nothing on the CPU: a ``gc.collect`` there cost 0.22 s per message (a 0.34 s evaluation) for nothing to free.
    On a GPU, tensors held only by reference cycles are collected first (a GPU's memory is the scarce one)."""
    if device.type == "cuda" and torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()


def describe_device(device: torch.device) -> dict[str, Any]:
    """What a run directory records about where it computed: the device, its name and memory, and the machine."""
    info: dict[str, Any] = {"device": str(device), "machine": platform.machine(), "python": platform.python_version(),
                            "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                 "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
                 "cudnn": torch.backends.cudnn.version()}
    else:
        info["name"] = platform.processor() or platform.machine()
    return info


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that decide what a run computes (`LIBRARIES`)."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@contextlib.contextmanager
def on_device(device: torch.device) -> Iterator[None]:
    """Run a piece of site work on ``device`` and release its memory afterwards (`release_memory`)."""
    prepare_device(device)
    try:
        yield
    finally:
        release_memory(device)
