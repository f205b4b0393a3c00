"""Field problem 3 at configuration time: terminal/merchant ids and host identity in a signed
config; a bad signature, or an unsigned change since the last run, stops the daemon at start."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from guard.journal.keys import DeviceKeys, load_keys
from guard.journal.store import Journal
from posguard.config_signing import init_signer, sign
from tests.support import free_port


def run(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "posguard.cli", "run", "--config", str(config), "--max-seconds", "0.3"],
                          capture_output=True, text=True, timeout=60)


def test_unsigned_config_may_not_change_silently(tmp_path: Path, keys: DeviceKeys, write_config: Callable[..., Path]) -> None:
    cfg = write_config(port=free_port())
    assert run(cfg).returncode == 0
    assert run(cfg).returncode == 0, "the same config again is fine"
    write_config(port=free_port(), mid="OTHERMERCHANT01")
    r = run(cfg)
    assert r.returncode == 2 and "CONFIG_CHANGED_UNSIGNED" in r.stderr
    j = Journal.open(tmp_path / "journal.db", load_keys(tmp_path / "keys"), terminal_id="TERM0001")
    loaded = [e.payload for e in j.entries() if e.kind == "config_loaded"]
    j.close()
    assert len(loaded) == 2 and loaded[0]["mid"] == "MERCHANT0000001" and not loaded[0]["signed"]


def test_signed_config_required_once_the_terminal_has_the_public_key(tmp_path: Path, keys: DeviceKeys,
                                                                      write_config: Callable[..., Path]) -> None:
    init_signer(tmp_path / "signer")
    (tmp_path / "keys" / "config.pub").write_text((tmp_path / "signer" / "config.pub").read_text())
    cfg = write_config(port=free_port())
    r = run(cfg)
    assert r.returncode == 2 and "CONFIG_SIGNATURE_INVALID" in r.stderr and "missing" in r.stderr
    sign(cfg, tmp_path / "signer" / "config-signer.key")
    assert run(cfg).returncode == 0
    cfg.write_text(cfg.read_text().replace("MERCHANT0000001", "OTHERMERCHANT01"))
    r = run(cfg)
    assert r.returncode == 2 and "CONFIG_SIGNATURE_INVALID" in r.stderr and "changed after signing" in r.stderr
    sign(cfg, tmp_path / "signer" / "config-signer.key")
    assert run(cfg).returncode == 0, "a re-signed change is accepted"
    other = tmp_path / "other-signer"
    init_signer(other)
    sign(cfg, other / "config-signer.key")
    assert run(cfg).returncode == 2, "a signature by another key is refused"


def test_unsigned_check_covers_identity_and_money_limits_only_and_says_how_to_sign(
        tmp_path: Path, keys: DeviceKeys, write_config: Callable[..., Path]) -> None:
    port = free_port()
    cfg = write_config(port=port)
    assert run(cfg).returncode == 0
    write_config(port=port, sections={"log": {"level": "DEBUG"}, "reader": {"url": str(tmp_path / "no-reader-yet")},
                                      "host": {"timeout": 9.5}})
    cfg.write_text("# a comment an operator added\n" + cfg.read_text())
    r = run(cfg)
    assert r.returncode == 0, f"log level, reader port, timers, comments are not what a signature is for: {r.stderr}"
    write_config(port=port, sections={"policy": {"card_max_amount": 9_999_999}})
    r = run(cfg)
    assert r.returncode == 2 and "CONFIG_CHANGED_UNSIGNED" in r.stderr and "policy.card_max_amount" in r.stderr
    assert "posguard config init-signer" in r.stderr and "posguard config sign" in r.stderr
    assert len(r.stderr.splitlines()) == 1, "a start error is printed once"
    j = Journal.open(tmp_path / "journal.db", load_keys(tmp_path / "keys"), terminal_id="TERM0001")
    loaded = [e.payload for e in j.entries() if e.kind == "config_loaded"]
    j.close()
    assert len(loaded) == 2, "the refused start is not recorded"
    assert loaded[-1]["identity"]["policy.card_max_amount"] == 500000
