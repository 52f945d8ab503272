"""The centre's ServerApp launcher (medfed.deploy.serverapp_exec): ServerApp tasks only, and the task
token never on a command line (a real process is checked with psutil)."""

from __future__ import annotations

import io
import sys
import time

import psutil
import pytest

from medfed.deploy import serverapp_exec
from medfed.deploy.serverapp_exec import StdinTokenExecutor, run_task

TOKEN = "f" * 64


def spec(task_type):
    from flwr.supercore.superexec.executor.types import ExecutionSpec

    return ExecutionSpec(task_type=task_type, runtime_api_address="127.0.0.1:9", token=TOKEN, insecure=True,
                         root_certificates_path=None, runtime_dependency_install=False, parent_pid=None,
                         suppress_output=True, task_id=7)


def test_only_serverapp_tasks_are_taken() -> None:
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor.types import LaunchResultStatus

    executor = StdinTokenExecutor()
    assert executor.get_eligible_capacity(set(TaskType))[0] == {TaskType.SERVER_APP}
    assert executor.launch(spec(TaskType.CLIENT_APP)).status == LaunchResultStatus.FAILED


def test_the_command_carries_everything_but_the_token() -> None:
    from flwr.supercore.constant import TaskType

    command, token = StdinTokenExecutor().command(spec(TaskType.SERVER_APP))
    assert token == TOKEN and TOKEN not in " ".join(command) and "--token" not in command
    assert command[1:4] == ["-m", "medfed.deploy.serverapp_exec", "task"]
    assert command[4:] == ["--runtime-api-address", "127.0.0.1:9", "--insecure"]


def test_the_task_process_puts_the_token_into_its_own_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    fake = type(sys)("fake_entry")
    fake.main = lambda: seen.append(list(sys.argv))
    monkeypatch.setitem(sys.modules, "fake_entry", fake)
    monkeypatch.setattr(serverapp_exec, "SERVERAPP_ENTRY", "fake_entry:main")
    monkeypatch.setattr(sys, "argv", ["x"])
    run_task(["--runtime-api-address", "127.0.0.1:9", "--insecure"], io.BytesIO(TOKEN.encode() + b"\n"))
    assert seen == [["flwr-serverapp", "--runtime-api-address", "127.0.0.1:9", "--insecure", "--token", TOKEN]]
    with pytest.raises(SystemExit, match="never from the command line"):
        run_task(["--token", TOKEN], io.BytesIO(b""))


def test_a_launched_serverapp_process_shows_no_token_to_other_users() -> None:
    from flwr.supercore.constant import TaskType

    executor = StdinTokenExecutor()
    launched = spec(TaskType.SERVER_APP)
    executor.launch(launched)
    (child,) = executor.children
    try:
        time.sleep(1.0)
        cmdline = " ".join(psutil.Process(child.pid).cmdline())
        assert "medfed.deploy.serverapp_exec task" in cmdline and TOKEN not in cmdline
    finally:
        child.kill()
        child.wait(timeout=10)
