"""``medfed simulate``: the experiment with its federated arms on Flower's simulation runtime.

One virtual SuperNode per site (Flower's Ray backend), each with ``client-cpus`` CPUs and ``client-gpus`` GPUs
(Ray's client resources); the ServerApp is `medfed.server_app.make_server_app` around the same phases a deployment
runs, and the ClientApp is the one every hospital runs (`medfed.client_app`). The other arms (centralized,
local-only) train without a federation (`medfed.experiment.standalone`).

Where the sites run (Flower's ``RayBackend.init_ray`` calls ``ray.init(**init_args)`` once per process):

* no ``ray-address``: a Ray instance of this machine that medfed starts (``address="local"``, so it never joins a
  cluster named by ``RAY_ADDRESS`` or the last ``ray start`` here). Ray 2.55's GCS, raylet and worker ports listen
  on every interface, whatever the node IP, so unless ``RAY_AUTH_MODE`` is set medfed turns on Ray's token
  authentication with a random token of this process (`local_ray_auth`).
* ``ray-address``: an existing cluster (``ray.init(address=...)``, without ``num_cpus``, which Ray refuses there).
  Anyone who can submit work to that cluster can read the sites' images, so medfed requires the user to say how it
  authenticates (``RAY_AUTH_MODE=token`` or, explicitly, ``disabled``), and warns when it is not on this machine
  (`check_ray_settings`; docs/DEPLOYMENT.md, "Simulating on a Ray cluster").
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import secrets
import sys
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # before Flower is imported

from flwr.app.typing import ConfigRecordValues
from flwr.simulation import run_simulation

from medfed.client_app import app as client_app
from medfed.config import RunConfig
from medfed.exceptions import ConfigError, FederationError
from medfed.experiment.arms import Arm
from medfed.experiment.phases import ArmContext
from medfed.experiment.recorder import Listener
from medfed.experiment.runner import run_experiment
from medfed.flower_patches.simulation_sweep import pending_nodes_sweep
from medfed.server_app import make_server_app

log = logging.getLogger(__name__)


def simulate(cfg: RunConfig, *, listener: Listener | None = None, verbose: bool = False,
             arms: list[Arm] | None = None) -> Path:
    """Run every arm of ``cfg`` (or the given ``arms``), federated arms in Flower's simulation runtime.

    Returns:
        The finished run directory (see `medfed.experiment.runner`).
    """
    check_ray_settings(cfg)
    federate = functools.partial(run_federated_simulation, verbose=verbose)
    return run_experiment(cfg, federate=federate, listener=listener, arms=arms)


AUTH_MODES = ("token", "disabled")
"""The values of ``RAY_AUTH_MODE`` Ray 2.55 knows (``ray._private.authentication.authentication_utils``)."""


def is_cluster(ray_address: str) -> bool:
    """Whether a ``ray-address`` names an existing cluster (empty and ``local``: a Ray instance medfed starts)."""
    return ray_address.strip().lower() not in ("", "local")


def address_host(ray_address: str) -> str:
    """The host of a Ray address (``host:port``, ``ray://host:port``, ``[v6]:port``); empty for ``auto``."""
    rest = ray_address.strip().partition("://")[2] or ray_address.strip()
    if rest.lower() == "auto":
        return ""
    if rest.startswith("["):
        return rest[1:].partition("]")[0]
    return rest.rpartition(":")[0] if ":" in rest else rest


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine's loopback (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_ray_settings(cfg: RunConfig) -> None:
    """Refuse, before anything is written, Ray settings this machine or the named cluster cannot honour safely.

    * ``client-gpus`` > 0 on a Ray instance of this machine needs a CUDA device torch sees, and at least that many
      GPUs (otherwise Flower's actor pool is empty: ``flwr/simulation/ray_transport/ray_actor.py``,
      ``pool_size_from_resources``). With ``ray-address`` the GPUs are the cluster's, not this machine's.
    * ``ray-address``: ``RAY_AUTH_MODE`` must say how the cluster authenticates, ``token`` (the cluster's token in
      ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) or ``disabled`` (logged as a warning: anyone
      who reaches the cluster's ports can run code there and read the sites' data). An address not on this machine
      is warned about too: Ray's traffic, images and model updates included, is unencrypted unless Ray's TLS is on.

    Raises:
        ConfigError: the rules above (the CLI exits 2).
    """
    fed = cfg.federation
    if fed.client_gpus > 0 and not is_cluster(fed.ray_address):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"client-gpus {fed.client_gpus:g} but torch finds no CUDA device on this machine (torch "
                              f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); use client-gpus 0, "
                              "or --ray-address of a Ray cluster with GPUs")
        if fed.client_gpus > count:
            raise ConfigError(f"client-gpus {fed.client_gpus:g} per site, but this machine has {count} CUDA "
                              "device(s): no site would fit")
    if not is_cluster(fed.ray_address):
        return
    where = f"ray-address {fed.ray_address}"
    mode = os.environ.get("RAY_AUTH_MODE", "").strip().lower()
    if mode not in AUTH_MODES:
        raise ConfigError(
            f"{where}: set RAY_AUTH_MODE to how that cluster authenticates: token (started with RAY_AUTH_MODE=token; "
            "its token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) or disabled (anyone who can reach "
            "its ports can run code on it and read the sites' images); got "
            f"{os.environ.get('RAY_AUTH_MODE', 'nothing')!r}. See docs/DEPLOYMENT.md")
    if _LOCAL_TOKEN and os.environ.get("RAY_AUTH_TOKEN") == _LOCAL_TOKEN:
        raise ConfigError(f"{where}: this process ran a local simulation and holds the token medfed made for it; "
                          "run the cluster simulation in a fresh process with the cluster's own token")
    if mode == "disabled":
        log.warning("%s: Ray cluster without authentication (RAY_AUTH_MODE=disabled): whoever can reach its ports "
                    "can run code on it and read the simulated sites' images", where)
    host = address_host(fed.ray_address)
    if not is_loopback(host):
        log.warning("%s is %s: the sites' images and model updates cross the network to its nodes, unencrypted "
                    "unless Ray's TLS is on (RAY_USE_TLS); keep the cluster on a private network", where,
                    f"not on this machine ({host})" if host else "chosen by Ray (RAY_ADDRESS or the last `ray start`)")


_LOCAL_TOKEN = ""
"""The token `local_ray_auth` made for this process's own Ray instance (never offered to a cluster)."""


def local_ray_auth() -> None:
    """Token authentication for a Ray instance medfed starts on this machine, unless ``RAY_AUTH_MODE`` is set.

    Ray 2.55 listens on every interface (``ray start --node-ip-address 127.0.0.1`` too: ``resolve_ip_for_localhost``
    replaces loopback by the routable address, and the GCS binds 0.0.0.0), so without a token anyone on the network
    could submit work to it. Ray reads ``RAY_AUTH_MODE`` once per process, when it is imported; if Ray was imported
    before (without the variable), medfed leaves it off rather than start a cluster its own driver cannot join.
    """
    global _LOCAL_TOKEN
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():  # Flower would reuse that connection, wherever it leads
            raise ConfigError("this process is already connected to a Ray instance medfed did not start; the "
                              "simulated sites would run there. Run medfed simulate in a fresh process, or name the "
                              "cluster with --ray-address")
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None:
        if mode.strip().lower() != "token":
            log.warning("RAY_AUTH_MODE=%s: the local Ray instance accepts work from anyone who reaches its ports "
                        "(they listen on every interface), and with it the simulated sites' images", mode)
        return
    if "ray" in sys.modules:
        raise ConfigError("Ray was imported in this process before medfed could turn on its token authentication "
                          "(Ray reads RAY_AUTH_MODE once, on import), and a local Ray listens on every interface; "
                          "set RAY_AUTH_MODE=token (or, knowingly, disabled) before starting, or run medfed simulate "
                          "in a fresh process")
    os.environ["RAY_AUTH_MODE"] = "token"
    _LOCAL_TOKEN = os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))


def backend_config(cfg: RunConfig, *, verbose: bool = False) -> dict[str, dict[str, ConfigRecordValues]]:
    """Flower's ``backend_config``: ``client_resources`` become each Ray actor's ``options(num_cpus, num_gpus)``
    (``flwr/simulation/ray_transport/ray_actor.py``, ``BasicActorPool``) and ``init_args`` Ray's
    ``ray.init(**init_args)`` (``flwr/server/superlink/fleet/vce/backend/raybackend.py``, ``init_ray``)."""
    fed = cfg.federation
    cpus = fed.client_cpus or os.cpu_count() or 1
    init_args: dict[str, ConfigRecordValues] = {"logging_level": "WARNING" if verbose else "ERROR",
                                                "log_to_driver": verbose}
    if is_cluster(fed.ray_address):
        init_args["address"] = fed.ray_address.strip()  # its nodes' resources are its own: no num_cpus
    else:
        init_args |= {"address": "local", "num_cpus": max(cpus, os.cpu_count() or 1)}
    return {"client_resources": {"num_cpus": cpus, "num_gpus": float(fed.client_gpus)}, "init_args": init_args}


def run_federated_simulation(ctx: ArmContext, *, verbose: bool = False) -> dict[str, float]:
    """The federated arm on Flower's simulation runtime (Ray backend), one virtual SuperNode per site."""
    holder: list[dict[str, float]] = []
    backend = backend_config(ctx.cfg, verbose=verbose)
    # with num_gpus 0 Ray leaves CUDA_VISIBLE_DEVICES alone (its default, and FutureWarning, is to set it empty)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if not verbose:  # Flower logs every round at INFO and warns that run_simulation is deprecated
        flwr_logger.setLevel(logging.ERROR)
    try:
        if is_cluster(ctx.cfg.federation.ray_address):
            probe_cluster(ctx.cfg, backend)
        else:
            local_ray_auth()
        with pending_nodes_sweep():  # Flower polls every node 10x a second; poll those with a message
            run_simulation(
                server_app=make_server_app(ctx, holder.append),
                client_app=client_app,
                num_supernodes=ctx.cfg.dataset.num_sites,
                backend_config=backend,
                verbose_logging=False,
            )
    except RuntimeError as exc:  # Flower wraps what Ray raised twice ("Simulation Runtime crashed.")
        problem = None if isinstance(exc, FederationError) else ray_problem(exc, ctx.cfg)
        if problem is None:
            raise
        raise problem from exc
    finally:
        flwr_logger.setLevel(level)
    if not holder:
        raise FederationError(f"federated arm {ctx.arm} ended without a result (see the log above)")
    return holder[0]


def no_room(cfg: RunConfig, totals: dict[str, float] | None = None) -> FederationError:
    """The error for a Ray cluster none of whose nodes has a site's client resources (``totals``: what it has)."""
    fed = cfg.federation
    where = f"the Ray cluster at ray-address {fed.ray_address}" if is_cluster(fed.ray_address) else "this machine's Ray"
    has = f" (it has {totals.get('CPU', 0):g} CPUs and {totals.get('GPU', 0):g} GPUs in all)" if totals else ""
    return FederationError(f"no node of {where} has room for one simulated site with client-cpus "
                           f"{fed.client_cpus or os.cpu_count()} and client-gpus {fed.client_gpus:g}{has}; lower them "
                           "or add nodes")


def ray_problem(exc: BaseException, cfg: RunConfig) -> FederationError | None:
    """A `FederationError` naming the setting behind a failure of Ray's start that Flower wrapped, else None."""
    cause: BaseException | None = exc
    while cause is not None:
        if "ActorPool is empty" in str(cause):  # flwr/simulation/ray_transport/ray_actor.py
            return no_room(cfg)
        cause = cause.__cause__ or cause.__context__
    return None


def probe_cluster(cfg: RunConfig, backend: dict[str, dict[str, ConfigRecordValues]]) -> None:
    """Join the cluster once, and leave, before Flower does, and raise if it cannot host a site.

    Flower starts the ServerApp's thread before it joins Ray and does not stop it when joining fails or no node has
    room for a site (``RuntimeError: Simulation Runtime crashed.``): that thread waits out ``round-timeout``, and the
    process with it. Asking first turns both into an error at once. Flower then joins again (its own ``ray.init``).

    Raises:
        FederationError: the cluster cannot be joined (address, authentication), or has no room for a site.
    """
    import ray
    from flwr.simulation.ray_transport.ray_actor import pool_size_from_resources

    if ray.is_initialized():  # Flower uses the connection this process already has
        return
    address = cfg.federation.ray_address.strip()
    try:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    except Exception as exc:  # ConnectionError, AuthenticationError, ValueError: Ray's words name the cause
        raise FederationError(f"cannot join the Ray cluster at ray-address {address}: {exc} (is its head running, and "
                              "RAY_AUTH_MODE and the token those of the cluster?)") from exc
    try:
        totals = ray.cluster_resources()
        resources = {k: v for k, v in backend["client_resources"].items() if isinstance(v, int | float)}
        try:
            sites = pool_size_from_resources(resources)
        except ValueError as exc:  # "ActorPool is empty"
            raise no_room(cfg, totals) from exc
        log.info("Ray cluster %s: %d node(s), %g CPUs, %g GPUs: up to %d simulated sites at once", address,
                 len([n for n in ray.nodes() if n.get("Alive")]), totals.get("CPU", 0), totals.get("GPU", 0), sites)
    finally:
        ray.shutdown()
