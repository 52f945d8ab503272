"""The site's warm SuperExec (`medfed.deploy.warm_exec`) and the quick-polling Grid.

Real zygote processes with a probe entry in place of ``flwr-clientapp`` (each test stops what it
starts); Flower's own SubprocessExecutor is the reference for the command line a task gets.
"""

from __future__ import annotations

import inspect
import json
import os
import stat
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from medfed.deploy import processes as proc
from medfed.deploy import warm_exec
from medfed.exceptions import ConfigError
from medfed.server.grid import DeploymentGrid

PROBE = '''
import json, os, sys
def main():
    import numpy as np
    out = sys.argv[sys.argv.index("--out") + 1]
    info = {"argv": sys.argv, "pid": os.getpid(), "ppid": os.getppid(), "rand": float(np.random.rand()),
            "medfed": sorted(m for m in sys.modules if m == "medfed" or m.startswith("medfed.")),
            "numpy_preloaded": True}
    with open(out + ".tmp", "w") as f:
        json.dump(info, f)
    os.replace(out + ".tmp", out)
    if "--fail" in sys.argv:
        raise SystemExit(3)
'''
LIGHT_MODULES = ("numpy", "medfed.config")  # quick to warm; medfed.* must be dropped afterwards


def _wait_for(path: Path, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file():
            return json.loads(path.read_text())
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


def _spec(tmp_path: Path, name: str, task_type=None, **over):
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor.types import ExecutionSpec

    fields = dict(task_type=task_type or TaskType.CLIENT_APP, runtime_api_address="127.0.0.1:1",
                  token=name, insecure=True, root_certificates_path=None, runtime_dependency_install=False,
                  parent_pid=4242, suppress_output=False, task_id=7)
    fields.update(over)
    return ExecutionSpec(**fields)


@pytest.fixture()
def executor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "probe_entry.py").write_text(PROBE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    ex = warm_exec.ZygoteExecutor(entry="probe_entry:main", modules=LIGHT_MODULES)
    # The probe reads its output file from argv: route it through the token's slot.
    monkeypatch.setattr(warm_exec, "clientapp_argv",
                        lambda spec: ["flwr-clientapp", "--out", str(tmp_path / spec.token), *spec.extra])
    yield ex
    ex.close()


def _probe_spec(tmp_path: Path, name: str, *extra: str):
    spec = _spec(tmp_path, name)
    object.__setattr__(spec, "extra", list(extra))  # frozen dataclass; only the probe reads it
    return spec


def test_clientapp_tasks_are_forked_from_the_zygote_with_fresh_randomness_and_no_medfed(executor, tmp_path) -> None:
    assert executor.launch(_probe_spec(tmp_path, "tok-a")).status == "accepted"
    assert executor.launch(_probe_spec(tmp_path, "tok-b")).status == "accepted"
    a, b = _wait_for(tmp_path / "tok-a"), _wait_for(tmp_path / "tok-b")
    zygote = executor.zygote.pid
    assert a["ppid"] == zygote and b["ppid"] == zygote and a["pid"] != b["pid"]
    assert a["argv"] == ["flwr-clientapp", "--out", str(tmp_path / "tok-a")]
    assert a["medfed"] == [] and b["medfed"] == []  # the submitted app's medfed is imported, not the zygote's
    assert a["rand"] != b["rand"]  # numpy's global generator reseeded in each child, not copied by fork


def test_a_failing_child_leaves_the_zygote_serving_and_is_reaped(executor, tmp_path) -> None:
    import psutil

    executor.launch(_probe_spec(tmp_path, "tok-f", "--fail"))
    _wait_for(tmp_path / "tok-f")
    executor.launch(_probe_spec(tmp_path, "tok-g"))
    assert _wait_for(tmp_path / "tok-g")["ppid"] == executor.zygote.pid
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the zygote reaps within its 1 s loop: no zombies pile up
        if not [c for c in psutil.Process(executor.zygote.pid).children() if c.status() == psutil.STATUS_ZOMBIE]:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("exited ClientApp processes were not reaped")


def test_without_a_zygote_tasks_take_flowers_subprocess_launch_and_the_zygote_restarts(executor, tmp_path) -> None:
    calls = []
    executor.fallback = SimpleNamespace(launch=lambda spec: calls.append(spec.token) or "fallback")
    first = executor.zygote
    first.kill()
    first.wait(timeout=10)
    assert executor.launch(_probe_spec(tmp_path, "tok-c")) == "fallback"
    assert calls == ["tok-c"]
    executor.reconcile()
    assert executor.zygote is not first and executor.zygote_alive()
    executor.launch(_probe_spec(tmp_path, "tok-d"))
    assert _wait_for(tmp_path / "tok-d")["ppid"] == executor.zygote.pid


def test_other_task_types_always_take_flowers_subprocess_launch(executor, tmp_path) -> None:
    from flwr.supercore.constant import TaskType

    calls = []
    executor.fallback = SimpleNamespace(launch=lambda spec: calls.append(spec.task_type) or "fallback")
    other = next(t for t in TaskType if t != TaskType.CLIENT_APP)
    assert executor.launch(_spec(tmp_path, "x", task_type=other)) == "fallback"
    assert calls == [other]


@pytest.mark.parametrize("over", [
    {},
    {"insecure": False, "root_certificates_path": "/kit/ca.pem"},
    {"parent_pid": None, "runtime_dependency_install": True},
])
def test_the_forked_command_line_is_the_one_flower_would_start(tmp_path, monkeypatch, over) -> None:
    """Flower's SubprocessExecutor is the reference: same program, same arguments."""
    import subprocess

    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda args, **_: started.append(list(args)))
    spec = _spec(tmp_path, "t", **over)
    SubprocessExecutor().launch(spec)
    assert warm_exec.clientapp_argv(spec) == started[0]


def test_flowers_superexec_still_has_the_seam_the_warm_superexec_replaces() -> None:
    import flwr.supercore.superexec.run_superexec as superexec

    assert callable(superexec.get_executor)
    params = inspect.signature(superexec.run_superexec).parameters
    for name in ("runtime_api_address", "insecure", "root_certificates_path", "superexec_auth_secret",
                 "parent_pid", "runtime_dependency_install"):
        assert name in params


def test_the_default_warm_modules_import_and_leave_no_medfed_behind(monkeypatch) -> None:
    """Every listed module exists (a renamed module would silently go cold otherwise)."""
    import importlib.util

    for name in warm_exec.WARM_MODULES:
        assert importlib.util.find_spec(name) is not None, name
    monkeypatch.setattr(sys, "modules", dict(sys.modules))
    warm_exec.warm_up(["medfed.config"])
    assert not [m for m in sys.modules if m == "medfed" or m.startswith("medfed.")]


def test_resolve_entry_names_the_rule() -> None:
    with pytest.raises(ValueError, match="MODULE:FUNCTION"):
        warm_exec.resolve_entry("no_colon_here")


def test_supernode_and_superexec_commands_share_a_private_secret(tmp_path) -> None:
    secret = proc.write_superexec_secret(tmp_path / "state" / "superexec.secret")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and len(secret.read_bytes()) == 32
    first = secret.read_bytes()
    again = proc.write_superexec_secret(secret)
    assert again.read_bytes() != b"" and stat.S_IMODE(again.stat().st_mode) == 0o600
    assert again.read_bytes() != first  # a new secret at every start
    node = proc.supernode_command(superlink="127.0.0.1:9092", node_config={"site-name": "h1"}, runtime_port=5555,
                                  root_certificate=None, auth_key=None, superexec_secret=secret)
    assert node[node.index("--isolation") + 1] == "process"
    assert node[node.index("--superexec-auth-secret-file") + 1] == str(secret)
    cold = proc.supernode_command(superlink="127.0.0.1:9092", node_config={"site-name": "h1"}, runtime_port=5555,
                                  root_certificate=None, auth_key=None)
    assert "--isolation" not in cold
    ex = proc.warm_exec_command(runtime_port=5555, supernode_pid=99, superexec_secret=secret)
    assert ex[ex.index("--runtime-api-address") + 1] == "127.0.0.1:5555"
    assert ex[ex.index("--parent-pid") + 1] == "99" and str(secret) in ex


def test_run_site_refuses_an_unknown_clientapp_start(tmp_path) -> None:
    from medfed.deploy.launch import run_site

    with pytest.raises(ConfigError, match="--clientapp-start must be one of warm, fresh"):
        run_site(tmp_path, data=None, superlink="127.0.0.1:9092", workdir=None, insecure=True, clientapp_start="hot")


def test_run_site_refuses_warm_clientapps_where_processes_cannot_fork(tmp_path, monkeypatch) -> None:
    from medfed.deploy.launch import run_site

    monkeypatch.delattr(os, "fork")
    with pytest.raises(ConfigError, match="use --clientapp-start fresh"):
        run_site(tmp_path, data=None, superlink="127.0.0.1:9092", workdir=None, insecure=True)


# ------------------------------------------------------------------------------- DeploymentGrid

_NO_CONTENT = SimpleNamespace(has_content=lambda: False)  # an error message: nothing to pack


class _FakeGrid:
    """Replies to message i become available after ``ready_after[i]`` pulls."""

    def __init__(self, ready_after: list[int]) -> None:
        self.ready_after, self.pulls, self.pushed = ready_after, 0, []

    def push_messages(self, messages):
        self.pushed = list(messages)
        return [f"m{i}" for i in range(len(self.pushed))]

    def pull_messages(self, message_ids):
        self.pulls += 1
        ids = set(message_ids)
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"m{i}"), has_content=lambda: False)
                for i, after in enumerate(self.ready_after) if f"m{i}" in ids and self.pulls >= after]


def test_deployment_grid_collects_every_reply_polling_at_its_interval(monkeypatch) -> None:
    sleeps = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    inner = _FakeGrid([1, 3, 2])
    replies = DeploymentGrid(inner, poll_seconds=0.2).send_and_receive([_NO_CONTENT] * 3, timeout=None)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert inner.pulls == 3 and sleeps == [0.2, 0.2]  # Flower's HttpGrid would have slept 3 s twice


def test_deployment_grid_returns_what_arrived_when_the_timeout_passes(monkeypatch) -> None:
    clock = iter(range(10_000))
    monkeypatch.setattr(time, "monotonic", lambda: float(next(clock)))
    monkeypatch.setattr(time, "sleep", lambda s: None)
    replies = DeploymentGrid(_FakeGrid([1, 10**6])).send_and_receive([_NO_CONTENT] * 2, timeout=5.0)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]


def test_deployment_grid_refuses_a_non_positive_interval() -> None:
    with pytest.raises(ValueError, match="poll_seconds must be > 0"):
        DeploymentGrid(_FakeGrid([]), poll_seconds=0)
