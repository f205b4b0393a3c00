"""The one registry of error codes: each stable code, who acts on it, and what it means.

A code's audience names the doc its user reads, which lists it (tests/test_error_codes.py checks
that every code raised anywhere is registered here and listed in that doc).
"""

from __future__ import annotations

import enum

READER = "firmware_bridge/PROTOCOL.md"  # firmware integrators: ERROR messages, link errors
HOST = "docs/HOST.md"  # acquirers: what posguard does with their bytes
OPERATOR = "docs/OPERATIONS.md"  # operators and auditors: CLI, config, journal, keys


@enum.unique
class ErrorCode(enum.Enum):
    """A stable error code (the member's name); ``audience`` is the doc that lists it."""

    def __init__(self, audience: str, meaning: str) -> None:
        self.audience = audience
        self.meaning = meaning

    @property
    def code(self) -> str:
        return self.name

    def __str__(self) -> str:
        return self.name

    # -- reader link: frames (the receiver drops the frame, answers NAK; never reaches the app)
    FRAME_GAP = READER, "T1 (200 ms) or more between two bytes of a frame: the frame is dropped."
    FRAME_ABORTED = READER, "`10 02` inside a frame: the partial frame is dropped, the new one is read."
    FRAME_BAD_ESCAPE = READER, "`10` followed by a byte other than `10`, `02`, `03`."
    FRAME_TOO_LONG = READER, "more than 10 + 512 body bytes before `10 03`."
    FRAME_TOO_SHORT = READER, "fewer than the 10 header bytes."
    FRAME_BAD_CRC = READER, "CRC mismatch: line noise; the sender retransmits."
    FRAME_BAD_VERSION = READER, "header version is not 01."
    FRAME_BAD_LENGTH = READER, "length field differs from the payload bytes received."
    FRAME_BAD_TYPE = READER, "frame type not in the frame-type table."
    FRAME_BAD_FIELD = READER, "a frame the sender built has a header field out of range (sender bug)."
    FRAME_ERROR = READER, "a frame could not be decoded (generic: one of the FRAME_* codes applies)."
    # -- reader link: link layer
    LINK_ERROR = READER, "the serial link failed (generic link error)."
    LINK_PAYLOAD_TOO_LONG = READER, "a message longer than 512 bytes was given to the link to send."
    LINK_QUEUE_FULL = READER, "too many messages are queued for a link that is not draining: resync the link."
    READER_TIMEOUT = READER, "the reader simulator waited for an answer past its application timer."
    READER_PORT_UNAVAILABLE = OPERATOR, "the reader's serial port cannot be opened or failed (the daemon retries it): check reader.url and the cable."
    # -- reader messages (ERROR message, CODE tag)
    MSG_INVALID = READER, "the payload is not a valid message (generic: one of the MSG_* codes applies)."
    MSG_TRUNCATED = READER, "a TLV runs past the end of the payload."
    MSG_TOO_LONG = READER, "an encoded message exceeds the 512-byte payload limit."
    MSG_DUPLICATE_TAG = READER, "a tag appears twice in one message."
    MSG_MISSING_TAG = READER, "a mandatory tag of the message type is missing."
    MSG_CONFLICTING_TAGS = READER, "tags that exclude each other are both present (e.g. STATUS with TXN_ID and LAST)."
    MSG_UNKNOWN_TYPE = READER, "the message type is not one the guard accepts from a reader."
    MSG_BAD_VALUE = READER, "a tag's value has the wrong length or format."
    MSG_CLEAR_PAN = READER, "a card number appeared in a tag that must never carry one: the message is refused."
    MSG_NOT_A_REQUEST = READER, "the reader sent a message only the guard may send (RESULT, PROGRESS, ...)."
    MSG_READER_MISMATCH = READER, "READER_ID differs from the reader id configured for this port."
    REQUEST_INVALID = READER, "the request is malformed (generic: one of the REQUEST_* codes applies)."
    REQUEST_BAD_AMOUNT = READER, "amount is not a positive number of minor units within the limit."
    REQUEST_BAD_CURRENCY = READER, "currency is not a 3-digit ISO 4217 numeric code."
    REQUEST_BAD_PAN = READER, "card number missing, not 12-19 digits, or failing the Luhn check (mistyped or misread)."
    REQUEST_BAD_EXPIRY = READER, "expiry is not YYMM."
    REQUEST_BAD_READER = READER, "reader id is empty, too long or not printable ASCII."
    REQUEST_BAD_TXN_ID = READER, "transaction id is not 16 bytes."
    REQUEST_BAD_EMV = READER, ("entry mode, card sequence number, track 2 equivalent (PAN, D, digits, <= 37, same PAN), "
                               "PIN block (8 bytes) or KSN (10 bytes, with the PIN block) is malformed.")
    REQUEST_ICC_MALFORMED = READER, "ICC data is not strict BER-TLV (PROTOCOL.md §12.3); nothing was sent to the host."
    REQUEST_ICC_TOO_LONG = READER, "ICC data is longer than 255 bytes; nothing was sent to the host."
    REQUEST_ICC_FORBIDDEN_TAG = READER, ("ICC data holds a tag that must not travel in it (5A, 57, 5F20, 9F1F, 9F20, "
                                         "56, 9F6B: PAN, track or cardholder data); nothing was sent to the host.")
    IDEMPOTENCY_MISMATCH = READER, "the transaction id was already used for a different request: use a new id."
    TXN_UNKNOWN = READER, "STATUS or CONFIRM names a transaction id the guard has never journaled."
    NOTHING_HELD = READER, "CONFIRM or CANCEL names a transaction that is not held for the operator."
    SIGNATURE_NOT_REQUIRED = READER, "SIGNED names a transaction that awaits no signature."
    VOID_NOT_ALLOWED = READER, "only an APPROVED sale with no live refund, same amount and currency, can be voided."
    REFUND_NEEDS_ORIGINAL = READER, "a refund must name its original sale (ORIGINAL_TXN_ID)."
    REFUND_ORIGINAL_UNKNOWN = READER, "the refund's original sale is not known on this terminal."
    REFUND_ORIGINAL_PENDING_REVERSAL = READER, "the original sale is being reversed: the money goes back without a refund."
    REFUND_NOT_ALLOWED = READER, "only an APPROVED, not voided sale in the same currency can be refunded."
    REFUND_CARD_MISMATCH = READER, "a refund goes back to the card of the original sale."
    REFUND_EXCEEDS_ORIGINAL = READER, "the refunds would exceed what is left of the original sale."
    # -- host link
    HOST_PROTOCOL = HOST, "bytes or a message from the host cannot be used (generic)."
    HOST_FRAME_TRUNCATED = HOST, "the connection ended inside a length-prefixed frame."
    HOST_BAD_LENGTH = HOST, "a frame length prefix is zero or over the maximum: framing is lost, the link is reset."
    HOST_BAD_TPDU = HOST, "the TPDU header is not a response TPDU for this terminal."
    HOST_UNDECODABLE = HOST, "the message does not decode under the configured host.spec."
    HOST_BAD_MTI = HOST, "the MTI is not one posguard routes (02xx, 04xx, 08xx responses)."
    HOST_ENCODE_INVALID = HOST, "a message posguard builds does not fit the host spec (nothing is sent)."
    # -- configuration
    CONFIG_INVALID = OPERATOR, "a config key is missing, malformed or unsafe: the message names the key."
    CONFIG_TERMINAL_ID = OPERATOR, "terminal_id (field 41) must be exactly 8 printable ASCII characters."
    CONFIG_MERCHANT_ID = OPERATOR, "merchant_id (field 42) must be exactly 15 printable ASCII characters."
    CONFIG_SIGNATURE_INVALID = OPERATOR, "the config's signature does not verify with config.pub: re-sign it."
    CONFIG_FILE_CHANGED = OPERATOR, "a file the signed config names (CA, client cert or key, spec) changed after signing."
    CONFIG_CHANGED_UNSIGNED = OPERATOR, "ids, host, trust files or money limits changed since the last start, unsigned: posguard config sign."
    CONFIG_SIGN_FAILED = OPERATOR, "posguard config sign could not write the signature file."
    # -- journal
    JOURNAL_ERROR = OPERATOR, "the journal failed (generic: one of the JOURNAL_* codes applies)."
    JOURNAL_MISSING = OPERATOR, "the journal file does not exist at the path given."
    JOURNAL_EXISTS = OPERATOR, "refusing to create a journal over an existing file."
    JOURNAL_CREATE_FAILED = OPERATOR, "the journal could not be created (directory missing, read-only, full)."
    JOURNAL_NOT_A_FILE = OPERATOR, "the journal path is not a regular file."
    JOURNAL_NOT_INITIALISED = OPERATOR, "the file is not an initialised posguard journal."
    JOURNAL_IS_ARCHIVE = OPERATOR, "the file is a sealed archive, not a live journal: give the live file."
    JOURNAL_TERMINAL_MISMATCH = OPERATOR, "the journal belongs to another terminal id than the config's."
    JOURNAL_KEY_MISMATCH = OPERATOR, "the journal's checkpoints were signed by another key (keys re-provisioned?)."
    JOURNAL_RATCHET_MISMATCH = OPERATOR, "the MAC ratchet state does not follow the last entry: refusing to append."
    JOURNAL_SCHEMA_TOO_NEW = OPERATOR, "the journal was written by a newer posguard: upgrade."
    JOURNAL_CORRUPT = OPERATOR, "an entry cannot be read or replayed: run posguard journal verify to find it."
    JOURNAL_SCHEMA_UNEXPECTED = OPERATOR, "the file's schema is not what posguard writes (a view, an extra trigger): refused."
    JOURNAL_BAD_RECORD = OPERATOR, "a writer offered a record the journal refuses (unknown kind, missing key, card data)."
    JOURNAL_NOT_DURABLE = OPERATOR, "SQLite did not confirm WAL mode with synchronous=FULL: refusing to run."
    JOURNAL_WRITE_FAILED = OPERATOR, "a commit failed (disk full, I/O error): nothing that depends on it was sent."
    JOURNAL_FAILED = OPERATOR, "an earlier commit failed; the process must reopen the journal (restart)."
    JOURNAL_NO_K0 = OPERATOR, "creating a journal needs k0 (the provisioning key): run posguard keys init first."
    JOURNAL_CLOSED = OPERATOR, "the journal was used after it was closed (programming error)."
    JOURNAL_BUSY = OPERATOR, "another process holds the journal (daemon, replay, compact, rotate): stop it first."
    JOURNAL_WAL_READ_ONLY = OPERATOR, "a journal on read-only media has a non-empty -wal: copy both files to writable storage."
    VAULT_CORRUPT = OPERATOR, "an encrypted vault blob fails authentication: the vault key or the file changed."
    ARCHIVE_UNAVAILABLE = OPERATOR, "a transaction's archive cannot be read: put the archive back."
    ANCHOR_UNREADABLE = OPERATOR, "the --anchor file is not a JSON checkpoint from posguard journal anchor."
    # -- keys
    KEY_FILE_INVALID = OPERATOR, "a key or certificate file cannot be loaded."
    KEY_MISSING = OPERATOR, "a key directory or key file is missing."
    KEY_MALFORMED = OPERATOR, "a key file has the wrong length or format."
    KEY_PERMISSIONS = OPERATOR, "a key file or directory is readable or writable by group/others: chmod 600/700."
    KEY_EXISTS = OPERATOR, "refusing to overwrite existing keys."
    KEY_WRITE_FAILED = OPERATOR, "keys could not be written (directory read-only or full)."
    KEY_ROTATION_PENDING = OPERATOR, "a key rotation was interrupted: finish it with posguard keys rotate."
    # -- operator tools
    EXPORT_INVALID = OPERATOR, "journal export/show arguments are invalid (generic)."
    EXPORT_BAD_SINCE = OPERATOR, "--since is neither a seq number nor an ISO date/time."
    EXPORT_BAD_STATE = OPERATOR, "--state names an unknown transaction state."
    EXPORT_READ_ONLY = OPERATOR, "a read-only journal view was asked to change something (programming error)."
    SETTLEMENT_INVALID = OPERATOR, "the settlement CSV is malformed: the message names the line and column."
    REPLAY_ERROR = OPERATOR, "posguard replay failed (generic)."
    REPLAY_FORBIDDEN_MTI = OPERATOR, "replay refused to send a message that is not an advice, reversal or echo."
    # -- fleet (many terminals on PostgreSQL: docs/FLEET.md)
    FLEET_ERROR = OPERATOR, "a posguard fleet command cannot run (database unreachable or not initialised)."
    FLEET_UNKNOWN_TERMINAL = OPERATOR, "an upload names a terminal the fleet has no enrolled keys for (or other keys)."
    FLEET_FILE_INVALID = OPERATOR, "an uploaded file is not a readable posguard journal or archive."
    FLEET_GAP = OPERATOR, "an upload starts after the next entry the fleet expects: upload the archive first."
    FLEET_FORK = OPERATOR, "an upload holds another entry than the fleet accepted for the same seq."
    FLEET_ROLLBACK = OPERATOR, "a live journal ends before what the fleet already accepted: rolled back."
    FLEET_ENTRY_INVALID = OPERATOR, "a new entry fails verification (modified, MAC, chain, checkpoint, segment)."
    FLEET_CERT_MISMATCH = OPERATOR, "fleet serve: the uploaded journal is another terminal's than the client certificate's."
    FLEET_VERIFY_FAILED = OPERATOR, "fleet verify found a stored entry that no longer verifies."
    POSGUARD_ERROR = OPERATOR, "an error without a more specific code."


def is_registered(code: str) -> bool:
    return code in ErrorCode.__members__


def doc_table(audience: str) -> str:
    """The markdown table of the codes a doc lists (generated; tests keep the docs equal to it)."""
    rows = [f"| `{c.name}` | {c.meaning} |" for c in ErrorCode if c.audience == audience]
    return "\n".join(["| code | meaning |", "|---|---|", *rows])
