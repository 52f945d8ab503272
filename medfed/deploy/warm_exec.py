"""A site's SuperExec: every ClientApp through the site's app gate, warm ClientApp processes forked
from a process that has already imported the heavy libraries.

Why. Flower's SuperNode (``--isolation subprocess``, its default) starts ``flower-superexec``,
which starts a fresh ``flwr-clientapp`` process for every message. Each one imports torch,
MONAI, opacus, peft and Flower before it can train: about 14 s of CPU on this project's 2-core
machine, paid by every site in every round (docs/RESULTS.md, deployment_overhead).

What. With ``--isolation process`` the SuperNode leaves starting ClientApps to a SuperExec of
the site's choosing. This is one: Flower's own SuperExec loop (`run_superexec`: task
acquisition, SuperExec authentication, signals), with its executor replaced by `ZygoteExecutor`.
The executor keeps one *zygote* process that imports the libraries once, then, for each
ClientApp task, forks a child that runs exactly what ``flwr-clientapp`` would run, with the
same arguments (`clientapp_argv`). What changes is only what is already in memory:

* medfed's own modules are dropped from the zygote after warming up, so each child imports the
  medfed code of the submitted app (the FAB), as a fresh ``flwr-clientapp`` would: the site's
  installed medfed never stands in for the app the server sent;
* numpy's global random generator, which fork would copy into every child, is reseeded from
  the OS in each child (Python's ``random`` is reseeded by CPython at fork; torch's default
  generator is left at its initial state, as in a fresh process; medfed seeds its own);
* nothing in the zygote runs a torch operation, so no OpenMP pool exists at fork time (the
  same rule PyTorch's forked DataLoader workers rely on).

The gate. Every ClientApp refuses an app the site has not approved before installing it
(`medfed.deploy.clientapp_gate`, settings from this SuperExec's command line, passed on in the
environment): the zygote installs the gate before it forks; a ClientApp started as a fresh process
(``--clientapp-start fresh``, or any task while the zygote is down: it is then restarted) runs
``python -m medfed.deploy.clientapp_gate``, which installs the gate before ``flwr-clientapp``'s entry.
The task token never appears on a command line (``/proc/PID/cmdline`` is world-readable): it goes to
the zygote and to a fresh process over a pipe. Task types other than ClientApps are refused: a
site's SuperExec runs ClientApps only.

    python -m medfed.deploy.warm_exec --runtime-api-address 127.0.0.1:PORT --insecure \\
        --parent-pid SUPERNODE_PID --superexec-auth-secret-file SECRET \\
        --approved-apps KIT/approved-apps.json --run-log KIT/state/run-log.jsonl --site NAME \\
        [--clientapp-start warm|fresh]

(`medfed site` starts it.)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import select
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from medfed.deploy import clientapp_gate
from medfed.flower_patches import clientapp_seam
from medfed.flower_patches.superexec import run_superexec_with

if TYPE_CHECKING:  # flwr is imported lazily: the zygote must not load it before it forks
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult

MODULE = "medfed.deploy.warm_exec"
GATE_MODULE = "medfed.deploy.clientapp_gate"
CLIENTAPP_ENTRY = clientapp_gate.CLIENTAPP_ENTRY
CLIENTAPP_START = ("warm", "fresh")
POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
TASK_POLL_SECONDS = "0.1"  # Flower's default is 1 s; AcquireTask is one local HTTP request

# What a ClientApp imports, at the top of medfed's modules or lazily inside them. medfed modules
# are imported only to pull in their dependencies, then dropped (see the module docstring).
WARM_MODULES = (
    "flwr.supernode.cli.flwr_clientapp",
    "medfed.client_app", "medfed.task.algo", "medfed.task.replay",
    "medfed.privacy.dp_sgd", "medfed.privacy.ledger", "medfed.privacy.guard",
    "medfed.models.encoders", "medfed.models.lora", "medfed.selfsup.registry",
    "opacus", "opacus.validators", "opacus.optimizers", "opacus.grad_sample",
    "peft", "safetensors.torch", "psutil", "sqlite3",
)
OWN_PACKAGE = "medfed"


def _log(text: str) -> None:
    print(f"[medfed warm-exec pid {os.getpid()}] {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- the zygote

def warm_up(modules: Sequence[str]) -> None:
    """Import ``modules`` (those that fail are logged: the child will report them properly),
    then forget the medfed package so children import the submitted app's copy."""
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:
            _log(f"could not pre-import {name}: {type(exc).__name__}: {exc}")
    for name in [m for m in sys.modules if m == OWN_PACKAGE or m.startswith(OWN_PACKAGE + ".")]:
        del sys.modules[name]


def resolve_entry(ref: str) -> Callable[[], object]:
    module, _, attr = ref.partition(":")
    if not module or not attr:
        raise ValueError(f"entry must be MODULE:FUNCTION, got {ref!r}")
    return getattr(importlib.import_module(module), attr)


def _reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            _log(f"ClientApp process {pid} exited with code {code}")


def run_child(entry: Callable[[], object], argv: list[str]) -> int:
    """What a forked child runs: ``entry`` with ``sys.argv = argv``; returns its exit code."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()  # fresh OS entropy, not the zygote's copied state
    sys.argv = list(argv)
    try:
        entry()
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        return 1


def serve(entry_ref: str, modules: Sequence[str], requests_fd: int = 0) -> None:
    """The zygote: install the app gate (settings from the environment; it refuses to start without),
    warm up, then fork one child per request line (``{"argv": [...]}``) read from ``requests_fd``,
    until it closes. Exited children are reaped."""
    from medfed.flower_patches.flower_tuning import tune_object_pulls

    clientapp_gate.install(clientapp_gate.GateSettings.from_env())  # inherited by every fork
    tune_object_pulls()  # objects not there yet: retried after 50 ms, not Flower's 1 s (see flower_tuning)
    entry = resolve_entry(entry_ref)
    warm_up(modules)  # last: it drops every medfed module, this one included (the gate keeps its own)
    _log(f"zygote ready ({len(sys.modules)} modules imported)")
    pending = b""
    while True:
        _reap()
        ready, _, _ = select.select([requests_fd], [], [], 1.0)
        if not ready:
            continue
        chunk = os.read(requests_fd, 1 << 16)
        if not chunk:
            return
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            argv = json.loads(line)["argv"]
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    os.close(requests_fd)
                    code = run_child(entry, argv)
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            _log(f"forked ClientApp process {pid}")


# ------------------------------------------------------------------------------------- the executor

def clientapp_argv(spec: ExecutionSpec) -> list[str]:
    """The command line Flower's SubprocessExecutor would start for ``spec`` (flwr 1.41-1.42)."""
    from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TASK_TYPE_TO_COMMAND

    argv = [TASK_TYPE_TO_COMMAND[spec.task_type], TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type],
            spec.runtime_api_address, "--token", spec.token]
    if spec.insecure:
        argv.append("--insecure")
    elif spec.root_certificates_path is not None:
        argv += ["--root-certificates", spec.root_certificates_path]
    if spec.parent_pid is not None:
        argv += ["--parent-pid", str(spec.parent_pid)]
    if spec.runtime_dependency_install:
        argv.append("--allow-runtime-dependency-installation")
    return argv


def without_token(argv: list[str]) -> tuple[list[str], str]:
    """``argv`` minus its ``--token TOKEN`` pair, and the token."""
    if "--token" not in argv or argv.index("--token") + 1 >= len(argv):
        raise ValueError("the ClientApp command line has no --token")
    at = argv.index("--token")
    return argv[:at] + argv[at + 2:], argv[at + 1]


def start_with_token(command: list[str], token: str, *, quiet: bool, what: str) -> subprocess.Popen:
    """Start ``command`` and write its task token to its stdin (a command line is world-readable)."""
    stream = subprocess.DEVNULL if quiet else None
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=stream, stderr=stream)
    try:
        assert child.stdin is not None
        child.stdin.write(token.encode("ascii") + b"\n")
        child.stdin.close()
    except OSError as exc:
        _log(f"{what}: process {child.pid} did not take its token ({exc})")
    _log(f"started {what}: process {child.pid}")
    return child


class GatedLauncher:
    """A fresh ClientApp process per task, through the app gate: ``python -m
    medfed.deploy.clientapp_gate --entry ENTRY ARGS`` (Flower's SubprocessExecutor's arguments,
    without ``--token``), the token written to its stdin. Its environment is this SuperExec's,
    which holds the gate's settings."""

    def __init__(self, entry: str = CLIENTAPP_ENTRY, python: str = sys.executable) -> None:
        self.entry, self.python = entry, python
        self.children: list[subprocess.Popen] = []

    def command(self, spec: ExecutionSpec) -> tuple[list[str], str]:
        argv, token = without_token(clientapp_argv(spec))
        return [self.python, "-m", GATE_MODULE, "--entry", self.entry, *argv[1:]], token

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        from flwr.supercore.superexec.executor.types import LaunchResult

        command, token = self.command(spec)
        child = start_with_token(command, token, quiet=spec.suppress_output, what=f"ClientApp for task {spec.task_id}")
        self.children.append(child)
        return LaunchResult.accepted()

    def reap(self) -> None:
        self.children = [c for c in self.children if c.poll() is None]


class ZygoteExecutor:
    """Flower's Executor protocol (flwr 1.41-1.42) for a site: ClientApp tasks only, each through the app
    gate. ``warm``: forked from the zygote, or, while the zygote is down, started fresh by the
    `GatedLauncher` (the zygote is restarted); not ``warm``: always started fresh. Other task types
    are refused."""

    def __init__(self, entry: str = CLIENTAPP_ENTRY, modules: Sequence[str] = WARM_MODULES,
                 python: str = sys.executable, *, warm: bool = True) -> None:
        self.entry, self.modules, self.python, self.warm = entry, tuple(modules), python, warm
        self.fallback = GatedLauncher(entry, python)
        self.zygote: subprocess.Popen | None = None
        if warm:
            self.start_zygote()

    def start_zygote(self) -> None:
        command = [self.python, "-m", MODULE, "zygote", "--entry", self.entry,
                   "--modules", ",".join(self.modules)]
        self.zygote = subprocess.Popen(command, stdin=subprocess.PIPE)
        _log(f"started zygote pid {self.zygote.pid}")

    def zygote_alive(self) -> bool:
        return self.zygote is not None and self.zygote.poll() is None

    # Executor protocol -----------------------------------------------------------------------
    def get_eligible_capacity(self, supported_task_types: set[TaskType], *, insecure: bool = False,
                              root_certificates_path: str | None = None) -> tuple[set[TaskType], set[str]]:
        from flwr.supercore.constant import TaskType

        return {t for t in supported_task_types if t == TaskType.CLIENT_APP}, set()

    def wait_for_capacity(self, task_type: TaskType | None = None, *, fab_hash: str | None = None,
                          insecure: bool = False, root_certificates_path: str | None = None) -> None:
        return None

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            _log(f"refused task {spec.task_id} of type {spec.task_type}: a site's SuperExec runs ClientApps only")
            return LaunchResult.failed(f"a site's SuperExec runs ClientApps only, not {spec.task_type}")
        zygote = self.zygote
        if self.zygote_alive() and zygote and zygote.stdin:
            try:
                zygote.stdin.write((json.dumps({"argv": clientapp_argv(spec)}) + "\n").encode())
                zygote.stdin.flush()
                return LaunchResult.accepted()
            except OSError as exc:
                _log(f"zygote unreachable ({exc}); task {spec.task_id} starts a fresh gated process")
        return self.fallback.launch(spec)

    def reconcile(self) -> None:
        if self.zygote is not None and not self.zygote_alive():
            _log(f"zygote exited with code {self.zygote.returncode}; restarting it")
            self.start_zygote()
        reap = getattr(self.fallback, "reap", None)
        if reap is not None:
            reap()

    def close(self) -> None:
        if self.zygote is None:
            return
        zygote, self.zygote = self.zygote, None
        if zygote.stdin is not None:
            try:
                zygote.stdin.close()
            except OSError:
                pass
        try:
            zygote.wait(timeout=5)
        except subprocess.TimeoutExpired:
            zygote.kill()
            zygote.wait(timeout=5)


# ------------------------------------------------------------------------------------- entry points

def gate_settings_from_args(approved_apps: str, run_log: str, site: str) -> clientapp_gate.GateSettings:
    """The gate's settings, checked now (a clear error at the site's start, not at its first task):
    Flower still has the gate's seam, and the allow-list is readable."""
    from medfed.deploy.approval import load_approvals

    settings = clientapp_gate.GateSettings(Path(approved_apps).resolve(), Path(run_log).resolve(), site)
    clientapp_seam.target_module()
    load_approvals(settings.approved_apps)
    return settings


def run(argv: Sequence[str]) -> None:
    """Flower's SuperExec with `ZygoteExecutor` (``flower-superexec``'s options, plus the app gate's)."""
    parser = argparse.ArgumentParser(prog="python -m medfed.deploy.warm_exec")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--root-certificates", default=None)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--superexec-auth-secret-file", default=None)
    parser.add_argument("--approved-apps", required=True, help="the site's allow-list (KIT/approved-apps.json)")
    parser.add_argument("--run-log", required=True, help="the site's run log (KIT/state/run-log.jsonl)")
    parser.add_argument("--site", required=True, help="the site's name (in refusals)")
    parser.add_argument("--clientapp-start", choices=CLIENTAPP_START, default="warm")
    args = parser.parse_args(argv)
    settings = gate_settings_from_args(args.approved_apps, args.run_log, args.site)
    os.environ.update(settings.to_env())  # inherited by the zygote and every fresh ClientApp process
    os.environ.setdefault(POLL_ENV, TASK_POLL_SECONDS)
    executor = ZygoteExecutor(warm=args.clientapp_start == "warm")
    run_superexec_with(executor, runtime_api_address=args.runtime_api_address,
                       auth_secret_file=args.superexec_auth_secret_file, parent_pid=args.parent_pid,
                       insecure=args.insecure, root_certificates=args.root_certificates)


def main(argv: Sequence[str] | None = None) -> None:
    from medfed.exceptions import MedfedError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["zygote"]:
            parser = argparse.ArgumentParser(prog="python -m medfed.deploy.warm_exec zygote")
            parser.add_argument("--entry", default=CLIENTAPP_ENTRY)
            parser.add_argument("--modules", default=",".join(WARM_MODULES))
            args = parser.parse_args(argv[1:])
            serve(args.entry, [m for m in args.modules.split(",") if m])
            return
        run(argv)
    except MedfedError as exc:  # the gate's settings or the allow-list: one line, not a traceback
        _log(f"error: {exc}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
