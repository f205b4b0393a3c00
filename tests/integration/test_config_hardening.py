"""The config on disk as an attack surface: the signature covers every file the config names, the
bytes verified are the bytes parsed, compaction does not reset the unsigned-change check, the
environment cannot replace the trusted CAs, and config errors never echo a card number."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from guard.core.errors import ConfigError
from guard.hostlink.iso import BUILTIN_SPECS
from guard.hostlink.uplink import make_client_context
from guard.journal.keys import DeviceKeys, load_keys
from guard.journal.store import Journal
from posguard import config as config_mod
from posguard.config_signing import init_signer, sign
from tests.support import cli, free_port
from tests.support.pki import make_cert, write_pem

PAN = "4111111111111111"


def run(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "posguard.cli", "run", "--config", str(config), "--max-seconds", "0.3"],
                          capture_output=True, text=True, timeout=60)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _ca(path: Path, cn: str) -> tuple[ec.EllipticCurvePrivateKey, str]:
    key = _key()
    write_pem(path, make_cert(cn, key, cn, key, ca=True))
    return key, cn


def _signed_tls_config(tmp_path: Path, write_config: Callable[..., Path]) -> tuple[Path, dict[str, Path], Path]:
    """A signed config naming a CA, an mTLS client cert and key, and a JSON spec file."""
    files = {k: tmp_path / f"{k}.pem" for k in ("ca", "cert", "key")}
    files["spec"] = tmp_path / "spec.json"
    ca_key, ca_cn = _ca(files["ca"], "acquirer CA")
    cli_key = _key()
    write_pem(files["cert"], make_cert("TERM0001", cli_key, ca_cn, ca_key, ca=False, eku=[ExtendedKeyUsageOID.CLIENT_AUTH]))
    files["key"].write_bytes(cli_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    files["spec"].write_text(json.dumps(BUILTIN_SPECS["default"]))
    signer = tmp_path / "signer"
    init_signer(signer)
    (tmp_path / "keys" / "config.pub").write_text((signer / "config.pub").read_text())
    cfg = write_config(port=free_port(), tls=True, cafile=str(files["ca"]), certfile=str(files["cert"]),
                       keyfile=str(files["key"]), spec=str(files["spec"]))
    sign(cfg, signer / "config-signer.key")
    return cfg, files, signer / "config-signer.key"


# --- 7: the signature covers the files the config names -------------------------------------------


def test_signature_covers_every_file_the_config_names(tmp_path: Path, keys: DeviceKeys,
                                                       write_config: Callable[..., Path]) -> None:
    cfg, files, _signer = _signed_tls_config(tmp_path, write_config)
    r = run(cfg)
    assert r.returncode == 0, r.stderr
    originals = {k: p.read_bytes() for k, p in files.items()}
    cli_key = serialization.load_pem_private_key(originals["key"], None)
    assert isinstance(cli_key, ec.EllipticCurvePrivateKey)
    evil_ca = tmp_path / "evil.pem"
    _ca(evil_ca, "attacker CA")
    replacements = {  # each one still loads: only the digest tells them apart
        "ca": ("host.cafile", evil_ca.read_bytes()),
        "cert": ("host.certfile", b"\n" + originals["cert"]),
        "key": ("host.keyfile", cli_key.private_bytes(serialization.Encoding.PEM,
                                                      serialization.PrivateFormat.TraditionalOpenSSL,
                                                      serialization.NoEncryption())),
        "spec": ("host.spec", json.dumps(BUILTIN_SPECS["default"], indent=1).encode()),
    }
    for name, (key, data) in replacements.items():
        files[name].write_bytes(data)
        r = run(cfg)
        assert r.returncode == 2, f"{key} replaced, yet the daemon started: {r.stderr}"
        assert "CONFIG_FILE_CHANGED" in r.stderr and key in r.stderr and str(files[name]) in r.stderr, r.stderr
        files[name].write_bytes(originals[name])
    assert run(cfg).returncode == 0, "the signed files restored: the daemon starts again"
    j = Journal.open(tmp_path / "journal.db", load_keys(tmp_path / "keys"), terminal_id="TERM0001")
    loaded = [e.payload for e in j.entries() if e.kind == "config_loaded"]
    j.close()
    assert loaded[-1]["signed"] and set(loaded[-1]["files"]) == {"host.cafile", "host.certfile", "host.keyfile",
                                                                   "host.spec"}
    assert loaded[-1]["files"]["host.cafile"] == hashlib.sha256(originals["ca"]).hexdigest()


def test_replay_checks_the_signature_before_it_connects(tmp_path: Path, keys: DeviceKeys,
                                                       write_config: Callable[..., Path]) -> None:
    """`posguard replay` sends reversals and advices to the host the config names: a swapped CA
    must stop it as it stops the daemon."""
    cfg, files, _signer = _signed_tls_config(tmp_path, write_config)
    assert run(cfg).returncode == 0
    _ca(files["ca"], "attacker CA")
    code, out, err = cli("replay", "--config", cfg, "--timeout", "1", "--json")
    assert code == 2 and "CONFIG_FILE_CHANGED" in out + err and "host.cafile" in out + err, out + err


def test_a_signature_over_the_config_bytes_alone_fails_closed(tmp_path: Path, keys: DeviceKeys,
                                                             write_config: Callable[..., Path]) -> None:
    """The old format (Ed25519 over the config's bytes, hex) binds no file: it is refused, not trusted."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    cfg, _files, signer = _signed_tls_config(tmp_path, write_config)
    old = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(signer.read_text().strip()))
    cfg.with_name(cfg.name + ".sig").write_text(old.sign(cfg.read_bytes()).hex() + "\n")
    r = run(cfg)
    assert r.returncode == 2 and "CONFIG_SIGNATURE_INVALID" in r.stderr and "re-sign" in r.stderr, r.stderr


# --- 8: the bytes parsed are the bytes verified ---------------------------------------------------


@pytest.mark.parametrize("evil_first", [True, False])
def test_the_config_is_read_once(tmp_path: Path, keys: DeviceKeys, write_config: Callable[..., Path],
                                 monkeypatch: pytest.MonkeyPatch, evil_first: bool) -> None:
    """A file whose content changes between reads (a flipped symlink) cannot run unsigned bytes:
    whatever the daemon starts with is exactly what it verified and journaled."""
    from posguard.run import run as run_daemon

    signer = tmp_path / "signer"
    init_signer(signer)
    (tmp_path / "keys" / "config.pub").write_text((signer / "config.pub").read_text())
    cfg = write_config(port=free_port())
    sign(cfg, signer / "config-signer.key")
    good = cfg.read_bytes()
    evil = good.replace(b"MERCHANT0000001", b"EVILMERCHANT001")
    reads: list[int] = []
    real = Path.read_bytes

    def flipping(self: Path) -> bytes:
        if self.resolve() != cfg.resolve():
            return real(self)
        reads.append(1)
        return (evil if evil_first else good) if len(reads) == 1 else (good if evil_first else evil)

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(Path, "read_bytes", flipping)
    try:
        rc = run_daemon(cfg, max_seconds=0.2)
    finally:
        monkeypatch.undo()
        for sig, h in handlers.items():
            signal.signal(sig, h)
    loaded = []
    if (tmp_path / "journal.db").exists():
        j = Journal.open(tmp_path / "journal.db", load_keys(tmp_path / "keys"), terminal_id="TERM0001")
        loaded = [e.payload for e in j.entries() if e.kind == "config_loaded"]
        j.close()
    if evil_first:
        assert rc == 2 and not loaded, "the unsigned bytes were read: the daemon must not start"
    else:
        assert rc == 0 and loaded[-1]["mid"] == "MERCHANT0000001"
        assert loaded[-1]["sha256"] == hashlib.sha256(good).hexdigest()
    assert len(reads) == 1, "the config file is read exactly once"


# --- 9: compaction keeps the last config digest ---------------------------------------------------


def test_compaction_does_not_reset_the_unsigned_change_check(tmp_path: Path, keys: DeviceKeys,
                                                             write_config: Callable[..., Path]) -> None:
    from guard.ops.compact import archives_in, compact, verify_chain
    from tests.support.ops_support import MID, TID, bulk_journal

    journal = tmp_path / "journal.db"
    bulk_journal(journal, keys, 5)
    port = free_port()
    cfg = write_config(port=port, tid=TID, mid=MID)
    assert run(cfg).returncode == 0
    res = compact(journal, keys, tmp_path / "archive", older_than_days=0, now=time.time() + 1)
    assert res.archive is not None and res.archived_txns == 5
    # the daemon may have cut an archive of its own first (automatic retention: these sales are old)
    assert verify_chain([*archives_in(tmp_path / "archive", "journal"), journal], k0=keys.k0).ok
    write_config(port=port, tid=TID, mid="OTHERMERCHANT01")
    r = run(cfg)
    assert r.returncode == 2 and "CONFIG_CHANGED_UNSIGNED" in r.stderr, r.stderr
    write_config(port=port, tid=TID, mid=MID)
    assert run(cfg).returncode == 0, "the config of the last run before compaction is accepted"


# --- 10: the environment does not choose the trusted CAs ------------------------------------------


def test_ssl_cert_file_does_not_replace_the_trust_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no host.cafile the system store is used; SSL_CERT_FILE/SSL_CERT_DIR pointing at an
    attacker CA must not make the attacker's host trusted."""
    ca_key, ca_cn = _ca(tmp_path / "evil-ca.pem", "attacker CA")
    srv_key = _key()
    from cryptography import x509

    srv = make_cert("localhost", srv_key, ca_cn, ca_key, ca=False, eku=[ExtendedKeyUsageOID.SERVER_AUTH],
                    san=[x509.DNSName("localhost")])
    write_pem(tmp_path / "server.pem", srv, srv_key)
    (tmp_path / "certdir").mkdir()
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "evil-ca.pem"))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "certdir"))
    ctx = make_client_context(None, None, None)
    assert "attacker CA" not in json.dumps(ctx.get_ca_certs())
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(tmp_path / "server.pem"))
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)

    def serve() -> None:
        try:
            server_ctx.wrap_socket(a, server_side=True).close()
        except (ssl.SSLError, OSError):
            pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            ctx.wrap_socket(b, server_hostname="localhost").close()
    finally:
        b.close()
        t.join(5)
        a.close()


# --- 13: config errors do not echo card numbers ---------------------------------------------------


@pytest.mark.parametrize("text", [f"[terminal]\n{PAN} = 1\n", f"[{PAN}]\nx = 1\n", f'[terminal]\n"{PAN}x" = 1\n',
                                  f"[terminal]\nk{PAN} = 1\n"])
def test_config_errors_mask_digit_runs_in_echoed_names(tmp_path: Path, text: str) -> None:
    p = tmp_path / "guard.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        config_mod.load(p)
    msg = str(ei.value)
    assert PAN not in msg and PAN[-8:] not in msg and "unknown" in msg, msg
    assert "411111" in msg or "*" in msg, msg
