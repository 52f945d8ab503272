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
from dataclasses import fields
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from medfed import __version__
from medfed.config import SETTING_TYPES, RunConfig
from medfed.exceptions import ConfigError, MedfedError
from medfed.selfsup.registry import available_methods

app = typer.Typer(help="Federated self-supervised learning for medical imaging on Flower.", no_args_is_help=True, add_completion=False)
console = Console(stderr=True)

HELP: dict[str, str] = {
    "data": "MedMNIST flag (looked up in $MEDFED_DATA_PATH, then ~/.medmnist/FLAG.npz) or a path to a MedMNIST-style .npz.",
    "num_sites": "Number of simulated hospital sites.",
    "partition": "How the train split is divided: iid, dirichlet (label skew) or quantity (size skew).",
    "alpha": "Dirichlet concentration for dirichlet/quantity skew (smaller = more skewed).",
    "label_fraction": "Fraction of each site's train images whose labels it may use, in (0, 1].",
    "min_site_size": "Smallest number of train images a site may get.",
    "seed": "Seed for the partition, initial weights, augmentations and sampling.",
    "mode": "federated, centralized (all sites' data pooled) or local-only (each site alone).",
    "pretrain": f"Self-supervised method: {', '.join(available_methods())}, several joined by '+', or none.",
    "pretrain_weights": "Comma-separated weight per method when combining (e.g. 1,0.5 for simclr+restore).",
    "encoder": "auto (ViT for MAE, CNN otherwise), cnn or vit.",
    "width": "Channels of the CNN's first stage (doubles per stage).",
    "encoder_init": "A pretrained encoder (e.g. arms/ARM/pretrained_encoder.safetensors of an earlier run) to "
    "fine-tune instead of pretraining again; --pretrain then only names how it was made.",
    "baselines": "Comparison arms run beside the main one: none, default (local-only and federated "
    "supervised from scratch) or all (also centralized and local-only with the same pretraining).",
    "pretrain_rounds": "Federated rounds of self-supervised pretraining.",
    "pretrain_epochs": "Local epochs per pretraining round.",
    "pretrain_lr": "AdamW learning rate for pretraining.",
    "pretrain_batch_size": "Batch size for pretraining (SimCLR's negatives come from the batch).",
    "temperature": "NT-Xent temperature (SimCLR).",
    "byol_momentum": "Momentum of BYOL's target network (kept at each site).",
    "mask_ratio": "Fraction of patches MAE hides.",
    "finetune_mode": "full (encoder and head), linear (head only; only the head is sent) or lora (low-rank adapters "
    "on the encoder's conv/linear layers plus the head; only those are sent).",
    "finetune_rounds": "Federated rounds of supervised fine-tuning (0: the recipe's, 25 without DP; under DP "
    "the recipe chosen on validation data, docs/RESULTS.md dp_recipe).",
    "finetune_epochs": "Local epochs per fine-tuning round.",
    "finetune_lr": "AdamW learning rate for fine-tuning (0: the recipe's, 3e-4 without DP).",
    "finetune_batch_size": "Batch size for fine-tuning, expected Poisson batch under DP (0: the recipe's, 32 without DP).",
    "finetune_lr_schedule": "Learning rate over the fine-tuning rounds: constant, or cosine (decays from "
    "finetune-lr towards 0 by the last round); empty: the recipe's.",
    "finetune_loss": "ce, or logit-adjusted: cross-entropy on logits plus the log of the site's own label prior "
    "(Menon et al. 2021; FedLC, Zhang et al. 2022), so a site with skewed labels does not drag the shared head "
    "towards its majority class. Single-label tasks only.",
    "lora_rank": "Rank of the LoRA adapters (finetune-mode lora).",
    "lora_alpha": "LoRA scaling numerator: adapters are scaled by lora-alpha / lora-rank.",
    "dp": "Phases trained with DP-SGD at every site: none, finetune, pretrain or all. DP pretraining needs a "
    "per-example method (mae, byol, restore); SimCLR's in-batch negatives are refused.",
    "dp_epsilon": "Each site's lifetime epsilon budget, across rounds and runs (a site's node config may lower it).",
    "dp_delta": "Each site's delta; must be below 1/(examples at the site).",
    "dp_accountant": "Site accountant: rdp (Mironov 2017) or prv (Gopi et al. 2021).",
    "dp_max_grad_norm": "Per-example gradient clipping bound C.",
    "dp_noise_multiplier": "Noise multiplier sigma; 0 plans it so the run's planned rounds spend this run's share "
    "of the budget (--dp-run-epsilon).",
    "dp_run_epsilon": "This run's share of each site's lifetime budget: a site's cumulative epsilon may rise by at most "
    "this much during the run, and the noise is planned for it. 0 (default): all that is left, so one run spends the "
    "whole budget; set it (e.g. half of --dp-epsilon) to keep budget for later runs (docs/PRIVACY.md).",
    "dp_max_planned_noise": "A site refuses a DP round whose planned noise multiplier exceeds this: the budget left "
    "(or this run's share) is too small to train anything useful (docs/PRIVACY.md; not applied to a "
    "--dp-noise-multiplier you set).",
    "dp_grad_sample_mode": "How per-example gradients are computed (the same clipped step, at different speeds): "
    "Opacus' hooks or functorch, or PyTorch's expanded weights (ew; fine-tuning only); auto: ew for fine-tuning, "
    "hooks for pretraining (docs/RESULTS.md dp_cost_cpu).",
    "dp_augment_multiplicity": "Augmentation multiplicity K under DP-SGD (De et al. 2022): each sampled example is "
    "augmented K times and its K gradients are averaged before clipping, at no privacy cost and K times the compute "
    "(0: the DP recipe's).",
    "dp_secure_rng": "Draw Poisson sampling and noise from OS entropy (not reproducible) with Opacus' "
    "floating-point-attack-resistant noise.",
    "ledger_dir": "Folder of the simulated sites' privacy ledgers and signing keys, kept across runs "
    "(default: RUN_DIR/ledgers, one budget per run).",
    "strategy": "Aggregation: fedavg (example-weighted) or fedprox.",
    "aggregation": "How accepted updates are combined: mean (the strategy's example-weighted average), or a "
    "Byzantine-robust rule, unweighted: trimmed-mean or median (coordinate-wise, Yin et al. 2018) or krum "
    "(Blanchard et al. 2017). Applies to the shared weights only (the encoder in pretraining).",
    "trim_fraction": "trimmed-mean: fraction of the sites' values dropped at EACH end of every coordinate, in "
    "[0, 0.5); at least one site per end must be dropped.",
    "krum_byzantine": "krum: number f of faulty sites tolerated; needs at least 2f+3 sites per round.",
    "krum_select": "krum: Multi-Krum averages the m best-scored updates (1 = Krum); m <= sites per round - f.",
    "norm_outlier_factor": "Reject an update whose L2 distance from the global weights exceeds this factor times "
    "the median distance of the other updates (0 = off, else > 1; needs at least 3 sites per round).",
    "proximal_mu": "FedProx proximal weight mu (> 0 with --strategy fedprox).",
    "fraction_train": "Fraction of sites sampled each round.",
    "min_sites": "Sites a round needs: it starts once this many are connected and fails (resumable) unless this many "
    "answer with a valid update (a site refusing at its privacy budget answers too: recorded, not waited for); 0 = "
    "every site, so a site that dies or sends an invalid update fails the round. Below num-sites, such a site is "
    "left out and may rejoin later.",
    "round_timeout": "Seconds a round waits for the sites' replies.",
    "site_data": "partition: the server splits --data among simulated sites; own: every site reads its own file "
    "(node config data-path), --data is only the server's evaluation file (deployment).",
    "resume_from": "Deployment: a run directory whose last completed round the run continues from (`medfed run --resume`).",
    "site_keys": "Deployment only (set by `medfed run` from the server kit): SITE=SHA256 of each site's SuperNode key.",
    "client_cpus": "CPU cores per simulated site (0 = all cores, so sites train one after another).",
    "out_dir": "Folder that receives the run directory.",
    "run_name": "Name of the run directory (default: DATA-MODE-PRETRAIN-sSEED).",
}


def _simulate(verbose: bool = False, **settings: Any) -> None:
    try:
        cfg = RunConfig(**settings)
        _run_with_progress(cfg, verbose)
    except MedfedError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(code=2) from None


def _run_with_progress(cfg: RunConfig, verbose: bool) -> None:
    from medfed.simulations.runner import progress_units, run_experiment

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

        run_dir = run_experiment(cfg, listener=listener, verbose=verbose)
    summary = json.loads((run_dir / "summary.json").read_text())
    table = Table(title=f"test split of {cfg.data} ({run_dir})")
    table.add_column("arm", no_wrap=True)
    for col in ("AUC", "accuracy", "sensitivity", "specificity", "FPR", "wall s"):
        table.add_column(col)
    for name, arm in summary["arms"].items():
        t = arm["test"]
        cells = [f"{t[k]:.3f}" if t.get(k) is not None else "n/a" for k in ("auc", "accuracy", "sensitivity", "specificity", "fpr")]
        table.add_row(name, *cells, f"{arm['wall_seconds']:.0f}")
    Console().print(table)
    Console().print(f"report: {run_dir / 'report.md'}")


def _build_simulate_signature() -> inspect.Signature:
    params = [
        inspect.Parameter(
            "verbose", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
            default=typer.Option(False, "--verbose", help="Show Flower's and Ray's logs."),
        )
    ]
    for f in fields(RunConfig):
        if f.name == "site_keys":  # the deployment's registry; a simulation has none
            continue
        default = f.default
        params.append(
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, annotation=SETTING_TYPES[str(f.type)],
                default=typer.Option(default, f"--{f.name.replace('_', '-')}", help=HELP.get(f.name, "")),
            )
        )
    return inspect.Signature(params)


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
        print(f"{name:8s} encoder {kinds:8s} per-example loss: {'yes' if cls.per_example_loss else 'no (in-batch negatives)'}")


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
            from medfed.privacy.canary import run_empirical_audit

            if len(paths) != 1 or not (paths[0] / "config.json").is_file():
                raise ConfigError("--empirical needs exactly one run directory (its settings are replayed)")
            empirical_result = run_empirical_audit(paths[0], num_canaries=canaries)
        out_dir = Path(out).expanduser() if out else (paths[0] / "audit" if len(paths) == 1 and paths[0].is_dir() else Path("audit"))
        written = write_audit(report, out_dir, empirical=empirical_result)
    except MedfedError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(code=2) from None
    print(render_markdown(report, None, empirical=empirical_result))
    console.print("wrote " + ", ".join(str(p) for p in written), highlight=False)
    if not report.ok:
        raise typer.Exit(code=1)


from medfed.deploy.commands import register as _register_deployment  # noqa: E402

_register_deployment(app)


@app.command("inspect-data")
def inspect_data(data: str = typer.Argument(..., help="MedMNIST flag or .npz path.")) -> None:
    """Validate a MedMNIST-style file and print what medfed reads from it."""
    from medfed.data.medmnist import load_medmnist

    try:
        print(json.dumps(load_medmnist(data).describe(), indent=1))
    except MedfedError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(code=2) from None


def _version(value: bool) -> None:
    if value:
        print(f"medfed {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Federated self-supervised learning for medical imaging on Flower."""


if __name__ == "__main__":  # pragma: no cover
    app()
