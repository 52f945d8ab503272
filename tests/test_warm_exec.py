"""The site's warm SuperExec (`medfed.deploy.warm_exec`) and the quick-polling Grid.

Real zygote processes with a probe entry in place of ``flwr-clientapp`` (each test stops what it
starts); Flower's own SubprocessExecutor is the reference for the command line a task gets. The probe
calls Flower's ``install_from_fab`` (as ``run_clientapp`` does) when given ``--fab``: the app gate
(`medfed.deploy.clientapp_gate`) must refuse an unapproved FAB on every launch path.
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
from medfed.deploy.approval import sha256_hex, write_initial_approvals
from medfed.deploy.clientapp_gate import GateSettings
from medfed.deploy.run_log import verify_run_log
from medfed.exceptions import ConfigError
from medfed.server.grid import DeploymentGrid

PROBE = '''
import json, os, sys
def main():
    import numpy as np
    import psutil
    out = sys.argv[sys.argv.index("--out") + 1]
    info = {"argv": sys.argv, "pid": os.getpid(), "ppid": os.getppid(), "rand": float(np.random.rand()),
            "cmdline": psutil.Process().cmdline()}
    if "--fab" in sys.argv:  # what run_clientapp does with the task's FAB
        import pathlib
        import flwr.supernode.runtime.run_clientapp as rc
        fab = open(sys.argv[sys.argv.index("--fab") + 1], "rb").read()
        try:
            info["installed"] = str(rc.install_from_fab(fab, install_dir=pathlib.Path(out).parent, skip_prompt=True))
        except Exception as exc:
            info["refused"] = f"{type(exc).__name__}: {exc}"
    info["medfed"] = sorted(m for m in sys.modules if m == "medfed" or m.startswith("medfed."))
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


def tiny_fab(code: str) -> bytes:
    """A real, small Flower app bundle, built by Flower."""
    from flwr.cli.build import build_fab_from_files

    pyproject = ('[project]\nname = "tinyapp"\nversion = "1.0.0"\n\n[tool.flwr.app]\npublisher = "test"\n\n'
                 '[tool.flwr.app.components]\nserverapp = "tinyapp.server:app"\nclientapp = "tinyapp.client:app"\n')
    return build_fab_from_files({"pyproject.toml": pyproject.encode(), "tinyapp/__init__.py": b"",
                                 "tinyapp/client.py": code.encode(), "tinyapp/server.py": b""})[0]


@pytest.fixture()
def gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> GateSettings:
    """A site kit approving approved.fab (not refused.fab); the gate's settings in the environment, as
    the SuperExec passes them on to the zygote and to fresh ClientApp processes."""
    kit = tmp_path / "kit"
    kit.mkdir()
    approved, refused = tiny_fab("app = 1\n"), tiny_fab("app = 'exfiltrate'\n")
    (tmp_path / "approved.fab").write_bytes(approved)
    (tmp_path / "refused.fab").write_bytes(refused)
    write_initial_approvals(kit, approved)
    settings = GateSettings.for_kit(kit, "h1")
    for key, value in settings.to_env().items():
        monkeypatch.setenv(key, value)
    return settings


@pytest.fixture()
def executor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gate: GateSettings):
    (tmp_path / "probe_entry.py").write_text(PROBE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    ex = warm_exec.ZygoteExecutor(entry="probe_entry:main", modules=LIGHT_MODULES)
    # The probe reads its output file and options from argv, then the token, as flwr-clientapp's argv ends.
    monkeypatch.setattr(warm_exec, "clientapp_argv", lambda spec: ["flwr-clientapp", "--out", str(tmp_path / spec.out),
                                                                   *spec.extra, "--token", spec.token])
    yield ex
    ex.close()


def _probe_spec(tmp_path: Path, name: str, *extra: str):
    spec = _spec(tmp_path, f"{name}-secret-token-4f1d")
    object.__setattr__(spec, "extra", list(extra))  # frozen dataclass; only the probe reads these
    object.__setattr__(spec, "out", name)
    return spec


def test_clientapp_tasks_are_forked_from_the_zygote_with_fresh_randomness_and_no_medfed(executor, tmp_path) -> None:
    assert executor.launch(_probe_spec(tmp_path, "tok-a")).status == "accepted"
    assert executor.launch(_probe_spec(tmp_path, "tok-b")).status == "accepted"
    a, b = _wait_for(tmp_path / "tok-a"), _wait_for(tmp_path / "tok-b")
    zygote = executor.zygote.pid
    assert a["ppid"] == zygote and b["ppid"] == zygote and a["pid"] != b["pid"]
    assert a["argv"] == ["flwr-clientapp", "--out", str(tmp_path / "tok-a"), "--token", "tok-a-secret-token-4f1d"]
    assert "tok-a-secret-token-4f1d" not in " ".join(a["cmdline"])  # sent over the zygote's pipe
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


def test_without_a_zygote_a_task_starts_a_fresh_gated_process_and_the_zygote_restarts(executor, tmp_path) -> None:
    first = executor.zygote
    first.kill()
    first.wait(timeout=10)
    assert executor.launch(_probe_spec(tmp_path, "tok-c")).status == "accepted"
    c = _wait_for(tmp_path / "tok-c")
    assert c["ppid"] == os.getpid()  # started by the SuperExec itself, not forked
    assert c["cmdline"][1:4] == ["-m", "medfed.deploy.clientapp_gate", "--entry"]
    assert c["argv"] == ["flwr-clientapp", "--out", str(tmp_path / "tok-c"), "--token", "tok-c-secret-token-4f1d"]
    assert c["medfed"] == []  # medfed's own modules dropped before the entry: the app's medfed is imported
    executor.reconcile()
    assert executor.zygote is not first and executor.zygote_alive()
    executor.launch(_probe_spec(tmp_path, "tok-d"))
    assert _wait_for(tmp_path / "tok-d")["ppid"] == executor.zygote.pid


def test_the_task_token_is_on_no_command_line(executor, tmp_path) -> None:
    """/proc/PID/cmdline is world-readable: the token reaches the ClientApp by a pipe, on both paths."""
    import psutil

    executor.launch(_probe_spec(tmp_path, "warm"))
    _wait_for(tmp_path / "warm")
    executor.zygote.kill()
    executor.zygote.wait(timeout=10)
    executor.launch(_probe_spec(tmp_path, "fresh"))
    for name in ("warm", "fresh"):
        seen = _wait_for(tmp_path / name)
        token = f"{name}-secret-token-4f1d"
        assert seen["argv"][-2:] == ["--token", token]  # flwr-clientapp gets it, in-process
        assert token not in " ".join(seen["cmdline"]), seen["cmdline"]
    for p in psutil.process_iter(["cmdline"]):  # and no process anywhere shows it
        assert not any("secret-token-4f1d" in part for part in (p.info["cmdline"] or []))


@pytest.mark.parametrize("path", ["warm", "fresh"])
def test_every_launch_path_refuses_an_unapproved_app_and_installs_an_approved_one(executor, tmp_path, gate,
                                                                                  path) -> None:
    if path == "fresh":  # the zygote is down: the fallback launch
        executor.launch(_probe_spec(tmp_path, "ready"))
        _wait_for(tmp_path / "ready")
        executor.zygote.kill()
        executor.zygote.wait(timeout=10)
    executor.launch(_probe_spec(tmp_path, f"{path}-bad", "--fab", str(tmp_path / "refused.fab")))
    executor.launch(_probe_spec(tmp_path, f"{path}-good", "--fab", str(tmp_path / "approved.fab")))
    bad, good = _wait_for(tmp_path / f"{path}-bad"), _wait_for(tmp_path / f"{path}-good")
    refused_hash = sha256_hex((tmp_path / "refused.fab").read_bytes())
    assert "installed" not in bad
    assert bad["refused"] == (f"AppNotApproved: site h1 refused app sha256:{refused_hash}: not in its approved "
                              "apps (medfed site approve)")
    assert not list(tmp_path.glob(f"apps/*{refused_hash[:8]}*"))  # nothing of it unpacked
    assert "refused" not in good and Path(good["installed"]).is_dir()
    assert bad["medfed"] == [] and good["medfed"] == []  # the gate imported nothing of medfed anew
    outcomes = {(e["app_sha256"], e["outcome"]) for e in verify_run_log(gate.run_log)}
    assert (refused_hash, "refused") in outcomes
    assert (sha256_hex((tmp_path / "approved.fab").read_bytes()), "approved") in outcomes


def test_fresh_clientapp_start_keeps_no_zygote_and_gates_each_task(tmp_path, monkeypatch, gate) -> None:
    (tmp_path / "probe_entry.py").write_text(PROBE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setattr(warm_exec, "clientapp_argv", lambda spec: ["flwr-clientapp", "--out", str(tmp_path / spec.out),
                                                                   *spec.extra, "--token", spec.token])
    ex = warm_exec.ZygoteExecutor(entry="probe_entry:main", modules=LIGHT_MODULES, warm=False)
    try:
        assert ex.zygote is None
        ex.launch(_probe_spec(tmp_path, "f1", "--fab", str(tmp_path / "refused.fab")))
        seen = _wait_for(tmp_path / "f1")
        assert seen["ppid"] == os.getpid() and "AppNotApproved: site h1 refused app sha256:" in seen["refused"]
        ex.reconcile()
        assert ex.zygote is None
    finally:
        ex.close()


def test_a_fresh_clientapp_without_gate_settings_refuses_to_start() -> None:
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDFED_GATE_")}
    done = subprocess.run([sys.executable, "-m", "medfed.deploy.clientapp_gate", "--runtime-api-address", "x:1"],
                          input=b"tok\n", env=env, capture_output=True, timeout=60)
    assert done.returncode == 1 and b"MEDFED_GATE_APPROVED_APPS" in done.stderr
    done = subprocess.run([sys.executable, "-m", "medfed.deploy.clientapp_gate", "--token", "tok"], env=env,
                          capture_output=True, timeout=60)
    assert done.returncode != 0 and b"never from the command line" in done.stderr


def test_other_task_types_are_refused_by_a_sites_superexec(executor, tmp_path) -> None:
    from flwr.supercore.constant import TaskType

    calls = []
    executor.fallback = SimpleNamespace(launch=lambda spec: calls.append(spec.task_type) or "fallback")
    for other in (t for t in TaskType if t != TaskType.CLIENT_APP):
        result = executor.launch(_spec(tmp_path, "x", task_type=other))
        assert result.status == "failed" and "ClientApps only" in result.message
    assert calls == []
    assert executor.get_eligible_capacity(set(TaskType)) == ({TaskType.CLIENT_APP}, set())


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
    ex = proc.warm_exec_command(runtime_port=5555, supernode_pid=99, superexec_secret=secret,
                                approved_apps=tmp_path / "kit" / "approved-apps.json",
                                run_log=tmp_path / "kit" / "state" / "run-log.jsonl", site="h1",
                                clientapp_start="fresh")
    assert ex[ex.index("--runtime-api-address") + 1] == "127.0.0.1:5555"
    assert ex[ex.index("--parent-pid") + 1] == "99" and str(secret) in ex
    assert ex[ex.index("--approved-apps") + 1] == str(tmp_path / "kit" / "approved-apps.json")
    assert ex[ex.index("--site") + 1] == "h1" and ex[ex.index("--clientapp-start") + 1] == "fresh"


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
