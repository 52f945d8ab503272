"""Where a site's prepared images come from, read a batch at a time: never a whole dataset as float tensors.

An `ImageStore` is a sequence of prepared images ``(C, *S)`` with values in [0, 1]. Indexing it with an index
tensor, array, list or slice returns that batch as a float32 tensor ``(B, C, *S)``; `ImageStore.subset` gives a
view of some of its cases without reading anything. Training indexes a store exactly as it indexed a tensor
before (``images[idx]``), so the same seeded batches and augmentations are drawn whatever the store.

* `ArrayImages`: a MedMNIST file's pixels in their own dtype (uint8 for the official files, a quarter of
  float32), scaled to [0, 1] per batch with the file's one intensity range (MONAI's `ScaleIntensityRange`,
  the same values as scaling everything up front).
* `CachedImages`: cases prepared once into the site's persistent cache (`medfed.data.cache.CaseCache`) and
  read from its disk per batch, so a site's memory does not grow with its number of cases.
* `TensorImages`: images already in memory (the canary audit's inserted examples, tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from medfed.data.transforms import scale_intensity

if TYPE_CHECKING:
    from medfed.data.cache import CaseCache

Index = torch.Tensor | np.ndarray | Sequence[int] | slice | int


class ImageStore:
    """A sequence of prepared images ``(C, *S)`` in [0, 1]; subclasses read a batch of case positions."""

    channels: int
    spatial_shape: tuple[int, ...]

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, positions: np.ndarray) -> torch.Tensor:
        """float32 ``(B, C, *S)`` for the cases at ``positions`` (int64, in range)."""
        raise NotImplementedError

    def subset(self, positions: Index) -> ImageStore:
        """A view of the cases at ``positions`` (in this store's order); reads nothing."""
        return SubsetImages(self, self._positions(positions))

    def __getitem__(self, index: Index) -> torch.Tensor:
        return self.read(self._positions(index))

    @property
    def shape(self) -> tuple[int, ...]:
        """``(N, C, *S)``, as a tensor of the images would have."""
        return (len(self), self.channels, *self.spatial_shape)

    @property
    def case_bytes(self) -> int:
        """Bytes of one case as float32, what a batch of it costs in memory."""
        return 4 * self.channels * int(np.prod(self.spatial_shape))

    def _positions(self, index: Index) -> np.ndarray:
        n = len(self)
        if isinstance(index, slice):
            return np.arange(n, dtype=np.int64)[index]
        if isinstance(index, int):
            index = [index]
        positions = (index.detach().cpu().numpy() if isinstance(index, torch.Tensor)
                     else np.asarray(index)).astype(np.int64, copy=False).reshape(-1)
        if len(positions) and (positions.min() < -n or positions.max() >= n):
            raise IndexError(f"image index out of range for {n} images")
        return np.where(positions < 0, positions + n, positions)


class SubsetImages(ImageStore):
    """Some cases of another store, in a given order."""

    def __init__(self, base: ImageStore, positions: np.ndarray) -> None:
        self.base, self.positions = base, positions
        self.channels, self.spatial_shape = base.channels, base.spatial_shape

    def __len__(self) -> int:
        return len(self.positions)

    def read(self, positions: np.ndarray) -> torch.Tensor:
        return self.base.read(self.positions[positions])

    def subset(self, positions: Index) -> ImageStore:
        return SubsetImages(self.base, self.positions[self._positions(positions)])


class ArrayImages(ImageStore):
    """Channel-first pixels ``(N, C, *S)`` in their file's dtype, mapped to [0, 1] per batch by ``value_range``."""

    def __init__(self, pixels: np.ndarray, value_range: tuple[float, float]) -> None:
        self.pixels, self.value_range = pixels, value_range
        self.channels = int(pixels.shape[1])
        self.spatial_shape = tuple(int(s) for s in pixels.shape[2:])

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    def read(self, positions: np.ndarray) -> torch.Tensor:
        return scale_intensity(self.pixels[positions], self.value_range)


class TensorImages(ImageStore):
    """Images already prepared in memory: float ``(N, C, *S)`` in [0, 1]."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images.float()
        self.channels = int(images.shape[1])
        self.spatial_shape = tuple(int(s) for s in images.shape[2:])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def read(self, positions: np.ndarray) -> torch.Tensor:
        return self.images[torch.as_tensor(positions)]


class CachedImages(ImageStore):
    """Cases in a site's persistent cache, read from disk a batch at a time."""

    def __init__(self, cache: CaseCache, keys: Sequence[str], channels: int, spatial_shape: tuple[int, ...]) -> None:
        self.cache, self.keys = cache, list(keys)
        self.channels, self.spatial_shape = channels, spatial_shape

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, positions: np.ndarray) -> torch.Tensor:
        if not len(positions):
            return torch.zeros((0, self.channels, *self.spatial_shape))
        return torch.from_numpy(self.cache.load_batch([self.keys[int(p)] for p in positions]))


class ConcatImages(ImageStore):
    """Two stores one after the other (a site's labelled cases and the canary audit's inserted examples)."""

    def __init__(self, first: ImageStore, second: ImageStore) -> None:
        if (first.channels, first.spatial_shape) != (second.channels, second.spatial_shape):
            raise ValueError(f"cannot join images of shape {first.shape[1:]} and {second.shape[1:]}")
        self.first, self.second = first, second
        self.channels, self.spatial_shape = first.channels, first.spatial_shape

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def read(self, positions: np.ndarray) -> torch.Tensor:
        cut = len(self.first)
        out = torch.empty((len(positions), self.channels, *self.spatial_shape))
        low = positions < cut
        if low.any():
            out[torch.as_tensor(low)] = self.first.read(positions[low])
        if (~low).any():
            out[torch.as_tensor(~low)] = self.second.read(positions[~low] - cut)
        return out
