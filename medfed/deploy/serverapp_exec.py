"""The centre's SuperExec for ServerApps: Flower's own SuperExec loop, with each ServerApp task's
token handed to its process on standard input instead of its command line.

Why. Flower's ``SubprocessExecutor`` starts ``flwr-serverapp --token TOKEN``. A process's
command line is readable by every local user (``/proc/PID/cmdline``, ``ps``), and the token is all
the Runtime API asks of a ServerApp: whoever reads it can pull the run's messages (the sites'
updates) and push its own. The gateway (`medfed.deploy.gateway`) keeps the Runtime API on loopback
and requires the SuperExec secret to *claim* a task; this keeps the token of a claimed task private.

What. Flower's ``run_superexec`` (task acquisition, SuperExec authentication, signals) with its
``get_executor`` seam returning `StdinTokenExecutor`: ServerApp tasks only, each started as
``python -m medfed.deploy.serverapp_exec task RUNTIME-ARGS`` with the token written to its stdin;
that process puts ``--token TOKEN`` into its own ``sys.argv`` (in memory only) and runs
``flwr-serverapp``'s entry point. The same seam and the same stdin hand-over serve the sites'
ClientApps (`medfed.deploy.warm_exec`, `medfed.deploy.clientapp_gate`).

    python -m medfed.deploy.serverapp_exec --runtime-api-address 127.0.0.1:PORT \\
        --parent-pid GATEWAY_PID --superexec-auth-secret-file SECRET
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from medfed.deploy.clientapp_gate import read_token
from medfed.deploy.warm_exec import clientapp_argv as task_argv
from medfed.deploy.warm_exec import start_with_token, without_token
from medfed.flower_patches.superexec import run_superexec_with

MODULE = "medfed.deploy.serverapp_exec"
SERVERAPP_ENTRY = "flwr.superlink.cli:flwr_serverapp"


class StdinTokenExecutor:
    """Flower's Executor protocol (flwr 1.41-1.42) for the centre: ServerApp tasks only, each a fresh
    process given its token on stdin; other task types are refused."""

    def __init__(self, python: str = sys.executable) -> None:
        self.python = python
        self.children: list[subprocess.Popen] = []

    def command(self, spec: Any) -> tuple[list[str], str]:
        argv, token = without_token(task_argv(spec))
        return [self.python, "-m", MODULE, "task", *argv[1:]], token

    def get_eligible_capacity(self, supported_task_types: Any, *, insecure: bool = False,
                              root_certificates_path: str | None = None) -> tuple[set, set]:
        from flwr.supercore.constant import TaskType

        return {t for t in supported_task_types if t == TaskType.SERVER_APP}, set()

    def wait_for_capacity(self, task_type: Any = None, *, fab_hash: str | None = None, insecure: bool = False,
                          root_certificates_path: str | None = None) -> None:
        return None

    def launch(self, spec: Any) -> Any:
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.SERVER_APP:
            return LaunchResult.failed(f"the centre's SuperExec runs ServerApps only, not {spec.task_type}")
        command, token = self.command(spec)
        self.children.append(start_with_token(command, token, quiet=spec.suppress_output,
                                              what=f"ServerApp for task {spec.task_id}"))
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        self.children = [c for c in self.children if c.poll() is None]

    def close(self) -> None:
        self.reconcile()


def run_task(argv: Sequence[str], stdin: Any = None) -> None:
    """A ServerApp process: the token from ``stdin``, then ``flwr-serverapp ARGV --token TOKEN``."""
    if "--token" in argv:
        raise SystemExit("the task token is read from standard input, never from the command line")
    token = read_token(stdin if stdin is not None else sys.stdin.buffer)
    module, _, attr = SERVERAPP_ENTRY.partition(":")
    entry = getattr(importlib.import_module(module), attr)
    sys.argv = ["flwr-serverapp", *argv, "--token", token]
    entry()


def run(argv: Sequence[str]) -> None:
    """Flower's SuperExec with `StdinTokenExecutor` (options as ``flower-superexec``'s)."""
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--superexec-auth-secret-file", required=True)
    args = parser.parse_args(argv)
    run_superexec_with(StdinTokenExecutor(), runtime_api_address=args.runtime_api_address,
                       auth_secret_file=args.superexec_auth_secret_file, parent_pid=args.parent_pid)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["task"]:
        run_task(argv[1:])
        return
    run(argv)


if __name__ == "__main__":
    main()
