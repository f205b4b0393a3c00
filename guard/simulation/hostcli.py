"""``posguard hostsim``: the host simulator's command line (arguments, serve until signalled,
write the ledger and settlement files at exit)."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from guard.core.constants import HOST_HEADERS
from guard.core.errors import ConfigError, KeyFileError
from guard.hostlink.iso import HostCodec, load_spec
from guard.simulation.acquirer import (
    PARTIAL_FIELDS, REVERSAL_0411, REVERSAL_DONE_CODES, REVERSAL_REFUSE, REVERSAL_SILENCE, AcquirerProfile,
)
from guard.simulation.hostserver import HostServer, make_server_context
from guard.simulation.hostsim import HostCore
from guard.simulation.hosttypes import DEFAULT_LATE_DELAY_S, FAULT_KINDS


def _fault_arg(s: str) -> tuple[str, float]:
    kind, sep, rate = s.partition("=")
    if not sep or kind not in FAULT_KINDS:
        raise argparse.ArgumentTypeError(f"expected KIND=RATE with KIND in {', '.join(FAULT_KINDS)}")
    try:
        r = float(rate)
    except ValueError:
        raise argparse.ArgumentTypeError("RATE must be a number between 0 and 1") from None
    if not 0.0 <= r <= 1.0:
        raise argparse.ArgumentTypeError("RATE must be between 0 and 1")
    return kind, r


def _rate_arg(s: str) -> float:
    try:
        r = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError("RATE must be a number between 0 and 1") from None
    if math.isnan(r) or not 0.0 <= r <= 1.0:
        raise argparse.ArgumentTypeError("RATE must be between 0 and 1")
    return r


def _answer_arg(s: str) -> tuple[str, float]:
    code, sep, rate = s.partition("=")
    is_code = len(code) == 2 and code.isascii() and code.isalnum()
    is_mti = len(code) == 4 and code.isascii() and code.isdigit() and code != "0210"
    if not sep or not (is_code or is_mti):
        raise argparse.ArgumentTypeError(
            "expected CODE=RATE with CODE a 2-character field-39 code (e.g. 08, 10, 96, Q7) "
            "or a wrong response MTI for a 0200 (e.g. 0230, 0810)")
    return code, _rate_arg(rate)


def _reversal_answer_arg(s: str) -> tuple[str, float]:
    kind, sep, rate = s.partition("=")
    head, _, code = kind.partition(":")
    ok = kind in (REVERSAL_SILENCE, REVERSAL_0411) or (
        head == REVERSAL_REFUSE and len(code) == 2 and code.isascii() and code.isalnum() and code not in REVERSAL_DONE_CODES)
    if not sep or not ok:
        raise argparse.ArgumentTypeError("expected KIND=RATE with KIND silence, 0411 or refuse:CODE (CODE not 00, 25, 94)")
    return kind, _rate_arg(rate)


def _seconds_arg(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a number of seconds") from None
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError("must be a finite number of seconds >= 0")
    return v


def _window_arg(s: str) -> tuple[float, float]:
    a, sep, b = s.partition(":")
    try:
        start, end = _seconds_arg(a), _seconds_arg(b)
    except argparse.ArgumentTypeError:
        start = end = -1.0
    if not sep or start < 0 or end < start:
        raise argparse.ArgumentTypeError("expected START:END seconds after the first request, START <= END")
    return start, end


def build_profile(args: argparse.Namespace) -> AcquirerProfile:
    """The acquirer profile from ``--profile`` and the answer options (``ConfigError`` if inconsistent)."""
    base = AcquirerProfile.real_world() if args.profile == "real-world" else AcquirerProfile()
    p = base.with_answers(dict(args.answer))
    refusals = dict(p.reversal_refusals)
    changes: dict[str, Any] = {}
    for kind, rate in args.reversal_answer:
        if kind == REVERSAL_SILENCE:
            changes["reversal_silence"] = rate
        elif kind == REVERSAL_0411:
            changes["reversal_0411"] = rate
        else:
            refusals[kind.partition(":")[2]] = rate
    changes["reversal_refusals"] = refusals
    if args.silence_window:
        changes["silence_windows"] = tuple(args.silence_window)
    for name in ("booked_share", "partial_field", "reversal_silence_s"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    custom = args.answer or args.reversal_answer or any(k != "reversal_refusals" for k in changes)
    if custom:
        changes["name"] = f"{base.name}+custom"
    return dataclasses.replace(p, **changes)


def _port_arg(s: str) -> int:
    try:
        port = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError("PORT must be a number 0-65535 (0: any free port)") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError("PORT must be 0-65535 (0: any free port)")
    return port


def _out_path_problem(path: str | None) -> str | None:
    """Why the ledger or settlement file could not be written at exit, checked before serving."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        return f"{path} is a directory"
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        return f"directory {parent} does not exist"
    if not os.access(parent, os.W_OK):
        return f"directory {parent} is not writable"
    return None


def _tpdu_arg(s: str) -> bytes:
    try:
        b = bytes.fromhex(s)
    except ValueError:
        raise argparse.ArgumentTypeError("TPDU must be 10 hex digits, e.g. 6000010000") from None
    if len(b) != 5 or b[0] != 0x60:
        raise argparse.ArgumentTypeError("TPDU must be 5 bytes starting with 60")
    return b


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="posguard hostsim", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Stateful ISO 8583 acquirer simulator: answers 0200/0220/0400/0401/0800, keeps a ledger of "
                    "net debits per (41, 42, 11, date of field 7), and injects seeded faults.",
        epilog="fault kinds (--fault KIND=RATE, rate 0..1, repeatable; at most one fault per request):\n"
               "  drop_request         not processed, no reply\n"
               "  debit_drop_response  processed (a sale debits), reply dropped\n"
               "  delay_response       processed, reply sent --late-delay seconds later\n"
               "  close_mid_frame      processed, half the reply sent, then the connection closes\n"
               "  duplicate_response   processed, the reply sent twice\n"
               "  wrong_echo           processed, the reply's 41, 42 or 4 altered\n"
               "  garbage              processed or not, an undecodable frame instead of the reply\n"
               "amounts ending in 51 are declined 51, in 05 declined 05; everything else is approved.\n"
               "acquirer answers (how real hosts answer; the ledger debits whatever the acquirer booked):\n"
               "  --profile real-world  every kind below on at documented rates (08 11 16 10 09 91 96 Q7 X1,\n"
               "                        0230/0810, silences of 300 s, refusals 12/96, 0411 to half the 0401s)\n"
               "  --answer CODE=RATE    share of new 0200s answered with field 39 CODE: 00 08 11 16 debit the\n"
               "                        amount; 10 debits a partial amount (1..amount-1, in --partial-field 4\n"
               "                        or 54); declines (01..75) and 94 debit nothing; system codes (06 09 19\n"
               "                        68 90 91 92 96) and codes no table lists (Q7, X1) debited in a\n"
               "                        --booked-share of cases. CODE a 4-digit MTI (0230, 0810): the host\n"
               "                        booked the sale and answered with that MTI. Shares add up to <= 1.\n"
               "  --reversal-answer KIND=RATE  reversals: silence (dropped, and every reversal for\n"
               "                        --reversal-silence-s after it), refuse:CODE (0410 + CODE, nothing\n"
               "                        reversed), 0411 (a 0401 answered 0411)\n"
               "  --silence-window START:END   drop every reversal START..END seconds after the first request\n"
               "exit status: 0 stopped cleanly (SIGINT/SIGTERM or --duration); 2 bad arguments, TLS files, or "
               "the port cannot be listened on; 3 the ledger or settlement file could not be written at exit.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=_port_arg, default=8583, help="TCP port; 0 picks a free one and prints it (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1, help="seed for faults, approval codes and RRNs (default: %(default)s)")
    p.add_argument("--dup-detection", action=argparse.BooleanOptionalAction, default=True,
                   help="answer a repeated 0200 with 94 instead of debiting it again (default: on)")
    p.add_argument("--fault", action="append", type=_fault_arg, default=[], metavar="KIND=RATE",
                   help="inject a fault kind at this rate (see below)")
    p.add_argument("--late-delay", type=float, default=DEFAULT_LATE_DELAY_S, help="seconds for delay_response")
    p.add_argument("--profile", choices=("default", "real-world"), default="default",
                   help="acquirer answer profile (default: %(default)s, a plain host that answers 00/05/51)")
    p.add_argument("--answer", action="append", type=_answer_arg, default=[], metavar="CODE=RATE",
                   help="answer this share of new 0200s with CODE (see below; repeatable, adds to --profile)")
    p.add_argument("--reversal-answer", action="append", type=_reversal_answer_arg, default=[], metavar="KIND=RATE",
                   help="silence, refuse:CODE or 0411 for this share of reversals (repeatable)")
    p.add_argument("--booked-share", type=_rate_arg, metavar="RATE",
                   help="share of system/unknown-code answers the host booked (default 0.5)")
    p.add_argument("--partial-field", choices=PARTIAL_FIELDS, help="where a 10 carries the approved amount (default 4)")
    p.add_argument("--reversal-silence-s", type=_seconds_arg, metavar="SECONDS",
                   help="how long a reversal silence lasts (default 300)")
    p.add_argument("--silence-window", action="append", type=_window_arg, default=[], metavar="START:END",
                   help="drop every reversal in this window, seconds after the first request (repeatable)")
    p.add_argument("--ledger", metavar="PATH", help="ledger JSON, written on SIGINT/SIGTERM and at exit")
    p.add_argument("--settlement", metavar="PATH", help="settlement CSV, written at exit")
    p.add_argument("--header", choices=HOST_HEADERS, default=HOST_HEADERS[0])
    p.add_argument("--tpdu", type=_tpdu_arg, metavar="HEX")
    p.add_argument("--spec", default="default", metavar="NAME|FILE",
                   help="ISO 8583 spec: default, default_ascii or a pyiso8583 spec JSON file (as host.spec)")
    p.add_argument("--terminal-id", help="accept only this field 41 (others get 58)")
    p.add_argument("--merchant-id", help="accept only this field 42 (others get 03)")
    p.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate (with --tls-key)")
    p.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    p.add_argument("--tls-client-ca", metavar="PEM", help="require client certificates signed by this CA")
    p.add_argument("--duration", type=float, default=0.0, help="stop after N seconds (0: until signalled)")
    return p


def main(argv: list[str] | None = None) -> int:
    """``posguard hostsim``: serve until SIGINT/SIGTERM (or --duration), then dump the ledger."""
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    for opt, path in (("--ledger", args.ledger), ("--settlement", args.settlement)):
        if (why := _out_path_problem(path)) is not None:
            parser.error(f"{opt}: {why}")
    try:
        profile = build_profile(args)
    except ConfigError as e:
        parser.error(f"acquirer answers: {e.reason}")
    try:
        core = HostCore(
            seed=args.seed, dup_detection=args.dup_detection, faults=dict(args.fault),
            terminal_id=args.terminal_id, merchant_id=args.merchant_id, late_delay=args.late_delay,
            profile=profile,
        )
        codec = HostCodec(load_spec(args.spec), header=args.header, tpdu=args.tpdu)
        ctx = make_server_context(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    except (ConfigError, KeyFileError) as e:
        print(f"hostsim: {e}", file=sys.stderr)
        return 2
    server = HostServer(core, codec, args.host, args.port, ssl_context=ctx)
    try:
        port = server.start()
    except OSError as e:
        print(f"hostsim: cannot listen on {args.host}:{args.port}: {e.strerror}", file=sys.stderr)
        return 2
    print(f"hostsim listening on {args.host}:{port}", flush=True)
    if not profile.is_plain:
        print(f"hostsim acquirer profile {profile.name}", flush=True)

    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        stop.set()

    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _on_signal)
    deadline = time.monotonic() + args.duration if args.duration > 0 else None
    try:
        while not stop.wait(0.2):
            if deadline is not None and time.monotonic() >= deadline:
                break
    finally:
        server.stop()
        for sig_, handler in previous.items():
            signal.signal(sig_, handler)
        rc = 0
        for path, write in ((args.ledger, core.dump_ledger), (args.settlement, core.write_settlement_csv)):
            if path:
                try:
                    write(path)
                except OSError as e:
                    print(f"hostsim: cannot write {path}: {e.strerror or e}", file=sys.stderr)
                    rc = 3
        totals = core.ledger()["totals"]
        print(
            f"hostsim stopped: {core.stats().get('requests', 0)} requests, "
            f"{totals['debits']} debits, {totals['reversed']} reversed, {totals['net_debits']} net",
            flush=True,
        )
    return rc

