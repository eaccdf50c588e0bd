"""TLS for the file origin: a self-signed certificate shipped in the package, and contexts.

Real result URLs are https. A client's download path (certificate checks, SNI, a TLS error mid-
file) deserves the same test as its API calls, without a network or a CA. The certificate in
``_data/files-cert.pem`` is self-signed, valid for 127.0.0.1, ::1 and localhost from 2000 to
2099 (``_data/README.md`` has the openssl commands), and it is public on purpose: it protects
nothing, it only lets a test say "trust exactly this".
"""

from __future__ import annotations

import importlib.resources
import ssl
from typing import Final

_DATA: Final = importlib.resources.files("kling_async.testing").joinpath("_data")


def certificate_pem() -> str:
    """The file origin's certificate, PEM."""
    return _DATA.joinpath("files-cert.pem").read_text(encoding="ascii")


def server_context() -> ssl.SSLContext:
    """What the file origin listens with: the shipped certificate and key, TLS 1.2 or newer."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    with (
        importlib.resources.as_file(_DATA.joinpath("files-cert.pem")) as cert,
        importlib.resources.as_file(_DATA.joinpath("files-key.pem")) as key,
    ):
        context.load_cert_chain(cert, key)
    return context


def client_context() -> ssl.SSLContext:
    """A client context with full verification that trusts the shipped certificate (only)."""
    return ssl.create_default_context(cadata=certificate_pem())
