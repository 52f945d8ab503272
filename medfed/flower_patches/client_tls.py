"""Client certificates for Flower's HTTP clients (mutual TLS with medfed's gateway).

Flower's SuperNode and ``flwr`` CLI verify the SuperLink by a root certificate but have no option
to present a certificate of their own: every protobuf-over-HTTP client Flower makes goes through
``flwr.supercore.protobuf.client.ProtobufClient.__init__`` with an ``httpx`` ``verify`` argument
(an ``ssl.SSLContext``, a CA file path, or True/False). `present_client_certificate` wraps that
constructor so that every TLS client of *this process* loads the given certificate chain into its
SSL context; plain-HTTP clients (``verify=False``: a ClientApp talking to its SuperNode on
loopback) are left alone. It is applied only in the processes medfed starts for that purpose:

* a site's SuperNode (``python -m medfed.flower_patches.flower_tuning supernode``), with the site's
  ``site.crt``/``site.key``, named by the environment variables `CERT_ENV`/`KEY_ENV`;
* the operator's ``flwr`` CLI calls (``python -m medfed.flower_patches.client_tls flwr ARGS``), with the
  server kit's ``operator.crt``/``operator.key``.

flwr is pinned (`medfed.flower_patches.FLOWER_VERSION`); the patch refuses to run if the constructor it wraps
has changed shape.
"""

from __future__ import annotations

import functools
import inspect
import os
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CERT_ENV, KEY_ENV = "MEDFED_TLS_CLIENT_CERT", "MEDFED_TLS_CLIENT_KEY"
_PATCHED = "__medfed_client_certificate__"


def ssl_context_with_certificate(verify: ssl.SSLContext | str | bool, cert: Path, key: Path) -> ssl.SSLContext:
    """``verify`` as httpx takes it (a context, a CA file, or True for the system roots), turned into a
    context that also presents ``cert``/``key``."""
    if isinstance(verify, ssl.SSLContext):
        context = verify
    elif isinstance(verify, str):
        context = ssl.create_default_context(cafile=verify)
    else:
        context = ssl.create_default_context()
    context.load_cert_chain(str(cert), str(key))
    return context


def present_client_certificate(cert: Path, key: Path) -> None:
    """Make every TLS client of Flower's protobuf-over-HTTP stack in this process present ``cert``."""
    from flwr.supercore.protobuf.client import ProtobufClient

    for path in (cert, key):
        if not Path(path).is_file():
            raise FileNotFoundError(f"client certificate file {path} not found")
    original = ProtobufClient.__init__
    if getattr(original, _PATCHED, False):
        return
    if "verify" not in inspect.signature(original).parameters:
        raise RuntimeError("flwr's ProtobufClient.__init__ takes no 'verify': not the flwr medfed pins")

    @functools.wraps(original)
    def init(self: Any, base_url: str, *args: Any, verify: ssl.SSLContext | str | bool = True, **kwargs: Any) -> None:
        if verify is not False and base_url.startswith("https://"):
            verify = ssl_context_with_certificate(verify, cert, key)
        original(self, base_url, *args, verify=verify, **kwargs)

    setattr(init, _PATCHED, True)
    ProtobufClient.__init__ = init  # type: ignore[method-assign]


def present_from_environment() -> bool:
    """`present_client_certificate` with the files named by `CERT_ENV`/`KEY_ENV`, if both are set."""
    cert, key = os.environ.get(CERT_ENV), os.environ.get(KEY_ENV)
    if not cert or not key:
        return False
    present_client_certificate(Path(cert), Path(key))
    return True


def client_certificate_env(cert: Path, key: Path) -> dict[str, str]:
    return {CERT_ENV: str(Path(cert).resolve()), KEY_ENV: str(Path(key).resolve())}


def run_flwr(argv: Sequence[str]) -> None:
    """``flwr ARGV`` presenting the certificate named in the environment."""
    if not present_from_environment():
        raise SystemExit(f"{CERT_ENV} and {KEY_ENV} must name the client certificate and key")
    from flwr.cli.app import app

    sys.argv = ["flwr", *argv]
    app()


if __name__ == "__main__":
    if sys.argv[1:2] != ["flwr"]:
        raise SystemExit("usage: python -m medfed.flower_patches.client_tls flwr [flwr options]")
    run_flwr(sys.argv[2:])
