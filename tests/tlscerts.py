"""A throwaway certificate authority for TLS tests, made with the ``openssl`` command.

The project has no X.509 library among its dependencies and the CLI is on every machine that
has OpenSSL, so certificates are made the way an operator would make them. The files land in a
world-readable directory, so an app running under a test uid can read the CA it verifies with.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TestCA", "make_ca"]

_CURVE = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]


@dataclass(frozen=True)
class TestCA:
    """A CA certificate and one server certificate (with its key) signed by it."""

    __test__ = False  # not a pytest test class

    ca_cert: Path
    server_cert: Path
    server_key: Path
    names: tuple[str, ...]


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)


def make_ca(directory: Path, names: tuple[str, ...]) -> TestCA:
    """A CA in ``directory`` and a server certificate for ``names`` (subjectAltName DNS).

    The extensions are the ones strict verifiers want (CA basicConstraints and keyUsage, key
    identifiers, serverAuth), so a failure in a test is the code's and not the certificate's.
    """
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    ca_key, ca_cert = directory / "ca.key", directory / "ca.pem"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    _openssl(
        "req", "-x509", "-new", "-nodes", *_CURVE, "-keyout", ca_key, "-out", ca_cert,
        "-days", "2", "-subj", "/CN=egress test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    _openssl(
        "req", "-new", "-nodes", *_CURVE, "-keyout", key, "-out", csr, "-subj", f"/CN={names[0]}"
    )
    extensions = directory / "server.ext"
    extensions.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n"
        f"subjectAltName={','.join(f'DNS:{name}' for name in names)}\n"
    )
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial",
        "-out", cert, "-days", "2", "-extfile", extensions,
    )  # fmt: skip
    ca_cert.chmod(0o644)
    return TestCA(ca_cert, cert, key, names)
