"""Human tables of the operator commands (`journal show`, `reconcile`, `replay`), readable at 80
columns: on a narrow console the long columns are shortened (UTC month-day and time, the txn id's
last 8 hex digits, the card's last 4) or a discrepancy becomes a short block of lines; amounts are money
(``20.00 EUR``, ``guard.core.model.format_money``). Piped output gets the full width
(``posguard.cli_helpers.wide_console``); scripts should use ``--json`` or `journal export`."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.table import Table

from guard.core.model import format_money

WIDE = 140  # below this many columns, the narrow layouts


def short_txn(key: str | None) -> str:
    """``READER01:3f90...41dc6a45`` -> ``…41dc6a45`` (last 8 hex digits): enough to find it again."""
    if not key:
        return ""
    tail = key.rsplit(":", 1)[-1]
    return key if len(tail) <= 8 else "…" + tail[-8:]


def money(amount: int | None, currency: str) -> str:
    if amount is None:
        return ""
    return format_money(amount, currency) if currency else f"{amount} (minor units)"


def _card_tail(masked: str) -> str:
    return "*" + masked[-4:] if masked else ""


def txn_table(title: str, rows: Iterable[dict[str, Any]], width: int) -> Table:
    """`journal show` per transaction."""
    narrow = width < WIDE
    t = _narrow_table(title) if narrow else Table(title=title)
    if narrow:
        cols = [("UTC", "left"), ("txn", "left"), ("state", "left"), ("stan", "right"), ("amount", "right"),
                ("card", "left"), ("reason", "left")]
    else:
        cols = [("created", "left"), ("txn", "left"), ("state", "left"), ("stan", "right"), ("amount", "right"),
                ("masked_pan", "left"), ("rc", "left"), ("approval", "left"), ("rrn", "left"), ("reason", "left"),
                ("entries", "right")]
    for name, justify in cols:
        t.add_column(name, justify=justify,  # type: ignore[arg-type]
                     no_wrap=name != "reason", overflow="fold" if name == "reason" else "ellipsis")
    for r in rows:
        amount = money(r["amount"], r["currency"])
        if narrow:
            rc = f"rc {r['rc']}" if r["rc"] not in ("", "00") else ""
            t.add_row(r["created"][5:16].replace("T", " "), short_txn(r["txn"]), r["state"], f"{r['stan']:06d}", amount,
                      _card_tail(r["masked_pan"]), " ".join(x for x in (r["reason"], rc) if x))
        else:
            t.add_row(r["created"], r["txn"], r["state"], f"{r['stan']:06d}", amount, r["masked_pan"], r["rc"],
                      r["approval"], r["rrn"], r["reason"], str(r["entries"]))
    return t


def entry_table(title: str, rows: Iterable[dict[str, Any]], width: int) -> Table:
    """`journal show --per entry`."""
    narrow = width < WIDE
    t = _narrow_table(title) if narrow else Table(title=title)
    names = ("seq", "time", "kind", "txn", "payload") if narrow else ("seq", "time", "kind", "txn", "state", "payload")
    for name in names:
        t.add_column(name, justify="right" if name == "seq" else "left", no_wrap=name != "payload",
                     overflow="fold" if name == "payload" else "ellipsis")
    for r in rows:
        p = json.dumps(r["payload"], sort_keys=True)
        p = p if len(p) <= 80 else p[:77] + "..."
        if narrow:  # the transaction's state: `journal show` per transaction, or export
            t.add_row(str(r["seq"]), r["time"][5:19].replace("T", " "), r["kind"], short_txn(r["txn"]), p)
        else:
            t.add_row(str(r["seq"]), r["time"], r["kind"], r["txn"] or "", r["state"], p)
    return t


def _narrow_table(title: str) -> Table:
    """No borders, one space between columns: every character for the data."""
    return Table(title=title, box=None, pad_edge=False, padding=(0, 1, 0, 0), header_style="bold")


def print_discrepancies(console: Console, discrepancies: list[Any]) -> None:
    """`reconcile`'s findings: a table on a wide console, three short lines each on a narrow one."""
    if console.width >= WIDE:
        t = Table(title=f"{len(discrepancies)} discrepancies", header_style="bold")
        for col in ("category", "action", "date", "stan", "terminal", "term. amount", "host amount", "net", "rrn",
                    "txn", "note"):
            t.add_column(col, no_wrap=col != "note")
        for d in discrepancies:
            t.add_row(d.category, d.action, d.date, d.stan, d.terminal_state or "-",
                      money(d.terminal_amount, d.currency), money(d.host_amount, d.currency), str(d.host_net_debits),
                      d.rrn, d.txn or "-", d.note)
        console.print(t)
        return
    console.print(f"[bold]{len(discrepancies)} discrepancies[/]")
    for d in discrepancies:
        console.print(f"[bold]{d.category}[/] -> [bold]{d.action}[/]  date {d.date} stan {d.stan}"
                      + (f" txn {short_txn(d.txn)}" if d.txn else ""), highlight=False)
        term = f"terminal {d.terminal_state or 'has no such sale'}" + (
            f" {money(d.terminal_amount, d.currency)}" if d.terminal_amount is not None else "")
        host = f"host {money(d.host_amount, d.currency) or '-'} ({d.host_net_debits} net debit"
        host += ("" if d.host_net_debits == 1 else "s") + ")" + (f", rrn {d.rrn}" if d.rrn else "")
        for text in (f"{term}; {host}", d.note):
            console.print(textwrap.fill(text, max(40, console.width), initial_indent="  ", subsequent_indent="    "),
                          highlight=False, markup=False)
