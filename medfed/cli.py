"""``medfed`` command line (typer + rich).

``medfed simulate`` runs an experiment on Flower's simulation runtime; its options are
generated from `RunConfig`, so defaults live in one place. Bad input ends with a one-line
error naming the setting or file and the rule, exit code 2, and no run directory.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from medfed import __version__
from medfed.config import RunConfig
from medfed.config.flags import setting_parameters, settings_from_flags
from medfed.deploy.commands import register as _register_deployment
from medfed.exceptions import ConfigError, MedfedError
from medfed.selfsup.registry import available_methods

app = typer.Typer(
    help="Federated self-supervised learning for medical imaging on Flower.", no_args_is_help=True, add_completion=False
)
console = Console(stderr=True)



def _simulate(verbose: bool = False, config: str | None = None, **settings: Any) -> None:
    from medfed.config.run import read_toml
    from medfed.experiment.prepare import with_natural_sites

    try:
        cfg = settings_from_flags(config, settings)
        given = settings.get("num_sites") is not None or bool(config and "num-sites" in read_toml(config))
        cfg = with_natural_sites(cfg, num_sites_given=given)
        _run_with_progress(cfg, verbose)
    except MedfedError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(code=2) from None


def _run_with_progress(cfg: RunConfig, verbose: bool) -> None:
    from medfed.data.partition import describe_sizes
    from medfed.experiment.arms import progress_units
    from medfed.simulations.launcher import simulate as run_simulation

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=False,
    )
    with progress:
        task = progress.add_task("preparing", total=progress_units(cfg))

        def listener(row: dict[str, Any]) -> None:
            if row.get("split") == "train":
                progress.update(task, advance=1, description=f"{row['arm']} {row['phase']} round {row['round']}")

        run_dir = run_simulation(cfg, listener=listener, verbose=verbose)
    summary = json.loads((run_dir / "summary.json").read_text())
    table = Table(title=f"test split of {cfg.dataset.source} ({run_dir})")
    table.add_column("arm", no_wrap=True)
    for col in ("AUC", "accuracy", "sensitivity", "specificity", "FPR", "wall s"):
        table.add_column(col)
    for name, arm in summary["arms"].items():
        t = arm["test"]
        cells = [f"{t[k]:.3f}" if t.get(k) is not None else "n/a"
                 for k in ("auc", "accuracy", "sensitivity", "specificity", "fpr")]
        table.add_row(name, *cells, f"{arm['wall_seconds']:.0f}")
    Console().print(table)
    Console().print(f"report: {run_dir / 'report.md'}")
    Console().print("partition: " + describe_sizes(json.loads((run_dir / "data.json").read_text())["site_sizes"]))


def _build_simulate_signature() -> inspect.Signature:
    verbose = inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                                default=typer.Option(False, "--verbose", help="Show Flower's and Ray's logs."))
    # site-keys is the deployment's registry: a simulation has none
    return inspect.Signature([verbose, *setting_parameters(skip={"site_keys"})])


_simulate.__signature__ = _build_simulate_signature()  # type: ignore[attr-defined]
_simulate.__doc__ = (
    "Simulate federated self-supervised pretraining and few-label fine-tuning on one machine.\n\n"
    "With no options: 5 sites (Dirichlet alpha 0.5) on PneumoniaMNIST, 10% labels, SimCLR "
    "pretraining then full fine-tuning, compared with local-only and from-scratch baselines."
)
app.command("simulate")(_simulate)


@app.command("methods")
def methods() -> None:
    """List the self-supervised methods and whether their loss is per-example (DP-SGD ready)."""
    from medfed.selfsup.registry import method_class

    for name in available_methods():
        cls = method_class(name)
        kinds = "/".join(k.value for k in cls.encoder_kinds)
        per_example = "yes" if cls.per_example_loss else "no (in-batch negatives)"
        print(f"{name:8s} encoder {kinds:8s} per-example loss: {per_example}")


@app.command("audit")
def audit(
    targets: list[str] = typer.Argument(..., help="Run directories, ledger folders or ledger files (*.ledger.sqlite)."),
    out: str = typer.Option("", "--out", help="Folder for audit.json, audit.md, audit_epsilon.png (default: "
                            "TARGET/audit for one run directory, else ./audit)."),
    trusted_keys: str = typer.Option("", "--trusted-keys", help="Folder of site-ID.pub files (or one .pub file) the "
                                     "ledgers must be signed with; default: the key stored in each ledger."),
    budget: float = typer.Option(0.0, "--budget", help="Budget for ledger rows that do not record the budget in force "
                                 "when they were written (ledgers from before medfed recorded it), and their plot line "
                                 "(default: the run's dp-epsilon). Rows that record it are judged against their own."),
    anchors: str = typer.Option("", "--anchors", help="An anchor file (*.anchor.json, kept beside a site's signing "
                                "key) or a folder of them, besides those found beside the ledgers: a ledger shorter "
                                "than or different from what its key signed fails, so does an anchor whose ledger is "
                                "missing."),
    tolerance: float = typer.Option(0.01, "--tolerance", help="Largest relative difference accepted between the "
                                    "reported and the independently recomputed epsilon."),
    empirical: bool = typer.Option(False, "--empirical", help="Also run the empirical canary audit (trains one site "
                                   "with canaries under the run's settings; minutes)."),
    canaries: int = typer.Option(0, "--canaries", help="Number of canaries for --empirical (0: up to 500, as many "
                                 "as the official test split holds)."),
    device: str = typer.Option("", "--device", help="Where --empirical trains: auto, cpu, cuda or cuda:N (default: "
                               "the run's own device setting)."),
) -> None:
    """Verify every site's privacy ledger and recompute its epsilon with an independent accountant.

    Exit code 0: every chain, signature, anchor and epsilon checks out; 1: problems found (listed; a
    ledger that cannot be read is one of them, and the others are still audited); 2: bad input
    (nothing written).
    """
    from pathlib import Path

    from medfed.privacy.audit import render_markdown, run_audit, write_audit

    try:
        paths = [Path(t).expanduser() for t in targets]
        if not 0 < tolerance < 1:
            raise ConfigError(f"--tolerance must be in (0, 1); got {tolerance}")
        if budget < 0:
            raise ConfigError(f"--budget must be > 0 (or 0 for the run's own); got {budget}")
        report = run_audit(paths, trusted_keys=Path(trusted_keys).expanduser() if trusted_keys else None,
                           budget=budget or None, tolerance=tolerance,
                           anchors=Path(anchors).expanduser() if anchors else None)
        empirical_result = None
        if empirical:
            from medfed.experiment.canary_audit import run_empirical_audit

            if len(paths) != 1 or not (paths[0] / "config.json").is_file():
                raise ConfigError("--empirical needs exactly one run directory (its settings are replayed)")
            empirical_result = run_empirical_audit(paths[0], num_canaries=canaries, device=device or None)
        if out:
            out_dir = Path(out).expanduser()
        else:
            out_dir = paths[0] / "audit" if len(paths) == 1 and paths[0].is_dir() else Path("audit")
        written = write_audit(report, out_dir, empirical=empirical_result)
    except MedfedError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(code=2) from None
    print(render_markdown(report, None, empirical=empirical_result))
    console.print("wrote " + ", ".join(str(p) for p in written), highlight=False)
    if not report.ok:
        raise typer.Exit(code=1)


_register_deployment(app)


@app.command("inspect-data")
def inspect_data(
    data: str = typer.Argument(..., help="A labels table (.csv), a MONAI datalist (.json), a folder of class "
                               "folders, a MedMNIST flag or a .npz."),
    num_classes: int = typer.Option(0, "--num-classes", help="Classes of a table (0: from its labels)."),
    on_bad_case: str = typer.Option("fail", "--on-bad-case", help="fail: exit 2 when any case is unreadable; skip: "
                                    "report them and exit 0."),
    workers: int = typer.Option(2, "--loader-workers", help="Worker processes that decode cases."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Read and fully decode every case of a data source, and print what it holds: cases per split, class and
    site, unlabelled cases, shapes, spacings and modalities, and every unreadable case with its reason. Writes
    nothing. Exit 2 on bad input (and, unless --on-bad-case skip, on any unreadable case)."""
    from medfed.constants import OnBadCase
    from medfed.data.inspection import inspect_source, problems, render

    try:
        policy = OnBadCase(on_bad_case) if on_bad_case in {p.value for p in OnBadCase} else None
        if policy is None:
            raise ConfigError(f"--on-bad-case must be one of {', '.join(p.value for p in OnBadCase)}; "
                              f"got {on_bad_case!r}")
        if num_classes < 0 or num_classes == 1:
            raise ConfigError(f"--num-classes must be 0 (from the labels) or >= 2; got {num_classes}")
        inspection = inspect_source(data, num_classes=num_classes, workers=max(0, workers),
                                    progress=console.is_terminal)
    except MedfedError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(code=2) from None
    if inspection.summary.get("source") == "medmnist":
        print(json.dumps(inspection.summary, indent=1))  # a MedMNIST file: as medfed reads it
    elif as_json:
        print(json.dumps({**inspection.summary, "unreadable_cases": [
            {"row": r, "image": i, "reason": why} for r, i, why in inspection.bad]}, indent=1))
    else:
        print(render(inspection))
    fatal = problems(inspection, skip_bad_cases=policy == OnBadCase.SKIP)
    if fatal:
        console.print(f"[bold red]error:[/] {len(fatal)} problem(s): {'; '.join(fatal[:20])}", highlight=False)
        raise typer.Exit(code=2)


def _version(value: bool) -> None:
    if value:
        print(f"medfed {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Federated self-supervised learning for medical imaging on Flower."""


if __name__ == "__main__":  # pragma: no cover
    app()
