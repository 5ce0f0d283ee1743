"""Microsoft Exchange Server message tracking logs (``MSGTRK*.LOG``) → canonical attempts.

Each file's own ``#Fields:`` header names the columns (Exchange 2010: 26 fields, 2013: 27,
2016/2019: 30); header-less excerpts are matched to those lists by field count.  Quoted
fields with commas and a UTF-8 BOM are read by the CSV parser.

Events (formats.md §5.1): ``DEFER`` → deferred, ``FAIL`` → bounced (expired when the status
says ``4.4.7 QUEUE.Expired``), ``SEND``/``SENDEXTERNAL`` → delivered to the next hop
(``agent`` "smtp", ``remote`` true), ``DELIVER`` → delivered to a local mailbox (``agent``
"local").  Every other event (RECEIVE, HAREDIRECT, AGENTINFO, NOTIFYMAPI, SUBMIT, DSN,
TRANSFER, ...) is skipped with the event as the reason.  ``recipient-address`` and
``recipient-status`` are zipped on ``;`` into one row per recipient.

Replies: a queue "last error" (``{LED=451 4.4.0 Primary target IP address responded with:
"452 4.3.1 ..."}``) gives the remote reply inside the quotes as ``response`` and the outer
status as ``dsn``; statuses Exchange writes itself (``QUEUE.``, ``RESOLVER.``, ``ROUTING.``,
``STOREDRV.``, DNS and connection errors) have ``remote`` false.  For SEND the reply to the
end of data is in ``source-context``.

SMTP Send/Receive *protocol* logs are a different log: they are recognised and refused with
a clear error (their replies are per session, not per recipient).
"""

from __future__ import annotations

import csv
import io
import re

import polars as pl

from .. import schema
from ..sources import InputError, SourceFile, head
from . import Load, LoadOptions
from .generic import REPLY_REGEX, account, squash_spaces, domain_of, normalize_host, number_attempts

FORMAT = "exchange"

_F2010 = (
    "date-time,client-ip,client-hostname,server-ip,server-hostname,source-context,connector-id,source,event-id,"
    "internal-message-id,message-id,recipient-address,recipient-status,total-bytes,recipient-count,"
    "related-recipient-address,reference,message-subject,sender-address,return-path,message-info,directionality,"
    "tenant-id,original-client-ip,original-server-ip,custom-data"
).split(",")
_F2013 = _F2010[:11] + ["network-message-id"] + _F2010[11:]
_F2016 = _F2013 + ["transport-traffic-type", "log-id", "schema-version"]
_BY_COUNT = {len(f): f for f in (_F2010, _F2013, _F2016)}

_ATTEMPT_EVENTS = ("DEFER", "FAIL", "SEND", "SENDEXTERNAL", "DELIVER")

_ROW = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z,", re.M)
_EVENT = re.compile(r",(?:SMTP|STOREDRIVER|AGENT|ROUTING|QUEUE|DSN|DNS|ADMIN|GATEWAY|MAILBOXRULE|MEETINGMESSAGEPROCESSOR|ORAR|PICKUP|POISONMESSAGE|PUBLICFOLDER|REDUNDANCY|RESOLVER|APPROVAL|BOOTLOADER),[A-Z]{3,20},")
_PROTOCOL_HEADER = re.compile(r"^#(Log-type:\s*SMTP (Send|Receive) Protocol Log|Fields:\s*date-time,connector-id,session-id,sequence-number)", re.M | re.I)
_PROTOCOL_ROW = re.compile(r"^\d{4}-\d\d-\d\dT[\d:.]+Z,[^,]*,[0-9A-F]{16},\d+,[^,]*:\d+,[^,]*:\d+,[<>*+-],", re.M)

# Statuses Exchange writes itself rather than relaying a remote reply.
_LOCAL_STATUS = r"(?i)\b(QUEUE|RESOLVER|ROUTING|STOREDRV|CAT|AGENT|DNS)\.|DNS query failed|failed to connect|unable to connect|error encountered while communicating|socket error|timed out|connection (was )?(refused|dropped|closed|reset)|no connection could be made|target host responded with error"


def sniff(text: str) -> bool:
    """An Exchange message tracking (or protocol) log: the ``#Software: Microsoft Exchange``
    header, or header-less rows of ``date-time,...,source,EVENT-ID,...``."""
    if re.search(r"^#Software:\s*Microsoft Exchange", text, re.M | re.I) or _PROTOCOL_HEADER.search(text):
        return True
    if re.search(r"^#Fields:\s*date-time,client-ip,", text, re.M):
        return True
    rows = _ROW.findall(text)
    if not rows:
        return False
    first_rows = [ln for ln in text.splitlines() if _ROW.match(ln)][:5]
    return bool(_PROTOCOL_ROW.search(text)) or any(_EVENT.search(ln) for ln in first_rows)


def _layout(sf: SourceFile) -> tuple[list[str], int]:
    """The file's field names and the number of header lines before its first record."""
    text = head(sf)
    if _PROTOCOL_HEADER.search(text) or (_PROTOCOL_ROW.search(text) and not _EVENT.search(text)):
        raise InputError(
            f"{sf.name}: not supported: Exchange SMTP protocol log (per-session SMTP conversation, "
            "not per-recipient message tracking); give the MessageTracking logs (MSGTRK*.LOG) instead"
        )
    lines = text.splitlines()
    n_header = 0
    fields: list[str] | None = None
    for ln in lines:
        if not ln.startswith("#"):
            break
        n_header += 1
        if ln.lower().startswith("#fields:"):
            fields = [f.strip() for f in ln.split(":", 1)[1].split(",")]
    if fields is None:
        first = next((ln for ln in lines[n_header:] if ln.strip()), "")
        count = len(next(csv.reader(io.StringIO(first)), []))
        fields = _BY_COUNT.get(count)
        if fields is None:
            raise InputError(f"{sf.name}: Exchange message tracking rows without a #Fields header have {count} fields, expected 26, 27 or 30")
    missing = {"date-time", "event-id", "recipient-address"} - set(fields)
    if missing:
        raise InputError(f"{sf.name}: #Fields header lacks {sorted(missing)}")
    return fields, n_header


def _rows(sf: SourceFile) -> tuple[pl.LazyFrame, pl.LazyFrame]:
    """(records: file, line_no, the row's own checks and hash, and the used fields of attempt
    rows only; header lines)."""
    fields, n_header = _layout(sf)
    lf = pl.scan_csv(
        sf.readable,
        has_header=False,
        new_columns=fields,
        schema={f: pl.String for f in fields},
        comment_prefix="#",
        quote_char='"',
        truncate_ragged_lines=True,
        encoding="utf8-lossy",
        row_index_name="_row",
    )
    # A row cut short (a log copied while being written) misses its last fields; only
    # schema-version (2016+) is always filled, so only there can truncation be told apart.
    complete = pl.col(fields[-1]).is_not_null() if fields[-1] == "schema-version" else pl.lit(True)
    event = pl.col("event-id").str.strip_chars().str.to_uppercase()
    # Identity of the whole row for the duplicate check: two independent 64-bit hashes of all
    # fields (a collision of both is ~1e-27 per pair), so the row text is never built.
    whole = pl.struct([pl.col(f).fill_null("") for f in fields])
    # Only attempt rows need their fields after this scan: null the rest early (memory).
    keep = event.is_in(_ATTEMPT_EVENTS).fill_null(False)
    rows = lf.select(
        pl.lit(sf.name).alias("file"),
        (pl.col("_row").cast(pl.Int64) + n_header + 1).alias("line_no"),
        complete.alias("_complete"),
        pl.all_horizontal([pl.col(f).fill_null("").str.strip_chars() == "" for f in fields]).alias("_blank"),
        pl.col("date-time").str.contains(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d").fill_null(False).alias("_ts_ok"),
        event.alias("_event"),
        whole.hash(11).alias("_h1"),
        whole.hash(29).alias("_h2"),
        *[pl.when(keep).then(pl.col(f)).alias(f) for f in fields if f in _USED],
    )
    rows = rows.with_columns([pl.lit(None, dtype=pl.String).alias(f) for f in _USED if f not in fields])
    header = pl.LazyFrame(
        {"file": [sf.name] * n_header, "line_no": list(range(1, n_header + 1))},
        schema={"file": pl.String, "line_no": pl.Int64},
    )
    return rows.select("file", "line_no", "_complete", "_blank", "_ts_ok", "_event", "_h1", "_h2", *_USED), header


_USED = (
    "date-time", "client-ip", "client-hostname", "server-ip", "server-hostname", "source-context", "connector-id",
    "source", "internal-message-id", "message-id", "recipient-address", "recipient-status", "total-bytes",
    "sender-address", "return-path", "message-info",
)


def _per_recipient(frame: pl.LazyFrame) -> pl.LazyFrame:
    """One row per recipient: ``recipient-address`` and ``recipient-status`` zipped on ``;``.

    A status may itself contain ``;`` (``550 4.4.7 QUEUE.Expired;<text>``, ``[{LRT=};{LED=...}]``),
    so statuses are split only where a new ``NNN`` code starts.
    """
    rcpts = pl.col("recipient-address").fill_null("").str.split(";")
    statuses = pl.col("recipient-status").str.replace_all(r";\s*(\d{3}[ -]?\d?)", "\x1f${1}").str.split("\x1f")
    frame = frame.with_columns(rcpts.alias("_rcpts"), statuses.alias("_statuses"))
    frame = frame.with_columns(pl.int_ranges(pl.col("_rcpts").list.len()).alias("_i")).explode("_rcpts", "_i")
    one = pl.col("_statuses").list.len() == 1
    status = pl.when(one).then(pl.col("_statuses").list.first()).otherwise(pl.col("_statuses").list.get(pl.col("_i"), null_on_oob=True)).str.strip_chars()
    return frame.with_columns(
        pl.col("_rcpts").str.strip_chars().alias("recipient"),
        pl.when(status != "").then(status).alias("_status"),
    ).drop("_rcpts", "_statuses", "_i", "recipient-address", "recipient-status")


def _canonical(frame: pl.LazyFrame) -> pl.LazyFrame:
    # Staged: every regex runs once per row into a column that later steps read.
    status = pl.col("_status")
    frame = frame.with_columns(
        _outer=status.str.extract(r"\{LED=([^}]*)\}").fill_null(status),
        _fqdn=pl.when(status.str.contains("{FQDN=", literal=True)).then(status).str.extract(r"\{FQDN=([^}]*)\}"),
        _ip=pl.when(status.str.contains("{IP=", literal=True)).then(status).str.extract(r"\{IP=([^}]*)\}"),
        # SEND: the next hop's reply to the end of data sits in source-context (";250 2.6.0 ... ;ClientSubmitTime:").
        _sent=pl.when(pl.col("_event").is_in(["SEND", "SENDEXTERNAL"])).then(pl.col("source-context")).str.extract(r"^;?\s*(?:[^;=]*=\s*)?([2-5]\d\d[ -][^;]*)"),
        _ev=pl.col("_event"),
        _src=pl.col("source").str.to_uppercase(),
    )
    outer = pl.col("_outer")
    ev = pl.col("_ev")
    is_send = ev.is_in(["SEND", "SENDEXTERNAL"])
    frame = frame.with_columns(
        _inner=pl.when(outer.str.contains("responded with", literal=True)).then(outer).str.extract(r'responded with:?\s*"?(\d{3}[ -][^"]*)"?'),
        _outer_g=outer.str.extract_groups(REPLY_REGEX),
        # Regexes run only on the rows whose outcome they can change (null elsewhere: cheap).
        _expired=pl.when(ev == "FAIL").then(outer).str.contains(r"4\.4\.7|QUEUE\.Expired").fill_null(False),
        _local=pl.when(ev.is_in(["DEFER", "FAIL"])).then(outer).str.contains(_LOCAL_STATUS).fill_null(False),
    )
    inner = pl.col("_inner")
    response = squash_spaces(pl.when(is_send & pl.col("_sent").is_not_null()).then(pl.col("_sent")).otherwise(inner.fill_null(outer)))
    frame = frame.with_columns(response.alias("response"))
    outer_enh = pl.col("_outer_g").struct.field("enhanced")
    outer_code = pl.col("_outer_g").struct.field("code")
    expired = pl.col("_expired")
    local_status = pl.col("_local") & inner.is_null()
    smtp_src = pl.col("_src") == "SMTP"
    remote = is_send | inner.is_not_null() | (ev.is_in(["DEFER", "FAIL"]) & smtp_src & outer_code.is_not_null() & ~local_status & ~expired)
    agent = (
        pl.when(ev == "DELIVER").then(pl.lit("local"))
        .when(expired).then(pl.lit("queue"))
        .when(is_send | smtp_src).then(pl.lit("smtp"))
        .otherwise(pl.col("_src").str.to_lowercase().fill_null("exchange"))
    )
    towards_mx = is_send | (ev.is_in(["DEFER", "FAIL"]) & smtp_src)
    sender = pl.col("return-path").fill_null(pl.col("sender-address")).str.strip_chars()
    internal_id = pl.col("internal-message-id")
    message_id = pl.col("message-id").str.strip_chars().str.strip_prefix("<").str.strip_suffix(">")
    arrived = pl.col("message-info").str.slice(0, 40).str.extract(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z)").str.to_datetime("%Y-%m-%dT%H:%M:%S%.fZ", time_unit="us", time_zone="UTC", strict=False)
    ts = pl.col("date-time").str.to_datetime("%Y-%m-%dT%H:%M:%S%.fZ", time_unit="us", time_zone="UTC", strict=False)
    reply = pl.col("response").str.extract_groups(REPLY_REGEX)
    out = frame.with_columns(
        ts.alias("ts"),
        pl.lit(FORMAT).alias("source"),
        pl.when(is_send).then(pl.col("client-hostname")).when(ev == "DELIVER").then(pl.col("server-hostname")).alias("log_host"),
        agent.alias("agent"),
        internal_id.alias("queue_id"),
        pl.concat_str(pl.lit("exchange:"), internal_id.fill_null(""), pl.lit(":"), message_id.fill_null("")).alias("message_key"),
        message_id.alias("message_id"),
        pl.when(sender == "<>").then(pl.lit("")).otherwise(sender).alias("sender"),
        pl.when(towards_mx).then(pl.col("client-ip")).alias("egress_ip"),
        pl.col("connector-id").alias("egress_pool"),
        pl.when(towards_mx).then(normalize_host(pl.col("_fqdn")).fill_null(normalize_host(pl.col("server-hostname")))).alias("mx_host"),
        pl.when(towards_mx).then(pl.col("_ip").fill_null(pl.col("server-ip")).str.replace(r":\d+$", "")).alias("mx_ip"),
        reply.struct.field("code").cast(pl.Int16, strict=False).alias("smtp_code"),
        reply.struct.field("enhanced").fill_null(outer_enh).alias("enhanced_code"),
        outer_enh.alias("dsn"),
        pl.when(is_send & pl.col("_sent").is_not_null()).then(pl.lit("end of DATA")).alias("smtp_stage"),
        pl.when(expired).then(pl.lit("expired"))
        .when(ev == "FAIL").then(pl.lit("bounced"))
        .when(ev == "DEFER").then(pl.lit("deferred"))
        .otherwise(pl.lit("delivered"))
        .alias("outcome"),
        remote.alias("remote"),
        arrived.alias("queued_at"),
        pl.col("total-bytes").cast(pl.Int64, strict=False).alias("size"),
        domain_of(pl.col("recipient")).alias("recipient_domain"),
    ).with_columns(
        ((pl.col("ts") - pl.col("queued_at")).dt.total_microseconds() / 1e6).alias("delay_s"),
    )
    return schema.conform(out.with_columns(pl.lit(None, dtype=pl.Int32).alias("attempt")))


def load(files: list[SourceFile], options: LoadOptions) -> Load:
    """Exchange message tracking files → attempts (one row per recipient of each DEFER, FAIL,
    SEND, SENDEXTERNAL and DELIVER event); no connection events (the tracking log has none)."""
    # One pass over each file, one file at a time (memory): its row checks and hashes (for
    # the accounting) and the canonical attempts of its delivery events.  Only the duplicate
    # check and the attempt numbering need all files, and they run on those small results.
    slim, tried, headers = [], [], []
    for sf in files:
        rows, header = _rows(sf)
        rows = rows.collect(engine="streaming")
        headers.append(header)
        slim.append(rows.select("file", "line_no", "_complete", "_blank", "_ts_ok", "_event", "_h1", "_h2"))
        ok = ~pl.col("_blank") & pl.col("_complete") & pl.col("_ts_ok") & pl.col("_event").is_in(_ATTEMPT_EVENTS).fill_null(False)
        att = rows.lazy().filter(ok).drop("_complete", "_blank", "_ts_ok", "_h1", "_h2")
        tried.append(_canonical(_per_recipient(att)).collect())
        del rows
    rows = pl.concat(slim)
    first = pl.struct("_h1", "_h2").is_first_distinct() if options.dedupe else pl.lit(True)
    event = pl.col("_event")
    category = (
        pl.when(pl.col("_blank")).then(pl.lit("skipped"))
        .when(~pl.col("_complete") | ~pl.col("_ts_ok") | event.is_null()).then(pl.lit("malformed"))
        .when(~first).then(pl.lit("duplicate"))
        .when(event.is_in(_ATTEMPT_EVENTS)).then(pl.lit("attempt"))
        .otherwise(pl.lit("skipped"))
    )
    reason = (
        pl.when(pl.col("_blank")).then(pl.lit("blank line"))
        .when(~pl.col("_complete")).then(pl.lit("truncated row (fields missing)"))
        .when(~pl.col("_ts_ok")).then(pl.lit("no date-time"))
        .when(event.is_null()).then(pl.lit("no event-id"))
        .when(~first).then(pl.lit("identical row already read"))
        .when(event.is_in(_ATTEMPT_EVENTS)).then(pl.lit(None, dtype=pl.String))
        .otherwise(pl.concat_str(event, pl.lit(" event (not a delivery try)")))
    )
    rows = rows.with_columns(category.alias("category"), reason.alias("reason"))
    classified = pl.concat(
        [
            rows.lazy().select("file", "line_no", "category", "reason"),
            pl.concat(headers).select("file", "line_no", pl.lit("context").alias("category"), pl.lit("#header").alias("reason")),
        ],
        how="vertical",
    )
    accounting = account(classified, files=files, fmt=FORMAT, problems=[f"{sf.name}: {p}" for sf in files for p in sf.problems])
    attempts = pl.concat(tried)
    dups = rows.filter(pl.col("category") == "duplicate").select("file", "line_no")
    if dups.height:
        attempts = attempts.join(dups, on=["file", "line_no"], how="anti", maintain_order="left")
    attempts = number_attempts(attempts.lazy(), sort=False).collect().lazy()
    return Load(attempts=attempts, connections=schema.empty(schema.CONNECTION_COLUMNS), accounting=accounting)
