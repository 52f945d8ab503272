"""The ServerApp: hands the Grid to the Flower-free phase runner.

`make_server_app` closes over a prepared arm (used by ``medfed simulate``, which runs
Flower's simulation runtime in-process). The module-level ``app`` (components in
pyproject.toml) is the entry point when a Flower runtime starts the ServerApp itself: it
reads the flat run config from the context and runs the same experiment on its grid.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from medfed.config import RunConfig
from medfed.experiment.phases import ArmContext, run_federated
from medfed.experiment.runner import run_experiment
from medfed.flower_patches.flower_tuning import object_pulls_tuned
from medfed.server.grid import DeploymentGrid


def make_server_app(ctx: ArmContext, on_result: Callable[[dict[str, float]], None]) -> ServerApp:
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        on_result(run_federated(grid, ctx))

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point inside a Flower runtime (``flwr run``): settings from the run config
    (pyproject defaults plus overrides); federated arms use this ServerApp's grid, with arrays packed
    on the wire and replies polled every 0.2 s instead of Flower's 3 s (`medfed.server.grid`)."""
    # replies' objects: retried after 50 ms, not Flower's 1 s (medfed.flower_patches.flower_tuning)
    with object_pulls_tuned():
        cfg = RunConfig.from_flat(dict(context.run_config))
        run_experiment(cfg, grid=DeploymentGrid(grid, registry=cfg.deployment.registered_sites))
