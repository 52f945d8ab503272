"""The persistent cache of prepared cases (medfed/data/cache.py), on real MedMNIST pixels written as PNG
(PneumoniaMNIST) and NIfTI (AdrenalMNIST3D) files, read by the real `read_image`."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medfed.data.cache import CaseCache, content_digest, default_cache_dir
from medfed.data.images import Preprocess, read_image
from medfed.exceptions import DataError

SHARED = Path(os.environ.get("MEDFED_SHARED_DATA", "/work/shared/data/medmnist"))
F16 = 1e-3  # float16 keeps 11 significant bits: about 5e-4 near 1


@pytest.fixture(scope="module")
def pneumonia() -> np.ndarray:
    return np.load(SHARED / "pneumoniamnist.npz")["train_images"][:40]


@pytest.fixture(scope="module")
def adrenal() -> np.ndarray:
    return np.load(SHARED / "adrenalmnist3d.npz")["train_images"][:3]


def write_pngs(folder: Path, pixels: np.ndarray) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(pixels):
        path = folder / f"case{i:03d}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def listing(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


PREP = Preprocess(size=(28, 28))


def test_cold_then_warm_build_reads_the_same_arrays(tmp_path: Path, pneumonia: np.ndarray) -> None:
    paths = write_pngs(tmp_path / "data", pneumonia)
    before = listing(tmp_path / "data")
    cache = CaseCache(tmp_path / "cache", PREP)

    cold = cache.build(paths, workers=0, progress=False)
    assert (cold.built, cold.reused, cold.bad) == (40, 0, [])
    assert all(e is not None for e in cold.entries)
    assert oct((tmp_path / "cache").stat().st_mode & 0o777) == oct(0o700)

    warm = CaseCache(tmp_path / "cache", PREP).build(paths, workers=0, progress=False)
    assert (warm.built, warm.reused, warm.bad) == (0, 40, [])
    assert warm.entries == cold.entries  # same keys, same infos (read back from JSON)

    for path, entry in zip(paths[:10], warm.entries[:10], strict=True):
        assert entry is not None
        expected, info = read_image(path, PREP)
        loaded = cache.load(entry.key)
        assert loaded.dtype == np.float32 and loaded.shape == expected.shape == (info.channels, 28, 28)
        np.testing.assert_allclose(loaded, expected, atol=F16, rtol=0)
        assert entry.info == info
        stored = cache.folder / entry.key[:2] / f"{entry.key}.npy"
        assert np.load(stored).dtype == np.float16 and stored.with_suffix(".json").is_file()

    batch = cache.load_batch([e.key for e in warm.entries[:5] if e is not None])
    assert batch.shape == (5, 1, 28, 28) and batch.dtype == np.float32
    # nothing beside the data, and the cache holds only entries under root/<fingerprint[:16]>/<key[:2]>/
    assert listing(tmp_path / "data") == before
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert len(files) == 80 and all(p.parent.parent == cache.folder for p in files)
    assert cache.folder.name == PREP.fingerprint()[:16]


def test_volumes_are_cached(tmp_path: Path, adrenal: np.ndarray) -> None:
    data = tmp_path / "data"
    data.mkdir()
    paths = []
    for i, volume in enumerate(adrenal):
        path = data / f"vol{i}.nii.gz"
        nib.save(nib.Nifti1Image(volume, np.diag([1.5, 1.5, 2.0, 1.0])), path)
        paths.append(path)
    prep = Preprocess(size=(28, 28, 28))
    cache = CaseCache(tmp_path / "cache", prep)
    cold = cache.build(paths, workers=0, progress=False)
    assert (cold.built, cold.reused, cold.bad) == (3, 0, [])
    warm = cache.build(paths, workers=0, progress=False)
    assert (warm.built, warm.reused) == (0, 3)
    for path, entry in zip(paths, warm.entries, strict=True):
        assert entry is not None
        expected, info = read_image(path, prep)
        assert entry.info == info and info.dims == 3
        np.testing.assert_allclose(cache.load(entry.key), expected, atol=F16, rtol=0)
    assert cache.load_batch([e.key for e in warm.entries if e is not None]).shape == (3, 1, 28, 28, 28)


def test_a_changed_file_is_rebuilt_and_the_others_reused(tmp_path: Path, pneumonia: np.ndarray) -> None:
    paths = write_pngs(tmp_path / "data", pneumonia[:6])
    cache = CaseCache(tmp_path / "cache", PREP)
    first = cache.build(paths, workers=0, progress=False)
    Image.fromarray(255 - pneumonia[2]).save(paths[2])  # same path, new bytes
    second = cache.build(paths, workers=0, progress=False)
    assert (second.built, second.reused) == (1, 5)
    assert [a == b for a, b in zip(first.entries, second.entries, strict=True)] == [True, True, False, True, True, True]
    entry = second.entries[2]
    assert entry is not None
    np.testing.assert_allclose(cache.load(entry.key), read_image(paths[2], PREP)[0], atol=F16, rtol=0)


def test_a_changed_preprocess_rebuilds_into_another_folder(tmp_path: Path, pneumonia: np.ndarray) -> None:
    paths = write_pngs(tmp_path / "data", pneumonia[:5])
    small = Preprocess(size=(32, 32))
    assert small.fingerprint() != PREP.fingerprint()
    a = CaseCache(tmp_path / "cache", PREP)
    b = CaseCache(tmp_path / "cache", small)
    a.build(paths, workers=0, progress=False)
    built = b.build(paths, workers=0, progress=False)
    assert (built.built, built.reused) == (5, 0) and a.folder != b.folder and a.folder.parent == b.folder.parent
    entry = built.entries[0]
    assert entry is not None and b.load(entry.key).shape == (1, 32, 32)
    assert a.build(paths, workers=0, progress=False).reused == 5  # the first folder is untouched


def test_identical_files_share_one_entry(tmp_path: Path, pneumonia: np.ndarray) -> None:
    paths = write_pngs(tmp_path / "data", pneumonia[:3])
    twin = tmp_path / "data" / "twin.png"
    shutil.copyfile(paths[1], twin)
    result = CaseCache(tmp_path / "cache", PREP).build([*paths, twin], workers=0, progress=False)
    assert result.entries[1] is not None and result.entries[1] == result.entries[3]
    assert (result.built, result.reused) == (3, 1)
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 3


def test_unreadable_cases_are_reported_by_index_without_their_path(tmp_path: Path, pneumonia: np.ndarray) -> None:
    paths = write_pngs(tmp_path / "data", pneumonia[:4])
    paths[1].write_bytes(paths[1].read_bytes()[:60])  # a PNG cut short
    missing = tmp_path / "data" / "patient-4711.png"
    result = CaseCache(tmp_path / "cache", PREP).build([*paths, missing], workers=0, progress=False)
    assert [b.index for b in result.bad] == [1, 4]
    assert result.entries[1] is None and result.entries[4] is None and result.entries[0] is not None
    assert (result.built, result.reused) == (3, 0)
    for bad in result.bad:
        assert bad.reason and str(tmp_path) not in bad.reason
        assert "case001" not in bad.reason and "4711" not in bad.reason and "data" not in bad.reason


def test_workers_give_the_same_arrays_as_in_process(tmp_path: Path, pneumonia: np.ndarray) -> None:
    paths = write_pngs(tmp_path / "data", pneumonia[:12])
    paths[5].write_bytes(b"not a png")
    serial = CaseCache(tmp_path / "serial", PREP)
    parallel = CaseCache(tmp_path / "parallel", PREP)
    a = serial.build(paths, workers=0, progress=False)
    b = parallel.build(paths, workers=2, progress=False)
    assert a.entries == b.entries and a.bad == b.bad and (b.built, b.reused) == (11, 0)
    keys = [e.key for e in a.entries if e is not None]
    np.testing.assert_array_equal(serial.load_batch(keys), parallel.load_batch(keys))


def test_a_damaged_entry_raises_is_deleted_and_rebuilt(tmp_path: Path, pneumonia: np.ndarray) -> None:
    paths = write_pngs(tmp_path / "data", pneumonia[:3])
    cache = CaseCache(tmp_path / "cache", PREP)
    entries = cache.build(paths, workers=0, progress=False).entries
    assert entries[0] is not None and entries[1] is not None
    npy = cache.folder / entries[0].key[:2] / f"{entries[0].key}.npy"
    npy.write_bytes(npy.read_bytes()[:-100])  # truncated
    with pytest.raises(DataError, match="damaged.*rebuilt on the next build"):
        cache.load(entries[0].key)
    assert not npy.exists() and not npy.with_suffix(".json").exists()
    # a truncated entry the build finds is prepared again without a load
    other = cache.folder / entries[1].key[:2] / f"{entries[1].key}.npy"
    other.write_bytes(other.read_bytes()[:-10])
    again = cache.build(paths, workers=0, progress=False)
    assert (again.built, again.reused) == (2, 1) and again.entries == entries
    np.testing.assert_allclose(cache.load(entries[0].key), read_image(paths[0], PREP)[0], atol=F16, rtol=0)
    with pytest.raises(DataError, match="64 lowercase hex"):
        cache.load("../" + entries[0].key)


def test_a_cache_folder_symlinked_out_of_the_root_is_refused(tmp_path: Path, pneumonia: np.ndarray) -> None:
    paths = write_pngs(tmp_path / "data", pneumonia[:2])
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    root = tmp_path / "cache"
    root.mkdir()
    (root / PREP.fingerprint()[:16]).symlink_to(outside, target_is_directory=True)
    with pytest.raises(DataError, match="symbolic link"):
        CaseCache(root, PREP).build(paths, workers=0, progress=False)
    linked_root = tmp_path / "linked"
    linked_root.symlink_to(outside, target_is_directory=True)
    with pytest.raises(DataError, match="symbolic link"):
        CaseCache(linked_root, PREP).build(paths, workers=0, progress=False)
    assert list(outside.iterdir()) == []


def test_content_digest_of_files_and_folders(tmp_path: Path, pneumonia: np.ndarray) -> None:
    series = tmp_path / "series"
    paths = write_pngs(series / "sub", pneumonia[:3])
    assert content_digest(paths[0]) == hashlib.sha256(paths[0].read_bytes()).hexdigest()
    first = content_digest(series)
    assert content_digest(series) == first
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert content_digest(series) != first
    paths[1].write_bytes(data)
    assert content_digest(series) == first
    paths[2].rename(series / "sub" / "renamed.png")
    assert content_digest(series) != first


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEDFED_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MEDFED_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "medfed" / "cases"
