"""Image stores: batches read on demand equal what scaling everything up front gave (so seeded runs are unchanged),
views compose, and a table's cases come from the cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medfed.data.cache import CaseCache
from medfed.data.images import Preprocess
from medfed.data.stores import ArrayImages, CachedImages, ConcatImages, TensorImages
from medfed.data.transforms import scale_intensity
from tests.imaging_fixtures import medmnist_images, write_png


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return medmnist_images("breastmnist", count=40)[:, None]  # (40, 1, 28, 28) uint8, real


def test_array_batches_equal_scaling_the_whole_file_up_front(pixels: np.ndarray) -> None:
    store, whole = ArrayImages(pixels, (0.0, 255.0)), scale_intensity(pixels, (0.0, 255.0))
    idx = torch.tensor([5, 0, 39, 5])
    assert torch.equal(store[idx], whole[idx])  # bitwise: the pinned runs depend on it
    assert torch.equal(store[3:9], whole[3:9]) and torch.equal(store[-1], whole[-1:])
    assert store.shape == (40, 1, 28, 28) and store.case_bytes == 4 * 28 * 28
    with pytest.raises(IndexError, match="out of range for 40 images"):
        store[torch.tensor([40])]


def test_views_compose_and_read_nothing_until_indexed(pixels: np.ndarray) -> None:
    store = ArrayImages(pixels, (0.0, 255.0))
    whole = store[:]
    view = store.subset(np.array([10, 20, 30, 35])).subset([3, 1])
    assert len(view) == 2 and torch.equal(view[:], whole[[35, 20]])
    extra = TensorImages(torch.zeros(3, 1, 28, 28))
    joined = ConcatImages(store.subset([1, 2]), extra)
    assert len(joined) == 5 and torch.equal(joined[[4, 0]], torch.stack([torch.zeros(1, 28, 28), whole[1]]))
    with pytest.raises(ValueError, match="cannot join"):
        ConcatImages(store, TensorImages(torch.zeros(1, 3, 28, 28)))


def test_cached_cases_are_read_from_the_cache_a_batch_at_a_time(pixels: np.ndarray, tmp_path: Path) -> None:
    paths = [write_png(p[0], tmp_path / f"{i}.png") for i, p in enumerate(pixels[:6])]
    cache = CaseCache(tmp_path / "cache", Preprocess(size=(28, 28)))
    keys = [e.key for e in cache.build(paths, workers=0, progress=False).entries if e is not None]
    store = CachedImages(cache, keys, 1, (28, 28))
    batch = store[torch.tensor([4, 1])]
    expected = torch.as_tensor(pixels[[4, 1]] / 255.0, dtype=torch.float32)
    torch.testing.assert_close(batch, expected, atol=1e-3, rtol=0)  # float16 in the cache
    assert store[[]].shape == (0, 1, 28, 28)
