"""`medfed provision`: the keys and certificates of a federation, one kit folder per party.

Layout written under ``out`` (private keys 0600, folders 0700)::

    ca/ca.key, ca/ca.crt          the federation's root CA. ca.key signs server certificates:
                                  keep it offline; it is in no kit.
    server/                       the coordinating centre's kit (SuperLink)
      ca.crt, server.crt, server.key
      operator.crt, operator.key  the operator's client certificate (OU=operator): the only caller
                                  the SuperLink lets use its Control API (submit, list, stop runs)
      supernodes/<site>.pub       every site's SuperNode authentication public key (OpenSSH)
      ledger-keys/<site>.pub      every site's ledger-signing public key (for `medfed audit --trusted-keys`)
      server.json                 address, TLS SANs, sites, expiry
      START.txt                   the exact start command
    <site>/                       one kit per hospital (SuperNode)
      ca.crt                      the root certificate it trusts the SuperLink by
      site.crt, site.key          its client certificate (OU=site, CN=<site>): its identity at the
                                  SuperLink, which admits it to the Fleet API as <site>'s node only
      supernode-auth.key/.pub     its SuperNode authentication key pair (EC P-384, OpenSSH format,
                                  what ``flower-supernode --auth-supernode-private-key`` reads)
      ledger.ed25519.pem / .pub   its Ed25519 ledger-signing key (PEM PKCS8 / SubjectPublicKeyInfo)
      site.toml                   node config template: data path, ledger path, privacy budget
      approved-apps.json          the apps this site runs (0600): exactly this release's medfed app, the
                                  one `medfed run` of the same release submits (`medfed site approve`)
      START.txt                   the exact start command
    manifest.json                 fingerprints and expiry dates of everything above (no secrets)

Everything is generated into a hidden temporary folder next to ``out`` and renamed into place
when complete, so a failure leaves nothing half-written; an existing ``out`` is refused unless
``overwrite`` is set. Leaf certificates carry an expiry (``days``); the CA outlives them
(`ca_days`), so leaves can be re-issued from the same root without handing out new kits' roots.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medfed.constants import check_site_names
from medfed.deploy.processes import DEFAULT_PORT
from medfed.exceptions import ConfigError
from medfed.files import build_folder, write_private
from medfed.privacy.ledger import load_or_create_signing_key, public_key_hex

RESERVED_NAMES = frozenset({"ca", "server"})
CA_DIR, SERVER_DIR = "ca", "server"
CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
AUTH_KEY, AUTH_PUB = "supernode-auth.key", "supernode-auth.pub"
LEDGER_KEY, LEDGER_PUB = "ledger.ed25519.pem", "ledger.pub"
SITE_TOML, START_TXT, MANIFEST, SERVER_JSON = "site.toml", "START.txt", "manifest.json", "server.json"
SUPERNODE_KEYS_DIR, LEDGER_KEYS_DIR = "supernodes", "ledger-keys"
SITE_CERT, SITE_KEY = "site.crt", "site.key"
OPERATOR_CERT, OPERATOR_KEY = "operator.crt", "operator.key"
ROLE_SITE, ROLE_OPERATOR = "site", "operator"  # the OU of a client certificate (medfed.deploy.gateway reads it)
DEFAULT_SANS = ("localhost", "127.0.0.1", "::1")  # always in the server certificate: the centre's own
# processes (health check, ServerApp launcher) reach the SuperLink on loopback
MIN_CA_DAYS = 3650


def ca_days(days: int) -> int:
    """The CA's lifetime for leaf certificates of ``days``: at least ten years, and at least twice
    the leaves', so it never expires with (or before) the certificates it signed."""
    return max(MIN_CA_DAYS, 2 * days)


@dataclass(frozen=True)
class ProvisionPlan:
    """What to provision; validated on construction."""

    sites: list[str]
    out: Path
    server_address: str = "127.0.0.1"  # the host name or IP the sites dial (goes into START.txt and the SANs)
    sans: list[str] = field(default_factory=list)  # extra SANs, added to server_address and DEFAULT_SANS
    days: int = 365
    dp_epsilon: float = 8.0
    dp_delta: float = 1e-5

    def __post_init__(self) -> None:
        check_site_names(self.sites, reserved=RESERVED_NAMES)
        if not 1 <= self.days <= 3650:
            raise ConfigError(f"--days (certificate lifetime) must be in [1, 3650]; got {self.days}")
        for name in [self.server_address, *self.sans]:
            _san(name)  # raises on a bad entry
        if not self.dp_epsilon > 0:
            raise ConfigError(f"--dp-epsilon must be > 0; got {self.dp_epsilon}")
        if not 0 < self.dp_delta < 1:
            raise ConfigError(f"--dp-delta must be in (0, 1); got {self.dp_delta}")

    @property
    def all_sans(self) -> list[str]:
        """The server certificate's names: the address sites dial, the extra SANs, then the
        loopback names the centre's own processes use (each once)."""
        return list(dict.fromkeys([self.server_address, *self.sans, *DEFAULT_SANS]))


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    dns_name = (r"(?=.{1,253}$)([A-Za-z0-9*]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
                r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
    if not re.fullmatch(dns_name, name):
        raise ConfigError(f"subject alternative name {name!r} is neither an IP address nor a DNS name")
    return x509.DNSName(name)


def _write_public(path: Path, data: bytes | str) -> None:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(0o644)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":")


def _name(common_name: str, unit: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medfed federation")]
    if unit is not None:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    return x509.Name([*attributes, x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(days: int, now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed root CA (EC P-384), allowed to sign certificates only, valid ``days``."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name("medfed federation root CA")
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _leaf_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, subject: x509.Name, days: int,
               now: dt.datetime, usage: x509.ObjectIdentifier, *, key_encipherment: bool,
               sans: list[str] | None = None) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new EC P-384 key and its certificate for ``subject``, signed by the CA, valid ``days``, for one
    extended key usage (server or client authentication) only."""
    key = ec.generate_private_key(ec.SECP384R1())
    builder = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(s) for s in sans]), critical=False)
    cert = (
        builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=key_encipherment, data_encipherment=False, key_agreement=True,
                                     key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False),
                       critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, sans: list[str], days: int,
                     now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's TLS server certificate for ``sans`` (DNS names / IPs), signed by the CA."""
    return _leaf_cert(ca_key, ca_cert, _name(sans[0]), days, now, ExtendedKeyUsageOID.SERVER_AUTH,
                      key_encipherment=True, sans=sans)


def make_client_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, role: str, name: str,
                     days: int, now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A client certificate for mutual TLS, signed by the CA: subject OU ``role`` (site or
    operator) and CN ``name``, extended key usage clientAuth only (it cannot serve as a server's)."""
    if role not in (ROLE_SITE, ROLE_OPERATOR):
        raise ConfigError(f"client certificate role must be {ROLE_SITE} or {ROLE_OPERATOR}; got {role!r}")
    return _leaf_cert(ca_key, ca_cert, _name(name, role), days, now, ExtendedKeyUsageOID.CLIENT_AUTH,
                      key_encipherment=False)


def make_supernode_auth_key() -> tuple[bytes, bytes]:
    """A SuperNode authentication key pair as Flower (1.41-1.42) reads it: EC P-384 (a NIST curve), the
    private key in OpenSSH format, the public key as one OpenSSH line."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def site_toml(site: str, index: int, plan: ProvisionPlan) -> str:
    """The site's node config template; `medfed site` reads it (paths relative to the kit)."""
    return (
        f"# medfed node config of site {site!r}. Edit data-path; keep ledger-path on this hospital's own disk.\n"
        "# The budget below is this site's lifetime privacy budget: a run can lower it, never raise it.\n"
        f'site-name = "{site}"\n'
        f"site-id = {index}\n"
        'data-path = "/path/to/this/site/data.npz"  # this site\'s labels table (.csv), datalist (.json), class '
        "folders or MedMNIST-style .npz\n"
        '# cache-dir = "cache"  # where prepared cases are cached (default ~/.cache/medfed/cases)\n'
        f'ledger-path = "ledger/{site}.ledger.sqlite"\n'
        f'signing-key = "{LEDGER_KEY}"\n'
        f"dp-epsilon = {plan.dp_epsilon!r}\n"
        f"dp-delta = {plan.dp_delta!r}\n"
        'dp-require = "none"  # none | finetune | pretrain | all: phases this site trains only under DP\n'
        'device = "auto"  # auto (a GPU when there is one) | cpu | cuda | cuda:N: where this site trains\n'
    )


def provision(plan: ProvisionPlan, *, overwrite: bool = False) -> Path:
    """Create the CA, the server kit and one kit per site under ``plan.out``; returns ``plan.out``."""
    out = plan.out.expanduser()
    build_folder(out, lambda tmp: _build(plan, tmp), overwrite=overwrite, refusal="refusing to overwrite kits and keys")
    return out


def _build(plan: ProvisionPlan, root: Path) -> None:
    from medfed.deploy.approval import release_app_fab, sha256_hex, write_initial_approvals

    root.chmod(0o700)
    now = dt.datetime.now(dt.UTC)
    fab = release_app_fab()  # the app `medfed run` of this release submits; every kit ships approving it
    sans = plan.all_sans
    ca_key, ca_cert = make_ca(ca_days(plan.days), now)
    server_key, server_cert = make_server_cert(ca_key, ca_cert, sans, plan.days, now)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    for d in (CA_DIR, SERVER_DIR, f"{SERVER_DIR}/{SUPERNODE_KEYS_DIR}", f"{SERVER_DIR}/{LEDGER_KEYS_DIR}", *plan.sites):
        (root / d).mkdir(mode=0o700)
    write_private(root / CA_DIR / CA_KEY, _pem_private(ca_key))
    _write_public(root / CA_DIR / CA_CERT, ca_pem)
    server = root / SERVER_DIR
    _write_public(server / CA_CERT, ca_pem)
    _write_public(server / SERVER_CERT, server_cert.public_bytes(serialization.Encoding.PEM))
    write_private(server / SERVER_KEY, _pem_private(server_key))
    operator_key, operator_cert = make_client_cert(ca_key, ca_cert, ROLE_OPERATOR, "operator", plan.days, now)
    _write_public(server / OPERATOR_CERT, operator_cert.public_bytes(serialization.Encoding.PEM))
    write_private(server / OPERATOR_KEY, _pem_private(operator_key))
    expires = server_cert.not_valid_after_utc.isoformat()
    manifest: dict = {
        "created": now.isoformat(), "expires": expires, "ca_expires": ca_cert.not_valid_after_utc.isoformat(),
        "server_address": plan.server_address, "sans": sans, "ca_sha256": _fingerprint(ca_cert),
        "server_cert_sha256": _fingerprint(server_cert), "operator_cert_sha256": _fingerprint(operator_cert),
        "approved_app_sha256": sha256_hex(fab), "sites": {},
    }
    for index, site in enumerate(plan.sites):
        kit = root / site
        _write_public(kit / CA_CERT, ca_pem)
        site_key, site_cert = make_client_cert(ca_key, ca_cert, ROLE_SITE, site, plan.days, now)
        _write_public(kit / SITE_CERT, site_cert.public_bytes(serialization.Encoding.PEM))
        write_private(kit / SITE_KEY, _pem_private(site_key))
        auth_private, auth_public = make_supernode_auth_key()
        write_private(kit / AUTH_KEY, auth_private)
        _write_public(kit / AUTH_PUB, auth_public)
        _write_public(server / SUPERNODE_KEYS_DIR / f"{site}.pub", auth_public)
        signing = load_or_create_signing_key(kit / LEDGER_KEY)  # the ledger's own key writer (0600, atomic)
        ledger_public = signing.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo)
        _write_public(kit / LEDGER_PUB, ledger_public)
        _write_public(server / LEDGER_KEYS_DIR / f"{site}.pub", ledger_public)
        _write_public(kit / SITE_TOML, site_toml(site, index, plan))
        write_initial_approvals(kit, fab)
        _write_public(kit / START_TXT, (
            f"# Start this site's SuperNode (site {site}); it dials the SuperLink at "
            f"{plan.server_address}:{DEFAULT_PORT} over mutual TLS ({SITE_CERT}), authenticated by {AUTH_KEY}.\n"
            f"# 1. set data-path in {SITE_TOML}   2. run, in this folder (or name the folder's path after --kit):\n"
            f"medfed site --kit . --superlink {plan.server_address}:{DEFAULT_PORT}\n"))
        manifest["sites"][site] = {
            "site_id": index,
            "client_cert_sha256": _fingerprint(site_cert),
            "supernode_auth_public_key": auth_public.decode().strip(),
            "ledger_public_key": public_key_hex(signing),
        }
    _write_public(server / SERVER_JSON, json.dumps({
        "server_address": plan.server_address, "sans": sans, "sites": plan.sites, "expires": expires,
    }, indent=1))
    _write_public(server / START_TXT, (
        "# Start the SuperLink (mutual TLS, SuperNode authentication, the sites' keys registered), then submit\n"
        "# the run; in this folder (or name the folder's path after --kit):\n"
        "medfed server --kit .\n"
        "medfed run --kit . --data pneumoniamnist\n"))
    _write_public(root / MANIFEST, json.dumps(manifest, indent=1))
