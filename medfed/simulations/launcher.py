"""``medfed simulate``: the experiment with its federated arms on Flower's simulation runtime.

One virtual SuperNode per site (Flower's Ray backend), each with ``client-cpus`` CPUs; the ServerApp
is `medfed.server_app.make_server_app` around the same phases a deployment runs, and the ClientApp is
the one every hospital runs (`medfed.client_app`). The other arms (centralized, local-only) train
without a federation (`medfed.experiment.standalone`).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # before Flower is imported

from flwr.app.typing import ConfigRecordValues
from flwr.simulation import run_simulation

from medfed.client_app import app as client_app
from medfed.config import RunConfig
from medfed.exceptions import FederationError
from medfed.experiment.arms import Arm
from medfed.experiment.phases import ArmContext
from medfed.experiment.recorder import Listener
from medfed.experiment.runner import run_experiment
from medfed.server_app import make_server_app


def simulate(cfg: RunConfig, *, listener: Listener | None = None, verbose: bool = False,
             arms: list[Arm] | None = None) -> Path:
    """Run every arm of ``cfg`` (or the given ``arms``), federated arms in Flower's simulation runtime.

    Returns:
        The finished run directory (see `medfed.experiment.runner`).
    """
    federate = functools.partial(run_federated_simulation, verbose=verbose)
    return run_experiment(cfg, federate=federate, listener=listener, arms=arms)


def run_federated_simulation(ctx: ArmContext, *, verbose: bool = False) -> dict[str, float]:
    """The federated arm on Flower's simulation runtime (Ray backend), one virtual SuperNode per site."""
    holder: list[dict[str, float]] = []
    cpus = ctx.cfg.federation.client_cpus or os.cpu_count() or 1
    backend: dict[str, dict[str, ConfigRecordValues]] = {
        "client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
        "init_args": {
            "logging_level": "WARNING" if verbose else "ERROR",
            "log_to_driver": verbose,
            "num_cpus": max(cpus, os.cpu_count() or 1),
        },
    }
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if not verbose:  # Flower logs every round at INFO and warns that run_simulation is deprecated
        flwr_logger.setLevel(logging.ERROR)
    try:
        run_simulation(
            server_app=make_server_app(ctx, holder.append),
            client_app=client_app,
            num_supernodes=ctx.cfg.dataset.num_sites,
            backend_config=backend,
            verbose_logging=False,
        )
    finally:
        flwr_logger.setLevel(level)
    if not holder:
        raise FederationError(f"federated arm {ctx.arm} ended without a result (see the log above)")
    return holder[0]
