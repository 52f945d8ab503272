"""The centre's front door (medfed.deploy.gateway): who may call which route, decided from the client
certificate and the SuperNode key, in unit tests of the rule and the ASGI glue, and against a real
gateway process on loopback (real TLS handshakes, real Flower app behind it)."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
from base64 import b64encode
from collections.abc import Iterator
from pathlib import Path

import pytest

from medfed.deploy.authorization import (
    Caller,
    Decision,
    Policy,
    authorize_federation,
    authorize_runtime,
    caller_from_pem,
    supernode_key_wire_bytes,
)
from medfed.deploy.gateway import Authorize
from medfed.deploy.processes import free_port, stop_tree, write_superexec_secret
from medfed.deploy.provision import ProvisionPlan, make_supernode_auth_key, provision

FLEET, CONTROL = "/v1/fleet/pull-messages", "/v1/control/start-run"


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return provision(ProvisionPlan(sites=["h1", "h2"], out=tmp_path_factory.mktemp("gw") / "kits"))


@pytest.fixture(scope="module")
def policy(kits: Path) -> Policy:
    from flwr.superlink.main import create_app

    return Policy.for_app(kits / "server" / "supernodes", create_app())


def key_header(kits: Path, site: str) -> list[tuple[bytes, bytes]]:
    wire = supernode_key_wire_bytes((kits / "server" / "supernodes" / f"{site}.pub").read_bytes())
    return [(b"flwr-public-key", b64encode(wire))]


H1, H2, OPERATOR = Caller("site", "h1"), Caller("site", "h2"), Caller("operator", "operator")


def test_the_policy_covers_flowers_routes_exactly(policy: Policy) -> None:
    assert FLEET in policy.fleet_routes and "/v1/fleet/push-messages" in policy.fleet_routes
    assert CONTROL in policy.control_routes and "/v1/control/register-node" in policy.control_routes
    assert not any(p.startswith("/v1/runtime/") for p in policy.fleet_routes | policy.control_routes)
    assert sorted(policy.site_keys) == ["h1", "h2"]


@pytest.mark.parametrize(("caller", "method", "path", "headers_of", "allowed", "reason"), [
    (None, "POST", FLEET, "h1", False, "names no medfed site or operator"),
    (None, "GET", "/health", None, False, "names no medfed site or operator"),
    (H1, "GET", "/health", None, True, ""),
    (OPERATOR, "GET", "/health", None, True, ""),
    (H1, "POST", "/health", None, False, "may not call"),
    (H1, "POST", FLEET, "h1", True, ""),
    (H1, "POST", FLEET, "h2", False, "only as its own registered SuperNode"),  # h1's certificate, h2's node key
    (H1, "POST", FLEET, None, False, "only as its own registered SuperNode"),
    (Caller("site", "h9"), "POST", FLEET, "h1", False, "not in the centre's registry"),
    (H1, "POST", CONTROL, None, False, "may not call /v1/control/start-run"),
    (H1, "POST", "/v1/control/unregister-node", None, False, "may not call"),
    (H1, "POST", "/v1/runtime/acquire-task", None, False, "may not call"),
    (OPERATOR, "POST", CONTROL, None, True, ""),
    (OPERATOR, "POST", "/v1/control/register-node", None, True, ""),
    (OPERATOR, "POST", FLEET, "h1", False, "may not call"),
    (OPERATOR, "POST", "/v1/runtime/acquire-task", None, False, "may not call"),
    (OPERATOR, "GET", "/docs", None, False, "may not call"),
    (OPERATOR, "GET", "/openapi.json", None, False, "may not call"),
    (H1, "POST", "/v1/fleet/../control/start-run", "h1", False, "may not call"),  # exact routes, not prefixes
    (H1, "POST", "/v1/fleet/pull-messages/", "h1", False, "may not call"),
    (OPERATOR, "POST", "/v1/control/start-run/../../runtime/acquire-task", None, False, "may not call"),
])
def test_who_may_call_what(kits: Path, policy: Policy, caller: Caller | None, method: str, path: str,
                           headers_of: str | None, allowed: bool, reason: str) -> None:
    headers = key_header(kits, headers_of) if headers_of else []
    decision = authorize_federation(caller, method, path, headers, policy)
    assert decision.allowed is allowed and reason in decision.reason
    if not allowed:
        assert decision.status == 403


def test_a_garbled_or_repeated_key_header_is_refused(kits: Path, policy: Policy) -> None:
    good = key_header(kits, "h1")
    for headers in ([(b"flwr-public-key", b"***not base64***")], good + good):
        assert not authorize_federation(H1, "POST", FLEET, headers, policy).allowed


def test_the_runtime_listener_serves_only_the_runtime_api_to_loopback() -> None:
    assert authorize_runtime("127.0.0.1", "/v1/runtime/acquire-task").allowed
    assert authorize_runtime("::1", "/health").allowed
    assert not authorize_runtime("10.0.0.7", "/v1/runtime/acquire-task").allowed
    assert not authorize_runtime(None, "/health").allowed
    for path in ("/v1/control/start-run", "/v1/fleet/pull-messages", "/docs", "/openapi.json"):
        assert authorize_runtime("127.0.0.1", path).status == 404


def test_certificates_that_name_no_role_name_no_caller(kits: Path, tmp_path: Path) -> None:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def cert(unit: str | None, eku: list) -> str:
        key = ec.generate_private_key(ec.SECP256R1())
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, "h1")]
        if unit:
            attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
        name = x509.Name(attrs)
        now = dt.datetime.now(dt.UTC)
        builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1)))
        if eku:
            builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()

    client = [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert caller_from_pem(cert("site", client)) == Caller("site", "h1")
    assert caller_from_pem(cert("admin", client)) is None  # an unknown role
    assert caller_from_pem(cert(None, client)) is None
    assert caller_from_pem(cert("site", [ExtendedKeyUsageOID.SERVER_AUTH])) is None
    assert caller_from_pem(cert("site", [])) is None
    assert caller_from_pem("not a certificate") is None


def test_the_middleware_answers_a_refusal_itself_and_passes_the_rest() -> None:
    import asyncio

    seen: list[str] = []

    async def app(scope, receive, send) -> None:
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard = Authorize(app, lambda scope: Decision(scope["path"] == "/ok", 403, "no"), "test")

    async def call(path: str) -> list[dict]:
        sent: list[dict] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": b""}

        async def send(message: dict) -> None:
            sent.append(message)

        await guard({"type": "http", "method": "POST", "path": path, "headers": [], "client": ("1.2.3.4", 5)},
                    receive, send)
        return sent

    refused = asyncio.run(call("/v1/control/start-run"))
    assert refused[0]["status"] == 403 and json.loads(refused[1]["body"]) == {"detail": "no"}
    assert seen == []  # the wrapped app never saw the refused request
    passed = asyncio.run(call("/ok"))
    assert passed[0]["status"] == 200 and seen == ["/ok"]


# ------------------------------------------------------------------------------ a real gateway process

@pytest.fixture(scope="module")
def gateway(kits: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    state = tmp_path_factory.mktemp("gw-state")
    port, runtime_port = free_port(), free_port()
    secret = write_superexec_secret(state / "superexec.secret")
    server = kits / "server"
    command = [sys.executable, "-m", "medfed.deploy.gateway", "--ca-cert", str(server / "ca.crt"),
               "--server-cert", str(server / "server.crt"), "--server-key", str(server / "server.key"),
               "--registry", str(server / "supernodes"), "--host", "127.0.0.1", "--port", str(port),
               "--runtime-port", str(runtime_port), "--database", str(state / "superlink.db"),
               "--superexec-secret", str(secret)]
    log = (state / "gateway.log").open("wb")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "FLWR_HOME": str(state / "flwr")})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, (state / "gateway.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        yield port, runtime_port
    finally:
        stop_tree(proc.pid)
        log.close()
    assert (state / "superlink.db").stat().st_mode & 0o077 == 0  # umask 077: the database is the owner's only


def https(port: int, path: str, *, ca: Path, cert: tuple[Path, Path] | None, method: str = "POST",
          headers: dict[str, str] | None = None) -> tuple[int, str]:
    import httpx

    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    with httpx.Client(verify=context, timeout=10) as client:
        response = client.request(method, f"https://127.0.0.1:{port}{path}", headers=headers or {})
    return response.status_code, response.text


def test_no_client_certificate_no_connection(kits: Path, gateway: tuple[int, int]) -> None:
    import httpx

    port, _ = gateway
    for path in ("/health", CONTROL, FLEET, "/docs"):
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            https(port, path, ca=kits / "server" / "ca.crt", cert=None)


def test_a_certificate_of_another_federation_is_refused_in_the_handshake(kits: Path, gateway: tuple[int, int],
                                                                         tmp_path: Path) -> None:
    import httpx

    other = provision(ProvisionPlan(sites=["h1"], out=tmp_path / "other"))
    with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
        https(gateway[0], "/health", ca=kits / "server" / "ca.crt", cert=(other / "h1/site.crt", other / "h1/site.key"))
    with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):  # a server cert is no client
        https(gateway[0], "/health", ca=kits / "server" / "ca.crt",
              cert=(kits / "server/server.crt", kits / "server/server.key"))


def test_routes_by_certificate_over_real_tls(kits: Path, gateway: tuple[int, int]) -> None:
    port, _ = gateway
    ca = kits / "server" / "ca.crt"
    site = (kits / "h1/site.crt", kits / "h1/site.key")
    operator = (kits / "server/operator.crt", kits / "server/operator.key")
    assert https(port, "/health", ca=ca, cert=site, method="GET")[0] == 200
    for path in (CONTROL, "/v1/control/list-runs", "/v1/control/unregister-node", "/v1/runtime/acquire-task",
                 "/docs", "/openapi.json"):
        status, body = https(port, path, ca=ca, cert=site, method="GET" if path.startswith("/docs") else "POST")
        assert status == 403 and "site h1 may not call" in body, (path, status, body)
    status, body = https(port, FLEET, ca=ca, cert=site,
                         headers={"flwr-public-key": key_header(kits, "h2")[0][1].decode()})
    assert status == 403 and "only as its own registered SuperNode" in body
    for path in (FLEET, "/v1/runtime/acquire-task", "/openapi.json"):
        assert https(port, path, ca=ca, cert=operator)[0] == 403
    # the operator reaches Flower's Control API (415: Flower itself answers, wanting protobuf)
    status, body = https(port, "/v1/control/list-runs", ca=ca, cert=operator)
    assert status == 415 and "Content-Type" in body


def test_the_runtime_listener_is_loopback_plain_and_claims_need_the_secret(gateway: tuple[int, int]) -> None:
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.runtime import RuntimeHttpClient

    _, runtime_port = gateway
    assert httpx.get(f"http://127.0.0.1:{runtime_port}/health", timeout=5).status_code == 200
    assert httpx.post(f"http://127.0.0.1:{runtime_port}{CONTROL}", timeout=5).status_code == 404
    client = RuntimeHttpClient.from_server_address(server_address=f"127.0.0.1:{runtime_port}", insecure=True,
                                                   root_certificates=None, interceptors=[])
    with pytest.raises(Exception, match="(?i)authentication|401|403"):  # no SuperExec secret: no task
        client.AcquireTask(AcquireTaskRequest())
    client.close()
    with socket.socket() as s:  # and nothing listens for the runtime API on other addresses
        s.settimeout(1)
        assert s.connect_ex(("127.0.0.2", runtime_port)) != 0


def test_a_rogue_node_key_cannot_be_registered_by_a_site(kits: Path, gateway: tuple[int, int]) -> None:
    """Attack 4: `flwr supernode register <own key>`: a site's certificate may not call the Control API."""
    from medfed.deploy.processes import ControlConnection, flwr_cli, write_cli_config

    home = kits.parent / "rogue-cli"
    write_cli_config(home, f"127.0.0.1:{gateway[0]}", kits / "server" / "ca.crt")
    _, public = make_supernode_auth_key()
    (home / "rogue.pub").write_bytes(public)
    result = flwr_cli(["supernode", "register", str(home / "rogue.pub"), "medfed", "--name", "h9"],
                      ControlConnection(home, (kits / "h1/site.crt", kits / "h1/site.key")))
    assert result.returncode != 0 and "site h1 may not call" in result.stdout + result.stderr
    operator = flwr_cli(["supernode", "ls", "medfed", "--format", "json"],
                        ControlConnection(home, (kits / "server/operator.crt", kits / "server/operator.key")))
    assert operator.returncode == 0, operator.stdout + operator.stderr
    assert "h9" not in operator.stdout


def _deleted_blob_left_on_disk(path: Path) -> bool:
    """Write a distinctive blob through a connection set up as Flower sets up its SQLite connections,
    delete it, checkpoint; whether its bytes are still in the database files."""
    import sqlite3

    from flwr.supercore import sql_mixin

    blob = os.urandom(16) * 256  # 4 KiB, a page's worth: never found by chance
    conn = sqlite3.connect(path, isolation_level=None)
    sql_mixin._set_sqlite_pragmas(conn, None)
    conn.execute("CREATE TABLE objects (id INTEGER PRIMARY KEY, content BLOB)")
    conn.execute("CREATE TABLE keep (id INTEGER PRIMARY KEY, content BLOB)")
    conn.execute("INSERT INTO keep (content) VALUES (?)", (b"x" * 9000,))
    conn.execute("INSERT INTO objects (content) VALUES (?)", (blob,))
    conn.execute("DELETE FROM objects")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return any(blob[:64] in p.read_bytes() for p in path.parent.glob(path.name + "*"))


def test_the_superlink_database_overwrites_what_flower_deletes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower deletes a run's messages and model objects when the run ends. Whether their bytes then stay in
    the file's free pages depends on how SQLite was built (Debian's defaults to secure_delete on, others
    off); the gateway turns it on explicitly."""
    from flwr.supercore import sql_mixin

    from medfed.flower_patches.sqlite_scrub import scrub_deleted_rows

    flowers = sql_mixin.SQLITE_PRAGMAS
    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", (*flowers, ("secure_delete", "OFF")))  # a build that is off
    assert _deleted_blob_left_on_disk(tmp_path / "flower.db")  # the problem there
    scrub_deleted_rows()
    assert ("secure_delete", "ON") in sql_mixin.SQLITE_PRAGMAS
    assert not _deleted_blob_left_on_disk(tmp_path / "gateway.db")
