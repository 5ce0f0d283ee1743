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

Lines are parsed in batches of :data:`BATCH_LINES` by the streaming engine into a scratch
Parquet file, so memory does not grow with the input while parsing.
"""

from __future__ import annotations

import re
import tempfile
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import polars as pl

from .. import schema
from ..accounting import Accounting
from ..sources import SourceFile, scan_lines
from . import Load, LoadOptions

FORMAT = "postfix"

DELIVERY_AGENTS = ("smtp", "lmtp", "error", "retry", "virtual", "local", "pipe", "discard")
INBOUND_DAEMONS = ("smtpd", "postscreen", "dnsblog", "tlsproxy")

_ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)"
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
HEADER_RE = (
    rf"^(?<hdr>(?:(?<ship>{_ISO}) )?"
    rf"(?:(?<iso>{_ISO})|(?<mon>{'|'.join(_MONTHS)}) {{1,2}}(?<day>\d{{1,2}}) (?<hms>\d\d:\d\d:\d\d)(?:\.\d+)?)"
    r" (?<host>\S+) (?<prog>[^\s\[]+?)(?:\[\d+\])?: )"
)
# syslog_name (instance) is everything before the first '/', the daemon the last component.
PROG_RE = r"^(?<instance>postfix[^/\s]*)/(?:[^/\s]+/)*(?<daemon>[^/\s]+)$"

DELIVERY_RE = (
    r"^(?<queue_id>[0-9A-Za-z]+): to=(?<to><[^>]*>|[^,]*), (?:orig_to=(?<orig><[^>]*>|[^,]*), )?"
    r"relay=(?<relay>[^,]*), (?<kv>(?:[a-z_]+=[^,]*, )*?)dsn=(?<dsn>[245]\.\d{1,3}\.\d{1,3}), "
    r"status=(?<status>[A-Za-z-]+) \((?<rsn>.*)\)$"
)
_HOSTIP = r"(?<{h}>[^\s\[\]]+)\[(?<{i}>[^\]]*)\]"
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
        rf"(?m)^(?:{_ISO} )?(?:{_ISO}|[A-Z][a-z]{{2}} {{1,2}}\d{{1,2}} \d\d:\d\d:\d\d(?:\.\d+)?) \S+ postfix[^/\s]*/(?:[^/\s]+/)*[^/\s\[]+\[\d+\]: ",
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
    found = re.findall(rf"(?m)^(?:{_ISO} )?({'|'.join(_MONTHS)}) {{1,2}}\d{{1,2}} \d\d:\d\d:\d\d", tail)
    return _MONTHS.index(found[-1]) + 1 if found else None


def _end_year(sf: SourceFile, options: LoadOptions, last_month: int | None) -> int:
    if options.year is not None:
        return options.year
    mtime = (sf.mtime or datetime.now().astimezone()).astimezone(ZoneInfo(options.tz))
    if last_month is not None and last_month > mtime.month:
        return mtime.year - 1
    return mtime.year


def _syslog_ts(end_year: int, last_month: int | None, tz: str) -> pl.Expr:
    month = pl.col("mon").replace_strict(list(_MONTHS), list(range(1, 13)), return_dtype=pl.Int32)
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


def _file_lines(fidx: int, sf: SourceFile, options: LoadOptions, *, offset: int = 0, length: int | None = None) -> pl.LazyFrame:
    """Header fields of lines ``offset .. offset+length`` of one file: fidx, line_no, line, ts,
    host, prog, msg."""
    last_month = _last_syslog_month(sf)
    end_year = _end_year(sf, options, last_month)
    line = pl.col("line")
    hdr = pl.col("_hdr")
    fast = pl.col("_fast")
    lf = scan_lines([sf])
    if offset or length is not None:
        lf = lf.slice(offset, length)
    lf = (
        lf.select(pl.lit(fidx, pl.Int32).alias("fidx"), "line_no", "line", line.str.find(": ", literal=True).alias("_c"))
        .with_columns(_bslice(line, 0, pl.col("_c")).alias("_hdr"))
        .with_columns(hdr.str.contains(_FAST_HDR_RE).fill_null(False).alias("_fast"), (hdr.str.slice(4, 1) == "-").alias("_iso"))
        .with_columns(
            # host and tag start after the stamp: 15 characters for syslog, the first space for RFC 3339
            _bslice(hdr, pl.when(pl.col("_iso")).then(hdr.str.find(" ", literal=True) + 1).otherwise(16))
            .str.splitn(" ", 2)
            .alias("_ht"),
            pl.when(~fast).then(line).str.extract_groups(HEADER_RE).alias("h"),
        )
        .unnest("h")
        .select(
            "fidx",
            "line_no",
            "line",
            pl.when(fast).then(pl.col("_ht").struct.field("field_0")).otherwise(pl.col("host")).alias("host"),
            pl.when(fast).then(pl.col("_ht").struct.field("field_1").str.splitn("[", 2).struct.field("field_0")).otherwise(pl.col("prog")).alias("prog"),
            pl.when(fast).then(_bslice(line, pl.col("_c") + 2)).otherwise(_bslice(line, pl.col("hdr").str.len_bytes())).alias("msg"),
            "ship",
            pl.when(fast & pl.col("_iso")).then(_bslice(hdr, 0, hdr.str.find(" ", literal=True))).otherwise(pl.col("iso")).alias("iso"),
            pl.when(fast & ~pl.col("_iso")).then(hdr.str.slice(0, 3)).otherwise(pl.col("mon")).alias("mon"),
            pl.when(fast & ~pl.col("_iso")).then(hdr.str.slice(4, 2).str.strip_chars_start()).otherwise(pl.col("day")).alias("day"),
            pl.when(fast & ~pl.col("_iso")).then(hdr.str.slice(7, 8)).otherwise(pl.col("hms")).alias("hms"),
        )
        .with_columns(pl.coalesce(_iso_ts("ship"), _iso_ts("iso"), _syslog_ts(end_year, last_month, options.tz)).alias("ts"))
        .drop("ship", "iso", "mon", "day", "hms")
    )
    return lf


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


def _instance_daemon() -> list[pl.Expr]:
    """``instance`` and ``daemon`` from the syslog tag (see :data:`PROG_RE`); tags with more
    than one ``/`` (``postfix/submission/smtpd``) go through the regex."""
    prog = pl.col("prog")
    slash = prog.str.find("/", literal=True)
    after = _bslice(prog, slash + 1)
    simple = prog.str.starts_with("postfix") & (after.str.len_bytes() > 0) & ~after.str.contains("/", literal=True)
    nested = pl.when(~simple & prog.str.contains("/", literal=True)).then(prog).str.extract_groups(PROG_RE)
    return [
        pl.when(simple).then(_bslice(prog, 0, slash)).otherwise(nested.struct.field("instance")).alias("instance"),
        pl.when(simple).then(after).otherwise(nested.struct.field("daemon")).alias("daemon"),
    ]


def _delivery_fields(lf: pl.LazyFrame, d: pl.Expr) -> pl.LazyFrame:
    """Fields of the delivery records in ``d`` (the message, null on other lines), as
    :data:`DELIVERY_RE` would capture them: queue_id, to, orig, relay, kv, dsn, status, rsn.

    The regex only validates (a DFA match, no captures); the fields are then cut at the
    literal separators, which in a valid record occur first where the regex puts them
    (to/relay/kv values hold no ``", "``)."""
    v = pl.col("_d")
    to_at = v.str.find(": to=", literal=True)
    relay_at = v.str.find(", relay=", literal=True)
    dsn_at = v.str.find(", dsn=", literal=True)
    status_at = v.str.find(", status=", literal=True)
    to_seg = _bslice(v, to_at + 5, relay_at - to_at - 5)
    orig_at = to_seg.str.find(", orig_to=", literal=True)
    mid = _bslice(v, relay_at + 8, dsn_at - relay_at - 8).str.splitn(", ", 2)
    post = _bslice(v, status_at + 9)
    paren = post.str.find(" (", literal=True)
    return (
        lf.with_columns(pl.when(d.str.contains(DELIVERY_RE)).then(d).alias("_d"))
        .with_columns(
            _bslice(v, 0, to_at).alias("queue_id"),
            pl.when(orig_at.is_null()).then(to_seg).otherwise(_bslice(to_seg, 0, orig_at)).alias("to"),
            _bslice(to_seg, orig_at + 10).alias("orig"),
            mid.struct.field("field_0").alias("relay"),
            (mid.struct.field("field_1") + ", ").alias("kv"),
            _bslice(v, dsn_at + 6, status_at - dsn_at - 6).alias("dsn"),
            _bslice(post, 0, paren).alias("status"),
            _bslice(post, paren + 2, post.str.len_bytes() - paren - 3).alias("rsn"),
        )
        .drop("_d")
    )


def _classified(lines: pl.LazyFrame, dup_hashes: pl.DataFrame | None) -> pl.LazyFrame:
    """One row per line: category, reason and, for records, their parsed fields."""
    lf = lines.with_columns(_instance_daemon())
    if dup_hashes is not None:
        lf = (
            lf.with_columns(pl.col("line").hash().alias("_hash"))
            .join(dup_hashes.lazy(), on="_hash", how="left", maintain_order="left")
            .with_columns((pl.col("_first").is_not_null() & (pl.col("fidx") > pl.col("_first"))).alias("_dup"))
            .drop("_hash", "_first")
        )
    else:
        lf = lf.with_columns(pl.lit(False).alias("_dup"))
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
    # Record fields: only where needed, so the collected frame stays small.
    dl = pl.col("kind") == "delivery"
    lf = _delivery_fields(lf, pl.when(dl).then(msg))
    conn_msg = pl.when(pl.col("kind") == "conn").then(msg)
    conn_text = conn_msg.str.replace(r"^[0-9A-Za-z]+: ", "")
    rtext = pl.coalesce(pl.col("rsn"), conn_text)
    lf = lf.with_columns(
        pl.when(pl.col("kind") == "conn").then(conn_msg.str.extract(r"^([0-9A-Za-z]+): ", 1)).otherwise(pl.col("queue_id")).alias("queue_id"),
        rtext.alias("rtext"),
    )
    # Remote replies ("250 2.0.0 Ok", most reasons) cannot match: the capture engine skips them.
    rt = pl.col("rtext")
    lf = lf.with_columns(pl.when(rt.str.contains(REASON_START_RE)).then(rt).str.extract_groups(REASON_RE).alias("r")).unnest("r").with_columns(_reason_fields())
    lf = lf.with_columns(_record_fields()).with_columns(_final_stage())
    # context fields
    ctx_q = pl.col("kind").is_in(("qmgr_from", "expired", "removed", "message_id"))
    lf = lf.with_columns(
        pl.when(ctx_q).then(msg).str.extract(r"^([0-9A-Za-z]+): ", 1).fill_null(pl.col("queue_id")).alias("queue_id"),
        pl.when(pl.col("kind").is_in(("qmgr_from", "expired"))).then(msg).str.extract(r": from=<([^>]*)>", 1).alias("sender"),
        pl.when(pl.col("kind") == "qmgr_from").then(msg).str.extract(r", size=(\d+)", 1).cast(pl.Int64).alias("size"),
        pl.when(pl.col("kind") == "message_id").then(msg).str.extract(r": message-id=(.*)$", 1).alias("message_id"),
    )
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


BATCH_LINES = 400_000  # lines parsed per streaming pass (bounds memory; ~300 MB per pass)

_PER_LINE = ("ts", "kind", "host", "instance", "daemon")
_CATEGORICAL = ("kind", "host", "instance", "daemon", "event", "smtp_stage", "dsn", "outcome", "enhanced_code", "egress_ip", "recipient_domain", "mx_host")
_RECORD_COLS = (
    "fidx", "line_no", "ts", "kind", "category", "host", "instance", "daemon", "queue_id",
    "recipient", "orig_recipient", "recipient_domain", "egress_ip", "mx_host", "mx_ip", "smtp_code", "enhanced_code", "dsn",
    "smtp_stage", "response", "outcome", "remote", "delay_s", "queued_at", "event", "sender", "size", "message_id",
)


def _record_fields() -> list[pl.Expr]:
    """Canonical fields of delivery records and connection events (null on other lines)."""
    relay_host = pl.col("relay").str.extract(r"^([^\[]+)\[", 1)
    relay_ip = pl.col("relay").str.extract(r"^[^\[]+\[([^\]]*)\]", 1)
    reply = pl.col("reply")
    remote_agent = pl.col("daemon").is_in(("smtp", "lmtp"))
    # Delivered (and some bounced) records carry the remote reply as the whole reason.
    bare_reply = remote_agent & relay_ip.is_not_null() & pl.col("rsn").str.contains(CODE_RE)
    is_reply = reply.is_not_null() | bare_reply.fill_null(False)
    response = pl.coalesce(reply, pl.col("rtext"))
    delay = pl.col("kv").str.extract(r"(?:^|, )delay=([\d.]+)", 1).cast(pl.Float64)
    recipient = pl.col("to").str.strip_prefix("<").str.strip_suffix(">")
    return [
        recipient.alias("recipient"),
        pl.col("orig").str.strip_prefix("<").str.strip_suffix(">").alias("orig_recipient"),
        recipient.str.extract(r"@([^@]+)$", 1).str.to_lowercase().str.strip_suffix(".").alias("recipient_domain"),
        pl.coalesce(relay_host, pl.col("r_host")).str.to_lowercase().str.strip_suffix(".").alias("mx_host"),
        pl.coalesce(relay_ip, pl.col("r_ip")).alias("mx_ip"),
        response.alias("response"),
        pl.when(is_reply).then(response.str.extract(CODE_RE, 1).cast(pl.Int16)).alias("smtp_code"),
        pl.coalesce(pl.when(is_reply).then(response.str.extract(ENHANCED_RE, 1)), pl.col("dsn")).alias("enhanced_code"),
        pl.col("status").replace_strict(STATUS_OUTCOME, default=None, return_dtype=pl.String).alias("outcome"),
        (is_reply & ~pl.col("suspended").fill_null(False) & remote_agent).alias("remote"),
        delay.alias("delay_s"),
        (pl.col("ts") - pl.duration(microseconds=(delay * 1e6).round().cast(pl.Int64))).alias("queued_at"),
        _egress_ip_from_instance(),
    ]


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
    """Per-line category and reason (categorical), plus the parsed fields on record lines only."""
    rec_mask = pl.col("category").is_in(["attempt", "connection", "context"])
    return classified.select(
        "fidx",
        "line_no",
        "category",
        pl.col("reason").cast(pl.Categorical).alias("acc_reason"),
        # (the parsed fields are null off their own kind of line already)
        *[
            _categorical((pl.when(rec_mask).then(pl.col(c)) if c in _PER_LINE else pl.col(c)), c).alias(c)
            for c in _RECORD_COLS
            if c not in ("fidx", "line_no", "category")
        ],
    )


# --- records → canonical tables ---------------------------------------------------------------

def _with_message_key(rec: pl.DataFrame) -> pl.DataFrame:
    """A queue id is reused after ``removed``: the generation counts removals before each line
    of (log_host, instance, queue_id), in line order."""
    removed = (pl.col("kind") == "removed").cast(pl.Int32)
    base = pl.format("{}/{}/{}#", pl.col("host").cast(pl.String), pl.col("instance").cast(pl.String), pl.col("queue_id"))
    return (
        rec.with_columns(base.alias("_base"))
        .with_columns((removed.cum_sum().over("_base", order_by="seq") - removed).alias("generation"))
        .with_columns(
            pl.when(pl.col("queue_id").is_not_null()).then(pl.col("_base") + pl.col("generation").cast(pl.String)).alias("message_key")
        )
        .drop("_base")
    )


def _egress_ip_from_instance() -> pl.Expr:
    """Multi-IP setups name each instance after its source address (``postfix-10.20.30.40``);
    only such names give ``egress_ip``, nothing is guessed otherwise."""
    return pl.col("instance").str.extract(r"^postfix-(\d{1,3}(?:\.\d{1,3}){3}|[0-9a-fA-F:]*:[0-9a-fA-F:]+)$", 1).alias("egress_ip")


def _attempts(att: pl.DataFrame, rec: pl.DataFrame, file_names: pl.DataFrame) -> pl.LazyFrame:
    """``att``: attempt lines; ``rec``: context lines (qmgr from=, cleanup message-id, qmgr expired)."""
    # Context reduced now to one row per message that has attempts, so the raw context lines
    # are not held until the caller collects.
    rec = rec.join(att.select("message_key").unique(), on="message_key", how="semi")
    ctx = rec.filter(pl.col("kind") == "qmgr_from").group_by("message_key").agg(pl.col("sender").first(), pl.col("size").first()).lazy()
    mid = rec.filter(pl.col("kind") == "message_id").group_by("message_key").agg(pl.col("message_id").first()).lazy()
    exp = rec.filter(pl.col("kind") == "expired").select("message_key", "ts", "fidx", "line_no", "seq", pl.col("sender").alias("exp_sender")).lazy()
    del rec
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
    out = out.join(file_names.lazy(), on="fidx", how="left", maintain_order="left").with_columns(pl.lit(FORMAT).alias("source"))
    return schema.conform(out, schema.ATTEMPT_COLUMNS)


def _connections(con: pl.DataFrame, file_names: pl.DataFrame) -> pl.LazyFrame:
    con = con.with_columns(pl.lit(FORMAT).alias("source"), pl.col("host").alias("log_host"))
    con = con.lazy().join(file_names.lazy(), on="fidx", how="left", maintain_order="left")
    return schema.conform(con, schema.CONNECTION_COLUMNS)


def _accounting(per_line: pl.LazyFrame, files: list[SourceFile]) -> Accounting:
    """Lines per (file, category, reason), with the text of the first three lines of each
    skipped/malformed/duplicate reason (re-read from the file: the per-line frame keeps no text)."""
    acc_frame = per_line.select("fidx", "line_no", "category", "acc_reason").collect()
    firsts = (
        acc_frame.filter(pl.col("category").is_in(["malformed", "skipped", "duplicate"]))
        .group_by("fidx", "category", "acc_reason")
        .agg(pl.col("line_no").bottom_k(3))
        .explode("line_no")
        .select("fidx", "line_no")
    )
    texts = []
    for fidx in firsts["fidx"].unique().to_list():
        nos = firsts.filter(pl.col("fidx") == fidx)["line_no"]
        texts.append(
            scan_lines([files[fidx]])
            .slice(0, int(nos.max()))  # first occurrences are usually early: stop reading there
            .filter(pl.col("line_no").is_in(nos.implode()))
            .select(pl.lit(fidx, pl.Int32).alias("fidx"), "line_no", pl.col("line").alias("text"))
            .collect(engine="streaming")
        )
    text_df = pl.concat(texts) if texts else pl.DataFrame(schema={"fidx": pl.Int32, "line_no": pl.Int64, "text": pl.String})
    names = [sf.name for sf in files]
    file_enum = pl.Enum(list(dict.fromkeys(names)))
    with_text = acc_frame.lazy().join(text_df.lazy(), on=["fidx", "line_no"], how="left")
    acc_lf = (
        # example lines first, in line order: from_classified keeps the first rows of each reason
        pl.concat([with_text.filter(pl.col("text").is_not_null()).sort("fidx", "line_no"), with_text.filter(pl.col("text").is_null())])
        .select(
            pl.col("fidx").replace_strict(list(range(len(names))), names, return_dtype=file_enum).alias("file"),
            "line_no",
            "category",
            pl.col("acc_reason").alias("reason"),
            pl.col("text").fill_null(""),
        )
    )
    problems = [f"{sf.name}: {p}" for sf in files for p in sf.problems]
    return Accounting.from_classified(acc_lf, fmt=FORMAT, problems=problems)


def _records(per_line: pl.LazyFrame) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Attempt lines, connection lines and context lines (qmgr from=, message-id, expired),
    each with its own columns only (a null string cell still costs 16 bytes) and its
    ``message_key``; low-cardinality columns stay categorical until ``schema.conform``."""
    # line order over all files (files are in rotation order): the tie-break after ts
    seq = (pl.col("fidx").cast(pl.Int64) * 10**12 + pl.col("line_no")).alias("seq")
    is_rec = pl.col("category").is_in(["attempt", "connection", "context"])
    keys = _with_message_key(
        per_line.filter(is_rec & pl.col("queue_id").is_not_null()).select(seq, "host", "instance", "queue_id", "kind").collect()
    ).select("seq", "message_key")

    def records(where: pl.Expr, cols: list[str]) -> pl.DataFrame:
        return per_line.filter(where).select(seq, *cols).collect().join(keys, on="seq", how="left")

    common = ["fidx", "line_no", "ts", "host", "instance", "daemon", "queue_id", "egress_ip", "mx_host", "mx_ip", "smtp_code", "enhanced_code", "smtp_stage", "response"]
    att = records(
        pl.col("category") == "attempt",
        common + ["recipient", "orig_recipient", "recipient_domain", "dsn", "outcome", "remote", "delay_s", "queued_at"],
    )
    con = records(pl.col("category") == "connection", common + ["event"])
    ctx = records(pl.col("kind").is_in(["qmgr_from", "message_id", "expired"]), ["fidx", "line_no", "ts", "kind", "sender", "size", "message_id"])
    return att, con, ctx


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
    # Lines are parsed in batches, each streamed to a scratch Parquet file: memory stays bounded
    # whatever the file size, and the records read back own compact buffers instead of pinning
    # the raw line buffers their strings were sliced from.
    with tempfile.TemporaryDirectory(prefix="deferral_kit_postfix_") as tmp:
        parts = []
        for fidx, sf in enumerate(files):
            offset = 0
            while True:
                part = Path(tmp) / f"{fidx}_{offset}.parquet"
                lines = _file_lines(fidx, sf, options, offset=offset, length=BATCH_LINES)
                _compact(_classified(lines, dup_hashes)).sink_parquet(part, engine="streaming")
                parts.append(part)
                if pl.scan_parquet(part).select(pl.len()).collect().item() < BATCH_LINES:
                    break
                offset += BATCH_LINES
        per_line = pl.scan_parquet(parts)
        # accounting first, so its per-line frame is freed before the records are read
        accounting = _accounting(per_line, files)
        att, con, ctx = _records(per_line)
    names = [sf.name for sf in files]
    file_names = pl.DataFrame({"fidx": list(range(len(files))), "file": names}, schema={"fidx": pl.Int32, "file": pl.String})
    return Load(
        attempts=_attempts(att, ctx, file_names),
        connections=_connections(con, file_names),
        accounting=accounting,
    )
