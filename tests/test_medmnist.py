"""Reading and validating MedMNIST-style .npz files (medfed.data.medmnist)."""

from __future__ import annotations

import hashlib
import io
import os
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA

from medfed.constants import TaskType
from medfed.data import medmnist as mm
from medfed.data.medmnist import DATA_PATH_ENV, load_medmnist, resolve_data_path, sha256_of
from medfed.exceptions import DataError

SHARED = SHARED_DATA
needs_shared = pytest.mark.usefixtures("shared_data")  # fails, not skips, when the pinned files are missing


# ---------------------------------------------------------------- helpers
def _base_arrays(n_train: int = 20, n_val: int = 6, n_test: int = 6, shape=(28, 28), seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        out[f"{split}_images"] = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
        out[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8)[:, None]
    return out


def write_npz(path: Path, **overrides) -> Path:
    """A valid binary 2D grayscale MedMNIST-style file; overrides replace keys (None drops a key)."""
    arrays = _base_arrays()
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    """HOME (and Path.home) inside tmp_path; no MEDFED_DATA_PATH; downloads impossible."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: home))
    monkeypatch.delenv(DATA_PATH_ENV, raising=False)
    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    return home


# ---------------------------------------------------------------- the shared real files
@needs_shared
@pytest.mark.parametrize(
    "flag, sizes, spatial",
    [
        ("pneumoniamnist", (4708, 524, 624), (28, 28)),
        ("breastmnist", (546, 78, 156), (28, 28)),
        ("adrenalmnist3d", (1188, 98, 298), (28, 28, 28)),
    ],
)
def test_shared_files_read(flag, sizes, spatial):
    data = load_medmnist(SHARED / f"{flag}.npz")
    assert data.name == flag
    assert (len(data.train), len(data.val), len(data.test)) == sizes
    assert data.task == TaskType.BINARY
    assert data.num_classes == 2
    assert data.channels == 1
    assert data.spatial_shape == spatial
    assert data.spatial_dims == len(spatial)
    for split in ("train", "val", "test"):
        s = data.split(split)
        assert s.images.shape == (len(s), 1, *spatial)
        assert s.images.pixels.dtype == np.uint8
        assert s.labels.shape == (len(s), 1)
        assert s.labels.dtype == np.int64
        assert set(np.unique(s.labels)) == {0, 1}
    d = data.describe()
    assert d["sizes"] == dict(zip(("train", "val", "test"), sizes, strict=True))
    assert d["spatial_shape"] == list(spatial)
    assert d["task"] == "binary-class"


@needs_shared
def test_shared_files_match_sha256sums():
    lines = [ln.split() for ln in (SHARED / "SHA256SUMS").read_text().splitlines() if ln.strip()]
    pinned = {name.lstrip("*"): digest for digest, name in lines}
    assert {"pneumoniamnist.npz", "breastmnist.npz", "adrenalmnist3d.npz"} <= set(pinned)
    for name, digest in pinned.items():
        assert sha256_of(SHARED / name) == digest, name
    assert load_medmnist(SHARED / "breastmnist.npz").sha256 == pinned["breastmnist.npz"]


@needs_shared
def test_shared_pneumonia_labels_match_raw_file():
    data = load_medmnist(SHARED / "pneumoniamnist.npz")
    with np.load(SHARED / "pneumoniamnist.npz") as raw:
        np.testing.assert_array_equal(data.train.labels[:, 0], raw["train_labels"][:, 0])
        np.testing.assert_array_equal(data.test.images.pixels[:, 0], raw["test_images"])
    # PneumoniaMNIST's official train split: 1214 normal, 3494 pneumonia
    assert np.bincount(data.train.labels[:, 0]).tolist() == [1214, 3494]


# ---------------------------------------------------------------- synthetic layouts
def test_sha256_of_synthetic_file(tmp_path):
    path = write_npz(tmp_path / "x.npz")
    assert sha256_of(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_medmnist(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_2d_grayscale_binary_inferred(tmp_path):
    path = write_npz(tmp_path / "mydata.npz", train_labels=(np.arange(20) % 2).astype(np.int32))  # (N,) labels
    data = load_medmnist(path)
    assert data.name == "mydata"
    assert data.task == TaskType.BINARY and data.num_classes == 2
    assert data.channels == 1 and data.spatial_shape == (28, 28)
    assert data.train.labels.shape == (20, 1)
    assert data.path == path.resolve()


def test_2d_rgb_multiclass(tmp_path):
    rng = np.random.default_rng(1)
    images = {s: rng.integers(0, 256, size=(n, 28, 28, 3), dtype=np.uint8)
              for s, n in (("train", 12), ("val", 5), ("test", 4))}
    labels = {s: (np.arange(len(images[s])) % 4).astype(np.uint8)[:, None] for s in images}
    path = write_npz(tmp_path / "colour.npz", **{f"{s}_images": images[s] for s in images},
                     **{f"{s}_labels": labels[s] for s in labels})
    data = load_medmnist(path)
    assert data.task == TaskType.MULTICLASS
    assert data.num_classes == 4
    assert data.channels == 3
    assert data.spatial_shape == (28, 28)
    assert data.train.images.shape == (12, 3, 28, 28)
    # channel-last -> channel-first without mixing pixels up
    raw = images["train"]
    assert data.train.images.pixels[5, 2, 7, 11] == raw[5, 7, 11, 2]
    np.testing.assert_array_equal(data.train.images.pixels, np.moveaxis(raw, -1, 1))


def test_known_flag_uses_official_class_count(tmp_path):
    # dermamnist has 7 classes even if a small file only holds labels 0..2
    labels = {f"{s}_labels": (np.arange(n) % 3).astype(np.uint8)[:, None]
              for s, n in (("train", 20), ("val", 6), ("test", 6))}
    rgb = {f"{s}_images": np.zeros((n, 28, 28, 3), np.uint8) for s, n in (("train", 20), ("val", 6), ("test", 6))}
    data = load_medmnist(write_npz(tmp_path / "dermamnist.npz", **labels, **rgb))
    assert data.task == TaskType.MULTICLASS and data.num_classes == 7 and data.channels == 3


def test_multilabel(tmp_path):
    rng = np.random.default_rng(2)
    lab = {s: rng.integers(0, 2, size=(n, 5)).astype(np.uint8) for s, n in (("train", 20), ("val", 6), ("test", 6))}
    lab["train"][0] = [1, 1, 0, 0, 1]
    path = write_npz(tmp_path / "tags.npz", **{f"{s}_labels": v for s, v in lab.items()})
    data = load_medmnist(path)
    assert data.task == TaskType.MULTILABEL
    assert data.num_classes == 5
    assert data.train.labels.shape == (20, 5)
    np.testing.assert_array_equal(data.train.labels, lab["train"].astype(np.int64))


def test_known_multilabel_flag(tmp_path):
    lab = {f"{s}_labels": (np.arange(n * 14).reshape(n, 14) % 3 == 0).astype(np.uint8)
           for s, n in (("train", 20), ("val", 6), ("test", 6))}
    data = load_medmnist(write_npz(tmp_path / "chestmnist.npz", **lab))
    assert data.task == TaskType.MULTILABEL and data.num_classes == 14


@pytest.mark.parametrize("channel_axis", [False, True])
def test_3d_volumes(tmp_path, channel_axis):
    shape = (16, 16, 16, 1) if channel_axis else (16, 16, 16)
    arrays = _base_arrays(shape=shape)
    data = load_medmnist(write_npz(tmp_path / "vol.npz", **arrays))
    assert data.spatial_dims == 3
    assert data.spatial_shape == (16, 16, 16)
    assert data.channels == 1
    assert data.train.images.shape == (20, 1, 16, 16, 16)
    np.testing.assert_array_equal(data.val.images.pixels.reshape(6, -1), arrays["val_images"].reshape(6, -1))


def test_3d_known_flag_name(tmp_path):
    data = load_medmnist(write_npz(tmp_path / "adrenalmnist3d_64.npz", **_base_arrays(shape=(8, 8, 8))))
    assert data.name == "adrenalmnist3d_64"
    assert data.task == TaskType.BINARY and data.spatial_shape == (8, 8, 8)


def test_float_images(tmp_path):
    rng = np.random.default_rng(3)
    imgs = {f"{s}_images": rng.normal(size=(n, 28, 28)).astype(np.float32) * 100
            for s, n in (("train", 20), ("val", 6), ("test", 6))}
    data = load_medmnist(write_npz(tmp_path / "ct.npz", **imgs))
    assert np.issubdtype(data.train.images.pixels.dtype, np.floating)
    np.testing.assert_array_equal(data.test.images.pixels[:, 0], imgs["test_images"])
    assert data.channels == 1 and data.spatial_shape == (28, 28)


def test_float_whole_number_labels_accepted(tmp_path):
    data = load_medmnist(write_npz(tmp_path / "f.npz", train_labels=(np.arange(20) % 2).astype(np.float32)[:, None]))
    assert data.train.labels.dtype == np.int64
    assert data.train.labels[:4, 0].tolist() == [0, 1, 0, 1]


# ---------------------------------------------------------------- flag resolution
def test_flag_from_env_path(tmp_path, isolated_home, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    b_file = write_npz(b / "breastmnist.npz")
    write_npz(isolated_home / ".medmnist" / "breastmnist.npz")
    monkeypatch.setenv(DATA_PATH_ENV, os.pathsep.join([str(a), "", str(b)]))
    assert resolve_data_path("breastmnist") == b_file  # env folders come before ~/.medmnist
    assert resolve_data_path("BreastMNIST") == b_file  # flags are case-insensitive
    data = load_medmnist("breastmnist")
    assert data.path == b_file.resolve()
    assert data.name == "breastmnist"


def test_env_path_first_folder_wins(tmp_path, isolated_home, monkeypatch):
    first = write_npz(tmp_path / "one" / "pneumoniamnist.npz")
    write_npz(tmp_path / "two" / "pneumoniamnist.npz")
    monkeypatch.setenv(DATA_PATH_ENV, os.pathsep.join([str(tmp_path / "one"), str(tmp_path / "two")]))
    assert resolve_data_path("pneumoniamnist") == first


def test_flag_from_home_medmnist(isolated_home):
    path = write_npz(isolated_home / ".medmnist" / "pneumoniamnist.npz")
    assert resolve_data_path("pneumoniamnist") == path
    data = load_medmnist("pneumoniamnist")
    assert data.path == path.resolve()
    assert len(data.train) == 20


def test_size_suffixed_flag_from_home(isolated_home):
    path = write_npz(isolated_home / ".medmnist" / "breastmnist_64.npz", **_base_arrays(shape=(64, 64)))
    data = load_medmnist("breastmnist_64")
    assert data.path == path.resolve() and data.spatial_shape == (64, 64)
    assert data.task == TaskType.BINARY


def test_unknown_flag_found_on_disk_is_accepted(isolated_home):
    write_npz(isolated_home / ".medmnist" / "myownset.npz")
    assert load_medmnist("myownset").name == "myownset"


def test_download_hook_called_for_known_flag(isolated_home, monkeypatch):
    calls = []

    def fake_download(flag, root):
        calls.append((flag, root))
        write_npz(root / f"{flag}.npz")
        return "downloaded"

    monkeypatch.setattr(mm, "download_official", fake_download)
    data = load_medmnist("breastmnist")
    assert calls == [("breastmnist", isolated_home / ".medmnist")]
    assert data.path == (isolated_home / ".medmnist" / "breastmnist.npz").resolve()


def test_download_disabled_does_not_call_hook(isolated_home, monkeypatch):
    def boom(flag, root):  # pragma: no cover - must not run
        raise AssertionError("download attempted")

    monkeypatch.setattr(mm, "download_official", boom)
    with pytest.raises(DataError) as err:
        load_medmnist("breastmnist", download=False)
    msg = str(err.value)
    assert str(isolated_home / ".medmnist" / "breastmnist.npz") in msg
    assert "download disabled" in msg


def test_download_failure_reason_in_message(isolated_home, monkeypatch):
    monkeypatch.setattr(mm, "download_official", lambda flag, root: "download failed: URLError: offline")
    with pytest.raises(DataError) as err:
        load_medmnist("pneumoniamnist")
    msg = str(err.value)
    assert str(isolated_home / ".medmnist" / "pneumoniamnist.npz") in msg
    assert "download failed: URLError: offline" in msg
    assert DATA_PATH_ENV in msg


class _FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_official_download_lands_md5_checked(tmp_path, monkeypatch):
    payload = (SHARED / "breastmnist.npz").read_bytes()
    urls = []
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: urls.append(url) or _FakeResponse(payload))
    assert mm.download_official("breastmnist", tmp_path / "root") == "downloaded"
    assert urls == ["https://zenodo.org/record/6496656/files/breastmnist.npz?download=1"]
    assert (tmp_path / "root" / "breastmnist.npz").read_bytes() == payload
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["breastmnist.npz"]


def test_official_download_with_a_wrong_checksum_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: _FakeResponse(b"not the file"))
    reason = mm.download_official("breastmnist", tmp_path)
    assert "failed its MD5 check" in reason
    assert list(tmp_path.iterdir()) == []


def test_official_download_offline_and_unknown_flags(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert "URLError" in mm.download_official("breastmnist", tmp_path) and list(tmp_path.iterdir()) == []
    assert "no official download is known" in mm.download_official("pneumoniamnist_64", tmp_path)


def test_pinned_files_match_the_official_md5s():
    for name in ("pneumoniamnist", "breastmnist", "adrenalmnist3d"):
        assert hashlib.md5((SHARED / f"{name}.npz").read_bytes()).hexdigest() == mm.OFFICIAL_MD5[name]


# ---------------------------------------------------------------- bad inputs
def _random_bytes(tmp_path, monkeypatch):
    path = tmp_path / "corrupt.npz"
    path.write_bytes(np.random.default_rng(0).bytes(2048))
    return str(path)


def _truncated(tmp_path, monkeypatch):
    good = write_npz(tmp_path / "good.npz").read_bytes()
    path = tmp_path / "truncated.npz"
    path.write_bytes(good[: len(good) // 2])
    return str(path)


def _npy_named_npz(tmp_path, monkeypatch):
    path = tmp_path / "array.npz"
    with path.open("wb") as fh:
        np.save(fh, np.zeros((4, 28, 28), np.uint8))
    return str(path)


def _bad_deflate_stream(tmp_path, monkeypatch):
    path = write_npz(tmp_path / "bitrot.npz")
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("train_images.npy")
    raw = bytearray(path.read_bytes())
    name_len = int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_len = int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    raw[start] = 0xFF  # first deflate block: BFINAL=1, BTYPE=11 (reserved) -> invalid stream
    path.write_bytes(bytes(raw))
    return str(path)


def _w(name, **overrides):
    return lambda tmp_path, monkeypatch: str(write_npz(tmp_path / name, **overrides))


def _labels(n, values):
    return np.asarray(values, dtype=np.int64).reshape(n, -1)


def _known_flag_offline(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv(DATA_PATH_ENV, raising=False)

    def offline(*args, **kwargs):  # never touch the network in tests
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    return "breastmnist"


def _known_flag_offline_patched(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv(DATA_PATH_ENV, raising=False)
    monkeypatch.setattr(mm, "download_official", lambda flag, root: "download failed: OSError: no network")
    return "adrenalmnist3d"


def _unknown_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(DATA_PATH_ENV, raising=False)
    return "nosuchmnist"


BAD_CASES = [
    pytest.param(lambda t, m: str(t / "absent.npz"), ["absent.npz", "does not exist"], id="missing-file"),
    pytest.param(lambda t, m: str(t), ["does not exist (or is not a file)"], id="directory-not-file"),
    pytest.param(_random_bytes, ["corrupt.npz", "not a readable .npz file"], id="corrupt-random-bytes"),
    pytest.param(_truncated, ["truncated.npz", "not a readable .npz file"], id="corrupt-truncated-zip"),
    pytest.param(_npy_named_npz, ["array.npz", "holds a single array (.npy), not a .npz archive"], id="npy-named-npz"),
    pytest.param(_bad_deflate_stream, ["bitrot.npz", "not a readable .npz file"], id="corrupt-deflate-stream"),
    pytest.param(_w("keys.npz", val_labels=None, test_images=None),
                 ["keys.npz", "missing keys", "val_labels", "test_images"], id="missing-keys"),
    pytest.param(_w("rows.npz", train_labels=_labels(19, np.arange(19) % 2)),
                 ["rows.npz", "train_labels has 19 rows", "train_images has 20 images"], id="row-mismatch"),
    pytest.param(_w("shapes.npz", val_images=np.zeros((6, 32, 32), np.uint8)),
                 ["shapes.npz", "image shapes differ between splits"], id="shapes-differ"),
    pytest.param(_w("widths.npz", train_labels=np.zeros((20, 2), np.uint8) + [[0, 1]]),
                 ["widths.npz", "label widths differ between splits"], id="label-widths-differ"),
    pytest.param(_w("breastmnist.npz", train_labels=_labels(20, [0, 1, 2] + [0, 1] * 8 + [0])),
                 ["breastmnist.npz", "train_labels has label 2", "out of range for 2 classes", "0..1"],
                 id="label-out-of-range-known-flag"),
    pytest.param(_w("pneumoniamnist.npz", test_labels=_labels(6, [0, 1, 0, 1, 0, 5])),
                 ["pneumoniamnist.npz", "test_labels has label 5", "out of range"], id="test-label-out-of-range"),
    pytest.param(_w("breastmnist.npz", train_labels=np.zeros((20, 2), np.uint8) + [[0, 1]],
                    val_labels=np.zeros((6, 2), np.uint8), test_labels=np.zeros((6, 2), np.uint8)),
                 ["breastmnist", "must have 1 column(s)", "found 2"], id="known-flag-wrong-width"),
    pytest.param(_w("neg.npz", val_labels=_labels(6, [0, 1, -1, 0, 1, 0])),
                 ["neg.npz", "val_labels", "negative label -1", ">= 0"], id="negative-labels"),
    pytest.param(_w("ml.npz", train_labels=np.tile([[0, 1, 2]], (20, 1)).astype(np.uint8),
                    val_labels=np.zeros((6, 3), np.uint8), test_labels=np.ones((6, 3), np.uint8)),
                 ["ml.npz", "multi-label labels must be 0 or 1", "2"], id="multilabel-not-binary"),
    pytest.param(_w("single.npz", train_labels=np.zeros((20, 1), np.uint8)),
                 ["single.npz", "train_labels hold a single class"], id="single-class-train"),
    pytest.param(_w("allzero.npz", train_labels=np.zeros((20, 1), np.uint8), val_labels=np.zeros((6, 1), np.uint8),
                    test_labels=np.zeros((6, 1), np.uint8)),
                 ["allzero.npz", "single class"], id="single-class-everywhere"),
    pytest.param(_w("flat.npz", train_images=np.zeros((20, 784), np.uint8)),
                 ["flat.npz", "train_images has shape (20, 784)", "expected (N,H,W)"], id="ndim-2"),
    pytest.param(_w("six.npz", val_images=np.zeros((6, 8, 8, 8, 8, 1), np.uint8)),
                 ["six.npz", "val_images has shape", "(N,D,H,W,C)"], id="ndim-6"),
    pytest.param(_w("tiny.npz", train_images=np.zeros((20, 4, 4), np.uint8)),
                 ["tiny.npz", "train_images spatial size", "minimum of 8"], id="too-small"),
    pytest.param(_w("empty.npz", test_images=np.zeros((0, 28, 28), np.uint8), test_labels=np.zeros((0, 1), np.uint8)),
                 ["empty.npz", "test_images is empty"], id="empty-split"),
    pytest.param(_w("nan.npz",
                    train_images=np.where(np.eye(28)[None] > 0, np.nan, 0.5).repeat(20, 0).astype(np.float32)),
                 ["nan.npz", "train_images contains NaN"], id="nan-images"),
    pytest.param(_w("frac.npz", train_labels=(np.arange(20) % 2 + 0.5)[:, None]),
                 ["frac.npz", "train_labels must hold whole numbers"], id="fractional-labels"),
    pytest.param(_w("text.npz", train_images=np.full((20, 28, 28), "a")),
                 ["text.npz", "train_images must hold numbers"], id="string-images"),
    pytest.param(_unknown_flag, ["'nosuchmnist'", "neither a .npz path nor a known MedMNIST flag", "pneumoniamnist"],
                 id="unknown-flag"),
    pytest.param(_known_flag_offline,
                 ["breastmnist: no file at", os.path.join(".medmnist", "breastmnist.npz"),
                  "breastmnist.npz?download=1 failed (URLError", DATA_PATH_ENV, "--data"], id="known-flag-offline"),
    pytest.param(_known_flag_offline_patched,
                 [os.path.join(".medmnist", "adrenalmnist3d.npz"), "download failed: OSError: no network"],
                 id="known-flag-offline-download-fails"),
]


@pytest.mark.parametrize("make, fragments", BAD_CASES)
def test_bad_inputs_raise_data_error(tmp_path, monkeypatch, make, fragments):
    data = make(tmp_path, monkeypatch)
    with pytest.raises(DataError) as err:
        load_medmnist(data)
    msg = str(err.value)
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"


def test_offline_message_names_full_home_path(tmp_path, monkeypatch):
    flag = _known_flag_offline(tmp_path, monkeypatch)
    with pytest.raises(DataError) as err:
        load_medmnist(flag)
    assert f"no file at {tmp_path / 'home' / '.medmnist' / 'breastmnist.npz'}" in str(err.value)
