"""guard.simulation.hostsim: the ledger (debits, reversals, duplicate detection, tombstones), faults, and the
TCP adapter end to end with guard.hostlink.uplink on 127.0.0.1."""

from __future__ import annotations

import csv
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from guard.core.constants import REVERSAL_DONE_CODES, SETTLEMENT_COLUMNS
from guard.core.errors import ConfigError
from guard.simulation.acquirer import AcquirerProfile
from guard.simulation.hostcli import build_arg_parser, build_profile, main
from guard.simulation.hostserver import HostServer
from guard.simulation.hostsim import HostCore
from guard.simulation.hosttypes import (
    ACTION_CLOSE_MID_FRAME,
    ACTION_DROP,
    ACTION_GARBAGE,
    ACTION_SEND,
    FAULT_KINDS,
    Reply,
)
from guard.hostlink.iso import (
    HOST_FRAME_TRUNCATED,
    HOST_UNDECODABLE,
    HostCodec,
    HostGarbage,
    HostMessage,
    echo_mismatches,
)
from guard.hostlink.uplink import Disconnected, SendOutcome, Uplink
from tests.support import collect, connected, subprocess_env
from tests.support.hostmsgs import F7, MID, NOW, PAN, PAN2, TID, one, reversal, sale

# --- ledger --------------------------------------------------------------------------------------


def test_approved_sale_debits_once_without_clear_pan(tmp_path: Path) -> None:
    core = HostCore(seed=1, dup_detection=True)
    req = sale()
    resp = one(core, req)
    assert resp["t"] == "0210" and resp["39"] == "00"
    assert echo_mismatches(req, resp) == [] and resp["49"] == "978"
    assert len(resp["37"]) == 12 and resp["37"].isdigit() and len(resp["38"]) == 6
    assert core.net_debits(TID, MID, 1, "1122") == 1 and core.net_debits(TID, MID, "000001", "1122") == 1
    assert core.net_debits(TID, MID, 1, "1123") == 0
    (d,) = core.ledger()["debits"]
    assert d["masked_pan"] == "411111******1111" and len(d["card"]) == 16 and d["amount"] == 1000
    core.dump_ledger(str(tmp_path / "ledger.json"))
    core.write_settlement_csv(str(tmp_path / "settle.csv"))
    for name in ("ledger.json", "settle.csv"):
        assert PAN not in (tmp_path / name).read_text()
    assert PAN not in repr(core.ledger()) and PAN not in repr(core.stats())
    assert json.loads((tmp_path / "ledger.json").read_text())["totals"]["net_debits"] == 1


def test_rrns_unique_and_card_counts() -> None:
    core = HostCore(seed=1, dup_detection=True)
    rrns = {one(core, sale(stan=i, pan=PAN if i % 2 else PAN2))["37"] for i in range(1, 21)}
    assert len(rrns) == 20
    counts = core.ledger()["counts_per_card"]
    assert sorted(c["debits"] for c in counts.values()) == [10, 10]
    assert all(c["net_amount"] == 10_000 for c in counts.values())


@pytest.mark.parametrize(("amount", "rc"), [(1051, "51"), (1005, "05"), (1000, "00")])
def test_default_approve_rule(amount: int, rc: str) -> None:
    core = HostCore(seed=1, dup_detection=True)
    resp = one(core, sale(amount=amount))
    assert resp["39"] == rc and ("38" in resp) == (rc == "00") and "37" in resp
    assert core.total_net_debits() == (1 if rc == "00" else 0)


def test_pluggable_approve_rule_and_terminal_checks() -> None:
    core = HostCore(seed=1, dup_detection=True, approve_rule=lambda f: "91", terminal_id=TID, merchant_id=MID)
    assert one(core, sale())["39"] == "91"
    assert one(core, sale(stan=2, tid="TERM0002"))["39"] == "58"
    assert one(core, dict(sale(stan=3), **{"42": "OTHERMERCHANT01"}))["39"] == "03"
    assert core.total_net_debits() == 0
    bad_rule = HostCore(seed=1, dup_detection=True, approve_rule=lambda f: "approved")
    with pytest.raises(ConfigError):
        bad_rule.handle(sale(), NOW)


def test_format_errors_answer_30_without_debit() -> None:
    core = HostCore(seed=1, dup_detection=True)
    assert one(core, {k: v for k, v in sale().items() if k != "2"})["39"] == "30"
    assert one(core, dict(sale(), **{"4": "12"}))["39"] == "30"
    assert one(core, dict(reversal(), **{"90": "123"}))["39"] == "30"
    assert core.total_net_debits() == 0 and core.stats()["format_errors"] == 3


def test_duplicate_detection_on_declines_resend() -> None:
    core = HostCore(seed=1, dup_detection=True)
    first = one(core, sale())
    assert one(core, sale())["39"] == "94"
    assert core.net_debits(TID, MID, 1, "1122") == 1
    again = one(core, sale(mti="0201"))
    assert (again["39"], again["37"], again["38"]) == (first["39"], first["37"], first["38"])
    assert core.net_debits(TID, MID, 1, "1122") == 1 and core.stats()["duplicates_declined"] == 1
    assert one(core, sale(stan=1, f7="1123090000"))["39"] == "00"


def test_duplicate_detection_off_debits_again() -> None:
    core = HostCore(seed=1, dup_detection=False)
    assert one(core, sale())["39"] == "00"
    assert one(core, sale())["39"] == "00"
    assert one(core, sale(mti="0201"))["39"] == "00"
    assert core.net_debits(TID, MID, 1, "1122") == 3 and core.ledger()["totals"]["debits"] == 3


@pytest.mark.parametrize("dup", [True, False])
def test_reversal_marks_debit_reversed_and_is_idempotent(dup: bool) -> None:
    core = HostCore(seed=1, dup_detection=dup)
    sold = one(core, sale())
    rev = one(core, reversal())
    assert rev["t"] == "0410" and rev["39"] == "00" and rev["37"] == sold["37"]
    assert echo_mismatches(reversal(), rev) == []
    assert core.net_debits(TID, MID, 1, "1122") == 0
    assert one(core, reversal())["39"] == "00"
    assert one(core, reversal(mti="0401"))["39"] == ("94" if dup else "00")
    assert one(core, reversal(mti="0421"))["t"] == "0430"
    led = core.ledger()
    assert [r["effect"] for r in led["reversals"]] == ["reversed", "repeat", "repeat", "repeat"]
    assert led["debits"][0]["reversed"] and led["totals"]["reversed"] == 1
    assert all(r["response"] in REVERSAL_DONE_CODES for r in led["reversals"])


def test_reversal_reverses_one_debit_of_a_double_debit() -> None:
    """With dup detection off a double debit stays visible after the terminal's single reversal."""
    core = HostCore(seed=1, dup_detection=False)
    one(core, sale())
    one(core, sale())
    one(core, reversal())
    one(core, reversal(mti="0401"))
    assert core.net_debits(TID, MID, 1, "1122") == 1
    one(core, sale(stan=2))
    one(core, reversal(stan=2))
    assert core.net_by_key() == {(TID, MID, "000001", "1122"): 1, (TID, MID, "000002", "1122"): 0}


def test_reversal_matches_terminal_and_date_and_uses_original_stan() -> None:
    core = HostCore(seed=1, dup_detection=True)
    one(core, sale(stan=5))
    assert one(core, reversal(stan=5, tid="TERM0009"))["39"] == "25"
    assert one(core, reversal(stan=5, f7="1123153000"))["39"] == "25"
    assert core.net_debits(TID, MID, 5, "1122") == 1
    rev = one(core, reversal(stan=5, own_stan=6))
    assert rev["39"] == "00" and rev["11"] == "000006"
    assert core.net_debits(TID, MID, 5, "1122") == 0


@pytest.mark.parametrize("dup", [True, False])
def test_tombstone_blocks_late_original(dup: bool) -> None:
    core = HostCore(seed=1, dup_detection=dup)
    assert one(core, reversal(stan=9))["39"] == "25"
    late = one(core, sale(stan=9))
    assert late["39"] == "68" and "38" not in late
    assert core.net_debits(TID, MID, 9, "1122") == 0 and core.total_net_debits() == 0
    assert one(core, reversal(stan=9, mti="0401"))["39"] == ("94" if dup else "25")
    led = core.ledger()
    assert led["tombstones"] == [{"tid": TID, "mid": MID, "stan": "000009", "date": "1122", "at": NOW}]
    assert core.stats()["tombstone_declines"] == 1


def test_network_echo_and_ignored_messages() -> None:
    core = HostCore(seed=1, dup_detection=True, faults={"drop_request": 1.0})
    resp = one(core, {"t": "0800", "7": F7, "11": "000042", "41": TID, "70": "301"})
    assert resp["t"] == "0810" and resp["39"] == "00" and resp["70"] == "301" and resp["11"] == "000042"
    assert one(core, {"t": "0800", "11": "000043", "41": TID, "70": "999"})["39"] == "30"
    assert core.handle({"t": "0210", "11": "000001"}, NOW) == []
    core2 = HostCore(seed=1, dup_detection=True)
    adv = one(core2, dict(sale(stan=7), t="0220"))  # an offline sale's advice books like a sale
    assert adv["t"] == "0230" and adv["39"] == "00" and core2.net_debits(TID, MID, 7, "1122") == 1
    assert core.stats()["requests_by_mti"] == {"0800": 2, "0210": 1}


def test_settlement_csv(tmp_path: Path) -> None:
    core = HostCore(seed=1, dup_detection=True)
    s1 = one(core, sale(stan=1), NOW)
    one(core, sale(stan=2, amount=2051), NOW + 1)
    one(core, reversal(stan=1), NOW + 2)
    one(core, reversal(stan=3), NOW + 3)
    path = tmp_path / "s.csv"
    core.write_settlement_csv(str(path))
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == SETTLEMENT_COLUMNS
    assert [(r["stan"], r["type"], r["response"], r["amount"]) for r in rows] == [
        ("000001", "SALE", "00", "1000"), ("000002", "SALE", "51", "2051"),
        ("000001", "REVERSAL", "00", "1000"), ("000003", "REVERSAL", "25", "1000")]
    assert rows[0]["rrn"] == rows[2]["rrn"] == s1["37"] and rows[3]["rrn"] == ""
    assert {r["date"] for r in rows} == {"1122"} and {r["tid"] for r in rows} == {TID}


# --- faults at the core --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_each_fault_forced_once_at_core(kind: str) -> None:
    core = HostCore(seed=5, dup_detection=True, late_delay=40.0)
    core.force(kind)
    replies = core.handle(sale(), NOW)
    actions = [(r.action, r.delay, r.fault) for r in replies]
    expected_debit = {"drop_request": 0, "garbage": None}.get(kind, 1)
    if expected_debit is None:
        expected_debit = 1 if core.fault_log[0].processed else 0
    assert core.total_net_debits() == expected_debit
    if kind == "drop_request":
        assert actions == [(ACTION_DROP, 0.0, kind)] and replies[0].fields is None
    elif kind == "debit_drop_response":
        assert actions == [(ACTION_DROP, 0.0, kind)] and replies[0].fields["39"] == "00"
    elif kind == "delay_response":
        assert actions == [(ACTION_SEND, 40.0, kind)]
    elif kind == "close_mid_frame":
        assert actions == [(ACTION_CLOSE_MID_FRAME, 0.0, kind)]
    elif kind == "duplicate_response":
        assert actions == [(ACTION_SEND, 0.0, kind)] * 2 and replies[0].fields == replies[1].fields
    elif kind == "wrong_echo":
        assert actions == [(ACTION_SEND, 0.0, kind)] and len(echo_mismatches(sale(), replies[0].fields)) == 1
    else:
        assert actions == [(ACTION_GARBAGE, 0.0, kind)] and replies[0].garbage[:1] == b"\xff"
    assert core.stats()["faults"] == {kind: 1}
    assert core.fault_log[0].kind == kind and core.fault_log[0].forced
    assert one(core, sale(stan=2))["39"] == "00"


def test_forced_faults_fifo_and_skip_keepalives() -> None:
    core = HostCore(seed=5, dup_detection=True)
    core.force("drop_request")
    core.force("wrong_echo", count=2)
    assert one(core, {"t": "0800", "11": "000001", "41": TID, "70": "301"})["39"] == "00"
    kinds = [core.handle(sale(stan=i), NOW)[0].fault for i in range(1, 5)]
    assert kinds == ["drop_request", "wrong_echo", "wrong_echo", None]


def test_seeded_faults_are_deterministic_and_rate_bounded() -> None:
    rates = {"drop_request": 0.1, "delay_response": 0.1, "garbage": 0.1, "wrong_echo": 0.1}

    def run(seed: int) -> list[tuple[str, bool]]:
        core = HostCore(seed=seed, dup_detection=True, faults=rates)
        for i in range(1, 401):
            core.handle(sale(stan=i), NOW)
        return [(f.kind, f.processed) for f in core.fault_log]

    a, b, c = run(11), run(11), run(12)
    assert a == b and a != c
    assert 80 < len(a) < 200
    assert {k for k, _ in a} == set(rates)
    always = HostCore(seed=1, dup_detection=True, faults={"duplicate_response": 1.0})
    assert all(len(always.handle(sale(stan=i), NOW)) == 2 for i in range(1, 20))
    with pytest.raises(ConfigError):
        HostCore(seed=1, dup_detection=True, faults={"meteor": 0.1})
    with pytest.raises(ConfigError):
        HostCore(seed=1, dup_detection=True, faults={"garbage": 1.5})
    with pytest.raises(ConfigError):
        HostCore(seed=1, dup_detection=True).force("meteor")


def test_faults_apply_to_reversals() -> None:
    core = HostCore(seed=1, dup_detection=True)
    one(core, sale())
    core.force("drop_request")
    assert core.handle(reversal(), NOW)[0].action == ACTION_DROP
    assert core.net_debits(TID, MID, 1, "1122") == 1
    core.force("debit_drop_response")
    r = core.handle(reversal(mti="0401"), NOW)[0]
    assert r.action == ACTION_DROP and r.fields["39"] == "00"
    assert core.net_debits(TID, MID, 1, "1122") == 0


# --- end to end through HostServer + Uplink -------------------------------------------------------


def messages(items: list) -> list[HostMessage]:
    return [i for i in items if isinstance(i, HostMessage)]


def never(_: list) -> bool:
    return False


@pytest.fixture()
def served() -> Iterator[tuple[HostCore, Uplink, HostServer]]:
    core = HostCore(seed=21, dup_detection=True, late_delay=0.4)
    codec = HostCodec()
    server = HostServer(core, codec, linger=1.0)
    port = server.start()
    up = Uplink("127.0.0.1", port, codec)
    assert connected(up)
    yield core, up, server
    up.close()
    assert server.stop()


def test_e2e_drop_request(served: tuple[HostCore, Uplink, HostServer]) -> None:
    core, up, _ = served
    core.force("drop_request")
    assert up.send(sale()) is SendOutcome.SENT
    assert collect(up, never, timeout=0.4) == []
    assert core.net_debits(TID, MID, 1, "1122") == 0 and core.stats()["faults"] == {"drop_request": 1}
    assert up.send(sale(stan=2)) and len(messages(collect(up, messages))) == 1


def test_e2e_debit_drop_response_then_reversal(served: tuple[HostCore, Uplink, HostServer]) -> None:
    core, up, _ = served
    core.force("debit_drop_response")
    up.send(sale())
    assert collect(up, never, timeout=0.4) == []
    assert core.net_debits(TID, MID, 1, "1122") == 1
    up.send(reversal())
    (rev,) = messages(collect(up, messages))
    assert rev.fields["t"] == "0410" and rev.fields["39"] == "00"
    assert core.net_debits(TID, MID, 1, "1122") == 0


def test_e2e_delay_response(served: tuple[HostCore, Uplink, HostServer]) -> None:
    core, up, _ = served
    core.force("delay_response")
    t0 = time.monotonic()
    up.send(sale())
    assert collect(up, never, timeout=0.2) == []
    (late,) = messages(collect(up, messages, timeout=3.0))
    assert time.monotonic() - t0 >= 0.35 and late.fields["39"] == "00"
    assert core.net_debits(TID, MID, 1, "1122") == 1


def test_e2e_close_mid_frame(served: tuple[HostCore, Uplink, HostServer]) -> None:
    core, up, server = served
    core.force("close_mid_frame")
    up.send(sale())
    items = collect(up, lambda xs: any(isinstance(x, Disconnected) for x in xs))
    assert [type(i) for i in items] == [HostGarbage, Disconnected]
    assert items[0].code == HOST_FRAME_TRUNCATED and not up.connected
    assert core.net_debits(TID, MID, 1, "1122") == 1
    assert connected(up)
    up.send(reversal())
    assert messages(collect(up, messages))[0].fields["39"] == "00"
    assert server.counters["closed_mid_frame"] == 1


def test_e2e_duplicate_response(served: tuple[HostCore, Uplink, HostServer]) -> None:
    core, up, _ = served
    core.force("duplicate_response")
    up.send(sale())
    a, b = messages(collect(up, lambda xs: len(messages(xs)) >= 2))
    assert a.fields == b.fields and core.net_debits(TID, MID, 1, "1122") == 1


def test_e2e_wrong_echo(served: tuple[HostCore, Uplink, HostServer]) -> None:
    core, up, _ = served
    core.force("wrong_echo")
    req = sale()
    up.send(req)
    (resp,) = messages(collect(up, messages))
    assert len(echo_mismatches(req, resp.fields)) == 1
    assert core.net_debits(TID, MID, 1, "1122") == 1


def test_e2e_garbage(served: tuple[HostCore, Uplink, HostServer]) -> None:
    core, up, _ = served
    core.force("garbage")
    up.send(sale())
    items = collect(up, bool)
    assert len(items) == 1 and isinstance(items[0], HostGarbage) and items[0].code == HOST_UNDECODABLE
    assert up.connected
    assert core.net_debits(TID, MID, 1, "1122") == (1 if core.fault_log[0].processed else 0)
    up.send(sale(stan=2))
    assert messages(collect(up, messages))[0].fields["11"] == "000002"


def test_e2e_terminal_that_never_resends_leaves_no_debit_without_dup_detection() -> None:
    """The host counts: a resent 0200 shows up as a second debit when dup detection is off."""
    core = HostCore(seed=2, dup_detection=False)
    codec = HostCodec(header="ascii4", tpdu=bytes.fromhex("6000010002"))
    server = HostServer(core, codec)
    up = Uplink("127.0.0.1", server.start(), codec)
    try:
        assert connected(up)
        core.force("debit_drop_response")
        up.send(sale())
        assert collect(up, never, timeout=0.3) == []
        up.send(reversal())
        (rev,) = messages(collect(up, messages))
        assert rev.fields["39"] == "00" and rev.tpdu == bytes.fromhex("6000020001")
        assert core.net_debits(TID, MID, 1, "1122") == 0
        up.send(sale())
        messages(collect(up, messages))
        assert core.net_debits(TID, MID, 1, "1122") == 1
    finally:
        up.close()
        assert server.stop()


def test_server_closes_on_client_garbage_and_serves_many(served: tuple[HostCore, Uplink, HostServer]) -> None:
    core, up, server = served
    with socket.create_connection(("127.0.0.1", server.port), timeout=3.0) as raw:
        raw.sendall(HostCodec().frame(b"\xff" * 20))
        assert raw.recv(100) == b""
    assert server.counters["client_garbage"] == 1
    others = [Uplink("127.0.0.1", server.port, HostCodec()) for _ in range(3)]
    try:
        for i, o in enumerate(others, start=10):
            assert connected(o) and o.send(sale(stan=i))
        for i, o in enumerate(others, start=10):
            assert messages(collect(o, messages))[0].fields["11"] == f"{i:06d}"
        assert up.send(sale(stan=1)) and messages(collect(up, messages))
    finally:
        for o in others:
            o.close()
    assert core.total_net_debits() == 4


def test_delayed_reply_to_closed_connection_is_counted(served: tuple[HostCore, Uplink, HostServer]) -> None:
    core, up, server = served
    core.force("delay_response")
    up.send(sale())
    up.close()
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and not server.counters["delayed_reply_no_connection"]:
        time.sleep(0.02)
    assert server.counters["delayed_reply_no_connection"] == 1
    assert core.net_debits(TID, MID, 1, "1122") == 1


# --- CLI -------------------------------------------------------------------------------------------


def test_arg_parser() -> None:
    args = build_arg_parser().parse_args(
        ["--port", "0", "--no-dup-detection", "--fault", "garbage=0.1", "--fault", "drop_request=0.2",
         "--tpdu", "6000010002", "--header", "ascii4"])
    assert args.dup_detection is False and dict(args.fault) == {"garbage": 0.1, "drop_request": 0.2}
    assert args.tpdu == bytes.fromhex("6000010002")
    for bad in (["--fault", "meteor=0.1"], ["--fault", "garbage=2"], ["--tpdu", "61"], ["--header", "x"]):
        with pytest.raises(SystemExit):
            build_arg_parser().parse_args(bad)
    with pytest.raises(SystemExit):
        main(["--fault", "garbage"])


def test_arg_parser_acquirer_answers() -> None:
    p = build_arg_parser()
    default = build_profile(p.parse_args([]))
    assert default == AcquirerProfile() and default.is_plain
    assert build_profile(p.parse_args(["--profile", "real-world"])) == AcquirerProfile.real_world()
    args = p.parse_args(["--answer", "08=0.1", "--answer", "Q7=0.05", "--answer", "0230=0.02",
                         "--reversal-answer", "silence=0.1", "--reversal-answer", "refuse:96=0.2",
                         "--reversal-answer", "0411=1", "--booked-share", "0.25", "--partial-field", "54",
                         "--reversal-silence-s", "45", "--silence-window", "0:90", "--silence-window", "200:210"])
    prof = build_profile(args)
    assert prof.answers == {"08": 0.1, "Q7": 0.05} and prof.wrong_mti == {"0230": 0.02}
    assert (prof.reversal_silence, prof.reversal_refusals, prof.reversal_0411) == (0.1, {"96": 0.2}, 1.0)
    assert (prof.booked_share, prof.partial_field, prof.reversal_silence_s) == (0.25, "54", 45.0)
    assert prof.silence_windows == ((0.0, 90.0), (200.0, 210.0)) and prof.name == "default+custom"
    rw = build_profile(p.parse_args(["--profile", "real-world", "--answer", "08=0"]))
    assert rw.answers["08"] == 0 and rw.answers["10"] == AcquirerProfile.real_world().answers["10"]
    for bad in (["--answer", "8=0.1"], ["--answer", "08"], ["--answer", "08=1.5"], ["--answer", "0210=0.1"],
                ["--answer", "08=x"], ["--reversal-answer", "refuse:25=0.1"], ["--reversal-answer", "nap=0.1"],
                ["--profile", "nexi"], ["--partial-field", "5"], ["--silence-window", "9:3"],
                ["--silence-window", "5"], ["--reversal-silence-s", "-1"], ["--booked-share", "nan"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
    with pytest.raises(SystemExit):
        main(["--answer", "08=0.6", "--answer", "10=0.5"])  # shares over 1: a usage error before serving


def test_e2e_acquirer_answers_over_tcp(served: tuple[HostCore, Uplink, HostServer]) -> None:
    """The answer kinds survive the codec: 54, unknown codes, wrong MTIs, 0411; silence sends nothing."""
    core, up, _ = served
    core.profile = AcquirerProfile(partial_field="54")
    core.force_answer("10", approved_amount=400)
    core.force_answer("Q7", booked=True)
    core.force_answer("00", mti="0810")
    for stan in (1, 2, 3):
        up.send(sale(stan=stan))
    got = {m.fields["11"]: m.fields for m in messages(collect(up, lambda xs: len(messages(xs)) >= 3))}
    assert (got["000001"]["39"], got["000001"]["54"], got["000001"]["4"]) == ("10", "0002978C000000000400", "000000001000")
    assert got["000002"]["39"] == "Q7" and got["000003"]["t"] == "0810"
    assert [d.amount for d in core.debits()] == [400, 1000, 1000]
    core.force_reversal_answer("silence")
    core.force_reversal_answer("0411")
    up.send(reversal(stan=1))
    assert collect(up, never, timeout=0.3) == []
    up.send(reversal(stan=1, mti="0401"))
    (rev,) = messages(collect(up, messages))
    assert rev.fields["t"] == "0411" and rev.fields["39"] == "00"
    assert core.net_by_key() == {(TID, MID, f"{i:06d}", "1122"): int(i != 1) for i in (1, 2, 3)}


def test_main_serves_and_dumps_ledger_on_sigterm(tmp_path: Path) -> None:
    ledger, settle = tmp_path / "ledger.json", tmp_path / "settle.csv"
    env = subprocess_env()
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from guard.simulation.hostcli import main; sys.exit(main())",
         "--port", "0", "--seed", "3", "--ledger", str(ledger), "--settlement", str(settle)],
        stdout=subprocess.PIPE, text=True, env=env, cwd=str(tmp_path),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("hostsim listening on 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        up = Uplink("127.0.0.1", port, HostCodec())
        assert connected(up) and up.send(sale())
        assert messages(collect(up, messages))
        up.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert "1 debits" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
    data = json.loads(ledger.read_text())
    assert data["totals"]["net_debits"] == 1 and PAN not in ledger.read_text()
    assert settle.read_text().splitlines()[0] == ",".join(SETTLEMENT_COLUMNS)


def test_reply_is_plain_data() -> None:
    r = Reply({"t": "0210"})
    assert (r.action, r.delay, r.garbage, r.fault) == (ACTION_SEND, 0.0, b"", None)
