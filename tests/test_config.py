"""guard.toml validation: every broken config fails at start naming the key and the reason."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from guard.errors import ConfigError
from posguard.config import documented_example, load, parse

GOOD = {
    "terminal": {"terminal_id": "TERM0001", "merchant_id": "MERCHANT0000001"},
    "reader": {"url": "loop://"},
    "host": {"address": "127.0.0.1", "port": 5000},
    "journal": {"path": "j.db", "keys": "keys"},
}


def with_(section: str, key: str, value: object) -> dict:
    d = {s: dict(v) for s, v in GOOD.items()}
    d.setdefault(section, {})[key] = value
    return d


def test_good_config_gets_defaults_and_resolves_paths(tmp_path: Path) -> None:
    c = parse(GOOD, tmp_path / "guard.toml")
    assert c["reader.baudrate"] == 115200 and c["host.header"] == "binary2"
    assert c["journal.path"] == str(tmp_path / "j.db")


@pytest.mark.parametrize(
    "data,key,why",
    [
        (with_("terminal", "terminal_id", "T1"), "terminal.terminal_id", "exactly 8"),
        # 8 characters but not ISO 8583 "ans": accepted, every sale was journaled and then could
        # not be encoded; the reversal's encode error stopped the daemon at every restart
        (with_("terminal", "terminal_id", "TERM\u00c9001"), "terminal.terminal_id", "printable ASCII"),
        (with_("terminal", "terminal_id", "TERM\t001"), "terminal.terminal_id", "printable ASCII"),
        (with_("terminal", "merchant_id", "MERCHANT\u00e90000001"[:15]), "terminal.merchant_id", "printable ASCII"),
        (with_("host", "port", "5000"), "host.port", "must be a int"),
        (with_("host", "port", 70000), "host.port", "between"),
        (with_("host", "header", "binary4"), "host.header", "one of"),
        (with_("host", "tpdu", "zz"), "host.tpdu", "hex"),
        (with_("host", "tpdu", "7000010000"), "host.tpdu", "starting with 60"),
        (with_("host", "tls", "yes"), "host.tls", "must be a bool"),
        (with_("host", "certfile", "c.pem"), "host.keyfile", "required"),
        (with_("reader", "baudrate", 12345), "reader.baudrate", "one of"),
        (with_("reader", "colour", "red"), "reader.colour", "unknown key"),
        ({**GOOD, "hots": {}}, "hots", "unknown section"),
        ({k: v for k, v in GOOD.items() if k != "journal"}, "journal.path", "required"),
    ],
)
def test_broken_config_names_key_and_reason(data: dict, key: str, why: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse(data)
    assert ei.value.key == key and why in ei.value.reason and ei.value.code == "CONFIG_INVALID"


def test_syntax_error_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "guard.toml"
    p.write_text("[terminal\nterminal_id = 1")
    with pytest.raises(ConfigError) as ei:
        load(p)
    assert ei.value.key == "(syntax)"
    with pytest.raises(ConfigError) as ei:
        load(tmp_path / "nope.toml")
    assert "cannot read" in ei.value.reason


def test_documented_example_parses_once_required_keys_are_filled() -> None:
    text = documented_example()
    doc = tomllib.loads(text)
    for s, body in GOOD.items():
        doc.setdefault(s, {}).update(body)
    assert parse(doc)["host.reversal_max_attempts"] == 6
