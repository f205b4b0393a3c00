"""End to end against an independent acquirer: reference reader -> pty null-modem -> the daemon's
objects (posguard.run.build) -> ``tests.support.acquirer_host.AcquirerHost`` on 127.0.0.1.

The acquirer reads field 39 from the ISO 8583:1987 table, not from the engine, and keeps its own
ledger. For every answer the property is the one the merchant cares about: the reader's final
state is APPROVED if and only if the acquirer holds exactly one net debit for the sale; otherwise
it holds none (docs/HOST.md "What posguard expects back")."""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from firmware_bridge import messages as M
from firmware_bridge.nullmodem import NullModem
from firmware_bridge.serial_port import open_port
from guard.core.model import TxnState
from guard.journal.keys import init_keys
from guard.simulation.readersim import ReaderSim
from tests.support.e2e import AMOUNT, PAN, SETTLE_S, TID, Guard, config, counter, journal_kinds, settled, status_after  # noqa: F401
from tests.support import subprocess_env, write_guard_toml
from tests.support.acquirer_host import AcquirerHost, Answer, ReversalRule, Script



@contextlib.contextmanager
def acquirer(script: Script = (), reversals: ReversalRule | None = None) -> Iterator[AcquirerHost]:
    """An ``AcquirerHost`` answering 0200s from ``script``, listening until the block ends."""
    host = AcquirerHost(script=script, reversals=reversals)
    host.start()
    try:
        yield host
    finally:
        host.stop()


def assert_agrees(final: M.ResultMessage | M.ErrorMessage, host: AcquirerHost) -> None:
    """The merchant's property: APPROVED iff exactly one net debit, otherwise none."""
    assert isinstance(final, M.ResultMessage) and not final.in_progress, final
    if final.state is TxnState.APPROVED:
        assert host.net_debits() == 1, (final, host.ledger)
    else:
        assert host.net_debits() == 0, (final, host.ledger)
        assert host.net_amount() == 0


UNCLASSIFIED = "UNCLASSIFIED_RESPONSE"


@pytest.mark.parametrize(
    ("answer", "final", "reason", "reversed_rc"),
    [
        (Answer("08"), TxnState.APPROVED, None, None),
        (Answer("11"), TxnState.APPROVED, None, None),
        (Answer("16"), TxnState.APPROVED, None, None),
        (Answer("05"), TxnState.DECLINED, None, None),
        (Answer("Q7", booked=True), TxnState.REVERSED, UNCLASSIFIED, "00"),
        (Answer("09", booked=True), TxnState.REVERSED, UNCLASSIFIED, "00"),
        (Answer("09", booked=False), TxnState.REVERSED, UNCLASSIFIED, "25"),
        (Answer("96", booked=False), TxnState.REVERSED, UNCLASSIFIED, "25"),
        (Answer("96", booked=True), TxnState.REVERSED, UNCLASSIFIED, "00"),
        (Answer("00", respond=False), TxnState.REVERSED, "HOST_TIMEOUT", "00"),
        (Answer("00", delay=2.5), TxnState.REVERSED, "HOST_TIMEOUT", "00"),
        (Answer("10", approved=AMOUNT), TxnState.REVERSED, "BAD_PARTIAL_AMOUNT", "00"),
    ],
    ids=["08-honour-with-id", "11-vip", "16-update-track3", "05-decline", "Q7-unknown-booked", "09-wait-booked",
         "09-wait-not-booked", "96-not-booked", "96-booked", "no-answer", "late-approval", "partial-not-partial"],
)
def test_final_state_agrees_with_the_acquirers_ledger(tmp_path: Path, answer: Answer, final: TxnState,
                                                      reason: str | None, reversed_rc: str | None) -> None:
    with acquirer([answer]) as host, counter(tmp_path, host) as r:
        res = settled(r, r.auth(r.new_txn_id(), AMOUNT, "978", PAN, "2912", timeout=15))
        assert isinstance(res, M.ResultMessage) and res.state is final, res
        assert_agrees(res, host)
        if final is TxnState.REVERSED:
            assert res.display_text.startswith("FAILED - NOT CHARGED")
            first = next(m for m in r.received if isinstance(m, M.ResultMessage) and not m.in_progress)
            assert first.state is TxnState.REVERSAL_PENDING and first.error_code == reason, first
            assert first.display_text.startswith("FAILED - NOT CHARGED")
        time.sleep(answer.delay)  # a late answer has arrived before the ledger is read again
        assert_agrees(res, host)
        reversals = [e for e in host.log if e.request["t"] in ("0400", "0401")]
        if reversed_rc is None:
            assert not reversals, "nothing to undo, nothing reversed"
        else:
            assert reversals and reversals[-1].response is not None and reversals[-1].response["39"] == reversed_rc
            assert reversals[0].request["90"][4:10] == host.stans("0200")[0]
        assert len(host.requests("0200")) == 1


def test_partial_approval_accepted_over_the_link_charges_the_approved_amount(tmp_path: Path) -> None:
    with acquirer([Answer("10", approved=800)]) as host, counter(tmp_path, host) as r:
        txn = r.new_txn_id()
        done = r.auth(txn, AMOUNT, "978", PAN, "2912", timeout=15, partial="accept")
        offer = [m for m in r.received if isinstance(m, M.ResultMessage) and m.state is TxnState.PARTIAL]
        assert offer and offer[0].amount == AMOUNT and offer[0].approved_amount == 800 and offer[0].txn_id == txn
        assert isinstance(done, M.ResultMessage) and done.state is TxnState.APPROVED, done
        assert done.approved_amount == 800 and r.stats.partials_accepted == 1
        assert_agrees(done, host)
        assert host.net_amount() == 800
        assert not host.requests("0400", "0401")
        again = r.status(txn)
        assert isinstance(again, M.ResultMessage) and again.state is TxnState.APPROVED


def test_partial_approval_survives_a_reader_reboot_and_is_accepted_after_status(tmp_path: Path) -> None:
    """The reader loses power while the operator looks at the PARTIAL: after SYNC, STATUS(TXN_ID)
    shows the same offer (both amounts), and CONFIRM still completes it for the approved amount."""
    with acquirer([Answer("10", approved=900)]) as host, counter(tmp_path, host) as r:
        txn = r.new_txn_id()
        offer = r.auth(txn, AMOUNT, "978", PAN, "2912", timeout=15)
        assert isinstance(offer, M.ResultMessage) and offer.state is TxnState.PARTIAL, offer
        r.reboot()
        r.sync(timeout=5)
        again = r.status(txn)
        assert isinstance(again, M.ResultMessage) and again.state is TxnState.PARTIAL and not again.in_progress
        assert (again.amount, again.approved_amount) == (AMOUNT, 900)
        done = r.decide_partial(again, "accept", timeout=15)
        assert isinstance(done, M.ResultMessage) and done.state is TxnState.APPROVED and done.approved_amount == 900
        assert_agrees(done, host)
        assert host.net_amount() == 900 and len(host.requests("0200")) == 1


def test_void_of_an_accepted_partial_reverses_the_approved_amount(tmp_path: Path) -> None:
    """HOST.md: a VOID of an accepted partial uses the approved amount. A VOID naming the amount
    asked is refused before anything reaches the acquirer; one naming APPROVED_AMOUNT reverses it."""
    with acquirer([Answer("10", approved=800)]) as host, counter(tmp_path, host) as r:
        txn = r.new_txn_id()
        done = r.auth(txn, AMOUNT, "978", PAN, "2912", timeout=15, partial="accept")
        assert isinstance(done, M.ResultMessage) and done.state is TxnState.APPROVED and done.approved_amount
        wrong = r.void(txn, AMOUNT, "978", timeout=15)
        assert isinstance(wrong, M.ErrorMessage) and wrong.error_code == "VOID_NOT_ALLOWED", wrong
        assert not host.requests("0400", "0401") and host.net_amount() == 800
        void = r.void(txn, done.approved_amount, "978", timeout=15)
        assert isinstance(void, M.ResultMessage) and void.state is TxnState.APPROVED, void
        final = settled(r, status_after(r, txn, TxnState.APPROVED, time.monotonic() + SETTLE_S))
        assert isinstance(final, M.ResultMessage) and final.state is TxnState.REVERSED, final
        assert_agrees(final, host)
        assert [x["4"] for x in host.requests("0400", "0401")][:1] == [f"{800:012d}"]


def test_partial_approval_cancelled_over_the_link_reverses_the_approved_amount(tmp_path: Path) -> None:
    with acquirer([Answer("10", approved=800)]) as host, counter(tmp_path, host) as r:
        txn = r.new_txn_id()
        cancelled = r.auth(txn, AMOUNT, "978", PAN, "2912", timeout=15, partial="cancel")
        assert isinstance(cancelled, M.ResultMessage), cancelled
        assert cancelled.state in (TxnState.REVERSAL_PENDING, TxnState.REVERSED) and r.stats.partials_cancelled == 1
        final = settled(r, cancelled)
        assert isinstance(final, M.ResultMessage) and final.state is TxnState.REVERSED, final
        assert_agrees(final, host)
        rev = host.requests("0400", "0401")
        assert rev and {x["4"] for x in rev} == {f"{800:012d}"}, "the reversal names the approved amount"


@pytest.mark.parametrize(
    ("reader", "reason"),
    [({"partial_expiry": 1}, "PARTIAL_EXPIRED"), ({"partial_approvals": False}, "PARTIAL_NOT_SUPPORTED")],
    ids=["operator-never-answers", "reader-cannot-show-partial"],
)
def test_a_partial_approval_nobody_accepts_is_reversed(tmp_path: Path, reader: dict[str, Any], reason: str) -> None:
    with acquirer([Answer("10", approved=600)]) as host, counter(tmp_path, host, reader=reader) as r:
        res = r.auth(r.new_txn_id(), AMOUNT, "978", PAN, "2912", timeout=15, partial="ignore")
        assert isinstance(res, M.ResultMessage), res
        if res.state is TxnState.PARTIAL:
            res = status_after(r, res.txn_id, TxnState.PARTIAL, time.monotonic() + SETTLE_S)
        assert isinstance(res, M.ResultMessage) and res.error_code == reason, res
        final = settled(r, res)
        assert isinstance(final, M.ResultMessage) and final.state is TxnState.REVERSED, final
        assert_agrees(final, host)
        assert {x["4"] for x in host.requests("0400", "0401")} == {f"{600:012d}"}


@pytest.mark.parametrize("partial", ["accept", "cancel"])
def test_readersim_cli_answers_a_partial_approval(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  partial: str) -> None:
    """`posguard readersim --partial accept|cancel` against the daemon and the acquirer."""
    from guard.simulation import readercli

    init_keys(tmp_path / "keys")
    with acquirer([Answer("10", approved=700)]) as host:
        cable = NullModem()
        try:
            guard = Guard(config(tmp_path, cable.a, host.port))
            try:
                code = readercli.main(["--port", cable.b, "--reader-id", "R1", "--amount", str(AMOUNT),
                                       "--partial", partial, "--boot-counter", "9", "--timeout", "15"])
                deadline = time.monotonic() + SETTLE_S
                while partial == "cancel" and host.net_debits() and time.monotonic() < deadline:
                    time.sleep(0.05)
            finally:
                guard.stop()
        finally:
            cable.close()
    out = capsys.readouterr().out
    assert code == 0, out
    if partial == "accept":
        assert "APPROVED" in out and "approved_amount=700" in out and "(partial, accepted)" in out
        assert host.net_amount() == 700 and host.net_debits() == 1
    else:
        assert "REVERSAL_PENDING" in out or "REVERSED" in out
        assert "(partial, cancelled)" in out and host.net_debits() == 0
    assert PAN not in out


@pytest.mark.parametrize("refusal", ["", "05"], ids=["ignored-once", "refused-once"])
def test_a_reversal_the_acquirer_ignores_or_refuses_is_repeated_until_it_lands(tmp_path: Path, refusal: str) -> None:
    """The first 0400 gets no answer (or an explicit refusal): the terminal repeats it as 0401 and
    the acquirer removes the debit exactly once."""
    seen: list[str] = []

    def once(fields: Any) -> str | None:
        seen.append(fields["t"])
        return refusal if len(seen) == 1 else None

    with acquirer([Answer("96", booked=True)], reversals=once) as host, counter(tmp_path, host) as r:
        final = settled(r, r.auth(r.new_txn_id(), AMOUNT, "978", PAN, "2912", timeout=15))
        assert isinstance(final, M.ResultMessage) and final.state is TxnState.REVERSED, final
        assert_agrees(final, host)
        assert seen[0] == "0400" and "0401" in seen[1:]
        assert all(d.reversals == 1 for d in host.ledger.values())


def test_the_acquirer_books_by_its_own_table() -> None:
    """The helper itself: approvals debit, declines do not, an ambiguous code needs the test's
    word, a reused STAN answers 94, a reversal answers 00 / 94 / 25 as the original stands. It
    takes no response classes from the engine's constants (it would then agree by construction)."""
    from tests.support import acquirer_host

    imports = [ln for ln in Path(acquirer_host.__file__).read_text().splitlines() if ln.startswith(("from ", "import "))]
    assert not [ln for ln in imports if "guard.core" in ln], imports
    host = AcquirerHost(script=[Answer("00"), Answer("51"), Answer("10", approved=300)])

    def rc(fields: dict[str, str], field: str = "39") -> str:
        resp = host.handle(fields)
        assert resp is not None
        return resp[field]

    sale = {"t": "0200", "4": "000000001000", "7": "1202101010", "11": "000001", "41": TID, "42": "M" * 15}
    assert rc(sale) == "00"
    assert rc(sale) == "94", "same terminal, merchant, STAN and day"
    assert rc({**sale, "11": "000002"}) == "51"
    assert rc({**sale, "11": "000003"}, "4") == "000000000300"
    assert host.net_debits() == 2 and host.net_amount() == 1300
    rev = {**sale, "t": "0400", "90": "0200" + "000001" + "1202101010" + "0" * 22}
    assert [rc(rev), rc(rev)] == ["00", "94"]
    assert rc({**rev, "90": "0200000002" + "1202101010" + "0" * 22}) == "25"
    assert host.net_amount() == 300
    with pytest.raises(ValueError, match="ambiguous"):
        Answer("09").debits()


@pytest.mark.parametrize("mti", ["0230", "0810"])
def test_a_mispaired_answer_never_approves_and_the_debit_is_reversed(tmp_path: Path, mti: str) -> None:
    with acquirer([Answer("00", mti=mti, booked=True)]) as host, counter(tmp_path, host) as r:
        res = r.auth(r.new_txn_id(), AMOUNT, "978", PAN, "2912", timeout=15)
        assert isinstance(res, M.ResultMessage) and res.state is not TxnState.APPROVED, res
        final = settled(r, res)
        assert isinstance(final, M.ResultMessage) and final.state is TxnState.REVERSED, final
        assert not any(isinstance(m, M.ResultMessage) and m.state is TxnState.APPROVED for m in r.received)
        assert_agrees(final, host)
        assert [e.response["39"] for e in host.log if e.request["t"] in ("0400", "0401") and e.response][-1] == "00"
    unmatched = journal_kinds(tmp_path, "unmatched_response")
    assert [p["why"] for _, p in unmatched] == ["MTI_MISMATCH"], unmatched


# ---------------------------------------------------------------------------- two journals, one day


def _sales(r: ReaderSim, n: int) -> list[M.ResultMessage | M.ErrorMessage]:
    return [r.auth(r.new_txn_id(), AMOUNT + i, "978", PAN, "2912", timeout=15) for i in range(n)]


def _replace_journal(tmp: Path) -> None:
    """What a technician does after a lost or corrupted journal: the old files go, fresh keys and
    an empty journal take their place at the same paths, same terminal id."""
    old = tmp / "old"
    old.mkdir()
    for p in [*tmp.glob("journal.db*"), tmp / "keys"]:
        shutil.move(str(p), str(old / p.name))
    init_keys(tmp / "keys")


def _daemon(tmp: Path, host: AcquirerHost, cable: NullModem) -> subprocess.Popen[str]:
    write_guard_toml(tmp / "guard.toml", config(tmp, cable.a, host.port))
    return subprocess.Popen([sys.executable, "-m", "posguard.cli", "run", "--config", str(tmp / "guard.toml")],
                            stderr=subprocess.PIPE, text=True, env=subprocess_env())


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    return err


def test_a_replaced_journal_never_reuses_a_stan_of_the_same_day(tmp_path: Path) -> None:
    """`posguard run` on journal A, sales, SIGTERM; the journal replaced by a fresh one (new keys,
    same terminal, same acquirer); `posguard run` again, sales: the clock floor keeps every STAN
    of B above A's, so the acquirer sees no STAN twice and books every sale."""
    init_keys(tmp_path / "keys")
    with acquirer() as host:
        for boot in (1, 2):
            cable = NullModem()
            try:
                proc = _daemon(tmp_path, host, cable)
                try:
                    with ReaderSim(open_port(cable.b), reader_id="R1", rng=random.Random(boot),
                                   boot_counter=boot) as r:
                        r.sync(timeout=15)
                        results = _sales(r, 3)
                finally:
                    _stop(proc)
            finally:
                cable.close()
            assert all(isinstance(x, M.ResultMessage) and x.state is TxnState.APPROVED for x in results), results
            if boot == 1:
                _replace_journal(tmp_path)
        stans = host.stans("0200", "0400", "0401", "0800")
        sale_stans = host.stans("0200")
        assert len(sale_stans) == 6 and len(set(sale_stans)) == 6, sale_stans
        assert not [e for e in host.log if e.response and e.response["39"] == "94"], "no STAN collision"
        assert set(stans) - set(sale_stans) <= set(host.stans("0800")), "reversals only name sales"
        assert host.net_debits() == 6


def test_without_the_clock_floor_a_collision_is_declined_and_reverses_nothing(tmp_path: Path) -> None:
    """The same replacement with host.stan_from_clock = false: journal B starts its STANs where A
    started, the acquirer answers 94 to B's first sale, the reader sees DECLINED STAN_COLLISION, no
    0400 is sent (it would name A's sale) and A's debits stay."""
    with acquirer() as host:
        a = tmp_path / "a"
        a.mkdir()
        with counter(a, host, seed=1, stan_from_clock=False) as r:
            first = _sales(r, 2)
        assert all(isinstance(x, M.ResultMessage) and x.state is TxnState.APPROVED for x in first), first
        assert host.net_debits() == 2
        _replace_journal(a)
        with counter(a, host, seed=2, stan_from_clock=False) as r:
            clash = r.auth(r.new_txn_id(), 990, "978", PAN, "2912", timeout=15)
            assert isinstance(clash, M.ResultMessage) and clash.state is TxnState.DECLINED, clash
            assert clash.error_code == "STAN_COLLISION" and "NOT CHARGED" in clash.display_text
            time.sleep(2.5)  # two host timeouts: a reversal, if the engine queued one, would be on the wire
            again = r.status(clash.txn_id)
            assert isinstance(again, M.ResultMessage) and again.state is TxnState.DECLINED
        assert [e.response["39"] for e in host.log if e.request["t"] == "0200" and e.response][-1] == "94"
        assert not host.requests("0400", "0401"), "a 94 to a 0200 reverses nothing"
        assert host.net_debits() == 2 and host.net_amount() == AMOUNT + AMOUNT + 1
        assert TID == host.requests("0200")[-1]["41"]
