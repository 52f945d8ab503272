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

from medfed.data.site_files import write_site_files
from medfed.deploy.processes import free_port
from medfed.deploy.provision import ProvisionPlan, make_supernode_auth_key, provision
from medfed.experiment.recorder import Recorder
from medfed.experiment.resume import CHECKPOINT_DIR, STATE_FILE
from medfed.privacy.ledger import MECHANISM_DP_SGD, MECHANISM_NONE, verify_ledger

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


def wait_for(
    condition, timeout: float, what: str, log: Path | None = None, proc: subprocess.Popen | None = None
) -> None:
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
    # nothing left lying around: the run directory and the SuperLink's state are the owner's only ...
    state = fed.kits / "server" / "state"
    loose = [str(p) for p in [run_dir, *run_dir.rglob("*"), state, *state.rglob("*")]
             if p.stat().st_mode & 0o077 and not p.is_symlink()]
    assert not loose, loose
    # ... and the global model's tensors do not linger in the database's freed pages after the run
    from safetensors.numpy import load_file

    weights = load_file(next(run_dir.rglob("*.safetensors")))
    needles = [a.tobytes()[:64] for a in weights.values() if a.nbytes >= 256][:5]
    assert needles
    time.sleep(2)
    database = b"".join(p.read_bytes() for p in state.glob("superlink.db*"))
    assert not [n for n in needles if n in database], "model bytes found in the SuperLink's database files"


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
    superlink_log = fed.kits / "server" / "state" / "superlink.log"
    before = superlink_log.read_text(errors="replace").count("site h1 may act only as its own registered SuperNode")
    p = fed.start_site("h1", kit=rogue)
    # h1's certificate with a key the centre never registered: the gateway refuses every Fleet call (Flower's
    # SuperNode then keeps retrying; the centre's log names who knocked)
    wait_for(lambda: superlink_log.read_text(errors="replace").count(
        "site h1 may act only as its own registered SuperNode") > before, 120, "the gateway to refuse the rogue node",
        superlink_log)
    stop(p)
    assert "SuperNode ID" not in (rogue / "state" / "supernode.log").read_text(errors="replace")


def test_a_supernode_without_the_root_certificate_cannot_connect(fed: Federation) -> None:
    other = provision(ProvisionPlan(sites=["x"], out=fed.root / "kits-other"))  # another federation's CA
    stranger = fed.root / "kits-stranger" / "h2"
    shutil.copytree(fed.kits / "h2", stranger, ignore=shutil.ignore_patterns("state", "ledger"))
    shutil.copy(other / "ca" / "ca.crt", stranger / "ca.crt")
    p = fed.start_site("h2", kit=stranger)
    assert p.wait(timeout=120) == 2  # `medfed site` looks before it starts, and says why it cannot connect
    said = " ".join((fed.root / "site-h2.out").read_text(errors="replace").split())
    assert "is not this federation's" in said and "check --superlink and the kit's ca.crt" in said, said[-2000:]
    assert not (stranger / "state" / "supernode.log").exists()  # no SuperNode was started to retry forever


def test_a_site_killed_mid_round_leaves_the_round_to_the_others_and_can_rejoin(fed: Federation) -> None:
    before = fed.supernode_log("h3").count("Receiving: train message")
    p = fed.run("--data", "breastmnist", "--pretrain", "none", "--finetune-rounds", "2", "--width", "4",
                "--finetune-batch-size", "8", "--min-sites", "2", "--round-timeout", "300", "--run-name", "site-fault",
                log="run-site-fault.out")
    wait_for(lambda: fed.supernode_log("h3").count("Receiving: train message") > before, 300,
             "h3 to receive its first message", fed.kits / "h3" / "state" / "supernode.log", p)
    kill_tree(fed.sites["h3"].pid)  # the hospital's node dies mid-round (SIGKILL, no goodbye)
    assert p.wait(timeout=900) == 0, (fed.root / "run-site-fault.out").read_text()[-3000:]
    rows = Recorder.load(fed.root / "runs" / "site-fault" / "metrics.jsonl")
    for rnd in (1, 2):
        accepted = sorted(r["site"] for r in rows if r["round"] == rnd and r["split"] == "train" and r["accepted"])
        assert accepted == [0, 1], rows
    lost = [r for r in rows if r["split"] == "train" and not r["accepted"]]
    assert lost and all("site error" in r["reason"] for r in lost)
    assert {r["site"] for r in lost} == {2}  # named by the centre's registry (h3 is site 2), not "site -1"
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
        return any(("finetune", 2) == r[:2]
                   for rows in ledger_rows(fed, json.loads(state.read_text())["run_id"]).values() for r in rows)

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


# ------------------------------------------------------------------------------------------ attacks
# Issue 12's findings, replayed against the running federation: each must be refused with a clear
# message, and no marker written by an attacker's ClientApp or ServerApp may ever appear.

ATTACK_APP = '''
from pathlib import Path
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

MARKER = Path({marker!r})
client = ClientApp()
server = ServerApp()


@client.train()
def steal(msg: Message, context: Context) -> Message:
    MARKER.with_name("client-ran").write_text(str(context.node_config))  # the site's data and ledger paths
    return Message(msg.content, reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    MARKER.with_name("server-ran").write_text(open("/proc/1/cmdline").read())
'''


def attacker_app(fed: Federation) -> Path:
    app = fed.root / "attacker" / "stealapp"
    (app / "stealapp").mkdir(parents=True, exist_ok=True)
    (app / "stealapp" / "__init__.py").write_text("")
    (app / "stealapp" / "app.py").write_text(ATTACK_APP.format(marker=str(fed.root / "attacker" / "marker")))
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "stealapp"\nversion = "1.0.0"\ndependencies = []\n\n'
        '[tool.flwr.app]\npublisher = "eve"\n\n[tool.flwr.app.components]\n'
        'serverapp = "stealapp.app:server"\nclientapp = "stealapp.app:client"\n\n[tool.flwr.app.config]\n')
    return app


def no_marker(fed: Federation) -> None:
    time.sleep(2)
    left = sorted(p.name for p in (fed.root / "attacker").glob("*-ran"))
    assert not left, f"an attacker's app ran: {left}"


def attacker_cli(fed: Federation, name: str, cert: tuple[Path, Path] | None):
    from medfed.deploy.processes import ControlConnection, write_cli_config

    home = fed.root / "attacker" / name
    write_cli_config(home, fed.address, fed.kits / "h1" / "ca.crt")  # ca.crt is in every hospital's kit
    return ControlConnection(home, cert)


def test_attack_outsider_with_only_the_ca_certificate_cannot_submit_list_or_register(fed: Federation) -> None:
    """Attacks 1 and 4: `flwr run` of one's own app, `flwr ls`, `flwr supernode register`, with ca.crt only."""
    from medfed.deploy.processes import flwr_cli

    conn = attacker_cli(fed, "outsider", None)
    _, public = make_supernode_auth_key()
    (fed.root / "attacker" / "rogue.pub").write_bytes(public)
    for args in (["run", str(attacker_app(fed)), "medfed"], ["ls", "medfed"], ["log", "1", "medfed", "--show"],
                 ["supernode", "register", str(fed.root / "attacker" / "rogue.pub"), "medfed", "--name", "h9"]):
        result = flwr_cli(args, conn, timeout=120)
        said = result.stdout + result.stderr
        assert result.returncode != 0, (args, said)
        assert "certificate" in said.lower() or "handshake" in said.lower() or "connect" in said.lower(), (args, said)
    no_marker(fed)


def test_attack_outsider_with_nothing_cannot_start_a_run(fed: Federation) -> None:
    """Attack 2: Flower's Control HTTP client with verification off: no client certificate, no TLS session."""
    import httpx
    from flwr.proto.control_pb2 import StartRunRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.control import ControlHttpClient

    client = ControlHttpClient(f"https://{fed.address}", verify=False)
    with pytest.raises(httpx.HTTPError):
        client.StartRun(StartRunRequest())
    no_marker(fed)


def test_attack_one_hospitals_kit_cannot_submit_list_stop_or_unregister(fed: Federation) -> None:
    """Attacks 3 and 6: a hospital's own client certificate opens the Fleet API only, as its own node."""
    from medfed.deploy.processes import flwr_cli

    conn = attacker_cli(fed, "hospital", (fed.kits / "h1" / "site.crt", fed.kits / "h1" / "site.key"))
    for args in (["run", str(attacker_app(fed)), "medfed"], ["ls", "medfed"], ["supernode", "ls", "medfed"],
                 ["supernode", "unregister", "1", "medfed"], ["stop", "1", "medfed"]):
        result = flwr_cli(args, conn, timeout=120)
        assert result.returncode != 0 and "site h1 may not call" in result.stdout + result.stderr, args
    no_marker(fed)
    log = (fed.kits / "server" / "state" / "superlink.log").read_text(errors="replace")
    assert "refused POST /v1/control/start-run" in log  # the centre sees who tried


def test_attack_the_runtime_api_and_flowers_docs_are_closed_to_everyone_outside(fed: Federation) -> None:
    """Attacks 5 and 6: AcquireTask and /docs on the federation port, with the operator's own certificate."""
    import ssl

    import httpx

    context = ssl.create_default_context(cafile=str(fed.kits / "server" / "ca.crt"))
    context.load_cert_chain(str(fed.kits / "server" / "operator.crt"), str(fed.kits / "server" / "operator.key"))
    with httpx.Client(verify=context, timeout=10) as client:
        for method, path in (("POST", "/v1/runtime/acquire-task"), ("POST", "/v1/runtime/pull-messages"),
                             ("GET", "/docs"), ("GET", "/openapi.json")):
            response = client.request(method, f"https://{fed.address}{path}")
            assert response.status_code == 403 and "may not call" in response.text, (path, response.text)


def test_attack_an_app_no_site_approved_never_touches_a_sites_data(fed: Federation) -> None:
    """Attack 7: the operator (or whoever holds the operator's key) submits medfed with one line added to its
    ClientApp. Every site refuses it before installing it; the centre's ServerApp sees the refusals with the
    app's hash; each site's run log records the refusal; the legitimate app still runs afterwards (the full
    run above, and the fault tests below)."""
    from medfed.config import run_config
    from medfed.deploy.approval import build_app_fab, sha256_hex
    from medfed.deploy.launch import ServerKit
    from medfed.deploy.processes import ControlConnection, stage_app, submit_run, write_cli_config
    from medfed.deploy.run_log import run_log_file, verify_run_log
    from medfed.deploy.submit import run_settings, write_run_config

    marker = fed.root / "attacker" / "client-ran"
    app = stage_app(fed.root / "attacker" / "medfed-modified")
    clientapp = app / "medfed" / "client_app.py"
    clientapp.write_text(clientapp.read_text() + f"\nopen({str(marker)!r}, 'w').write('loaded at a site')\n")
    digest = sha256_hex(build_app_fab(app))
    conn = ControlConnection(fed.root / "attacker" / "operator-cli",
                             (fed.kits / "server" / "operator.crt", fed.kits / "server" / "operator.key"))
    write_cli_config(conn.flwr_home, fed.address, fed.kits / "server" / "ca.crt")
    cfg = run_settings(run_config(data=str(Path(fed.env["MEDFED_DATA_PATH"]) / "breastmnist.npz"), pretrain="none",
                                 finetune_rounds=1, width=4, finetune_batch_size=8, round_timeout=120,
                                 out_dir=str(fed.root / "runs"), run_name="unapproved"),
                       ServerKit.read(fed.kits / "server"))
    run_id = submit_run(app, write_run_config(cfg, fed.root / "attacker" / "run.toml"), conn)

    def refused_everywhere() -> bool:
        for site in SITES:
            path = run_log_file(fed.kits / site)
            if not path.exists() or not any(e["run_id"] == run_id and e["outcome"] == "refused"
                                            for e in verify_run_log(path)):
                return False
        return True

    wait_for(refused_everywhere, 300, "every site to refuse the unapproved app")
    for site in SITES:
        (entry,) = [e for e in verify_run_log(run_log_file(fed.kits / site)) if e["run_id"] == run_id]
        assert entry["app_sha256"] == digest and "not in its approved apps" in entry["reason"]
        logged = subprocess.run([*MEDFED, "site", "log", "--kit", str(fed.kits / site)], capture_output=True,
                                text=True, env=fed.env, timeout=120, check=False)
        assert logged.returncode == 0 and "refused" in logged.stdout + logged.stderr
    from medfed.deploy.processes import run_log as flower_run_log
    from medfed.deploy.processes import stop_run

    def centre_saw_it() -> bool:
        return digest[:12] in flower_run_log(run_id, conn) or "not in its approved apps" in flower_run_log(run_id, conn)

    wait_for(centre_saw_it, 300, "the ServerApp to log the sites' refusals")
    stop_run(run_id, conn)
    assert not marker.exists(), "the unapproved ClientApp was loaded at a site"
    no_marker(fed)
