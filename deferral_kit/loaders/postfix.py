"""Postfix logs (syslog, RFC 3339, shipper-prefixed, journald short) → canonical attempts.

Every line is classified with polars expressions over the lazy frame of lines:

* ``attempt``: a per-recipient delivery record (``QID: to=<…>, relay=…, dsn=…, status=… (…)``)
  of smtp, lmtp, error, retry, virtual, local, pipe, discard (and qmgr's own
  ``unknown mail transport error`` deferrals);
* ``connection``: per-MX events that are not final for a try (``host X said:`` without
  ``status=``, ``connect to …``, ``lost connection with …``, ``refused to talk to me``,
  TLS failures);
* ``context``: qmgr ``from=<…>, size=…`` (sender and size), cleanup ``message-id=``,
  qmgr ``removed`` (ends a queue-id generation) and qmgr ``status=expired`` (becomes
  ``expired`` rows for the recipients of that message still pending);
* ``skipped`` by reason (not postfix, inbound smtpd, TLS chatter, verification probes …),
  ``duplicate`` (a line identical to one of an earlier file) or ``malformed`` (no syslog
  header, wrapped or truncated ``status=`` records).

Timestamps end up UTC.  Year-less syslog stamps take the year of the file's last line,
which is the year of the file's modification time unless that is earlier in the year
than the last line's month (then the previous year), or ``options.year`` when given;
lines whose month is after the last line's month belong to the year before (Dec→Jan
rollover).  Stamps without an offset are read in ``options.tz``: an ambiguous wall time
(the repeated hour when DST ends) is taken as its *earliest* instant, and a wall time
that does not exist (the hour skipped when DST starts, which a correct clock never
writes) is read with the offset in force just before the gap.  A shipper's RFC 3339
stamp in front of the syslog header is preferred over the syslog stamp.

Field decisions: ``instance`` is the syslog_name before the first ``/`` (``postfix``,
``postfix-out2``), ``agent`` the daemon after the last one; ``egress_ip`` only from an
instance named after an address (``postfix-10.20.30.40``).  ``response`` is the remote
reply as Postfix logged it (multi-line replies keep their inline ``450-4.2.1`` prefixes),
or the MTA's own reason text when no server replied (``connect to …: Connection timed
out``, ``delivery temporarily suspended: …``); ``smtp_code`` and the reply's enhanced code
come only from a remote reply, ``enhanced_code`` falls back to ``dsn``.  ``relay=none``
takes ``mx_host``/``mx_ip`` from the host named in the reason.  ``message_key`` is
``log_host/instance/queue_id#generation``, the generation counting qmgr ``removed`` lines
of that queue id before the line.  Expiry rows (agent ``qmgr``) have a null ``attempt``:
they are not tries.  Rows come in line order (files in rotation order), expiry rows last.

Lines are read in blocks of :data:`BATCH_BYTES` (at most :data:`BATCH_LINES` lines per
batch), each parsed batch written to a scratch Parquet file, so memory does not grow with
the input while parsing.  Speed comes from doing little per line: the header is cut at
literal offsets (the capture regex only for odd shapes), lines are classified with literal
and anchored tests, and only the record lines (about 15 %) go through the field parsing, whose
regexes validate without captures while the fields are cut at their separators.
"""

from __future__ import annotations

import re
import tempfile
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import polars as pl

from .. import schema
from ..accounting import EXAMPLE_SCHEMA, EXAMPLES_PER_REASON, TABLE_SCHEMA, Accounting
from ..sources import SourceFile, line_batches, scan_lines
from . import Load, LoadOptions

FORMAT = "postfix"

DELIVERY_AGENTS = ("smtp", "lmtp", "error", "retry", "virtual", "local", "pipe", "discard")
INBOUND_DAEMONS = ("smtpd", "postscreen", "dnsblog", "tlsproxy")

_ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)"
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
# ``docker compose logs`` / ``kubectl logs --prefix`` put "container  | " before each line.
_CONTAINER = r"(?:[\w.-]+ +\| )"
HEADER_RE = (
    rf"^(?<hdr>{_CONTAINER}?(?:(?<ship>{_ISO}) )?"
    rf"(?:(?<iso>{_ISO})|(?<mon>{'|'.join(_MONTHS)}) {{1,2}}(?<day>\d{{1,2}}) (?<hms>\d\d:\d\d:\d\d(?:\.\d+)?))"
    r" (?<host>\S+) (?<prog>[^\s\[]+?)(?:\[\d+\])?: )"
)
# syslog_name (instance) is everything before the first '/', the daemon the last component.
PROG_RE = r"^(?<instance>postfix[^/\s]*)/(?:[^/\s]+/)*(?<daemon>[^/\s]+)$"

DELIVERY_RE = (
    r"^(?<queue_id>[0-9A-Za-z]+): to=(?<to><[^>]*>|[^,]*), (?:orig_to=(?<orig><[^>]*>|[^,]*), )?"
    r"relay=(?<relay>[^,]*), (?<kv>(?:[a-z_]+=[^,]*, )*?)dsn=(?<dsn>[245]\.\d{1,3}\.\d{1,3}), "
    r"status=(?<status>[A-Za-z-]+) \((?<rsn>.*)\)$"
)
_HOSTIP = r"(?<{h}>[^\s\[\]]*)\[(?<{i}>[^\]]*)\]"  # the name may be missing in anonymised logs
# The reason of a record, or the text of a per-connection line after "QID: ".  The reply
# may contain parentheses (Microsoft "(S844)"), so "(in reply to … command)" is matched
# only as the very end.
REASON_RE = (
    r"^(?:(?<suspended>delivery temporarily suspended: )?(?:"
    + r"host " + _HOSTIP.format(h="h1", i="ip1") + r" (?<verb>said|refused to talk to me): (?<reply>.*?)(?: \(in reply to (?<cmd>.+?) command\))?"
    + r"|SASL authentication failed; server " + _HOSTIP.format(h="h2", i="ip2") + r" said: (?<sasl>.*)"
    + r"|connect to " + _HOSTIP.format(h="h3", i="ip3") + r"(?::\d+)?: (?<connerr>.*)"
    + r"|(?<lost>lost connection|conversation) with " + _HOSTIP.format(h="h4", i="ip4") + r"(?: timed out)? while (?<while>.*)"
    + r"|(?<tls>certificate verification failed for|SSL_connect error to|TLS is required, but was not offered by host|Server certificate not verified)"
    + r" " + _HOSTIP.format(h="h5", i="ip5") + r".*"
    + r"))$"
)
REASON_START_RE = (
    r"^(?:delivery temporarily suspended: )?(?:host |SASL authentication failed; server |connect to |lost connection with "
    r"|conversation with |certificate verification failed for |SSL_connect error to |TLS is required, but was not offered by host "
    r"|Server certificate not verified )"
)
CODE_RE = r"^([2-5]\d\d)(?:[ -]|$)"
ENHANCED_RE = r"^[2-5]\d\d[ -]([245]\.\d{1,3}\.\d{1,3})(?:[\s;,]|$)"

STATUS_OUTCOME = {"sent": "delivered", "deferred": "deferred", "bounced": "bounced", "expired": "expired", "SOFTBOUNCE": "deferred"}
PROBE_STATUSES = ("deliverable", "undeliverable", "undeliverable-but-not-cached")

_CATEGORY = pl.Enum(["attempt", "connection", "context", "skipped", "duplicate", "malformed"])


def sniff(text: str) -> bool:
    """True when a line of ``text`` is a Postfix syslog/RFC 3339/journald line."""
    return re.search(
        rf"(?m)^{_CONTAINER}?(?:{_ISO} )?(?:{_ISO}|[A-Z][a-z]{{2}} {{1,2}}\d{{1,2}} \d\d:\d\d:\d\d(?:\.\d+)?) \S+ postfix[^/\s]*/(?:[^/\s]+/)*[^/\s\[]+\[\d+\]: ",
        text,
    ) is not None


# --- per-line parsing ----------------------------------------------------------------------

def _last_syslog_month(sf: SourceFile) -> int | None:
    """Month of the last year-less stamp in the file (read from its tail)."""
    path = sf.readable
    size = path.stat().st_size
    with open(path, "rb") as fh:
        fh.seek(max(0, size - 262144))
        tail = fh.read().decode("utf-8", errors="replace")
    found = re.findall(rf"(?m)^{_CONTAINER}?(?:{_ISO} )?({'|'.join(_MONTHS)}) {{1,2}}\d{{1,2}} \d\d:\d\d:\d\d", tail)
    return _MONTHS.index(found[-1]) + 1 if found else None


def _end_year(sf: SourceFile, options: LoadOptions, last_month: int | None) -> int:
    if options.year is not None:
        return options.year
    mtime = (sf.mtime or datetime.now().astimezone()).astimezone(ZoneInfo(options.tz))
    if last_month is not None and last_month > mtime.month:
        return mtime.year - 1
    return mtime.year


def _syslog_ts(end_year: int, last_month: int | None, tz: str) -> pl.Expr:
    month = pl.col("mon")  # already a month number
    year = pl.lit(end_year, pl.Int32)
    if last_month is not None:
        year = pl.when(month > last_month).then(year - 1).otherwise(year)
    naive = pl.datetime(
        year,
        month,
        pl.col("day").cast(pl.Int32),
        pl.col("hms").str.slice(0, 2).cast(pl.Int32),
        pl.col("hms").str.slice(3, 2).cast(pl.Int32),
        pl.col("hms").str.slice(6, 2).cast(pl.Int32),
        # journalctl -o short-precise writes "HH:MM:SS.ffffff"
        pl.col("hms").str.slice(9, 6).str.pad_end(6, "0").cast(pl.Int32, strict=False).fill_null(0),
        time_unit="us",
    )
    if tz == "UTC":
        return naive.dt.replace_time_zone("UTC")
    # Skipped wall times (DST start) are read with the offset in force before the gap.
    hour = pl.duration(hours=1)
    # (02:30 in a gap that jumps from +01:00 to +02:00 is 01:30 UTC, which is 03:30 after the gap.)
    return pl.coalesce(
        naive.dt.replace_time_zone(tz, ambiguous="earliest", non_existent="null"),
        (naive + hour).dt.replace_time_zone(tz, ambiguous="earliest", non_existent="null"),
    ).dt.convert_time_zone("UTC")


def _iso_ts(col: str) -> pl.Expr:
    return (
        pl.col(col)
        .str.replace(r"Z$", "+00:00")
        .str.to_datetime("%Y-%m-%dT%H:%M:%S%.f%:z", time_unit="us", strict=False)
        .dt.convert_time_zone("UTC")
    )


# Fixed-shape headers (syslog "Mmm dd HH:MM:SS host prog[pid]: " and RFC 3339 "stamp host prog[pid]: ")
# are cut at byte offsets found with literal searches; only other shapes (shipper prefix,
# fractional syslog seconds, single-space days) pay for the capture regex, which is ~10x slower.
_FAST_HDR_RE = rf"^(?:(?:{'|'.join(_MONTHS)}) [ \d]\d \d\d:\d\d:\d\d|{_ISO}) \S+ [^\s\[]+(?:\[\d+\])?$"


def _bslice(s: pl.Expr, start, length=None) -> pl.Expr:
    """``s[start:start+length]`` in bytes (``str.find`` gives byte offsets, ``str.slice`` counts
    characters).  Only cut at ASCII delimiters, so the pieces stay valid UTF-8."""
    return s.cast(pl.Binary).bin.slice(start, length).cast(pl.String)


def _file_lines(lf: pl.LazyFrame, fidx: int, *, end_year: int, last_month: int | None, tz: str) -> pl.LazyFrame:
    """Header fields of the lines (``line_no, line``) of file ``fidx``: fidx, line_no, line, ts,
    host, prog, msg."""
    line = pl.col("line")
    hdr = pl.col("_hdr")
    fast = pl.col("_fast")
    iso = pl.col("_iso")
    # (each intermediate is its own column: the engine would otherwise recompute shared
    # sub-expressions once per use)
    # the header ends at the first ": " (no stamp, host or tag holds one)
    lf = lf.select(pl.lit(fidx, pl.Int32).alias("fidx"), "line_no", "line", line.str.splitn(": ", 2).alias("_sp"))
    lf = lf.with_columns(
        pl.when(pl.col("_sp").struct.field("field_1").is_not_null()).then(pl.col("_sp").struct.field("field_0")).alias("_hdr"),
        pl.col("_sp").struct.field("field_1").alias("_msg"),
    ).drop("_sp")
    lf = lf.with_columns(hdr.str.contains(_FAST_HDR_RE).fill_null(False).alias("_fast"), (hdr.str.slice(4, 1) == "-").fill_null(False).alias("_iso"))
    lf = lf.with_columns(pl.when(fast & iso).then(hdr.str.find(" ", literal=True)).alias("_iso_end"))
    lf = lf.with_columns(
        # host and tag start after the stamp: 15 characters for syslog, the first space for RFC 3339
        # (the stamp is ASCII, so its byte length from str.find is its length in characters)
        pl.when(fast).then(hdr).str.slice(pl.col("_iso_end").fill_null(15) + 1).str.splitn(" ", 2).alias("_ht"),
        pl.when(~fast).then(line).str.extract_groups(HEADER_RE).alias("h"),
        pl.when(fast & ~iso).then(hdr.str.slice(0, 3)).alias("_mon"),
    ).unnest("h")
    syslog = fast & ~iso
    lf = lf.select(
        "fidx",
        "line_no",
        "line",
        pl.when(fast).then(pl.col("_ht").struct.field("field_0")).otherwise(pl.col("host")).alias("host"),
        pl.when(fast).then(pl.col("_ht").struct.field("field_1").str.splitn("[", 2).struct.field("field_0")).otherwise(pl.col("prog")).alias("prog"),
        pl.when(fast).then(pl.col("_msg")).otherwise(_bslice(pl.when(~fast).then(line), pl.col("hdr").str.len_bytes())).alias("msg"),
        "ship",
        pl.when(fast).then(hdr.str.head(pl.col("_iso_end"))).otherwise(pl.col("iso")).alias("iso"),
        pl.coalesce(pl.col("_mon"), pl.col("mon")).replace_strict(list(_MONTHS), list(range(1, 13)), default=None, return_dtype=pl.Int32).alias("mon"),
        pl.when(syslog).then(hdr.str.slice(4, 2).str.strip_chars_start()).otherwise(pl.col("day")).alias("day"),
        pl.when(syslog).then(hdr.str.slice(7, 8)).otherwise(pl.col("hms")).alias("hms"),
    )
    lf = lf.with_columns(pl.coalesce(_iso_ts("ship"), _iso_ts("iso"), _syslog_ts(end_year, last_month, tz)).alias("ts"))
    return lf.drop("ship", "iso", "mon", "day", "hms")


def _stage(expr_cmd: pl.Expr) -> pl.Expr:
    """Canonical stage from a Postfix command name ("end of DATA", "RCPT TO", …) or a
    "while …" phrase of a lost connection."""
    c = expr_cmd
    return (
        pl.when(c.str.contains(r"(?i)greeting")).then(pl.lit("greeting"))
        .when(c.str.contains(r"(?i)end of data")).then(pl.lit("end of DATA"))
        .when(c.str.contains(r"(?i)\b(?:EHLO|HELO|LHLO)\b")).then(pl.lit("HELO"))
        .when(c.str.contains(r"(?i)STARTTLS|TLS handshake")).then(pl.lit("STARTTLS"))
        .when(c.str.contains(r"(?i)\bAUTH\b|SASL")).then(pl.lit("AUTH"))
        .when(c.str.contains(r"MAIL FROM")).then(pl.lit("MAIL FROM"))
        .when(c.str.contains(r"RCPT TO")).then(pl.lit("RCPT TO"))
        .when(c.str.contains(r"(?i)\bDATA\b|message (?:body|content)")).then(pl.lit("DATA"))
        .otherwise(c)
    )


def _reason_fields() -> list[pl.Expr]:
    """Columns parsed from a reason/connection text (struct ``r`` must be unnested first)."""
    reply = pl.coalesce(pl.col("reply"), pl.col("sasl"))
    host = pl.coalesce(*[pl.col(f"h{i}") for i in range(1, 6)]).str.to_lowercase().str.strip_suffix(".")
    ip = pl.coalesce(*[pl.col(f"ip{i}") for i in range(1, 6)])
    event = (
        pl.when(pl.col("verb") == "said").then(pl.lit("said"))
        .when(pl.col("verb").is_not_null()).then(pl.lit("refused_to_talk"))
        .when(pl.col("sasl").is_not_null()).then(pl.lit("said"))
        .when(pl.col("connerr").is_not_null()).then(pl.lit("connect_failed"))
        .when(pl.col("lost") == "lost connection").then(pl.lit("lost_connection"))
        .when(pl.col("lost").is_not_null()).then(pl.lit("timeout"))
        .when(pl.col("tls").is_not_null()).then(pl.lit("tls_failed"))
    )
    stage = (
        pl.when(pl.col("cmd").is_not_null()).then(_stage(pl.col("cmd")))
        .when(pl.col("verb").is_not_null()).then(pl.lit("greeting"))
        .when(pl.col("sasl").is_not_null()).then(pl.lit("AUTH"))
        .when(pl.col("connerr").is_not_null()).then(pl.lit("connect"))
        .when(pl.col("while").is_not_null()).then(_stage(pl.col("while")))
        .when(pl.col("tls").is_not_null()).then(pl.lit("STARTTLS"))
    )
    return [
        host.alias("r_host"),
        ip.alias("r_ip"),
        event.alias("event"),
        stage.alias("smtp_stage"),
        reply.alias("reply"),
        pl.col("suspended").is_not_null().alias("suspended"),
    ]


def _instance_daemon(lf: pl.LazyFrame) -> pl.LazyFrame:
    """``instance`` and ``daemon`` from the syslog tag (see :data:`PROG_RE`); tags with more
    than one ``/`` (``postfix/submission/smtpd``) go through the regex."""
    prog = pl.col("prog")
    parts = pl.col("_parts")
    # (intermediate columns are materialised: the engine would otherwise compute shared
    # sub-expressions once per use)
    lf = lf.with_columns(prog.str.splitn("/", 2).alias("_parts"))
    lf = lf.with_columns(parts.struct.field("field_0").alias("_head"), parts.struct.field("field_1").alias("_after"))
    after = pl.col("_after")
    simple = prog.str.starts_with("postfix") & (after.str.len_bytes() > 0) & ~after.str.contains("/", literal=True)
    lf = lf.with_columns(simple.fill_null(False).alias("_simple"))
    nested = pl.when(~pl.col("_simple") & after.is_not_null()).then(prog).str.extract_groups(PROG_RE)
    return lf.with_columns(
        pl.when(pl.col("_simple")).then(pl.col("_head")).otherwise(nested.struct.field("instance")).alias("instance"),
        pl.when(pl.col("_simple")).then(after).otherwise(nested.struct.field("daemon")).alias("daemon"),
    ).drop("_parts", "_head", "_after", "_simple")


def _delivery_fields(lf: pl.LazyFrame, d: pl.Expr) -> pl.LazyFrame:
    """Fields of the delivery records in ``d`` (the message, null on other lines), as
    :data:`DELIVERY_RE` would capture them: queue_id, to, orig, relay, kv, dsn, status, rsn.

    The regex only validates (a DFA match, no captures: several times faster); the fields
    are then split at the literal separators, which in a valid record occur first where the
    regex puts them (to/relay/kv values hold no ``", "``)."""
    c = pl.col

    def split(col: str, sep: str, a: str, b: str) -> list[pl.Expr]:
        s = c(col).str.splitn(sep, 2)
        return [s.struct.field("field_0").alias(a), s.struct.field("field_1").alias(b)]

    lf = lf.with_columns(pl.when(d.str.contains(DELIVERY_RE)).then(d).alias("_d"))
    lf = lf.with_columns(*split("_d", ", status=", "_pre", "_post"))
    lf = lf.with_columns(*split("_pre", ": to=", "queue_id", "_to_rest"), *split("_post", " (", "status", "_rsn"))
    lf = lf.with_columns(*split("_to_rest", ", relay=", "_to_seg", "_relay_rest"), c("_rsn").str.strip_suffix(")").alias("rsn"))
    lf = lf.with_columns(*split("_to_seg", ", orig_to=", "to", "orig"), *split("_relay_rest", ", dsn=", "_mid", "dsn"))
    lf = lf.with_columns(*split("_mid", ", ", "relay", "kv"))
    return lf.with_columns((c("kv") + ", ").alias("kv")).drop("_d", "_pre", "_post", "_to_rest", "_rsn", "_to_seg", "_relay_rest", "_mid")


_CONTEXT_KINDS = ("qmgr_from", "expired", "removed", "message_id")


def _parsed_batch(lines: pl.LazyFrame, dup_hashes: pl.DataFrame | None) -> pl.DataFrame:
    """:func:`_compact` rows of a batch of lines.  Every expression costs per row, null or
    not, so each kind of line only goes through the parsing it needs: delivery records and
    connection events (about 15 %) through the field parsing, context lines through the
    context fields, and the rest (smtpd, opendkim, TLS chatter, ...) only get their category
    and reason.  Each step is collected on its own: one plan of all the steps runs slower.
    Rows come grouped by those three parts, each in line order."""
    base = _kind(_with_daemon_and_dups(lines.collect().lazy(), dup_hashes)).collect()
    kind = pl.col("kind")
    no_fields = [pl.lit(None, pl.String).alias("status"), pl.lit(None, pl.String).alias("event")]
    rec = _records_fields(base.lazy().filter(kind.is_in(("delivery", "conn")))).collect()
    ctx = _context(base.lazy().filter(kind.is_in(_CONTEXT_KINDS)).with_columns(*no_fields, pl.lit(None, pl.String).alias("queue_id"))).collect()
    rest = base.lazy().filter(~kind.is_in(("delivery", "conn", *_CONTEXT_KINDS))).with_columns(no_fields)
    return pl.concat(
        [_compact(_category(rec.lazy())), _compact(_category(ctx.lazy())), _compact(_category(rest))],
        how="diagonal",
    ).collect()


def _with_daemon_and_dups(lines: pl.LazyFrame, dup_hashes: pl.DataFrame | None) -> pl.LazyFrame:
    lf = _instance_daemon(lines)
    if dup_hashes is not None:
        lf = (
            lf.with_columns(pl.col("line").hash().alias("_hash"))
            .join(dup_hashes.lazy(), on="_hash", how="left", maintain_order="left")
            .with_columns((pl.col("_first").is_not_null() & (pl.col("fidx") > pl.col("_first"))).alias("_dup"))
            .drop("_hash", "_first")
        )
    else:
        lf = lf.with_columns(pl.lit(False).alias("_dup"))
    return lf


def _kind(lf: pl.LazyFrame) -> pl.LazyFrame:
    """``kind`` of each line: dup, nohdr, other_prog, delivery, warning, qmgr_from, expired,
    removed, message_id, conn or other."""
    msg = pl.col("msg")
    daemon = pl.col("daemon")
    is_pf = pl.col("instance").is_not_null()
    # Regexes run on masked columns (null elsewhere) so each scans only the lines it concerns.
    pf_msg = pl.when(is_pf).then(msg)
    qmgr_msg = pl.when(daemon == "qmgr").then(msg)
    # a literal test first: the anchored regex then only confirms the few candidate lines
    is_delivery = pl.when(is_pf & msg.str.contains(": to=", literal=True)).then(msg).str.contains(r"^[0-9A-Za-z]+: to=").fill_null(False)
    smtp_msg = pl.when(daemon.is_in(("smtp", "lmtp")) & ~is_delivery).then(msg)
    lf = lf.with_columns(
        kind=pl.when(pl.col("_dup")).then(pl.lit("dup"))
        .when(pl.col("msg").is_null()).then(pl.lit("nohdr"))
        .when(~is_pf).then(pl.lit("other_prog"))
        .when(is_delivery & (daemon.is_in(DELIVERY_AGENTS) | (daemon == "qmgr"))).then(pl.lit("delivery"))
        .when(pf_msg.str.contains(r"^(?:[0-9A-Za-z]+: )?(?:warning|fatal|error|panic|info): ")).then(pl.lit("warning"))
        .when(qmgr_msg.str.contains(r"^[0-9A-Za-z]+: from=<[^>]*>, size=\d+")).then(pl.lit("qmgr_from"))
        .when(qmgr_msg.str.contains(r"^[0-9A-Za-z]+: from=<[^>]*>, status=(?:force-)?expired")).then(pl.lit("expired"))
        .when(qmgr_msg.str.contains(r"^[0-9A-Za-z]+: removed$")).then(pl.lit("removed"))
        .when(pl.when(daemon == "cleanup").then(msg).str.contains(r"^[0-9A-Za-z]+: message-id=")).then(pl.lit("message_id"))
        .when(smtp_msg.str.contains(r"^(?:[0-9A-Za-z]+: )?(?:host \S+ (?:said: |refused to talk to me)|connect to |lost connection with |conversation with |SASL authentication failed|certificate verification failed|SSL_connect error|TLS is required|Server certificate not verified)")).then(pl.lit("conn"))
        .otherwise(pl.lit("other"))
    )
    return lf


def _records_fields(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Fields of delivery records and connection events (null on other lines)."""
    msg = pl.col("msg")
    # Record fields: only where needed, so the collected frame stays small.
    dl = pl.col("kind") == "delivery"
    lf = _delivery_fields(lf, pl.when(dl).then(msg))
    lf = lf.with_columns(pl.when(pl.col("kind") == "conn").then(msg).alias("_conn_msg"))
    conn_msg = pl.col("_conn_msg")
    lf = lf.with_columns(
        conn_msg.str.extract(r"^([0-9A-Za-z]+): ", 1).fill_null(pl.col("queue_id")).alias("queue_id"),
        pl.coalesce(pl.col("rsn"), conn_msg.str.replace(r"^[0-9A-Za-z]+: ", "")).alias("rtext"),
    ).drop("_conn_msg")
    # Remote replies ("250 2.0.0 Ok", most reasons) cannot match: the capture engine skips them.
    rt = pl.col("rtext")
    lf = lf.with_columns(pl.when(rt.str.contains(REASON_START_RE)).then(rt).alias("_rt"))
    lf = lf.with_columns(pl.col("_rt").str.extract_groups(REASON_RE).alias("r")).drop("_rt").unnest("r").with_columns(_reason_fields())
    return _record_fields(lf).with_columns(_final_stage())


def _context(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Queue id, sender, size and message-id of the context lines."""
    msg = pl.col("msg")
    ctx_q = pl.col("kind").is_in(("qmgr_from", "expired", "removed", "message_id"))
    lf = lf.with_columns(
        pl.when(ctx_q).then(msg).str.extract(r"^([0-9A-Za-z]+): ", 1).fill_null(pl.col("queue_id")).alias("queue_id"),
        pl.when(pl.col("kind").is_in(("qmgr_from", "expired"))).then(msg).str.extract(r": from=<([^>]*)>", 1).alias("sender"),
        pl.when(pl.col("kind") == "qmgr_from").then(msg).str.extract(r", size=(\d+)", 1).cast(pl.Int64).alias("size"),
        pl.when(pl.col("kind") == "message_id").then(msg).str.extract(r": message-id=(.*)$", 1).alias("message_id"),
    )
    return lf


def _category(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Accounting ``category`` and ``reason`` of each line."""
    daemon = pl.col("daemon")
    smtp_msg = pl.when(daemon.is_in(("smtp", "lmtp")) & (pl.col("kind") != "delivery")).then(pl.col("msg"))
    status = pl.col("status")
    nohdr_line = pl.when(pl.col("kind") == "nohdr").then(pl.col("line"))
    category = (
        pl.when(pl.col("kind") == "dup").then(pl.lit("duplicate"))
        .when(pl.col("kind") == "nohdr").then(pl.when(nohdr_line.str.contains(r"^\s*$")).then(pl.lit("skipped")).otherwise(pl.lit("malformed")))
        .when(pl.col("kind") == "delivery").then(
            pl.when(status.is_null()).then(pl.lit("malformed"))
            .when(status.is_in(PROBE_STATUSES)).then(pl.lit("skipped"))
            .when(status.is_in(list(STATUS_OUTCOME))).then(pl.lit("attempt"))
            .otherwise(pl.lit("skipped"))
        )
        .when(pl.col("kind") == "conn").then(pl.when(pl.col("event").is_not_null()).then(pl.lit("connection")).otherwise(pl.lit("skipped")))
        .when(pl.col("kind").is_in(("qmgr_from", "expired", "removed", "message_id"))).then(pl.lit("context"))
        .otherwise(pl.lit("skipped"))
    )
    reason = (
        pl.when(pl.col("kind") == "dup").then(pl.lit("identical line in an earlier file"))
        .when(pl.col("kind") == "nohdr").then(
            pl.when(nohdr_line.str.contains(r"^\s*$")).then(pl.lit("empty line"))
            .when(pl.when(pl.col("kind") == "nohdr").then(pl.col("line")).str.contains(r"status=|to=<|relay=|dsn=| said: |\(in reply to")).then(pl.lit("fragment of a wrapped record"))
            .otherwise(pl.lit("no syslog header"))
        )
        .when(pl.col("kind") == "other_prog").then(pl.lit("not postfix: ") + pl.when(pl.col("kind") == "other_prog").then(pl.col("prog")).str.slice(0, 40))
        .when(pl.col("kind") == "warning").then(pl.lit("postfix warning/fatal"))
        .when(pl.col("kind") == "delivery").then(
            pl.when(status.is_null()).then(pl.lit("truncated or wrapped delivery record"))
            .when(status.is_in(PROBE_STATUSES)).then(pl.lit("address verification probe"))
            .when(status.is_in(list(STATUS_OUTCOME))).then(pl.lit(None, pl.String))
            .otherwise(pl.lit("unknown status ") + status)
        )
        .when(pl.col("kind") == "conn").then(pl.when(pl.col("event").is_not_null()).then(pl.lit(None, pl.String)).otherwise(pl.lit("smtp: unrecognised connection text")))
        .when(pl.col("kind") == "qmgr_from").then(pl.lit("qmgr from= (sender, size)"))
        .when(pl.col("kind") == "expired").then(pl.lit("qmgr expired (message-level)"))
        .when(pl.col("kind") == "removed").then(pl.lit("qmgr removed"))
        .when(pl.col("kind") == "message_id").then(pl.lit("cleanup message-id"))
        .when(daemon.is_in(INBOUND_DAEMONS)).then(pl.lit("inbound smtpd/postscreen"))
        .when(smtp_msg.str.contains("TLS connection established", literal=True)).then(pl.lit("tls"))
        .when(daemon == "tlsmgr").then(pl.lit("tls"))
        .otherwise(pl.lit("postfix ") + pl.when(pl.col("kind") == "other").then(daemon) + pl.lit(": not a delivery record"))
    )
    return lf.with_columns(category.cast(_CATEGORY).alias("category"), reason.alias("reason"))


BATCH_BYTES = 16 << 20  # text read per block (about 95,000 syslog lines; bounds memory)
BATCH_LINES = 400_000  # and at most this many lines parsed per batch

_PER_LINE = ("ts", "kind", "host", "instance", "daemon")
_CATEGORICAL = ("kind", "host", "instance", "daemon", "event", "smtp_stage", "dsn", "outcome", "enhanced_code", "egress_ip", "recipient_domain", "mx_host")
_RECORD_COLS = (
    "fidx", "line_no", "ts", "kind", "category", "host", "instance", "daemon", "queue_id",
    "recipient", "orig_recipient", "recipient_domain", "egress_ip", "mx_host", "mx_ip", "smtp_code", "enhanced_code", "dsn",
    "smtp_stage", "response", "outcome", "remote", "delay_s", "queued_at", "event", "sender", "size", "message_id",
)


def _record_fields(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Canonical fields of delivery records and connection events (null on other lines)."""
    c = pl.col
    rec = c("kind").is_in(("delivery", "conn"))
    # relay=host[ip]:port split at the brackets (as ^([^\[]+)\[ and ^[^\[]+\[([^\]]*)\] would capture)
    br = c("relay").str.splitn("[", 2)
    lf = lf.with_columns(br.struct.field("field_0").alias("_rh"), br.struct.field("field_1").str.splitn("]", 2).alias("_ri"))
    named = (c("_rh").str.len_bytes() > 0) & c("_ri").struct.field("field_0").is_not_null()
    lf = lf.with_columns(
        pl.when(named).then(c("_rh")).alias("_relay_host"),
        pl.when(named & c("_ri").struct.field("field_1").is_not_null()).then(c("_ri").struct.field("field_0")).alias("_relay_ip"),
        c("daemon").is_in(("smtp", "lmtp")).alias("_remote_agent"),
        pl.coalesce(c("reply"), c("rtext")).alias("response"),
        c("kv").str.extract(r"(?:^|, )delay=([\d.]+)", 1).cast(pl.Float64).alias("delay_s"),
        c("to").str.strip_prefix("<").str.strip_suffix(">").alias("recipient"),
    )
    # Delivered (and some bounced) records carry the remote reply as the whole reason.
    bare_reply = c("_remote_agent") & c("_relay_ip").is_not_null() & c("rsn").str.contains(CODE_RE)
    lf = lf.with_columns((c("reply").is_not_null() | bare_reply.fill_null(False)).alias("_is_reply"))
    lf = lf.with_columns(pl.when(c("_is_reply")).then(c("response")).alias("_reply_text"))
    return lf.with_columns(
        c("orig").str.strip_prefix("<").str.strip_suffix(">").alias("orig_recipient"),
        c("recipient").str.extract(r"@([^@]+)$", 1).str.to_lowercase().str.strip_suffix(".").alias("recipient_domain"),
        pl.coalesce(c("_relay_host"), c("r_host")).str.to_lowercase().str.strip_suffix(".").alias("mx_host"),
        pl.coalesce(c("_relay_ip"), c("r_ip")).alias("mx_ip"),
        c("_reply_text").str.extract(CODE_RE, 1).cast(pl.Int16).alias("smtp_code"),
        pl.coalesce(c("_reply_text").str.extract(ENHANCED_RE, 1), c("dsn")).alias("enhanced_code"),
        c("status").replace_strict(STATUS_OUTCOME, default=None, return_dtype=pl.String).alias("outcome"),
        (c("_is_reply") & ~c("suspended").fill_null(False) & c("_remote_agent")).alias("remote"),
        (c("ts") - pl.duration(microseconds=(c("delay_s") * 1e6).round().cast(pl.Int64))).alias("queued_at"),
        # the instance is per line: only record lines need its address
        pl.when(rec).then(c("instance")).str.extract(EGRESS_INSTANCE_RE, 1).alias("egress_ip"),
    ).drop("_rh", "_ri", "_relay_host", "_relay_ip", "_remote_agent", "_is_reply", "_reply_text")


def _final_stage() -> pl.Expr:
    # Postfix logs status=sent only after the reply to the end of DATA (or LMTP's per-recipient reply to it).
    return (
        pl.when((pl.col("outcome") == "delivered") & pl.col("remote"))
        .then(pl.lit("end of DATA"))
        .otherwise(pl.col("smtp_stage"))
        .alias("smtp_stage")
    )


def _categorical(e: pl.Expr, name: str) -> pl.Expr:
    return e.cast(pl.Categorical) if name in _CATEGORICAL else e


def _compact(classified: pl.LazyFrame) -> pl.LazyFrame:
    """Per-line category and reason (categorical), plus the parsed fields on record lines only
    (those of ``classified``: the others are added as nulls by a diagonal concat)."""
    rec_mask = pl.col("category").is_in(["attempt", "connection", "context"])
    have = set(classified.collect_schema().names())
    return classified.select(
        "fidx",
        "line_no",
        "category",
        pl.col("reason").cast(pl.Categorical).alias("acc_reason"),
        # (the parsed fields are null off their own kind of line already)
        *[
            _categorical((pl.when(rec_mask).then(pl.col(c)) if c in _PER_LINE else pl.col(c)), c).alias(c)
            for c in _RECORD_COLS
            if c not in ("fidx", "line_no", "category") and c in have
        ],
    )


# --- records → canonical tables ---------------------------------------------------------------

def _generations(rec: pl.LazyFrame) -> pl.LazyFrame:
    """``seq, generation``: a queue id is reused after ``removed``, so the generation counts
    removals before each line of (log_host, instance, queue_id), in line order.  The
    ``removed`` lines themselves only count."""
    removed = (pl.col("kind") == "removed").cast(pl.Int32)
    # the window runs over a 64-bit hash of the three parts (the categorical codes of host and
    # instance: categories are process-wide), not over a built string
    group = pl.struct(pl.col("host").to_physical(), pl.col("instance").to_physical(), "queue_id").hash()
    return (
        rec.with_columns((removed.cum_sum().over(group, order_by="seq") - removed).alias("generation"))
        .filter(pl.col("kind") != "removed")
        .select("seq", "generation")
    )


def _message_key() -> pl.Expr:
    """``log_host/instance/queue_id#generation`` (null without a queue id)."""
    key = pl.format("{}/{}/{}#{}", pl.col("host").cast(pl.String), pl.col("instance").cast(pl.String), pl.col("queue_id"), pl.col("generation"))
    return pl.when(pl.col("queue_id").is_not_null()).then(key).alias("message_key")


# Multi-IP setups name each instance after its source address (``postfix-10.20.30.40``);
# only such names give ``egress_ip``, nothing is guessed otherwise.
EGRESS_INSTANCE_RE = r"^postfix-(\d{1,3}(?:\.\d{1,3}){3}|[0-9a-fA-F:]*:[0-9a-fA-F:]+)$"


def _attempts(att: pl.DataFrame, context: tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame], file_names: pl.DataFrame) -> pl.LazyFrame:
    """``att``: attempt lines; ``context``: sender and size, message-id (one row per message)
    and the qmgr expiry lines, from :func:`_records`."""
    ctx, mid, exp = (c.lazy() for c in context)
    # Lazy from here: the caller's collect plans the joins and window once, without copies of every step.
    att = att.lazy()
    att = att.with_columns(pl.col("host").alias("log_host"), pl.col("daemon").alias("agent"))
    att = att.join(ctx, on="message_key", how="left", maintain_order="left").join(mid, on="message_key", how="left", maintain_order="left")
    # Expiry is message-level: the recipients whose last try was a deferral expire with it.
    pending = (
        att.join(exp.select("message_key"), on="message_key", how="semi")
        .sort("ts", "seq")
        .group_by("message_key", "recipient", maintain_order=True)
        .agg(pl.all().last())
        .filter(pl.col("outcome") == "deferred")
    )
    expired = pending.drop("ts", "fidx", "line_no", "seq").join(exp, on="message_key", how="inner").with_columns(
        pl.lit("qmgr").alias("agent"),
        pl.lit("expired").alias("outcome"),
        pl.lit(False).alias("remote"),
        pl.lit(None, pl.String).alias("mx_host"),
        pl.lit(None, pl.String).alias("mx_ip"),
        pl.lit(None, pl.Int16).alias("smtp_code"),
        pl.lit(None, pl.String).alias("enhanced_code"),
        pl.lit(None, pl.String).alias("dsn"),
        pl.lit(None, pl.String).alias("smtp_stage"),
        pl.lit("status=expired, returned to sender").alias("response"),
        pl.coalesce(pl.col("sender"), pl.col("exp_sender")).alias("sender"),
        ((pl.col("ts") - pl.col("queued_at")).dt.total_microseconds() / 1e6).alias("delay_s"),
    )
    att = att.with_columns(
        (pl.col("seq").cum_count().over(["message_key", "recipient"], order_by=["ts", "seq"])).cast(pl.Int32).alias("attempt")
    )
    out = pl.concat([att, expired.with_columns(pl.lit(None, pl.Int32).alias("attempt"))], how="diagonal_relaxed")
    # rows in line order (files in rotation order), expiry rows last; no sort, which would copy every column
    out = out.with_columns(_file_name(file_names), pl.lit(FORMAT).alias("source"))
    return schema.conform(out, schema.ATTEMPT_COLUMNS)


def _file_name(file_names: pl.DataFrame) -> pl.Expr:
    # a lookup, not a join: a join would copy every column of the table once more
    return pl.col("fidx").replace_strict(file_names["fidx"], file_names["file"], default=None, return_dtype=pl.String).alias("file")


def _connections(con: pl.DataFrame, file_names: pl.DataFrame) -> pl.LazyFrame:
    con = con.with_columns(pl.lit(FORMAT).alias("source"), pl.col("host").alias("log_host"))
    con = con.lazy().with_columns(_file_name(file_names))
    return schema.conform(con, schema.CONNECTION_COLUMNS)


def _batch_counts(parsed: pl.DataFrame) -> pl.DataFrame:
    """Lines per (fidx, category, reason) of one parsed batch."""
    return parsed.group_by("fidx", "category", "acc_reason").agg(pl.len().cast(pl.Int64).alias("lines"))


def _batch_examples(parsed: pl.DataFrame, batch: pl.DataFrame) -> pl.DataFrame:
    """The first lines (number and text) of each skipped/malformed/duplicate reason in one batch."""
    ex = (
        parsed.filter(pl.col("category").is_in(["malformed", "skipped", "duplicate"]))
        .group_by("fidx", "category", "acc_reason")
        .agg(pl.col("line_no").bottom_k(EXAMPLES_PER_REASON))
        .explode("line_no")
        .join(batch.select("line_no", pl.col("line").alias("text")), on="line_no", how="left")
    )
    # A copy: the texts are views into the batch's buffer, which they would otherwise keep alive.
    return pl.DataFrame(ex.to_dict(as_series=False), schema=ex.schema)


def _accounting(counts: list[pl.DataFrame], examples: list[pl.DataFrame], files: list[SourceFile]) -> Accounting:
    """Lines per (file, category, reason), with the text of the first three lines of each
    skipped/malformed/duplicate reason, from the per-batch counts and examples."""
    names = [sf.name for sf in files]
    if not counts:
        return Accounting(problems=[f"{sf.name}: {p}" for sf in files for p in sf.problems])
    file_name = pl.col("fidx").replace_strict(list(range(len(names))), names, return_dtype=pl.String).alias("file")
    table = (
        pl.concat(counts)
        .group_by("fidx", "category", "acc_reason")
        .agg(pl.col("lines").sum())
        .select(file_name, pl.lit(FORMAT).alias("format"), pl.col("category").cast(pl.String), pl.col("acc_reason").cast(pl.String).fill_null("").alias("reason"), "lines")
    )
    ex = (
        pl.concat(examples)
        .sort("fidx", "line_no")
        .group_by("fidx", "category", "acc_reason", maintain_order=True)
        .head(EXAMPLES_PER_REASON)
        .select(file_name, "line_no", pl.col("category").cast(pl.String), pl.col("acc_reason").cast(pl.String).fill_null("").alias("reason"), pl.col("text").fill_null(""))
    )
    problems = [f"{sf.name}: {p}" for sf in files for p in sf.problems]
    return Accounting(
        table=table.cast(dict(TABLE_SCHEMA)).sort("file", "category", "reason"),
        examples=ex.cast(dict(EXAMPLE_SCHEMA)).sort("file", "line_no"),
        problems=problems,
    )


def _records(per_line: pl.LazyFrame) -> tuple[pl.DataFrame, pl.DataFrame, tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]]:
    """Attempt lines, connection lines and context lines (qmgr from=, message-id, expired),
    each with its own columns only (a null string cell still costs 16 bytes) and its
    ``message_key``; low-cardinality columns stay categorical until ``schema.conform``."""
    # line order over all files (files are in rotation order): the tie-break after ts
    seq = (pl.col("fidx").cast(pl.Int64) * 10**12 + pl.col("line_no")).alias("seq")
    is_rec = pl.col("category").is_in(["attempt", "connection", "context"])
    # generations are numbers (no string per line); each frame builds its own keys
    gens = _generations(per_line.filter(is_rec & pl.col("queue_id").is_not_null()).select(seq, "host", "instance", "queue_id", "kind")).collect()

    def records(where: pl.Expr, cols: list[str]) -> pl.DataFrame:
        keyed = per_line.filter(where).select(seq, *dict.fromkeys([*cols, "host", "instance", "queue_id"])).join(gens.lazy(), on="seq", how="left", maintain_order="left")
        return keyed.with_columns(_message_key()).select("seq", *cols, "message_key").collect()

    common = ["fidx", "line_no", "ts", "host", "instance", "daemon", "queue_id", "egress_ip", "mx_host", "mx_ip", "smtp_code", "enhanced_code", "smtp_stage", "response"]
    att = records(
        pl.col("category") == "attempt",
        common + ["recipient", "orig_recipient", "recipient_domain", "dsn", "outcome", "remote", "delay_s", "queued_at"],
    )
    con = records(pl.col("category") == "connection", common + ["event"])
    # Context reduced now to one row per message (the first line of each, in line order), so
    # the raw context lines are never held.
    ctx = records(pl.col("kind") == "qmgr_from", ["sender", "size"]).group_by("message_key").agg(pl.col("sender").first(), pl.col("size").first())
    mid = records(pl.col("kind") == "message_id", ["message_id"]).group_by("message_key").agg(pl.col("message_id").first())
    exp = records(pl.col("kind") == "expired", ["fidx", "line_no", "ts", "sender"]).select("message_key", "ts", "fidx", "line_no", "seq", pl.col("sender").alias("exp_sender"))
    return att, con, (ctx, mid, exp)


def load(files: list[SourceFile], options: LoadOptions) -> Load:
    """Read Postfix logs into attempts (one row per recipient per try), connection events
    and the line accounting (every line: attempt, connection, context, skipped, duplicate
    or malformed)."""
    if not files:
        return Load()
    dup_hashes = None
    if options.dedupe and len(files) > 1:
        # A line already read from an earlier file (overlapping rotated copies) is a duplicate;
        # only hashes seen in more than one file are kept, so the join table stays small.
        dup_hashes = (
            pl.concat([scan_lines([sf]).select(pl.lit(i, pl.Int32).alias("fidx"), "line") for i, sf in enumerate(files)])
            .select("fidx", pl.col("line").hash().alias("_hash"))
            .group_by("_hash")
            .agg(pl.col("fidx").min().alias("_first"), pl.col("fidx").n_unique().alias("_n"))
            .filter(pl.col("_n") > 1)
            .drop("_n")
            .collect(engine="streaming")
        )
    # Lines are parsed in batches, each written to a scratch Parquet file: memory stays bounded
    # whatever the file size, and the records read back own compact buffers instead of pinning
    # the raw line buffers their strings were sliced from.
    # Each batch is counted for the accounting (with the text of its first lines of each
    # reason) as it is parsed, and only its record lines are kept.
    with tempfile.TemporaryDirectory(prefix="deferral_kit_postfix_") as tmp:
        parts, counts, examples = [], [], []
        empty = pl.DataFrame(schema={"file": pl.String, "line_no": pl.Int64, "line": pl.String})
        for fidx, sf in enumerate(files):
            last_month = _last_syslog_month(sf)
            end_year = _end_year(sf, options, last_month)
            for block in line_batches(sf, batch_bytes=BATCH_BYTES):
                for start in range(0, block.height, BATCH_LINES):
                    batch = block.slice(start, BATCH_LINES)
                    lines = _file_lines(batch.lazy(), fidx, end_year=end_year, last_month=last_month, tz=options.tz)
                    parsed = _parsed_batch(lines, dup_hashes)
                    counts.append(_batch_counts(parsed))
                    examples.append(_batch_examples(parsed, batch))
                    part = Path(tmp) / f"{len(parts)}.parquet"
                    # lz4 without statistics: about half the time of the default zstd, and read back once
                    parsed.filter(pl.col("category").is_in(["attempt", "connection", "context"])).write_parquet(part, compression="lz4", statistics=False)
                    parts.append(part)
                    del parsed, lines, batch
        if not parts:  # only empty files: an empty record table of the right shape
            part = Path(tmp) / "empty.parquet"
            _parsed_batch(_file_lines(empty.lazy(), 0, end_year=2000, last_month=None, tz=options.tz), None).write_parquet(part)
            parts.append(part)
        accounting = _accounting(counts, examples, files)
        att, con, ctx = _records(pl.scan_parquet(parts))
    names = [sf.name for sf in files]
    file_names = pl.DataFrame({"fidx": list(range(len(files))), "file": names}, schema={"fidx": pl.Int32, "file": pl.String})
    return Load(
        attempts=_attempts(att, ctx, file_names),
        connections=_connections(con, file_names),
        accounting=accounting,
    )
