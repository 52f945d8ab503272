"""`medfed site approve | log`: a site approves the apps it runs and reads its run log.

``medfed site`` is a command group: without a subcommand it starts the site (its callback, the
``site`` command of `medfed.deploy.commands`); ``approve`` and ``log`` act on the kit only and start
nothing (`medfed.deploy.approval`).
"""

from __future__ import annotations

import getpass
import sys
from collections.abc import Callable
from pathlib import Path

import typer
from rich.console import Console

from medfed.exceptions import ConfigError, MedfedError, RunLogError

console = Console(stderr=True)


def _fail(exc: MedfedError, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {exc}", highlight=False)
    raise typer.Exit(code=code) from None


def _kit(ctx: typer.Context, kit: str) -> Path:
    """This subcommand's --kit, or the group's (`medfed site --kit K approve ...`); must be a site kit."""
    from medfed.deploy.provision import SITE_TOML

    if not kit and ctx.parent is not None:
        kit = str(ctx.parent.params.get("kit") or "")
    if not kit:
        raise ConfigError("--kit (this site's kit folder, kits/<site> from `medfed provision`) is needed")
    folder = Path(kit).expanduser()
    if not (folder / SITE_TOML).is_file():
        raise ConfigError(f"{folder / SITE_TOML} not found: --kit must be a site kit made by `medfed provision`")
    return folder.resolve()


def _interactive() -> bool:
    return sys.stdin.isatty()


def approve(
    ctx: typer.Context,
    kit: str = typer.Option("", "--kit", help="This site's kit folder (kits/<site> from `medfed provision`)."),
    fab: str = typer.Option("", "--fab", help="The app bundle (.fab) to approve, e.g. the file the coordinating "
                            "centre sends; approved by the sha256 of its bytes."),
    release: bool = typer.Option(False, "--release", help="Approve the app that `medfed run` of this installed "
                                 "medfed submits (the same bytes only if the centre builds it from the same release "
                                 "with the same zlib; --fab does not depend on that)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Approve without asking (needed when not run in a terminal)."),
    by: str = typer.Option("", "--by", help="Who approves, recorded with the approval (default: your user name)."),
) -> None:
    """Show an app's files, their sha256 and its medfed version, and approve it for this site.

    The site's ClientApps run only the apps in its approved list (KIT/approved-apps.json)."""
    from medfed.deploy.approval import add_approval, approvals_file, describe_fab, load_approvals, release_app_fab

    try:
        folder = _kit(ctx, kit)
        if bool(fab) == release:
            raise ConfigError("give exactly one of --fab FILE (an app bundle) or --release (this medfed's own app)")
        if fab:
            try:
                data = Path(fab).expanduser().read_bytes()
            except OSError as exc:
                raise ConfigError(f"--fab {fab}: cannot be read ({exc.strerror or exc})") from None
        else:
            data = release_app_fab()
        description = describe_fab(data)
        for line in description.lines():
            typer.echo(line)
        target = approvals_file(folder)
        current = {a.sha256: a for a in load_approvals(target)} if target.exists() else {}
        if description.sha256 in current:
            known = current[description.sha256]
            typer.echo(f"already approved on {known.approved_at} by {known.approved_by} ({target})")
            return
        if not yes:
            if not _interactive():
                raise ConfigError("not approved: confirm in a terminal, or pass --yes to approve without a prompt")
            if not typer.confirm(f"Approve app sha256:{description.sha256} for the site in {folder}?", default=False):
                typer.echo("not approved")
                raise typer.Exit(code=1)
        entry, _ = add_approval(target, data, by or getpass.getuser())
    except MedfedError as exc:
        _fail(exc)
    typer.echo(f"approved app sha256:{entry.sha256} ({description.project} {entry.medfed_version}, {entry.files} "
               f"files) by {entry.approved_by} at {entry.approved_at}; recorded in {target}")


def log(
    ctx: typer.Context,
    kit: str = typer.Option("", "--kit", help="This site's kit folder (kits/<site> from `medfed provision`)."),
) -> None:
    """Print this site's run log and verify its hash chain.

    One entry per run the site executed or refused; exit code 1 if an entry was edited, deleted,
    inserted or moved."""
    from medfed.deploy.run_log import run_log_file, run_log_head, verify_run_log

    try:
        path = run_log_file(_kit(ctx, kit))
        entries = verify_run_log(path)
    except RunLogError as exc:
        _fail(exc, code=1)
    except MedfedError as exc:
        _fail(exc)
    if not entries:
        typer.echo(f"no runs recorded yet ({path})")
        return
    for e in entries:
        config = (e["run_config_sha256"] or "-")[:16]
        reason = f"  ({e['reason']})" if e["reason"] else ""
        typer.echo(f"{e['seq']:>5}  {e['time']}  run {e['run_id']}  {e['outcome']:<8}  app sha256:{e['app_sha256']}  "
                   f"config sha256:{config}…{reason}")
    typer.echo(f"chain verified: {len(entries)} entries in {path}; last hash {run_log_head(entries)}")


def site_group(start: Callable[..., None]) -> typer.Typer:
    """``medfed site``: ``start`` (which takes a ``typer.Context`` first and returns at once when a
    subcommand was given) runs the site when no subcommand is given; ``approve`` and ``log``."""
    group = typer.Typer(add_completion=False)
    group.callback(invoke_without_command=True)(start)
    group.command("approve")(approve)
    group.command("log")(log)
    return group
