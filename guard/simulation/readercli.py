"""``posguard readersim``: the reference reader's command line (sales, faults, reboots)."""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from collections.abc import Callable, Sequence

import serial

from firmware_bridge.constants import DEFAULT_BAUDRATE, ERR_TXN_UNKNOWN, T2_S
from firmware_bridge.messages import Auth, ErrorMessage, MessageError, ResultMessage
from firmware_bridge.serial_port import open_port
from guard.core.emv import EntryMode
from guard.core.model import TxnState, luhn_complete, mask_pan
from guard.simulation import cards
from guard.simulation.linkfaults import LinkFaults
from guard.simulation.readersim import PARTIAL_CHOICES, TEST_PAN, ReaderSim, ReaderTimeout


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="posguard readersim",
        description="Reference card reader: SYNC, then N sales against a guard, with optional link faults. "
        "By default every sale uses another card (Luhn-valid numbers in the public Visa test range "
        "47617390...) and another amount (12.50 + 0.10 steps), both starting where the boot counter points so "
        "that the next run differs too, so the guard's default double-swipe rule "
        "(same card and amount within policy.double_swipe_window) and per-card counters do not hold them; "
        "give --pan and --amount to repeat one card and amount. The per-terminal counter "
        "(policy.terminal_max_count, default 30 a minute) still applies.",
        epilog="Exit status: 0 every sale got a final RESULT; 1 a sale did not (no answer, HELD, an unanswered "
        "PARTIAL), no SYNC_ACK, or the port failed; 2 bad arguments or the port cannot be opened.",
    )
    p.add_argument("--port", required=True, help="pyserial URL: /dev/ttyUSB0, a pty slave path, socket://127.0.0.1:PORT")
    p.add_argument("--reader-id", default="READER01", help="READER_ID sent with every request (must match the guard)")
    p.add_argument("--sales", type=int, default=1, help="number of sales (default 1)")
    p.add_argument("--amount", type=int, default=None,
                   help="amount in minor units for every sale (default: another per sale, 12.50 + 0.10 steps)")
    p.add_argument("--currency", default="978", help="ISO 4217 numeric currency (default 978, EUR)")
    p.add_argument("--pan", default=None, help=f"card number for every sale, e.g. the public EMV test PAN "
                   f"{mask_pan(TEST_PAN)} (default: another test card per sale); never printed")
    p.add_argument("--expiry", default=None, help="card expiry YYMM (default: omitted)")
    p.add_argument("--seed", type=int, default=0, help="seed for nonces and faults (default 0)")
    p.add_argument("--boot-counter", type=int, default=None,
                   help="first 8 bytes of every TXN_ID, +1 per reboot (default: Unix time in microseconds, so that "
                   "runs never reuse an id; set it only to a value above every earlier run's last)")
    p.add_argument("--drop-ack", type=float, default=0.0, metavar="P", help="drop incoming ACK frames")
    p.add_argument("--dup", type=float, default=0.0, metavar="P", help="write frames twice")
    p.add_argument("--truncate", type=float, default=0.0, metavar="P", help="write only a prefix of frames")
    p.add_argument("--bitflip", type=float, default=0.0, metavar="P", help="flip one bit in written frames")
    p.add_argument("--garbage", type=float, default=0.0, metavar="P", help="write random bytes before frames")
    p.add_argument("--split", action="store_true", help="write frames in 1-4 byte pieces")
    p.add_argument("--concat", action="store_true", help="join frames into one write when possible")
    p.add_argument("--reboot-after-send", action="store_true", help="reboot right after writing each AUTH")
    p.add_argument("--after-reboot", choices=("status", "last", "resend"), default="status",
                   help="after the reboot: STATUS(TXN_ID), STATUS(LAST), or re-send the AUTH with the same TXN_ID")
    p.add_argument("--confirm-holds", action="store_true",
                   help="when the guard HOLDs a sale (e.g. double swipe), CONFIRM it as an operator would")
    p.add_argument("--partial", choices=PARTIAL_CHOICES, default="ignore",
                   help="when the host approves only part of the amount (PARTIAL): accept it with CONFIRM, cancel "
                   "it with CANCEL (the partial is reversed), or ignore it (the guard reverses it when "
                   "reader.partial_expiry runs out); default ignore")
    p.add_argument("--card", choices=[m.value.lower() for m in EntryMode], default=None,
                   help="how the card is read (PROTOCOL.md section 12): chip and contactless send ICC data and "
                   "COMPLETE; default: the PAN alone, as a keyed sale without ENTRY_MODE")
    p.add_argument("--card-does", choices=cards.BEHAVIOURS, default=cards.ACCEPT,
                   help="chip/contactless after the host approved: accept, decline (2nd GENERATE AC), pulled, fail, "
                   "reboot (the reader reboots, no COMPLETE: the guard reverses after reader.completion_timeout), "
                   "reboot_resend (reboots, then re-sends the saved decision); default accept")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds allowed per sale (default 60)")
    p.add_argument("--baud", type=int, default=DEFAULT_BAUDRATE, help="line speed (default 115200)")
    p.add_argument("-v", "--verbose", action="store_true", help="log link events and messages (PAN masked) to stderr")
    p.add_argument("--t2", type=float, default=T2_S,
                   help="link retransmission timer, seconds (default 1.0; scale up below 19200 baud, PROTOCOL 4.6)")
    return p


def test_card(n: int) -> str:
    """Card number ``n``: Luhn-valid, 47617390 + 7 digits + check digit (the public Visa test
    range, as the EMV test PAN), so consecutive sales never look like a double swipe."""
    return luhn_complete(f"47617390{n % 10**7:07d}")


def sale_index(args: argparse.Namespace, boot: int, i: int) -> int:
    """Sale ``i`` of this run, offset by the run's first boot counter (10,007 cards apart per boot)
    so that the next run uses other cards (it would otherwise repeat the first sale's card and amount)."""
    return boot * 10_007 % 10**7 + i


def sale_pan(args: argparse.Namespace, n: int) -> str:
    return str(args.pan) if args.pan is not None else test_card(n)


def sale_amount(args: argparse.Namespace, n: int) -> int:
    """12.50, 12.60, ... 1012.40, then again: never ending in 05 or 51 (hostsim declines those)."""
    return int(args.amount) if args.amount is not None else 1250 + 10 * (n % 10_000)


def _faults_from(args: argparse.Namespace) -> LinkFaults | None:
    faults = LinkFaults(
        seed=args.seed,
        drop_ack_rate=args.drop_ack,
        duplicate_rate=args.dup,
        truncate_rate=args.truncate,
        bitflip_rate=args.bitflip,
        garbage_rate=args.garbage,
        split_writes=args.split,
        concatenate=args.concat,
    )
    return faults if faults.drop_ack_rate or faults.damages_writes else None


def _one_sale(sim: ReaderSim, args: argparse.Namespace, txn_id: bytes, i: int) -> ResultMessage | ErrorMessage:
    deadline: float = sim.clock() + args.timeout

    def left() -> float:
        return max(0.0, deadline - sim.clock())

    r = _sale_through_reboot(sim, args, txn_id, left, i)
    if args.confirm_holds and isinstance(r, ResultMessage) and r.state is TxnState.HELD and not r.in_progress:
        r = sim.confirm(txn_id, left())
    return sim.decide_partial(r, args.partial, left())


def _sale_through_reboot(
    sim: ReaderSim, args: argparse.Namespace, txn_id: bytes, left: Callable[[], float], i: int
) -> ResultMessage | ErrorMessage:
    n = sale_index(args, args.first_boot, i)
    auth = Auth(txn_id, sale_amount(args, n), args.currency, sale_pan(args, n), args.expiry, sim.reader_id)
    if args.card is not None and not args.reboot_after_send:
        model = cards.CardModel(EntryMode(args.card.upper()), args.card_does, online_pin=args.card == "chip")
        first, final = cards.present(sim, model, txn_id, auth.amount, args.currency, auth.pan, args.expiry or "2912",
                                     random.Random(args.seed), left())
        return final if final is not None else first
    if not args.reboot_after_send:
        return sim.transact(auth, left())
    sim.send(auth, left())
    sim.reboot()
    sim.sync(left())
    if args.after_reboot == "resend":
        return sim.transact(auth, left())
    r = sim.status(txn_id if args.after_reboot == "status" else None, left())
    if (isinstance(r, ErrorMessage) and r.error_code == ERR_TXN_UNKNOWN) or (
        isinstance(r, ResultMessage) and r.txn_id != txn_id
    ):
        # The AUTH never reached the guard (lost in the power cut): re-sending the same id is safe.
        sim.stats.resends += 1
        return sim.transact(auth, left())
    if isinstance(r, ResultMessage) and r.in_progress:
        return sim.await_final(txn_id, left())
    return r


def _describe(outcome: ResultMessage | ErrorMessage | None) -> str:
    if outcome is None:
        return "NO FINAL RESULT (timeout)"
    if isinstance(outcome, ErrorMessage):
        return f"ERROR {outcome.error_code} {outcome.display_text or ''!r}"
    approved = f" approved_amount={outcome.approved_amount}" if outcome.approved_amount is not None else ""
    return f"{outcome.state.value} rc={outcome.response_code or '--'}{approved} {outcome.display_text!r}"


def main(argv: Sequence[str] | None = None) -> int:
    """``posguard readersim``: exit 0 if every sale got a final RESULT (IN_PROGRESS 00, not HELD
    or an unanswered PARTIAL),
    1 if not, 2 on bad use."""
    p = _parser()
    args = p.parse_args(argv)
    if args.sales < 0 or args.timeout <= 0 or args.t2 <= 0:
        p.error("--sales must be >= 0, --timeout and --t2 > 0")
    if args.boot_counter is not None and not 0 <= args.boot_counter < 2**64:
        p.error("--boot-counter must be 0 .. 2^64-1 (the first 8 bytes of every TXN_ID)")
    try:
        faults = _faults_from(args)
        Auth(bytes(16), sale_amount(args, 0), args.currency, sale_pan(args, 0), args.expiry, args.reader_id)
    except (ValueError, MessageError) as e:
        p.error(str(e))  # MessageError texts never contain the value itself
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(relativeCreated)8.1f ms %(name)s %(message)s")
    # Stands in for a persisted boot counter: microseconds advance faster than any run reboots.
    boot = args.boot_counter if args.boot_counter is not None else time.time_ns() // 1000
    args.first_boot = boot
    try:
        port = open_port(args.port, baudrate=args.baud)
    except (serial.SerialException, OSError, ValueError) as e:
        print(f"readersim: cannot open {args.port}: {e}", file=sys.stderr)
        return 2
    try:
        with ReaderSim(port, reader_id=args.reader_id, rng=random.Random(args.seed), faults=faults, t2=args.t2,
                       boot_counter=boot) as sim:
            return _run_sales(sim, args, faults)
    except (serial.SerialException, OSError) as e:  # EIO: the cable or the guard's end went away
        print(f"readersim: port {args.port} failed: {e}", file=sys.stderr)
        return 1


def _run_sales(sim: ReaderSim, args: argparse.Namespace, faults: LinkFaults | None) -> int:
    """SYNC, then one line per sale and a summary line; the exit code of ``main``."""
    try:
        epoch = sim.sync(args.timeout)
    except ReaderTimeout:
        print(f"readersim: no SYNC_ACK from the guard on {args.port} within {args.timeout} s", file=sys.stderr)
        return 1
    cards = f"card {mask_pan(args.pan)}" if args.pan is not None else "a different test card per sale"
    amounts = f"amount {args.amount}" if args.amount is not None else "another amount per sale"
    print(f"reader {sim.reader_id} boot {sim.boot_counter} {cards}, {amounts}; link up, epoch 0x{epoch:08x}")
    finals = 0
    for i in range(args.sales):
        txn_id = sim.new_txn_id()
        retx, resends, confirms, t0 = sim.retransmissions, sim.stats.resends, sim.stats.confirms, time.monotonic()
        accepted = sim.stats.partials_accepted
        partials = accepted + sim.stats.partials_cancelled
        applied = faults.counts.as_dict() if faults else {}
        outcome: ResultMessage | ErrorMessage | None
        try:
            outcome = _one_sale(sim, args, txn_id, i)
        except ReaderTimeout:
            outcome = None
        if (isinstance(outcome, ResultMessage) and not outcome.in_progress
                and outcome.state not in (TxnState.HELD, TxnState.PARTIAL, TxnState.AWAITING_COMPLETION)):
            finals += 1
        now_applied = faults.counts.as_dict() if faults else {}
        hit = ",".join(f"{k}={now_applied[k] - v}" for k, v in applied.items() if now_applied[k] > v) or "none"
        held = " (held, confirmed)" if sim.stats.confirms > confirms else ""
        if sim.stats.partials_accepted + sim.stats.partials_cancelled > partials:
            held = " (partial, accepted)" if sim.stats.partials_accepted > accepted else " (partial, cancelled)"
        print(
            f"sale {i + 1}/{args.sales} txn {txn_id.hex()} {_describe(outcome)}{held} "
            f"{time.monotonic() - t0:.2f}s retx={sim.retransmissions - retx} "
            f"resends={sim.stats.resends - resends} faults={hit}"
        )
    s = sim.stats
    print(
        f"done: {finals}/{args.sales} final, retransmissions={sim.retransmissions} resends={s.resends} "
        f"link_downs={s.link_downs} status_polls={s.status_polls} epochs={len(sim.epochs)}"
    )
    return 0 if finals == args.sales else 1

if __name__ == "__main__":
    sys.exit(main())

