"""`medfed provision | server | site | run`: the deployment commands, added to the main CLI.

They translate options into `medfed.deploy` calls; bad input ends with a one-line error
naming the option and the rule, exit code 2, and nothing written.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from medfed.exceptions import MedfedError

console = Console(stderr=True)


def _fail(exc: MedfedError) -> None:
    console.print(f"[bold red]error:[/] {exc}", highlight=False)
    raise typer.Exit(code=2) from None


def provision(
    sites: str = typer.Option(..., "--sites", help="Comma-separated site names, e.g. h1,h2,h3."),
    out: str = typer.Option("kits", "--out", help="Folder that receives ca/, server/, one kit per site, manifest.json."),
    server_address: str = typer.Option("127.0.0.1", "--server-address", help="Host name or IP address the sites "
                                       "dial to reach the SuperLink (also put in the certificate)."),
    san: str = typer.Option("localhost,127.0.0.1,::1", "--san",
                            help="Comma-separated extra DNS names / IP addresses of the SuperLink's certificate."),
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


def register(app: typer.Typer) -> None:
    app.command("provision")(provision)
