"""Model checkpoints as safetensors, with the run's settings in the header metadata."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file


def save_checkpoint(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path), metadata=metadata or {})
    return path

