"""Who may call the centre's gateway, and what: identities from client certificates, and a decision per
request by identity and exact route (`medfed.deploy.gateway` serves Flower's SuperLink behind these).

======================  ============================================================
caller (certificate)    may call
======================  ============================================================
site ``S`` (OU=site)    ``/v1/fleet/*`` only, and only with the SuperNode key the
                        centre registered for ``S`` (so only as ``S``'s node); ``/health``
operator (OU=operator)  ``/v1/control/*`` (submit, list, stop, log, register); ``/health``
anyone                  nothing else: ``/v1/runtime/*``, ``/docs``, ``/openapi.json``, ...
======================  ============================================================

The runtime listener (127.0.0.1 only) serves ``/v1/runtime/*`` and ``/health`` (`authorize_runtime`).
"""

from __future__ import annotations

import binascii
import functools
from base64 import b64decode
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medfed.deploy.provision import ROLE_OPERATOR, ROLE_SITE

ROLES = (ROLE_SITE, ROLE_OPERATOR)
FLEET_PREFIX, CONTROL_PREFIX, RUNTIME_PREFIX = "/v1/fleet/", "/v1/control/", "/v1/runtime/"
HEALTH_PATH = "/health"
FLEET_PUBLIC_KEY_HEADER = "flwr-public-key"  # flwr.supercore.constant.FLEET_HTTP_PUBLIC_KEY_HEADER


# ---------------------------------------------------------------------------------------- who calls

@dataclass(frozen=True)
class Caller:
    """Who a client certificate names: a site (its name) or the centre's operator."""

    role: str
    name: str

    def __str__(self) -> str:
        return f"{self.role} {self.name}"


@functools.lru_cache(maxsize=256)
def caller_from_pem(pem: str) -> Caller | None:
    """The `Caller` a (CA-verified) client certificate names, or None if it names no medfed role:
    OU ``site``/``operator``, a common name, and the clientAuth extended key usage (so the
    SuperLink's own server certificate cannot stand in for a client)."""
    try:
        cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        return None
    units = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if len(units) != 1 or len(names) != 1 or units[0] not in ROLES:
        return None
    return Caller(str(units[0]), str(names[0]))


def supernode_key_wire_bytes(openssh_public_key: bytes) -> bytes:
    """A SuperNode public key as Flower (1.41-1.42) sends it in the ``flwr-public-key`` header (PEM
    SubjectPublicKeyInfo, `flwr.supercore.primitives.asymmetric.public_key_to_bytes`), from the
    OpenSSH line `medfed provision` writes."""
    key = serialization.load_ssh_public_key(openssh_public_key)
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class Policy:
    """What the federation listener admits: each site's SuperNode public key (wire form, from the
    server kit's registry) and the exact Fleet and Control routes the wrapped app serves."""

    site_keys: dict[str, bytes]
    fleet_routes: frozenset[str]
    control_routes: frozenset[str]

    @classmethod
    def for_app(cls, registry: Path, app: Any) -> Policy:
        """``registry/<site>.pub`` (OpenSSH lines, as `medfed provision` writes them) and ``app``'s routes."""
        keys = {p.stem: supernode_key_wire_bytes(p.read_bytes()) for p in sorted(registry.glob("*.pub"))}
        if not keys:
            raise ValueError(f"no site keys (*.pub) in {registry}")
        paths = app_route_paths(app)
        return cls(keys, frozenset(p for p in paths if p.startswith(FLEET_PREFIX)),
                   frozenset(p for p in paths if p.startswith(CONTROL_PREFIX)))


def app_route_paths(app: Any) -> set[str]:
    """Every route path of a FastAPI app (included routers too)."""
    from fastapi.routing import iter_route_contexts

    paths = set()
    for context in iter_route_contexts(app.routes):
        path = getattr(context.route, "path", None)
        if isinstance(path, str):
            paths.add(path)
    return paths


# ---------------------------------------------------------------------------------------- decisions

@dataclass(frozen=True)
class Decision:
    """Whether a request may pass; if not, the HTTP status and a reason (logged and returned)."""

    allowed: bool
    status: int = 200
    reason: str = ""


ALLOW = Decision(True)


def _deny(status: int, reason: str) -> Decision:
    return Decision(False, status, reason)


def _header(headers: Iterable[tuple[bytes, bytes]], name: str) -> list[bytes]:
    key = name.encode("latin-1")
    return [v for k, v in headers if k.lower() == key]


def authorize_federation(caller: Caller | None, method: str, path: str,
                         headers: Iterable[tuple[bytes, bytes]], policy: Policy) -> Decision:
    """The federation listener's rule (see the module docstring's table). Paths are matched exactly
    against the app's own Fleet and Control routes, never by prefix alone."""
    if caller is None:
        return _deny(403, "client certificate names no medfed site or operator")
    if path == HEALTH_PATH and method in ("GET", "HEAD"):
        return ALLOW
    if caller.role == ROLE_SITE and path in policy.fleet_routes:
        expected = policy.site_keys.get(caller.name)
        if expected is None:
            return _deny(403, f"site {caller.name} is not in the centre's registry")
        sent = _header(headers, FLEET_PUBLIC_KEY_HEADER)
        try:
            key = b64decode(sent[0], validate=True) if len(sent) == 1 else None
        except (binascii.Error, ValueError):
            key = None
        if key != expected:
            return _deny(403, f"site {caller.name} may act only as its own registered SuperNode")
        return ALLOW
    if caller.role == ROLE_OPERATOR and path in policy.control_routes:
        return ALLOW
    return _deny(403, f"{caller} may not call {path}")


def authorize_runtime(client_host: str | None, path: str) -> Decision:
    """The loopback runtime listener's rule: the Runtime API and health, from this machine only."""
    if client_host not in ("127.0.0.1", "::1"):
        return _deny(403, "the Runtime API is for the centre's own processes")
    if path == HEALTH_PATH or path.startswith(RUNTIME_PREFIX):
        return ALLOW
    return _deny(404, f"{path} is not served on the runtime listener")
