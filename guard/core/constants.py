"""Protocol facts and tunable defaults, in one place, each with where it comes from.

Anything that is a fact of ISO 8583, the reader link or the journal format lives here, named,
so that the engine, the uplink, the simulators and the docs agree.
"""

from __future__ import annotations

from typing import Final

# --- ISO 8583 message type indicators (ISO 8583:1987 message classes; docs/HOST.md) ---
MTI_FIN_REQUEST: Final = "0200"
MTI_FIN_REPEAT: Final = "0201"  # never sent by posguard: a timed-out sale is reversed, not repeated
MTI_FIN_RESPONSE: Final = "0210"
MTI_ADVICE: Final = "0220"  # deferred (offline) sale forwarded later
MTI_ADVICE_RESPONSE: Final = "0230"
MTI_REVERSAL: Final = "0400"
MTI_REVERSAL_REPEAT: Final = "0401"
MTI_REVERSAL_RESPONSE: Final = "0410"
MTI_NET_REQUEST: Final = "0800"
MTI_NET_RESPONSE: Final = "0810"

# --- ISO 8583 field numbers (pyiso8583 keys are strings) ---
F_PAN: Final = "2"
F_PROC_CODE: Final = "3"
F_AMOUNT: Final = "4"
F_TRANSMISSION_DT: Final = "7"  # MMDDhhmmss, UTC
F_STAN: Final = "11"  # 000001-999999, unique per terminal (41) + merchant (42) per day
F_LOCAL_TIME: Final = "12"  # hhmmss
F_LOCAL_DATE: Final = "13"  # MMDD
F_EXPIRY: Final = "14"  # YYMM
F_POS_ENTRY_MODE: Final = "22"  # n3: entry mode (2 digits) + PIN entry capability (1 digit)
F_CARD_SEQ: Final = "23"  # n3: card sequence number (EMV tag 5F34)
F_TRACK2: Final = "35"  # z..37: track 2 equivalent data (EMV tag 57)
F_PIN_BLOCK: Final = "52"  # b8: online PIN block
F_KSN: Final = "62"  # default field for the PIN block's DUKPT KSN (20 hex); host profile: host.ksn_field
F_ICC: Final = "55"  # b..255: ICC data, BER-TLV (request: the card's; 0210: the issuer's, tags 91/71/72)
F_RRN: Final = "37"  # set by the acquirer
F_APPROVAL_CODE: Final = "38"
F_RESPONSE_CODE: Final = "39"
F_TERMINAL_ID: Final = "41"  # ans 8
F_MERCHANT_ID: Final = "42"  # ans 15
F_CURRENCY: Final = "49"
F_ADDITIONAL_AMOUNTS: Final = "54"  # an..120: blocks of type(2)+code(2)+currency(3)+C/D(1)+amount(12)
F_NET_MGMT_CODE: Final = "70"
F_ORIGINAL_DATA: Final = "90"  # ISO 1987 n42: MTI(4)+STAN(6)+F7(10)+acq id(11)+fwd id(11)

# ISO 8583:1987 lengths of the host-sent fields the journal records (MTI n4, 11 n6, 37 an12,
# 38 an6, 39 an2). A longer value (possible only with a custom host.spec) makes the message
# malformed; none of them can then carry a 13+ digit card number into the journal.
HOST_FIELD_MAX_LEN: Final = {"t": 4, "11": 6, "37": 12, "38": 6, "39": 2, "55": 510}

# Fields a response must echo unchanged (PayEx IFSF "ME" rule): a difference means "not ours".
ECHO_FIELDS: Final = (F_AMOUNT, F_STAN, F_TERMINAL_ID, F_MERCHANT_ID)

PROC_PURCHASE: Final = "000000"
PROC_REFUND: Final = "200000"
PROC_VOID: Final = "020000"
NET_SIGN_ON: Final = "001"
NET_ECHO: Final = "301"
# posguard-defined (field 70 codes 8xx are left to private agreements): deposit a signed journal
# checkpoint with the host, carried in field 48 as canonical JSON, so an anchor is held elsewhere.
NET_CHECKPOINT: Final = "880"
F_PRIVATE_DATA: Final = "48"  # ans..999

STAN_MIN: Final = 1
STAN_MAX: Final = 999_999

# --- Response codes handled explicitly (ISO 8583:1987 field 39) ---
RC_APPROVED: Final = "00"
RC_INVALID_MERCHANT: Final = "03"
RC_DO_NOT_HONOUR: Final = "05"
RC_ORIGINAL_NOT_FOUND: Final = "25"  # reversal: "unable to locate original" -> nothing to undo
RC_INSUFFICIENT_FUNDS: Final = "51"
RC_NOT_PERMITTED_TERMINAL: Final = "58"
RC_FREQUENCY_EXCEEDED: Final = "65"
RC_TOO_LATE: Final = "68"
RC_ISSUER_UNAVAILABLE: Final = "91"
RC_DUPLICATE: Final = "94"  # "already processed": never a new charge
RC_SYSTEM_MALFUNCTION: Final = "96"

# A 0410 with one of these means the original no longer holds a debit.
REVERSAL_DONE_CODES: Final = frozenset({RC_APPROVED, RC_ORIGINAL_NOT_FOUND, RC_DUPLICATE})

# --- Response-code classes of a 0210 (the default host profile; [host.response_codes] overrides) ---
# ISO 8583:1987 field 39: 00 approved, 08 honour with identification, 11 approved (VIP), 16
# approved, update track 3 all move money; 10 approves a partial amount. The explicit declines
# below are the ISO 8583:1987 table's "do not honour / refer / invalid / lost / insufficient"
# family, as Nexi GICC and the PayEx IFSF host spec use them. Everything else (06, 09 "in
# progress", 19 "re-enter", 68, 90, 91, 92, 96, codes no table lists) cannot be proven to leave
# no debit: the sale is reversed (fail safe), and the reader is told "not charged".
RC_APPROVED_CLASS: Final = frozenset({"00", "08", "11", "16"})
RC_PARTIAL_CLASS: Final = frozenset({"10"})
RC_DECLINED_CLASS: Final = frozenset({
    "01", "02", "03", "04", "05", "07", "12", "13", "14", "15", "30", "41", "43", "51", "54", "55", "57", "58",
    "61", "62", "65", "75",
})
RC_DUPLICATE_CLASS: Final = frozenset({RC_DUPLICATE})

# --- Response MTI for each request MTI (third digit 0 -> 1, 2 -> 3; a 0401 may be answered 0411) ---
RESPONSE_MTIS: Final = {
    "0200": frozenset({"0210"}),
    "0220": frozenset({"0230"}),
    "0400": frozenset({"0410", "0411"}),
    "0401": frozenset({"0410", "0411"}),
    "0800": frozenset({"0810"}),
}

# --- STANs: unique per terminal and UTC day, even across a replaced or restored journal ---
# A STAN is never below the clock's floor for the moment it is drawn: 1 + 11 per second since UTC
# midnight (950,401 at 23:59:59). A journal started afresh begins at the floor, so it cannot
# reuse a STAN its predecessor drew earlier that day unless that one ran more than 11 STANs a
# second ahead of the clock (docs/HOST.md, "STANs").
STAN_FLOOR_PER_SECOND: Final = 11

# --- Timers and retry policy (defaults; all overridable in config) ---
HOST_TIMEOUT_S: Final = 30.0  # typical acquirer response timeout for 0200
REVERSAL_TIMEOUT_S: Final = 30.0
REVERSAL_MAX_ATTEMPTS: Final = 6  # explicit refusals (0410 not done) before manual action (PayEx IFSF: 6)
REVERSAL_MAX_AGE_S: Final = 86_400.0  # jPOS-EE SAF expire-after: repeat an unanswered reversal for a day
REVERSAL_BACKOFF_BASE_S: Final = 1.0
REVERSAL_BACKOFF_MAX_S: Final = 60.0
SAF_WINDOW: Final = 8  # reversals in flight at once, matched by STAN
ECHO_IDLE_S: Final = 60.0  # 0800/301 keepalive when the link is idle
LATE_RESPONSE_KEEP_S: Final = 120.0  # jPOS QMUX keeps unhandled responses 120 s

# --- Host framing ---
HOST_HEADER_BINARY2: Final = "binary2"  # 2-byte big-endian length (most common)
HOST_HEADER_ASCII4: Final = "ascii4"  # 4 ASCII decimal digits
HOST_HEADERS: Final = (HOST_HEADER_BINARY2, HOST_HEADER_ASCII4)
TPDU_LEN: Final = 5  # 0x60 + dest(2) + source(2); the response swaps dest and source
TPDU_ID: Final = 0x60
HOST_MAX_MESSAGE: Final = 8192  # larger lengths are a framing error, not an allocation

# --- Journal ---
JOURNAL_SCHEMA_VERSION: Final = 1
JOURNAL_HASH_DOMAIN: Final = b"posguard.entry.v1"
JOURNAL_RATCHET_LABEL: Final = b"posguard.ratchet.v1"
CHECKPOINT_DOMAIN: Final = b"posguard.checkpoint.v1"
CHECKPOINT_EVERY_ENTRIES: Final = 256
CHECKPOINT_EVERY_S: Final = 300.0  # seal even when idle (journald CVE-2023-31438 lesson)
GENESIS_HASH: Final = bytes(32)

# --- Card data (PCI DSS v4.0.1 3.4.1: show at most BIN + last 4) ---
MASK_KEEP_FIRST: Final = 6
MASK_KEEP_LAST: Final = 4

# --- Settlement report (the acquirer's CSV: guard.ops.reconcile reads it, the host simulator writes it) ---
SETTLEMENT_COLUMNS: Final = ("date", "tid", "mid", "stan", "rrn", "amount", "type", "response")
SETTLE_SALE: Final = "SALE"  # a 0200/0201/0220/0221 the host processed, whatever the answer
SETTLE_REFUND: Final = "REFUND"  # the same with processing code 20xxxx: a credit
SETTLE_REVERSAL: Final = "REVERSAL"  # carries the original sale's STAN and date

# POS entry mode (field 22) per emv.EntryMode: ISO 8583:1987 entry digits (01 manual, 90 full
# magnetic stripe, 05 chip, 07 contactless chip, 80 chip fallback to stripe) + "1" (terminal can
# accept a PIN). Acquirer specs vary: the host profile may override (EngineConfig.entry_mode_codes).
POS_ENTRY_CODES: Final = {"MANUAL": "011", "MAGSTRIPE": "901", "CHIP": "051", "CONTACTLESS": "071", "FALLBACK": "801"}
# How long a chip sale approved by the host waits for the reader's COMPLETE before it is reversed.
# Above the reader's worst reboot (PROTOCOL.md: COMPLETE after a reboot) and an EMV kernel's second
# GENERATE AC (well under 5 s), below a cashier's patience.
COMPLETION_TIMEOUT_S: Final = 60.0
