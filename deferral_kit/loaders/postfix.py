"""Postfix logs (syslog, RFC 3339, shipper-prefixed, journald short, ``journalctl -o json``) → canonical attempts.

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

Lines are read in blocks (32 MB on 2 cores, at most :data:`BATCH_LINES` lines), one block
per core at a time (:func:`_plan`), and each block's records are written to a scratch
Parquet file, so memory grows neither with the input nor with the core count while
parsing. Speed comes from doing little per line: the header is cut at literal offsets (the
capture regex only for odd shapes), a block's few dozen syslog tags are parsed and classed
once, each line is only tested for the shapes its daemon writes (delivery records for
delivery agents and qmgr, context for qmgr and cleanup, connection events for smtp/lmtp),
and each kind of line then goes through only its own parsing: the record lines (about
15 %) through the field parsing, whose regexes validate without captures while the fields
are cut at their separators, the context lines through theirs, and the rest are counted in
groups whose reasons are worked out once. The records are then keyed by integers (a hash
of host, instance and queue id; the generation from an as-of join on the ``removed``
lines), and only the final rows get the ``message_key`` string.
"""

from __future__ import annotations

import re
import tempfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import polars as pl

from .. import schema
from ..accounting import EXAMPLE_SCHEMA, EXAMPLES_PER_REASON, TABLE_SCHEMA, Accounting
from ..sources import SourceFile, head, line_batches, scan_lines
from . import Load, LoadOptions, journald
from .generic import owned

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
# DELIVERY_RE up to the ", status=" that follows the dsn
_DELIVERY_PRE_RE = (
    r"^[0-9A-Za-z]+: to=(?:<[^>]*>|[^,]*), (?:orig_to=(?:<[^>]*>|[^,]*), )?"
    r"relay=[^,]*, (?:[a-z_]+=[^,]*, )*?dsn=[245]\.\d{1,3}\.\d{1,3}$"
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
    """True when a line of ``text`` is a Postfix syslog/RFC 3339/journald line, or ``text`` is a
    ``journalctl -o json`` export with Postfix records."""
    if journald.journal_postfix(text):
        return True
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


def _syslog_ts(end_year: int, last_month: int | None, tz: str, *, mon: pl.Expr, day: pl.Expr, hms: pl.Expr) -> pl.Expr:
    """UTC instant of a year-less syslog stamp from its month number, day and ``HH:MM:SS[.ffffff]``."""
    year = pl.lit(end_year, pl.Int32)
    if last_month is not None:
        year = pl.when(mon > last_month).then(year - 1).otherwise(year)
    naive = pl.datetime(
        year,
        mon,
        day.cast(pl.Int32),
        hms.str.slice(0, 2).cast(pl.Int32),
        hms.str.slice(3, 2).cast(pl.Int32),
        hms.str.slice(6, 2).cast(pl.Int32),
        # journalctl -o short-precise writes "HH:MM:SS.ffffff"
        hms.str.slice(9, 6).str.pad_end(6, "0").cast(pl.Int32, strict=False).fill_null(0),
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


def _iso_ts(stamp: pl.Expr) -> pl.Expr:
    return (
        stamp.str.replace(r"Z$", "+00:00")
        .str.to_datetime("%Y-%m-%dT%H:%M:%S%.f%:z", time_unit="us", strict=False)
        .dt.convert_time_zone("UTC")
    )


def _month_number(name: pl.Expr) -> pl.Expr:
    return name.replace_strict(list(_MONTHS), list(range(1, 13)), default=None, return_dtype=pl.Int32)


# Fixed-shape headers (syslog "Mmm dd HH:MM:SS host prog[pid]: " and RFC 3339 "stamp host prog[pid]: ")
# are cut at byte offsets found with literal searches; only other shapes (shipper prefix,
# fractional syslog seconds, single-space days) pay for the capture regex, which is ~10x slower.
_FAST_HDR_RE = rf"^(?:(?:{'|'.join(_MONTHS)}) [ \d]\d \d\d:\d\d:\d\d|{_ISO}) \S+ [^\s\[]+(?:\[\d+\])?$"


def _bslice(s: pl.Expr, start, length=None) -> pl.Expr:
    """``s[start:start+length]`` in bytes (``str.find`` gives byte offsets, ``str.slice`` counts
    characters).  Only cut at ASCII delimiters, so the pieces stay valid UTF-8."""
    return s.cast(pl.Binary).bin.slice(start, length).cast(pl.String)


def _fast_ts(end_year: int, last_month: int | None, tz: str) -> pl.Expr:
    """Timestamp of a line whose header has the fixed shape (``_fast``), from its first bytes."""
    line = pl.col("line")
    syslog = pl.when(~pl.col("_iso")).then(line)
    return pl.coalesce(
        _iso_ts(pl.when(pl.col("_iso")).then(line.str.head(pl.col("_se")))),
        _syslog_ts(
            end_year, last_month, tz,
            mon=_month_number(syslog.str.slice(0, 3)), day=syslog.str.slice(4, 2).str.strip_chars_start(), hms=syslog.str.slice(7, 8),
        ),
    )


def _header(lf: pl.LazyFrame, *, end_year: int, last_month: int | None, tz: str) -> pl.DataFrame:
    """Header fields of lines (``line_no, line``): line_no, line, host, prog, msg, and the
    timestamp (``ts`` for odd shapes; ``_fast, _iso, _se`` to compute it for the others).

    Fixed-shape headers (syslog ``Mmm dd HH:MM:SS host tag[pid]: `` and RFC 3339
    ``stamp host tag[pid]: ``) are cut at the offsets of literal searches: the header of such
    a line is ASCII, so its byte offsets are character offsets.  Only other shapes (shipper
    prefix, fractional syslog seconds, single-space days, container prefixes) pay for the
    capture regex, about ten times slower, and only a block that has such lines computes
    their columns."""
    line = pl.col("line")
    c = pl.col
    # (each intermediate is its own column: the engine would otherwise recompute shared
    # sub-expressions once per use)
    # the header ends at the first ": " (no stamp, host or tag holds one)
    lf = lf.with_columns(line.str.find(": ", literal=True).cast(pl.Int64).alias("_p"))
    first = lf.with_columns(line.str.head(c("_p")).str.contains(_FAST_HDR_RE).fill_null(False).alias("_fast"), (line.str.slice(4, 1) == "-").alias("_iso")).collect()
    all_fast = first.height == 0 or bool(first.get_column("_fast").all())
    lf = first.lazy()
    # the stamp ends after 15 characters (syslog) or at the first space (RFC 3339)
    lf = lf.with_columns(pl.when(c("_iso")).then(line.str.find(" ", literal=True).cast(pl.Int64)).otherwise(15).alias("_se"))
    lf = lf.with_columns(pl.when(c("_fast")).then(line).str.slice(c("_se") + 1).alias("_rest"))
    lf = lf.with_columns(c("_rest").str.find(" ", literal=True).cast(pl.Int64).alias("_hs"))
    lf = lf.with_columns(
        c("_rest").str.head(c("_hs")).alias("_host"),
        c("_rest").str.slice(c("_hs") + 1, pl.when(c("_fast")).then(c("_p") - c("_se") - c("_hs") - 2)).alias("_tag"),
    )
    lf = lf.with_columns(c("_tag").str.find("[", literal=True).alias("_b"))
    keep = [n for n in ("_hash",) if n in lf.collect_schema().names()]
    fast_prog = pl.when(c("_b").is_null()).then(c("_tag")).otherwise(c("_tag").str.head(c("_b")))
    if all_fast:
        return lf.select(
            "line_no", "line", *keep, c("_host").alias("host"), fast_prog.alias("prog"), line.str.slice(c("_p") + 2).alias("msg"),
            "_fast", "_iso", "_se", pl.lit(None, schema.UTC_DT).alias("ts"),
        ).collect()
    lf = lf.with_columns(pl.when(~c("_fast")).then(line).str.extract_groups(HEADER_RE).alias("_h"))
    h = c("_h").struct.field
    return lf.select(
        "line_no",
        "line",
        *keep,
        pl.when(c("_fast")).then(c("_host")).otherwise(h("host")).alias("host"),
        pl.when(~c("_fast")).then(h("prog")).otherwise(fast_prog).alias("prog"),
        pl.when(c("_fast")).then(line.str.slice(c("_p") + 2)).otherwise(_bslice(pl.when(~c("_fast")).then(line), h("hdr").str.len_bytes())).alias("msg"),
        "_fast",
        "_iso",
        "_se",
        pl.coalesce(
            _iso_ts(h("ship")),
            _iso_ts(h("iso")),
            _syslog_ts(end_year, last_month, tz, mon=_month_number(h("mon")), day=h("day"), hms=h("hms")),
        ).alias("ts"),
    ).collect()


# syslog_name (instance) "postfix…" and one daemon, ASCII: cut at the '/'; other tags go through PROG_RE
_SIMPLE_PROG_RE = r"^postfix[!-.0-~]*/[!-.0-~]+$"


def _instance_daemon(lf: pl.LazyFrame) -> pl.LazyFrame:
    """``instance`` and ``daemon`` from the syslog tag (see :data:`PROG_RE`), and
    ``egress_ip`` from an instance named after an address."""
    prog = pl.col("prog")
    lf = lf.with_columns(prog.str.contains(_SIMPLE_PROG_RE).fill_null(False).alias("_simple"), prog.str.find("/", literal=True).alias("_s"))
    nested = pl.when(~pl.col("_simple")).then(prog).str.extract_groups(PROG_RE)
    lf = lf.with_columns(
        pl.when(pl.col("_simple")).then(prog.str.head(pl.col("_s"))).otherwise(nested.struct.field("instance")).alias("instance"),
        pl.when(pl.col("_simple")).then(prog.str.slice(pl.col("_s") + 1)).otherwise(nested.struct.field("daemon")).alias("daemon"),
    )
    return lf.with_columns(pl.col("instance").str.extract(EGRESS_INSTANCE_RE, 1).alias("egress_ip")).drop("_simple", "_s")


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


def _delivery_fields(lf: pl.LazyFrame, d: pl.Expr) -> pl.LazyFrame:
    """Fields of the delivery records in ``d`` (the message, null on other lines), as
    :data:`DELIVERY_RE` would capture them: queue_id, to, orig, relay, kv, dsn, status, rsn.

    The regex only validates (a DFA match, no captures: several times faster); the fields
    are then split at the literal separators, which in a valid record occur first where the
    regex puts them (to/relay/kv values hold no ``", "``)."""
    c = pl.col

    def split(lf: pl.LazyFrame, *parts: tuple[str, str, str, str]) -> pl.LazyFrame:
        """``col`` cut at the first ``sep`` into ``a`` (all of it when there is none) and ``b``
        (null then), as ``str.splitn(sep, 2)`` would, but with a literal search and byte
        slices (a few times faster than building the struct)."""
        lf = lf.with_columns(c(col).str.find(sep, literal=True).alias(f"_at_{a}") for col, sep, a, _ in parts)
        return lf.with_columns(
            e
            for col, sep, a, b in parts
            for e in (
                pl.when(c(f"_at_{a}").is_null()).then(c(col)).otherwise(_bslice(c(col), 0, c(f"_at_{a}"))).alias(a),
                _bslice(c(col), c(f"_at_{a}") + len(sep.encode())).alias(b),
            )
        ).drop(f"_at_{a}" for _, _, a, _ in parts)

    lf = lf.with_columns(d.alias("_d"))
    lf = split(lf, ("_d", ", status=", "_pre", "_post"))
    # DELIVERY_RE checked in two parts, so the regex does not scan the reason text
    ok = pl.col("_pre").str.contains(_DELIVERY_PRE_RE) & pl.col("_post").str.contains(r"^[A-Za-z-]+ \(") & pl.col("_post").str.ends_with(")")
    lf = lf.with_columns(pl.when(ok).then(pl.col(n)).alias(n) for n in ("_pre", "_post"))
    lf = split(lf, ("_pre", ": to=", "queue_id", "_to_rest"), ("_post", " (", "status", "_rsn"))
    lf = split(lf, ("_to_rest", ", relay=", "_to_seg", "_relay_rest")).with_columns(c("_rsn").str.strip_suffix(")").alias("rsn"))
    lf = split(lf, ("_to_seg", ", orig_to=", "to", "orig"), ("_relay_rest", ", dsn=", "_mid", "dsn"))
    lf = split(lf, ("_mid", ", ", "relay", "kv"))
    return lf.with_columns((c("kv") + ", ").alias("kv")).drop("_d", "_pre", "_post", "_to_rest", "_rsn", "_to_seg", "_relay_rest", "_mid")


_CONTEXT_KINDS = ("qmgr_from", "expired", "removed", "message_id")
KINDS = pl.Enum(["dup", "nohdr", "other_prog", "delivery", "warning", "qmgr_from", "expired", "removed", "message_id", "conn", "other"])


def _with_dups(lf: pl.LazyFrame, fidx: int, dup_hashes: pl.DataFrame | None) -> pl.LazyFrame:
    """``_dup``: the line is identical to one of an earlier file (``dup_hashes``: hashes of the
    lines seen in more than one file, with the first file's index).  ``_hash`` when present is
    the hash of the line as read (a journal record before its conversion)."""
    if dup_hashes is None:
        return lf.with_columns(pl.lit(False).alias("_dup"))
    have_hash = "_hash" in lf.collect_schema().names()
    return (
        lf.with_columns(pl.col("_hash") if have_hash else pl.col("line").hash().alias("_hash"))
        .join(dup_hashes.lazy(), on="_hash", how="left", maintain_order="left")
        .with_columns((pl.col("_first").is_not_null() & (fidx > pl.col("_first"))).alias("_dup"))
        .drop("_hash", "_first")
    )


@dataclass
class _Batch:
    """One parsed batch: record lines (deliveries and connection events), context lines, and
    the accounting of all its lines."""

    records: pl.DataFrame
    context: pl.DataFrame
    counts: pl.DataFrame
    examples: pl.DataFrame


def _lines(lines: pl.LazyFrame, fidx: int, *, end_year: int, last_month: int | None, tz: str, dup_hashes: pl.DataFrame | None) -> pl.DataFrame:
    """Header, instance, daemon, ``kind`` and the accounting flags (:func:`_rest_flags`) of
    each line (``line_no, line``)."""
    hdr = _header(lines, end_year=end_year, last_month=last_month, tz=tz)
    # A batch has a few dozen distinct tags: each is parsed (and classed) once, and its fields
    # gathered by the tag's index (cheaper than a join).
    progs = _instance_daemon(hdr.lazy().select(pl.col("prog").drop_nulls().unique())).with_columns(_tag_class()).collect()
    idx = hdr.get_column("prog").cast(pl.Enum(progs.get_column("prog"))).to_physical()
    df = hdr.with_columns(progs.get_column(name).gather(idx) for name in ("instance", "daemon", "egress_ip", "_cls"))
    df = _with_dups(df.lazy(), fidx, dup_hashes).collect()
    kind, tls = _kinds(df)
    return df.with_columns(kind, tls, pl.lit(fidx, pl.Int32).alias("fidx")).with_columns(_rest_flags()).drop("_cls")


def _parse_batch(lines: pl.DataFrame, fidx: int, *, end_year: int, last_month: int | None, tz: str) -> _Batch:
    """Records, context and accounting of a batch of :func:`_lines`.  Every expression costs
    per row, null or not, so each kind of line only goes through the parsing it needs:
    delivery records and connection events (about 15 %) through the field parsing, context
    lines (qmgr ``from=``, ``message-id=``, ``removed``) through theirs, and the rest
    (smtpd, opendkim, TLS chatter, ...) are only counted, per tag and kind."""
    c = pl.col
    kind = c("kind")
    ts = pl.when(c("_fast")).then(_fast_ts(end_year, last_month, tz)).otherwise(c("ts")).alias("ts")

    # The texts of a kind's lines are copied into one buffer first: as views into the block
    # they would be scattered over it, and every later step would wait on memory.
    stamp = owned(c("line").str.head(40)).alias("line")  # all a header's timestamp needs
    rec = lines.lazy().filter(kind.is_in(("delivery", "conn"))).with_columns(owned(c("msg")).alias("msg"), stamp).with_columns(ts)
    rec = _records_fields(rec).with_columns(
        (((kind == "delivery") & c("status").is_in(list(STATUS_OUTCOME))) | ((kind == "conn") & c("event").is_not_null())).fill_null(False).alias("_keep")
    ).collect()
    ctx = lines.lazy().filter(kind.is_in(_CONTEXT_KINDS))
    # only expiry lines need their time
    ctx = ctx.with_columns(owned(c("msg")).alias("msg"), pl.when(kind == "expired").then(stamp), pl.when(kind == "expired").then(c("ts")).alias("ts"))
    ctx = _context(ctx.with_columns(ts)).collect()

    # Lines are counted in groups (what their category and reason depend on), and the
    # reasons are worked out per group.
    def groups(lf: pl.LazyFrame, *by: str | pl.Expr) -> pl.LazyFrame:
        return lf.group_by(*by).agg(pl.len().cast(pl.Int64).alias("lines"), c("line_no").bottom_k(EXAMPLES_PER_REASON).alias("_ex"))

    def nulls(*names: str) -> list[pl.Expr]:
        return [pl.lit(None, pl.String).alias(n) for n in names]

    rest = groups(lines.lazy().filter(~kind.is_in(("delivery", "conn", *_CONTEXT_KINDS))), "kind", "_prog", "_daemon", "_tls", "_nh")
    rest = rest.rename({"_prog": "prog", "_daemon": "daemon"}).with_columns(nulls("status", "event"))
    # (a record's category depends on its status, and on whether its text was recognised)
    recs = groups(rec.lazy(), "kind", "status", c("event").is_not_null().alias("_ev"))
    recs = recs.with_columns(*nulls("prog", "daemon", "_nh"), pl.when(c("_ev")).then(pl.lit("event")).alias("event"), pl.lit(False).alias("_tls"))
    ctxs = groups(ctx.lazy(), "kind").with_columns(*nulls("prog", "daemon", "status", "event", "_nh"), pl.lit(False).alias("_tls"))
    cols = ("kind", "prog", "daemon", "status", "event", "_tls", "_nh", "lines", "_ex")
    grouped = _category(pl.concat([g.select(cols) for g in (rest, recs, ctxs)])).collect()

    acc_cols = [pl.lit(fidx, pl.Int32).alias("fidx"), "category", c("reason").cast(pl.Categorical).alias("acc_reason")]
    counts = grouped.group_by("category", "reason", maintain_order=True).agg(c("lines").sum()).select(*acc_cols, "lines")
    shown = c("category").is_in(["malformed", "skipped", "duplicate"])
    ex_lines = (
        grouped.lazy().filter(shown).select("category", "reason", c("_ex").alias("line_no")).explode("line_no")
        .group_by("category", "reason", maintain_order=True).agg(c("line_no").bottom_k(EXAMPLES_PER_REASON))
        .explode("line_no").select(*acc_cols, "line_no").collect()
    )
    texts = lines.lazy().filter(c("line_no").is_in(ex_lines["line_no"].implode())).select("line_no", c("line").alias("text")).collect()
    # A copy: the texts are views into the batch's buffer, which they would otherwise keep alive.
    texts = pl.DataFrame({"line_no": texts["line_no"], "text": texts["text"].to_list()}, schema=texts.schema)
    examples = ex_lines.join(texts, on="line_no", how="left")
    return _Batch(
        records=rec.lazy().filter(c("_keep")).select(*_record_columns(_REC_COLS)).collect(),
        context=ctx.lazy().select(*_record_columns(_CTX_COLS)).collect(),
        counts=counts,
        examples=examples,
    )


def _rest_flags() -> list[pl.Expr]:
    """What the reason of a line that is neither record nor context depends on, besides its
    kind, daemon and ``_tls`` (smtp TLS chatter, from :func:`_kinds`): ``_prog`` (other
    programs) and ``_nh`` (what a line without a syslog header looks like)."""
    kind = pl.col("kind")
    nohdr = pl.when(kind == "nohdr").then(pl.col("line"))
    return [
        pl.when(kind == "other_prog").then(pl.col("prog").str.slice(0, 40)).alias("_prog"),
        pl.when(kind == "other").then(pl.col("daemon")).alias("_daemon"),
        pl.when(nohdr.str.contains(r"^\s*$")).then(pl.lit("empty"))
        .when(nohdr.str.contains(r"status=|to=<|relay=|dsn=| said: |\(in reply to")).then(pl.lit("fragment"))
        .when(kind == "nohdr").then(pl.lit("nohdr"))
        .alias("_nh"),
    ]


# Class of a syslog tag (computed once per tag): which message shapes its lines can have.
_NOT_POSTFIX, _SMTP, _AGENT, _QMGR, _CLEANUP, _OTHER_DAEMON = range(6)
_KIND_CODE = {name: i for i, name in enumerate(KINDS.categories)}
_QID_TO_RE = r"^[0-9A-Za-z]+: to="
# a warning's keyword comes first, or after the queue id
_WARNING_RE = r"^(?:[0-9A-Za-z]+: )?(?:warning|fatal|error|panic|info): "
_QMGR_CTX_RE = r"^[0-9A-Za-z]+: (?:from=<[^>]*>, (?:size=\d|status=(?:force-)?expired)|removed$)"
_MESSAGE_ID_RE = r"^[0-9A-Za-z]+: message-id="
_CONN_RE = (
    r"^(?:[0-9A-Za-z]+: )?(?:host \S+ (?:said: |refused to talk to me)|connect to |lost connection with |conversation with "
    r"|SASL authentication failed|certificate verification failed|SSL_connect error|TLS is required|Server certificate not verified)"
)


def _tag_class() -> pl.Expr:
    daemon = pl.col("daemon")
    return (
        pl.when(pl.col("instance").is_null()).then(_NOT_POSTFIX)
        .when(daemon.is_in(("smtp", "lmtp"))).then(_SMTP)
        .when(daemon.is_in(DELIVERY_AGENTS)).then(_AGENT)
        .when(daemon == "qmgr").then(_QMGR)
        .when(daemon == "cleanup").then(_CLEANUP)
        .otherwise(_OTHER_DAEMON)
        .cast(pl.UInt8)
        .alias("_cls")
    )


def _kinds(df: pl.DataFrame) -> tuple[pl.Series, pl.Series]:
    """``kind`` of each line of ``df`` (``msg``, ``_cls``, ``_dup``): dup, nohdr, other_prog,
    delivery, warning, qmgr_from, expired, removed, message_id, conn or other; and ``_tls``
    (smtp/lmtp TLS chatter, counted apart).

    The lines are split by the class of their tag, and each part is only tested for the
    shapes its daemon writes (delivery records for delivery agents and qmgr, context for
    qmgr and cleanup, connection events for smtp/lmtp): a test costs per row it sees.  The
    shapes are exclusive (each is anchored on its own keyword), so a line is a warning when
    it is none of the others."""
    c = pl.col
    k = _KIND_CODE
    msg = c("msg")
    codes = df.select(
        pl.when(c("_dup")).then(k["dup"])
        .when(msg.is_null()).then(k["nohdr"])
        .when(c("_cls") == _NOT_POSTFIX).then(k["other_prog"])
        .otherwise(k["other"])
        .cast(pl.UInt8)
    ).to_series()
    live = df.lazy().select(pl.int_range(pl.len(), dtype=pl.UInt32).alias("_row"), "msg", "_cls", "_dup").filter(
        ~c("_dup") & msg.is_not_null() & (c("_cls") != _NOT_POSTFIX)
    ).drop("_dup")
    other = pl.lit(k["other"], pl.UInt8)
    deliv = msg.str.contains(_QID_TO_RE)
    shapes = {
        _SMTP: pl.when(deliv).then(k["delivery"]).when(msg.str.contains(_CONN_RE)).then(k["conn"]),
        _AGENT: pl.when(deliv).then(k["delivery"]),
        _QMGR: pl.when(deliv).then(k["delivery"]).when(msg.str.contains(_QMGR_CTX_RE)).then(
            pl.when(msg.str.ends_with(": removed")).then(k["removed"])
            .when(msg.str.contains(">, size=", literal=True)).then(k["qmgr_from"])
            .otherwise(k["expired"])
        ),
        _CLEANUP: pl.when(msg.str.contains(_MESSAGE_ID_RE)).then(k["message_id"]),
        _OTHER_DAEMON: None,
    }
    parts = []
    for (cls,), part in live.collect().partition_by("_cls", as_dict=True).items():
        code = shapes[cls]
        code = other if code is None else code.otherwise(other).cast(pl.UInt8)
        part = part.lazy().with_columns(code.alias("_code"))
        rest = c("_code") == k["other"]
        part = part.with_columns(pl.when(rest & msg.str.contains(_WARNING_RE)).then(k["warning"]).otherwise(c("_code")).cast(pl.UInt8).alias("_code"))
        tls = rest & msg.str.contains("TLS connection established", literal=True) if cls == _SMTP else pl.lit(False)
        parts.append(part.select("_row", "_code", tls.alias("_tls")).collect())
    if parts:
        got = pl.concat(parts)
        codes = codes.scatter(got.get_column("_row"), got.get_column("_code"))
        tls = pl.repeat(False, df.height, eager=True).scatter(got.get_column("_row"), got.get_column("_tls"))
    else:
        tls = pl.repeat(False, df.height, eager=True)
    kind = pl.Series(KINDS.categories).gather(codes).cast(KINDS).alias("kind")
    return kind, tls.alias("_tls")


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
    # "host H[IP] said: …", the reason of every remote deferral or bounce, is cut at literal
    # offsets instead (the capture regex costs microseconds per line, and a deferral storm is
    # exactly when there are many of them); the other shapes go through REASON_RE.
    rt = pl.col("rtext")
    said = rt.str.contains(_SAID_RE)
    lf = lf.with_columns(
        pl.when(said).then(rt).alias("_said"),
        pl.when(~said & rt.str.contains(REASON_START_RE)).then(rt).alias("_rt"),
    )
    lf = lf.with_columns(pl.col("_rt").str.extract_groups(REASON_RE).alias("r")).drop("_rt").unnest("r")
    lf = _said_fields(lf).with_columns(_reason_fields())
    return _record_fields(lf).with_columns(_final_stage())


_SAID_RE = r"^(?:delivery temporarily suspended: )?host [^\s\[\]]*\[[^\]]*\] (?:said|refused to talk to me): "
_SUSPENDED = "delivery temporarily suspended: "
_IN_REPLY, _COMMAND = " (in reply to ", " command)"


def _said_fields(lf: pl.LazyFrame) -> pl.LazyFrame:
    """The REASON_RE groups (suspended, h1, ip1, verb, reply, cmd) of the ``_said`` texts
    (``[delivery temporarily suspended: ]host H[IP] said|refused to talk to me: REPLY[ (in reply
    to CMD command)]``), cut at literal offsets, filled in where the regex left them null.
    Byte offsets are cut as bytes: a host name or reply may hold non-ASCII text."""
    c = pl.col
    sus = c("_said").str.starts_with(_SUSPENDED)
    lf = lf.with_columns(pl.when(sus).then(c("_said").str.slice(len(_SUSPENDED))).otherwise(c("_said")).alias("_s"))
    lf = lf.with_columns(c("_s").str.find("[", literal=True).alias("_b1"), c("_s").str.find("] ", literal=True).alias("_b2"), sus.alias("_sus"))
    lf = lf.with_columns(_bslice(c("_s"), c("_b2") + 2).alias("_after"))
    verb = pl.when(c("_after").str.starts_with("said: ")).then(pl.lit("said")).otherwise(pl.lit("refused to talk to me"))
    lf = lf.with_columns(verb.alias("_verb"))
    lf = lf.with_columns(c("_after").str.slice(c("_verb").str.len_bytes() + 2).alias("_rest"))
    # the reply ends at the first " (in reply to " when the text ends with " command)" and a command lies between
    i = c("_rest").str.find(_IN_REPLY, literal=True)
    cmd_len = c("_rest").str.len_bytes() - i - len(_IN_REPLY) - len(_COMMAND)
    lf = lf.with_columns(pl.when(c("_rest").str.ends_with(_COMMAND) & (cmd_len >= 1)).then(i).alias("_i"), cmd_len.alias("_cl"))
    fast = {
        "suspended": pl.when(c("_sus")).then(pl.lit(_SUSPENDED)),
        "h1": _bslice(c("_s"), 5, c("_b1") - 5),
        "ip1": _bslice(c("_s"), c("_b1") + 1, c("_b2") - c("_b1") - 1),
        "verb": c("_verb"),
        "reply": pl.when(c("_i").is_null()).then(c("_rest")).otherwise(_bslice(c("_rest"), 0, c("_i"))),
        "cmd": _bslice(c("_rest"), c("_i") + len(_IN_REPLY), c("_cl")),
    }
    return lf.with_columns(pl.when(c("_said").is_not_null()).then(e).otherwise(c(name)).alias(name) for name, e in fast.items()).drop(
        "_said", "_s", "_b1", "_b2", "_sus", "_after", "_verb", "_rest", "_i", "_cl"
    )


def _context(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Queue id, sender, size and message-id of the context lines (their shapes were checked
    by :func:`_kind`, so the fields are cut at literal offsets)."""
    msg = pl.col("msg")
    kind = pl.col("kind")
    q = msg.str.find(": ", literal=True)
    lf = lf.with_columns(msg.str.head(q).alias("queue_id"), msg.str.slice(q + 2).alias("_body"))
    body = pl.col("_body")
    # "from=<SENDER>, size=N, ..." and "from=<SENDER>, status=expired, ...": the sender holds no '>'
    frm = pl.when(kind.is_in(("qmgr_from", "expired"))).then(body)
    return lf.with_columns(
        _bslice(frm, 6, frm.str.find(">", literal=True) - 6).alias("sender"),
        pl.when(kind == "qmgr_from").then(body).str.extract(r", size=(\d+)", 1).cast(pl.Int64).alias("size"),
        pl.when(kind == "message_id").then(body).str.slice(11).alias("message_id"),
    ).drop("_body")


def _category(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Accounting ``category`` and ``reason`` of each line (or group of lines: see
    :func:`_rest_flags` for the columns the other lines are grouped by)."""
    have = lf.collect_schema().names()
    lf = lf.with_columns(pl.lit(None, pl.String).alias(n) for n in ("_nh", "status", "event") if n not in have)
    lf = lf.with_columns(pl.lit(False).alias("_tls")) if "_tls" not in have else lf
    kind = pl.col("kind")
    daemon = pl.col("daemon")
    status = pl.col("status")
    nh = pl.col("_nh")
    category = (
        pl.when(kind == "dup").then(pl.lit("duplicate"))
        .when(kind == "nohdr").then(pl.when(nh == "empty").then(pl.lit("skipped")).otherwise(pl.lit("malformed")))
        .when(kind == "delivery").then(
            pl.when(status.is_null()).then(pl.lit("malformed"))
            .when(status.is_in(PROBE_STATUSES)).then(pl.lit("skipped"))
            .when(status.is_in(list(STATUS_OUTCOME))).then(pl.lit("attempt"))
            .otherwise(pl.lit("skipped"))
        )
        .when(kind == "conn").then(pl.when(pl.col("event").is_not_null()).then(pl.lit("connection")).otherwise(pl.lit("skipped")))
        .when(kind.is_in(_CONTEXT_KINDS)).then(pl.lit("context"))
        .otherwise(pl.lit("skipped"))
    )
    reason = (
        pl.when(kind == "dup").then(pl.lit("identical line in an earlier file"))
        .when(kind == "nohdr").then(
            pl.when(nh == "empty").then(pl.lit("empty line"))
            .when(nh == "fragment").then(pl.lit("fragment of a wrapped record"))
            .otherwise(pl.lit("no syslog header"))
        )
        .when(kind == "other_prog").then(pl.lit("not postfix: ") + pl.col("prog").str.slice(0, 40))
        .when(kind == "warning").then(pl.lit("postfix warning/fatal"))
        .when(kind == "delivery").then(
            pl.when(status.is_null()).then(pl.lit("truncated or wrapped delivery record"))
            .when(status.is_in(PROBE_STATUSES)).then(pl.lit("address verification probe"))
            .when(status.is_in(list(STATUS_OUTCOME))).then(pl.lit(None, pl.String))
            .otherwise(pl.lit("unknown status ") + status)
        )
        .when(kind == "conn").then(pl.when(pl.col("event").is_not_null()).then(pl.lit(None, pl.String)).otherwise(pl.lit("smtp: unrecognised connection text")))
        .when(kind == "qmgr_from").then(pl.lit("qmgr from= (sender, size)"))
        .when(kind == "expired").then(pl.lit("qmgr expired (message-level)"))
        .when(kind == "removed").then(pl.lit("qmgr removed"))
        .when(kind == "message_id").then(pl.lit("cleanup message-id"))
        .when(daemon.is_in(INBOUND_DAEMONS)).then(pl.lit("inbound smtpd/postscreen"))
        .when(pl.col("_tls")).then(pl.lit("tls"))
        .when(daemon == "tlsmgr").then(pl.lit("tls"))
        .otherwise(pl.lit("postfix ") + daemon + pl.lit(": not a delivery record"))
    )
    return lf.with_columns(category.cast(_CATEGORY).alias("category"), reason.alias("reason"))


BATCH_LINES = 1_000_000  # at most this many lines parsed per batch
# Blocks parsed at once, and the text read per block; None: chosen by :func:`_plan`.
WORKERS: int | None = None
BATCH_BYTES: int | None = None
MAX_WORKERS = 8  # past this the single reader and the serial table build dominate
IN_FLIGHT_BYTES = 96 << 20  # text of the blocks being parsed or read, all workers together


def _plan() -> tuple[int, int]:
    """``(workers, batch_bytes)``: one block per thread of polars' pool (``POLARS_MAX_THREADS``
    caps it), at least two so that one core never waits for the reader, at most
    :data:`MAX_WORKERS`; and blocks sized so that the text in flight (the blocks being parsed
    and the one read ahead) stays about :data:`IN_FLIGHT_BYTES`, which bounds memory
    whatever the core count: 32 MB (about 200,000 lines) on 2 cores, 10.7 MB on 8."""
    workers = WORKERS or min(MAX_WORKERS, max(2, pl.thread_pool_size()))
    batch = BATCH_BYTES or min(32 << 20, IN_FLIGHT_BYTES // (workers + 1))
    return workers, batch

_CATEGORICAL = ("kind", "host", "instance", "daemon", "event", "smtp_stage", "dsn", "outcome", "enhanced_code", "egress_ip", "recipient_domain", "mx_host")
_REC_COLS = (
    "fidx", "line_no", "ts", "kind", "host", "instance", "daemon", "queue_id",
    "recipient", "orig_recipient", "recipient_domain", "egress_ip", "mx_host", "mx_ip", "smtp_code", "enhanced_code", "dsn",
    "smtp_stage", "response", "outcome", "remote", "delay_s", "queued_at", "event",
)
_CTX_COLS = ("fidx", "line_no", "ts", "kind", "host", "instance", "queue_id", "sender", "size", "message_id")


def _record_fields(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Canonical fields of delivery records and connection events (null on other lines)."""
    c = pl.col
    # relay=host[ip]:port split at the brackets (as ^([^\[]+)\[ and ^[^\[]+\[([^\]]*)\] would capture)
    lf = lf.with_columns(c("relay").str.find("[", literal=True).alias("_b1"))
    lf = lf.with_columns(
        pl.when(c("_b1").is_null()).then(c("relay")).otherwise(_bslice(c("relay"), 0, c("_b1"))).alias("_rh"),
        _bslice(c("relay"), c("_b1") + 1).alias("_after"),
    )
    lf = lf.with_columns(c("_after").str.find("]", literal=True).alias("_b2"))
    named = (c("_rh").str.len_bytes() > 0) & c("_after").is_not_null()
    lf = lf.with_columns(
        pl.when(named).then(c("_rh")).alias("_relay_host"),
        pl.when(named & c("_b2").is_not_null()).then(_bslice(c("_after"), 0, c("_b2"))).alias("_relay_ip"),
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
    ).drop("_rh", "_b1", "_b2", "_after", "_relay_host", "_relay_ip", "_remote_agent", "_is_reply", "_reply_text")


def _final_stage() -> pl.Expr:
    # Postfix logs status=sent only after the reply to the end of DATA (or LMTP's per-recipient reply to it).
    return (
        pl.when((pl.col("outcome") == "delivered") & pl.col("remote"))
        .then(pl.lit("end of DATA"))
        .otherwise(pl.col("smtp_stage"))
        .alias("smtp_stage")
    )


def _record_columns(cols: tuple[str, ...]) -> list[pl.Expr]:
    # low-cardinality columns categorical: the scratch files and the tables built from them stay small
    return [pl.col(c).cast(pl.Categorical) if c in _CATEGORICAL else pl.col(c) for c in cols]


def _removals(ctx: pl.LazyFrame) -> pl.DataFrame:
    """``seq, _mkey, generation`` of each qmgr ``removed`` line: the generation it starts
    (1 for the first removal of a queue id on that host and instance, counting up)."""
    removed = ctx.filter(pl.col("kind") == "removed").select("seq", "_mkey")
    # Most queue ids are removed once: the first removal of a key is generation 1 without
    # the window (five times faster on a week of logs).
    first = pl.col("_mkey").is_first_distinct()
    counted = pl.int_range(1, pl.len() + 1, dtype=pl.Int32).over("_mkey")
    return removed.collect().with_columns(pl.when(first).then(pl.lit(1, pl.Int32)).otherwise(counted).alias("generation"))


def _with_generation(lf: pl.LazyFrame, removals: pl.DataFrame) -> pl.LazyFrame:
    """Add ``generation`` (the removals of the line's queue id before it: a queue id is reused
    after ``removed``) and ``_msg`` (a hash of the key and generation: one message instance)."""
    return (
        lf.set_sorted("seq")
        .join_asof(removals.lazy().set_sorted("seq"), on="seq", by="_mkey", strategy="backward", check_sortedness=False)
        .with_columns(pl.col("generation").fill_null(0))
        .with_columns(pl.struct("_mkey", "generation").hash().alias("_msg"))
    )


def _mkey() -> pl.Expr:
    """A 64-bit hash of (log_host, instance, queue_id): the categorical codes of host and
    instance are process-wide, so no string is built per line."""
    return pl.struct(pl.col("host").to_physical(), pl.col("instance").to_physical(), "queue_id").hash().alias("_mkey")


def _message_key() -> pl.Expr:
    """``log_host/instance/queue_id#generation`` (null without a queue id)."""
    key = pl.format("{}/{}/{}#{}", pl.col("host").cast(pl.String), pl.col("instance").cast(pl.String), pl.col("queue_id"), pl.col("generation"))
    return pl.when(pl.col("queue_id").is_not_null()).then(key).alias("message_key")


# Multi-IP setups name each instance after its source address (``postfix-10.20.30.40``);
# only such names give ``egress_ip``, nothing is guessed otherwise.
EGRESS_INSTANCE_RE = r"^postfix-(\d{1,3}(?:\.\d{1,3}){3}|[0-9a-fA-F:]*:[0-9a-fA-F:]+)$"


def _attempt_numbers(att: pl.DataFrame) -> pl.Series:
    """``attempt`` of each row of ``att``: 1 for a recipient's first try in its message
    instance (``_msg``), counting up in time (line order breaks ties).  Sorting a narrow
    frame and counting from each group's start needs less memory than a window."""
    order = (
        att.lazy()
        .select(pl.int_range(pl.len(), dtype=pl.UInt32).alias("_row"), "_msg", pl.col("recipient").hash().alias("_rcpt"), "ts", "seq")
        .sort("_msg", "_rcpt", "ts", "seq")
        .with_columns(((pl.col("_msg") != pl.col("_msg").shift()) | (pl.col("_rcpt") != pl.col("_rcpt").shift())).fill_null(True).alias("_first"))
        .with_columns(pl.int_range(pl.len(), dtype=pl.Int32).alias("_i"))
        .select("_row", (pl.col("_i") - pl.when("_first").then("_i").forward_fill() + 1).alias("attempt"))
        .collect()
    )
    return pl.repeat(0, att.height, dtype=pl.Int32, eager=True).alias("attempt").scatter(order.get_column("_row"), order.get_column("attempt"))


def _attempts(att: pl.DataFrame, context: tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame], file_names: pl.DataFrame) -> pl.LazyFrame:
    """``att``: attempt lines; ``context``: sender and size, message-id (one row per message)
    and the qmgr expiry lines, from :func:`_records`."""
    ctx, mid, exp = (c.lazy() for c in context)
    # The attempt numbers and the message's sender, size and message-id are joined here on
    # narrow frames, so the plan below is only concatenation and casts: the caller's sink
    # streams it (with the joins inside, the sink held ~150 MB more for 740,000 attempts).
    keys = att.lazy().select("_msg")
    extra = keys.join(ctx, on="_msg", how="left", maintain_order="left").join(mid, on="_msg", how="left", maintain_order="left").drop("_msg").collect()
    att = att.hstack([_attempt_numbers(att), *extra.get_columns()]).lazy().with_columns(pl.col("host").alias("log_host"), pl.col("daemon").alias("agent"))

    # Expiry is message-level: the recipients whose last try was a deferral expire with it.
    pending = (
        att.join(exp.select("_msg"), on="_msg", how="semi")
        .sort("ts", "seq")
        .group_by("_msg", "recipient", maintain_order=True)
        .agg(pl.all().last())
        .filter(pl.col("outcome") == "deferred")
    )
    # (collected now: a few rows, and the plan the caller sinks stays concatenation)
    expired = pending.drop("ts", "fidx", "line_no", "seq").join(exp, on="_msg", how="inner").sort("seq", "recipient").with_columns(
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
    expired = expired.with_columns(pl.lit(None, pl.Int32).alias("attempt")).collect().lazy()
    out = pl.concat([att, expired], how="diagonal_relaxed")
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


def _records(rec: pl.LazyFrame, ctx: pl.LazyFrame) -> tuple[pl.DataFrame, pl.DataFrame, tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]]:
    """Attempt lines, connection lines and context lines (qmgr from=, message-id, expired),
    each read with its own columns only (a null string cell still costs 16 bytes).  A message
    instance is joined on ``_msg`` (a hash of its key and generation); only attempts and
    connection events get the ``message_key`` string.  Low-cardinality columns stay
    categorical until ``schema.conform``."""
    # line order over all files (files are in rotation order): the tie-break after ts
    seq = (pl.col("fidx").cast(pl.Int64) * 10**12 + pl.col("line_no")).alias("seq")
    rec, ctx = rec.with_columns(seq, _mkey()), ctx.with_columns(seq, _mkey())
    removals = _removals(ctx)

    def of(lf: pl.LazyFrame, kind: str, cols: list[str]) -> pl.LazyFrame:
        return _with_generation(lf.filter(pl.col("kind") == kind).select("seq", "_mkey", *cols), removals)

    common = ["fidx", "line_no", "ts", "host", "instance", "daemon", "queue_id", "egress_ip", "mx_host", "mx_ip", "smtp_code", "enhanced_code", "smtp_stage", "response"]
    att = of(rec, "delivery", [*common, "recipient", "orig_recipient", "recipient_domain", "dsn", "outcome", "remote", "delay_s", "queued_at"])
    con = of(rec, "conn", [*common, "event"])
    keyed = [att.with_columns(_message_key()).drop("generation", "_mkey"), con.with_columns(_message_key()).drop("generation", "_mkey")]
    # Context reduced to one row per message (the first line of each, in line order).
    sender = of(ctx, "qmgr_from", ["sender", "size"]).select("_msg", "sender", "size").unique("_msg", keep="first", maintain_order=True)
    mid = of(ctx, "message_id", ["message_id"]).select("_msg", "message_id").unique("_msg", keep="first", maintain_order=True)
    exp = of(ctx, "expired", ["ts", "fidx", "line_no", "sender"]).select("_msg", "ts", "fidx", "line_no", "seq", pl.col("sender").alias("exp_sender"))
    att, con, sender, mid, exp = (lf.collect() for lf in (*keyed, sender, mid, exp))
    return att, con, (sender, mid, exp)


def _blocks(files: list[SourceFile], options: LoadOptions, batch_bytes: int) -> Iterator[tuple[pl.DataFrame, int, dict, bool]]:
    """Blocks of about ``batch_bytes`` of text (``line_no, line``; at most
    :data:`BATCH_LINES` lines) of every file, in order, with the file's index, timestamp
    settings and whether it is a ``journalctl -o json`` export."""
    for fidx, sf in enumerate(files):
        last_month = _last_syslog_month(sf)
        ts_opts = dict(end_year=_end_year(sf, options, last_month), last_month=last_month, tz=options.tz)
        journal = journald.is_journal_json(head(sf))
        for block in line_batches(sf, batch_bytes=batch_bytes):
            for start in range(0, block.height, BATCH_LINES):
                yield block.slice(start, BATCH_LINES).select("line_no", "line"), fidx, ts_opts, journal


def _work(block: pl.DataFrame, fidx: int, ts_opts: dict, journal: bool, dup_hashes: pl.DataFrame | None, out: Path) -> tuple[pl.DataFrame, pl.DataFrame, Path, Path]:
    """One block, parsed: its accounting, and its records and context lines written to Parquet
    under ``out`` (lz4 without statistics: about half the time of the default zstd, and read
    back once).  A journal export's records become the RFC 3339 lines they stand for; their
    duplicates are found on the records as written (each has its own ``__CURSOR``)."""
    if journal:
        raw = block.get_column("line").hash().alias("_hash")
        block = journald.to_syslog_lines(block).with_columns(raw)
    b = _parse_batch(_lines(block.lazy(), fidx, dup_hashes=dup_hashes, **ts_opts), fidx, **ts_opts)
    rec, ctx = out.with_suffix(".rec.parquet"), out.with_suffix(".ctx.parquet")
    b.records.write_parquet(rec, compression="lz4", statistics=False)
    b.context.write_parquet(ctx, compression="lz4", statistics=False)
    return b.counts, b.examples, rec, ctx


def _duplicate_hashes(files: list[SourceFile]) -> pl.DataFrame:
    """``_hash, _first``: hashes of lines found in more than one file (overlapping rotated
    copies, a file given twice), with the first file holding each.  Only the 64-bit hashes
    are kept (streamed from the files), and only the repeated ones are grouped."""
    hashes = pl.concat(
        [scan_lines([sf]).select(pl.lit(i, pl.Int32).alias("fidx"), pl.col("line").hash().alias("_hash")) for i, sf in enumerate(files)]
    ).collect(engine="streaming")
    return (
        hashes.lazy()
        .filter(pl.col("_hash").is_duplicated())
        .group_by("_hash")
        .agg(pl.col("fidx").min().alias("_first"), pl.col("fidx").n_unique().alias("_n"))
        .filter(pl.col("_n") > 1)
        .drop("_n")
        .collect()
    )


def load(files: list[SourceFile], options: LoadOptions) -> Load:
    """Read Postfix logs into attempts (one row per recipient per try), connection events
    and the line accounting (every line: attempt, connection, context, skipped, duplicate
    or malformed)."""
    if not files:
        return Load()
    dup_hashes = _duplicate_hashes(files) if options.dedupe and len(files) > 1 else None
    # Lines are parsed in batches, each batch's records written to scratch Parquet files:
    # memory stays bounded whatever the file size, and the records read back own compact
    # buffers instead of pinning the raw line buffers their strings were sliced from.
    # Each batch is counted for the accounting (with the text of its first lines of each
    # reason) as it is parsed.
    with tempfile.TemporaryDirectory(prefix="deferral_kit_postfix_") as tmp:
        # One block parsed per core (polars releases the GIL, and most steps of one block
        # run on one core), and the next one read meanwhile, so that no core waits for the
        # reader.  Results are taken in block order, so rows keep line order.
        workers, batch_bytes = _plan()
        done: list[tuple[pl.DataFrame, pl.DataFrame, Path, Path]] = []
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending: deque[Future] = deque()
            for i, (block, fidx, ts_opts, journal) in enumerate(_blocks(files, options, batch_bytes)):
                pending.append(pool.submit(_work, block, fidx, ts_opts, journal, dup_hashes, Path(tmp) / f"{i}"))
                del block
                while len(pending) > workers:
                    done.append(pending.popleft().result())
            done.extend(f.result() for f in pending)
        if not done:  # only empty files: empty record tables of the right shape
            empty = pl.DataFrame(schema={"line_no": pl.Int64, "line": pl.String})
            done.append(_work(empty, 0, dict(end_year=2000, last_month=None, tz=options.tz), False, None, Path(tmp) / "empty"))
        counts, examples, rec_parts, ctx_parts = (list(x) for x in zip(*done, strict=True))
        accounting = _accounting(counts, examples, files)
        att, con, ctx = _records(pl.scan_parquet(rec_parts), pl.scan_parquet(ctx_parts))
    names = [sf.name for sf in files]
    file_names = pl.DataFrame({"fidx": list(range(len(files))), "file": names}, schema={"fidx": pl.Int32, "file": pl.String})
    return Load(
        attempts=_attempts(att, ctx, file_names),
        connections=_connections(con, file_names),
        accounting=accounting,
    )
