"""``posguard hostsim``: the host simulator's command line (arguments, serve until signalled,
write the ledger and settlement files at exit)."""
from __future__ import annotations

import argparse
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
        core = HostCore(
            seed=args.seed, dup_detection=args.dup_detection, faults=dict(args.fault),
            terminal_id=args.terminal_id, merchant_id=args.merchant_id, late_delay=args.late_delay,
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

