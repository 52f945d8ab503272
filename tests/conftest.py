"""Shared fixtures: the pinned MedMNIST files beside the project, flwr message helpers, --runslow."""

from __future__ import annotations

import atexit
import importlib.util
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from medfed.data.site import SiteData

SHARED_DATA = Path(
    os.environ.get("MEDFED_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist")
)

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# prepared cases go to a throwaway cache, never the user's ~/.cache/medfed, removed when the tests end
if "MEDFED_CACHE_DIR" not in os.environ:
    os.environ["MEDFED_CACHE_DIR"] = tempfile.mkdtemp(prefix="medfed-test-cache-")
    atexit.register(shutil.rmtree, os.environ["MEDFED_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
if "RAY_AUTH_MODE" not in os.environ:  # Ray reads it once, on import, and a test may import ray before medfed's
    os.environ["RAY_AUTH_MODE"] = "token"  # launcher sets it: the tests' local Ray instances take a session token
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of the pinned official MedMNIST files (../shared/data/medmnist)."""
    if not (SHARED_DATA / "breastmnist.npz").is_file():
        pytest.fail(f"pinned MedMNIST files not found at {SHARED_DATA}; set MEDFED_SHARED_DATA")
    return SHARED_DATA.resolve()  # absolute: subprocesses run in other folders


@pytest.fixture(scope="session")
def breast_site(shared_data: Path) -> SiteData:
    """BreastMNIST as one deployed site's own data (20 % of its train images labelled): a small real site for
    SiteAlgo tests."""
    from medfed.data.medmnist import load_medmnist
    from medfed.data.site import site_from_own_file

    return site_from_own_file(load_medmnist(shared_data / "breastmnist.npz"), site_id=0, label_fraction=0.2, seed=0)


@pytest.fixture()
def data_path_env(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make flags such as 'breastmnist' resolve to the shared files."""
    monkeypatch.setenv("MEDFED_DATA_PATH", str(shared_data))
    return shared_data


def make_metadata(dst_node_id: int = 1, src_node_id: int = 0, message_type: str = "train"):
    from flwr.app import Metadata

    return Metadata(
        run_id=1, message_id=f"m{time.time_ns()}", src_node_id=src_node_id, dst_node_id=dst_node_id,
        reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600.0, message_type=message_type,
    )


@pytest.fixture()
def flwr_task_identity():
    """Flower's per-process task identity, needed to create instruction messages outside a runtime."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture(scope="module")
def single_torch_thread():
    """Tiny tensors: one intra-op thread is faster and avoids spin-wait stalls on a busy 2-core machine."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def load_script(name: str) -> ModuleType:
    """benchmarks/NAME.py loaded as a module (its own logic tested without running it)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
