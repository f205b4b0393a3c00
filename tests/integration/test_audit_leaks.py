"""Audit regressions: no clear card data in errors, outputs or exceptions' baggage, and a clear
error (stable code, exit 2/3) instead of a traceback for bad input. Fast, loopback-free."""

from __future__ import annotations

import traceback

import pytest

from guard.hostlink.iso import CodecError, HostCodec

PAN = "4761739001010119"


def _sale(**extra: str) -> dict[str, str]:
    return {"t": "0200", "3": "000000", "4": "000000001250", "7": "1130004850", "11": "000001",
            "41": "TERM0001", "42": "MERCHANT0000001", "49": "978", **extra}


def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in out:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


# --- ISO 8583 encode errors ---------------------------------------------------------------------


@pytest.mark.parametrize("fields", [
    _sale(**{"2": PAN * 2}),  # too long for field 2
    _sale(**{"2": PAN + "\u00e9"}),  # not encodable
    _sale(**{"2": PAN, "14": "25121"}),  # another field wrong, field 2 fine
    _sale(**{"2": PAN, "4": "1"}),
])
def test_codec_error_carries_no_card_data_even_in_its_context(fields: dict[str, str]) -> None:
    """pyiso8583's EncodeError keeps the whole message (doc_dec, field 2 included); `from None`
    only hides it from the printed traceback, __context__ still holds it for any handler, error
    reporter or debugger that walks the chain."""
    with pytest.raises(CodecError) as ei:
        HostCodec().encode(fields)
    for e in _chain(ei.value):
        assert PAN not in repr(e) and PAN not in repr(vars(e)), type(e)
    assert len(_chain(ei.value)) == 1
    assert PAN not in "".join(traceback.format_exception(ei.value))


# --- terminal and merchant ids --------------------------------------------------------------------


@pytest.mark.parametrize("tid,mid", [("TERM\u00c9001", "MERCHANT0000001"), ("TERM0001", "MERCHANT\u00e9000001"),
                                     ("TERM\x00001", "MERCHANT0000001")])
def test_engine_refuses_ids_the_host_codec_cannot_carry(tid: str, mid: str) -> None:
    from guard.core.engine import EngineConfig
    from guard.core.errors import PosguardError

    assert len(tid) == 8 and len(mid) == 15
    with pytest.raises(PosguardError) as ei:
        EngineConfig(tid, mid)
    assert ei.value.code in ("CONFIG_TERMINAL_ID", "CONFIG_MERCHANT_ID")


# --- journal on a full disk, in a missing directory, unreadable ---------------------------------------


T0 = 1_700_000_000.0


def test_full_journal_is_a_journal_error_not_an_internal_one(tmp_path, keys) -> None:  # type: ignore[no-untyped-def]
    """SQLITE_FULL used to escape as sqlite3.OperationalError: `posguard run` logged a traceback and
    exited 4 ("internal error") instead of 3 ("journal failure")."""
    from guard.core.errors import JournalError
    from guard.journal.store import Journal

    j = Journal.create(tmp_path / "j.db", keys, terminal_id="TERM0001", now=T0)
    try:
        pages = j._db().execute("PRAGMA page_count").fetchone()[0]
        j._db().execute(f"PRAGMA max_page_count = {pages}").fetchall()  # the disk is full now
        with pytest.raises(JournalError) as ei:
            for i in range(200):
                j.append([("stan_use", None, {"stan": i, "pad": "x" * 3000})], now=T0 + i)
        assert ei.value.code == "JOURNAL_WRITE_FAILED" and "full" in str(ei.value)
        assert ei.value.__context__ is None or not isinstance(ei.value.__context__, JournalError)
    finally:
        j.close()


def test_locked_journal_is_a_journal_error(tmp_path, keys) -> None:  # type: ignore[no-untyped-def]
    import sqlite3

    from guard.core.errors import JournalError
    from guard.journal.store import Journal

    Journal.create(tmp_path / "j.db", keys, terminal_id="TERM0001", now=T0).close()
    j = Journal.open(tmp_path / "j.db", keys, terminal_id="TERM0001")
    other = sqlite3.connect(tmp_path / "j.db", isolation_level=None)
    try:
        j._db().execute("PRAGMA busy_timeout = 0")
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(JournalError) as ei:
            j.append([("stan_use", None, {"stan": 1})], now=T0)
        assert ei.value.code == "JOURNAL_WRITE_FAILED" and "locked" in str(ei.value)
        other.execute("ROLLBACK")
        j.append([("stan_use", None, {"stan": 1})], now=T0)  # nothing was half-written: usable again
    finally:
        other.close()
        j.close()


def test_journal_create_and_open_failures_have_codes(tmp_path, keys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import sqlite3

    import guard.journal.store as journal_mod
    from guard.core.errors import JournalError
    from guard.journal.store import Journal

    with pytest.raises(JournalError) as ei:
        Journal.create(tmp_path / "no-such-dir" / "j.db", keys, terminal_id="TERM0001", now=T0)
    assert ei.value.code == "JOURNAL_CREATE_FAILED" and "no-such-dir" in str(ei.value)
    (tmp_path / "adir").mkdir()
    with pytest.raises(JournalError) as ei:
        Journal.open(tmp_path / "adir", keys, terminal_id="TERM0001")
    assert ei.value.code == "JOURNAL_NOT_A_FILE"

    Journal.create(tmp_path / "j.db", keys, terminal_id="TERM0001", now=T0).close()

    def unreadable(path, *, mode):  # type: ignore[no-untyped-def]
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(journal_mod, "_connect", unreadable)
    with pytest.raises(JournalError) as ei:
        Journal.open(tmp_path / "j.db", keys, terminal_id="TERM0001")
    assert "cannot be opened" in str(ei.value)


def test_posguard_run_with_journal_in_missing_directory_exits_2(tmp_path, keys, write_config, capsys) -> None:  # type: ignore[no-untyped-def]
    from posguard.run import run

    cfg = write_config(port=1, journal=tmp_path / "missing" / "j.db", keys=tmp_path / "keys")
    assert run(cfg, max_seconds=0.1) == 2
    err = capsys.readouterr().err
    assert "JOURNAL_CREATE_FAILED" in err and "Traceback" not in err


# --- settlement CSV errors never echo a card number -----------------------------------------------


_ROW = {"date": "1130", "tid": "TERM0001", "mid": "MERCHANT0000001", "stan": "000001", "rrn": "000000000001",
        "amount": "1250", "type": "SALE", "response": "00"}


@pytest.mark.parametrize("column,value", [
    ("amount", PAN), ("rrn", PAN), ("stan", PAN), ("date", PAN), ("type", PAN), ("response", PAN),
    ("amount", f"{PAN[:4]} {PAN[4:8]} {PAN[8:12]} {PAN[12:]}"), ("rrn", "PAN" + PAN), ("tid", PAN), ("mid", PAN),
])
def test_settlement_errors_never_echo_a_card_number(tmp_path, column: str, value: str) -> None:  # type: ignore[no-untyped-def]
    """An acquirer report with a card-number column where amount/rrn/... is expected (a shifted or
    foreign export) printed the full PAN in the SETTLEMENT_INVALID message on stderr; a PAN as
    tid/mid passed and came back in every reconcile report row."""
    from guard.ops.reconcile import SettlementError, read_settlement

    row = dict(_ROW, **{column: value})
    p = tmp_path / "s.csv"
    p.write_text(",".join(_ROW) + "\n" + ",".join(row[c] for c in _ROW) + "\n")
    with pytest.raises(SettlementError) as ei:
        read_settlement(p)
    msg = str(ei.value)
    assert ei.value.line == 2 and ei.value.column == column, msg
    digits = "".join(ch for ch in msg if ch.isdigit())
    assert PAN not in msg and PAN[6:12] not in digits, msg
    if column in ("amount", "rrn", "type"):
        assert "476173******0119" in msg, msg  # still recognisable for whoever fixes the file


def test_settlement_keeps_echoing_short_bad_values(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from guard.ops.reconcile import SettlementError, read_settlement

    p = tmp_path / "s.csv"
    p.write_text(",".join(_ROW) + "\n" + ",".join(dict(_ROW, amount="12.50")[c] for c in _ROW) + "\n")
    with pytest.raises(SettlementError, match="'12.50'"):
        read_settlement(p)


# --- CLI: bad input is exit 2 with a message, never exit 1 ("found a problem") or a traceback ---------


def _cli(*args: object) -> tuple[int, str]:
    from click.testing import CliRunner

    from posguard.cli import main

    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r.exit_code, r.output


@pytest.mark.parametrize("anchor", [b"garbage", b"\xff\xfe\x00", b""])
def test_verify_with_an_unreadable_anchor_is_bad_input(tmp_path, journal, anchor: bytes) -> None:  # type: ignore[no-untyped-def]
    """Exit 1 means "the journal failed verification": a script (or an auditor) must not read a
    garbage anchor file as evidence of tampering. It was exit 1 with 'Expecting value: line 1
    column 1 (char 0)', naming neither the file nor the option."""
    a = tmp_path / "anchor.json"
    a.write_bytes(anchor)
    code, out = _cli("journal", "verify", journal, "--anchor", a)
    assert code == 2 and "anchor.json" in out and "ANCHOR" in out, out


def test_verify_with_a_bad_key_file_is_bad_input(tmp_path, journal) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "k0.escrow"
    bad.write_text("not a key\n")
    bad.chmod(0o600)
    code, out = _cli("journal", "verify", journal, "--k0", bad)
    assert code == 2 and "KEY_MALFORMED" in out and "k0.escrow" in out, out
    code, out = _cli("journal", "verify", journal, "--pubkey", bad)
    assert code == 2 and "KEY_MALFORMED" in out, out


def test_key_and_signer_commands_bad_input_exit_2(tmp_path, keys) -> None:  # type: ignore[no-untyped-def]
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, out = _cli("keys", "init", tmp_path / "keys")
    assert code == 2 and "KEY_EXISTS" in out, out
    code, out = _cli("keys", "init", blocker / "keys")  # parent is a file: was a NotADirectoryError traceback
    assert code == 2 and "KEY_WRITE_FAILED" in out, out
    code, out = _cli("config", "init-signer", blocker / "signer")
    assert code == 2 and "signer" in out, out
    cfg = tmp_path / "guard.toml"
    cfg.write_text("x = 1\n")
    code, out = _cli("config", "sign", cfg, "--key", blocker)
    assert code == 2 and "KEY_MALFORMED" in out, out


def test_config_signature_files_that_are_directories_are_config_errors(tmp_path, keys) -> None:  # type: ignore[no-untyped-def]
    from guard.core.errors import PosguardError
    from posguard.config_signing import check

    cfg = tmp_path / "guard.toml"
    cfg.write_text("x = 1\n")
    (tmp_path / "keys" / "config.pub").mkdir()  # was an IsADirectoryError traceback from `posguard run`
    with pytest.raises(PosguardError) as ei:
        check(cfg, tmp_path / "keys")
    assert "config.pub" in str(ei.value)


# --- simulators and demo: bad arguments are usage errors, not tracebacks -----------------------------


@pytest.mark.parametrize("argv", [["--port", "99999"], ["--port", "-1"], ["--port", "x"],
                                  ["--port", "0", "--ledger", "/nonexistent-dir/ledger.json"],
                                  ["--port", "0", "--settlement", "/"]])
def test_hostsim_bad_arguments_exit_2_before_serving(argv: list[str], capsys) -> None:  # type: ignore[no-untyped-def]
    from guard.simulation.hostcli import main

    with pytest.raises(SystemExit) as ei:
        main([*argv, "--duration", "0.1"])
    assert ei.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_hostsim_ledger_write_failure_at_exit_is_reported(tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """The ledger is written when the simulator stops; a full disk then was a traceback (and a
    stray temp file), after the whole run."""
    import errno

    import guard.simulation.hostcli as hostcli
    import guard.simulation.hostsim as hs

    def full(self, path):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hs.HostCore, "dump_ledger", full)
    rc = hostcli.main(["--port", "0", "--duration", "0.1", "--ledger", str(tmp_path / "ledger.json"),
                  "--settlement", str(tmp_path / "s.csv")])
    err = capsys.readouterr().err
    assert rc == 3 and "No space left" in err and "Traceback" not in err
    assert (tmp_path / "s.csv").exists()  # the other file is still written

    target = tmp_path / "adir"
    target.mkdir()
    with pytest.raises(OSError):
        hs._atomic_write(target, b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "s.csv"]  # no *.tmp.<pid> left


def test_readersim_boot_counter_out_of_range_is_a_usage_error() -> None:
    from guard.simulation.readercli import main

    for bad in ("-1", str(2**64)):
        with pytest.raises(SystemExit) as ei:
            main(["--port", "loop://", "--boot-counter", bad, "--timeout", "0.1"])
        assert ei.value.code == 2


@pytest.mark.parametrize("args", [["--host-timeout", "-1"], ["--host-timeout", "nan"], ["--host-timeout", "0"]])
def test_demo_bad_host_timeout_is_a_usage_error(tmp_path, args: list[str]) -> None:  # type: ignore[no-untyped-def]
    code, out = _cli("demo", "--dir", tmp_path / "d", *args)
    assert code == 2 and "host-timeout" in out, out
    assert not (tmp_path / "d").exists()


def test_demo_unusable_dir_exits_2(tmp_path) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "a-file"
    f.write_text("x")
    code, out = _cli("demo", "--dir", f / "demo")
    assert code == 2 and "choose another --dir" in out, out


# --- a journal whose SQLite file is sound but one payload is not (bit rot, edited without keys) ------


def _edited_journal(tmp_path, keys, old: bytes, new: bytes):  # type: ignore[no-untyped-def]
    from tests.support.ops_support import bulk_journal

    path = tmp_path / "j.db"
    bulk_journal(path, keys, 3)
    data = path.read_bytes()
    assert len(old) == len(new) and data.count(old) >= 1
    path.write_bytes(data.replace(old, new, 1))
    return path


@pytest.mark.parametrize("old,new", [(b'"kind":"SALE"', b'"kind":"SALX"'),  # not a TxnKind
                                     (b'"state":"APPROVED"', b'"state":"APPROVEX"'),  # not a TxnState
                                     (b'{"amount":', b'{"amount" ')])  # not JSON
def test_daemon_start_on_an_edited_payload_is_journal_corrupt(tmp_path, keys, old: bytes, new: bytes) -> None:  # type: ignore[no-untyped-def]
    """open_guard (posguard run, replay) died with a ValueError/JSONDecodeError traceback; journal
    export --per entry and show --per entry did too on a payload that is not JSON."""
    from tests.support.ops_support import MID, TID

    from guard.core.engine import EngineConfig
    from guard.core.errors import JournalError
    from guard.ops.export import entry_rows, load_view
    from guard.hostlink.iso import HostCodec
    from guard.runtime.service import open_guard
    from guard.hostlink.uplink import Uplink

    path = _edited_journal(tmp_path, keys, old, new)
    with pytest.raises(JournalError) as ei:
        open_guard(path, keys, EngineConfig(TID, MID), Uplink("127.0.0.1", 9, HostCodec()))
    assert ei.value.code == "JOURNAL_CORRUPT" and "entry " in str(ei.value)
    with pytest.raises(JournalError) as ei:
        load_view(path)
    assert ei.value.code == "JOURNAL_CORRUPT"
    if b'"amount" ' in new:
        with pytest.raises(JournalError):
            list(entry_rows(path))
        code, out = _cli("journal", "show", path, "--per", "entry")
        assert code == 2 and "JOURNAL_CORRUPT" in out, out
        code, out = _cli("journal", "export", path, "--per", "entry", "--format", "jsonl")
        assert code == 2 and "JOURNAL_CORRUPT" in out, out


# --- host-supplied ids in unmatched_response --------------------------------------------------------


def test_unmatched_response_does_not_journal_a_card_number_sent_as_merchant_id(tmp_path, keys) -> None:  # type: ignore[no-untyped-def]
    """Fields 41/42 are exempt from the journal's card-number guard (numeric merchant ids are often
    Luhn-valid). unmatched_response copied them from whatever the host sent, so a host (or anyone
    on a plain-TCP link) could get a 15-digit card number written in clear into the journal."""
    import random

    from guard.core.engine import Append, Engine, EngineConfig
    from guard.hostlink.iso import HostCodec
    from guard.journal.store import Journal
    from guard.runtime.service import JournalCrypto

    amex = "378282246310005"
    j = Journal.create(tmp_path / "j.db", keys, terminal_id="TERM0001", now=T0)
    try:
        e = Engine(EngineConfig("TERM0001", "MERCHANT0000001"), JournalCrypto(j, keys.token_key), random.Random(1))
        wire = HostCodec().encode({"t": "0210", "11": "000777", "39": "00", "41": "TERM0001", "42": amex})
        msg = HostCodec().decoder("terminal").feed(wire)[0]
        acts = e.host_message(msg.fields, T0)
        assert [a.records[0][0] for a in acts if isinstance(a, Append)] == ["unmatched_response"]
        j.append(acts[0].records, now=T0)
        ours = e.host_message({"t": "0210", "11": "000778", "39": "00", "41": "TERM0001", "42": "MERCHANT0000001"}, T0)
        assert ours[0].records[0][2]["42"] == "MERCHANT0000001"  # a mismatch stays diagnosable
    finally:
        j.close()
    data = b"".join(p.read_bytes() for p in tmp_path.glob("j.db*"))
    assert amex.encode() not in data
    assert b"378282*****0005" in data


# --- the host simulator's ledger (a demo file) -------------------------------------------------------


def test_hostsim_card_token_key_is_not_derivable_from_the_seed() -> None:
    """The ledger (host-ledger.json in every demo directory, `posguard hostsim --ledger`) stores
    each debit's card token next to its masked PAN and the seed. The token key was
    sha256("posguard.hostsim.card-key.<seed>"): with BIN + last 4 known, the 10^6 middle digits
    are searched in seconds, so the ledger held the full PAN in a reversible form."""
    import hashlib
    import hmac

    from guard.simulation.hostsim import HostCore

    a, b = HostCore(seed=7, dup_detection=True), HostCore(seed=7, dup_detection=True)
    assert a._card_token(PAN) == a._card_token(PAN)  # stable within a run: counts per card still work
    assert a._card_token(PAN) != b._card_token(PAN)
    seeded = hashlib.sha256(b"posguard.hostsim.card-key.7").digest()
    assert a._card_token(PAN) != hmac.new(seeded, PAN.encode(), hashlib.sha256).hexdigest()[:16]


@pytest.mark.parametrize("field", ["37", "38", "39", "11", "t"])
def test_an_over_long_host_field_is_malformed_not_a_journal_failure(tmp_path, keys, field: str) -> None:  # type: ignore[no-untyped-def]
    """With a custom host.spec, 37/38/39/11 or the MTI could arrive longer than ISO allows, even as
    a Luhn-valid card number; the journal would refuse such a record and stop the daemon. The
    engine treats the answer as malformed (journaled truncated, the sale reversed on timeout)."""
    import random

    from tests.support.executor_support import RecordingHost, Shown, executor

    from guard.core.engine import Engine, EngineConfig
    from guard.journal.store import Journal
    from guard.core.model import CardData, Request, TxnKind, TxnState
    from guard.core.policies import OFF
    from guard.runtime.service import JournalCrypto

    pan = "4761739001010119"
    j = Journal.create(tmp_path / "j.db", keys, terminal_id="TERM0001", now=T0)
    try:
        e = Engine(EngineConfig("TERM0001", "MERCHANT0000001", policy=OFF, host_timeout_s=5),
                   JournalCrypto(j, keys.token_key), random.Random(1))
        clock = [T0]
        host = RecordingHost()
        ex = executor(e, j, host, Shown(), lambda: clock[0])
        ex.call(e.on_host_up)
        req = Request("R1", (1).to_bytes(16, "big"), TxnKind.SALE, 1000, "978", CardData(pan, "2912"))
        ex.call(e.submit, req)
        send = next(f for f in host.sent if f["t"] == "0200")
        answer = {k: v for k, v in send.items() if k in ("4", "7", "11", "41", "42", "49")}
        answer.update({"t": "0210", "39": "00", "38": "123456", "37": "000000000001"})
        answer[field] = pan
        clock[0] = T0 + 1
        ex.call(e.host_message, answer)
        assert e.status(req.key).state is TxnState.SENT  # type: ignore[union-attr]
        clock[0] = T0 + 6
        ex.call(e.tick)
        assert e.status(req.key).state is TxnState.REVERSAL_PENDING  # type: ignore[union-attr]
        kinds = [(x.kind, x.payload.get("why")) for x in j.entries() if x.kind == "unmatched_response"]
        assert kinds == [("unmatched_response", f"FIELD_TOO_LONG:{field}")]
    finally:
        j.close()
    assert pan.encode() not in b"".join(p.read_bytes() for p in tmp_path.glob("j.db*"))
