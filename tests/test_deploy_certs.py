"""``medfed deploy certs``: a CA that signs the server certificate for its host, per-site
node-authentication keys in the formats Flower reads, and one-line refusals of bad input."""

import json
import stat

import pytest

pytest.importorskip("cryptography")

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key, load_ssh_public_key
from typer.testing import CliRunner

from medfed.cli.app import app
from medfed.deploy.certs import make_certs, read_certs
from medfed.errors import ConfigError


def test_certs_round_trip(tmp_path):
    made = make_certs(tmp_path / "certs", ["a", "site-2"], host="fl.example.org")
    assert read_certs(tmp_path / "certs") == made
    ca = x509.load_pem_x509_certificate(made.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(made.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    alt = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(alt.get_values_for_type(x509.DNSName)) == {"fl.example.org", "localhost"}
    assert [str(ip) for ip in alt.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    server_key = load_pem_private_key(made.server_key.read_bytes(), None)
    assert server_key.public_key().public_numbers() == server.public_key().public_numbers()
    for site in ("a", "site-2"):
        keys = made.site(site)
        # the loaders flower-supernode (--auth-supernode-private-key) and `flwr supernode register` use
        private = load_ssh_private_key(keys.private_key.read_bytes(), None)
        public = load_ssh_public_key(keys.public_key.read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert public.public_numbers() == private.public_key().public_numbers()
        assert keys.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
        assert stat.S_IMODE(keys.private_key.stat().st_mode) == 0o600
    assert made.site("a").public_key.read_bytes() != made.site("site-2").public_key.read_bytes()
    assert stat.S_IMODE(made.ca_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(made.ca_cert.stat().st_mode) == 0o644
    index = json.loads((tmp_path / "certs" / "certs.json").read_text())
    assert index["sites"]["site-2"] == {"private_key": "site-site-2.key", "public_key": "site-site-2.pub"}
    with pytest.raises(ConfigError, match="site 'z' has no keys"):
        made.site("z")


def test_ip_host_is_in_the_certificate(tmp_path):
    made = make_certs(tmp_path, ["a"], host="10.1.2.3")
    server = x509.load_pem_x509_certificate(made.server_cert.read_bytes())
    alt = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(str(ip) for ip in alt.get_values_for_type(x509.IPAddress)) == ["10.1.2.3", "127.0.0.1"]


def test_existing_certificates_are_never_replaced(tmp_path):
    first = make_certs(tmp_path, ["a"])
    before = first.ca_key.read_bytes()
    with pytest.raises(ConfigError, match="already holds ca.crt, ca.key"):
        make_certs(tmp_path, ["b"])
    assert first.ca_key.read_bytes() == before
    assert not (tmp_path / "site-b.key").exists()


@pytest.mark.parametrize("sites, message", [
    (["a", "b b", "../x"], "--sites not allowed: 'b b', '../x'"),
    (["a", "a"], "--sites repeated: 'a'"),
    ([], "--sites needs at least one site name"),
])
def test_bad_site_names_are_one_error_and_write_nothing(tmp_path, sites, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        make_certs(tmp_path / "c", sites)
    assert not (tmp_path / "c").exists()


def test_cli_writes_certs_and_refuses_bad_input_in_one_line(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["deploy", "certs", "--out", str(tmp_path / "c"), "--sites", "a,b"])
    assert ok.exit_code == 0, ok.output
    assert read_certs(tmp_path / "c").sites.keys() == {"a", "b"}
    for args, message in (
        (["--out", str(tmp_path / "d"), "--sites", "a,a"], "--sites repeated: 'a'"),
        (["--out", str(tmp_path / "e"), "--sites", "a", "--host", "no such host!"], "--host 'no such host!'"),
        (["--out", str(tmp_path / "c"), "--sites", "c"], "already holds"),
    ):
        bad = runner.invoke(app, ["deploy", "certs", *args])
        assert bad.exit_code == 2
        assert message in bad.output and "Traceback" not in bad.output
        assert len(bad.output.strip().splitlines()) == 1
