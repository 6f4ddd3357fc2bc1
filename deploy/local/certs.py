"""A throwaway CA and server certificates for the local stack's TLS (``openssl`` CLI).

Everything is PEM: Elasticsearch reads a PEM key/certificate/CA from its config dir; Kafka a
PEM keystore (private key + certificate chain in one file, ``ssl.keystore.type=PEM``); Python
clients the CA file.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from deploy.local.errors import StackError


@dataclass(frozen=True)
class ServerCert:
    key: Path  # PKCS#8, unencrypted
    cert: Path
    ca: Path
    chain_pem: Path  # key + cert + CA, for a PEM keystore


def _openssl(args: list[str], cwd: Path) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise StackError(
            "TLS for the local stack needs the `openssl` command (apt install openssl)"
        )
    proc = subprocess.run(
        [binary, *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=120
    )
    if proc.returncode != 0:
        raise StackError(f"openssl {args[0]} failed:\n{proc.stdout}{proc.stderr}")


def make_ca(directory: Path, name: str = "sparse-ingest local CA") -> tuple[Path, Path]:
    """``(ca.crt, ca.key)`` in ``directory`` (made once; reused when present)."""
    directory.mkdir(parents=True, exist_ok=True)
    crt, key = directory / "ca.crt", directory / "ca.key"
    if crt.is_file() and key.is_file():
        return crt, key
    _openssl(
        [
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "30",
            "-keyout", key.name, "-out", crt.name, "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-addext", "subjectKeyIdentifier=hash",
        ],
        directory,
    )  # fmt: skip
    return crt, key


def make_server_cert(
    directory: Path, name: str, ca: tuple[Path, Path], hosts: tuple[str, ...] = ("127.0.0.1",)
) -> ServerCert:
    """A server certificate for ``hosts`` (IP addresses or DNS names, plus localhost)."""
    directory.mkdir(parents=True, exist_ok=True)
    key, csr, crt = (directory / f"{name}{ext}" for ext in (".key", ".csr", ".crt"))
    sans = [f"IP:{h}" if h.replace(".", "").isdigit() else f"DNS:{h}" for h in hosts]
    ext = directory / f"{name}.ext"
    ext.write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
        f"subjectAltName={','.join([*sans, 'DNS:localhost'])}\n"
    )
    _openssl(
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key.name, "-out", csr.name,
         "-subj", f"/CN={name}"],
        directory,
    )  # fmt: skip
    _openssl(
        ["x509", "-req", "-sha256", "-days", "30", "-in", csr.name, "-CA", str(ca[0]),
         "-CAkey", str(ca[1]), "-CAcreateserial", "-out", crt.name, "-extfile", ext.name],
        directory,
    )  # fmt: skip
    chain = directory / f"{name}.pem"
    chain.write_text(key.read_text() + crt.read_text() + ca[0].read_text())
    csr.unlink()
    return ServerCert(key=key, cert=crt, ca=ca[0], chain_pem=chain)
