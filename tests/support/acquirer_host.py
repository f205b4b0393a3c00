"""An independent test acquirer: a small ISO 8583 host on 127.0.0.1 with its own ledger.

Written from the ISO 8583:1987 field 39 table and the acquirers' documented use of it (Nexi
GICC, PayEx IFSF), not from posguard's engine: it imports no response classes from
``guard.core.constants``, so a test that checks the terminal against it checks the engine's
reading of field 39 against an outside one. posguard's codec is used for framing and encoding
only (default spec, binary2 header).

What it does:

* 0200: answered from a per-test ``script`` (a list of ``Answer``, or a function of the request).
  An approval (00, 08, 11, 16; 10 for the partial amount) debits; a decline books nothing; for
  any other code the ``Answer`` says whether the host booked the sale. A 0200 whose (41, 42, 11,
  MMDD of 7) it has already seen answers 94 ("duplicate transmission") and books nothing.
* 0400 / 0401: field 90 names the original; a booked sale's debit is removed (0410 00), one already
  reversed answers 94, an unknown one 25 ("unable to locate original"). ``reversals`` can make
  it refuse (any other code) or ignore (no answer) a reversal.
* 0800: 0810 00.

The ledger is keyed by (41, 42, 11, MMDD); ``log`` holds every request and answer in order.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from guard.hostlink.iso import HostCodec, HostMessage

# ISO 8583:1987 field 39, as the acquirers above use it.
APPROVALS = frozenset({"00", "08", "11", "16"})  # approved; honour with id; VIP; update track 3
PARTIAL = "10"  # approved for a partial amount, the amount in field 4
DECLINES = frozenset({"01", "02", "03", "04", "05", "07", "12", "13", "14", "15", "30", "41", "43", "51", "54",
                      "55", "57", "58", "61", "62", "65", "75"})
DUPLICATE = "94"  # duplicate transmission
NOT_FOUND = "25"  # unable to locate the original
OK = "00"

Key = tuple[str, str, str, str]
"""(terminal 41, merchant 42, STAN 11, MMDD of field 7): one transaction of one terminal and day."""


@dataclass(frozen=True)
class Answer:
    """How the host answers one 0200: ``rc`` in field 39 of an ``mti`` message (0210 unless a test
    wants a mispaired one), ``approved`` the partial amount for rc 10, ``booked`` whether the host
    debited (fixed by the code for approvals and declines; required for any other code), and
    ``respond=False`` for no answer at all, ``delay`` seconds before the answer leaves (a late
    answer)."""

    rc: str
    mti: str = "0210"
    approved: int | None = None
    booked: bool | None = None
    respond: bool = True
    delay: float = 0.0

    def debits(self) -> bool:
        """Whether this answer books the sale: approvals do, declines do not, others as told."""
        if self.booked is not None:
            return self.booked
        if self.rc in APPROVALS or self.rc == PARTIAL:
            return True
        if self.rc in DECLINES:
            return False
        raise ValueError(f"rc {self.rc!r} is ambiguous: the test must say whether the host booked the sale")


@dataclass
class Debit:
    """One booked sale: the amount debited and the amount a reversal took back."""

    key: Key
    amount: int
    reversed_amount: int = 0
    reversals: int = 0

    @property
    def net(self) -> int:
        return self.amount - self.reversed_amount


@dataclass(frozen=True)
class Exchange:
    """One request and the host's answer (None when it did not answer)."""

    request: dict[str, str]
    response: dict[str, str] | None


Script = Sequence[Answer] | Callable[[Mapping[str, str]], Answer]
ReversalRule = Callable[[Mapping[str, str]], str | None]
"""For a 0400/0401: None to process it, "" to ignore it (no answer), or a refusal code."""


def _key(fields: Mapping[str, str], stan: str | None = None, f7: str | None = None) -> Key:
    return (fields.get("41", ""), fields.get("42", ""), stan or fields.get("11", ""), (f7 or fields.get("7", ""))[:4])


@dataclass
class AcquirerHost:
    """The acquirer on a loopback port: ``start()`` returns the port, ``stop()`` closes it."""

    script: Script = ()
    reversals: ReversalRule | None = None
    codec: HostCodec = field(default_factory=HostCodec)
    ledger: dict[Key, Debit] = field(default_factory=dict)
    seen: set[Key] = field(default_factory=set)
    log: list[Exchange] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sales = 0
        self._delay = 0.0
        self._send_lock = threading.Lock()  # a late answer and a prompt one never interleave
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._lst: socket.socket | None = None
        self.port = 0

    # ------------------------------------------------------------------ views for assertions

    def net_debits(self) -> int:
        """How many sales stay debited (booked and not wholly reversed)."""
        with self._lock:
            return sum(1 for d in self.ledger.values() if d.net > 0)

    def net_amount(self) -> int:
        with self._lock:
            return sum(d.net for d in self.ledger.values())

    def requests(self, *mtis: str) -> list[dict[str, str]]:
        with self._lock:
            return [e.request for e in self.log if e.request.get("t") in mtis]

    def stans(self, *mtis: str) -> list[str]:
        return [r["11"] for r in self.requests(*mtis)]

    # ------------------------------------------------------------------ answering

    def _next_answer(self, fields: Mapping[str, str]) -> Answer:
        if callable(self.script):
            return self.script(fields)
        n, self._sales = self._sales, self._sales + 1
        return self.script[n] if n < len(self.script) else Answer(OK)

    def handle(self, fields: Mapping[str, str]) -> dict[str, str] | None:
        """The answer to one request (None: no answer); books and logs under the lock."""
        return self._handle(fields)[0]

    def _handle(self, fields: Mapping[str, str]) -> tuple[dict[str, str] | None, float]:
        """The answer and how long to hold it back."""
        with self._lock:
            self._delay = 0.0
            mti = fields.get("t", "")
            if mti == "0200":
                resp = self._sale(fields)
            elif mti in ("0400", "0401"):
                resp = self._reversal(fields)
            elif mti == "0800":
                resp = self._reply(fields, "0810", OK)
            else:
                resp = self._reply(fields, mti[:2] + "10", "12")  # invalid transaction
            self.seen.add(_key(fields))
            self.log.append(Exchange(dict(fields), resp))
            return resp, self._delay

    def _sale(self, fields: Mapping[str, str]) -> dict[str, str] | None:
        key = _key(fields)
        if key in self.seen:
            return self._reply(fields, "0210", DUPLICATE)
        ans = self._next_answer(fields)
        asked = int(fields.get("4", "0"))
        amount = ans.approved if ans.rc == PARTIAL and ans.approved is not None else asked
        if ans.debits():
            self.ledger[key] = Debit(key, amount)
        if not ans.respond:
            return None
        self._delay = ans.delay
        resp = self._reply(fields, ans.mti, ans.rc)
        if ans.rc == PARTIAL:
            resp["4"] = f"{amount:012d}"
        if ans.rc in APPROVALS or ans.rc == PARTIAL:
            resp["38"] = f"A{len(self.ledger):05d}"
        return resp

    def _reversal(self, fields: Mapping[str, str]) -> dict[str, str] | None:
        rule = self.reversals(fields) if self.reversals is not None else None
        if rule == "":
            return None
        if rule is not None:
            return self._reply(fields, "0410", rule)
        f90 = fields.get("90", "")
        debit = self.ledger.get(_key(fields, stan=f90[4:10], f7=f90[10:20])) if len(f90) == 42 else None
        if debit is None:
            return self._reply(fields, "0410", NOT_FOUND)
        if debit.reversals:
            return self._reply(fields, "0410", DUPLICATE)
        debit.reversals += 1
        debit.reversed_amount = min(debit.amount, int(fields.get("4", "0")))
        return self._reply(fields, "0410", OK)

    def _reply(self, fields: Mapping[str, str], mti: str, rc: str) -> dict[str, str]:
        resp = {k: fields[k] for k in ("3", "4", "7", "11", "41", "42", "49", "70", "90") if k in fields}
        resp["t"] = mti
        resp["37"] = f"{len(self.log) + 1:012d}"
        resp["39"] = rc
        return resp

    # ------------------------------------------------------------------ the socket

    def start(self) -> int:
        lst = socket.create_server(("127.0.0.1", 0))
        lst.settimeout(0.05)
        self._lst = lst
        self.port = int(lst.getsockname()[1])
        self._spawn(self._accept)
        return self.port

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2)
        for c in self._conns:
            c.close()
        if self._lst is not None:
            self._lst.close()

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        assert self._lst is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._lst.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(0.05)
            self._conns.append(conn)
            self._spawn(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        decoder = self.codec.decoder("host")
        while not self._stop.is_set():
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            for item in decoder.feed(data):
                if not isinstance(item, HostMessage):
                    return  # garbage: hang up, as a host does
                resp, delay = self._handle(item.fields)
                if resp is None:
                    continue
                if delay > 0:
                    self._spawn(self._late, conn, self.codec.encode(resp), delay)
                    continue
                try:
                    with self._send_lock:
                        conn.sendall(self.codec.encode(resp))
                except OSError:
                    return

    def _late(self, conn: socket.socket, frame: bytes, delay: float) -> None:
        if self._stop.wait(delay):
            return
        with contextlib.suppress(OSError), self._send_lock:
            conn.sendall(frame)
