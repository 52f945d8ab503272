"""`medfed simulate` on Ray (issue 15): client-gpus and ray-address reach Flower's backend config and Ray, the
checks that refuse what cannot run or would be open to the network, and real runs: the token of the local Ray
instance medfed starts, and a 2-site simulation on a Ray head started here (stopped, every process, at the end)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from medfed.cli import app
from medfed.config import RunConfig, run_config
from medfed.exceptions import ConfigError, FederationError
from medfed.simulations import launcher

runner = CliRunner()
TINY = ["--data", "breastmnist", "--num-sites", "2", "--pretrain-rounds", "1", "--finetune-rounds", "1",
        "--width", "8", "--baselines", "none", "--client-cpus", "1"]


def tiny(tmp_path: Path, **changes: object) -> RunConfig:
    base: dict[str, object] = dict(data="breastmnist", num_sites=2, pretrain_rounds=1, finetune_rounds=1, width=8,
                                   baselines="none", client_cpus=1, out_dir=str(tmp_path / "runs"))
    return run_config(**(base | changes))


class Captured(Exception):
    """Raised by a stand-in once it has what the test wants: nothing further runs."""


# --- what medfed hands to Flower, and Flower to Ray (mocked) ---------------------------------------------------------


def test_backend_config_carries_the_gpu_share_and_the_address(tmp_path: Path) -> None:
    local = launcher.backend_config(tiny(tmp_path))
    assert local["client_resources"] == {"num_cpus": 1, "num_gpus": 0.0}
    assert local["init_args"]["address"] == "local"  # never a cluster named by RAY_ADDRESS or the last `ray start`
    assert local["init_args"]["num_cpus"] == max(1, os.cpu_count() or 1)

    cluster = launcher.backend_config(tiny(tmp_path, client_gpus=0.25, ray_address="10.0.0.7:6379"))
    assert cluster["client_resources"] == {"num_cpus": 1, "num_gpus": 0.25}
    assert cluster["init_args"]["address"] == "10.0.0.7:6379"
    assert "num_cpus" not in cluster["init_args"]  # Ray refuses num_cpus when joining a cluster


def test_simulate_hands_them_to_flower(tmp_path: Path, data_path_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    probed: list[str] = []
    captured: dict[str, Any] = {}

    def run_simulation(**kwargs: Any) -> None:
        captured.update(kwargs)
        raise Captured

    monkeypatch.setattr(launcher, "probe_cluster", lambda cfg, backend: probed.append(cfg.federation.ray_address))
    monkeypatch.setattr(launcher, "run_simulation", run_simulation)
    with pytest.raises(Captured):
        launcher.simulate(tiny(tmp_path, client_gpus=0.5, ray_address="127.0.0.1:6399"))
    assert probed == ["127.0.0.1:6399"]
    assert captured["num_supernodes"] == 2
    assert captured["backend_config"]["client_resources"] == {"num_cpus": 1, "num_gpus": 0.5}
    assert captured["backend_config"]["init_args"]["address"] == "127.0.0.1:6399"


@pytest.mark.parametrize("address", ["", "127.0.0.1:6399"], ids=["local", "cluster"])
def test_flower_passes_them_to_ray(address: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's RayBackend: init_args become ray.init's keywords, client_resources each actor's options."""
    import ray
    from flwr.server.superlink.fleet.vce.backend import raybackend

    gpus = 0.5 if address else 0.0
    backend = launcher.backend_config(tiny(tmp_path, client_gpus=gpus, ray_address=address))
    backend = json.loads(json.dumps(backend))  # as Flower's run_simulation hands it to the backend
    init_kwargs: list[dict[str, Any]] = []
    options: list[dict[str, Any]] = []

    class Actor:
        @staticmethod
        def options(**kwargs: Any) -> Any:
            options.append(kwargs)
            return types.SimpleNamespace(remote=lambda **_: object())

    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # init_ray rewrites it: restored after
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: init_kwargs.append(kwargs))
    monkeypatch.setattr(ray, "nodes", lambda: [{"Resources": {"CPU": 4.0, "GPU": 1.0}}])
    monkeypatch.setattr(raybackend, "ClientAppActor", Actor)
    ray_backend = raybackend.RayBackend(backend)
    ray_backend.build(lambda: None)  # type: ignore[arg-type, return-value]

    (kwargs,) = init_kwargs
    assert kwargs["address"] == (address or "local")
    assert ("num_cpus" in kwargs) == (not address)
    assert kwargs["include_dashboard"] is False and "PYTHONPATH" in kwargs["runtime_env"]["env_vars"]
    assert options == [{"num_cpus": 1, "num_gpus": gpus}] * (2 if gpus else 4)  # 1 GPU / 0.5, else 4 CPUs / 1


# --- refusals and warnings -------------------------------------------------------------------------------------------


def refused_simulate(tmp_path: Path, *flags: str) -> str:
    """`medfed simulate` with ``flags``: it must exit 2 and write no run directory; returns its output, one line."""
    out = tmp_path / "runs"
    result = runner.invoke(app, ["simulate", *TINY, *flags, "--out-dir", str(out)], env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert not out.exists() or not any(out.iterdir())
    return " ".join(result.output.split())


def test_client_gpus_without_a_gpu_exits_2(tmp_path: Path, data_path_env: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "client-gpus 0.5 but torch finds no CUDA device" in refused_simulate(tmp_path, "--client-gpus", "0.5")


def test_more_gpus_per_site_than_the_machine_has(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    launcher.check_ray_settings(tiny(tmp_path, client_gpus=1))
    with pytest.raises(ConfigError, match=r"client-gpus 2 per site, but this machine has 1 CUDA device"):
        launcher.check_ray_settings(tiny(tmp_path, client_gpus=2))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a cluster's GPUs are not this machine's
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    launcher.check_ray_settings(tiny(tmp_path, client_gpus=2, ray_address="127.0.0.1:6379"))


def test_a_ray_address_needs_an_explicit_auth_mode(tmp_path: Path, data_path_env: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert "set RAY_AUTH_MODE to how that cluster authenticates" in refused_simulate(
        tmp_path, "--ray-address", "127.0.0.1:6379")
    monkeypatch.setenv("RAY_AUTH_MODE", "tokens")
    with pytest.raises(ConfigError, match="RAY_AUTH_MODE"):
        launcher.check_ray_settings(tiny(tmp_path, ray_address="127.0.0.1:6379"))


@pytest.mark.parametrize(("address", "mode", "warning"), [
    ("127.0.0.1:6379", "token", None),
    ("localhost:6379", "token", None),
    ("[::1]:6379", "token", None),
    ("10.0.0.7:6379", "token", "is not on this machine (10.0.0.7)"),
    ("ray://head.example.org:10001", "token", "is not on this machine (head.example.org)"),
    ("auto", "token", "is chosen by Ray"),
    ("127.0.0.1:6379", "disabled", "without authentication (RAY_AUTH_MODE=disabled)"),
])
def test_ray_address_warnings(address: str, mode: str, warning: str | None, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", mode)
    with caplog.at_level(logging.WARNING, logger=launcher.__name__):
        launcher.check_ray_settings(tiny(tmp_path, ray_address=address))
    if warning is None:
        assert not caplog.records
    else:
        assert warning in caplog.text


def test_local_ray_auth(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):  # set first, so that the teardown removes what medfed sets
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    launcher.local_ray_auth()
    assert os.environ["RAY_AUTH_MODE"] == "token" and len(os.environ["RAY_AUTH_TOKEN"]) == 64
    token = os.environ["RAY_AUTH_TOKEN"]
    launcher.local_ray_auth()
    assert os.environ["RAY_AUTH_TOKEN"] == token  # one token per process: Ray caches it

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the user's choice stands, with a warning
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    with caplog.at_level(logging.WARNING, logger=launcher.__name__):
        launcher.local_ray_auth()
    assert "RAY_AUTH_TOKEN" not in os.environ and "accepts work from anyone" in caplog.text

    monkeypatch.delenv("RAY_AUTH_MODE")
    not_started = types.ModuleType("ray")
    not_started.is_initialized = lambda: False  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ray", not_started)  # Ray already read its mode (off): refuse, set nothing
    with pytest.raises(ConfigError, match="Ray was imported in this process before medfed could turn on its token"):
        launcher.local_ray_auth()
    assert "RAY_AUTH_MODE" not in os.environ

    connected = types.ModuleType("ray")
    connected.is_initialized = lambda: True  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ray", connected)  # someone else's connection: Flower would reuse it
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(ConfigError, match="already connected to a Ray instance medfed did not start"):
        launcher.local_ray_auth()


def test_a_cluster_run_is_refused_the_token_medfed_made_for_a_local_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launcher, "_LOCAL_TOKEN", "medfeds-own-local-token")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "medfeds-own-local-token")
    with pytest.raises(ConfigError, match="holds the token medfed made for it"):
        launcher.check_ray_settings(tiny(tmp_path, ray_address="127.0.0.1:6399"))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "the-cluster-s-token")
    launcher.check_ray_settings(tiny(tmp_path, ray_address="127.0.0.1:6399"))


def test_no_room_on_the_cluster_is_named(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, client_gpus=0.5, ray_address="127.0.0.1:6399")
    crash = RuntimeError("An error was encountered. Ending simulation.")
    crash.__cause__ = RuntimeError("Simulation Runtime crashed.")
    crash.__cause__.__cause__ = ValueError("ActorPool is empty. Stopping Simulation.")
    problem = launcher.ray_problem(crash, cfg)
    assert isinstance(problem, FederationError)
    assert "has room for one simulated site with client-cpus 1 and client-gpus 0.5" in str(problem)
    assert launcher.ray_problem(RuntimeError("something else"), cfg) is None


# --- real Ray ------------------------------------------------------------------------------------------------------

GCS_PROBE = """
import json

def call(address, metadata):
    import grpc  # not before medfed sets RAY_AUTH_MODE: Ray reads it once, when first imported
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), metadata=metadata, timeout=10)
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name

def probe(address, token):
    return {"anonymous": call(address, ()), "wrong token": call(address, (("authorization", "Bearer wrong"),)),
            "token": call(address, (("authorization", "Bearer " + token),))}
"""
"""Asks a GCS for its cluster id as an outsider would (plain gRPC): without a token, with a wrong one, with the
right one."""

REFUSED = {"anonymous": "UNAUTHENTICATED", "wrong token": "UNAUTHENTICATED", "token": "OK"}


def ray_cli() -> str:
    beside = Path(sys.executable).with_name("ray")
    found = str(beside) if beside.is_file() else shutil.which("ray")
    if not found:
        pytest.skip("the ray command line is not installed (pip install 'flwr[simulation]')")
    return found


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without Ray's address or authentication, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_AUTH")}
    return env | {"RAY_USAGE_STATS_ENABLED": "0"} | extra


def run_python(code: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.timeout(180)
def test_the_local_ray_instance_needs_its_token(tmp_path: Path) -> None:
    """What medfed's Ray backend starts on this machine listens on every interface (Ray 2.55), but refuses anyone
    without the token of the process that started it."""
    code = GCS_PROBE + """
import os
from medfed.config import run_config
from medfed.simulations import launcher
launcher.local_ray_auth()
import ray
init_args = launcher.backend_config(run_config(data="breastmnist", client_cpus=1))["init_args"]
ray.init(**init_args, include_dashboard=False)
try:
    print(json.dumps(probe(ray.get_runtime_context().gcs_address, os.environ["RAY_AUTH_TOKEN"])))
finally:
    ray.shutdown()
"""
    result = run_python(code, clean_env())
    assert json.loads(result.stdout.strip().splitlines()[-1]) == REFUSED


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def session_processes(sid: int, marker: str) -> list[str]:
    """Processes still in session ``sid`` or naming ``marker`` (the head's temp dir) on their command line."""
    left = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if os.getsid(int(entry.name)) == sid or marker in cmdline:
                left.append(f"{entry.name} {cmdline[:200]}")
        except (OSError, ProcessLookupError):
            continue
    return left


@contextlib.contextmanager
def ray_head(env: dict[str, str]) -> Iterator[str]:
    """A Ray head of 2 CPUs in its own session and temp dir (so it is not the default cluster of this machine's
    other Ray users), on free ports; stopped, all its processes, at the end. Yields its address."""
    temp_dir = tempfile.mkdtemp(prefix="mfray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = free_port()
    cmd = [ray_cli(), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
           "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard=false", "--disable-usage-stats",
           "--temp-dir", temp_dir, "--ray-client-server-port", str(free_port()),
           "--dashboard-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port())]
    log_path = Path(temp_dir) / "head.log"
    with log_path.open("w") as log:
        head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in log_path.read_text():
            assert head.poll() is None, f"ray start exited {head.returncode}: {log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"ray start did not start: {log_path.read_text()[-3000:]}"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops its GCS, raylet, agents and workers
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        deadline = time.monotonic() + 30
        while (left := session_processes(head.pid, temp_dir)) and time.monotonic() < deadline:
            time.sleep(0.5)
        if left:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of the Ray head left running: {left}"


@pytest.mark.timeout(300)
def test_simulate_on_a_ray_head(tmp_path: Path, shared_data: Path) -> None:
    """Two sites on a token-authenticated Ray head started here: the run finishes, and the head's GCS saw medfed's
    job and the sites' ClientApp actors."""
    token = secrets.token_hex(32)
    env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    with ray_head(env) as address:
        out = tmp_path / "runs"
        medfed = subprocess.Popen(
            [sys.executable, "-c", "from medfed.cli import app; app()", "simulate", *TINY, "--out-dir", str(out),
             "--ray-address", address],
            env=env | {"MEDFED_DATA_PATH": str(shared_data), "COLUMNS": "200"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output, _ = medfed.communicate(timeout=240)
        assert medfed.returncode == 0, output[-4000:]
        summary = json.loads((out / "breastmnist-federated-simclr-s0" / "summary.json").read_text())
        assert list(summary["arms"]) == ["federated-simclr"]

        code = GCS_PROBE + f"""
import ray
from ray._private import state
ray.init(address={address!r}, logging_level="ERROR", log_to_driver=False)
try:
    jobs = [{{"job": j["JobID"], "pid": j["DriverPid"], "dead": j["IsDead"]}} for j in state.jobs()]
    actors = [{{"class": a["ActorClassName"], "job": a["JobID"]}} for a in state.actors().values()]
    print(json.dumps({{"jobs": jobs, "actors": actors, "probe": probe({address!r}, {token!r})}}))
finally:
    ray.shutdown()
"""
        seen = json.loads(run_python(code, env).stdout.strip().splitlines()[-1])
    jobs = {j["job"] for j in seen["jobs"] if j["pid"] == medfed.pid and j["dead"]}  # medfed's probe, then Flower's
    assert jobs, seen
    assert sum(a["class"] == "ClientAppActor" and a["job"] in jobs for a in seen["actors"]) == 2, seen  # 2 CPUs / 1
    assert seen["probe"] == REFUSED  # the documented recipe: a head nobody without the token can use
