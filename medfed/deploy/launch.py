"""What `medfed server`, `medfed site` and `medfed run` do, with kits from `medfed provision`.

* `serve`: the coordinating centre's SuperLink with TLS and SuperNode authentication; every
  site's public key from the server kit is registered; it runs until SIGTERM/SIGINT and then
  stops its whole process tree.
* `run_site`: one hospital's SuperNode with the kit's root certificate and authentication key,
  and a node config built from the kit's ``site.toml`` (paths resolved against the kit, the
  data file checked before anything starts).
* `submit`: stages the medfed app, submits a run with its settings (``site-data own``) and
  waits for it, printing its status; with ``resume`` it continues a run directory.

``insecure`` (plain HTTP, no node authentication) must be asked for explicitly and warns.
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

from medfed.config import RunConfig
from medfed.constants import RUN_DIR_MARK, NodeConfigKey
from medfed.deploy import processes as proc
from medfed.deploy.provision import (
    AUTH_KEY,
    CA_CERT,
    SERVER_CERT,
    SERVER_JSON,
    SERVER_KEY,
    SITE_TOML,
    SUPERNODE_KEYS_DIR,
)
from medfed.exceptions import ConfigError, DataError, FederationError

log = logging.getLogger("medfed.deploy")
INSECURE_WARNING = ("--insecure: traffic is NOT encrypted and ANY SuperNode may join (no TLS, no SuperNode "
                    "authentication). Use only on a closed test network.")


class Stop(Exception):
    """SIGTERM or SIGINT arrived: stop the processes this command started."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise Stop(signal.Signals(signum).name)


def _on_signals() -> None:
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ConfigError(f"{what} {path} not found: is this a kit made by `medfed provision`?")
    return path


def _check_not_expired(cert_file: Path) -> None:
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    if cert.not_valid_after_utc <= dt.datetime.now(dt.UTC):
        raise ConfigError(f"certificate {cert_file} expired on {cert.not_valid_after_utc:%Y-%m-%d}; provision new kits")


def _hold(started: list[proc.Started], on_exit: Callable[[], None] | None = None) -> None:
    """Block until a signal arrives or a process exits; then stop every process tree."""
    _on_signals()
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
    def read(cls, folder: Path) -> ServerKit:
        info = _need(folder / SERVER_JSON, "server kit file")
        import json

        raw = json.loads(info.read_text())
        for name in (CA_CERT, SERVER_CERT, SERVER_KEY):
            _need(folder / name, "server kit file")
        return cls(folder.resolve(), list(raw["sites"]), str(raw["server_address"]))

    def site_key(self, site: str) -> Path:
        return _need(self.folder / SUPERNODE_KEYS_DIR / f"{site}.pub", f"site {site}'s SuperNode public key")


def serve(kit_dir: Path, *, host: str, port: int, workdir: Path | None, insecure: bool,
          say: Callable[[str], None] = print) -> None:
    """Start the SuperLink, register the sites' keys, and hold until stopped."""
    kit = ServerKit.read(kit_dir)
    work = (workdir or kit.folder / "state").resolve()
    work.mkdir(parents=True, exist_ok=True)
    if insecure:
        say(f"WARNING {INSECURE_WARNING}")
        certs = None
    else:
        _check_not_expired(kit.folder / SERVER_CERT)
        certs = (kit.folder / CA_CERT, kit.folder / SERVER_CERT, kit.folder / SERVER_KEY)
    command = proc.superlink_command(host=host, port=port, database=work / "superlink.db", certs=certs)
    link = proc.start("SuperLink", command, env=proc.flower_env(work / "flwr-superlink"), log=work / "superlink.log",
                      cwd=work)
    try:
        local = f"127.0.0.1:{port}" if host in ("0.0.0.0", "::", "127.0.0.1") else f"{host}:{port}"
        proc.wait_healthy(local, None if insecure else kit.folder / CA_CERT, timeout=120, proc=link)
        cli_home = work / "flwr-cli"
        proc.write_cli_config(cli_home, local, None if insecure else kit.folder / CA_CERT)
        if not insecure:
            for site in kit.sites:
                say(f"site {site}: SuperNode key {proc.register_supernode(kit.site_key(site), site, cli_home)}")
        say(f"SuperLink ready on {host}:{port} (pid {link.pid}; {'INSECURE' if insecure else 'TLS, SuperNode authentication'}); "
            f"log {link.log}. Stop with Ctrl-C or SIGTERM.")
    except BaseException:
        proc.stop_tree(link.pid)
        raise
    _hold([link])


# ---------------------------------------------------------------------------------------- site

def site_node_config(kit_dir: Path, data: str | None) -> dict[str, object]:
    """The node config of a site from its kit's site.toml: relative paths resolved against the kit,
    the data file validated (a clear error before anything starts)."""
    from medfed.data.medmnist import load_medmnist

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
        raise ConfigError(f"site {config[NodeConfigKey.SITE_NAME]}: no data file: set data-path in {toml_file} or pass --data")
    for key in (NodeConfigKey.DATA_PATH, NodeConfigKey.LEDGER_PATH, NodeConfigKey.SIGNING_KEY):
        path = Path(str(config[key])).expanduser()
        config[key] = str(path if path.is_absolute() else (kit_dir / path).resolve())
    try:
        data_file = load_medmnist(str(config[NodeConfigKey.DATA_PATH]), download=False)
    except DataError as exc:
        raise DataError(f"site {config[NodeConfigKey.SITE_NAME]}: {exc}") from None
    config[NodeConfigKey.DATA_PATH] = str(data_file.path)
    Path(str(config[NodeConfigKey.LEDGER_PATH])).parent.mkdir(parents=True, exist_ok=True)
    return config


CLIENTAPP_START = ("warm", "fresh")


def run_site(kit_dir: Path, *, data: str | None, superlink: str, workdir: Path | None, insecure: bool,
             clientapp_start: str = "warm", say: Callable[[str], None] = print) -> None:
    """Start this site's SuperNode and hold until stopped. ``clientapp_start`` "warm": its
    ClientApps are forked from a process that imported the libraries once (`medfed.deploy.warm_exec`);
    "fresh": Flower's default, a new ``flwr-clientapp`` process per message."""
    if clientapp_start not in CLIENTAPP_START:
        raise ConfigError(f"--clientapp-start must be one of {', '.join(CLIENTAPP_START)}; got {clientapp_start!r}")
    if clientapp_start == "warm" and not hasattr(os, "fork"):
        raise ConfigError("--clientapp-start warm forks ClientApp processes, which this system cannot do; "
                          "use --clientapp-start fresh")
    kit = kit_dir.resolve()
    proc.check_address(superlink)
    node_config = site_node_config(kit, data)
    work = (workdir or kit / "state").resolve()
    if insecure:
        say(f"WARNING {INSECURE_WARNING}")
        root, key = None, None
    else:
        root, key = _need(kit / CA_CERT, "site kit file"), _need(kit / AUTH_KEY, "site kit file")
    runtime_port = proc.free_port()
    secret = proc.write_superexec_secret(work / "superexec.secret") if clientapp_start == "warm" else None
    command = proc.supernode_command(superlink=superlink, node_config=node_config, runtime_port=runtime_port,
                                     root_certificate=root, auth_key=key, superexec_secret=secret)
    env = proc.flower_env(work / "flwr-supernode")
    site = node_config[NodeConfigKey.SITE_NAME]
    node = proc.start(f"SuperNode {site}", command, env=env, log=work / "supernode.log", cwd=work)
    started = [node]
    if secret is not None:
        started.append(proc.start(f"SuperExec {site}", proc.warm_exec_command(
            runtime_port=runtime_port, supernode_pid=node.pid, superexec_secret=secret),
            env=env, log=work / "superexec.log", cwd=work))
    say(f"site {site}: SuperNode started (pid {node.pid}) dialling {superlink} "
        f"({'INSECURE' if insecure else 'TLS, authenticated'}); data {node_config[NodeConfigKey.DATA_PATH]}; "
        f"ledger {node_config[NodeConfigKey.LEDGER_PATH]}; ClientApps {clientapp_start} "
        f"({'forked from a pre-imported process, pid ' + str(started[1].pid) if secret else 'one new process per message'}); "
        f"logs {', '.join(str(s.log) for s in started)}")
    _hold(started)


# ---------------------------------------------------------------------------------------- run

def run_settings(cfg: RunConfig, kit: ServerKit | None) -> RunConfig:
    """The settings a deployment run is submitted with: the sites' own data, one arm, absolute paths."""
    from medfed.data.medmnist import resolve_data_path

    num_sites = cfg.num_sites if kit is None else len(kit.sites)
    return cfg.replace(site_data="own", baselines="none", num_sites=num_sites,
                       min_sites=min(cfg.min_sites, num_sites),
                       data=str(resolve_data_path(cfg.data, download=False)),
                       out_dir=str(Path(cfg.out_dir).expanduser().resolve()))


def write_run_config(cfg: RunConfig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k} = {proc.toml_value(v)}\n" for k, v in cfg.to_flat().items()))
    return path


def submit(cfg: RunConfig, *, superlink: str, ca_file: Path | None, workdir: Path, poll: float = 3.0,
           say: Callable[[str], None] = print) -> tuple[str, Path | None]:
    """Submit the run and wait for it; returns its final status and run directory (if it finished)."""
    proc.check_address(superlink)
    workdir = workdir.resolve()
    cli_home = workdir / "flwr-cli"
    proc.write_cli_config(cli_home, superlink, ca_file)
    app = proc.stage_app(workdir / "app")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
    run_id = proc.submit_run(app, write_run_config(cfg, workdir / f"run-config-{stamp}.toml"), cli_home)
    say(f"submitted Flower run {run_id} to {superlink}; waiting (Ctrl-C stops the run)")
    _on_signals()
    status, last = "", ""
    try:
        while not status.startswith("finished"):
            time.sleep(poll)
            status = proc.run_status(run_id, cli_home)
            if status != last:
                say(f"run {run_id}: {status}")
                last = status
    except Stop:
        proc.stop_run(run_id, cli_home)
        say(f"run {run_id} stopped")
        status = "finished:stopped"
    text = proc.run_log(run_id, cli_home)
    log_file = workdir / "logs" / f"run-{run_id}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.write_text(text)
    marks = [Path(line.split(RUN_DIR_MARK, 1)[1].strip()) for line in text.splitlines() if RUN_DIR_MARK in line]
    run_dir = marks[-1] if marks else None  # the last one: the finished directory, or the unfinished one to resume
    say(f"run {run_id}: {status}; ServerApp log {log_file}" + (f"; run directory {run_dir}" if run_dir else ""))
    return status, run_dir
