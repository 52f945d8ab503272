"""Orchestration overhead and bytes on the wire of a real deployment on loopback (3 sites).

`medfed provision` kits, PneumoniaMNIST cut into three site files, `medfed server` (the mutual-TLS
gateway, SuperNode authentication), three `medfed site` processes and `medfed run` with the default model and recipe
(only the round counts are smaller). Per training round the server records its wall time
(send, wait for every reply, aggregate) and every site its local training time. The overhead of a
round is 1 - (slowest site's local training time) / (round wall time): everything that is not
training (process start-up of the ClientApp, Flower's message passing, TLS, serialisation,
aggregation). Bytes: the uplink payload each site sends per round (the server's record of the
reply arrays), and the SuperLink's own count of the run's network traffic (`flwr ls`).

    python benchmarks/deployment_overhead.py            # writes docs/RESULTS.md (deployment_overhead)

Every process it starts is stopped by its PID (with its process tree) at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import write_section

from medfed.data.site_files import write_site_files
from medfed.deploy.processes import CONNECTION, ControlConnection, flwr_cli, free_port, stop_tree
from medfed.deploy.provision import ProvisionPlan, provision
from medfed.experiment.recorder import Recorder

MEDFED = [sys.executable, "-m", "medfed.cli"]
SITES = ["h1", "h2", "h3"]


FRONTS = ("gateway", "direct")


def start_direct_superlink(kits: Path, port: int, work: Path, spawn_raw) -> None:
    """What `medfed server` ran before the gateway: Flower's own SuperLink on the federation port with TLS and
    SuperNode authentication (no client certificates, Flower's subprocess isolation), sites registered with the
    flwr CLI. Only for measuring what the gateway costs; never a deployment."""
    from medfed.deploy.processes import (
        ControlConnection,
        flower_bin,
        flower_env,
        register_supernode,
        wait_healthy,
        write_cli_config,
    )

    server, state = kits / "server", kits / "server" / "state"
    state.mkdir(parents=True, exist_ok=True)
    spawn_raw([flower_bin("flower-superlink"), "--host", "127.0.0.1", "--port", str(port), "--database",
               str(state / "superlink.db"), "--disable-runtime-dependency-installation", "--ssl-ca-certfile",
               str(server / "ca.crt"), "--ssl-certfile", str(server / "server.crt"), "--ssl-keyfile",
               str(server / "server.key"), "--enable-supernode-auth"],
          "server.out", flower_env(state / "flwr-superlink"))
    wait_healthy(f"127.0.0.1:{port}", server / "ca.crt", timeout=120)
    conn = ControlConnection(state / "flwr-cli")
    write_cli_config(conn.flwr_home, f"127.0.0.1:{port}", server / "ca.crt")
    for site in SITES:
        register_supernode(server / "supernodes" / f"{site}.pub", site, conn)


def run_federation(work: Path, data: str, pretrain_rounds: int, finetune_rounds: int, front: str = "gateway",
                   files: dict[str, Path] | None = None) -> tuple[list[dict], float, str]:
    """Provision, start a SuperLink (``front``: medfed's gateway, or Flower's own SuperLink directly) and three
    sites, run one job; returns (metrics rows, end-to-end seconds, the SuperLink's traffic count). Every process
    is stopped by its PID."""
    if front not in FRONTS:
        raise ValueError(f"front must be one of {FRONTS}; got {front!r}")
    work.mkdir(parents=True, exist_ok=True)
    kits = provision(ProvisionPlan(sites=SITES, out=work / "kits"))
    files = files or write_site_files(data, SITES, work / "sitedata")
    port = free_port()
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    started: list[subprocess.Popen] = []

    def spawn_raw(cmd: list[str], log: str, process_env: dict[str, str] = env) -> subprocess.Popen:
        with (work / log).open("ab") as out:
            p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=process_env, cwd=work,
                                 start_new_session=True)
        started.append(p)
        return p

    def spawn(cmd: list[str], log: str) -> subprocess.Popen:
        return spawn_raw([*MEDFED, *cmd], log)

    operator = ControlConnection(kits / "server" / "state" / "flwr-cli",
                                 (kits / "server" / "operator.crt", kits / "server" / "operator.key"))
    try:
        if front == "gateway":
            spawn(["server", "--kit", str(kits / "server"), "--host", "127.0.0.1", "--port", str(port)], "server.out")
            while "SuperLink ready" not in (work / "server.out").read_text():
                time.sleep(0.5)
        else:
            start_direct_superlink(kits, port, work, spawn_raw)
        for site in SITES:
            spawn(["site", "--kit", str(kits / site), "--data", str(files[site]), "--superlink", f"127.0.0.1:{port}"],
                  f"site-{site}.out")
        start = time.perf_counter()
        run = spawn(["run", "--kit", str(kits / "server"), "--superlink", f"127.0.0.1:{port}", "--data", data,
                     "--pretrain-rounds", str(pretrain_rounds), "--finetune-rounds", str(finetune_rounds),
                     "--out-dir", str(work / "runs"), "--run-name", "bench"], "run.out")
        if run.wait() != 0:
            raise SystemExit(f"the run failed: {(work / 'run.out').read_text()[-3000:]}")
        total = time.perf_counter() - start
        run_id = next(line.split("run ")[1].split(":")[0] for line in (work / "run.out").read_text().splitlines()
                      if "finished:completed" in line)
        listing = flwr_cli(["ls", CONNECTION, "--run-id", run_id, "--format", "json"], operator)
        traffic = json.loads(listing.stdout)["runs"][0].get("network-traffic", "n/a")
    finally:
        for p in reversed(started):
            stop_tree(p.pid)
    return Recorder.load(work / "runs" / "bench" / "metrics.jsonl"), total, traffic


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="pneumoniamnist")
    parser.add_argument("--pretrain-rounds", type=int, default=2)
    parser.add_argument("--finetune-rounds", type=int, default=3)
    parser.add_argument("--keep", default="", help="keep the work folder here (default: a temporary folder)")
    args = parser.parse_args()
    work = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="medfed-deploy-bench-"))
    rows, total, traffic = run_federation(work, args.data, args.pretrain_rounds, args.finetune_rounds)
    table, ratios, transport, walls, locals_ = [], [], [], [], []
    for phase in ("pretrain", "finetune"):
        for rnd in sorted({r["round"] for r in rows if r["phase"] == phase and r["split"] == "round"}):
            wall = next(r["train-round-seconds"] for r in rows
                        if r["phase"] == phase and r["round"] == rnd and r["split"] == "round")
            sites = [r for r in rows
                     if r["phase"] == phase and r["round"] == rnd and r["split"] == "train" and r["accepted"]]
            local = max(r["train-seconds"] for r in sites)
            process = max(r.get("process-seconds", float("nan")) for r in sites)
            payload = max(r["bytes-sent"] for r in sites)
            ratios.append(1 - local / wall)
            walls.append(wall)
            locals_.append(local)
            transport.append(1 - process / wall)
            table.append(f"| {phase} | {rnd} | {wall:.1f} | {local:.1f} | {process:.1f} | {1 - local / wall:.1%} | "
                         f"{1 - process / wall:.1%} | {payload:,} |")
    pre = [x for x, line in zip(ratios, table, strict=True) if "| pretrain |" in line]
    command = (f"python benchmarks/deployment_overhead.py --data {args.data} --pretrain-rounds {args.pretrain_rounds} "
               f"--finetune-rounds {args.finetune_rounds}")
    lines = [
        "## Deployment on loopback: orchestration overhead and bytes on the wire (3 sites, mutual-TLS gateway, "
        "SuperNode authentication)",
        "",
        (f"Command: `{command}` (one run, {os.cpu_count()} CPU cores shared by the SuperLink, the ServerApp and the "
        f"three SuperNodes; default model and settings: CNN width 16, SimCLR, {args.data} cut iid into 3 site files). "
        "Overhead of a round = 1 - slowest site's local training time / the server's wall time for the round "
        "(send, wait for all replies, aggregate). Target: <= 15 % for the default model."),
        "",
        "Sites run `medfed site` with its defaults: each message's ClientApp process is forked by medfed's warm "
        "SuperExec from a process that imported torch, MONAI, opacus and peft once; arrays travel packed; Flower's "
        "polling and retry waits are shortened (docs/DEPLOYMENT.md). Per site, `process s` is the age of the site's "
        "ClientApp process when it replied: pulling the message, loading the app, reading the data and training. "
        "The last overhead column is what is left beyond that: the SuperNode and SuperLink passing the message, "
        "polling and aggregation.",
        "",
        "| phase | round | round wall s | slowest site's training s | slowest site's process s "
        "| overhead (vs training) | overhead beyond the site's process | uplink bytes per site |",
        "|---|---|---|---|---|---|---|---|",
        *table,
        "",
        (f"Mean overhead: pretraining rounds {sum(pre) / len(pre):.1%}, all rounds {sum(ratios) / len(ratios):.1%}, "
        f"all rounds weighted by their length (1 - total training s / total round s) "
        f"{1 - sum(locals_) / sum(walls):.1%}; beyond the sites' processes: {sum(transport) / len(transport):.1%}. "
        f"The SuperLink counted {traffic} of network traffic for the whole run ({total:.0f} s end to end, "
        "including federated evaluation after every fine-tuning round)."),
    ]
    write_section("deployment_overhead", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
