"""What `medfed server`, `medfed site` and `medfed run` do, with kits from `medfed provision`.

* `serve`: the coordinating centre's SuperLink behind mutual TLS and route authorization
  (`medfed.deploy.gateway`), SuperNode authentication on, a SuperExec for ServerApps holding the
  gateway's secret; every site's public key from the server kit is registered with the operator's
  certificate; it runs until SIGTERM/SIGINT and then stops its whole process tree.
* `run_site`: one hospital's SuperNode presenting the kit's client certificate, with the kit's
  root certificate and authentication key, and a node config built from the kit's ``site.toml``
  (paths resolved against the kit, the data file checked before anything starts).
* `submit`: stages the medfed app, submits a run with its settings (``site-data own``) with the
  operator's certificate and waits for it, printing its status; with ``resume`` it continues a
  run directory.

``insecure`` (plain HTTP, no authentication of anyone) must be asked for explicitly and warns.
Every process runs with umask 077: what it writes is readable by its owner only.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from cryptography import x509

from medfed.constants import NodeConfigKey
from medfed.deploy import processes as proc
from medfed.deploy.approval import approvals_file, load_approvals
from medfed.deploy.provision import (
    AUTH_KEY,
    CA_CERT,
    OPERATOR_CERT,
    OPERATOR_KEY,
    SERVER_CERT,
    SERVER_JSON,
    SERVER_KEY,
    SITE_CERT,
    SITE_KEY,
    SITE_TOML,
    SUPERNODE_KEYS_DIR,
)
from medfed.deploy.run_log import run_log_file
from medfed.exceptions import ConfigError, DataError, FederationError
from medfed.flower_patches.client_tls import client_certificate_env

log = logging.getLogger("medfed.deploy")
INSECURE_WARNING = ("--insecure: traffic is NOT encrypted and ANYONE who reaches the port may join, submit runs "
                    "and read every run (no TLS, no client certificates, no SuperNode authentication). Use only on a "
                    "closed test network.")
EXPIRY_WARNING_DAYS = 30


class Stop(Exception):
    """SIGTERM or SIGINT arrived: stop the processes this command started."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise Stop(signal.Signals(signum).name)


def stop_on_signals() -> None:
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ConfigError(f"{what} {path} not found: is this a kit made by `medfed provision`?")
    return path


def check_certificates(cert_files: list[Path], say: Callable[[str], None], *,
                       now: dt.datetime | None = None, warn_days: int = EXPIRY_WARNING_DAYS) -> None:
    """Refuse an expired certificate; warn about one that expires within ``warn_days``."""
    now = now or dt.datetime.now(dt.UTC)
    for cert_file in cert_files:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        ends = cert.not_valid_after_utc
        if ends <= now:
            raise ConfigError(f"certificate {cert_file} expired on {ends:%Y-%m-%d}; provision new kits")
        if ends - now <= dt.timedelta(days=warn_days):
            say(f"WARNING certificate {cert_file} expires on {ends:%Y-%m-%d} ({(ends - now).days} days left): "
                "issue new kits before then, or the federation stops")


def private_umask() -> None:
    """Files and folders this process and the processes it starts create: owner only (0600/0700)."""
    os.umask(0o077)


def _hold(started: list[proc.Started], on_exit: Callable[[], None] | None = None) -> None:
    """Block until a signal arrives or a process exits; then stop every process tree."""
    stop_on_signals()
    try:
        while True:
            for s in started:
                if s.process.poll() is not None:
                    raise FederationError(f"{s.name} exited with code {s.process.returncode}; see {s.log}")
            time.sleep(0.5)
    except Stop:
        pass
    finally:
        for s in reversed(started):
            proc.stop_tree(s.pid)
        if on_exit is not None:
            on_exit()


# ---------------------------------------------------------------------------------------- server

@dataclass(frozen=True)
class ServerKit:
    folder: Path
    sites: list[str]
    server_address: str

    @classmethod
    def read(cls, folder: Path, *, insecure: bool = False) -> ServerKit:
        """The kit's description; its certificates and keys must be there unless ``insecure``."""
        info = _need(folder / SERVER_JSON, "server kit file")
        import json

        raw = json.loads(info.read_text())
        if not insecure:
            for name in (CA_CERT, SERVER_CERT, SERVER_KEY, OPERATOR_CERT, OPERATOR_KEY):
                _need(folder / name, "server kit file")
        return cls(folder.resolve(), list(raw["sites"]), str(raw["server_address"]))

    @property
    def operator_cert(self) -> Path:
        return self.folder / OPERATOR_CERT

    @property
    def operator_key(self) -> Path:
        return self.folder / OPERATOR_KEY

    def site_key(self, site: str) -> Path:
        return _need(self.folder / SUPERNODE_KEYS_DIR / f"{site}.pub", f"site {site}'s SuperNode public key")

    def site_keys_setting(self) -> str:
        """The ``site-keys`` run setting: each site's SuperNode key fingerprint, in site-id order."""
        from medfed.deploy.authorization import supernode_key_wire_bytes
        from medfed.server.grid import key_fingerprint

        return ",".join(f"{site}={key_fingerprint(supernode_key_wire_bytes(self.site_key(site).read_bytes()))}"
                        for site in self.sites)


def _check_port_free(host: str, port: int) -> None:
    """A clear error now, not a false "ready" and an exit later, when the port is taken."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise FederationError(f"cannot listen on {host}:{port}: {exc.strerror} (another SuperLink or "
                                  "program already uses the port; stop it or pass --port)") from None


def serve(kit_dir: Path, *, host: str, port: int, workdir: Path | None, insecure: bool,
          say: Callable[[str], None] = print) -> None:
    """Start the SuperLink (behind the mutual-TLS gateway), register the sites' keys, and hold until stopped."""
    private_umask()
    kit = ServerKit.read(kit_dir, insecure=insecure)
    work = (workdir or kit.folder / "state").resolve()
    work.mkdir(parents=True, exist_ok=True)
    _check_port_free(host, port)
    local = f"127.0.0.1:{port}" if host in ("0.0.0.0", "::", "127.0.0.1") else f"{host}:{port}"
    env = proc.flower_env(work / "flwr-superlink")
    if insecure:
        say(f"WARNING {INSECURE_WARNING}")
        link = proc.start("SuperLink", proc.insecure_superlink_command(host=host, port=port,
                                                                        database=work / "superlink.db"),
                          env=env, log=work / "superlink.log", cwd=work)
        started = [link]
        conn = proc.ControlConnection(work / "flwr-cli")
    else:
        check_certificates([kit.folder / CA_CERT, kit.folder / SERVER_CERT, kit.operator_cert], say)
        runtime_port = proc.free_port()
        secret = proc.write_superexec_secret(work / "superexec.secret")
        files = proc.GatewayFiles(kit.folder / CA_CERT, kit.folder / SERVER_CERT, kit.folder / SERVER_KEY,
                                  kit.folder / SUPERNODE_KEYS_DIR)
        link = proc.start("SuperLink", proc.gateway_command(host=host, port=port, runtime_port=runtime_port,
                                                            database=work / "superlink.db", files=files,
                                                            superexec_secret=secret),
                          env=env, log=work / "superlink.log", cwd=work)
        started = [link]
        conn = proc.ControlConnection(work / "flwr-cli", (kit.operator_cert, kit.operator_key))
    try:
        proc.wait_healthy(local, None if insecure else kit.folder / CA_CERT, timeout=120, proc=link,
                          client_cert=conn.client_cert)
        if not insecure:
            started.append(proc.start("ServerApp SuperExec", proc.serverapp_superexec_command(
                runtime_port=runtime_port, gateway_pid=link.pid, superexec_secret=secret),
                env=env, log=work / "superexec.log", cwd=work))
        proc.write_cli_config(conn.flwr_home, local, None if insecure else kit.folder / CA_CERT)
        if not insecure:
            for site in kit.sites:
                say(f"site {site}: SuperNode key {proc.register_supernode(kit.site_key(site), site, conn)}")
        say(f"SuperLink ready on {host}:{port} (pid {link.pid}; "
            f"{'INSECURE' if insecure else 'mutual TLS: sites and the operator only, SuperNode authentication'}); "
            f"log {link.log}. Stop with Ctrl-C or SIGTERM.")
    except BaseException:
        for s in reversed(started):
            proc.stop_tree(s.pid)
        raise
    _hold(started)


# ---------------------------------------------------------------------------------------- site

def site_node_config(kit_dir: Path, data: str | None) -> dict[str, object]:
    """The node config of a site from its kit's site.toml: relative paths resolved against the kit,
    the data validated (a clear error before anything starts): a MedMNIST-style file is read whole; a labels
    table, datalist or class folders is read and checked row by row here, and its images are decoded and
    prepared into the site's cache (``cache-dir``, default ~/.cache/medfed/cases) at the first round, with the
    run's image settings."""
    from medfed.config import check_device_setting
    from medfed.data.datalists import is_table_source, read_source
    from medfed.data.medmnist import load_medmnist
    from medfed.data.table import ANY_CLASSES
    from medfed.devices import resolve_device

    toml_file = _need(kit_dir / SITE_TOML, "site kit file")
    try:
        raw = tomllib.loads(toml_file.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{toml_file}: not valid TOML ({exc})") from None
    config: dict[str, object] = dict(raw)
    for key in (NodeConfigKey.SITE_NAME, NodeConfigKey.SITE_ID, NodeConfigKey.LEDGER_PATH, NodeConfigKey.SIGNING_KEY):
        if key not in config:
            raise ConfigError(f"{toml_file}: missing {key!r}")
    if data:  # given on the command line: relative to where the command runs
        config[NodeConfigKey.DATA_PATH] = str(Path(data).expanduser().resolve())
    if NodeConfigKey.DATA_PATH not in config or str(config[NodeConfigKey.DATA_PATH]).startswith("/path/to/"):
        raise ConfigError(
            f"site {config[NodeConfigKey.SITE_NAME]}: no data file: set data-path in {toml_file} or pass --data"
        )
    for key in (NodeConfigKey.DATA_PATH, NodeConfigKey.LEDGER_PATH, NodeConfigKey.SIGNING_KEY,
                NodeConfigKey.CACHE_DIR):
        if key not in config:
            continue
        path = Path(str(config[key])).expanduser()
        config[key] = str(path if path.is_absolute() else (kit_dir / path).resolve())
    try:
        if is_table_source(str(config[NodeConfigKey.DATA_PATH])):
            # the run's classes come with its messages: a hospital may lack a class, or hold one only
            read_source(str(config[NodeConfigKey.DATA_PATH]), num_classes=ANY_CLASSES)
        else:
            config[NodeConfigKey.DATA_PATH] = str(load_medmnist(str(config[NodeConfigKey.DATA_PATH]),
                                                                download=False).path)
    except DataError as exc:
        raise DataError(f"site {config[NodeConfigKey.SITE_NAME]}: {exc}") from None
    device = str(config.get(NodeConfigKey.DEVICE, "auto"))
    check_device_setting(device, where=f"{toml_file}: device")
    resolve_device(device, where=f"site {config[NodeConfigKey.SITE_NAME]}: node config device")  # GPU missing: now
    Path(str(config[NodeConfigKey.LEDGER_PATH])).parent.mkdir(parents=True, exist_ok=True)
    return config


CLIENTAPP_START = ("warm", "fresh")


def probe_superlink(host: str, port: int, *, ca_file: Path | None, client_cert: tuple[Path, Path] | None,
                    timeout: float = 5.0) -> str:
    """One look at the SuperLink before the SuperNode starts dialling it (the SuperNode itself
    retries forever and says little). Returns a line to print; raises FederationError when the two
    cannot ever talk: a TLS site dialling a plain-HTTP SuperLink or the reverse, or a SuperLink
    whose certificate is not of this federation. A SuperLink that is not up yet is fine."""
    import socket
    import ssl

    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        return f"SuperLink {host}:{port} not reachable yet ({exc.strerror or exc}); the SuperNode keeps trying"
    with raw:
        if ca_file is None:
            raw.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            try:
                first = raw.recv(5)
            except OSError:
                first = b""
            if not first.startswith(b"HTTP/"):
                raise FederationError(f"the SuperLink at {host}:{port} does not speak plain HTTP (it expects TLS): "
                                      "start this site without --insecure")
            return f"SuperLink {host}:{port} answers plain HTTP"
        context = ssl.create_default_context(cafile=str(ca_file))
        if client_cert is not None:
            context.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
        try:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                tls.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                status = tls.recv(64).split(b"\r\n", 1)[0].decode("latin-1", "replace")
        except ssl.SSLCertVerificationError as exc:
            raise FederationError(f"the SuperLink at {host}:{port} is not this federation's ({exc.verify_message}): "
                                  f"check --superlink and the kit's {CA_CERT}") from None
        except ssl.SSLError as exc:
            if "WRONG_VERSION_NUMBER" in str(exc) or "record layer failure" in str(exc):
                raise FederationError(f"the SuperLink at {host}:{port} does not speak TLS (it runs --insecure); "
                                      "a hospital should not join it, or both must be --insecure") from None
            raise FederationError(f"the SuperLink at {host}:{port} refused this site's TLS handshake ({exc.reason}): "
                                  "is this kit from the same federation?") from None
        except OSError as exc:
            return f"SuperLink {host}:{port}: {exc}; the SuperNode keeps trying"
    return f"SuperLink {host}:{port} answers over mutual TLS ({status})"


def run_site(kit_dir: Path, *, data: str | None, superlink: str, workdir: Path | None, insecure: bool,
             clientapp_start: str = "warm", say: Callable[[str], None] = print) -> None:
    """Start this site's SuperNode and medfed's SuperExec, and hold until stopped. Every ClientApp
    first checks its app against the kit's approved apps and records the run in the kit's run log
    (`medfed.deploy.clientapp_gate`). ``clientapp_start`` "warm": ClientApps are forked from a
    process that imported the libraries once (`medfed.deploy.warm_exec`); "fresh": a new gated
    process per message."""
    if clientapp_start not in CLIENTAPP_START:
        raise ConfigError(f"--clientapp-start must be one of {', '.join(CLIENTAPP_START)}; got {clientapp_start!r}")
    if clientapp_start == "warm" and not hasattr(os, "fork"):
        raise ConfigError("--clientapp-start warm forks ClientApp processes, which this system cannot do; "
                          "use --clientapp-start fresh")
    private_umask()
    kit = kit_dir.resolve()
    host, port = proc.check_address(superlink)
    node_config = site_node_config(kit, data)
    work = (workdir or kit / "state").resolve()
    client_env: dict[str, str] = {}
    client_cert: tuple[Path, Path] | None = None
    if insecure:
        say(f"WARNING {INSECURE_WARNING}")
        root, key = None, None
    else:
        root, key = _need(kit / CA_CERT, "site kit file"), _need(kit / AUTH_KEY, "site kit file")
        client_cert = (_need(kit / SITE_CERT, "site kit file"), _need(kit / SITE_KEY, "site kit file"))
        check_certificates([root, client_cert[0]], say)
        client_env = client_certificate_env(*client_cert)
    say(probe_superlink(host, port, ca_file=root, client_cert=client_cert))
    runtime_port = proc.free_port()
    approvals = load_approvals(approvals_file(kit))  # the app gate's allow-list: a clear error before anything starts
    secret = proc.write_superexec_secret(work / "superexec.secret")
    command = proc.supernode_command(superlink=superlink, node_config=node_config, runtime_port=runtime_port,
                                     root_certificate=root, auth_key=key, superexec_secret=secret)
    env = proc.flower_env(work / "flwr-supernode") | client_env
    site = node_config[NodeConfigKey.SITE_NAME]
    node = proc.start(f"SuperNode {site}", command, env=env, log=work / "supernode.log", cwd=work)
    started = [node]
    started.append(proc.start(f"SuperExec {site}", proc.warm_exec_command(
        runtime_port=runtime_port, supernode_pid=node.pid, superexec_secret=secret, approved_apps=approvals_file(kit),
        run_log=run_log_file(kit), site=str(site), clientapp_start=clientapp_start),
        env=env, log=work / "superexec.log", cwd=work))
    say(f"site {site}: SuperNode started (pid {node.pid}) dialling {superlink} "
        f"({'INSECURE' if insecure else 'mutual TLS, authenticated'}); data {node_config[NodeConfigKey.DATA_PATH]}; "
        f"ledger {node_config[NodeConfigKey.LEDGER_PATH]}; ClientApps {clientapp_start} "
        f"({'forked from a pre-imported process' if clientapp_start == 'warm' else 'one new process per message'}, "
        f"SuperExec pid {started[1].pid}; {len(approvals)} approved app(s) in {approvals_file(kit)}, "
        f"run log {run_log_file(kit)}); "
        f"logs {', '.join(str(s.log) for s in started)}")
    _hold(started)
