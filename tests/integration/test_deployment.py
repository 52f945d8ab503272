"""A real deployment on the loopback address: `medfed server` (SuperLink, TLS, SuperNode
authentication) and three `medfed site` processes (SuperNodes) on BreastMNIST cut into three site
folders, driven by `medfed run`. Every process is started here and stopped by its PID (with its
whole process tree) at the end; the module fails if any Flower process outlives it.

The tests run in file order and share the federation: a full run (2 rounds of pretraining and
2 of DP fine-tuning), nodes that must not get in, a site killed mid-round, and the server killed
mid-round and resumed (the ledgers then hold the same releases as the uninterrupted run).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from medfed.deploy.processes import free_port
from medfed.deploy.provision import ProvisionPlan, make_supernode_auth_key, provision
from medfed.privacy.ledger import MECHANISM_DP_SGD, MECHANISM_NONE, verify_ledger
from medfed.server.recorder import Recorder
from medfed.server.resume import CHECKPOINT_DIR, STATE_FILE
from medfed.simulations.site_files import write_site_files

SITES = ("h1", "h2", "h3")
MEDFED = [sys.executable, "-m", "medfed.cli"]
FLOWER_PROCESS = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr-serverapp", "flwr-clientapp")
# small and fast; fixed noise so that two runs release exactly the same mechanisms
FINETUNE_SETTINGS = ["--data", "breastmnist", "--finetune-rounds", "2", "--width", "4", "--finetune-batch-size", "8",
                     "--dp", "finetune", "--dp-noise-multiplier", "1.5", "--dp-epsilon", "200", "--dp-delta", "1e-3"]
RUN_SETTINGS = [*FINETUNE_SETTINGS, "--pretrain", "simclr", "--pretrain-rounds", "2", "--pretrain-batch-size", "32"]


@dataclass
class Federation:
    root: Path
    kits: Path
    data: dict[str, Path]
    port: int
    env: dict[str, str]
    server: subprocess.Popen | None = None
    sites: dict[str, subprocess.Popen] = field(default_factory=dict)
    started: list[int] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def spawn(self, args: list[str], log: Path) -> subprocess.Popen:
        with log.open("ab") as out:
            p = subprocess.Popen([*MEDFED, *args], stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.root,
                                 start_new_session=True)
        self.started.append(p.pid)
        return p

    def start_server(self) -> None:
        self.server = self.spawn(["server", "--kit", str(self.kits / "server"), "--host", "127.0.0.1", "--port",
                                  str(self.port)], self.root / "server.out")
        wait_for(lambda: "SuperLink ready" in (self.root / "server.out").read_text(), 120, "the SuperLink",
                 self.root / "server.out", self.server)

    def start_site(self, site: str, kit: Path | None = None) -> subprocess.Popen:
        kit = kit or self.kits / site
        p = self.spawn(["site", "--kit", str(kit), "--data", str(self.data.get(site, self.data["h1"])), "--superlink",
                        self.address], self.root / f"site-{kit.name}.out")
        self.sites[kit.name] = p
        return p

    def supernode_log(self, kit_name: str) -> str:
        path = self.kits / kit_name / "state" / "supernode.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_connected(self, site: str, count: int = 1) -> None:
        wait_for(lambda: self.supernode_log(site).count("SuperNode ID") >= count, 90, f"site {site} to connect",
                 self.kits / site / "state" / "supernode.log", self.sites[site])

    def run(self, *args: str, log: str) -> subprocess.Popen:
        return self.spawn(["run", "--kit", str(self.kits / "server"), "--superlink", self.address, "--out-dir",
                           str(self.root / "runs"), *args], self.root / log)

    def ledger(self, site: str) -> Path:
        return self.kits / site / "ledger" / f"{site}.ledger.sqlite"


def wait_for(condition, timeout: float, what: str, log: Path | None = None, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
    pytest.fail(f"timed out or exited waiting for {what}\n{tail}")


def kill_tree(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=15)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the medfed command stops its Flower processes), then SIGKILL what is left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    kill_tree(proc.pid)


def flower_processes_under(root: Path) -> list[str]:
    """Live Flower processes whose FLWR_HOME lies under ``root`` (this module's; zombies excluded).
    Found by environment, not ancestry: an orphan is re-parented to init and would escape a tree walk."""
    left = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["status"] == psutil.STATUS_ZOMBIE or not any(name in cmd for name in FLOWER_PROCESS):
                continue
            if str(root) in p.environ().get("FLWR_HOME", ""):
                left.append(f"{p.pid} {cmd[:120]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return left


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("deployment")
    kits = provision(ProvisionPlan(sites=list(SITES), out=root / "kits", dp_epsilon=200.0, dp_delta=1e-3))
    data = write_site_files(str(shared_data / "breastmnist.npz"), list(SITES), root / "sitedata")
    env = {**os.environ, "MEDFED_DATA_PATH": str(shared_data), "FLWR_TELEMETRY_ENABLED": "0"}
    f = Federation(root, kits, data, free_port(), env)
    try:
        f.start_server()
        for site in SITES:
            f.start_site(site)
        for site in SITES:
            f.wait_connected(site)
        yield f
    finally:
        for p in [*f.sites.values(), *([f.server] if f.server else [])]:
            stop(p)
        for pid in f.started:
            kill_tree(pid)
        time.sleep(1)
        left = flower_processes_under(root)
        assert not left, f"Flower processes left running: {left}"


def ledger_rows(fed: Federation, run_id: str) -> dict[str, list[tuple]]:
    """Each site's releases of one run: (phase, round, mechanism, q, sigma, steps)."""
    out = {}
    for site in SITES:
        v = verify_ledger(fed.ledger(site))
        assert v.ok, v.problems
        out[site] = [(e.phase, e.server_round, e.mechanism, e.sample_rate, e.noise_multiplier, e.steps)
                     for e in v.entries if e.run_id.startswith(run_id)]
    return out


def run_id_of(run_dir: Path) -> str:
    return json.loads((run_dir / "summary.json").read_text())["run_id"]


def test_three_sites_pretrain_and_finetune_over_tls_with_authentication(fed: Federation) -> None:
    p = fed.run(*RUN_SETTINGS, "--run-name", "full", log="run-full.out")
    assert p.wait(timeout=900) == 0, (fed.root / "run-full.out").read_text()[-3000:]
    run_dir = fed.root / "runs" / "full"
    rows = Recorder.load(run_dir / "metrics.jsonl")
    for phase in ("pretrain", "finetune"):
        for rnd in (1, 2):
            train = [r for r in rows if r["phase"] == phase and r["round"] == rnd and r["split"] == "train"]
            assert sorted(r["site"] for r in train) == [0, 1, 2] and all(r["accepted"] for r in train), train
    assert {r["site"] for r in rows if r["split"] == "val"} == {0, 1, 2}  # federated evaluation at every site
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["config"]["site-data"] == "own" and 0 <= summary["arms"]["federated-simclr"]["test"]["auc"] <= 1
    releases = ledger_rows(fed, run_id_of(run_dir))
    for site in SITES:  # pretraining without DP is recorded as uncovered exposure, fine-tuning as DP-SGD
        assert [(r[0], r[1], r[2]) for r in releases[site]] == [
            ("pretrain", 1, MECHANISM_NONE), ("pretrain", 2, MECHANISM_NONE),
            ("finetune", 1, MECHANISM_DP_SGD), ("finetune", 2, MECHANISM_DP_SGD)]
    audit = subprocess.run([*MEDFED, "audit", *(str(fed.ledger(s)) for s in SITES), "--trusted-keys",
                            str(fed.kits / "server" / "ledger-keys"), "--out", str(fed.root / "audit")],
                           capture_output=True, text=True, env=fed.env, timeout=600, check=False)
    assert audit.returncode == 0, audit.stdout[-2000:] + audit.stderr[-2000:]


@pytest.mark.slow  # SecAgg+ takes four ClientApp processes per site per round: minutes on 2 cores
def test_secagg_and_central_dp_over_tls_with_authentication(fed: Federation) -> None:
    p = fed.run("--data", "breastmnist", "--pretrain", "none", "--finetune-rounds", "1", "--width", "4",
                "--finetune-batch-size", "8", "--secure-aggregation", "secagg+", "--central-dp", "client-clip",
                "--central-dp-noise-multiplier", "2", "--central-dp-clipping-norm", "1", "--central-dp-delta", "1e-3",
                "--run-name", "secagg", log="run-secagg.out")
    assert p.wait(timeout=900) == 0, (fed.root / "run-secagg.out").read_text()[-3000:]
    run_dir = fed.root / "runs" / "secagg"
    rows = Recorder.load(run_dir / "metrics.jsonl")
    train = [r for r in rows if r["split"] == "train"]
    assert sorted(r["site"] for r in train) == [0, 1, 2] and all(r["accepted"] for r in train), train
    (release,) = [r for r in rows if r["split"] == "central-dp"]
    assert release["sites"] == 3 and release["noise-std"] == pytest.approx(2 / 3)
    audit = subprocess.run([*MEDFED, "audit", str(run_dir), "--out", str(fed.root / "audit-secagg")],
                           capture_output=True, text=True, env=fed.env, timeout=600, check=False)
    assert audit.returncode == 0, audit.stdout[-2000:] + audit.stderr[-2000:]
    assert "central" in (fed.root / "audit-secagg" / "audit.md").read_text()


def test_an_unregistered_supernode_is_rejected(fed: Federation) -> None:
    rogue = fed.root / "kits-rogue" / "h9"
    shutil.copytree(fed.kits / "h1", rogue, ignore=shutil.ignore_patterns("state", "ledger"))
    private, public = make_supernode_auth_key()  # a key the SuperLink never registered
    (rogue / "supernode-auth.key").write_bytes(private)
    (rogue / "supernode-auth.pub").write_bytes(public)
    p = fed.start_site("h1", kit=rogue)
    assert p.wait(timeout=120) != 0
    log = (rogue / "state" / "supernode.log").read_text(errors="replace")
    assert "Failed to activate SuperNode" in log or "2004" in log, log[-2000:]


def test_a_supernode_without_the_root_certificate_cannot_connect(fed: Federation) -> None:
    other = provision(ProvisionPlan(sites=["x"], out=fed.root / "kits-other"))  # another federation's CA
    stranger = fed.root / "kits-stranger" / "h2"
    shutil.copytree(fed.kits / "h2", stranger, ignore=shutil.ignore_patterns("state", "ledger"))
    shutil.copy(other / "ca" / "ca.crt", stranger / "ca.crt")
    p = fed.start_site("h2", kit=stranger)
    assert p.wait(timeout=120) != 0
    log = (stranger / "state" / "supernode.log").read_text(errors="replace")
    assert "CERTIFICATE_VERIFY_FAILED" in log, log[-2000:]


def test_a_site_killed_mid_round_leaves_the_round_to_the_others_and_can_rejoin(fed: Federation) -> None:
    before = fed.supernode_log("h3").count("Receiving: train message")
    p = fed.run("--data", "breastmnist", "--pretrain", "none", "--finetune-rounds", "2", "--width", "4",
                "--finetune-batch-size", "8", "--min-sites", "2", "--round-timeout", "300", "--run-name", "site-fault",
                log="run-site-fault.out")
    wait_for(lambda: fed.supernode_log("h3").count("Receiving: train message") > before, 300, "h3 to receive its first message",
             fed.kits / "h3" / "state" / "supernode.log", p)
    kill_tree(fed.sites["h3"].pid)  # the hospital's node dies mid-round (SIGKILL, no goodbye)
    assert p.wait(timeout=900) == 0, (fed.root / "run-site-fault.out").read_text()[-3000:]
    rows = Recorder.load(fed.root / "runs" / "site-fault" / "metrics.jsonl")
    for rnd in (1, 2):
        accepted = sorted(r["site"] for r in rows if r["round"] == rnd and r["split"] == "train" and r["accepted"])
        assert accepted == [0, 1], rows
    lost = [r for r in rows if r["split"] == "train" and not r["accepted"]]
    assert lost and all("site error" in r["reason"] for r in lost)
    fed.start_site("h3")  # the site comes back
    fed.wait_connected("h3", count=2)


def test_server_killed_mid_round_resumes_with_the_same_ledger_totals(fed: Federation) -> None:
    # no pretraining here (it would only lengthen the test); fine-tuning is the full run's, round for round
    p = fed.run(*FINETUNE_SETTINGS, "--pretrain", "none", "--run-name", "resumed", log="run-resumed.out")
    partial = fed.root / "runs" / ".resumed.partial"
    state = partial / CHECKPOINT_DIR / STATE_FILE

    def mid_finetune_round_2() -> bool:  # round 1 checkpointed and a site has released round 2
        if not state.exists() or json.loads(state.read_text())["phase"] != "finetune":
            return False
        if json.loads(state.read_text())["completed_round"] != 1:
            return False
        return any(("finetune", 2) == r[:2] for rows in ledger_rows(fed, json.loads(state.read_text())["run_id"]).values()
                   for r in rows)

    wait_for(mid_finetune_round_2, 900, "fine-tuning round 2 to be under way", fed.root / "run-resumed.out", p)
    assert json.loads(state.read_text())["completed_round"] == 1, "the run got past round 2 before the kill"
    kill_tree(fed.server.pid)  # the coordinating centre crashes: SuperLink, ServerApp and all
    kill_tree(p.pid)
    fed.start_server()  # same kit and state database: the sites' registrations survive, the nodes reconnect
    resume = fed.run("--resume", str(partial), log="run-resume.out")
    assert resume.wait(timeout=900) == 0, (fed.root / "run-resume.out").read_text()[-3000:]
    run_dir = fed.root / "runs" / "resumed"
    rows = Recorder.load(run_dir / "metrics.jsonl")
    assert any(r.get("replayed") == 1.0 for r in rows if r["phase"] == "finetune" and r["round"] == 2)
    resumed, reference = ledger_rows(fed, run_id_of(run_dir)), ledger_rows(fed, run_id_of(fed.root / "runs" / "full"))
    for site in SITES:  # every site: the same DP releases as the uninterrupted run, none counted twice
        assert resumed[site] == [r for r in reference[site] if r[0] == "finetune"], (site, resumed[site])
