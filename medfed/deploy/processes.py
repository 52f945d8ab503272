"""Flower's deployment processes, started and stopped by medfed (Flower 1.41-1.42).

Since 1.41 the SuperLink serves the Fleet, Control and runtime APIs on ONE HTTPS port and
authenticates nobody on the Control API. medfed therefore never starts ``flower-superlink`` on a
network: the centre runs `medfed.deploy.gateway` (Flower's SuperLink app behind mutual TLS and
route authorization, the Runtime API on a loopback listener) and a SuperExec for ServerApps that
holds the gateway's SuperExec secret. SuperNode authentication admits only SuperNodes whose
public key was registered through the Control API (``flwr supernode register``, which only the
operator's certificate may call); registrations live in the SuperLink's database, so they survive
a restart. A SuperNode proves its identity twice: with its site's client certificate in the TLS
handshake and with its EC (P-384) SuperNode key (OpenSSH format) on every Fleet request; the
gateway checks that both name the same site.

Every process is started in a new session and stopped with its whole process tree
(`stop_tree`): the SuperLink's and SuperNodes' helpers (``flower-superexec``,
``flwr-serverapp``, ``flwr-clientapp``) are found by parent PID, because some run in
process groups of their own. The venv's ``bin`` goes first on PATH: Flower starts those
helpers by name. Dependency installation (``uv sync``) is off: the environment that runs
medfed is the one that trains.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

from medfed.exceptions import ConfigError, FederationError
from medfed.files import write_private

DEFAULT_PORT = 9092
# Flower (1.41-1.42) starts its legacy gRPC Control/Fleet servers when these are "1": unauthenticated, and (Fleet)
# on 0.0.0.0, beside the gateway. medfed never passes them on, and the gateway refuses to start with them.
FLOWER_BACKDOORS = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")
CONNECTION = "medfed"  # the flwr CLI's name for this deployment's SuperLink connection


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment of a Flower process: the venv's bin first on PATH, no telemetry or update checks,
    no runtime dependency installation, and a FLWR_HOME of its own (never ~/.flwr)."""
    env = {k: v for k, v in os.environ.items() if k not in FLOWER_BACKDOORS}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(FLWR_HOME=str(flwr_home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PYTHONUNBUFFERED="1")
    flwr_home.mkdir(parents=True, exist_ok=True)
    return env


def flower_bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.is_file():
        raise FederationError(
            f"{name} not found next to {sys.executable}; install medfed with flwr in this environment"
        )
    return str(path)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_address(address: str) -> tuple[str, int]:
    """``host:port`` (IPv6 in brackets) -> (host, port); a clear error otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--superlink must be HOST:PORT (e.g. fl.hospital.org:{DEFAULT_PORT}); got {address!r}")
    return host.strip("[]"), int(port)


def toml_value(value: object) -> str:
    """A node-config / run-config value as TOML (strings double-quoted; no quotes inside)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    if '"' in text or "\\" in text or "\n" in text:
        raise ConfigError(f"value {text!r} may not contain quotes, backslashes or newlines")
    return f'"{text}"'


def node_config_arg(node_config: dict[str, object]) -> str:
    return " ".join(f"{k}={toml_value(v)}" for k, v in node_config.items())


# ---------------------------------------------------------------------------------------- processes

@dataclass
class Started:
    """A process medfed started (in a session of its own) and where its output goes."""

    name: str
    process: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid


def start(name: str, command: list[str], *, env: dict[str, str], log: Path, cwd: Path | None = None) -> Started:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=cwd, start_new_session=True)
    return Started(name, proc, log)


def stop_tree(pid: int, timeout: float = 10.0) -> list[int]:
    """SIGTERM ``pid`` and every descendant (found by parent PID, whatever their process group),
    then SIGKILL what is still alive after ``timeout``; returns the PIDs signalled."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    return [p.pid for p in procs]


def wait_healthy(address: str, ca_file: Path | None, timeout: float, proc: Started | None = None,
                 client_cert: tuple[Path, Path] | None = None) -> None:
    """Wait until the SuperLink answers ``/health`` (HTTPS verified by ``ca_file``, presenting
    ``client_cert`` = (certificate, key) if given, or plain HTTP)."""
    scheme = "http" if ca_file is None else "https"
    context = None if ca_file is None else ssl.create_default_context(cafile=str(ca_file))
    if context is not None and client_cert is not None:
        context.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.process.poll() is not None:
            raise FederationError(f"{proc.name} exited with code {proc.process.returncode}; see {proc.log}")
        try:
            with urllib.request.urlopen(f"{scheme}://{address}/health", context=context, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise FederationError(f"the SuperLink at {address} did not answer /health within {timeout:.0f} s")


# ---------------------------------------------------------------------------------------- commands

def insecure_superlink_command(*, host: str, port: int, database: Path) -> list[str]:
    """Flower's own SuperLink without TLS or any authentication (``--insecure``: test networks only)."""
    return [flower_bin("flower-superlink"), "--host", host, "--port", str(port), "--database", str(database),
            "--disable-runtime-dependency-installation", "--insecure"]


@dataclass(frozen=True)
class GatewayFiles:
    """The server kit's TLS material and the centre's registry of site keys."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    registry: Path


def gateway_command(*, host: str, port: int, runtime_port: int, database: Path, files: GatewayFiles,
                    superexec_secret: Path) -> list[str]:
    """The centre's SuperLink behind mutual TLS and route authorization (`medfed.deploy.gateway`)."""
    return [sys.executable, "-m", "medfed.deploy.gateway", "--ca-cert", str(files.ca_cert),
            "--server-cert", str(files.server_cert), "--server-key", str(files.server_key),
            "--registry", str(files.registry), "--host", host, "--port", str(port),
            "--runtime-port", str(runtime_port), "--database", str(database),
            "--superexec-secret", str(superexec_secret)]


def serverapp_superexec_command(*, runtime_port: int, gateway_pid: int, superexec_secret: Path) -> list[str]:
    """The centre's SuperExec for ServerApps (`medfed.deploy.serverapp_exec`: Flower's loop, tokens on
    stdin), on the gateway's loopback runtime listener and holding its SuperExec secret (without which
    no process can acquire a ServerApp task)."""
    return [sys.executable, "-m", "medfed.deploy.serverapp_exec", "--runtime-api-address",
            f"127.0.0.1:{runtime_port}", "--parent-pid", str(gateway_pid), "--superexec-auth-secret-file",
            str(superexec_secret)]


def supernode_command(*, superlink: str, node_config: dict[str, object], runtime_port: int,
                      root_certificate: Path | None, auth_key: Path | None,
                      superexec_secret: Path | None = None) -> list[str]:
    """A SuperNode dialling ``superlink`` (``flower-supernode`` with medfed's latency tuning,
    `medfed.flower_patches.flower_tuning`); ``root_certificate`` None = insecure. With
    ``superexec_secret`` it starts no SuperExec of its own (``--isolation process``): medfed's warm
    SuperExec (`warm_exec_command`) serves its ClientApp tasks, authenticated by that secret."""
    command = [sys.executable, "-m", "medfed.flower_patches.flower_tuning", "supernode", "--superlink", superlink,
               "--node-config", node_config_arg(node_config), "--host", "127.0.0.1", "--port", str(runtime_port)]
    if superexec_secret is not None:
        command += ["--isolation", "process", "--superexec-auth-secret-file", str(superexec_secret)]
    if root_certificate is None:
        return [*command, "--insecure"]
    command += ["--root-certificates", str(root_certificate)]
    if auth_key is not None:
        command += ["--auth-supernode-private-key", str(auth_key)]
    return command


def warm_exec_command(*, runtime_port: int, supernode_pid: int, superexec_secret: Path, approved_apps: Path,
                      run_log: Path, site: str, clientapp_start: str = "warm") -> list[str]:
    """medfed's SuperExec (`medfed.deploy.warm_exec`) for the SuperNode whose Runtime API listens on
    127.0.0.1:``runtime_port``; it exits with that SuperNode. Every ClientApp it starts first checks
    its app against the allow-list ``approved_apps`` and records the run in ``run_log``
    (`medfed.deploy.clientapp_gate`); ``clientapp_start`` warm (forked) or fresh (a new process each)."""
    return [sys.executable, "-m", "medfed.deploy.warm_exec", "--runtime-api-address", f"127.0.0.1:{runtime_port}",
            "--insecure", "--parent-pid", str(supernode_pid), "--superexec-auth-secret-file", str(superexec_secret),
            "--approved-apps", str(approved_apps), "--run-log", str(run_log), "--site", site,
            "--clientapp-start", clientapp_start]


def write_superexec_secret(path: Path) -> Path:
    """A fresh 32-byte secret shared by a SuperNode and its SuperExec (0600, replaced each start):
    without it, any local process could acquire the SuperNode's tasks from its Runtime API."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    write_private(path, os.urandom(32))
    return path


def write_cli_config(flwr_home: Path, address: str, ca_file: Path | None) -> None:
    """The flwr CLI's connection to this deployment (``$FLWR_HOME/config.toml``)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    trust = "insecure = true" if ca_file is None else f"root-certificates = {toml_value(str(ca_file.resolve()))}"
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = {toml_value(address)}\n{trust}\n')


@dataclass(frozen=True)
class ControlConnection:
    """How the centre's ``flwr`` CLI calls reach the Control API: its FLWR_HOME (address, root
    certificate) and the operator's client certificate and key (None: an insecure SuperLink)."""

    flwr_home: Path
    client_cert: tuple[Path, Path] | None = None


def flwr_cli(args: list[str], conn: ControlConnection, *, timeout: float = 120.0,
             cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``flwr ARGS``; with a client certificate, through `medfed.flower_patches.client_tls` so that Flower's
    HTTP client presents it."""
    from medfed.flower_patches.client_tls import client_certificate_env

    env = flower_env(conn.flwr_home)
    command = [flower_bin("flwr"), *args]
    if conn.client_cert is not None:
        env.update(client_certificate_env(*conn.client_cert))
        command = [sys.executable, "-m", "medfed.flower_patches.client_tls", "flwr", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False)


def register_supernode(public_key: Path, name: str, conn: ControlConnection) -> str:
    """Register a site's SuperNode public key with the SuperLink; returns 'registered' or 'already registered'."""
    result = flwr_cli(["supernode", "register", str(public_key), CONNECTION, "--name", name], conn)
    output = (result.stdout + result.stderr).strip()
    if result.returncode == 0:
        return "registered"
    if "already" in output.lower():
        return "already registered"
    raise FederationError(f"registering {name}'s SuperNode key {public_key} failed: {output[-500:]}")


def submit_run(app_dir: Path, run_config: Path, conn: ControlConnection) -> int:
    """`flwr run` the staged app with a TOML file of settings; returns the run id."""
    result = flwr_cli(["run", str(app_dir), CONNECTION, "--run-config", str(run_config), "--format", "json"], conn,
                      timeout=600)
    try:
        reply = json.loads(result.stdout)
        return int(reply["run-id"])
    except (ValueError, KeyError, TypeError):
        raise FederationError(f"flwr run failed: {(result.stdout + result.stderr).strip()[-800:]}") from None


def run_status(run_id: int, conn: ControlConnection) -> str:
    result = flwr_cli(["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], conn)
    try:
        return str(json.loads(result.stdout)["runs"][0]["status"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise FederationError(f"flwr ls failed: {(result.stdout + result.stderr).strip()[-500:]}") from None


def run_log(run_id: int, conn: ControlConnection) -> str:
    result = flwr_cli(["log", str(run_id), CONNECTION, "--show"], conn, timeout=120)
    return result.stdout + result.stderr


def stop_run(run_id: int, conn: ControlConnection) -> None:
    flwr_cli(["stop", str(run_id), CONNECTION], conn)


def stage_app(dest: Path) -> Path:
    """Copy the medfed Flower app (package + pyproject) to ``dest`` for `flwr run`.

    `flwr run` packs the app folder into a FAB, and rewrites a pyproject that has a
    ``[tool.flwr.federations]`` table; staging a copy without it leaves the installed
    package and the repository untouched.
    """
    import shutil

    import medfed

    package = Path(medfed.__file__).resolve().parent
    pyproject = package.parent / "pyproject.toml"
    if not pyproject.is_file():
        raise FederationError(
            f"{pyproject} not found: medfed must be installed from its source tree (pip install -e .)"
        )
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copytree(package, dest / "medfed", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (dest / "pyproject.toml").write_text(without_federations(pyproject.read_text()))
    for path in [dest, *dest.rglob("*")]:  # the owner's only, whatever the installed copy's modes
        path.chmod(0o700 if path.is_dir() else 0o600)
    return dest


def without_federations(pyproject_text: str) -> str:
    """The pyproject text minus its ``[tool.flwr.federations]`` table and sub-tables."""
    kept, skipping = [], False
    for line in pyproject_text.splitlines(keepends=True):
        header = line.strip()
        if header.startswith("["):
            skipping = header.startswith(("[tool.flwr.federations]", "[tool.flwr.federations."))
        if not skipping:
            kept.append(line)
    return "".join(kept)
