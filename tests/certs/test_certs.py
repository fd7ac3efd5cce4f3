"""Certificate tooling: the CA, the SuperLink's TLS certificate, site keys and their status."""

from __future__ import annotations

import datetime as dt
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from certs import authority as a
from tests.paths import REPO


def _handshake(d: Path, ca_file: Path, server_hostname: str) -> None:
    """A TLS handshake in memory: a server with ``d``'s certificate, a client trusting ``ca_file``."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(d / a.SERVER_CERT, d / a.SERVER_KEY)
    client_ctx = ssl.create_default_context(cafile=str(ca_file))
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(10):
        for name, end in (("c", client), ("s", server)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


@pytest.fixture()
def ca_dir(tmp_path: Path) -> Path:
    d = tmp_path / "certs"
    a.init_ca(d)
    return d


def test_ca_private_key_is_readable_by_its_owner_only(ca_dir: Path) -> None:
    assert stat.S_IMODE((ca_dir / a.CA_KEY).stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((ca_dir / a.CA_CERT).read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True


def test_init_refuses_to_replace_an_existing_ca(ca_dir: Path) -> None:
    before = (ca_dir / a.CA_KEY).read_bytes()
    with pytest.raises(a.CertError, match="exists already"):
        a.init_ca(ca_dir)
    assert (ca_dir / a.CA_KEY).read_bytes() == before


def test_a_client_trusting_the_ca_completes_tls_with_the_server_certificate(ca_dir: Path) -> None:
    a.issue_server_cert(ca_dir, ["localhost", "127.0.0.1"])
    assert stat.S_IMODE((ca_dir / a.SERVER_KEY).stat().st_mode) == 0o600
    _handshake(ca_dir, ca_dir / a.CA_CERT, "localhost")
    _handshake(ca_dir, ca_dir / a.CA_CERT, "127.0.0.1")


def test_a_name_not_in_the_certificate_fails_tls(ca_dir: Path) -> None:
    a.issue_server_cert(ca_dir, ["localhost"])
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(ca_dir, ca_dir / a.CA_CERT, "fl.other-hospital.org")


def test_a_client_trusting_another_ca_fails_tls(ca_dir: Path, tmp_path: Path) -> None:
    a.issue_server_cert(ca_dir, ["localhost"])
    other = tmp_path / "other"
    a.init_ca(other)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(ca_dir, other / a.CA_CERT, "localhost")


def test_site_key_is_an_openssh_nist_ec_pair_that_flower_accepts(ca_dir: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    priv, pub = a.make_site_key(ca_dir, "site-01")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    key = serialization.load_ssh_private_key(priv.read_bytes(), password=None)  # as flower-supernode reads it
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    public = serialization.load_ssh_public_key(pub.read_bytes())
    assert public.public_numbers() == key.public_key().public_numbers()
    assert try_load_public_key(pub)  # what `flwr supernode register` does with the file


def test_site_key_is_not_overwritten_without_force(ca_dir: Path) -> None:
    priv, _ = a.make_site_key(ca_dir, "site-01")
    before = priv.read_bytes()
    with pytest.raises(a.CertError, match="exists already"):
        a.make_site_key(ca_dir, "site-01")
    assert priv.read_bytes() == before


def test_site_name_with_a_path_separator_is_refused(ca_dir: Path) -> None:
    with pytest.raises(a.CertError, match="site name"):
        a.make_site_key(ca_dir, "../ca")


def test_reissuing_the_server_certificate_keeps_the_ca_and_site_keys(ca_dir: Path) -> None:
    a.issue_server_cert(ca_dir, ["localhost"])
    a.make_site_key(ca_dir, "site-01")
    a.make_site_key(ca_dir, "site-02")
    keep = {p: p.read_bytes() for p in [ca_dir / a.CA_CERT, ca_dir / a.CA_KEY, *sorted((ca_dir / "sites").iterdir())]}
    old = (ca_dir / a.SERVER_CERT).read_bytes()
    a.issue_server_cert(ca_dir, ["localhost", "fl.example.org"])
    assert (ca_dir / a.SERVER_CERT).read_bytes() != old
    assert {p: p.read_bytes() for p in keep} == keep
    _handshake(ca_dir, ca_dir / a.CA_CERT, "fl.example.org")  # sites' ca.pem still trusts the new certificate


def test_status_lists_every_certificate_and_key_with_its_expiry(ca_dir: Path) -> None:
    a.issue_server_cert(ca_dir, ["localhost"], days=100)
    a.make_site_key(ca_dir, "site-01")
    entries = a.status(ca_dir)
    kinds = sorted(e.kind for e in entries)
    assert kinds == ["ca", "ca-key", "server", "server-key", "site-key", "site-pubkey"]
    server = next(e for e in entries if e.kind == "server")
    assert 98 <= server.days_left <= 100
    assert not any(e.warning for e in entries)


def test_status_warns_thirty_days_before_the_server_certificate_expires(ca_dir: Path) -> None:
    a.issue_server_cert(ca_dir, ["localhost"], days=60)
    now = dt.datetime.now(dt.UTC)
    left_31 = next(e for e in a.status(ca_dir, now=now + dt.timedelta(days=28)) if e.kind == "server")
    assert left_31.days_left == 31 and not left_31.warning
    left_29 = next(e for e in a.status(ca_dir, now=now + dt.timedelta(days=31)) if e.kind == "server")
    assert left_29.warning and "expires in 28 days" in left_29.problem
    gone = next(e for e in a.status(ca_dir, now=now + dt.timedelta(days=61)) if e.kind == "server")
    assert gone.warning and "expired" in gone.problem


def test_status_flags_a_server_certificate_from_another_ca(ca_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    a.init_ca(other)
    a.issue_server_cert(other, ["localhost"])
    for name in (a.SERVER_CERT, a.SERVER_KEY):
        (ca_dir / name).write_bytes((other / name).read_bytes())
    server = next(e for e in a.status(ca_dir) if e.kind == "server")
    assert "not signed by this folder's CA" in server.problem


def test_status_flags_a_private_key_readable_by_others(ca_dir: Path) -> None:
    (ca_dir / a.CA_KEY).chmod(0o644)
    key = next(e for e in a.status(ca_dir) if e.kind == "ca-key")
    assert key.warning and "chmod 600" in key.problem


def test_certs_cli_round_trip_prints_status_and_exits_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedsite.cli import main

    d = str(tmp_path / "c")
    assert main(["certs", "init", "--dir", d]) == 0
    assert main(["certs", "server", "--dir", d, "--host", "127.0.0.1"]) == 0
    assert main(["certs", "site", "site-01", "--dir", d]) == 0
    assert main(["certs", "init", "--dir", d]) == 2
    capsys.readouterr()
    assert main(["certs", "status", "--dir", d]) == 0
    out = capsys.readouterr().out
    assert "SANs: 127.0.0.1" in out and "site-01" in out and "no expiry" in out


def test_generated_material_under_certs_is_gitignored() -> None:
    import subprocess

    repo = REPO
    probe = ["certs/ca.key", "certs/ca.pem", "certs/server.key", "certs/sites/site-01.key", "certs/sites/site-01.pub"]
    res = subprocess.run(["git", "-C", str(repo), "check-ignore", *probe], capture_output=True, text=True, check=False)
    assert sorted(res.stdout.split()) == sorted(probe)
