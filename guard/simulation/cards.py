"""Simulated cards for the reference reader and the deterministic simulation: chip, contactless,
magnetic stripe and keyed cards, with ICC data carrying plausible tags, and what each card (or
the reader holding it) does once the host approved: accept, decline in its second GENERATE AC,
leave the slot, fail, or let the reader reboot before COMPLETE (with or without the decision saved).

Test data only: the PIN blocks and cryptograms are random bytes, never real keys.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from firmware_bridge.messages import Auth, ErrorMessage, ResultMessage
from guard.core.emv import CardDecision, EntryMode
from guard.core.model import CardData, TxnState

# What happens after the host approved (PROTOCOL.md section 12):
ACCEPT = "accept"  # TC: COMPLETE ACCEPTED
DECLINE = "decline"  # AAC in the second GENERATE AC: COMPLETE CARD_DECLINED
PULLED = "pulled"  # the customer pulls the card out: COMPLETE CARD_REMOVED
FAIL = "fail"  # the kernel fails: COMPLETE TERMINAL_ERROR
REBOOT = "reboot"  # the reader loses power before the card decided: no COMPLETE at all
REBOOT_RESEND = "reboot_resend"  # the reader saved the card's decision (TC), rebooted, re-sends COMPLETE
BEHAVIOURS = (ACCEPT, DECLINE, PULLED, FAIL, REBOOT, REBOOT_RESEND)
DECISION = {ACCEPT: CardDecision.ACCEPTED, DECLINE: CardDecision.CARD_DECLINED, PULLED: CardDecision.CARD_REMOVED,
            FAIL: CardDecision.TERMINAL_ERROR, REBOOT_RESEND: CardDecision.ACCEPTED}

AID = {"4": "A0000000031010", "5": "A0000000041010"}  # Visa credit, Mastercard credit
LABEL = {"4": b"VISA CREDIT", "5": b"MASTERCARD"}


@dataclass(frozen=True)
class CardModel:
    """One card as presented: how it is read and what it does after the host's approval."""

    mode: EntryMode
    behaviour: str = ACCEPT
    online_pin: bool = False

    @property
    def decision(self) -> CardDecision | None:
        """The decision the reader reports (None: it never sends COMPLETE)."""
        return DECISION.get(self.behaviour) if self.mode.awaits_card else None


def pick(rng: random.Random) -> CardModel:
    """A card for the simulation's mix: mostly chip and contactless that accept, some swiped and
    keyed, and the chip failures after approval (decline, pulled, failure, reader reboots)."""
    mode = rng.choices([EntryMode.CHIP, EntryMode.CONTACTLESS, EntryMode.MAGSTRIPE, EntryMode.FALLBACK,
                        EntryMode.MANUAL], weights=[6, 3, 2, 1, 1])[0]
    behaviour = ACCEPT
    if mode.awaits_card:
        behaviour = rng.choices(BEHAVIOURS, weights=[8, 3, 1, 1, 1, 1])[0]
    return CardModel(mode, behaviour, online_pin=mode is EntryMode.CHIP and rng.random() < 0.5)


def tlv(tag: int, value: bytes) -> bytes:
    """One BER-TLV object (values under 128 bytes)."""
    assert len(value) < 0x80
    return tag.to_bytes((tag.bit_length() + 7) // 8, "big") + bytes([len(value)]) + value


def first_icc(pan: str, amount: int, currency: str, atc: int, rng: random.Random) -> bytes:
    """Field-55 data of a first GENERATE AC asking to go online (ARQC), as a kernel builds it."""
    return b"".join([
        tlv(0x82, b"\x19\x80"),  # AIP
        tlv(0x84, bytes.fromhex(AID.get(pan[0], AID["4"]))),
        tlv(0x95, b"\x00\x00\x00\x80\x00"),  # TVR
        tlv(0x9A, bytes.fromhex("291130")),
        tlv(0x9C, b"\x00"),
        tlv(0x5F2A, bytes.fromhex("0" + currency)),
        tlv(0x9F02, bytes.fromhex(f"{amount:012d}")),
        tlv(0x9F10, bytes.fromhex("06010A03A0A000")),  # issuer application data
        tlv(0x9F1A, bytes.fromhex("0" + currency)),
        tlv(0x9F26, rng.randbytes(8)),  # ARQC
        tlv(0x9F27, b"\x80"),
        tlv(0x9F33, bytes.fromhex("E0F8C8")),
        tlv(0x9F34, bytes.fromhex("420300")),
        tlv(0x9F36, atc.to_bytes(2, "big")),
        tlv(0x9F37, rng.randbytes(4)),
        tlv(0x50, LABEL.get(pan[0], LABEL["4"])),
    ])


def final_icc(decision: CardDecision, atc: int, rng: random.Random) -> bytes:
    """The card's data after its second GENERATE AC: TC when it accepted, AAC otherwise."""
    cid = b"\x40" if decision is CardDecision.ACCEPTED else b"\x00"
    return tlv(0x9F27, cid) + tlv(0x9F26, rng.randbytes(8)) + tlv(0x9F36, atc.to_bytes(2, "big")) + tlv(0x9B, b"\xe8\x00")


def card_data(model: CardModel, pan: str, expiry: str, amount: int, currency: str, rng: random.Random) -> CardData:
    """What the reader sends in AUTH for ``model``: track 2 equivalent for read cards, ICC data for
    chip and contactless, an online PIN block and KSN when the card asked for one."""
    atc = rng.randrange(1, 0xFFFF)
    read = model.mode is not EntryMode.MANUAL
    chip = model.mode.awaits_card
    return CardData(
        pan, expiry, entry_mode=model.mode.value,
        pan_seq="001" if chip else "",
        track2=f"{pan}D{expiry}201{rng.randrange(10**9):09d}" if read else "",
        icc=first_icc(pan, amount, currency, atc, rng) if chip else b"",
        pin_block=rng.randbytes(8) if model.online_pin else b"",
        ksn=bytes.fromhex("FFFF9876543210E0") + rng.randbytes(2) if model.online_pin else b"",
    )


# ---------------------------------------------------------------------------- the simulation's readers


def card_decides(w: Any, key: str) -> None:
    """In the deterministic simulation (``w``: its world), after an AWAITING_COMPLETION result:
    the card's second GENERATE AC, then COMPLETE; a reader that reboots first sends nothing (the
    guard's completion timeout reverses the sale) or re-sends the decision it saved."""
    model: CardModel = w.cards[key]
    decision = model.decision
    if decision is None:
        w.card_said[key] = CardDecision.TERMINAL_ERROR  # never completed: must not end APPROVED
        w.log(f"reader of {key[-6:]} reboots before the card decides")
        return
    w.card_said[key] = decision
    icc = final_icc(decision, 1, w.chip_rng)
    delay = w.chip_rng.uniform(0.05, 2.0)
    if model.behaviour == REBOOT_RESEND:
        delay += w.chip_rng.uniform(5.0, 25.0)  # reboot + link sync, then the saved decision
    w.at(delay, "complete", (key, decision, icc, 0))


def reader_complete(w: Any, key: str, decision: CardDecision, icc: bytes, attempt: int) -> None:
    """The simulated reader sends COMPLETE (again, sometimes: its RESULT was lost)."""
    if w.engine is None:
        w.at(1.0, "complete", (key, decision, icc, attempt))
        return
    w.log(f"reader COMPLETE {key[-6:]} {decision.value} attempt {attempt}")
    w.terminal("complete", key, decision, icc)
    if attempt < 2 and w.chip_rng.random() < w.cfg.resend_rate:
        w.at(w.chip_rng.uniform(0.1, 10.0), "complete", (key, decision, icc, attempt + 1))


# ---------------------------------------------------------------------------- the reference reader


def auth_message(card: CardData, txn_id: bytes, amount: int, currency: str, reader_id: str) -> Auth:
    """The AUTH a reader sends for ``card`` (PROTOCOL.md section 12.1)."""
    return Auth(txn_id, amount, currency, card.pan, card.expiry or None, reader_id,
                entry_mode=card.entry_mode or None, pan_seq=card.pan_seq or None, track2=card.track2 or None,
                icc=card.icc or None, pin_block=card.pin_block or None, ksn=card.ksn or None)


Answer = ResultMessage | ErrorMessage


def present(reader: Any, model: CardModel, txn_id: bytes, amount: int, currency: str, pan: str, expiry: str,
            rng: random.Random, timeout: float = 30.0) -> tuple[Answer, Answer | None]:
    """A sale with ``model`` on a ``ReaderSim``: AUTH, then, when the guard answers
    AWAITING_COMPLETION, the card's decision as COMPLETE (after a reboot and link sync for the
    REBOOT* behaviours; none at all for REBOOT). Returns the AUTH's answer and COMPLETE's."""
    card = card_data(model, pan, expiry, amount, currency, rng)
    first = reader.transact(auth_message(card, txn_id, amount, currency, reader.reader_id), timeout)
    if not (isinstance(first, ResultMessage) and first.state is TxnState.AWAITING_COMPLETION):
        return first, None
    if model.behaviour in (REBOOT, REBOOT_RESEND):
        reader.reboot()
        reader.sync(timeout=timeout)
    decision = model.decision
    if model.behaviour == REBOOT or decision is None:
        return first, None
    return first, reader.complete(txn_id, decision.value, final_icc(decision, 1, rng), timeout)
