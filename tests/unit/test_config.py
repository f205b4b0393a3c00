"""guard.toml validation: every broken config fails at start naming the key and the reason."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from guard.core.errors import ConfigError
from posguard.config import documented_example, engine_config, load, parse, policy_config

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


def test_engine_config_comes_from_the_config_and_overrides_win(tmp_path: Path) -> None:
    """posguard run and posguard replay build the engine's settings in one place."""
    data = {**with_("host", "timeout", 12.5), "policy": {"card_max_count": 3}}
    data["host"]["reversal_max_attempts"] = 4
    cfg = parse(data, tmp_path / "guard.toml")
    e = engine_config(cfg)
    assert (e.terminal_id, e.merchant_id, e.host_timeout_s, e.reversal_max_attempts) == ("TERM0001", "MERCHANT0000001",
                                                                                        12.5, 4)
    assert e.policy == policy_config(cfg) and e.policy.card_limits[0].max_count == 3
    r = engine_config(cfg, saf_window=7, backoff_base_s=0.5)
    assert (r.saf_window, r.backoff_base_s, r.host_timeout_s) == (7, 0.5, 12.5)


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


def test_host_spec_builtin_file_and_refusals(tmp_path: Path) -> None:
    """host.spec: a built-in name, or a pyiso8583 spec JSON file checked at start by a trial
    round trip of what posguard sends; a spec that cannot carry field 41 is refused naming it."""
    import copy
    import json

    import iso8583.specs

    assert parse(with_("host", "spec", "default_ascii"), tmp_path / "g.toml")["host.spec"] == "default_ascii"
    good = copy.deepcopy(iso8583.specs.default_ascii)
    (tmp_path / "ok.json").write_text(json.dumps(good))
    assert parse(with_("host", "spec", "ok.json"), tmp_path / "g.toml")["host.spec"] == str(tmp_path / "ok.json")
    short = copy.deepcopy(iso8583.specs.default)
    short["41"]["max_len"] = 4
    (tmp_path / "short.json").write_text(json.dumps(short))
    (tmp_path / "junk.json").write_text("{not json")
    for name, why in (("short.json", "field 41"), ("junk.json", "not a JSON"), ("nope.json", "cannot read")):
        with pytest.raises(ConfigError) as ei:
            parse(with_("host", "spec", name), tmp_path / "g.toml")
        assert ei.value.key == "host.spec" and why in str(ei.value), str(ei.value)


def test_a_sale_over_a_hex_bitmap_spec_end_to_end(tmp_path: Path) -> None:
    """host.spec = default_ascii on both ends, through the real uplink and socket: approved,
    and the host's ledger holds the debit (the spec is not just parsed, it is used)."""
    import random
    import time

    from guard.core.engine import EngineConfig
    from guard.simulation.hostsim import HostCore
    from guard.simulation.hostserver import HostServer
    from guard.hostlink.iso import HostCodec, load_spec
    from guard.journal.keys import init_keys
    from guard.core.model import CardData, Request, TxnKind, TxnState
    from guard.core.policies import OFF
    from guard.runtime.service import open_guard
    from posguard.config import make_uplink

    core = HostCore(seed=1, dup_detection=True)
    server = HostServer(core, HostCodec(load_spec("default_ascii")))
    port = server.start()
    try:
        cfg = parse({**with_("host", "spec", "default_ascii"), "host": {"address": "127.0.0.1", "port": port,
                                                                         "spec": "default_ascii"}}, tmp_path / "g.toml")
        keys = init_keys(tmp_path / "keys")
        svc = open_guard(tmp_path / "j.db", keys, EngineConfig("TERM0001", "MERCHANT0000001", policy=OFF),
                         make_uplink(cfg), rng=random.Random(1))
        try:
            deadline = time.monotonic() + 10
            while not svc.uplink.connected and time.monotonic() < deadline:
                svc.step(0.01)
            req = Request("R1", (1).to_bytes(16, "big"), TxnKind.SALE, 1234, "978", CardData("4761739001010119", "2912"))
            svc.submit(req)
            assert svc.run_until(lambda: req.key in svc.replies and not svc.replies[req.key].in_progress, 10)
            assert svc.replies[req.key].state is TxnState.APPROVED
        finally:
            svc.close()
    finally:
        server.stop()
    assert core.total_net_debits() == 1


def test_unsigned_check_against_a_config_loaded_written_before_identity_was_journaled() -> None:
    from types import SimpleNamespace

    from posguard.config_signing import changed_unsigned

    legacy = SimpleNamespace(kind="config_loaded", payload={"sha256": "ab" * 32, "signed": False, "tid": "TERM0001",
                                                             "mid": "MERCHANT0000001", "host": "127.0.0.1:9", "tls": False})
    ident = {"terminal.terminal_id": "TERM0001", "terminal.merchant_id": "MERCHANT0000001", "host.address": "127.0.0.1",
             "host.port": 9, "host.tls": False}
    same = {"sha256": "cd" * 32, "signed": False, "identity": ident}
    assert changed_unsigned([legacy], same) == [], "other bytes, same ids and host: accepted"
    other = {**same, "identity": {**ident, "terminal.merchant_id": "OTHERMERCHANT01"}}
    assert changed_unsigned([legacy], other) == ["terminal.merchant_id"]
    assert changed_unsigned([legacy], {**other, "signed": True}) == []
    assert changed_unsigned([], other) == [], "first start"


def test_every_limit_on_money_or_on_how_often_a_card_is_charged_is_covered_by_the_signature() -> None:
    """The keys added with chip cards (offline floor limits per entry mode, the KSN field and
    what a reversal carries) and the count limits that stop a card being charged again and
    again may not change without a signature, like the amount limits beside them."""
    from posguard.config_signing import IDENTITY_KEYS

    for key in ("offline.chip_floor_limit", "offline.contactless_floor_limit", "offline.manual_floor_limit",
                "host.ksn_field", "host.reversal_icc", "policy.card_max_count", "policy.terminal_max_count",
                "policy.double_swipe_window"):
        assert key in IDENTITY_KEYS, key
