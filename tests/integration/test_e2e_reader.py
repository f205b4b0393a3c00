"""End to end over real ptys and real TCP: reference reader -> null-modem -> guard daemon
(config, journal on disk, reader bridge) -> host simulator on 127.0.0.1. Whatever the link does
to the frames, the host sees exactly one authorization per reader txn id."""

from __future__ import annotations

import contextlib
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Iterator

import pytest

from firmware_bridge import messages as M
from firmware_bridge.nullmodem import NullModem
from guard.simulation.linkfaults import LinkFaults
from guard.simulation.readersim import ReaderSim
from firmware_bridge.serial_port import open_port
from guard.simulation.hostsim import HostCore
from guard.simulation.hostserver import HostServer
from guard.hostlink.iso import HostCodec
from guard.journal.keys import DeviceKeys, init_keys
from guard.core.model import TxnState
from posguard.config import parse
from posguard.run import build
from tests.support import write_guard_toml
from tests.support.e2e import MID, PAN, TID, Guard, config, journal_kinds, status_after  # noqa: F401

@pytest.fixture
def rig(tmp_path: Path, keys: DeviceKeys, host_server: Callable[..., tuple[HostServer, int]],
        null_modem: NullModem) -> Iterator[dict[str, Any]]:
    core = HostCore(seed=3, dup_detection=False)  # a host that would charge a resent 0200 again
    _, port = host_server(core)
    cable = null_modem
    guard = Guard(config(tmp_path, cable.a, port))
    readers: list[ReaderSim] = []

    def reader(faults: LinkFaults | None = None, boot: int = 1) -> ReaderSim:
        r = ReaderSim(open_port(cable.b), reader_id="R1", rng=random.Random(boot), faults=faults, boot_counter=boot)
        readers.append(r)
        r.sync(timeout=5)
        return r

    yield {"core": core, "guard": guard, "reader": reader, "tmp": tmp_path}
    for r in readers:
        r.close()
    guard.stop()


def assert_one_authorization_per_txn(core: HostCore, results: dict[bytes, Any]) -> None:
    per_stan = Counter(s["stan"] for s in core.ledger()["debits"])
    assert all(n == 1 for n in per_stan.values()), f"a STAN was debited twice: {per_stan}"
    requests = core.stats()["requests_by_mti"].get("0200", 0)
    assert requests == len(results), f"host saw {requests} 0200s for {len(results)} reader txn ids"
    approved = [r for r in results.values() if isinstance(r, M.ResultMessage) and r.state is TxnState.APPROVED]
    assert core.total_net_debits() == len(approved)


@pytest.mark.parametrize(
    "faults",
    [
        LinkFaults(seed=1, drop_ack_rate=0.5),
        LinkFaults(seed=2, duplicate_rate=0.5),
        LinkFaults(seed=3, truncate_rate=0.3),
        LinkFaults(seed=4, bitflip_rate=0.3),
        LinkFaults(seed=5, garbage_rate=0.5),
        LinkFaults(seed=6, split_writes=True),
        LinkFaults(seed=7, concatenate=True, duplicate_rate=0.3),
        LinkFaults(seed=8, drop_ack_rate=0.2, duplicate_rate=0.2, truncate_rate=0.1, bitflip_rate=0.1, garbage_rate=0.2,
                   split_writes=True),
    ],
    ids=["lost-acks", "duplicated", "truncated", "bit-flipped", "garbage-between", "split-bytes", "concatenated", "everything"],
)
def test_one_authorization_per_txn_id_whatever_the_link_does(rig: dict[str, Any], faults: LinkFaults) -> None:
    r = rig["reader"](faults)
    results = {}
    for i in range(6):
        txn = r.new_txn_id()
        results[txn] = r.auth(txn, 1000 + 10 * i, "978", PAN, "2912", timeout=30)
        assert isinstance(results[txn], M.ResultMessage) and results[txn].state is TxnState.APPROVED, results[txn]
    assert_one_authorization_per_txn(rig["core"], results)
    assert sum(faults.counts.as_dict().values()) > 0, "the faults were not applied"


def test_reader_reboots_after_sending_and_resends_same_txn_id_in_new_epoch(rig: dict[str, Any]) -> None:
    r = rig["reader"]()
    txn = r.new_txn_id()
    r.submit(M.Auth(txn, 2500, "978", PAN, "2912", "R1"))
    time.sleep(0.3)  # the AUTH reached the guard; the reader loses power before the RESULT
    epoch = r.epochs[-1]
    r.reboot()
    r.sync(timeout=5)
    assert r.epochs[-1] != epoch
    res = r.auth(txn, 2500, "978", PAN, "2912", timeout=10)
    assert isinstance(res, M.ResultMessage) and res.state is TxnState.APPROVED
    assert_one_authorization_per_txn(rig["core"], {txn: res})


def test_reader_asks_status_after_reboot_instead_of_resending(rig: dict[str, Any]) -> None:
    r = rig["reader"]()
    txn = r.new_txn_id()
    r.submit(M.Auth(txn, 3100, "978", PAN, "2912", "R1"))
    time.sleep(0.3)
    r.reboot()
    r.sync(timeout=5)
    deadline = time.monotonic() + 10
    res = r.status(txn)
    while isinstance(res, M.ResultMessage) and res.in_progress and time.monotonic() < deadline:
        time.sleep(0.1)
        res = r.status(txn)
    assert isinstance(res, M.ResultMessage) and res.state is TxnState.APPROVED and not res.in_progress
    last = r.status(None)
    assert isinstance(last, M.ResultMessage) and last.txn_id == txn
    assert_one_authorization_per_txn(rig["core"], {txn: res})


def test_same_txn_id_other_amount_is_refused_and_host_sees_nothing_new(rig: dict[str, Any]) -> None:
    r = rig["reader"]()
    txn = r.new_txn_id()
    first = r.auth(txn, 4000, "978", PAN, "2912", timeout=10)
    assert isinstance(first, M.ResultMessage) and first.state is TxnState.APPROVED
    again = r.auth(txn, 4001, "978", PAN, "2912", timeout=10)
    assert isinstance(again, M.ErrorMessage) and again.error_code == "IDEMPOTENCY_MISMATCH"
    assert rig["core"].stats()["requests_by_mti"]["0200"] == 1


def test_unknown_txn_status_and_garbage_messages_get_specific_errors(rig: dict[str, Any]) -> None:
    r = rig["reader"]()
    res = r.status(b"\x07" * 16)
    assert isinstance(res, M.ErrorMessage) and res.error_code == "TXN_UNKNOWN"
    assert isinstance(r.ping(), M.Pong)
    assert rig["guard"].error is None


def test_daemon_process_runs_from_config_and_stops_cleanly_on_sigterm(
        tmp_path: Path, keys: DeviceKeys, host_server: Callable[..., tuple[HostServer, int]], null_modem: NullModem) -> None:
    core = HostCore(seed=4, dup_detection=True)
    _, port = host_server(core)
    cable = null_modem
    write_guard_toml(tmp_path / "guard.toml", config(tmp_path, cable.a, port))
    proc = subprocess.Popen([sys.executable, "-m", "posguard.cli", "run", "--config", str(tmp_path / "guard.toml")],
                            stderr=subprocess.PIPE, text=True)
    try:
        r = ReaderSim(open_port(cable.b), reader_id="R1", rng=random.Random(1))
        r.sync(timeout=10)
        txn = r.new_txn_id()
        res = r.auth(txn, 1234, "978", PAN, "2912", timeout=15)
        assert isinstance(res, M.ResultMessage) and res.state is TxnState.APPROVED
        r.close()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert '"msg": "stopped' in err and PAN not in err
    assert core.total_net_debits() == 1


def test_broken_config_fails_at_start_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "guard.toml").write_text('[terminal]\nterminal_id = "SHORT"\nmerchant_id = "MERCHANT0000001"\n')
    proc = subprocess.run([sys.executable, "-m", "posguard.cli", "run", "--config", str(tmp_path / "guard.toml")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "terminal.terminal_id" in proc.stderr and "exactly 8" in proc.stderr


@contextlib.contextmanager
def counter(tmp: Path, core: HostCore, seed: int, **policy: Any) -> Iterator[ReaderSim]:
    """The daemon's objects with these [policy] settings, the host simulator and a synced reader
    on a pty null-modem; torn down in order (reader, guard, cable, host)."""
    init_keys(tmp / "keys")
    server = HostServer(core, HostCodec())
    port = server.start()
    cable = NullModem()
    try:
        cfg = config(tmp, cable.a, port)
        cfg["policy"].update(policy)
        guard = Guard(cfg)
        r = ReaderSim(open_port(cable.b), reader_id="R1", rng=random.Random(seed))
        try:
            r.sync(timeout=5)
            yield r
        finally:
            r.close()
            guard.stop()
    finally:
        cable.close()
        server.stop()


def test_double_swipe_rule_end_to_end_held_then_confirmed_over_the_link(tmp_path: Path) -> None:
    """Field problem 1 through the reader link: the second swipe is HELD with its reason, the host
    sees nothing for it until the operator's CONFIRM, and the journal explains the decision."""
    core = HostCore(seed=5, dup_detection=True)
    with counter(tmp_path, core, 2, double_swipe_window=120) as r:
        first, second = r.new_txn_id(), r.new_txn_id()
        assert r.auth(first, 1500, "978", PAN, "2912", timeout=10).state is TxnState.APPROVED
        held = r.auth(second, 1500, "978", PAN, "2912", timeout=10)
        assert isinstance(held, M.ResultMessage) and held.state is TxnState.HELD
        assert held.error_code == "HOLD_DOUBLE_SWIPE" and "DOUBLE SWIPE" in (held.display_text or "")
        assert core.stats()["requests_by_mti"]["0200"] == 1, "a held sale is not sent"
        done = r.confirm(second, timeout=10)
        assert isinstance(done, M.ResultMessage) and done.state is TxnState.APPROVED
        assert core.total_net_debits() == 2
    from guard.journal.store import Journal
    from guard.journal.keys import load_keys

    j = Journal.open(tmp_path / "journal.db", load_keys(tmp_path / "keys"), terminal_id=TID)
    kinds = [(e.kind, e.payload.get("code")) for e in j.entries() if e.kind in ("held", "released")]
    j.close()
    assert kinds == [("held", "HOLD_DOUBLE_SWIPE"), ("released", None)]


def test_operator_error_remedies_end_to_end_over_the_link(tmp_path: Path) -> None:
    """Field problem 4 through the reader link: the amount is confirmed before anything is sent
    (CANCEL drops a wrong one), a large sale asks for a signature (SIGNED records it), a refund goes
    back to the original card and cannot exceed the sale."""
    core = HostCore(seed=6, dup_detection=True)
    with counter(tmp_path, core, 3, confirm_amount=True, signature_above=10_000) as r:
        wrong, sale, refund, too_much = (r.new_txn_id() for _ in range(4))
        held = r.auth(wrong, 1234, "978", PAN, "2912", timeout=10)
        assert isinstance(held, M.ResultMessage) and held.state is TxnState.HELD
        assert held.error_code == "HOLD_CONFIRM_AMOUNT" and held.display_text == "CONFIRM AMOUNT 12.34"
        cancelled = r.cancel(wrong, timeout=10)
        assert isinstance(cancelled, M.ResultMessage) and cancelled.state is TxnState.DECLINED
        assert cancelled.error_code == "OPERATOR_CANCELLED"
        assert "0200" not in core.stats()["requests_by_mti"], "nothing reached the host before CONFIRM"
        assert r.auth(sale, 12_340, "978", PAN, "2912", timeout=10).state is TxnState.HELD
        done = r.confirm(sale, timeout=10)
        assert isinstance(done, M.ResultMessage) and done.state is TxnState.APPROVED
        assert (done.display_text or "").endswith("SIGNATURE REQUIRED")
        signed = r.signed(sale, timeout=10)
        assert isinstance(signed, M.ResultMessage) and signed.state is TxnState.APPROVED
        assert r.refund(340, "978", PAN, "2912", sale, txn_id=refund, timeout=10).state is TxnState.HELD
        back = r.confirm(refund, timeout=10)
        assert isinstance(back, M.ResultMessage) and back.state is TxnState.APPROVED
        err = r.refund(12_001, "978", PAN, "2912", sale, txn_id=too_much, timeout=10)
        assert isinstance(err, M.ErrorMessage) and err.error_code == "REFUND_EXCEEDS_ORIGINAL"
        led = core.ledger()
        assert [(d["type"], d["amount"]) for d in led["debits"]] == [("SALE", 12_340), ("REFUND", 340)]
        assert led["totals"]["net_amount"] == 12_000
    kinds = journal_kinds(tmp_path, "held", "outcome", "signature", "refund_of")
    assert [k for k, _ in kinds] == ["held", "outcome", "held", "outcome", "signature", "refund_of", "held", "outcome"]
    assert kinds[1][1]["reason"] == "OPERATOR_CANCELLED" and kinds[3][1]["signature"] == "REQUIRED"


def test_offline_sale_end_to_end_deferred_then_forwarded_when_the_host_returns(tmp_path: Path, keys: DeviceKeys) -> None:
    """Field problem 5 with deferred authorization on: the host is down, the reader gets APPROVED
    OFFLINE within the limits and a clean decline above them; when the host is back the guard
    forwards the stored sale as an 0220 and the host holds exactly one debit for it."""
    core = HostCore(seed=7, dup_detection=False)
    probe = HostServer(core, HostCodec())
    port = probe.start()
    probe.stop()  # the port the guard dials is closed: host unreachable
    cable = NullModem()
    cfg = config(tmp_path, cable.a, port, connect_timeout=0.2)
    cfg["offline"] = {"enabled": True, "max_sale_amount": 5000, "max_total_amount": 6000, "max_count": 5}
    guard = Guard(cfg)
    r = ReaderSim(open_port(cable.b), reader_id="R1", rng=random.Random(4))
    server: HostServer | None = None
    try:
        r.sync(timeout=5)
        a, b = r.new_txn_id(), r.new_txn_id()
        d = r.auth(a, 4000, "978", PAN, "2912", timeout=10)
        assert isinstance(d, M.ResultMessage) and d.state is TxnState.DEFERRED and d.display_text == "APPROVED OFFLINE"
        over = r.auth(b, 4000, "978", PAN, "2912", timeout=10)
        assert isinstance(over, M.ResultMessage) and over.state is TxnState.DECLINED
        assert over.error_code == "OFFLINE_LIMIT_TOTAL_AMOUNT"
        server = HostServer(core, HostCodec(), port=port)
        server.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and core.total_net_debits() == 0:
            time.sleep(0.1)
        final = status_after(r, a, TxnState.DEFERRED, deadline)
        assert isinstance(final, M.ResultMessage) and final.state is TxnState.APPROVED
        assert core.stats()["requests_by_mti"].get("0220") == 1 and "0200" not in core.stats()["requests_by_mti"]
        assert core.total_net_debits() == 1
    finally:
        r.close()
        guard.stop()
        cable.close()
        if server is not None:
            server.stop()
    kinds = [k for k, _ in journal_kinds(tmp_path, "deferred", "advice_attempt", "outcome")]
    assert kinds == ["deferred", "outcome", "advice_attempt", "outcome"]


def test_velocity_identity_and_void_rules_end_to_end_over_the_link(tmp_path: Path) -> None:
    """Field problems 2, 3 and 4 (void) through the reader link: a third sale on a card within the
    window is a local decline that never reaches the host; host 65 reads the same; an answer for
    another merchant is reversed and the reader told "not charged"; host 03 reads as a terminal
    configuration problem; a VOID reverses an approved sale. Reader message, journal entry and
    host ledger are checked for each."""
    core = HostCore(seed=8, dup_detection=False)
    other = "4000056655665556"
    with counter(tmp_path, core, 5, card_max_count=2, card_count_window=600) as r:
        one, two, three = r.new_txn_id(), r.new_txn_id(), r.new_txn_id()
        assert r.auth(one, 1000, "978", PAN, "2912", timeout=10).state is TxnState.APPROVED
        assert r.auth(two, 2000, "978", PAN, "2912", timeout=10).state is TxnState.APPROVED
        v = r.auth(three, 3000, "978", PAN, "2912", timeout=10)
        assert isinstance(v, M.ResultMessage) and v.state is TxnState.DECLINED
        assert v.error_code == "VELOCITY_CARD_COUNT" and v.display_text == "CARD USED TOO FREQUENTLY"
        assert not v.response_code, "a local decline carries no host response code"
        assert core.stats()["requests_by_mti"]["0200"] == 2, "the velocity decline never reached the host"

        core.approve_rule = lambda f: "65"
        h65 = r.auth(r.new_txn_id(), 1100, "978", other, "2912", timeout=10)
        assert isinstance(h65, M.ResultMessage) and h65.state is TxnState.DECLINED
        assert h65.response_code == "65" and h65.display_text == v.display_text

        core.approve_rule = lambda f: "03"
        h03 = r.auth(r.new_txn_id(), 1200, "978", other, "2912", timeout=10)
        assert isinstance(h03, M.ResultMessage) and h03.state is TxnState.DECLINED
        assert "CONFIG" in (h03.display_text or "") and "NOT A CARD PROBLEM" in (h03.display_text or "")

        core.approve_rule = lambda f: "00"
        core.force("wrong_echo")  # the host debits, then answers as if for another terminal/merchant
        mism = r.new_txn_id()
        m = r.auth(mism, 1300, "978", "5555555555554444", "2912", timeout=10)  # a card under its limit
        assert isinstance(m, M.ResultMessage) and m.state in (TxnState.REVERSAL_PENDING, TxnState.REVERSED)
        assert (m.display_text or "").startswith("FAILED - NOT CHARGED")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and core.stats()["requests_by_mti"].get("0400", 0) < 1:
            time.sleep(0.05)
        final = status_after(r, mism, TxnState.REVERSAL_PENDING, deadline)
        assert isinstance(final, M.ResultMessage) and final.state is TxnState.REVERSED

        void = r.void(one, 1000, "978", timeout=15)
        assert isinstance(void, M.ResultMessage) and void.state is TxnState.APPROVED
        led = core.ledger()
        assert led["totals"]["net_amount"] == 2000, "only sale two stays charged"
        assert core.total_net_debits() == 1
    entries = journal_kinds(tmp_path, "outcome", "reversal_pending", "reversed")
    reasons = [(k, p.get("reason")) for k, p in entries]
    assert ("outcome", "VELOCITY_CARD_COUNT") in reasons
    assert ("reversal_pending", "ECHO_MISMATCH") in reasons and ("reversal_pending", "VOID") in reasons
    mismatch = next(p for k, p in entries if k == "reversal_pending" and p.get("reason") == "ECHO_MISMATCH")
    assert set(mismatch["fields"]) & {"41", "42", "4", "11"}, mismatch
    assert sum(k == "reversed" for k, _ in entries) == 2


def test_first_sale_after_a_reader_restart_needs_no_retransmission(rig: dict[str, Any]) -> None:
    """Issue 13: a reader process that restarts with the same SYNC nonce as its previous run (an
    unseeded RNG, or ``posguard readersim`` twice with one seed) used to be answered as a repeat
    of the old SYNC: it adopted the old epoch, its AUTH seq 0 was ignored as out of sequence and
    went through three retransmissions and a resync (about 5 s). The guard now starts a new epoch
    for a SYNC that follows traffic of the epoch, so the first sale is as fast as any other."""
    first = rig["reader"](boot=1)
    for i in range(2):  # the guard has accepted seq 0 and 1 of this epoch
        assert first.auth(first.new_txn_id(), 1000 + i, "978", PAN, "2912", timeout=10).state is TxnState.APPROVED
    old_epoch = first.epochs[-1]
    first.close()
    again = rig["reader"](boot=1)  # same seed and boot counter: the very same SYNC nonce
    assert again.epochs[-1] != old_epoch, "the restarted reader got the old epoch back"
    again.new_txn_id(), again.new_txn_id()  # ids of the first run's sales
    txn = again.new_txn_id()
    res = again.auth(txn, 1500, "978", PAN, "2912", timeout=15)
    assert isinstance(res, M.ResultMessage) and res.state is TxnState.APPROVED
    assert (again.retransmissions, again.stats.link_downs, again.stats.status_polls, again.stats.resends) == (0, 0, 0, 0)
    assert rig["guard"].bridge.link.endpoint.stats.retransmissions == 0


def _tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + len(value).to_bytes(2, "big") + value


def test_refused_messages_name_their_txn_id_and_the_first_failing_check(rig: dict[str, Any]) -> None:
    """PROTOCOL.md 5.4 (order of checks): the daemon checks a reader message in one documented order, answers the
    first failure with its code and, whenever the TXN_ID can be read, names it. An id refused with
    an ERROR, or used by PING, is not taken: it can still carry a sale."""
    r = rig["reader"]()
    t = bytes(range(1, 17))
    txn, amt, cur = _tlv(0x01, t), _tlv(0x02, bytes.fromhex("000000001000")), _tlv(0x03, b"978")
    pan, bad_luhn, exp = _tlv(0x04, PAN.encode()), _tlv(0x04, b"4761739001010118"), _tlv(0x05, b"2912")
    cases = [
        (b"", "MSG_TRUNCATED", None),
        (b"\x01" + txn + amt[:4], "MSG_TRUNCATED", t),
        (b"\x7e" + txn, "MSG_UNKNOWN_TYPE", t),  # no message has type 0x7E
        (b"\x81" + txn + txn, "MSG_NOT_A_REQUEST", None),  # before its TLVs are looked at
        (b"\x81" + txn, "MSG_NOT_A_REQUEST", t),
        (b"\x01" + txn + amt + amt + _tlv(0x03, b"97A"), "MSG_DUPLICATE_TAG", t),  # structure before values
        (b"\x04" + txn + pan + _tlv(0x07, b"bad:id"), "MSG_CLEAR_PAN", t),  # card data before values
        (b"\x01" + txn + _tlv(0x02, b"\x00" * 6) + cur, "MSG_BAD_VALUE", t),  # values before missing tags
        (b"\x01" + _tlv(0x01, t[:15]) + amt + cur + pan, "MSG_BAD_VALUE", None),
        (b"\x01" + txn + amt + cur, "MSG_MISSING_TAG", t),
        (b"\x05" + txn + _tlv(0x08, b"\x01"), "MSG_CONFLICTING_TAGS", t),
        (b"\x06" + txn + _tlv(0x07, b"R2"), "MSG_READER_MISMATCH", t),
        (b"\x04" + txn + _tlv(0x07, b"R2"), "MSG_READER_MISMATCH", t),
        (b"\x01" + txn + amt + cur + bad_luhn + exp + _tlv(0x07, b"R2"), "MSG_READER_MISMATCH", t),
        (b"\x01" + txn + amt + cur + bad_luhn + exp, "REQUEST_BAD_PAN", t),
    ]
    got = []
    for payload, _, _ in cases:
        answer = r.send_payload(payload, timeout=5)
        assert isinstance(answer, M.ErrorMessage), answer
        got.append((answer.error_code, answer.txn_id))
    assert got == [(code, tid) for _, code, tid in cases]
    ping = r.ping()
    assert isinstance(ping, M.Pong)
    for reused in (t, ping.txn_id):
        res = r.auth(reused, 1000, "978", PAN, "2912", timeout=10)
        assert isinstance(res, M.ResultMessage) and res.state is TxnState.APPROVED
    assert rig["core"].stats()["requests_by_mti"]["0200"] == 2


def test_reversed_after_reversal_pending_is_pushed_without_a_status(rig: dict[str, Any]) -> None:
    """PROTOCOL.md 6.1/7.8: REVERSAL_PENDING comes with IN_PROGRESS 00 (stop waiting, not final);
    the final REVERSED that follows is pushed like the outcome after HELD, not left to a STATUS."""
    r = rig["reader"]()
    r.app_timeout = 600.0  # a STATUS from the application timer would hide a missing push
    rig["core"].force("wrong_echo")
    txn = r.new_txn_id()
    first = r.auth(txn, 1300, "978", PAN, "2912", timeout=10)
    assert isinstance(first, M.ResultMessage) and not first.in_progress
    assert first.state in (TxnState.REVERSAL_PENDING, TxnState.REVERSED)
    final = r.results[txn] if r.results[txn].state is TxnState.REVERSED else r.await_final(txn, timeout=10)
    assert isinstance(final, M.ResultMessage) and final.state is TxnState.REVERSED and not final.in_progress
    assert r.stats.status_polls == 0 and not any(isinstance(m, M.Status) for m in r.sent)


def test_result_lost_at_a_resync_is_pushed_again_in_the_new_epoch(rig: dict[str, Any]) -> None:
    """PROTOCOL.md 4.5/7.8: the RESULT outstanding when the reader rebooted (SendFailed on the
    guard's side) is pushed again, in its current state, once the new epoch is up."""
    r = rig["reader"]()
    r.app_timeout = 600.0
    bridge = rig["guard"].bridge
    txn = r.new_txn_id()
    r.submit(M.Auth(txn, 2700, "978", PAN, "2912", "R1"))
    deadline = time.monotonic() + 10
    while bridge.stats["results"] < 1 and time.monotonic() < deadline:  # sent, never read by the reader
        time.sleep(0.01)
    assert bridge.stats["results"] == 1
    r.reboot()
    r.sync(timeout=5)
    res = r.results[txn] if txn in r.results else r.await_final(txn, timeout=10)  # it may come with the SYNC_ACK
    assert isinstance(res, M.ResultMessage) and res.state is TxnState.APPROVED
    assert bridge.stats["undeliverable"] >= 1
    assert (r.stats.status_polls, r.stats.resends) == (0, 0)
    assert_one_authorization_per_txn(rig["core"], {txn: res})


def test_confirm_is_kept_alive_by_progress_until_the_released_sale_is_answered(
        tmp_path: Path, keys: DeviceKeys, host_server: Callable[..., tuple[HostServer, int]], null_modem: NullModem,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """PROTOCOL.md 5.4/7.6: CONFIRM is answered like the request it releases: PROGRESS while the
    host is asked, then the outcome (the PROGRESS interval is shortened here, the rule is not)."""
    from firmware_bridge import daemon

    monkeypatch.setattr(daemon, "PROGRESS_INTERVAL_S", 0.2)
    core = HostCore(seed=9, dup_detection=True, late_delay=1.5)
    _, port = host_server(core)
    cfg = config(tmp_path, null_modem.a, port, timeout=5.0)
    cfg["policy"]["confirm_amount"] = True
    guard = Guard(cfg)
    r = ReaderSim(open_port(null_modem.b), reader_id="R1", rng=random.Random(11))
    try:
        r.sync(timeout=5)
        txn = r.new_txn_id()
        held = r.auth(txn, 1234, "978", PAN, "2912", timeout=10)
        assert isinstance(held, M.ResultMessage) and held.state is TxnState.HELD
        core.force("delay_response")
        seen = len(r.received)
        done = r.confirm(txn, timeout=10)
        assert isinstance(done, M.ResultMessage) and done.state is TxnState.APPROVED
        progress = [m for m in r.received[seen:] if isinstance(m, M.Progress) and m.txn_id == txn]
        assert len(progress) >= 2 and {p.wait_s for p in progress} == {30}
    finally:
        r.close()
        guard.stop()
