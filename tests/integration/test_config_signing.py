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
