"""The coordinating centre's front door: Flower's SuperLink served with mutual TLS and
authorization by identity and route.

Why. Flower's ``flower-superlink`` serves the Fleet, Control and Runtime APIs on one HTTPS
port and authenticates nobody on two of them: its open-source Control API takes any caller
(``NoOpControlAuthnPlugin``), and in its default subprocess isolation the Runtime API hands the
ServerApp's task to whoever asks first (the SuperExec secret is ignored there). TLS proves the
server to the client, never the client to the server. Anyone who could reach the port could
submit an app that then ran at every hospital.

What. This module runs *Flower's own* SuperLink application (``flwr.superlink.main.create_app``
with Flower's ``SuperLinkLifespan``), unchanged, behind two uvicorn listeners in one process:

* the **federation listener** (``--host``/``--port``, what the hospitals dial) requires a client
  certificate issued by the federation's CA (``ssl.CERT_REQUIRED``; the handshake fails without
  one) and then authorizes every request by who the certificate names and which route it asks for
  (`medfed.deploy.authorization.authorize_federation`, whose module docstring has the table: a site
  calls Fleet routes as its own registered node only, the operator Control routes, anyone nothing else);

* the **runtime listener** binds 127.0.0.1 only and serves ``/v1/runtime/*`` and ``/health``
  (`authorize_runtime`): the centre's own SuperExec and ServerApp processes. The SuperLink runs
  in Flower's ``process`` isolation with a fresh SuperExec secret (0600): Flower then requires an
  HMAC of that secret on ``AcquireTask``, so no other local process can claim the ServerApp's task;
  every later runtime call carries the task's token.

The client certificate reaches the authorizer through the ASGI TLS extension
(``scope["extensions"]["tls"]["client_cert_chain"]``), which `PeerCertificateProtocol` fills from
the connection's TLS session (uvicorn 0.49 does not fill it itself). TLS itself is Python's
``ssl`` module through uvicorn's own settings; nothing here parses TLS.

Two gaps of Flower's own Fleet API are closed in this process: a site may push only its own
node's replies (`check_pushed_reply`; Flower would store a site's push as a new instruction to
another node, or credit a reply to whichever node it names), and Flower's unauthenticated legacy
gRPC servers are never started (`refuse_flower_backdoors`).

The process also runs with umask 077 (everything the SuperLink and the ServerApps it starts
write is 0600/0700) and turns on SQLite's ``secure_delete`` for the SuperLink's database, so the
messages and model objects Flower deletes when a run ends are overwritten, not left in free pages.

    python -m medfed.deploy.gateway --kit KIT/server --host 0.0.0.0 --port 9092 \\
        --runtime-port 9093 --database STATE/superlink.db --superexec-secret STATE/superexec.secret
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import ssl
import sys
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfed.deploy.authorization import (
    Decision,
    Policy,
    authorize_federation,
    authorize_runtime,
    caller_from_pem,
)
from medfed.flower_patches.fleet_push import bind_pushed_replies
from medfed.flower_patches.sqlite_scrub import scrub_deleted_rows

log = logging.getLogger("medfed.gateway")


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# ---------------------------------------------------------------------------------------- ASGI glue

def client_cert_pem(scope: Scope) -> str | None:
    """The client's leaf certificate from the ASGI TLS extension, if any."""
    tls = (scope.get("extensions") or {}).get("tls") or {}
    chain = tls.get("client_cert_chain") or []
    return str(chain[0]) if chain else None


class Authorize:
    """ASGI middleware: ``decide(scope)`` for every HTTP request before the wrapped app sees it;
    a refusal is answered here (JSON ``{"detail": reason}``) and logged with the caller."""

    def __init__(self, app: ASGIApp, decide: Callable[[Scope], Decision], listener: str) -> None:
        self.app, self.decide, self.listener = app, decide, listener

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # websockets: nothing in the SuperLink needs them
            await send({"type": "websocket.close", "code": 1008})
            return
        decision = self.decide(scope)
        if decision.allowed:
            await self.app(scope, receive, send)
            return
        client = scope.get("client") or ("?", 0)
        log.warning("%s listener refused %s %s from %s:%s: %s", self.listener, scope.get("method"),
                    scope.get("path"), client[0], client[1], decision.reason)
        body = json.dumps({"detail": decision.reason}).encode()
        await send({"type": "http.response.start", "status": decision.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def federation_guard(app: ASGIApp, policy: Policy) -> Authorize:
    def decide(scope: Scope) -> Decision:
        pem = client_cert_pem(scope)
        caller = caller_from_pem(pem) if pem else None
        return authorize_federation(caller, str(scope.get("method", "")), str(scope.get("path", "")),
                                    scope.get("headers") or [], policy)

    return Authorize(app, decide, "federation")


def runtime_guard(app: ASGIApp) -> Authorize:
    def decide(scope: Scope) -> Decision:
        client = scope.get("client")
        return authorize_runtime(client[0] if client else None, str(scope.get("path", "")))

    return Authorize(app, decide, "runtime")


def _peer_certificate_protocol() -> type:
    """uvicorn's httptools protocol that, once the TLS handshake is done, hands every request of
    the connection the client's certificate in the ASGI TLS extension."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class PeerCertificateProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            ssl_object = transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            chain = [ssl.DER_cert_to_PEM_cert(der)] if der else []
            inner = self.app

            async def with_tls(scope: Scope, receive: Receive, send: Send) -> None:
                scope.setdefault("extensions", {})["tls"] = {"client_cert_chain": chain, "server_cert": None}
                await inner(scope, receive, send)

            self.app = with_tls

    return PeerCertificateProtocol


# ---------------------------------------------------------------------------------------- Flower's gaps

def refuse_flower_backdoors(env: Mapping[str, str]) -> None:
    """Flower (1.41-1.42) also starts unauthenticated legacy gRPC Control/Fleet servers when asked through
    the environment; a gateway never runs beside them."""
    from medfed.deploy.processes import FLOWER_BACKDOORS

    set_ = [name for name in FLOWER_BACKDOORS if env.get(name)]
    if set_:
        raise SystemExit(f"refusing to start: {', '.join(set_)} would open Flower's unauthenticated gRPC APIs "
                         "beside the gateway; unset it")


# ---------------------------------------------------------------------------------------- the process

@dataclass(frozen=True)
class GatewaySettings:
    """What `serve` needs; every path absolute."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    registry_dir: Path
    host: str
    port: int
    runtime_port: int
    database: Path
    superexec_secret: Path


def superlink_app(settings: GatewaySettings) -> Any:
    """Flower's SuperLink FastAPI app: process isolation with the SuperExec secret, SuperNode
    authentication on, TLS material as ``flower-superlink`` would load it, runtime installs off."""
    from flwr.common.constant import ISOLATION_MODE_PROCESS, TRANSPORT_TYPE_GRPC_RERE
    from flwr.supercore.auth import load_superexec_auth_secret
    from flwr.superlink.cli.flower_superlink import SuperLinkLifespan
    from flwr.superlink.config_loader import SuperLinkLifespanConfig, load_control_authn_plugin
    from flwr.superlink.main import create_app

    certificates = (settings.ca_cert.read_bytes(), settings.server_cert.read_bytes(), settings.server_key.read_bytes())
    config = SuperLinkLifespanConfig(
        control_address="127.0.0.1:0", health_server_address=None, host="127.0.0.1", port=settings.runtime_port,
        insecure=False, certificates=certificates,
        superexec_auth_secret=load_superexec_auth_secret(str(settings.superexec_secret)),
        authn_plugin=load_control_authn_plugin(), event_log_plugin=None, fleet_event_log_plugin=None,
        enable_event_log=False, artifact_provider=None, enable_supernode_auth=True,
        fleet_api_type=TRANSPORT_TYPE_GRPC_RERE, fleet_api_address=None, simulation=False,
        ssl_ca_certfile=str(settings.ca_cert), ssl_certfile=str(settings.server_cert),
        ssl_keyfile=str(settings.server_key), database=str(settings.database), isolation=ISOLATION_MODE_PROCESS,
        runtime_dependency_install=False)
    return create_app(config, SuperLinkLifespan)


def _servers(settings: GatewaySettings, app: Any) -> tuple[Any, Any]:
    import uvicorn

    policy = Policy.for_app(settings.registry_dir, app)
    federation = uvicorn.Config(
        federation_guard(app, policy), host=settings.host, port=settings.port, http=_peer_certificate_protocol(),
        ssl_certfile=str(settings.server_cert), ssl_keyfile=str(settings.server_key),
        ssl_ca_certs=str(settings.ca_cert), ssl_cert_reqs=ssl.CERT_REQUIRED, lifespan="on",
        log_level="info", access_log=False, timeout_graceful_shutdown=5)
    runtime = uvicorn.Config(runtime_guard(app), host="127.0.0.1", port=settings.runtime_port, http="httptools",
                             lifespan="off", log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    return uvicorn.Server(federation), uvicorn.Server(runtime)


async def _serve_both(federation: Any, runtime: Any) -> None:
    """Both listeners in one event loop; the federation server owns the app's lifespan and the
    signal handling, and the runtime listener stops with it."""
    runtime_task = asyncio.create_task(runtime.serve())
    while not runtime.started:
        if runtime_task.done():
            runtime_task.result()  # raises the bind error
            raise SystemExit("the runtime listener stopped before it started")
        await asyncio.sleep(0.05)
    try:
        await federation.serve()
    finally:
        runtime.should_exit = True
        await runtime_task
    if not federation.started:
        raise SystemExit(
            f"the federation listener could not start on {federation.config.host}:{federation.config.port}"
        )


def serve(settings: GatewaySettings) -> None:
    refuse_flower_backdoors(os.environ)
    os.umask(0o077)
    scrub_deleted_rows()
    bind_pushed_replies()
    federation, runtime = _servers(settings, superlink_app(settings))
    asyncio.run(_serve_both(federation, runtime))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m medfed.deploy.gateway", description=__doc__.splitlines()[0])
    parser.add_argument("--ca-cert", required=True)
    parser.add_argument("--server-cert", required=True)
    parser.add_argument("--server-key", required=True)
    parser.add_argument("--registry", required=True, help="folder of the sites' SuperNode public keys (<site>.pub)")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--runtime-port", type=int, required=True)
    parser.add_argument("--database", required=True)
    parser.add_argument("--superexec-secret", required=True)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(GatewaySettings(
        ca_cert=Path(args.ca_cert).resolve(), server_cert=Path(args.server_cert).resolve(),
        server_key=Path(args.server_key).resolve(), registry_dir=Path(args.registry).resolve(), host=args.host,
        port=args.port, runtime_port=args.runtime_port, database=Path(args.database).resolve(),
        superexec_secret=Path(args.superexec_secret).resolve()))


if __name__ == "__main__":
    main()
