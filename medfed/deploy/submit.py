"""``medfed run``: submit a federated run to the centre's SuperLink as the operator, wait for it, and find its
run directory.

The run's settings get the deployment's own (`run_settings`: the sites' registry from the server kit,
``site-data own``, absolute output folder); `submit` stages the app exactly as `medfed export-app` bundles it,
submits it with Flower's ``flwr run`` presenting the operator's client certificate, follows its status, keeps
the ServerApp's log, and reads the run directory the ServerApp recorded under ``out-dir`` for this Flower run
id (`medfed.experiment.run_dir.flower_run_dir`).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path

from medfed.config import RunConfig
from medfed.deploy import processes as proc
from medfed.deploy.launch import ServerKit, Stop, private_umask, stop_on_signals
from medfed.experiment.run_dir import flower_run_dir


def run_settings(cfg: RunConfig, kit: ServerKit, *, insecure: bool = False) -> RunConfig:
    """The settings a deployment run is submitted with: the sites' own data, one arm, absolute paths,
    and the centre's registry of SuperNode keys (``site-keys``; not for an insecure SuperLink, whose
    nodes prove no key), from which the ServerApp tells which node is which site."""
    from medfed.data.medmnist import resolve_data_path

    num_sites = len(kit.sites)
    return cfg.replace(site_data="own", baselines="none", num_sites=num_sites,
                       min_sites=min(cfg.federation.min_sites, num_sites),
                       data=str(resolve_data_path(cfg.dataset.source, download=False)),
                       out_dir=str(Path(cfg.output.out_dir).expanduser().resolve()),
                       site_keys="" if insecure else kit.site_keys_setting())


def write_run_config(cfg: RunConfig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k} = {proc.toml_value(v)}\n" for k, v in cfg.to_flat().items()))
    return path


def submit(cfg: RunConfig, *, superlink: str, ca_file: Path | None, workdir: Path, poll: float = 3.0,
           client_cert: tuple[Path, Path] | None = None, say: Callable[[str], None] = print) -> tuple[str, Path | None]:
    """Submit the run (presenting the operator's ``client_cert``, or none to an insecure SuperLink) and
    wait for it; returns its final status and run directory (if it finished)."""
    private_umask()
    proc.check_address(superlink)
    workdir = workdir.resolve()
    cli_home = proc.ControlConnection(workdir / "flwr-cli", client_cert)
    proc.write_cli_config(cli_home.flwr_home, superlink, ca_file)
    app = proc.stage_app(workdir / "app")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
    run_id = proc.submit_run(app, write_run_config(cfg, workdir / f"run-config-{stamp}.toml"), cli_home)
    say(f"submitted Flower run {run_id} to {superlink}; waiting (Ctrl-C stops the run)")
    stop_on_signals()
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
    # the ServerApp's record, when this machine shares the centre's out-dir (else its log names the directory)
    folders = [Path(cfg.output.out_dir)]
    if cfg.deployment.resume_from:  # a resumed run records beside the directory it continues
        folders.append(Path(cfg.deployment.resume_from).parent)
    found = [d for d in (flower_run_dir(folder, int(run_id)) for folder in folders) if d is not None]
    run_dir = found[0] if found else None  # finished, or the unfinished one to resume
    say(f"run {run_id}: {status}; ServerApp log {log_file}" + (f"; run directory {run_dir}" if run_dir else ""))
    return status, run_dir
