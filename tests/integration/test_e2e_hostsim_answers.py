"""End to end with the host simulator's acquirer answers (``HostCore.force_answer``): reference
reader -> pty -> the daemon's objects -> ``HostServer`` on 127.0.0.1. The host's ledger books by
the acquirers' documentation (08/10/11/16 debit; a wait or unknown code as the test says), and the
reader's final state must agree with it: APPROVED iff exactly one net debit, otherwise none."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from firmware_bridge import messages as M
from guard.core.model import TxnState
from guard.simulation.hostserver import HostServer
from guard.simulation.hostsim import HostCore
from guard.hostlink.iso import HostCodec
from tests.support.e2e import AMOUNT, counter, settled
from tests.support.e2e import PAN


@contextlib.contextmanager
def hostsim() -> Iterator[tuple[HostCore, Any]]:
    core = HostCore(seed=5, dup_detection=True)
    server = HostServer(core, HostCodec())
    port = server.start()
    try:
        yield core, SimpleNamespace(port=port)
    finally:
        server.stop()


def final_state(res: M.ResultMessage | M.ErrorMessage) -> TxnState:
    assert isinstance(res, M.ResultMessage), res
    return res.state


@pytest.mark.parametrize("rc,booked", [("08", None), ("11", None), ("16", None), ("Q7", True), ("Q7", False),
                                       ("09", True), ("09", False), ("96", True), ("96", False)])
def test_reader_and_host_ledger_agree_on_every_answer(tmp_path: Path, rc: str, booked: bool | None) -> None:
    with hostsim() as (core, server):
        core.force_answer(rc, booked=booked)
        with counter(tmp_path, server, timeout=2.0, reversal_timeout=1.0) as r:
            res = settled(r, r.auth(bytes(range(16)), AMOUNT, "978", PAN, "2912", timeout=20))
            deadline = time.monotonic() + 20
            while final_state(res) is TxnState.REVERSAL_PENDING and time.monotonic() < deadline:
                time.sleep(0.2)
                res = settled(r, r.status(bytes(range(16)), 5.0))
        state = final_state(res)
        assert state in (TxnState.APPROVED, TxnState.REVERSED, TxnState.DECLINED), state
        assert (state is TxnState.APPROVED) == (core.total_net_debits() == 1), (rc, booked, state)
        assert core.total_net_debits() in (0, 1)


@pytest.mark.parametrize("choice,final,debits", [("accept", TxnState.APPROVED, 1), ("cancel", TxnState.REVERSED, 0)])
def test_a_partial_approval_accepted_or_cancelled_over_the_reader_link(tmp_path: Path, choice: str,
                                                                        final: TxnState, debits: int) -> None:
    with hostsim() as (core, server):
        core.force_answer("10", approved_amount=800)
        with counter(tmp_path, server, timeout=2.0, reversal_timeout=1.0) as r:
            res = settled(r, r.auth(bytes(range(16)), AMOUNT, "978", PAN, "2912", timeout=20, partial=choice))  # type: ignore[arg-type]
        assert final_state(res) is final, res
        assert core.total_net_debits() == debits
        if choice == "accept":
            assert isinstance(res, M.ResultMessage) and res.approved_amount == 800
            assert [d.amount for d in core.debits() if not d.reversed] == [800]
