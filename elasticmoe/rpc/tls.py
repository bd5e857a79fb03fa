"""mTLS of the internal plane (gateway and controller <-> expert shards): a per-release CA, gRPC credentials."""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import logging
import os
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

ENV_CA, ENV_CERT, ENV_KEY = "ELASTICMOE_TLS_CA", "ELASTICMOE_TLS_CERT", "ELASTICMOE_TLS_KEY"
# Every leaf certificate names this host; clients check it (not the shard's IP, which no certificate made
# before the pod started can know). Holding a certificate of the release's CA is what authenticates.
SERVER_NAME = "elasticmoe-internal"
CA_DAYS, LEAF_DAYS, RENEW_DAYS = 3650, 365, 7


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the CA bundle to trust, this process's certificate and its key."""

    ca: Path
    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()

    def stamp(self) -> tuple[float, ...]:
        """Modification times (a Secret volume swaps its files on update)."""
        return tuple(p.stat().st_mtime for p in (self.ca, self.cert, self.key))


def cache_dir() -> Path:
    """$ELASTICMOE_CACHE, else ~/.cache/elasticmoe (the rule of model.embedded.cache_dir; rpc/ may not import it)."""
    return Path(os.environ.get("ELASTICMOE_CACHE", Path.home() / ".cache" / "elasticmoe")).expanduser()


def tls_files() -> TlsFiles:
    """The files from ELASTICMOE_TLS_CA/_CERT/_KEY (a mounted Secret) when set, else the local CA's, made on
    first use under $ELASTICMOE_CACHE/tls."""
    env = {name: os.environ.get(name) for name in (ENV_CA, ENV_CERT, ENV_KEY)}
    if any(env.values()):
        missing = [name for name, v in env.items() if not v]
        if missing:
            raise ValueError(f"internal TLS: {', '.join(missing)} unset; set all of {ENV_CA}, {ENV_CERT}, {ENV_KEY}")
        files = TlsFiles(Path(env[ENV_CA]), Path(env[ENV_CERT]), Path(env[ENV_KEY]))
        for p in (files.ca, files.cert, files.key):
            if not p.is_file():
                raise FileNotFoundError(f"internal TLS: {p} does not exist")
        return files
    return local_ca(cache_dir() / "tls")


# ----- the local CA (make run, tests): made once, shared by every process on the machine
def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "elasticmoe"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: Path, data: bytes, private: bool) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(root: Path, name: str = "elasticmoe local CA") -> None:
    """A self-signed CA (ECDSA P-256, 10 years): root/ca.crt and root/ca.key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write(root / "ca.key", _pem_key(key), private=True)
    _write(root / "ca.crt", cert.public_bytes(serialization.Encoding.PEM), private=False)


def make_leaf(root: Path, days: int = LEAF_DAYS) -> None:
    """A certificate signed by root/ca.*, for both server and client use: root/tls.crt and root/tls.key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca_cert = x509.load_pem_x509_certificate((root / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((root / "ca.key").read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    san = x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME), x509.DNSName("localhost"),
                                       x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                       x509.IPAddress(ipaddress.ip_address("::1"))])
    cert = (x509.CertificateBuilder().subject_name(_name(SERVER_NAME)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(san, critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write(root / "tls.key", _pem_key(key), private=True)
    _write(root / "tls.crt", cert.public_bytes(serialization.Encoding.PEM), private=False)


def _expires_soon(cert_path: Path) -> bool:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    left = cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    return left < datetime.timedelta(days=RENEW_DAYS)


def local_ca(root: Path) -> TlsFiles:
    """The CA and leaf under `root`, made (or the leaf renewed) under a file lock: racing processes make one."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    files = TlsFiles(root / "ca.crt", root / "tls.crt", root / "tls.key")
    with open(root / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (files.ca.is_file() and (root / "ca.key").is_file()):
                make_ca(root)
                log.info("internal TLS: made a local CA in %s", root)
                for p in (files.cert, files.key):
                    p.unlink(missing_ok=True)
            if not (files.cert.is_file() and files.key.is_file()) or _expires_soon(files.cert):
                make_leaf(root)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return files


# ----- gRPC credentials
def server_credentials(files: TlsFiles | None = None) -> grpc.ServerCredentials:
    """TLS that requires a client certificate of the CA. Re-reads the files when they change (checked at each
    new connection), so a renewed certificate is served without a restart."""
    files = files or tls_files()
    state = {"stamp": files.stamp()}

    def config():
        ca, cert, key = files.read()
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch():
        try:
            stamp = files.stamp()
            if stamp == state["stamp"]:
                return None
            state["stamp"] = stamp
            return config()
        except (OSError, ValueError) as e:  # half-updated Secret: keep serving the current certificate
            log.warning("internal TLS: cannot reload %s: %s", files.cert, e)
            return None

    return grpc.dynamic_ssl_server_credentials(config(), fetch, require_client_authentication=True)


def channel_credentials(files: TlsFiles | None = None) -> grpc.ChannelCredentials:
    """This process's certificate, trusting only the CA bundle."""
    ca, cert, key = (files or tls_files()).read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


# ----- Python ssl contexts (the frame listener and its clients): the same files, the same rules as the gRPC ones
def _ssl_context(protocol: int, files: TlsFiles | None) -> ssl.SSLContext:
    """TLS 1.2+ with this process's certificate, trusting only the CA bundle."""
    f = files or tls_files()
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(f.cert, f.key)
    ctx.load_verify_locations(cafile=f.ca)
    return ctx


def server_ssl_context(files: TlsFiles | None = None) -> ssl.SSLContext:
    """Requires a client certificate of the CA (as server_credentials); no session tickets."""
    ctx = _ssl_context(ssl.PROTOCOL_TLS_SERVER, files)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.num_tickets = 0  # nothing written behind the reader's back: one thread reads, one writes
    return ctx


def client_ssl_context(files: TlsFiles | None = None) -> ssl.SSLContext:
    """The client side (PROTOCOL_TLS_CLIENT verifies the server's certificate; it must be named SERVER_NAME)."""
    return _ssl_context(ssl.PROTOCOL_TLS_CLIENT, files)


class Renewal:
    """Tells whether the TLS files changed since the last look, checked at most every `period_s`: a client then
    replaces its channels, so that it presents a renewed certificate (and trusts a new CA bundle)."""

    def __init__(self, insecure: bool = False, period_s: float = 30.0):
        self.insecure, self.period_s = insecure, period_s
        self._at = time.monotonic()
        self._stamp = None if insecure else self._read()

    @staticmethod
    def _read() -> tuple[float, ...] | None:
        try:
            return tls_files().stamp()
        except (OSError, ValueError):
            return None

    def due(self) -> bool:
        """Whether the next changed() looks at the files (else it answers False without looking)."""
        return not self.insecure and time.monotonic() - self._at >= self.period_s

    def changed(self) -> bool:
        if not self.due():
            return False
        self._at = time.monotonic()
        stamp = self._read()
        if stamp is None or stamp == self._stamp:
            return False
        self._stamp = stamp
        log.info("internal TLS: the certificate files changed; new channels use them")
        return True


def warn_insecure(who: str) -> None:
    log.warning("%s: internal gRPC is PLAINTEXT and unauthenticated (insecure_internal: true); anyone who reaches "
                "the expert ports can read hidden states and load, drop or run experts", who)


def add_port(server: Any, address: str, insecure: bool = False, files: TlsFiles | None = None) -> int:
    """Bind `address` on a grpc (or grpc.aio) server with mTLS, or plaintext when `insecure`; returns the port."""
    if insecure:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, server_credentials(files))


def channel(address: str, options: list[tuple[str, Any]] | None = None, insecure: bool = False,
            aio: bool = False, files: TlsFiles | None = None):
    """A grpc (or grpc.aio) channel to an internal server: mTLS, or plaintext when `insecure`."""
    mod = grpc.aio if aio else grpc
    options = list(options or [])
    if insecure:
        return mod.insecure_channel(address, options=options)
    options.append(("grpc.ssl_target_name_override", SERVER_NAME))
    return mod.secure_channel(address, channel_credentials(files), options=options)


def make_release_files(out: Path) -> TlsFiles:
    """A new CA under out/ca (its key stays there) and the files every node needs in out/node: ca.crt, tls.crt,
    tls.key (for `ray up` file_mounts; point ELASTICMOE_TLS_* at them)."""
    import shutil

    ca = local_ca(out / "ca")
    node = out / "node"
    node.mkdir(parents=True, exist_ok=True, mode=0o700)
    for src in (ca.ca, ca.cert, ca.key):
        shutil.copy2(src, node / src.name)
    return TlsFiles(node / "ca.crt", node / "tls.crt", node / "tls.key")


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(prog="python -m elasticmoe.rpc.tls", description=make_release_files.__doc__)
    p.add_argument("out", type=Path, help="directory, e.g. ~/.config/elasticmoe/tls")
    files = make_release_files(p.parse_args().out.expanduser())
    print(f"export {ENV_CA}={files.ca} {ENV_CERT}={files.cert} {ENV_KEY}={files.key}")
