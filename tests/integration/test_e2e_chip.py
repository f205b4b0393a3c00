"""Chip sales end to end over real ptys and real TCP: reference reader (cards.present) -> null-modem
-> guard daemon objects (config, journal on disk, reader bridge) -> host simulator on 127.0.0.1.
The host's approval of a chip sale is final only when the card accepts; otherwise the guard
reverses it and the host's ledger ends at no net debit. Afterwards the journal file, its WAL, the
logs and an export hold no PIN block, track 2, tag 57/5A value or clear PAN (raw bytes)."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from firmware_bridge import messages as M
from firmware_bridge.nullmodem import NullModem
from firmware_bridge.serial_port import open_port
from guard.core.emv import EntryMode
from guard.core.model import TxnState
from guard.journal.keys import DeviceKeys
from guard.simulation import cards
from guard.simulation.hostserver import HostServer
from guard.simulation.hostsim import HostCore
from guard.simulation.readersim import ReaderSim
from tests.support.e2e import Guard, config

PAN = "4761739001010119"
COMPLETION_TIMEOUT = 5  # the shortest the config allows


@pytest.fixture
def rig(tmp_path: Path, keys: DeviceKeys, host_server: Callable[..., tuple[HostServer, int]],
        null_modem: NullModem) -> Iterator[dict[str, Any]]:
    core = HostCore(seed=3, dup_detection=True)
    _, port = host_server(core)
    cfg = config(tmp_path, null_modem.a, port)
    cfg["reader"]["completion_timeout"] = COMPLETION_TIMEOUT
    guard = Guard(cfg)
    r = ReaderSim(open_port(null_modem.b), reader_id="R1", rng=random.Random(1))
    r.sync(timeout=5)
    yield {"core": core, "guard": guard, "reader": r, "tmp": tmp_path, "rng": random.Random(5)}
    r.close()
    guard.stop()


def sale(rig: dict[str, Any], model: cards.CardModel, amount: int = 1250) -> tuple[bytes, Any, Any]:
    r: ReaderSim = rig["reader"]
    txn = r.new_txn_id()
    first, final = cards.present(r, model, txn, amount, "978", PAN, "2912", rig["rng"], timeout=20)
    return txn, first, final


def settle(rig: dict[str, Any], txn: bytes, rounds: int = 200) -> M.ResultMessage:
    """STATUS until the transaction is final (bounded: the guard's reversal queue is quick)."""
    r: ReaderSim = rig["reader"]
    res: Any = None
    for _ in range(rounds):
        res = r.status(txn)
        if isinstance(res, M.ResultMessage) and res.state in (TxnState.APPROVED, TxnState.REVERSED,
                                                              TxnState.DECLINED, TxnState.NEEDS_MANUAL):
            return res
        time.sleep(0.05)
    raise AssertionError(f"not final: {res!r}")


def test_chip_approved_and_accepted_by_the_card_is_one_debit(rig: dict[str, Any]) -> None:
    txn, first, final = sale(rig, cards.CardModel(EntryMode.CHIP, cards.ACCEPT, online_pin=True))
    assert isinstance(first, M.ResultMessage) and first.state is TxnState.AWAITING_COMPLETION
    assert first.issuer_icc and first.issuer_icc[0] == 0x91, "the issuer's field 55 reaches the card"
    assert "APPROVED" != first.display_text.split()[0]
    assert isinstance(final, M.ResultMessage) and final.state is TxnState.APPROVED and not final.in_progress
    core: HostCore = rig["core"]
    assert core.total_net_debits() == 1 and core.stats().get("chip_sales") == 1


def test_host_approves_card_declines_reversed_not_charged(rig: dict[str, Any]) -> None:
    txn, first, final = sale(rig, cards.CardModel(EntryMode.CHIP, cards.DECLINE))
    assert isinstance(first, M.ResultMessage) and first.state is TxnState.AWAITING_COMPLETION
    assert isinstance(final, M.ResultMessage) and final.state in (TxnState.REVERSAL_PENDING, TxnState.REVERSED)
    assert final.error_code == "CARD_DECLINED" and "NOT CHARGED" in final.display_text
    assert settle(rig, txn).state is TxnState.REVERSED
    assert rig["core"].total_net_debits() == 0


def test_reader_reboots_before_complete_the_timeout_reverses(rig: dict[str, Any]) -> None:
    txn, first, final = sale(rig, cards.CardModel(EntryMode.CHIP, cards.REBOOT))
    assert isinstance(first, M.ResultMessage) and first.state is TxnState.AWAITING_COMPLETION and final is None
    res = settle(rig, txn, rounds=400)  # COMPLETION_TIMEOUT s, then the reversal
    assert res.state is TxnState.REVERSED and res.error_code == "COMPLETION_TIMEOUT"
    assert rig["core"].total_net_debits() == 0


def test_complete_resent_after_a_reboot_gets_the_stored_result(rig: dict[str, Any]) -> None:
    txn, first, final = sale(rig, cards.CardModel(EntryMode.CHIP, cards.REBOOT_RESEND))
    assert isinstance(final, M.ResultMessage) and final.state is TxnState.APPROVED
    r: ReaderSim = rig["reader"]
    again = r.complete(txn, "ACCEPTED", timeout=10)
    assert isinstance(again, M.ResultMessage) and again.state is TxnState.APPROVED and again.stan == final.stan
    contradicting = r.complete(txn, "CARD_DECLINED", timeout=10)  # a final sale is never re-decided
    assert isinstance(contradicting, M.ResultMessage) and contradicting.state is TxnState.APPROVED
    assert rig["core"].total_net_debits() == 1


def test_contactless_and_magstripe_sales_complete(rig: dict[str, Any]) -> None:
    _, first, final = sale(rig, cards.CardModel(EntryMode.CONTACTLESS, cards.ACCEPT))
    assert first.state is TxnState.AWAITING_COMPLETION and final.state is TxnState.APPROVED
    _, swiped, none = sale(rig, cards.CardModel(EntryMode.MAGSTRIPE), amount=990)
    assert isinstance(swiped, M.ResultMessage) and swiped.state is TxnState.APPROVED and none is None
    assert rig["core"].total_net_debits() == 2


def test_forbidden_tag_in_icc_data_is_refused_and_nothing_reaches_the_host(rig: dict[str, Any]) -> None:
    r: ReaderSim = rig["reader"]
    card = cards.card_data(cards.CardModel(EntryMode.CHIP), PAN, "2912", 700, "978", random.Random(1))
    msg = cards.auth_message(card, r.new_txn_id(), 700, "978", "R1")
    object.__setattr__(msg, "icc", card.icc + cards.tlv(0x5A, bytes.fromhex(PAN)))  # a kernel that leaks the PAN
    res = r.transact(msg, timeout=10)
    assert isinstance(res, M.ErrorMessage) and res.error_code == "REQUEST_ICC_FORBIDDEN_TAG"
    assert rig["core"].stats()["requests_by_mti"].get("0200", 0) == 0


def test_no_card_secret_on_disk_in_logs_or_exports_after_a_chip_run(rig: dict[str, Any],
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    r: ReaderSim = rig["reader"]
    rng = random.Random(9)
    secrets: list[bytes] = [PAN.encode(), bytes.fromhex(PAN)]  # clear PAN; tag 5A's value (BCD)
    for behaviour in (cards.ACCEPT, cards.DECLINE, cards.PULLED):
        model = cards.CardModel(EntryMode.CHIP, behaviour, online_pin=True)
        card = cards.card_data(model, PAN, "2912", 1500, "978", random.Random(rng.random()))
        txn = r.new_txn_id()
        first = r.transact(cards.auth_message(card, txn, 1500, "978", "R1"), timeout=20)
        assert isinstance(first, M.ResultMessage) and first.state is TxnState.AWAITING_COMPLETION
        decision = model.decision
        assert decision is not None
        r.complete(txn, decision.value, cards.final_icc(decision, 1, rng), timeout=20)
        settle(rig, txn)
        track2 = card.track2.encode()
        secrets += [card.pin_block, card.pin_block.hex().encode(), card.pin_block.hex().upper().encode(), track2,
                    track2[len(PAN) + 1:], card.track2.replace("D", "=").encode()]
    tmp: Path = rig["tmp"]
    files = {p.name: p.read_bytes() for p in tmp.glob("journal.db*")}  # while running: the -wal exists
    assert "journal.db-wal" in files
    rig["guard"].stop()
    rig["guard"].stop = lambda: None  # the fixture's teardown
    files.update({p.name + " (closed)": p.read_bytes() for p in tmp.glob("journal.db*")})
    from tests.support import cli

    code, out, err = cli("journal", "export", tmp / "journal.db", "--format", "jsonl")
    assert code == 0, err
    files["export"] = out.encode()
    files["logs"] = "\n".join(f"{rec.getMessage()} {rec.__dict__}" for rec in caplog.records).encode()
    for name, data in files.items():
        for s in secrets:
            assert s not in data, f"{name} holds a card secret ({len(s)} bytes)"
    print({k: len(v) for k, v in files.items()})
    db = b"".join(v for k, v in files.items() if k.startswith("journal.db"))
    assert b'"cryptogram":"TC"' in db and b'"entry":"CHIP"' in db, "the non-sensitive EMV facts are journaled"


def test_guard_restarted_while_the_card_decides_still_reverses_after_the_timeout(
        tmp_path: Path, keys: DeviceKeys, host_server: Callable[..., tuple[HostServer, int]], null_modem: NullModem) -> None:
    """The completion timer is rebuilt from the journal: the guard stops (power cut at the counter)
    while a chip sale awaits the card, the reader reboots too and never sends COMPLETE; the
    restarted guard reverses the sale when the timer runs out."""
    core = HostCore(seed=4, dup_detection=True)
    _, port = host_server(core)
    cfg = config(tmp_path, null_modem.a, port)
    cfg["reader"]["completion_timeout"] = COMPLETION_TIMEOUT
    guard = Guard(cfg)
    r = ReaderSim(open_port(null_modem.b), reader_id="R1", rng=random.Random(2))
    try:
        r.sync(timeout=5)
        txn = r.new_txn_id()
        card = cards.card_data(cards.CardModel(EntryMode.CHIP), PAN, "2912", 2200, "978", random.Random(3))
        first = r.transact(cards.auth_message(card, txn, 2200, "978", "R1"), timeout=20)
        assert isinstance(first, M.ResultMessage) and first.state is TxnState.AWAITING_COMPLETION
        assert core.total_net_debits() == 1
        guard.stop()
        guard = Guard(cfg)  # restore: AWAITING_COMPLETION with its timer, not a recovery reversal
        r.reboot()
        r.sync(timeout=5)
        res = settle({"reader": r}, txn, rounds=400)
        assert res.state is TxnState.REVERSED and res.error_code == "COMPLETION_TIMEOUT"
        assert core.total_net_debits() == 0
    finally:
        r.close()
        guard.stop()


@pytest.mark.parametrize("does,final", [("accept", "APPROVED"), ("decline", "REVERS")])
def test_readersim_cli_plays_a_chip_card(tmp_path: Path, keys: DeviceKeys, host_server: Callable[..., tuple[HostServer, int]],
                                         null_modem: NullModem, capsys: pytest.CaptureFixture[str], does: str,
                                         final: str) -> None:
    """`posguard readersim --card chip --card-does accept|decline` against the daemon and the host simulator."""
    from guard.simulation import readercli

    core = HostCore(seed=6, dup_detection=True)
    _, port = host_server(core)
    guard = Guard(config(tmp_path, null_modem.a, port))
    try:
        code = readercli.main(["--port", null_modem.b, "--reader-id", "R1", "--card", "chip", "--card-does", does,
                               "--boot-counter", "9", "--timeout", "15"])
    finally:
        guard.stop()
    out = capsys.readouterr().out
    assert code == 0, out
    assert "sale 1/1 txn " in out and final in out and PAN not in out
    assert core.stats().get("chip_sales") == 1


def test_host_down_a_swiped_sale_is_declined_a_chip_sale_within_its_floor_is_deferred(
        tmp_path: Path, keys: DeviceKeys, null_modem: NullModem) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on: the host is down
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = config(tmp_path, null_modem.a, port)
    cfg["offline"] = {"enabled": True, "max_sale_amount": 5000, "chip_floor_limit": 3000}
    guard = Guard(cfg)
    r = ReaderSim(open_port(null_modem.b), reader_id="R1", rng=random.Random(7))
    try:
        r.sync(timeout=5)
        rng = random.Random(8)
        _, swiped, _ = sale({"reader": r, "rng": rng}, cards.CardModel(EntryMode.MAGSTRIPE), amount=1000)
        assert isinstance(swiped, M.ResultMessage) and swiped.state is TxnState.DECLINED
        assert swiped.error_code == "OFFLINE_SWIPE_REFUSED" and "NOT CHARGED" in swiped.display_text
        _, chip, none = sale({"reader": r, "rng": rng}, cards.CardModel(EntryMode.CHIP), amount=2500)
        assert isinstance(chip, M.ResultMessage) and chip.state is TxnState.DEFERRED and none is None
        _, big, _ = sale({"reader": r, "rng": rng}, cards.CardModel(EntryMode.CHIP), amount=4000)
        assert isinstance(big, M.ResultMessage) and big.state is TxnState.DECLINED
        assert big.error_code == "OFFLINE_LIMIT_SALE_AMOUNT"
    finally:
        r.close()
        guard.stop()
