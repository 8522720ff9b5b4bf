"""Certificates and keys for a test deployment: a CA, the server's TLS certificate, and one
node-authentication key pair per site.

What Flower 1.42 reads (checked in its sources):

- SuperLink ``--ssl-ca-certfile ca.crt --ssl-certfile server.crt --ssl-keyfile server.key``:
  PEM files. Its own ServerApp launcher verifies the server certificate against ``ca.crt``
  at the SuperLink's ``host:port``, so the certificate names that host (SAN).
- SuperNode ``--root-certificates ca.crt``: the PEM CA that verifies the SuperLink.
- SuperNode ``--auth-supernode-private-key site-a.key``: read with
  ``load_ssh_private_key``, so an OpenSSH-format (``BEGIN OPENSSH PRIVATE KEY``), unencrypted,
  elliptic-curve key; medfed makes ECDSA P-384 ones, as ``ssh-keygen -t ecdsa -b 384`` would.
- ``flwr supernode register site-a.pub`` (and the Control API's ``RegisterNode``): read with
  ``load_ssh_public_key``, a NIST curve required, so the OpenSSH public line
  ``ecdsa-sha2-nistp384 AAAA...``.

All files are written at once (nothing is left half-made), private keys readable by their
owner only, and ``certs.json`` indexes them so that other commands find them by site name.
The CA is a test CA: a real consortium has each party's keys made where they are used.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medfed.errors import ConfigError

INDEX = "certs.json"
CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
# a site name becomes a file name, a node-config value and a log field: keep it plain
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
VALID_DAYS = 365


@dataclass(frozen=True)
class SiteKeys:
    """One site's node-authentication key pair (OpenSSH formats, ECDSA P-384)."""

    name: str
    private_key: Path
    public_key: Path


@dataclass(frozen=True)
class CertSet:
    """The files of one certificate folder, as absolute paths."""

    folder: Path
    host: str
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    sites: dict[str, SiteKeys]

    def site(self, name: str) -> SiteKeys:
        if name not in self.sites:
            raise ConfigError(f"site {name!r} has no keys in {self.folder / INDEX}; it holds {', '.join(self.sites)}")
        return self.sites[name]


def site_key_names(site: str) -> tuple[str, str]:
    return f"site-{site}.key", f"site-{site}.pub"


def check_site_names(sites: Sequence[str]) -> list[str]:
    """The site names as given, or one ConfigError naming every name that is not allowed."""
    sites = list(sites)
    if not sites:
        raise ConfigError("--sites needs at least one site name, e.g. --sites a,b,c")
    bad = [s for s in sites if not isinstance(s, str) or not SITE_NAME.fullmatch(s)]
    seen: set[str] = set()
    repeated = sorted({s for s in sites if isinstance(s, str) and (s in seen or seen.add(s))})
    problems = []
    if bad:
        problems.append(f"not allowed: {', '.join(repr(s) for s in bad)} (a site name is 1-63 letters, digits, "
                        "'.', '_' or '-', starting with a letter or digit)")
    if repeated:
        problems.append(f"repeated: {', '.join(repr(s) for s in repeated)}")
    if problems:
        raise ConfigError("--sites " + "; ".join(problems))
    return sites


def _check_host(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The host as an IP address, None for a DNS name, or a ConfigError."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.fullmatch(host):
            raise ConfigError(f"--host {host!r} is neither an IP address nor a DNS name") from None
        return None


@contextlib.contextmanager
def _owner_only():
    """New files readable by their owner only, so no private key is ever readable by others, not
    even between its write and a chmod (the umask is per process: the CLI is single-threaded)."""
    before = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(before)


def make_certs(out: Path, sites: Sequence[str], host: str = "127.0.0.1", *, days: int = VALID_DAYS) -> CertSet:
    """Write a test CA, a server certificate for ``host`` (SAN: host, localhost, 127.0.0.1)
    and each site's node-authentication key pair into ``out``, with a ``certs.json`` index.

    A folder that already holds any of these files is refused: a new CA or key would silently
    lock out every party holding the old ones.
    """
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise ConfigError("medfed deploy certs needs the cryptography package: pip install 'medfed[deploy]'") from None

    from medfed.experiments.report import write_atomically

    sites = check_site_names(sites)
    host_ip = _check_host(host)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the certificates")
    names = [CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, INDEX] + [n for s in sites for n in site_key_names(s)]
    taken = [n for n in names if (out / n).exists() or (out / n).is_symlink()]
    if taken:
        raise ConfigError(f"--out {out} already holds {', '.join(taken)}; give a new folder "
                          "(a new CA or key would lock out everyone holding the old ones)")

    now = dt.datetime.now(dt.timezone.utc)
    valid = dict(not_valid_before=now - dt.timedelta(minutes=5), not_valid_after=now + dt.timedelta(days=days))
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "medfed test CA")])
    ca_cert = (
        x509.CertificateBuilder(subject_name=ca_name, issuer_name=ca_name, public_key=ca_key.public_key(),
                                serial_number=x509.random_serial_number(), **valid)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    alt: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    extra = x509.IPAddress(host_ip) if host_ip is not None else x509.DNSName(host)
    if extra not in alt:
        alt.insert(0, extra)
    server_cert = (
        x509.CertificateBuilder(subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]),
                                issuer_name=ca_name, public_key=server_key.public_key(),
                                serial_number=x509.random_serial_number(), **valid)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    files = {
        CA_CERT: lambda: ca_cert.public_bytes(serialization.Encoding.PEM),
        CA_KEY: lambda: pem_key(ca_key),
        SERVER_CERT: lambda: server_cert.public_bytes(serialization.Encoding.PEM),
        SERVER_KEY: lambda: pem_key(server_key),
    }
    index_sites = {}
    for site in sites:
        key = ec.generate_private_key(ec.SECP384R1())
        private_name, public_name = site_key_names(site)
        files[private_name] = lambda key=key: key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
        files[public_name] = lambda key=key, site=site: key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + f" medfed-{site}\n".encode()
        index_sites[site] = {"private_key": private_name, "public_key": public_name}
    index = {
        "written_by": "medfed deploy certs",
        "host": host,
        "subject_alt_names": [str(getattr(n, "value", n)) for n in alt],
        "not_valid_after": valid["not_valid_after"].isoformat(timespec="seconds"),
        "ca_cert": CA_CERT, "ca_key": CA_KEY, "server_cert": SERVER_CERT, "server_key": SERVER_KEY,
        "sites": index_sites,
    }
    files[INDEX] = lambda: (json.dumps(index, indent=1) + "\n").encode()

    out.parent.mkdir(parents=True, exist_ok=True)  # folders above keep the usual permissions
    with _owner_only():
        written = write_atomically(out, files, as_set=False)
    for path in written:
        if path.suffix in (".crt", ".pub", ".json"):
            path.chmod(0o644)  # what a party hands to the others
    return read_certs(out)


def read_certs(folder: Path) -> CertSet:
    """The certificate folder that ``make_certs`` wrote (or a party's copy of its share)."""
    folder = Path(folder).absolute()
    index_path = folder / INDEX
    try:
        index = json.loads(index_path.read_text())
        paths = {k: folder / index[k] for k in ("ca_cert", "ca_key", "server_cert", "server_key")}
        sites = {name: SiteKeys(name, folder / entry["private_key"], folder / entry["public_key"])
                 for name, entry in index["sites"].items()}
        host = str(index["host"])
    except FileNotFoundError:
        raise ConfigError(f"--certs {folder} has no {INDEX}; make one with `medfed deploy certs --out {folder} --sites ...`") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{index_path} is not a certificate index written by `medfed deploy certs`: {exc}") from None
    # each party holds only its share (a site: ca.crt and its own key), so the users of the
    # other files check them: here only the CA certificate every party needs
    if not paths["ca_cert"].is_file():
        raise ConfigError(f"--certs {folder} lacks {paths['ca_cert'].name}, which {INDEX} lists")
    return CertSet(folder, host, sites=sites, **paths)
