"""Settings of where and in what precision a run computes: the device (CPU or a GPU) and bf16 autocast.

The device is the centre's and, in simulation, the simulated sites' (a message carries it only in simulation); a
deployed site chooses its own in its node config (``device``), which no server can change. Precision is a training
setting every site follows: it changes what a run computes (bf16 rounds activations)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from medfed.config.base import Part, setting
from medfed.constants import Precision
from medfed.exceptions import ConfigError

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d{1,2})?)$")
"""A device setting: auto (the GPU when there is one), cpu, cuda (the first visible GPU) or cuda:N."""


def check_device_setting(value: str, where: str = "device") -> None:
    """Raise `ConfigError` unless ``value`` is auto, cpu, cuda or cuda:N (what `medfed.devices.resolve_device`
    takes)."""
    if not DEVICE_PATTERN.match(value):
        raise ConfigError(f"{where} must be auto, cpu, cuda or cuda:N (N a GPU's number); got {value!r}")


@dataclass(frozen=True)
class ComputeSettings(Part):
    """Where the run trains and evaluates, and in what precision."""

    TITLE: ClassVar[str] = "compute"

    device: str = setting("auto", "Where training and evaluation run: auto (the GPU when there is one), cpu, cuda or "
                          "cuda:N. Simulation: the centre and every simulated site (with --client-gpus, Ray gives "
                          "each site its GPU: use auto or cuda). A deployed site sets its own (node config device).",
                          key="device", site=False)
    precision: Precision = setting(Precision.AUTO, "auto (bf16 autocast on a GPU for phases without DP-SGD, fp32 "
                                   "otherwise), fp32, or bf16 (autocast for phases without DP-SGD, on any device; "
                                   "DP-SGD phases always run fp32).", key="precision")

    def check(self) -> None:
        check_device_setting(self.device)
