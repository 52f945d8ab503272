"""`medfed provision | server | site | run`: the deployment commands, added to the main CLI.

They translate options into `medfed.deploy` calls; bad input ends with a one-line error
naming the option and the rule, exit code 2, and nothing written.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from medfed.deploy.processes import DEFAULT_PORT
from medfed.deploy.site_commands import site_group
from medfed.exceptions import ConfigError, MedfedError

console = Console(stderr=True)


def _fail(exc: MedfedError) -> None:
    console.print(f"[bold red]error:[/] {exc}", highlight=False)
    raise typer.Exit(code=2) from None


def provision(
    sites: str = typer.Option(..., "--sites", help="Comma-separated site names, e.g. h1,h2,h3."),
    out: str = typer.Option("kits", "--out",
                            help="Folder that receives ca/, server/, one kit per site, manifest.json."),
    server_address: str = typer.Option("127.0.0.1", "--server-address", help="Host name or IP address the sites "
                                       "dial to reach the SuperLink (also put in the certificate)."),
    san: str = typer.Option("", "--san", help="Comma-separated extra DNS names / IP addresses of the SuperLink's "
                            "certificate; added to --server-address and the loopback names (localhost, 127.0.0.1, "
                            "::1) the centre's own processes use."),
    days: int = typer.Option(365, "--days", help="Lifetime of the certificates in days."),
    dp_epsilon: float = typer.Option(8.0, "--dp-epsilon", help="Lifetime epsilon written into each site's template."),
    dp_delta: float = typer.Option(1e-5, "--dp-delta", help="Delta written into each site's template."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out folder (its keys are lost)."),
) -> None:
    """Create the federation's CA, the SuperLink's TLS certificate, and one kit per site (SuperNode
    authentication key pair, ledger-signing key, node config template, start command)."""
    from medfed.deploy.provision import ProvisionPlan
    from medfed.deploy.provision import provision as make_kits

    try:
        plan = ProvisionPlan(sites=[s.strip() for s in sites.split(",") if s.strip()], out=Path(out),
                             server_address=server_address, sans=[s.strip() for s in san.split(",") if s.strip()],
                             days=days, dp_epsilon=dp_epsilon, dp_delta=dp_delta)
        root = make_kits(plan, overwrite=force)
    except MedfedError as exc:
        _fail(exc)
    console.print(f"wrote {root}: ca/ (keep ca.key offline), server/, {', '.join(plan.sites)}; "
                  f"hand each site its own folder only", highlight=False)


def server(
    kit: str = typer.Option(..., "--kit", help="The server kit folder (kits/server from `medfed provision`)."),
    host: str = typer.Option("0.0.0.0", "--host", help="Address the SuperLink listens on."),
    port: int = typer.Option(DEFAULT_PORT, "--port", help="Port of the SuperLink (Fleet, Control and runtime APIs)."),
    workdir: str = typer.Option("", "--workdir", help="Folder for the SuperLink's state database and logs "
                                "(default: KIT/state; keep it across restarts: it holds the sites' registrations)."),
    insecure: bool = typer.Option(False, "--insecure", help="No TLS and no SuperNode authentication (test networks "
                                  "only; warns)."),
) -> None:
    """Run the coordinating centre's SuperLink with TLS and SuperNode authentication, every site in the kit
    registered; stops (with all its processes) on Ctrl-C or SIGTERM."""
    from medfed.deploy.launch import serve

    try:
        serve(Path(kit), host=host, port=port, workdir=Path(workdir) if workdir else None, insecure=insecure,
              say=_say)
    except MedfedError as exc:
        _fail(exc)


def site(
    ctx: typer.Context,
    kit: str = typer.Option("", "--kit", help="This site's kit folder (kits/<site> from `medfed provision`)."),
    data: str = typer.Option("", "--data", help="This site's own data: a labels table (.csv), a MONAI "
                             "datalist (.json), class folders or a MedMNIST-style .npz (default: data-path in the "
                             "kit's site.toml)."),
    superlink: str = typer.Option(f"127.0.0.1:{DEFAULT_PORT}", "--superlink", help="HOST:PORT of the SuperLink."),
    workdir: str = typer.Option("", "--workdir",
                                help="Folder for the SuperNode's logs and app cache (default: KIT/state)."),
    insecure: bool = typer.Option(False, "--insecure",
                                  help="No TLS and no authentication (test networks only; warns)."),
    clientapp_start: str = typer.Option("warm", "--clientapp-start", help="warm: fork each ClientApp from a process "
                                        "that imported torch, MONAI, opacus and peft once (medfed's own code still "
                                        "comes from the submitted app); fresh: a new process per message (seconds "
                                        "of imports each time). Either way each ClientApp first checks its app "
                                        "against the kit's approved apps (`medfed site approve`)."),
) -> None:
    """Run this hospital's SuperNode: it trusts the SuperLink by the kit's root certificate, proves who it is
    with the kit's key, runs only the apps the site approved, and trains on this site's own data; stops on
    Ctrl-C or SIGTERM. Subcommands: approve (an app), log (the runs this site executed or refused)."""
    if ctx.invoked_subcommand is not None:
        return  # `medfed site approve | log`: the subcommand runs, nothing starts
    if not kit:
        import click

        raise click.UsageError("Missing option '--kit'.", ctx)
    from medfed.deploy.launch import run_site

    try:
        run_site(Path(kit), data=data or None, superlink=superlink, workdir=Path(workdir) if workdir else None,
                 insecure=insecure, clientapp_start=clientapp_start, say=_say)
    except MedfedError as exc:
        _fail(exc)


def _say(text: str) -> None:
    if text.startswith("WARNING"):
        console.print(f"[bold yellow]{text}[/]", highlight=False)
    else:
        console.print(text, highlight=False)


RUN_DEFAULTS = {"baselines": "none"}  # a deployment run trains one arm: baselines are separate runs
# Settings `medfed run` takes from the deployment, not from flags (the server kit names the sites; one federated
# arm; the sites' own data), or that only a simulation has
SET_BY_THE_DEPLOYMENT = {"site_data", "resume_from", "client_cpus", "ledger_dir", "num_sites", "mode", "baselines",
                         "site_keys"}
NOT_FROM_A_FILE = ("resume-from", "mode", "ledger-dir", "client-cpus")  # the others `run_settings` overrides


def refuse_settings_a_deployment_sets(config: str) -> None:
    """A run.toml may not move a deployment run off its own arm, continue another run, or carry simulation-only
    settings (a run directory's own config.toml, which holds their defaults, passes).

    Raises:
        ConfigError: naming the file and the settings.
    """
    from medfed.config import RunConfig
    from medfed.config.run import read_toml

    defaults = RunConfig().to_flat()
    bad = sorted(k for k, v in read_toml(config).items() if k in NOT_FROM_A_FILE and v != defaults[k])
    if bad:
        raise ConfigError(f"config file {config!r}: {', '.join(bad)} cannot be set for a deployment run "
                          "(`medfed run` runs one federated arm on the sites of its kit; continue a run with --resume)")


def run(
    kit: str = "",
    superlink: str = "",
    resume: str = "",
    workdir: str = "",
    insecure: bool = False,
    config: str | None = None,
    **settings: Any,
) -> None:
    """Submit a federated run to a deployment (the SuperLink of `medfed server`) and wait for it.

    The sites train on their own data (site-data own); --data names the server's evaluation file.
    With --resume RUN_DIR the run continues after that directory's last completed round, with its settings."""
    from medfed.config import RunConfig
    from medfed.config.flags import settings_from_flags
    from medfed.deploy.launch import INSECURE_WARNING, ServerKit
    from medfed.deploy.submit import run_settings, submit
    from medfed.experiment.resume import load_round_checkpoint
    from medfed.selfsup.compat import check_methods_fit

    try:
        if not kit:
            raise ConfigError("--kit (the server kit: its sites, root certificate and operator certificate) is needed")
        server_kit = ServerKit.read(Path(kit), insecure=insecure)
        if insecure:
            _say(f"WARNING {INSECURE_WARNING}")
        address = superlink or f"{server_kit.server_address}:{DEFAULT_PORT}"
        if resume:
            given = sorted([k for k, v in settings.items() if v is not None] + (["config"] if config else []))
            if given:  # a resumed run keeps its own settings; say so rather than drop them silently
                _say("WARNING --resume continues with the run's own settings; ignoring "
                     + ", ".join(f"--{k.replace('_', '-')}" for k in given))
            checkpoint = load_round_checkpoint(Path(resume).expanduser())
            cfg = RunConfig.from_flat({**checkpoint.settings, "resume-from": str(Path(resume).expanduser().resolve())})
            _say(f"resuming {resume} after {checkpoint.phase.value} round {checkpoint.completed_round}")
        else:
            if config:
                refuse_settings_a_deployment_sets(config)
            cfg = run_settings(settings_from_flags(config, settings, defaults=RUN_DEFAULTS), server_kit,
                               insecure=insecure)
            check_methods_fit(cfg)  # refused here, not after the run was submitted
        work = Path(workdir) if workdir else server_kit.folder / "state"
        ca = None if insecure else server_kit.folder / "ca.crt"
        operator = None if insecure else (server_kit.operator_cert, server_kit.operator_key)
        status, _ = submit(cfg, superlink=address, ca_file=ca, workdir=work, client_cert=operator, say=_say)
    except MedfedError as exc:
        _fail(exc)
    if status != "finished:completed":
        raise typer.Exit(code=1)


def _run_signature() -> inspect.Signature:
    from medfed.config.flags import setting_parameters

    params = [
        inspect.Parameter("kit", inspect.Parameter.KEYWORD_ONLY, annotation=str, default=typer.Option(
            "", "--kit", help="The server kit folder (its sites, root certificate and operator certificate).")),
        inspect.Parameter("superlink", inspect.Parameter.KEYWORD_ONLY, annotation=str, default=typer.Option(
            "", "--superlink", help=f"HOST:PORT of the SuperLink (default: the kit's address, port {DEFAULT_PORT}).")),
        inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, annotation=str, default=typer.Option(
            "", "--resume",
            help="Continue this run directory after its last completed round (its settings are kept).")),
        inspect.Parameter("workdir", inspect.Parameter.KEYWORD_ONLY, annotation=str, default=typer.Option(
            "", "--workdir", help="Folder for the staged app, run settings and logs (default: KIT/state).")),
        inspect.Parameter("insecure", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
            False, "--insecure", help="Talk to an insecure SuperLink (no TLS; warns).")),
    ]
    # set by the deployment (sites from the kit, one federated arm, each site's own data), or simulation only
    params += setting_parameters(skip=SET_BY_THE_DEPLOYMENT, defaults=RUN_DEFAULTS)
    return inspect.Signature(params)


def split_sites(
    data: str = typer.Option(..., "--data", help="A MedMNIST flag or .npz to cut into site files, or a labels table "
                             "(.csv), datalist (.json) or class folders to cut into site tables."),
    sites: str = typer.Option("", "--sites", help="Comma-separated site names, e.g. h1,h2,h3 (natural: the table's "
                              "hospitals)."),
    out: str = typer.Option("sitedata", "--out", help="Folder that receives <site>/<flag>.npz (or "
                            "<site>/labels.csv) and sites.json."),
    partition: str = typer.Option("iid", "--partition", help="iid, dirichlet (label skew), quantity (size skew) or "
                                  "natural (a table's own site column)."),
    alpha: float = typer.Option(0.5, "--alpha", help="Dirichlet concentration for dirichlet/quantity."),
    seed: int = typer.Option(0, "--seed", help="Seed of the cut."),
    min_site_size: int = typer.Option(10, "--min-site-size", help="Fewest train images (table rows) a site may get."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out folder."),
) -> None:
    """Cut a MedMNIST file (or a labels table) into one file (table) per site, to rehearse a deployment on public
    data; a table's site tables point at its image files, nothing is copied."""
    from medfed.data.site_files import write_site_files

    try:
        files = write_site_files(data, [s.strip() for s in sites.split(",") if s.strip()], Path(out),
                                 partition=partition, alpha=alpha, seed=seed, min_site_size=min_site_size,
                                 overwrite=force)
    except MedfedError as exc:
        _fail(exc)
    for site, path in files.items():
        console.print(f"{site}: {path}", highlight=False)


def export_app(
    out: str = typer.Option("medfed.fab", "--out", help="File that receives the app bundle."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out file."),
) -> None:
    """Write the app bundle (FAB) that `medfed run` of this installed medfed submits, and print its sha256:
    hand it to the hospitals, who approve it with `medfed site approve --fab FILE` before the first run."""
    from medfed.deploy.approval import describe_fab, release_app_fab
    from medfed.files import replace_durably

    target = Path(out).expanduser()
    try:
        if target.exists() and not force:
            raise ConfigError(f"{target} already exists (pass --force to replace it)")
        fab = release_app_fab()
        replace_durably(target, lambda tmp: tmp.write_bytes(fab))
    except MedfedError as exc:
        _fail(exc)
    description = describe_fab(fab)
    console.print(f"wrote {target}: app sha256:{description.sha256} (medfed {description.medfed_version}, "
                  f"{len(description.files)} files)", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("provision")(provision)
    app.command("export-app")(export_app)
    app.command("split-sites")(split_sites)
    app.command("server")(server)
    app.add_typer(site_group(site), name="site")
    run.__signature__ = _run_signature()  # type: ignore[attr-defined]
    app.command("run")(run)
