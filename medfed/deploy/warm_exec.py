"""A site's warm SuperExec: ClientApp processes forked from a process that has already imported
the heavy libraries.

Why. Flower 1.41's SuperNode (``--isolation subprocess``, its default) starts ``flower-superexec``,
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

If the zygote is gone (killed, crashed) a task falls back to Flower's own subprocess launch and
the zygote is restarted; task types other than ClientApps always take that path.

    python -m medfed.deploy.warm_exec --runtime-api-address 127.0.0.1:PORT --insecure \\
        --parent-pid SUPERNODE_PID --superexec-auth-secret-file SECRET

(`medfed site` starts it; ``--clientapp-start fresh`` keeps Flower's default instead.)
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

MODULE = "medfed.deploy.warm_exec"
CLIENTAPP_ENTRY = "flwr.supernode.cli.flwr_clientapp:flwr_clientapp"
POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
TASK_POLL_SECONDS = "0.1"  # Flower's default is 1 s; AcquireTask is one local HTTP request

# What a ClientApp imports, at the top of medfed's modules or lazily inside them. medfed modules
# are imported only to pull in their dependencies, then dropped (see the module docstring).
WARM_MODULES = (
    "flwr.supernode.cli.flwr_clientapp",
    "medfed.client.app", "medfed.client.algo", "medfed.client.replay",
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
        except Exception as exc:  # noqa: BLE001 -- a warm-up miss must not stop the site
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
    except BaseException:  # noqa: BLE001 -- report and exit non-zero, like a crashed process
        traceback.print_exc()
        return 1


def serve(entry_ref: str, modules: Sequence[str], requests_fd: int = 0) -> None:
    """The zygote: warm up, then fork one child per request line (``{"argv": [...]}``) read from
    ``requests_fd``, until it closes. Exited children are reaped."""
    from medfed.deploy.flower_tuning import tune_object_pulls

    tune_object_pulls()  # objects not there yet: retried after 50 ms, not Flower's 1 s (see flower_tuning)
    warm_up(modules)  # last: it drops every medfed module, this one included
    entry = resolve_entry(entry_ref)
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

def clientapp_argv(spec) -> list[str]:  # spec: flwr ExecutionSpec
    """The command line Flower's SubprocessExecutor would start for ``spec`` (flwr 1.41)."""
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


class ZygoteExecutor:
    """Flower's Executor protocol (flwr 1.41): ClientApp tasks are forked from the zygote; other
    task types, and every task while the zygote is down, go to Flower's SubprocessExecutor."""

    def __init__(self, entry: str = CLIENTAPP_ENTRY, modules: Sequence[str] = WARM_MODULES,
                 python: str = sys.executable) -> None:
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

        self.entry, self.modules, self.python = entry, tuple(modules), python
        self.fallback = SubprocessExecutor()
        self.zygote: subprocess.Popen | None = None
        self.start_zygote()

    def start_zygote(self) -> None:
        command = [self.python, "-m", MODULE, "zygote", "--entry", self.entry,
                   "--modules", ",".join(self.modules)]
        self.zygote = subprocess.Popen(command, stdin=subprocess.PIPE)
        _log(f"started zygote pid {self.zygote.pid}")

    def zygote_alive(self) -> bool:
        return self.zygote is not None and self.zygote.poll() is None

    # Executor protocol -----------------------------------------------------------------------
    def get_eligible_capacity(self, supported_task_types, *, insecure=False, root_certificates_path=None):
        return self.fallback.get_eligible_capacity(supported_task_types, insecure=insecure,
                                                   root_certificates_path=root_certificates_path)

    def wait_for_capacity(self, task_type=None, *, fab_hash=None, insecure=False, root_certificates_path=None):
        return None

    def launch(self, spec):
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        zygote = self.zygote
        if spec.task_type == TaskType.CLIENT_APP and self.zygote_alive() and zygote and zygote.stdin:
            try:
                zygote.stdin.write((json.dumps({"argv": clientapp_argv(spec)}) + "\n").encode())
                zygote.stdin.flush()
                return LaunchResult.accepted()
            except OSError as exc:
                _log(f"zygote unreachable ({exc}); task {spec.task_id} takes Flower's subprocess launch")
        return self.fallback.launch(spec)

    def reconcile(self) -> None:
        if self.zygote is not None and not self.zygote_alive():
            _log(f"zygote exited with code {self.zygote.returncode}; restarting it")
            self.start_zygote()

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

def run(argv: Sequence[str]) -> None:
    """Flower's SuperExec with `ZygoteExecutor` (same options as ``flower-superexec``)."""
    import flwr.supercore.superexec.run_superexec as superexec
    from flwr.supercore.auth.superexec_secret import load_superexec_auth_secret

    if not hasattr(superexec, "get_executor"):  # the one seam this relies on; flwr is pinned to 1.41.0
        raise RuntimeError("flwr.supercore.superexec.run_superexec.get_executor is gone: this flwr is not 1.41")
    parser = argparse.ArgumentParser(prog="python -m medfed.deploy.warm_exec")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--root-certificates", default=None)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--superexec-auth-secret-file", default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault(POLL_ENV, TASK_POLL_SECONDS)
    executor = ZygoteExecutor()
    superexec.get_executor = lambda *_, **__: executor
    superexec.run_superexec(runtime_api_address=args.runtime_api_address, insecure=args.insecure,
                            root_certificates_path=args.root_certificates,
                            superexec_auth_secret=load_superexec_auth_secret(args.superexec_auth_secret_file),
                            parent_pid=args.parent_pid, runtime_dependency_install=False)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["zygote"]:
        parser = argparse.ArgumentParser(prog="python -m medfed.deploy.warm_exec zygote")
        parser.add_argument("--entry", default=CLIENTAPP_ENTRY)
        parser.add_argument("--modules", default=",".join(WARM_MODULES))
        args = parser.parse_args(argv[1:])
        serve(args.entry, [m for m in args.modules.split(",") if m])
        return
    run(argv)


if __name__ == "__main__":
    main()
