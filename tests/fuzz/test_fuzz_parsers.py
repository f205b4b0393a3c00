"""Fuzzing every parser that takes outside input (hypothesis, derandomized for CI).

- Host responses: ``FrameDecoder.feed`` on mutated valid frames and on well-framed random payloads
  (plain random streams are in tests/test_iso.py): never raises; only documented garbage codes; no
  card number in any diagnostic; chunking never changes the result; a bad frame costs one frame.
- ``Engine.host_message`` with arbitrary and with decodable field dicts, against an engine holding
  sales in every state: never raises; write-ahead order; only Appends when nothing is in flight;
  final outcomes never change; every record is one the journal accepts (no fail-stop by a host).
- ``posguard.config.parse`` (random documents) and ``load`` (random TOML-ish files, random bytes):
  only ConfigError, with a key and a reason.
- ``verify_journal`` / ``Journal.open`` on a real journal whose rows were mutated with the triggers
  dropped (columns, bits, deletions, swaps, copies, ratchet, type confusion): never raise; a change
  is always reported with a documented reason code; ok only for a no-op.

Bugs found here are pinned by plain regression tests (five so far, all fixed: non-ASCII STAN,
NUL in config paths, empty TOML section, deep TOML nesting, non-UTF-8 schema text). 2,700 examples, ~25 s on 2 vCPUs; scale with
POSGUARD_FUZZ_SCALE. Run: ``python -m pytest tests/test_fuzz_parsers.py -q``.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
import os
import random
import re
import shutil
import sqlite3
import string
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import iso8583
import iso8583.specs
import pytest
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

import guard.hostlink.iso as iso_mod
import guard.journal.verify as verify_mod
from guard.core import constants as C
from guard.core.engine import Append, Engine, EngineConfig, Reply, SendHost
from guard.core.errors import ConfigError, HostProtocolError, JournalError
from guard.hostlink.iso import (
    HOST_BAD_LENGTH,
    HOST_FRAME_TRUNCATED,
    HostCodec,
    HostGarbage,
    HostMessage,
    swap_tpdu,
)
from guard.journal.records import _prepare
from guard.journal.store import Journal
from guard.journal.keys import DeviceKeys, init_keys
from guard.core.model import CardData, Request, TxnKind, TxnState
from guard.core.policies import OFF
from guard.journal.verify import verify_journal
from posguard.config import SCHEMA, Config, load, parse
from tests.support import FakeCrypto

SCALE = float(os.environ.get("POSGUARD_FUZZ_SCALE", "1"))


def fuzz(n: int) -> settings:
    """Derandomized (same examples every CI run), no example database, no per-example deadline."""
    return settings(max_examples=max(1, int(n * SCALE)), derandomize=True, database=None, deadline=None,
                    suppress_health_check=list(HealthCheck))


PAN = "4761739001010119"
TPDU = bytes.fromhex("6000120034")
CONFIGS = [("binary2", None), ("ascii4", None), ("binary2", TPDU), ("ascii4", TPDU)]
TID, MID = "TERM0001", "MERCHANT0000001"


def _documented_codes(doc: str, pattern: str) -> frozenset[str]:
    return frozenset(re.findall(pattern, doc))


# The decoder's documented garbage codes (guard.core.errors.HostProtocolError), minus the encoder's own.
DECODER_CODES = _documented_codes(HostProtocolError.__doc__ or "", r"HOST_[A-Z_]+") - {"HOST_ENCODE_INVALID"}
# guard.journal.verify's documented reason codes: the first word of each line of its table.
VERIFY_REASONS = _documented_codes(verify_mod.__doc__ or "", r"(?m)^([A-Z][A-Z_]{4,}) +\S")


def test_documented_code_sets_match_the_code() -> None:
    assert DECODER_CODES == {iso_mod.HOST_FRAME_TRUNCATED, iso_mod.HOST_BAD_LENGTH, iso_mod.HOST_BAD_TPDU,
                             iso_mod.HOST_UNDECODABLE, iso_mod.HOST_BAD_MTI}
    assert {"ENTRY_MODIFIED", "ENTRY_MISSING", "MAC_INVALID", "TRUNCATED", "UNREADABLE"} <= VERIFY_REASONS
    assert len(VERIFY_REASONS) >= 12, sorted(VERIFY_REASONS)  # parsed from the docstring: it follows the docs


# ==================================================================================================
# ISO 8583 host input


def _sale(stan: str = "000123") -> dict[str, str]:
    return {"t": "0200", "2": PAN, "3": "000000", "4": "000000001000", "7": "1122153000", "11": stan,
            "12": "163000", "13": "1122", "14": "2912", "41": TID, "42": MID, "49": "978"}


def _peer_messages(side: str) -> list[dict[str, str]]:
    """What the other end sends: responses to the terminal, requests to the host simulator."""
    req = _sale()
    base = {k: req[k] for k in ("3", "4", "7", "11", "41", "42", "49")}
    if side == "terminal":
        return [
            {**base, "t": "0210", "37": "000000000042", "38": "123456", "39": "00"},
            {**base, "t": "0210", "2": PAN, "37": "000000000043", "39": "05"},  # a host that echoes the PAN
            {**base, "t": "0410", "39": "00", "90": iso_mod.field90("0200", "000123", "1122153000")},
            {"t": "0810", "7": "1122153000", "11": "000124", "39": "00", "70": "301"},
        ]
    return [req, {**base, "t": "0400", "90": iso_mod.field90("0200", "000123", "1122153000")},
            {"t": "0800", "7": "1122153000", "11": "000125", "70": "301"}]


def _wire(codec: HostCodec, side: str, fields: dict[str, str]) -> bytes:
    """Framed as the peer frames it (a host answers with the TPDU swapped)."""
    raw = bytes(iso8583.encode(dict(fields), iso8583.specs.default)[0])
    if codec.tpdu is None:
        return codec.frame(raw)
    return codec.frame(raw, tpdu=swap_tpdu(codec.tpdu) if side == "terminal" else codec.tpdu)


OPS = ("flip", "set", "insert", "delete", "truncate", "dup", "splice", "length", "bitmap", "ascii", "tpdu")
mutation_ops = st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 1 << 16), st.integers(0, 255)),
                        min_size=1, max_size=6)


def mutate(data: bytes, ops: list[tuple[str, int, int]], codec: HostCodec, donors: list[bytes]) -> bytes:
    """Structure-aware mutations of one framed message (deterministic given ``ops``)."""
    b = bytearray(data)
    hlen = codec.header_len
    body_at = hlen + (5 if codec.tpdu else 0)
    for op, pos, val in ops:
        i = pos % (len(b) + 1)
        if op == "flip" and b:
            b[i % len(b)] ^= 1 << (val % 8)
        elif op == "set" and b:
            b[i % len(b)] = val
        elif op == "insert":
            b[i:i] = bytes([val]) * (1 + val % 4)
        elif op == "delete" and b:
            del b[i:i + 1 + val % 8]
        elif op == "truncate":
            del b[i:]
        elif op == "dup":
            b[i:i] = b[i:i + 1 + val % 32]
        elif op == "splice":
            d = donors[val % len(donors)]
            b = b[:i] + bytearray(d[pos % (len(d) + 1):])
        elif op == "length" and len(b) >= hlen:  # a header off by a little, or anything
            n = max(0, len(b) - hlen + (val % 9) - 4) if val < 200 else pos
            b[:hlen] = (n % 65536).to_bytes(2, "big") if hlen == 2 else f"{n % 10000:04d}".encode()
        elif op == "bitmap" and len(b) > body_at + 4:  # primary bitmap right after the MTI
            j = body_at + 4 + (val % 8)
            if j < len(b):
                b[j] ^= 1 << (pos % 8)
        elif op == "ascii" and b:  # stays printable: format checks, not the framer, must catch it
            b[i % len(b)] = ord(random.Random(pos).choice(string.ascii_letters + string.digits + " -/"))
        elif op == "tpdu" and codec.tpdu and len(b) >= hlen + 5:
            b[hlen + (val % 5)] = pos % 256
    return bytes(b)


def summarize(items: list[HostMessage | HostGarbage]) -> list[tuple[Any, ...]]:
    """Comparable items. HOST_BAD_LENGTH reports whatever was buffered when it hit (chunking decides
    how much); the stream is discarded after it either way, so only its code is compared."""
    return [("M", tuple(sorted(x.fields.items())), x.raw_len, x.tpdu) if isinstance(x, HostMessage)
            else ("G", x.code) if x.code == HOST_BAD_LENGTH
            else ("G", x.code, x.detail, x.raw_len, x.digest) for x in items]


BINARY_FIELDS = iso_mod._binary_fields(iso8583.specs.default)


def check_items(items: list[HostMessage | HostGarbage]) -> None:
    for x in items:
        if isinstance(x, HostGarbage):
            assert x.code in DECODER_CODES, x
            assert isinstance(x.detail, str) and x.detail and PAN not in x.detail, x.detail
            assert x.raw_len > 0 and re.fullmatch(r"[0-9a-f]{16}", x.digest), x
            assert x.error().code == x.code
        else:
            assert isinstance(x, HostMessage), x
            assert iso_mod.is_known_mti(x.mti), x
            assert all(isinstance(k, str) and isinstance(v, str) for k, v in x.fields.items())
            assert not {"p", "1", "h"} & set(x.fields)
            assert iso_mod._format_problem(x.fields, BINARY_FIELDS) is None, x
            assert PAN not in repr(x)


def decode_both_ways(codec: HostCodec, side: str, stream: bytes, cuts: list[int]) -> list[HostMessage | HostGarbage]:
    """Feed at once and in chunks: the same items, bounded buffer, bytes accounted for."""
    dec = codec.decoder(side)
    whole = dec.feed(stream)
    chunked_dec = codec.decoder(side)
    chunked: list[HostMessage | HostGarbage] = []
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    for a, b in itertools.pairwise(bounds):
        chunked += chunked_dec.feed(stream[a:b])
        assert chunked_dec.buffered <= codec.header_len + C.HOST_MAX_MESSAGE
    assert summarize(whole) == summarize(chunked)
    assert dec.broken == chunked_dec.broken
    if dec.broken:
        bad = [x for x in whole if isinstance(x, HostGarbage) and x.code == HOST_BAD_LENGTH]
        assert len(bad) == 1 and whole[-1] is bad[0], whole
        assert dec.feed(_wire(codec, side, _peer_messages(side)[0])) == [] and dec.buffered == 0
    else:
        assert sum(x.raw_len for x in whole) + dec.buffered == len(stream)
    tail = dec.eof()
    assert tail is None or (tail.code == HOST_FRAME_TRUNCATED and tail.raw_len == len(stream) - sum(x.raw_len for x in whole))
    return whole


@fuzz(500)
@given(cfg=st.sampled_from(CONFIGS), side=st.sampled_from(["terminal", "host"]),
       picks=st.lists(st.tuples(st.integers(0, 9), mutation_ops), min_size=1, max_size=3),
       valid_tail=st.booleans(), cuts=st.lists(st.integers(0, 1 << 16), max_size=6))
def test_mutated_host_frames(cfg: tuple[str, bytes | None], side: str, picks: list[tuple[int, list[tuple[str, int, int]]]],
                             valid_tail: bool, cuts: list[int]) -> None:
    codec = HostCodec(header=cfg[0], tpdu=cfg[1])
    seeds = [_wire(codec, side, m) for m in _peer_messages(side)]
    stream = b"".join(mutate(seeds[i % len(seeds)], ops, codec, seeds) for i, ops in picks)
    if valid_tail:
        stream += seeds[0]
    check_items(decode_both_ways(codec, side, stream, cuts))


@fuzz(300)
@given(cfg=st.sampled_from(CONFIGS), side=st.sampled_from(["terminal", "host"]), which=st.integers(0, 9),
       flips=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=8))
def test_a_corrupt_frame_costs_exactly_one_frame(cfg: tuple[str, bytes | None], side: str, which: int,
                                                 flips: list[tuple[int, int]]) -> None:
    """Body bytes overwritten, length header intact: one item for it, then the next message decodes."""
    codec = HostCodec(header=cfg[0], tpdu=cfg[1])
    seeds = [_wire(codec, side, m) for m in _peer_messages(side)]
    frame = bytearray(seeds[which % len(seeds)])
    for pos, val in flips:
        frame[codec.header_len + pos % (len(frame) - codec.header_len)] = val
    nxt = _peer_messages(side)[(which + 1) % len(seeds)]
    items = decode_both_ways(codec, side, bytes(frame) + _wire(codec, side, nxt), [])
    check_items(items)
    assert len(items) == 2 and isinstance(items[1], HostMessage) and items[1].fields == nxt, items


@fuzz(300)
@given(cfg=st.sampled_from(CONFIGS), side=st.sampled_from(["terminal", "host"]),
       mti=st.sampled_from([b"0210", b"0410", b"0810", b"0200", b"9999", b"02\xff0", b""]),
       body=st.binary(max_size=300), good_tpdu=st.booleans())
def test_well_framed_random_payloads(cfg: tuple[str, bytes | None], side: str, mti: bytes, body: bytes,
                                     good_tpdu: bool) -> None:
    """Random message bytes behind a valid length header: the TPDU check, the ISO decoder, format checks."""
    codec = HostCodec(header=cfg[0], tpdu=cfg[1])
    payload = mti + body
    if codec.tpdu is not None and good_tpdu:
        payload = (swap_tpdu(codec.tpdu) if side == "terminal" else codec.tpdu) + payload
    assume(payload)
    head = len(payload).to_bytes(2, "big") if codec.header == "binary2" else b"%04d" % len(payload)
    wire = head + payload
    check_items(decode_both_ways(codec, side, wire, [len(wire) // 2]))


# ==================================================================================================
# Engine.host_message


NOW = 1_760_000_000.0
ECFG = EngineConfig(TID, MID, host_timeout_s=5, reversal_timeout_s=5, reversal_max_attempts=3, backoff_base_s=1,
                    backoff_max_s=2, saf_window=2, echo_idle_s=1e9, policy=OFF)


def _req(i: int, kind: TxnKind = TxnKind.SALE, original: int | None = None) -> Request:
    return Request("R1", i.to_bytes(16, "big"), kind, 1000 + (original or i), "978", CardData(PAN, "2912"),
                   original_txn_id=original.to_bytes(16, "big") if original is not None else None)


def _answer(e: Engine, acts: list[Any], rc: str = "00") -> list[Any]:
    out = []
    for a in acts:
        if isinstance(a, SendHost):
            f = {k: v for k, v in a.fields.items() if k in ("4", "7", "11", "41", "42", "49")}
            f.update({"t": a.fields["t"][:2] + "1" + a.fields["t"][3], "39": rc, "37": "000000000042", "38": "A1B2C3"})
            out += e.host_message(f, NOW + 1)
    return out


def build_engine(busy: bool) -> Engine:
    """Sales in every state: APPROVED, DECLINED, REVERSED, REVERSAL_PENDING (0400 in flight), and if
    ``busy`` also a SENT sale and a VOID awaiting its reversal."""
    e = Engine(ECFG, FakeCrypto(), random.Random(1))
    e.on_host_up(NOW)
    _answer(e, e.submit(_req(1), NOW))  # stan 1 APPROVED
    _answer(e, e.submit(_req(2), NOW), rc="05")  # stan 2 DECLINED
    e.submit(_req(3), NOW)  # stan 3 SENT, times out -> REVERSAL_PENDING, 0400 sent
    e.submit(_req(4), NOW)  # stan 4 the same, then reversed
    acts = e.tick(NOW + 6)
    _answer(e, [a for a in acts if isinstance(a, SendHost) and a.fields["11"] == "000004"])
    if busy:
        _answer(e, e.submit(_req(5), NOW + 7))  # stan 5 APPROVED, then VOIDed: 0400 in flight
        e.submit(_req(6, TxnKind.VOID, original=5), NOW + 8)
        e.submit(_req(7), NOW + 8)  # stan 6 SENT
    states = {t.key[-1]: t.state for t in e.txns.values()}
    assert TxnState.REVERSAL_PENDING in states.values() and TxnState.REVERSED in states.values()
    return e


def _snapshot(e: Engine) -> dict[str, tuple[Any, ...]]:
    return {k: (t.state, t.rc, t.approval, t.rrn) for k, t in e.txns.items()}


def _spec_value(field: str) -> st.SearchStrategy[str]:
    """What the default spec lets through the decoder for ``field``: length bounds, printable ASCII,
    digits for numeric fields (FrameDecoder._format_problem)."""
    spec: dict[str, Any] = iso8583.specs.default[field]
    n: int = spec["max_len"]
    alphabet = string.digits if field in iso_mod.NUMERIC_FIELDS or field == "t" else string.printable[:95]
    return st.text(alphabet=alphabet, min_size=n if spec["len_type"] == 0 else 0, max_size=n)


def _decodable(field: str, v: str) -> bool:
    spec: dict[str, Any] = iso8583.specs.default[field]
    n: int = spec["max_len"]
    numeric = field in iso_mod.NUMERIC_FIELDS or field == "t"
    return (len(v) == n if spec["len_type"] == 0 else len(v) <= n) and (
        v.isdigit() if numeric else v.isascii() and v.isprintable())


ECHO_VALUES = ["0210", "0410", "0810", "0230", "0200", "000001", "000002", "000003", "000004", "000005", "000006",
               "000007", "00", "05", "25", "94", "91", "", TID, MID, "978", "000000001001", "000000001003",
               "000000001005", "000000000042", "A1B2C3"]
FIELD_KEYS = ["t", "2", "3", "4", "7", "11", "37", "38", "39", "41", "42", "49", "90"]

arbitrary_fields = st.dictionaries(
    st.one_of(st.sampled_from(FIELD_KEYS), st.text(max_size=4)),
    st.one_of(st.sampled_from(ECHO_VALUES), st.text(max_size=24), st.from_regex(r"[0-9]{0,20}", fullmatch=True),
              st.just(PAN)),
    max_size=10)
decodable_fields = st.fixed_dictionaries(
    {"t": st.one_of(st.sampled_from(["0210", "0410", "0810", "0230", "0200", "0430"]), _spec_value("t"))},
    optional={k: st.one_of(st.sampled_from([v for v in ECHO_VALUES if _decodable(k, v)] or [""]), _spec_value(k))
              for k in FIELD_KEYS if k != "t"})


def run_host_messages(busy: bool, messages: list[dict[str, str]], journal_acceptable: bool) -> None:
    e = build_engine(busy)
    before = _snapshot(e)
    for f in messages:
        acts = e.host_message(dict(f), NOW + 20)
        note(f"{f!r} -> {acts!r}")
        assert all(isinstance(a, (Append, Reply, SendHost)) for a in acts), acts
        first_append = next((i for i, a in enumerate(acts) if isinstance(a, Append)), None)
        if any(not isinstance(a, Append) for a in acts):
            assert first_append is not None and first_append < min(i for i, a in enumerate(acts) if not isinstance(a, Append))
        if not busy:
            assert all(isinstance(a, Append) for a in acts), acts
        for a in acts:
            if isinstance(a, Append):
                assert a.records
                if journal_acceptable:
                    _prepare(a.records)  # raises JournalError: the driver would fail-stop on a host's say-so
    after = _snapshot(e)
    for key, (state, *rest) in before.items():
        if state.final:
            assert after[key] == (state, *rest), f"{key}: final outcome changed by a host message"


@fuzz(250)
@given(busy=st.booleans(), messages=st.lists(arbitrary_fields, min_size=1, max_size=5))
def test_host_message_arbitrary_dicts(busy: bool, messages: list[dict[str, str]]) -> None:
    run_host_messages(busy, messages, journal_acceptable=False)


@fuzz(250)
@given(busy=st.booleans(), messages=st.lists(decodable_fields, min_size=1, max_size=5))
def test_host_message_decodable_dicts_are_journal_safe(busy: bool, messages: list[dict[str, str]]) -> None:
    run_host_messages(busy, messages, journal_acceptable=True)


@pytest.mark.parametrize("stan", ["²", "٠٠٠٠٠١", "9" * 5000, "0000001"], ids=["superscript-two", "arabic-indic-1",
                                                                           "5000-digits", "7-digits"])
def test_host_message_stan_must_be_six_ascii_digits(stan: str) -> None:
    """Regression (found here, fixed in 9e015a2): str.isdigit() let Unicode digits reach int() (a
    ValueError, or worse a match on STAN 1); now anything but 1-6 ASCII digits is unmatched."""
    e = build_engine(busy=True)
    acts = e.host_message({"t": "0210", "11": stan, "39": "00"}, NOW + 20)
    assert [type(a) for a in acts] == [Append] and acts[0].records[0][0] == "unmatched_response", acts


# ==================================================================================================
# Configuration


def _valid_value(section: str, key: str) -> Any:
    _typ, default, _check, _doc = SCHEMA[(section, key)]
    if default is not ...:
        return default
    return {("terminal", "terminal_id"): TID, ("terminal", "merchant_id"): MID, ("host", "port"): 5000}.get(
        (section, key), "loop://" if key == "url" else "x")


def good_document() -> dict[str, dict[str, Any]]:
    doc: dict[str, dict[str, Any]] = {}
    for (s, k) in SCHEMA:
        doc.setdefault(s, {})[k] = _valid_value(s, k)
    return doc


toml_scalars = st.one_of(
    st.text(max_size=20), st.integers(min_value=-(1 << 70), max_value=1 << 70), st.floats(), st.booleans(),
    st.datetimes(), st.dates(), st.times(), st.sampled_from(["", "60", "6000010000", "binary2", "ascii4", "N", "DEBUG"]),
    st.sampled_from([0, 1, 8, 9600, 115200, 65535, 65536, 0.05, 0.1, 300.0, 1e9]))
toml_values = st.recursive(toml_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                 st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                           max_leaves=6)
SCHEMA_KEYS = sorted(SCHEMA)
SECTIONS = sorted({s for s, _ in SCHEMA})
PATH_KEYS = {("journal", "path"), ("journal", "keys"), ("host", "cafile"), ("host", "certfile"), ("host", "keyfile")}

edits = st.lists(st.one_of(
    st.tuples(st.just("set"), st.sampled_from(SCHEMA_KEYS), toml_values),
    st.tuples(st.just("drop"), st.sampled_from(SCHEMA_KEYS), st.none()),
    st.tuples(st.just("unknown"), st.tuples(st.sampled_from(SECTIONS + ["hots", ""]), st.text(max_size=8)), toml_values),
    st.tuples(st.just("section"), st.tuples(st.sampled_from(SECTIONS), st.just("")), toml_values),
), max_size=5)


def check_config_outcome(data: Any, source: Path | None) -> str:
    """parse() returns a complete, well-typed Config or raises ConfigError naming a key and a reason."""
    try:
        cfg = parse(data, source)
    except ConfigError as e:
        assert isinstance(e.key, str) and e.key and isinstance(e.reason, str) and e.reason.strip(), (e.key, e.reason)
        assert e.code == "CONFIG_INVALID" and e.key in str(e)
        return "error"
    assert isinstance(cfg, Config) and set(cfg.values) == set(SCHEMA)
    for (s, k), (typ, _d, check, _doc) in SCHEMA.items():
        v = cfg.values[(s, k)]
        assert isinstance(v, typ) and (typ is bool or not isinstance(v, bool)), (s, k, v)
        if check is not None and (s, k) not in PATH_KEYS:
            assert check(v) is None, (s, k, v)
    return "ok"


@fuzz(300)
@given(ops=edits)
def test_config_parse_edited_documents(ops: list[tuple[str, Any, Any]]) -> None:
    doc: Any = good_document()
    for op, where, value in ops:
        if op == "set":
            doc.setdefault(where[0], {})
            if isinstance(doc[where[0]], dict):
                doc[where[0]][where[1]] = value
        elif op == "drop" and isinstance(doc.get(where[0]), dict):
            doc[where[0]].pop(where[1], None)
        elif op == "unknown":
            if isinstance(doc.get(where[0]), dict):
                doc[where[0]][where[1]] = value
            else:
                doc[where[0]] = {where[1]: value}
        elif op == "section":
            doc[where[0]] = value
    check_config_outcome(doc, None)


@fuzz(150)
@given(doc=st.dictionaries(st.text(max_size=10), toml_values, max_size=6))
def test_config_parse_arbitrary_documents(doc: dict[str, Any]) -> None:
    check_config_outcome(doc, None)


def _toml_literal(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, (int, dt.date, dt.time)):
        return v.isoformat() if not isinstance(v, int) else str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_literal(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_literal(x)}" for k, x in v.items()) + "}"
    return json.dumps(str(v))  # TOML basic strings accept JSON escapes (\uXXXX, \n, ...)


toml_lines = st.lists(st.one_of(
    st.sampled_from(SECTIONS + ["hots", "terminal.sub", "[reader]"]).map(lambda s: f"[{s}]"),
    st.tuples(st.sampled_from(sorted({k for _, k in SCHEMA}) + ["colour"]), toml_values).map(
        lambda kv: f"{kv[0]} = {_toml_literal(kv[1])}"),
    st.text(max_size=30),
    st.sampled_from(['x = "unterminated', "= 1", "[[terminal]]", "a.b.c = 1", "port = 0x1F", "k = 1979-05-27T07:32:00Z",
                     "# comment", "", "tls = True", 'url = """multi\nline"""']),
), max_size=20)


@fuzz(250)
@given(lines=toml_lines, prefix_good=st.booleans(), raw=st.one_of(st.none(), st.binary(max_size=200)))
def test_config_load_random_files(lines: list[str], prefix_good: bool, raw: bytes | None) -> None:
    text = "\n".join(lines)
    if prefix_good:
        good = good_document()
        text = "".join(f"[{s}]\n" + "".join(f"{k} = {_toml_literal(v)}\n" for k, v in body.items())
                       for s, body in good.items()) + text
    data = raw if raw is not None else text.encode("utf-8", "surrogatepass")
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "guard.toml"
        p.write_bytes(data)
        try:
            cfg = load(p)
        except ConfigError as e:
            assert e.key and e.reason and e.code == "CONFIG_INVALID"
            return
        assert check_config_outcome(tomllib.loads(data.decode()), p) == "ok" and isinstance(cfg, Config)


def test_config_load_unreadable_paths(tmp_path: Path) -> None:
    for p in (tmp_path / "missing.toml", tmp_path):
        with pytest.raises(ConfigError) as ei:
            load(p)
        assert ei.value.key == "(file)" and ei.value.reason


@pytest.mark.parametrize("key", sorted(PATH_KEYS), ids=[f"{s}.{k}" for s, k in sorted(PATH_KEYS)])
def test_config_nul_in_a_path_names_the_key(key: tuple[str, str]) -> None:
    """Regression (found here, fixed in 9e015a2): a NUL reached Path.resolve() as ValueError."""
    doc = good_document()
    doc["host"].update(tls=True, keyfile="k") if key == ("host", "certfile") else doc["host"].update(tls=True)
    doc[key[0]][key[1]] = "a\x00b"
    with pytest.raises(ConfigError) as ei:
        parse(doc)
    assert ei.value.key == f"{key[0]}.{key[1]}" and ei.value.reason


def test_config_empty_section_name_is_named() -> None:
    """Regression (found here, fixed in 9e015a2): a section named "" was reported as key ''."""
    with pytest.raises(ConfigError) as ei:
        parse({**good_document(), "": {}})
    assert ei.value.key and ei.value.reason


@pytest.mark.parametrize("text", ["a = " + "[" * 2000 + "]" * 2000, "a = " + "{b = " * 2000 + "1" + "}" * 2000],
                         ids=["arrays", "inline-tables"])
def test_config_deep_nesting_is_a_config_error(tmp_path: Path, text: str) -> None:
    """Regression (found here, fixed in 9e015a2): tomllib's RecursionError escaped load()."""
    p = tmp_path / "guard.toml"
    p.write_text(text)
    try:
        with pytest.raises(ConfigError) as ei:
            load(p)
    except RecursionError:  # re-raised shallow: pytest takes ~8 s to format a 1000-frame traceback
        raise AssertionError("tomllib's recursion escaped posguard.config.load") from None
    assert ei.value.key == "(syntax)"


# ==================================================================================================
# Journal files


T0 = 1_700_000_000.0
ENTRY_COLUMNS = ("seq", "ts", "kind", "txn", "payload", "prev_hash", "entry_hash", "mac")


@pytest.fixture(scope="module")
def journal_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DeviceKeys, dict[str, Any]]:
    """A real journal: 30 records of the kinds a terminal writes, a checkpoint every 8 entries, a vault."""
    d = tmp_path_factory.mktemp("fuzzj")
    keys = init_keys(d / "keys")
    with Journal.create(d / "template.db", keys, terminal_id=TID, now=T0, checkpoint_every=8) as j:
        for i in range(15):
            key = f"R1:{i:032x}"
            blob = j.seal_vault(key, f"{PAN}|2912".encode())
            j.append([("intent", key, {"amount": 100 + i, "stan": i + 1, "masked_pan": "476173******0119",
                                       "vault_ref": blob.ref})], now=T0 + i, vault_put=[blob])
            j.append([("outcome", key, {"state": "APPROVED" if i % 3 else "DECLINED", "rc": "00", "rrn": f"{i:012d}"})],
                     now=T0 + i + 0.5, vault_shred=[blob.ref])
        anchor = j.latest_checkpoint()
    return d / "template.db", keys, anchor


def _dump(path: Path) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Entries, ratchet and the table definitions (a table rebuilt without STRICT is a change verify reports)."""
    c = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    c.text_factory = bytes  # compare stored bytes, valid UTF-8 or not
    try:
        return (c.execute("SELECT * FROM entries ORDER BY seq").fetchall(),
                c.execute("SELECT * FROM ratchet").fetchall(),
                c.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table' ORDER BY name").fetchall())
    finally:
        c.close()


def _loosen(c: sqlite3.Connection, table: str) -> None:
    """The attacker recreates a table without STRICT so any value type can be stored."""
    cols = [r[1] for r in c.execute(f"PRAGMA table_info({table})")]
    c.execute(f"CREATE TABLE loose_{table} ({cols[0]} INTEGER PRIMARY KEY, {', '.join(cols[1:])})")
    c.execute(f"INSERT INTO loose_{table} SELECT * FROM {table}")
    c.execute(f"DROP TABLE {table}")
    c.execute(f"ALTER TABLE loose_{table} RENAME TO {table}")


def _tweak(v: Any, r: random.Random) -> Any:
    if isinstance(v, bytes):
        if not v or r.random() < 0.2:
            return r.randbytes(r.choice((0, 1, 31, 32, 33)))
        b = bytearray(v)
        b[r.randrange(len(b))] ^= 1 << r.randrange(8)
        return bytes(b)
    if isinstance(v, str):
        if not v or r.random() < 0.2:
            return r.choice(["", "{}", "null", "[]", '"x"', "checkpoint", "outcome", "R1:x", "\u00e9"])
        i = r.randrange(len(v))
        return r.choice([v[:i] + v[i + 1:], v[:i] + r.choice('0 9a"{}:,\\') + v[i:], v[:i] + chr(ord(v[i]) ^ 1) + v[i + 1:]])
    if isinstance(v, float):
        return r.choice([v + 1, v - 1e-6, math.nextafter(v, math.inf), -v, 0.0, float(int(v))])
    if isinstance(v, int):
        return r.choice([v + 1, v - 1, -v, 0, 1 << 62])
    return r.choice([0, "", b"", 1.5])


def mutate_journal(path: Path, ops: list[tuple[str, int, int, int]]) -> list[str]:
    """Apply tampering ops (the attacker drops the append-only triggers); returns what was applied."""
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("PRAGMA synchronous = OFF")  # test speed: no fsync per tampering statement
    done: list[str] = []
    try:
        for t in ("entries_no_update", "entries_no_delete", "ratchet_no_delete"):
            c.execute(f"DROP TRIGGER IF EXISTS {t}")
        seqs = [s for (s,) in c.execute("SELECT seq FROM entries ORDER BY seq")]
        for op, a, b, seed in ops:
            r = random.Random(seed)
            if not seqs:
                break
            sa, sb = seqs[a % len(seqs)], seqs[b % len(seqs)]
            col = ENTRY_COLUMNS[b % len(ENTRY_COLUMNS)]
            try:
                if op == "tweak":
                    (v,) = c.execute(f"SELECT {col} FROM entries WHERE seq = ?", (sa,)).fetchone()
                    c.execute(f"UPDATE entries SET {col} = ? WHERE seq = ?", (_tweak(v, r), sa))
                elif op == "retype":  # type confusion: needs the table rebuilt without STRICT
                    _loosen(c, "entries")
                    c.execute(f"UPDATE entries SET {col} = ? WHERE seq = ?",
                              (r.choice(["x", 7, 2.5, b"\x00", None, "{}", json.dumps({"state": "APPROVED"})]), sa))
                elif op == "delete":
                    c.execute("DELETE FROM entries WHERE seq = ?", (sa,))
                elif op == "delete_tail":
                    c.execute("DELETE FROM entries WHERE seq >= ?", (sa,))
                elif op == "swap" and sa != sb:
                    ra = c.execute("SELECT * FROM entries WHERE seq = ?", (sa,)).fetchone()
                    rb = c.execute("SELECT * FROM entries WHERE seq = ?", (sb,)).fetchone()
                    c.execute(f"UPDATE entries SET {', '.join(f'{k} = ?' for k in ENTRY_COLUMNS[1:])} WHERE seq = ?", (*rb[1:], sa))
                    c.execute(f"UPDATE entries SET {', '.join(f'{k} = ?' for k in ENTRY_COLUMNS[1:])} WHERE seq = ?", (*ra[1:], sb))
                elif op == "copy":  # replay an entry at the tail (or at a freed seq)
                    row = c.execute("SELECT * FROM entries WHERE seq = ?", (sa,)).fetchone()
                    new = max(seqs) + 1 + b % 2
                    c.execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (new, *row[1:]))
                elif op == "renumber":
                    c.execute("UPDATE entries SET seq = ? WHERE seq = ?", (sa + (b % 5) - 2 if b % 5 != 2 else -sa, sa))
                elif op == "ratchet":
                    row = c.execute("SELECT next_seq, key FROM ratchet").fetchone()
                    if row is None:
                        continue
                    n, k = row
                    c.execute("UPDATE ratchet SET next_seq = ?, key = ?",
                              (_tweak(n, r) if b % 2 else n, k if b % 2 else _tweak(k, r)))
                elif op == "ratchet_delete":
                    c.execute("DELETE FROM ratchet")
                elif op == "bad_utf8":  # a TEXT cell holding bytes that are not UTF-8 (STRICT allows it)
                    tcol = ("kind", "txn", "payload")[b % 3]
                    c.execute(f"UPDATE entries SET {tcol} = CAST(? AS TEXT) WHERE seq = ?", (b"{\xc3(", sa))
                else:
                    continue
                done.append(f"{op} seq {sa} {col if op in ('tweak', 'retype') else ''}")
            except sqlite3.Error:  # the value broke a constraint (NOT NULL, PK, STRICT): not applied
                pass
            seqs = [s for (s,) in c.execute("SELECT seq FROM entries ORDER BY seq")]
    finally:
        c.close()
    return done


journal_ops = st.lists(st.tuples(
    st.sampled_from(["tweak", "tweak", "tweak", "retype", "delete", "delete_tail", "swap", "copy", "renumber",
                     "ratchet", "ratchet_delete", "bad_utf8"]),
    st.integers(0, 1000), st.integers(0, 1000), st.integers(0, 1 << 32)), min_size=1, max_size=3)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("scratch")


def _fresh_copy(template: Path, scratch_dir: Path, name: str) -> Path:
    p = scratch_dir / name
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{p}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(template, p)
    return p


def verify_known(p: Path, **kw: Any) -> Any:
    """verify_journal (once excluded non-UTF-8 schema text; fixed, see test_verify_schema_not_utf8)."""
    return verify_journal(p, **kw)


def open_known(p: Path, keys: DeviceKeys) -> None:
    """Journal.open either works or raises JournalError."""
    try:
        Journal.open(p, keys, terminal_id=TID).close()
    except JournalError:
        pass


@fuzz(300)
@given(ops=journal_ops, with_anchor=st.booleans())
def test_journal_row_mutations(journal_template: tuple[Path, DeviceKeys, dict[str, Any]], scratch: Path,
                               ops: list[tuple[str, int, int, int]], with_anchor: bool) -> None:
    template, keys, anchor = journal_template
    original = _dump(template)
    p = _fresh_copy(template, scratch, "mutated.db")
    applied = mutate_journal(p, ops)
    note(f"applied: {applied}")
    changed = _dump(p) != original
    rep = verify_known(p, k0=keys.k0, public_key=keys.public_key, anchor=anchor if with_anchor else None)
    note(repr(rep))
    if changed:
        assert not rep.ok and rep.reason in VERIFY_REASONS, rep
        assert isinstance(rep.detail, str) and rep.detail
    else:
        assert rep.ok, rep
    bare = verify_known(p)  # no keys: may miss MAC-only changes, must never raise or invent codes
    assert bare.ok or bare.reason in VERIFY_REASONS, bare
    open_known(p, keys)


@fuzz(100)
@given(flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)), min_size=1, max_size=6),
       wal=st.booleans())
def test_journal_file_byte_corruption(journal_template: tuple[Path, DeviceKeys, dict[str, Any]], scratch: Path,
                                      flips: list[tuple[int, int]], wal: bool) -> None:
    """Bytes of the SQLite file itself (disk rot, a bad copy): verify never raises; open raises only JournalError."""
    template, keys, anchor = journal_template
    p = _fresh_copy(template, scratch, "rotten.db")
    data = bytearray(p.read_bytes())
    for pos, x in flips:
        data[pos % len(data)] ^= x
    p.write_bytes(bytes(data))
    rep = verify_known(p, k0=keys.k0, public_key=keys.public_key, anchor=anchor)
    assert rep.ok or rep.reason in VERIFY_REASONS, rep
    open_known(p, keys)


@pytest.mark.parametrize("reader", ["verify_journal", "Journal.open"])
def test_verify_schema_not_utf8(journal_template: tuple[Path, DeviceKeys, dict[str, Any]],
                                          scratch: Path, reader: str) -> None:
    template, keys, _ = journal_template
    p = _fresh_copy(template, scratch, "schema.db")
    data = bytearray(p.read_bytes())
    at = data.find(b'CREATE TABLE "entries" (') + len(b'CREATE TABLE "entries" ')  # schema text, page 1
    assert 0 < at < 4096
    data[at] = 0xF3  # not UTF-8, and a syntax error: SQLite's message quotes it, Python cannot decode it
    p.write_bytes(bytes(data))
    if reader == "Journal.open":
        with pytest.raises(JournalError):
            Journal.open(p, keys, terminal_id=TID)
        return
    rep = verify_journal(p, k0=keys.k0, public_key=keys.public_key)
    assert not rep.ok and rep.reason in VERIFY_REASONS, rep
