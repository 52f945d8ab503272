"""Bad input to `medfed server | site | run`: a one-line error naming the thing and the rule, exit 2,
and no process started (these fail before Flower is touched)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfed.cli import app
from medfed.deploy.provision import ProvisionPlan, provision

runner = CliRunner()


def said(result) -> str:
    """The command's output with rich's line wrapping undone."""
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return provision(ProvisionPlan(sites=["h1"], out=tmp_path_factory.mktemp("k") / "kits"))


def test_server_without_a_kit_names_the_missing_file(tmp_path: Path) -> None:
    result = runner.invoke(app, ["server", "--kit", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "server.json" in said(result) and "not found" in said(result)


def test_site_with_the_template_data_path_asks_for_data(kits: Path) -> None:
    result = runner.invoke(app, ["site", "--kit", str(kits / "h1")])
    assert result.exit_code == 2 and "no data file" in said(result)
    assert not (kits / "h1" / "state").exists()  # nothing started, nothing written


def test_site_with_a_corrupt_data_file_names_it(kits: Path, tmp_path: Path) -> None:
    bad = tmp_path / "h1.npz"
    bad.write_bytes(b"not an npz")
    result = runner.invoke(app, ["site", "--kit", str(kits / "h1"), "--data", str(bad)])
    assert result.exit_code == 2 and "site h1" in said(result) and "h1.npz" in said(result)


def test_site_with_a_bad_superlink_address(kits: Path, shared_data: Path) -> None:
    result = runner.invoke(app, ["site", "--kit", str(kits / "h1"), "--data", str(shared_data / "breastmnist.npz"),
                                 "--superlink", "no-port"])
    assert result.exit_code == 2 and "--superlink must be HOST:PORT" in said(result)


def test_run_needs_a_kit_even_insecure() -> None:
    for extra in ([], ["--insecure"]):
        result = runner.invoke(app, ["run", *extra])
        assert result.exit_code == 2 and "--kit" in said(result)


@pytest.mark.parametrize("option", ["--mode", "--num-sites", "--baselines"])
def test_run_does_not_offer_what_a_deployment_sets_itself(option: str) -> None:
    help_text = said(runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"}))
    assert option not in help_text
    result = runner.invoke(app, ["run", "--kit", "x", option, "centralized"])
    assert result.exit_code == 2 and "No such option" in said(result)


def test_resume_warns_about_ignored_settings_and_needs_a_checkpoint(kits: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", "--kit", str(kits / "server"), "--resume", str(tmp_path), "--width", "8"])
    assert result.exit_code == 2
    assert "ignoring --width" in said(result) and "no checkpoint/state.json" in said(result)


def test_run_rejects_bad_settings_before_submitting(kits: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", "--kit", str(kits / "server"), "--min-sites", "9",
                                 "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 2 and "min-sites must be in [0, num-sites" in said(result)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--dp", "all"], "couples the examples of a batch"),  # SimCLR (the default) under DP pretraining
    (["--pretrain", "mae", "--encoder", "cnn"], "needs a vit encoder"),
])
def test_run_refuses_what_the_methods_cannot_serve_before_submitting(kits: Path, tmp_path: Path, args: list[str],
                                                                     message: str, data_path_env: Path) -> None:
    result = runner.invoke(app, ["run", "--kit", str(kits / "server"), *args, "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 2 and message in said(result)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("line", ['[experiment]\nmode = "centralized"\n', 'resume-from = "/runs/.r.partial"\n',
                                  '[privacy]\nledger-dir = "/elsewhere"\n'])
def test_a_run_toml_cannot_set_what_the_deployment_sets(kits: Path, tmp_path: Path, line: str) -> None:
    path = tmp_path / "run.toml"
    path.write_text(line)
    result = runner.invoke(app, ["run", "--kit", str(kits / "server"), "--config", str(path),
                                 "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 2 and "cannot be set for a deployment run" in said(result)
    assert not (tmp_path / "w").exists()


def test_start_txt_commands_work_from_the_kit_folder(kits: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kit's START.txt command, run where it says (in the kit folder), finds the kit: it gets as far
    as asking for the site's data, not "site.toml not found"."""
    line = [s for s in (kits / "h1" / "START.txt").read_text().splitlines() if s.startswith("medfed site")][0]
    monkeypatch.chdir(kits / "h1")
    result = runner.invoke(app, line.split()[1:])
    assert result.exit_code == 2 and "no data file" in said(result) and "not found" not in said(result)
    line = [s for s in (kits / "server" / "START.txt").read_text().splitlines() if s.startswith("medfed run")][0]
    monkeypatch.chdir(kits / "server")
    result = runner.invoke(app, [*line.split()[1:], "--min-sites", "9"])
    assert result.exit_code == 2 and "min-sites must be in" in said(result)  # the kit was read


def test_a_second_server_on_a_busy_port_fails_at_once_without_claiming_ready(kits: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = runner.invoke(app, ["server", "--kit", str(kits / "server"), "--host", "127.0.0.1", "--port",
                                     str(port), "--workdir", str(tmp_path / "state")])
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in said(result)
    assert "SuperLink ready" not in said(result)
    assert not (tmp_path / "state" / "superlink.log").exists()  # nothing was started


class _OneShotServer:
    """A listener on loopback that answers one connection: plain HTTP, or TLS with ``context``."""

    def __init__(self, context=None) -> None:
        import socket
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.context = context
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        try:
            if self.context is not None:
                conn = self.context.wrap_socket(conn, server_side=True)
            conn.recv(1024)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        except OSError:
            pass
        finally:
            conn.close()
            self.sock.close()


def test_site_probe_names_a_tls_mismatch_before_the_supernode_retries_forever(kits: Path) -> None:
    import ssl

    from medfed.deploy.launch import probe_superlink
    from medfed.exceptions import FederationError

    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(str(kits / "server" / "server.crt"), str(kits / "server" / "server.key"))
    server = _OneShotServer(tls)
    with pytest.raises(FederationError, match="does not speak plain HTTP .* without --insecure"):
        probe_superlink("127.0.0.1", server.port, ca_file=None, client_cert=None)
    plain = _OneShotServer()
    with pytest.raises(FederationError, match="does not speak TLS"):
        probe_superlink("127.0.0.1", plain.port, ca_file=kits / "h1" / "ca.crt",
                        client_cert=(kits / "h1" / "site.crt", kits / "h1" / "site.key"))
    other = provision(ProvisionPlan(sites=["h1"], out=kits.parent / "other-fed"))
    tls_other = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls_other.load_cert_chain(str(other / "server" / "server.crt"), str(other / "server" / "server.key"))
    stranger = _OneShotServer(tls_other)
    with pytest.raises(FederationError, match="is not this federation's"):
        probe_superlink("127.0.0.1", stranger.port, ca_file=kits / "h1" / "ca.crt",
                        client_cert=(kits / "h1" / "site.crt", kits / "h1" / "site.key"))
    from medfed.deploy.processes import free_port

    assert "not reachable yet" in probe_superlink("127.0.0.1", free_port(), ca_file=kits / "h1" / "ca.crt",
                                                  client_cert=None)


def test_certificates_near_expiry_warn_and_expired_ones_are_refused(kits: Path) -> None:
    import datetime as dt

    from cryptography import x509

    from medfed.deploy.launch import check_certificates
    from medfed.exceptions import ConfigError

    cert = kits / "h1" / "site.crt"
    ends = x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc
    warnings: list[str] = []
    check_certificates([cert], warnings.append, now=ends - dt.timedelta(days=40))
    assert warnings == []
    check_certificates([cert], warnings.append, now=ends - dt.timedelta(days=10))
    assert len(warnings) == 1 and "expires on" in warnings[0] and "10 days left" in warnings[0]
    with pytest.raises(ConfigError, match="expired on"):
        check_certificates([cert], warnings.append, now=ends + dt.timedelta(seconds=1))


def test_export_app_writes_the_release_fab_that_a_site_then_approves(kits: Path, tmp_path: Path) -> None:
    """The centre hands hospitals the exact bundle `medfed run` submits; a site approves that file."""
    import json as _json

    from medfed.deploy.approval import approvals_file, load_approvals, release_app_hash

    fab = tmp_path / "medfed.fab"
    result = runner.invoke(app, ["export-app", "--out", str(fab)])
    assert result.exit_code == 0 and f"sha256:{release_app_hash()}" in said(result)
    again = runner.invoke(app, ["export-app", "--out", str(fab)])
    assert again.exit_code == 2 and "already exists" in said(again)
    site = tmp_path / "h1"
    import shutil

    shutil.copytree(kits / "h1", site)
    approvals_file(site).unlink()  # a site that has approved nothing yet
    approved = runner.invoke(app, ["site", "approve", "--kit", str(site), "--fab", str(fab), "--yes", "--by", "it"])
    assert approved.exit_code == 0, approved.output
    assert [a.sha256 for a in load_approvals(approvals_file(site))] == [release_app_hash()]
    assert _json.loads(approvals_file(site).read_text())  # recorded on disk
