"""systemd journal JSON exports (``journalctl -o json``) → RFC 3339 syslog lines.

On systemd hosts without a syslog daemon (Debian 12 by default) Postfix logs only to the
journal, and ``journalctl -u postfix@- -o json`` writes one JSON object per entry and line.
This module turns each such record into the syslog line the Postfix parser already reads::

    {stamp} {_HOSTNAME} {SYSLOG_IDENTIFIER}[{pid}]: {MESSAGE}
    2023-11-14T22:13:20.123456Z mx1 postfix/smtp[4242]: 3F2A1C0D1E: to=<…>, relay=…

Journal fields used (systemd.journal-fields(7); JSON encoding per systemd's "Journal JSON
Format", https://systemd.io/JOURNAL_EXPORT_FORMATS/):

* ``_SOURCE_REALTIME_TIMESTAMP``: when the *client* logged the message (for syslog
  transport, the time journald received the datagram), microseconds since the Unix epoch
  as a decimal string.  Preferred.
* ``__REALTIME_TIMESTAMP``: when journald wrote the entry, same unit; used when the
  former is missing.
* ``_HOSTNAME``: the host that wrote the entry (``-``, the RFC 5424 nil value, when missing:
  the Postfix header needs a non-space token there).
* ``SYSLOG_IDENTIFIER``: the syslog tag, for Postfix its ``syslog_name/daemon``
  (``postfix/smtp``, ``postfix-out2/qmgr``); ``_COMM`` (the process name), then ``-``, when
  missing.
* ``SYSLOG_PID`` (the pid the client put in its syslog header), else ``_PID`` (the pid
  journald saw); ``[pid]`` is left out when neither is present.
* ``MESSAGE``: the text.  journald writes a value that is not printable UTF-8 as an array of
  byte values (``"MESSAGE":[72,105,255]``); those are decoded here, vectorized, invalid
  bytes becoming U+FFFD exactly as Python's ``bytes.decode("utf-8", "replace")`` does.
  Newlines and carriage returns become spaces (one output line per input line), NULs U+FFFD.

Lines left unchanged (the Postfix parser then counts them as malformed or skipped, never
loses them): lines that are not a JSON object (blank, truncated, garbage, ``-o json-pretty``
fragments), records without ``MESSAGE`` or with ``"MESSAGE":null`` (journalctl writes null
for fields over 4096 bytes unless run with ``--all``), records without a numeric timestamp,
and records where one of the fields above has several values (journald then writes an
array of strings; syslog-transport entries never do).

The key order of a record does not matter: older journalctl writes
``{ "__CURSOR" : "…", "__REALTIME_TIMESTAMP" : "…", … }`` (address fields first, spaces
around the colons), systemd ≥ 254 compact ``{"_COMM":"smtp",…}`` in hash order.
"""

from __future__ import annotations

import re

import polars as pl

# --- detection on a file head --------------------------------------------------------------

# A record line: starts with "{" and names a realtime timestamp and MESSAGE, in any order.
_RECORD_RE = re.compile(
    r"(?m)^[ \t]*\{"
    r'(?=[^\n]*"(?:__|_SOURCE_)REALTIME_TIMESTAMP"[ \t]*:[ \t]*"\d)'
    r'(?=[^\n]*"MESSAGE"[ \t]*:)'
)
_POSTFIX_RECORD_RE = re.compile(
    r"(?m)^[ \t]*\{"
    r'(?=[^\n]*"(?:__|_SOURCE_)REALTIME_TIMESTAMP"[ \t]*:[ \t]*"\d)'
    r'(?=[^\n]*"MESSAGE"[ \t]*:)'
    r'(?=[^\n]*"SYSLOG_IDENTIFIER"[ \t]*:[ \t]*"postfix)'
)


def is_journal_json(text: str) -> bool:
    """True when ``text`` (the first 64 KiB of a file) holds ``journalctl -o json`` records:
    a line that is a JSON object naming ``__REALTIME_TIMESTAMP`` (or
    ``_SOURCE_REALTIME_TIMESTAMP``) with a numeric string value, and ``MESSAGE``.  A regex
    on the head; nothing is parsed."""
    return _RECORD_RE.search(text) is not None


def journal_postfix(text: str) -> bool:
    """True when such a head has a record whose ``SYSLOG_IDENTIFIER`` starts with
    ``postfix`` (``postfix/smtp``, ``postfix-out2/qmgr`` …)."""
    return _POSTFIX_RECORD_RE.search(text) is not None


# --- conversion ----------------------------------------------------------------------------

# Fields read from each record, all as strings (journald writes every value as a JSON string).
FIELDS = ("__REALTIME_TIMESTAMP", "_SOURCE_REALTIME_TIMESTAMP", "_HOSTNAME", "SYSLOG_IDENTIFIER", "_COMM", "SYSLOG_PID", "_PID", "MESSAGE")
_SCHEMA = pl.Struct({f: pl.String for f in FIELDS})
# MESSAGE written as bytes; the array is cut out (and replaced by null) before decoding,
# because a String field of the decode schema cannot take an array.
_BYTES_RE = r'"MESSAGE"\s*:\s*\[([0-9,\s]*)\]'
# any of the fields above holding an array (several values) once byte MESSAGEs are cut out
_ARRAY_FIELD_RE = r'"(?:' + "|".join(FIELDS) + r')"\s*:\s*\['


DECODE_CHUNK = 2048  # rows per chunk of the decoded column


def _chunked(s: pl.Series, rows: int = DECODE_CHUNK) -> pl.Series:
    """``s`` as chunks of ``rows`` rows (zero-copy slices).  polars decodes the chunks of a
    column in parallel, and a small chunk is decoded faster per row than a large one
    (1M records of 1.1 kB: 1.2 s in chunks of 1,000 rows, 5-7 s as one chunk)."""
    if s.len() <= rows:
        return s.rechunk()
    return pl.concat([s.slice(i, rows) for i in range(0, s.len(), rows)], rechunk=False)


def _decode(json: pl.Series) -> pl.DataFrame:
    """The :data:`FIELDS` of each JSON object of ``json`` (null rows stay null).  One
    vectorized decode; only when that fails (a line that is not valid JSON) is the series
    split in 16 parts, each decoded the same way (recursively), so the bad lines end up
    null and the rest decode: about three decodes of the series for a hundred bad lines."""
    try:
        return pl.DataFrame({"j": json}).select(pl.col("j").str.json_decode(_SCHEMA)).unnest("j")
    except pl.exceptions.ComputeError:
        n = json.len()
        if n <= 1:
            return pl.DataFrame({f: [None] * n for f in FIELDS}, schema={f: pl.String for f in FIELDS})
        step = -(-n // 16)
        return pl.concat([_decode(json.slice(i, step)) for i in range(0, n, step)])


_HEX = [f"{b:02x}" for b in range(256)]
_FFFD_HEX = "efbfbd"


def _utf8_lossy(byte_lists: pl.Series) -> pl.Series:
    """``"72,105,255"`` (the inside of a journald byte array) → ``"Hi\\ufffd"``, vectorized.

    Bytes of valid UTF-8 sequences (RFC 3629, Unicode table 3-7: no overlong forms, no
    surrogates, nothing above U+10FFFF) are kept; every other byte becomes U+FFFD, except
    that a truncated sequence (a lead byte and the continuation bytes that fit it) becomes a
    single U+FFFD, as Python's ``bytes.decode("utf-8", "replace")`` does.  The kept bytes
    and replacements are joined as hex and decoded.  A list with a value that is not a
    byte (not a number, or above 255) gives null."""
    n = byte_lists.len()
    empty = byte_lists.str.strip_chars() == ""
    ex = (
        pl.DataFrame({"row": pl.int_range(n, eager=True, dtype=pl.UInt32), "b": byte_lists.str.split(",")})
        .filter(~empty)
        .explode("b")
        .with_columns(pl.col("b").str.strip_chars().replace("", None).cast(pl.Int32, strict=False))
    )
    b, row = pl.col("b"), pl.col("row")

    def nxt(k: int) -> pl.Expr:  # the k-th byte after this one in the same message (else null)
        return pl.when(row.shift(-k) == row).then(b.shift(-k))

    def cont(e: pl.Expr, lo: int = 0x80, hi: int = 0xBF) -> pl.Expr:
        return e.is_between(lo, hi).fill_null(False)

    n1, n2, n3 = nxt(1), nxt(2), nxt(3)
    # length of the valid sequence starting at this byte (0: none starts here)
    length = (
        pl.when(b.is_between(0, 0x7F)).then(1)
        .when(b.is_between(0xC2, 0xDF) & cont(n1)).then(2)
        .when((b == 0xE0) & cont(n1, 0xA0) & cont(n2)).then(3)
        .when((b.is_between(0xE1, 0xEC) | b.is_between(0xEE, 0xEF)) & cont(n1) & cont(n2)).then(3)
        .when((b == 0xED) & cont(n1, 0x80, 0x9F) & cont(n2)).then(3)
        .when((b == 0xF0) & cont(n1, 0x90) & cont(n2) & cont(n3)).then(4)
        .when(b.is_between(0xF1, 0xF3) & cont(n1) & cont(n2) & cont(n3)).then(4)
        .when((b == 0xF4) & cont(n1, 0x80, 0x8F) & cont(n2) & cont(n3)).then(4)
        .otherwise(0)
    )
    # bytes of a truncated sequence (a lead byte and the continuation bytes that fit it):
    # its "maximal subpart" is replaced by one U+FFFD, as Python's errors="replace" and
    # polars' utf8-lossy reading do
    c1 = (
        pl.when(b == 0xE0).then(cont(n1, 0xA0))
        .when(b == 0xED).then(cont(n1, 0x80, 0x9F))
        .when(b == 0xF0).then(cont(n1, 0x90))
        .when(b == 0xF4).then(cont(n1, 0x80, 0x8F))
        .when(b.is_between(0xE1, 0xF3)).then(cont(n1))
        .otherwise(False)
    )
    prefix = (
        pl.when(b.is_between(0xC2, 0xF4))
        .then(1 + c1.cast(pl.Int32) + (c1 & b.is_between(0xF0, 0xF4) & cont(n2)).cast(pl.Int32))
        .otherwise(0)
    )
    ex = ex.with_columns(length.alias("_len"), prefix.alias("_pre"))
    ln, pre = pl.col("_len"), pl.col("_pre")

    def before(col: pl.Expr, k: int) -> pl.Expr:  # value k bytes earlier in the same message, else 0
        return pl.when(row.shift(k) == row).then(col.shift(k)).fill_null(0)

    valid = (ln > 0) | (before(ln, 1) >= 2) | (before(ln, 2) >= 3) | (before(ln, 3) >= 4)
    in_subpart = (ln == 0) & ((before(ln, 1) == 0) & (before(pre, 1) >= 2) | (before(ln, 2) == 0) & (before(pre, 2) >= 3))
    hexed = (
        pl.when(valid).then(b.replace_strict(list(range(256)), _HEX, default=None))
        .when(in_subpart).then(pl.lit(""))
        .otherwise(pl.lit(_FFFD_HEX))
    )
    out = (
        ex.with_columns(hexed.alias("_hex"), (b.is_null() | (b > 255) | (b < 0)).alias("_bad"))
        .group_by("row", maintain_order=True)
        .agg(pl.col("_hex").str.join(""), pl.col("_bad").any())
    )
    text = out.select(pl.when(~pl.col("_bad")).then(pl.col("_hex").str.decode("hex").cast(pl.String)).alias("text"))
    # back to one value per input row; an empty array ("MESSAGE":[]) is an empty message
    full = pl.DataFrame({"row": pl.int_range(n, eager=True, dtype=pl.UInt32)}).join(
        pl.concat([out.select("row"), text], how="horizontal"), on="row", how="left", maintain_order="left"
    )
    return full.select(pl.when(empty).then(pl.lit("")).otherwise(pl.col("text"))).to_series().alias("bytes")


def _json_column(df: pl.DataFrame) -> tuple[pl.Series | None, pl.Series | None, pl.Series | None]:
    """The text to decode for each row of ``df`` (null: not a record; None: no record at
    all), and, when some records write MESSAGE as bytes, the row mask and the byte lists of
    those records."""
    line = pl.col("line")
    flags = df.select(
        # a JSON object on one line (journalctl writes no surrounding blanks)
        cand=line.str.starts_with("{") & line.str.ends_with("}"),
        # rare shapes, found with literal searches: a byte-array MESSAGE, or a field with
        # several values
        arr=line.str.contains('":[', literal=True) | line.str.contains('" : [', literal=True),
    )
    cand = flags.get_column("cand").fill_null(False)
    arr = cand & flags.get_column("arr").fill_null(False)
    if not cand.any():
        return None, None, None
    if cand.all() and not arr.any():
        return df.get_column("line"), None, None
    json = df.select(pl.when(cand & ~arr).then(line)).to_series()
    if not arr.any():
        return json, None, None
    sub = df.filter(arr).select(
        line.str.extract(_BYTES_RE, 1).alias("bytes"),
        line.str.replace(_BYTES_RE, '"MESSAGE":null').alias("json"),
    )
    # a field of FIELDS still holding an array has several values: not converted
    sub = sub.with_columns(pl.when(~pl.col("json").str.contains(_ARRAY_FIELD_RE)).then(pl.col("json")).alias("json"))
    json = json.scatter(arr.arg_true(), sub.get_column("json"))
    bytes_rows = pl.repeat(None, df.height, dtype=pl.String, eager=True).scatter(arr.arg_true(), sub.get_column("bytes"))
    return json, bytes_rows.is_not_null(), bytes_rows


def to_syslog_lines(lines: pl.DataFrame) -> pl.DataFrame:
    """``lines`` (``line_no`` Int64, ``line`` String) with every journal JSON record rewritten
    as ``{UTC stamp} {_HOSTNAME} {SYSLOG_IDENTIFIER}[{pid}]: {MESSAGE}`` (stamp RFC 3339
    with microseconds and ``Z``, e.g. ``2023-11-14T22:13:20.123456Z``); other lines are
    returned unchanged.  Same columns, same rows in the same order.  See the module
    docstring for the fields and the lines that are not converted."""
    df = lines.select(pl.col("line_no"), pl.col("line"))
    if df.height == 0:
        return df
    json, byte_rows, byte_lists = _json_column(df)
    if json is None:
        return df
    f = _decode(_chunked(json))
    if byte_rows is not None and byte_rows.any():
        decoded = _utf8_lossy(byte_lists.filter(byte_rows))
        f = f.with_columns(f.get_column("MESSAGE").scatter(byte_rows.arg_true(), decoded))
    c = pl.col
    stamp = pl.coalesce(c("_SOURCE_REALTIME_TIMESTAMP"), c("__REALTIME_TIMESTAMP")).cast(pl.Int64, strict=False)
    pid = pl.coalesce(pl.when(c("SYSLOG_PID") != "").then(c("SYSLOG_PID")), pl.when(c("_PID") != "").then(c("_PID")))
    msg = c("MESSAGE")
    msg = (
        pl.when(msg.str.contains(r"[\r\n\x00]"))
        .then(msg.str.replace_all(r"[\r\n]", " ").str.replace_all("\x00", "\ufffd", literal=True))
        .otherwise(msg)
    )
    syslog = pl.concat_str(
        pl.from_epoch(stamp, time_unit="us").dt.strftime("%Y-%m-%dT%H:%M:%S%.6fZ"),
        pl.lit(" "),
        pl.coalesce(pl.when(c("_HOSTNAME") != "").then(c("_HOSTNAME")), pl.lit("-")),
        pl.lit(" "),
        pl.coalesce(
            pl.when(c("SYSLOG_IDENTIFIER") != "").then(c("SYSLOG_IDENTIFIER")),
            pl.when(c("_COMM") != "").then(c("_COMM")),
            pl.lit("-"),
        ),
        pl.when(pid.is_not_null()).then(pl.concat_str(pl.lit("["), pid, pl.lit("]"))).otherwise(pl.lit("")),
        pl.lit(": "),
        msg,
    )
    out = f.select(syslog.alias("line")).to_series()
    return df.with_columns(pl.coalesce(pl.lit(out), pl.col("line")).alias("line"))


__all__ = ["is_journal_json", "journal_postfix", "to_syslog_lines", "FIELDS"]
