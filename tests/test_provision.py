"""`medfed provision` and the site files of a rehearsal: what a kit holds, its permissions, and bad input."""

from __future__ import annotations

import datetime as dt
import json
import stat
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key, load_ssh_public_key
from typer.testing import CliRunner

from medfed.cli import app
from medfed.deploy.provision import ProvisionPlan, provision
from medfed.exceptions import ConfigError

runner = CliRunner()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return provision(ProvisionPlan(sites=["h1", "h2"], out=tmp_path_factory.mktemp("p") / "kits",
                                   server_address="fl.example.org", sans=["localhost", "10.0.0.5"], days=30))


def test_every_private_key_is_0600_and_the_ca_key_is_in_no_kit(kits: Path) -> None:
    private = sorted(p.relative_to(kits).as_posix() for p in kits.rglob("*") if p.is_file() and mode(p) == 0o600)
    assert private == ["ca/ca.key", "h1/approved-apps.json", "h1/ledger.ed25519.pem", "h1/site.key",
                       "h1/supernode-auth.key", "h2/approved-apps.json", "h2/ledger.ed25519.pem", "h2/site.key",
                       "h2/supernode-auth.key", "server/operator.key", "server/server.key"]
    assert all(mode(p) == 0o644 for p in kits.rglob("*")
               if p.is_file() and p.relative_to(kits).as_posix() not in private)
    assert all(mode(d) == 0o700 for d in [kits, *[p for p in kits.rglob("*") if p.is_dir()]])
    for kit in ("server", "h1", "h2"):
        assert not (kits / kit / "ca.key").exists()


def test_server_certificate_chains_to_the_ca_with_the_sans_and_an_expiry(kits: Path) -> None:
    ca = x509.load_pem_x509_certificate((kits / "ca/ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((kits / "server/server.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # extra SANs add to the loopback names the centre's own processes use; they never replace them
    assert sans.get_values_for_type(x509.DNSName) == ["fl.example.org", "localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5", "127.0.0.1", "::1"]
    lifetime = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=29) < lifetime <= dt.timedelta(days=30)
    # the CA outlives every leaf it signed (ten years at least)
    assert ca.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=3649)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for kit in ("server", "h1", "h2"):  # every party trusts the same root
        assert (kits / kit / "ca.crt").read_bytes() == (kits / "ca/ca.crt").read_bytes()
    key = load_pem_private_key((kits / "server/server.key").read_bytes(), None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_site_keys_are_in_the_formats_flower_and_the_ledger_read(kits: Path) -> None:
    manifest = json.loads((kits / "manifest.json").read_text())
    for site in ("h1", "h2"):
        auth = load_ssh_private_key((kits / site / "supernode-auth.key").read_bytes(), None)
        assert isinstance(auth, ec.EllipticCurvePrivateKey) and auth.curve.name == "secp384r1"
        public = load_ssh_public_key((kits / "server/supernodes" / f"{site}.pub").read_bytes())
        assert public.public_numbers() == auth.public_key().public_numbers()
        signing = load_pem_private_key((kits / site / "ledger.ed25519.pem").read_bytes(), None)
        assert isinstance(signing, ed25519.Ed25519PrivateKey)
        assert manifest["sites"][site]["ledger_public_key"] == signing.public_key().public_bytes_raw().hex()
        assert (kits / "server/ledger-keys" / f"{site}.pub").read_bytes() == (kits / site / "ledger.pub").read_bytes()
    # two sites never share a key
    assert (kits / "h1/supernode-auth.pub").read_bytes() != (kits / "h2/supernode-auth.pub").read_bytes()
    assert 'site-name = "h1"' in (kits / "h1/site.toml").read_text()
    assert "medfed site --kit . --superlink fl.example.org:9092" in (kits / "h1/START.txt").read_text()


@pytest.mark.parametrize(("kit", "cert", "key", "role", "name"), [
    ("h1", "site.crt", "site.key", "site", "h1"), ("h2", "site.crt", "site.key", "site", "h2"),
    ("server", "operator.crt", "operator.key", "operator", "operator")])
def test_client_certificates_name_their_holder_and_serve_only_as_clients(kits: Path, kit: str, cert: str, key: str,
                                                                         role: str, name: str) -> None:
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from medfed.deploy.authorization import Caller, caller_from_pem

    ca = x509.load_pem_x509_certificate((kits / "ca/ca.crt").read_bytes())
    pem = (kits / kit / cert).read_text()
    leaf = x509.load_pem_x509_certificate(pem.encode())
    leaf.verify_directly_issued_by(ca)
    usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert load_pem_private_key((kits / kit / key).read_bytes(), None).public_key().public_numbers() == \
        leaf.public_key().public_numbers()
    assert caller_from_pem(pem) == Caller(role, name)
    # the server certificate is no client: it names no role and lacks clientAuth
    assert caller_from_pem((kits / "server/server.crt").read_text()) is None


def test_every_kit_ships_approving_exactly_this_releases_app(kits: Path) -> None:
    from medfed.deploy.approval import approvals_file, load_approvals, release_app_hash

    expected = release_app_hash()
    assert json.loads((kits / "manifest.json").read_text())["approved_app_sha256"] == expected
    for site in ("h1", "h2"):
        approvals = load_approvals(approvals_file(kits / site))
        assert [a.sha256 for a in approvals] == [expected]


def test_an_existing_kit_folder_is_refused_unless_forced(kits: Path) -> None:
    before = (kits / "ca/ca.crt").read_bytes()
    with pytest.raises(ConfigError, match="already exists; refusing to overwrite"):
        provision(ProvisionPlan(sites=["h1"], out=kits))
    assert (kits / "ca/ca.crt").read_bytes() == before
    assert [p.name for p in kits.parent.iterdir() if p.name.startswith(".")] == []


BAD_PLANS = [
    ({"sites": []}, "at least one site"),
    ({"sites": ["H1"]}, "site name 'H1' must be"),
    ({"sites": ["server"]}, "not one of"),
    ({"sites": ["h1", "h1"]}, "names a site twice"),
    ({"sites": ["h1"], "days": 0}, "--days"),
    ({"sites": ["h1"], "sans": ["bad name!"]}, "neither an IP address nor a DNS name"),
    ({"sites": ["h1"], "dp_delta": 1.0}, "--dp-delta must be in"),
    ({"sites": ["h1"], "dp_epsilon": 0.0}, "--dp-epsilon must be > 0"),
]


@pytest.mark.parametrize(("changes", "message"), BAD_PLANS)
def test_bad_plans_are_refused(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        provision(ProvisionPlan(out=tmp_path / "kits", **changes))
    assert list(tmp_path.iterdir()) == []


def test_cli_provision_writes_kits_and_refuses_a_second_time(tmp_path: Path) -> None:
    out = tmp_path / "kits"
    result = runner.invoke(app, ["provision", "--sites", "a,b,c", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["a", "b", "c", "ca", "manifest.json", "server"]
    again = runner.invoke(app, ["provision", "--sites", "a", "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in " ".join(again.output.split())


def test_site_files_hold_disjoint_shares_of_every_split(tmp_path: Path, shared_data: Path) -> None:
    from medfed.data.site_files import write_site_files

    files = write_site_files(str(shared_data / "breastmnist.npz"), ["h1", "h2", "h3"], tmp_path / "sites")
    with np.load(shared_data / "breastmnist.npz") as npz:
        sizes = {s: len(npz[f"{s}_labels"]) for s in ("train", "val", "test")}
    shares = {s: 0 for s in sizes}
    for site, path in files.items():
        assert path == tmp_path / "sites" / site / "breastmnist.npz"
        with np.load(path) as npz:
            for s in sizes:
                shares[s] += len(npz[f"{s}_labels"])
                assert npz[f"{s}_images"].shape[1:] == (28, 28)
    assert shares == sizes  # every image goes to exactly one site (iid cut of each split)
    with pytest.raises(ConfigError, match="already exists"):
        write_site_files(str(shared_data / "breastmnist.npz"), ["h1"], tmp_path / "sites")
