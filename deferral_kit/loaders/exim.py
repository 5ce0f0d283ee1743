"""Exim mainlog loader: ``=>``/``->``/``>>`` deliveries, ``==`` deferrals, ``**`` failures.

Reads the plain mainlog (``2024-05-01 10:00:00[.mmm][ +zzzz] [[pid]] <id> <flag> ...``) and
the syslog-wrapped forms (``Feb 19 22:41:18 host exim[pid]: <id> ...``,
``host exim[pid]: 2021-07-17 23:20:49 ...``), 23- and 16-character message ids.

What becomes of each line (see :class:`deferral_kit.accounting.Accounting`):

* attempt: ``=>``, ``->``, ``>>`` (delivered), ``==`` (deferred), ``**`` (bounced, or
  expired for ``retry timeout exceeded``).  ``agent`` is ``smtp``/``lmtp`` for a try against
  a remote host (``H=`` present, or a remote-looking transport that failed to connect),
  ``local`` for local transports, ``router`` for routing-time results without a transport,
  ``retry`` for retry-rule give-ups, ``internal`` for transport-level queueing decisions
  (``SMTP delivery explicitly queued``, concurrency limits) that contacted no host.
* connection: per-host lines without a flag (``SMTP error from remote mail server after
  ...`` for one host, ``host [ip] Connection timed out``), which Exim writes before the
  ``==`` line for the same try, so they must not be counted as attempts again.
* context: ``<=`` arrivals (sender, size, Message-ID, and the reuse generation of the id),
  ``Completed``, and physical lines joined onto the record before them.
* skipped (non-attempts): ``retry time not reached`` deferrals (Exim made no try),
  ``*>`` (-N), frozen/unfrozen notices, inbound SMTP session lines, cPanel extras.

Long syslog lines split by Exim as ``[n/m] ...`` are rejoined onto their first piece (same
pid, in order); a physical line without any timestamp after a record is a wrapped
continuation and is joined onto it with a space.  Timestamps without an offset are in
``options.tz``; year-less syslog stamps take ``options.year`` or the file's mtime year.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import polars as pl
import polars.selectors  # noqa: F401

from .. import schema
from ..sources import SourceFile, scan_lines
from .generic import account, later_copies, owned, squash_spaces, try_numbers

if TYPE_CHECKING:  # (imported at call time: the package imports this module)
    from . import Load

FORMAT = "exim"

_ID = r"(?:[0-9A-Za-z]{6}-[0-9A-Za-z]{6,11}-[0-9A-Za-z]{2,4}|\*{6,})"
_EXIM_TS = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?(?: [+-]\d{4})?"
_SNIFF = (
    r"(?m)^(?:(?:[A-Z][a-z]{2} [ \d]?\d \d\d:\d\d:\d\d |\d{4}-\d\d-\d\dT\S+ )?\S+ exim\[\d+\]: )?"
    rf"(?:{_EXIM_TS} )?(?:\[\d+\] )?"
    rf"(?:{_ID} (?:<=|=>|->|==|\*\*|>>|\*>|Completed|SMTP error from remote mail server)"
    r"|H=\S+ (?:\([^)]*\) )?\[[0-9A-Fa-f.:]+\](?::\d+)? .*(?:rejected|sender verify)"
    r"|\S+ authenticator failed for |exim \d\.\d+ daemon started)"
)

# Wrapper: optional syslog/ISO stamp, optional "host exim[pid]: ", optional Exim stamp, optional [pid].
_WRAP = (
    r"^(?P<pre>(?:(?:(?P<bsd>[A-Z][a-z]{2} [ \d]?\d \d\d:\d\d:\d\d)"
    r"|(?P<d1>\d{4}-\d\d-\d\d)[ T](?P<t1>\d\d:\d\d:\d\d)(?:[.,](?P<f1>\d+))?(?: ?(?P<o1>Z|[+-]\d\d:?\d\d))?) )?"
    r"(?:(?P<host>\S+) exim\[(?P<spid>\d+)\]: )?"
    r"(?:(?P<d2>\d{4}-\d\d-\d\d) (?P<t2>\d\d:\d\d:\d\d)(?:\.(?P<f2>\d+))?(?: (?P<o2>[+-]\d{4}))? )?"
    r"(?:\[(?P<pid>\d+)\] )?(?P<split>\[(?P<sn>\d+)(?P<ssep>[/\\])(?P<sm>\d+)\] )?)"
)

_MONTHS = {m: i for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}

# The reply part of an error message: current form "SMTP error from remote mail server after
# RCPT TO:<x>: 452 ..." and older "... after MAIL FROM:<x> SIZE=1: host H [ip]: 421 ...".
_SMTP_ERR = (
    r"^(?P<proto>SMTP|LMTP|PRDR) error (?:from remote mail server )?after (?P<cmd>.+?): "
    r"(?:host (?P<ohost>\S+) \[(?P<oip>[^\]]+)\](?::\d+)?: )?(?P<reply>\d{3}(?:[ -].*)?)$"
)

_DURATION = r"^(?:(?P<w>\d+)w)?(?:(?P<d>\d+)d)?(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m)?(?:(?P<s>\d+(?:\.\d+)?)s)?(?:(?P<ms>\d+)ms)?$"

_CONNECT_TROUBLE = r"(?i)connection refused|timed out|network is unreachable|no route to host|connection reset|host is down|remote host closed|lost connection|tls|certificate|authentication required"


def sniff(text: str) -> bool:
    """True when one of the first lines is an Exim mainlog record (message id + flag, or an
    Exim-only inbound line such as ``H=host [ip] ... rejected``)."""
    return re.search(_SNIFF, text[:65536]) is not None


def duration_seconds(expr: pl.Expr) -> pl.Expr:
    """Seconds in an Exim time value such as ``1h2m3s``, ``2d``, ``0.5s``, ``0s`` (null if unparsable)."""
    g = expr.str.extract_groups(_DURATION)
    parts = [("w", 604800.0), ("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)]
    total = pl.sum_horizontal([g.struct.field(k).cast(pl.Float64, strict=False).fill_null(0.0) * f for k, f in parts])
    total = total + g.struct.field("ms").cast(pl.Float64, strict=False).fill_null(0.0) / 1000.0
    matched = pl.any_horizontal([g.struct.field(k).is_not_null() for k in ("w", "d", "h", "m", "s", "ms")])
    return pl.when(matched).then(total).otherwise(None)


def join_reply_lines(expr: pl.Expr) -> pl.Expr:
    """A multi-line SMTP reply logged with literal ``\\n`` joined into one line: continuation
    prefixes (``\\n421-4.7.0 ``) dropped, the first line's ``421-`` written as ``421 ``."""
    return (
        expr.str.replace_all(r"\\{1,2}n\d{3}[ -](?:\d\.\d{1,3}\.\d{1,3} )?", " ")
        .str.replace_all(r"\\{1,2}n", " ")
        .str.replace(r"^(\d{3})-", "$1 ")
        .pipe(squash_spaces)
    )


def smtp_stage(cmd: pl.Expr) -> pl.Expr:
    """The canonical stage name for the command Exim says a reply answered."""
    c = cmd.str.replace(r"^pipelined ", "").str.to_uppercase()
    return (
        pl.when(c.str.starts_with("MAIL FROM")).then(pl.lit("MAIL FROM"))
        .when(c.str.starts_with("RCPT TO")).then(pl.lit("RCPT TO"))
        .when(c.str.starts_with("END OF DATA")).then(pl.lit("end of DATA"))
        .when(c.str.starts_with("DATA") | c.str.starts_with("BDAT") | c.str.contains("DATA BLOCK")).then(pl.lit("DATA"))
        .when(c.str.starts_with("INITIAL CONNECTION")).then(pl.lit("greeting"))
        .when(c.str.starts_with("HELO") | c.str.starts_with("EHLO") | c.str.starts_with("LHLO")).then(pl.lit("HELO"))
        .when(c.str.starts_with("STARTTLS")).then(pl.lit("STARTTLS"))
        .when(c.str.starts_with("AUTH")).then(pl.lit("AUTH"))
        .otherwise(None)
    )


def _clean_host(expr: pl.Expr) -> pl.Expr:
    return expr.str.to_lowercase().str.strip_suffix(".")


def _localize(naive: pl.Expr, tz: str) -> pl.Expr:
    """Wall-clock times in ``tz`` as UTC; a repeated hour (DST end) reads as the first one, a
    skipped one (DST start) with the offset in force before the gap."""
    hour = pl.duration(hours=1)
    return pl.coalesce(
        naive.dt.replace_time_zone(tz, ambiguous="earliest", non_existent="null"),
        (naive - hour).dt.replace_time_zone(tz, ambiguous="earliest", non_existent="null") + hour,
    ).dt.convert_time_zone("UTC")


def _timestamps(files: list[SourceFile], options) -> pl.Expr:
    """UTC timestamp from the wrapper groups: the Exim stamp wins over the syslog one."""
    tz = getattr(options, "tz", "UTC") or "UTC"
    w = pl.col("w")
    date = pl.coalesce(w.struct.field("d2"), w.struct.field("d1"))
    time = pl.coalesce(w.struct.field("t2"), w.struct.field("t1"))
    frac = pl.coalesce(
        pl.when(w.struct.field("d2").is_not_null()).then(w.struct.field("f2")),
        pl.when(w.struct.field("d2").is_null()).then(w.struct.field("f1")),
    ).fill_null("0")
    off = pl.when(w.struct.field("d2").is_not_null()).then(w.struct.field("o2")).otherwise(w.struct.field("o1"))
    naive = (date + " " + time + "." + frac.str.slice(0, 6).str.pad_end(6, "0")).str.to_datetime(
        "%Y-%m-%d %H:%M:%S%.f", strict=False, time_unit="us"
    )
    # Year-less syslog stamps: the given year, else the file's mtime year (a month later than
    # the mtime's month belongs to the year before: the file spans a new year).
    years = {sf.name: (options.year if getattr(options, "year", None) else (sf.mtime.year if sf.mtime else 1970)) for sf in files}
    months = {sf.name: (13 if getattr(options, "year", None) or not sf.mtime else sf.mtime.month) for sf in files}
    bsd = w.struct.field("bsd").str.replace_all(r"\s+", " ")
    bsd_month = bsd.str.slice(0, 3).replace_strict(_MONTHS, default=None, return_dtype=pl.Int32)
    year = pl.col("file").replace_strict(years, return_dtype=pl.Int32) - (
        bsd_month.cast(pl.Int32) > pl.col("file").replace_strict(months, return_dtype=pl.Int32)
    ).cast(pl.Int32)
    bsd_naive = (year.cast(pl.String) + " " + bsd).str.to_datetime("%Y %b %d %H:%M:%S", strict=False, time_unit="us")
    naive = pl.coalesce(naive, bsd_naive)
    plain = pl.col("plain")
    naive = pl.when(plain).then(
        pl.when(plain).then(pl.col("line")).str.slice(0, 19).str.to_datetime("%Y-%m-%d %H:%M:%S", strict=False, time_unit="us")
    ).otherwise(naive)
    o = off.str.replace(":", "")
    off_min = (
        pl.when(o == "Z").then(pl.lit(0))
        .otherwise(
            (o.str.slice(1, 2).cast(pl.Int32, strict=False) * 60 + o.str.slice(3, 2).cast(pl.Int32, strict=False))
            * pl.when(o.str.starts_with("-")).then(-1).otherwise(1)
        )
    )
    with_offset = (naive - pl.duration(minutes=off_min)).dt.replace_time_zone("UTC")
    local = _localize(naive, tz)
    return pl.when(off.is_not_null()).then(with_offset).otherwise(local)


# A plain mainlog line "YYYY-MM-DD HH:MM:SS <id or text>": the stamp is read by position and
# the wrapper regex runs only on the other lines.  Left to the wrapper regex (which reads them
# differently): fractions, offsets, [pid], "[n/m]" pieces, and a second stamp or
# "host exim[pid]:" after the first.
_PLAIN = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [^\s\[+\-]"
_PLAIN_NOT = r"^.{20}(?:Z |\S+ exim\[\d+\]: |\d{4}-\d\d-\d\d \d\d:\d\d:\d\d )"


def _records(files: list[SourceFile], options) -> pl.LazyFrame:
    """One row per physical line of ONE file with wrapper fields parsed and wrapped/split
    continuations joined onto their record (``body``)."""
    lf = _line_fields(scan_lines(files).with_row_index("seq"))
    return _with_body(lf.join(_continuations(lf), on="line_no", how="left", maintain_order="left"))


def _line_fields(lines: pl.LazyFrame) -> pl.LazyFrame:
    """The wrapper of each line of one file: stamp groups ``w`` (null on plain mainlog lines),
    ``pre`` (the wrapper's length), host, pid, ``[n/m]`` split, and whether the line starts a
    record or continues the one before."""
    line = pl.col("line")
    plain = line.str.contains(_PLAIN) & ~line.str.contains(_PLAIN_NOT)
    lf = lines.with_columns(plain=plain).with_columns(w=pl.when(~pl.col("plain")).then(line).str.extract_groups(_WRAP))
    w = pl.col("w").struct
    lf = lf.with_columns(
        has_ts=pl.col("plain") | pl.any_horizontal(w.field(k).is_not_null() for k in ("bsd", "d1", "d2")),
        log_host=w.field("host"),
        pid=pl.coalesce(w.field("spid"), w.field("pid")),
        split_n=w.field("sn").cast(pl.Int32, strict=False),
        split_sep=w.field("ssep"),
        # the prefix only is captured: a trailing ".*" group would make the regex engine walk every line
        pre=pl.when(pl.col("plain")).then(pl.lit(20, dtype=pl.UInt32)).otherwise(w.field("pre").str.len_chars()),
    )
    is_piece = pl.col("has_ts") & (pl.col("split_n").fill_null(1) > 1)
    return lf.with_columns(
        is_start=pl.col("has_ts") & ~is_piece,
        is_cont=is_piece | ~pl.col("has_ts"),
    ).with_columns(
        # one file per call: no grouping by file needed
        _prev_start=pl.when(pl.col("is_start")).then(pl.col("line_no")).forward_fill(),
    )


def _continuations(lf: pl.LazyFrame) -> pl.LazyFrame:
    """``line_no, piece``: the text that wrapped lines and ``[n/m]`` pieces add to the record
    they continue (one row per such record)."""
    # A [n/m] piece belongs to the previous [1/m] piece of the same process; computed on the
    # (usually empty) set of split lines only.  A line without a timestamp continues the
    # record before it (a wrapped line).
    body = pl.col("line").str.slice(pl.col("pre"))
    pieces = (
        lf.filter(pl.col("split_n").is_not_null() & pl.col("has_ts"))
        .with_columns(_into=pl.when(pl.col("split_n") == 1).then(pl.col("line_no")).forward_fill().over("pid"))
        .filter(pl.col("split_n") > 1)
        .select("seq", "_into", piece=pl.when(pl.col("split_sep") == "/").then(body).otherwise(" " + body))
    )
    wrapped = lf.filter(~pl.col("has_ts")).select(
        "seq", _into=pl.col("_prev_start"), piece=" " + pl.col("line").str.strip_chars()
    )
    return (
        pl.concat([pieces, wrapped])
        .filter(pl.col("_into").is_not_null())
        .group_by("_into")
        .agg(pl.col("piece").sort_by("seq").str.join(""))
        .select(pl.col("_into").alias("line_no"), "piece")
    )


def _with_body(frame):
    """``body``: the line after its wrapper, with its continuations appended."""
    body = pl.col("line").str.slice(pl.col("pre"))
    return frame.with_columns(body=pl.when(pl.col("piece").is_not_null()).then(body + pl.col("piece")).otherwise(body)).drop("piece")


# Per-line outcome codes (category, reason): small integers while parsing, text at the end.
_CR = (
    ("context", "continuation line joined to its record"),
    ("malformed", "not an Exim log line (no timestamp)"),
    ("skipped", "cwd/args line (log_selector +arguments)"),
    ("skipped", "daemon or queue-runner line"),
    ("skipped", "no message id (inbound SMTP session, reject or notice)"),
    ("context", "arrival (<=)"),
    ("context", "message completed"),
    ("skipped", "delivery suppressed by -N (*>)"),
    ("skipped", "fakereject (="),
    ("skipped", "retry time not reached (no attempt made)"),
    ("attempt", None),
    ("connection", "per-host SMTP error"),
    ("connection", "per-host connection failure"),
    ("skipped", "frozen/unfrozen notice"),
    ("skipped", "cPanel custom line"),
    ("skipped", "inbound reject or scan notice"),
    ("skipped", "other message event"),
)
_C = {r: i for i, (_, r) in enumerate(_CR)}
_ATTEMPT = _C[None]
_DELIVERY_FLAGS = ["=>", "->", ">>", "==", "**"]
# What the later steps read, by row kind (memory: a string column costs 16 bytes a row even
# where it is null, so the fields of attempts are not carried on every line).
_LINE_COLUMNS = (
    "seq", "file", "line_no", "has_ts", "ts", "log_host", "queue_id", "flag", pl.selectors.starts_with("_h"),
    "category", "reason", "text",
)
_DETAIL_COLUMNS = (
    "seq", "rcpt", "extra", "transport", "egress_ip", "qt", "dsize", "fsender", "errno", "mx_host", "mx_ip", "proto",
    "smtp_stage", "response", "smtp_code", "enhanced_code", "has_conf", "give_up", "msg_trouble", "rest",
)
_ARRIVAL_COLUMNS = ("seq", "rcpt", "dsize", "message_id")
_HEAD = rf"^(?P<queue_id>{_ID}) (?:(?P<flag><=|=>|->|>>|==|\*\*|\*>|\(=) )?"


def _with_ts(rec: pl.DataFrame, files: list[SourceFile], options) -> pl.DataFrame:
    """``ts`` read by position on plain mainlog lines; the wrapper groups decide it on the
    (usually absent) other lines only."""
    tz = getattr(options, "tz", "UTC") or "UTC"
    stamp = pl.col("line").str.slice(0, 19).str.to_datetime("%Y-%m-%d %H:%M:%S", strict=False, time_unit="us")
    ts = rec.select(_localize(stamp, tz).alias("ts")).to_series()
    if not rec["plain"].all():
        other = rec.select("file", "line", "w", "plain").filter(~pl.col("plain"))
        ts = ts.scatter(rec["plain"].not_().arg_true(), other.select(_timestamps(files, options).alias("ts")).to_series())
    return rec.with_columns(ts)


def _unchanged_by_join(reply: pl.Expr) -> pl.Expr:
    """True where :func:`join_reply_lines` would return the text as it is (the usual case),
    so its replacements run on the few other replies only."""
    return ~reply.str.contains(r"\\n|^\d{3}-|[^\S ]|\s{2}|^\s|\s$")


def _joined(frame: pl.DataFrame, column: str, out: str) -> pl.DataFrame:
    """``out``: :func:`join_reply_lines` of ``column``, its line-joining replacements run only
    on replies with a literal ``\\n`` and its space squashing only on replies that need it."""
    c = pl.col(column)
    frame = frame.with_columns(_keep=_unchanged_by_join(c), _nl=c.str.contains("\\n", literal=True))
    keep, nl = pl.col("_keep"), pl.col("_nl")
    return frame.with_columns(
        pl.when(keep).then(c)
        .when(nl).then(join_reply_lines(pl.when(~keep & nl).then(c)))
        .otherwise(squash_spaces(pl.when(~keep & ~nl).then(c).str.replace(r"^(\d{3})-", "$1 ")))
        .alias(out)
    ).drop("_keep", "_nl")


def _parse_file(sf: SourceFile, options, *, offset: int, identity: bool, block_rows: int = 100_000) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """One file's lines parsed and classified (all but the cross-file steps: duplicates and
    message instances), reduced to what the attempts, connections and accounting use: one
    row per line (``_LINE_COLUMNS``), the fields of attempt and per-host lines
    (``_DETAIL_COLUMNS``) and of arrivals (``_ARRIVAL_COLUMNS``), joined on ``seq``.
    ``offset`` makes ``seq`` run on over files; ``identity`` adds line hashes for the
    duplicate check.

    Eager on purpose: each step's regexes run only on the lines of the record shape that
    needs them (other rows are null), and columns are dropped as soon as they are used."""
    files = [sf]
    lines = scan_lines(files).with_row_index("seq").collect()
    line = pl.col("line")
    if lines.select((line.str.contains(_PLAIN) & ~line.str.contains(_PLAIN_NOT)).all()).item():
        # Every line a plain mainlog record (the usual file): no wrapper, no continuations.
        fields = lines.with_columns(
            plain=pl.lit(True), has_ts=pl.lit(True), log_host=pl.lit(None, dtype=pl.String), pre=pl.lit(20, dtype=pl.UInt32),
            is_cont=pl.lit(False), _prev_start=pl.col("line_no"), piece=pl.lit(None, dtype=pl.String),
        )
    else:
        fields = _line_fields(lines.lazy()).collect()
        cont = _continuations(fields.lazy()).collect()
        if cont.height:
            fields = fields.join(cont, on="line_no", how="left", maintain_order="left")
        else:
            fields = fields.with_columns(piece=pl.lit(None, dtype=pl.String))
    del lines
    fields = _with_ts(fields, files, options).drop("w", "file", "split_sep", "pid", "split_n", "is_start", "plain", strict=False)
    # Memory: the regex steps run on blocks of lines, so their intermediate columns exist
    # for one block at a time.
    name = pl.lit(sf.name, dtype=pl.String).cast(pl.Categorical)
    kinds = {
        "lines": (None, _LINE_COLUMNS),
        "details": (pl.col("_code").is_in([_ATTEMPT, _C["per-host SMTP error"], _C["per-host connection failure"]]), _DETAIL_COLUMNS),
        "arrivals": ((pl.col("category") == "context") & (pl.col("flag") == "<="), _ARRIVAL_COLUMNS),
    }
    parts: dict[str, list[pl.DataFrame]] = {k: [] for k in kinds}
    for start in range(0, max(fields.height, 1), block_rows):
        block = _parse_block(_with_body(fields.slice(start, block_rows)), identity=identity).with_columns(
            (pl.col("seq").cast(pl.Int64) + offset).alias("seq"), file=name
        )
        for kind, (rows, columns) in kinds.items():
            parts[kind].append((block if rows is None else block.filter(rows)).select(columns))
    return tuple(pl.concat(parts[k]) for k in kinds)


def _parse_block(rec: pl.DataFrame, *, identity: bool) -> pl.DataFrame:
    """One block of lines (``line``, ``body`` and the wrapper fields) parsed and classified."""
    body = pl.col("body")
    rec = rec.with_columns(h=body.str.extract_groups(_HEAD)).unnest("h")
    qid, flag = pl.col("queue_id"), pl.col("flag")
    qlen = qid.str.len_chars() + 1
    rec = rec.with_columns(
        # the text after the id, on lines without a flag (per-host lines, Completed, notices)
        rest=pl.when(qid.is_not_null() & flag.is_null()).then(body.str.slice(qlen)),
        # Recipient token, then " <orig>" / " (parent)" groups, then the fields.
        _after=pl.when(flag.is_not_null()).then(body.str.slice(qlen + flag.str.len_chars() + 1)),
    )
    after = pl.col("_after")
    masked = "[email protected]"  # Cloudflare's e-mail obfuscation in pasted logs
    rec = rec.with_columns(
        _after=pl.when(after.str.contains(masked, literal=True)).then(after.str.replace_all(masked, "[email-protected]", literal=True)).otherwise(after)
    )
    # A trailing colon on the token is the "** addr: message" form.
    rec = rec.with_columns(t=after.str.extract_groups(r"^(?P<_tok>\S+)(?P<extra>(?: (?:<[^>]*>|\([^)]*\)))*)")).unnest("t")
    tok = pl.col("_tok")
    rec = rec.with_columns(
        rcpt=tok.str.strip_suffix(":"),
        colon=pl.when(tok.str.ends_with(":")).then(pl.lit(":")).otherwise(pl.lit("")),
        tail=after.str.slice(tok.str.len_chars() + pl.col("extra").str.len_chars()).str.strip_prefix(" "),
    ).drop("_tok", "_after")
    # Delivery fields are read on delivery lines only.
    is_delivery = flag.is_in(_DELIVERY_FLAGS)
    rec = rec.with_columns(_dtail=pl.when(is_delivery).then(pl.col("tail")))
    tail = pl.col("_dtail")
    # "defer (N)[: strerror][ H=host [ip][:port][*]][ DT=..]: message" (deliver.c order).
    # (Eager frames evaluate a repeated expression each time: shared parts become columns.)
    rec = rec.with_columns(
        _defer=pl.when(tail.str.contains("defer (", literal=True)).then(tail).str.extract_groups(
            r"(?:^| )defer \((?P<errno>-?\d+)\)(?:: (?P<strerr>[^:]*))?(?: H=(?P<dh>[^\s\[]\S*) \[(?P<dip>[^\]]+)\](?::\d+)?\*?)?"
            r"(?: (?:DT|I)=\S+)*(?:: (?P<msg>.*))?$"
        ),
        _bs=tail.str.contains("\\", literal=True),
    )
    defer = pl.col("_defer")
    # "** addr [<orig>] [F=<s>] [R=r] [T=t] [H=h [ip]] [PS=..] : message"; "** addr: message".
    fail_msg = pl.when(pl.col("colon") == ":").then(tail).otherwise(
        (" " + pl.when(flag == "**").then(tail)).str.extract(r"^(?:\s+[A-Z]{1,3}=(?:<[^>]*>|\S+)(?: \[[^\]]*\](?::\d+)?\*?)?)*\s*:\s?(.*)$", 1)
    )
    # C="..." without a backslash in the line reads the same with the simpler pattern.
    backslash = pl.col("_bs")
    conf = pl.when(backslash).then(pl.when(backslash).then(tail).str.extract(r'(?:^| )C="((?:[^"\\]|\\.)*)"', 1)).otherwise(
        pl.when(~backslash).then(tail).str.extract(r'(?:^| )C="([^"]*)"', 1)
    )
    rec = rec.with_columns(
        router=tail.str.extract(r"(?:^| )R=(\S+)", 1),
        transport=tail.str.extract(r"(?:^| )T=(\S+)", 1).str.strip_suffix(":"),
        hm=tail.str.extract_groups(r"(?:^| )H=(?P<host>[^\s\[]\S*) \[(?P<ip>[^\]]+)\](?::(?P<port>\d+))?"),
        egress_ip=tail.str.extract(r"(?:^| )I=\[([^\]]+)\]", 1),
        conf=conf,
        qt=tail.str.extract(r"(?:^| )QT=(\S+)", 1),
        dsize=pl.col("tail").str.extract(r"(?:^| )S=(\d+)", 1).cast(pl.Int64, strict=False),
        fsender=tail.str.extract(r"(?:^| )F=<([^>]*)>", 1),
        errno=defer.struct.field("errno").cast(pl.Int32, strict=False),
        msg=pl.when(flag == "==").then(pl.coalesce(defer.struct.field("msg"), defer.struct.field("strerr"))).when(flag == "**").then(pl.coalesce(fail_msg, tail)),
        message_id=owned(pl.when(flag == "<=").then(pl.col("tail").str.extract(r"(?:^| )id=(\S+)", 1))),
    ).drop("_dtail", "tail", "colon", "_defer", "_bs")
    msg = pl.col("msg")
    rec = rec.with_columns(_se=msg.str.extract_groups(_SMTP_ERR))
    se = pl.col("_se")
    rec = rec.with_columns(
        mx_host=_clean_host(pl.coalesce(pl.col("hm").struct.field("host"), se.struct.field("ohost"))),
        mx_ip=pl.coalesce(pl.col("hm").struct.field("ip"), se.struct.field("oip")),
        proto=se.struct.field("proto"),
        smtp_stage=smtp_stage(se.struct.field("cmd")),
        reply=pl.coalesce(se.struct.field("reply"), pl.when(flag.is_in(["=>", "->", ">>"])).then(pl.col("conf"))),
    ).drop("hm", "_se")
    rec = _joined(rec, "reply", "_reply_j")
    reply = pl.col("_reply_j")
    rec = rec.with_columns(
        _code=reply.str.extract_groups(r"^(?P<c>\d{3})\b(?:[ -](?P<e>[245]\.\d{1,3}\.\d{1,3})\b)?"),
        _msg_nr=pl.when(pl.col("reply").is_null()).then(msg),
    )
    rec = _joined(rec, "_msg_nr", "_msg_j")
    code = pl.col("_code")
    rec = rec.with_columns(
        response=pl.coalesce(reply, pl.col("_msg_j")),
        smtp_code=code.struct.field("c").cast(pl.Int16, strict=False),
        enhanced_code=code.struct.field("e"),
    ).drop("reply", "_reply_j", "_code", "_msg_nr", "_msg_j")
    # --- per-line category and reason ------------------------------------------------------
    # The pattern checks below decide only lines with an id but no flag (and not Completed),
    # or lines without an id: other lines are nulled first so the regexes skip them.
    completed = pl.col("rest").str.starts_with("Completed")
    rec = rec.with_columns(
        _rest_nf=pl.when(~completed).then(pl.col("rest")),
        _body_nq=pl.when(qid.is_null()).then(body),
    )
    retry_not_reached = msg.str.contains(r"(?i)retry time not (?:yet )?reached") & ~msg.str.contains(r"(?i)failing for a long time")
    per_host_err = pl.col("_rest_nf").str.contains(
        r"^(?:H=)?(?:[^\s\[]\S* \[[^\]]+\](?::\d+)?\*?:? )?(?:SMTP|LMTP|PRDR) error (?:from remote mail server )?after "
    )
    # "host [ip] Connection timed out" (older) / "H=host [ip] ..." (newer): the host tried,
    # not an inbound client (those lines say rejected/dropped/closed by ACL).
    per_host_conn = (
        pl.col("_rest_nf").str.contains(r"^(?:H=)?[^\s\[=]+ \[[0-9A-Fa-f.:]+\](?::\d+)?\*?:? \S")
        & pl.col("_rest_nf").str.contains(_CONNECT_TROUBLE)
        & ~pl.col("_rest_nf").str.contains(r"(?i)\brejected\b|\bdropped\b|closed by|\bF=|\bP=")
    )
    rest = pl.col("_rest_nf")
    C = lambda reason: pl.lit(_C[reason], dtype=pl.UInt8)  # noqa: E731
    code = (
        pl.when(pl.col("is_cont") & (pl.col("has_ts") | pl.col("_prev_start").is_not_null())).then(C("continuation line joined to its record"))
        .when(~pl.col("has_ts")).then(C("not an Exim log line (no timestamp)"))
        .when(qid.is_null())
        .then(
            pl.when(pl.col("_body_nq").str.starts_with("cwd=")).then(C("cwd/args line (log_selector +arguments)"))
            .when(pl.col("_body_nq").str.contains(r"daemon (?:started|stopped)|^exim \d|^pid \d+: SIGHUP|^Start queue run|^End queue run"))
            .then(C("daemon or queue-runner line"))
            .otherwise(C("no message id (inbound SMTP session, reject or notice)"))
        )
        .when(flag == "<=").then(C("arrival (<=)"))
        .when(completed).then(C("message completed"))
        .when(flag == "*>").then(C("delivery suppressed by -N (*>)"))
        .when(flag == "(=").then(C("fakereject (="))
        .when((flag == "==") & retry_not_reached).then(C("retry time not reached (no attempt made)"))
        .when(flag.is_not_null()).then(C(None))
        .when(per_host_err).then(C("per-host SMTP error"))
        .when(per_host_conn).then(C("per-host connection failure"))
        .when(rest.str.contains(r"(?i)^(?:Frozen|Unfrozen|Message is frozen|frozen)")).then(C("frozen/unfrozen notice"))
        .when(rest.str.contains(r"^(?:SMTP connection outbound|Sender identification|SMTP connection identification)"))
        .then(C("cPanel custom line"))
        .when(rest.str.contains(r"rejected|^SMTP connection from|^H=|^F=|^SA: ")).then(C("inbound reject or scan notice"))
        .otherwise(C("other message event"))
    )
    rec = rec.with_columns(_code=code).drop("_rest_nf", "_body_nq")
    cats = pl.Series([c for c, _ in _CR], dtype=pl.String).cast(pl.Categorical)
    reasons = pl.Series([r for _, r in _CR], dtype=pl.String).cast(pl.Categorical)
    codes = pl.col("_code")
    ident = [pl.col("line").hash(11).alias("_h1"), pl.col("line").hash(29).alias("_h2")] if identity else []
    return rec.select(
        "seq", "line_no", "has_ts", "ts", "log_host", "queue_id", "flag", "rcpt", "extra", "transport",
        "egress_ip", "qt", "dsize", "fsender", "errno", "mx_host", "mx_ip", "proto", "smtp_stage",
        "smtp_code", "enhanced_code", *ident,
        # (a failure's message may be the whole tail of its line: copied, not a view into the block)
        response=owned(pl.col("response")),
        # Memory: what the later steps ask of the message and C= as flags, category and reason
        # as categoricals, and the sparse text columns copied (a column filtered by when/then
        # still holds the buffer of every line it came from).
        has_conf=pl.col("conf").is_not_null(),
        give_up=msg.str.contains(r"(?i)retry timeout exceeded|failing for a long time"),
        msg_trouble=msg.str.contains(_CONNECT_TROUBLE).fill_null(False),
        category=pl.lit(cats).gather(codes),
        reason=pl.lit(reasons).gather(codes),
        message_id="message_id",
        rest=owned(pl.when(codes.is_in([_C["per-host SMTP error"], _C["per-host connection failure"]])).then(pl.col("rest"))),
        text=owned(pl.when(pl.lit(pl.Series([c in ("skipped", "malformed") for c, _ in _CR])).gather(codes)).then(pl.col("line"))),
        _code=codes,
    )


def _beside(left: pl.DataFrame, right: pl.LazyFrame, on: str) -> pl.DataFrame:
    """``left.join(right, on=on, how="left", maintain_order="left")`` with only the key column
    joined and the right side's columns put beside ``left`` (no copy of left's columns)."""
    got = left.lazy().select(on).join(right, on=on, how="left", maintain_order="left").collect()
    if got.height != left.height:  # a key repeated on the right: rows multiply
        return left.lazy().join(right, on=on, how="left", maintain_order="left").collect()
    return left.hstack(got.drop(on))


def load(files: list[SourceFile], options) -> Load:
    """Parse Exim mainlogs into attempts, connection events and the line accounting."""
    from . import Load

    # One file at a time (memory: every line's intermediate strings are dropped with its
    # file); the cross-file steps below run on the parsed, reduced rows.
    identity = getattr(options, "dedupe", True) and len(files) > 1
    parts, details, arrivals, offset = [], [], [], 0
    for fi, sf in enumerate(files):
        part, detail, arrival = _parse_file(sf, options, offset=offset, identity=identity)
        parts.append(part.with_columns(fidx=pl.lit(fi, dtype=pl.Int32)))
        details.append(detail)
        arrivals.append(arrival)
        offset += part.height
    rec = pl.concat(parts)
    details, arrivals = pl.concat(details), pl.concat(arrivals)
    del parts
    # The same line in an earlier file (a file given twice under two names, overlapping
    # rotated copies) is counted once.
    if identity:
        dup = later_copies(rec, pl.col("has_ts"))
        if dup.any():
            rec = rec.with_columns(
                category=pl.when(dup).then(pl.lit("duplicate", dtype=pl.Categorical)).otherwise(pl.col("category")),
                reason=pl.when(dup).then(pl.lit("identical line in an earlier file", dtype=pl.Categorical)).otherwise(pl.col("reason")),
            )
        del dup
    # --- message instances: an id is reused when an arrival repeats it -----------------------
    key_base = pl.when(pl.col("log_host").is_not_null()).then(pl.col("log_host") + "/" + pl.col("queue_id")).otherwise(pl.col("queue_id"))
    if rec["log_host"].null_count() == rec.height:
        key_base = pl.col("queue_id")  # a plain mainlog: no copy of the ids
    rec = rec.with_columns(_key_base=key_base)
    arrival = (pl.col("flag") == "<=").fill_null(False)
    # The generation count is needed only when some id arrives twice (rare): a check on the
    # arrivals spares a grouping of every line otherwise.
    reused = rec.filter(arrival).select(pl.col("_key_base").is_duplicated().any()).item()
    if reused:
        rec = rec.with_columns(_gen=arrival.cast(pl.Int32).cum_sum().over("_key_base")).with_columns(
            message_key=pl.when(pl.col("_gen") <= 1).then(pl.col("_key_base")).otherwise(pl.col("_key_base") + "." + pl.col("_gen").cast(pl.String))
        )
    else:
        rec = rec.with_columns(message_key=pl.col("_key_base"))
    # Exim times and transport names repeat: their derived values are computed once per
    # distinct value and looked up.
    qts = details.select(pl.col("qt").drop_nulls().unique()).with_columns(d=duration_seconds(pl.col("qt")))
    delay = pl.col("qt").replace_strict(qts["qt"], qts["d"], default=None, return_dtype=pl.Float64)
    tlow = pl.col("transport").str.to_lowercase()
    tps = details.select(pl.col("transport").drop_nulls().unique()).with_columns(
        lmtp=tlow.str.contains("lmtp"), remote=tlow.str.contains(r"(?:^|[^b])smtp|remote|lmtp"), bypassed=tlow.str.contains(r"\*\*bypassed\*\*")
    )
    t_is = lambda col: pl.col("transport").replace_strict(tps["transport"], tps[col], default=None, return_dtype=pl.Boolean)  # noqa: E731
    rec = rec.drop("_key_base", "_gen", "has_ts", "fidx", "_h1", "_h2", strict=False).lazy()
    details, arrivals = details.lazy(), arrivals.lazy()
    flag = pl.col("flag")
    arrivals = (
        rec.filter((pl.col("category") == "context") & (pl.col("flag") == "<="))
        .join(arrivals, on="seq", how="left", maintain_order="left")
        .select(
            "message_key",
            a_sender=pl.col("rcpt").replace("<>", ""),
            a_size=pl.col("dsize"),
            message_id=pl.col("message_id"),
            a_ts=pl.col("ts"),
        )
    )
    if reused:  # otherwise every arrival has a key of its own already
        arrivals = arrivals.unique("message_key", keep="first")

    # Memory: connections and the accounting first, then the per-line rows are dropped
    # before the attempts are built; each join of the attempt rows is made on the key column
    # alone and its result put beside them, so the wide rows are not copied by every join.
    arrivals = arrivals.collect()
    att = rec.filter(pl.col("category") == "attempt").select("seq", "file", "line_no", "ts", "log_host", "queue_id", "flag", "message_key").collect()
    conn_rows = rec.filter(pl.col("category") == "connection").collect()
    # (the few detail rows of per-host lines picked first: a join against all of them is large)
    conn_details = details.filter(pl.col("seq").is_in(conn_rows["seq"].implode()))
    conn_rows = conn_rows.lazy().join(conn_details, on="seq", how="left", maintain_order="left")
    ph = pl.col("rest").str.extract_groups(
        r"^(?:H=)?(?:(?P<host>[^\s\[]\S*) \[(?P<ip>[^\]]+)\](?::\d+)?\*?:? )?(?P<text>.*)$"
    )
    pse = ph.struct.field("text").str.extract_groups(_SMTP_ERR)
    creply = join_reply_lines(pse.struct.field("reply"))
    text = ph.struct.field("text")
    connections = conn_rows.with_columns(
        source=pl.lit(FORMAT),
        event=pl.when(pse.struct.field("reply").is_not_null()).then(pl.lit("said"))
        .when(text.str.contains(r"(?i)timed out")).then(pl.lit("timeout"))
        .when(text.str.contains(r"(?i)TLS|certificate")).then(pl.lit("tls_failed"))
        .when(text.str.contains(r"(?i)closed connection|lost connection|connection reset")).then(pl.lit("lost_connection"))
        .otherwise(pl.lit("connect_failed")),
        recipient_domain=pse.struct.field("cmd").str.extract(r"RCPT TO:<[^>]*@([^>]+)>", 1).str.to_lowercase(),
        mx_host=_clean_host(pl.coalesce(ph.struct.field("host"), pse.struct.field("ohost"))),
        mx_ip=pl.coalesce(ph.struct.field("ip"), pse.struct.field("oip")),
        smtp_code=creply.str.extract(r"^(\d{3})\b", 1).cast(pl.Int16, strict=False),
        enhanced_code=creply.str.extract(r"^\d{3}[ -]([245]\.\d{1,3}\.\d{1,3})\b", 1),
        smtp_stage=smtp_stage(pse.struct.field("cmd")),
        response=pl.coalesce(creply, text),
        egress_ip=pl.lit(None, dtype=pl.String),
    )
    # A connection failure's "==" line names no host ("defer (110): Connection timed out");
    # Exim logged the host it tried last just before, in the same delivery run.
    connections = connections.collect()
    last_host = (
        connections.filter(pl.col("mx_host").is_not_null() & pl.col("message_key").is_not_null())
        .select("seq", "message_key", c_host="mx_host", c_ip="mx_ip", c_ts="ts")
        .lazy()
    )
    connections = schema.conform(connections.lazy(), schema.CONNECTION_COLUMNS).collect()
    classified = rec.select("file", "line_no", "category", "reason", "text")
    problems = [f"{sf.name}: {p}" for sf in files for p in sf.problems]
    accounting = account(classified, files=files, fmt=FORMAT, problems=problems)
    del rec, conn_rows, conn_details, classified
    # (every attempt row has its detail row, both in seq order: a filter lines them up)
    sub = details.filter(pl.col("seq").is_in(att["seq"].implode())).collect()
    if sub.height == att.height and sub["seq"].equals(att["seq"]):
        att = att.hstack(sub.drop("seq"))
    else:
        att = _beside(att, details, "seq")
    del details, sub
    att = _beside(att, arrivals.lazy(), "message_key").lazy()
    del arrivals
    has_host = pl.col("mx_host").is_not_null()
    remote_transport = t_is("remote")
    give_up = pl.col("give_up")
    agent = (
        pl.when(has_host & ((pl.col("proto") == "LMTP") | t_is("lmtp").fill_null(False))).then(pl.lit("lmtp"))
        .when(has_host).then(pl.lit("smtp"))
        .when(give_up).then(pl.lit("retry"))
        .when(flag.is_in(["=>", "->", ">>"])).then(pl.lit("local"))
        .when(pl.col("transport").is_null()).then(pl.when(flag.is_in(["=>", "->"])).then(pl.lit("local")).otherwise(pl.lit("router")))
        .when(t_is("bypassed")).then(pl.lit("local"))
        .when(remote_transport & ((pl.col("errno") > 0) | pl.col("msg_trouble"))).then(pl.lit("smtp"))
        .when(remote_transport & t_is("lmtp")).then(pl.lit("local"))
        .when(remote_transport).then(pl.lit("internal"))
        .otherwise(pl.lit("local"))
    )
    outcome = (
        pl.when(flag.is_in(["=>", "->", ">>"])).then(pl.lit("delivered"))
        .when(flag == "==").then(pl.lit("deferred"))
        .when(give_up).then(pl.lit("expired"))
        .otherwise(pl.lit("bounced"))
    )
    rcpt = pl.col("rcpt")
    orig = pl.col("extra").str.extract(r"<([^>]*)>", 1)
    domain_of = lambda e: e.str.extract(r"@([^@>\s]+)$", 1).str.to_lowercase().str.strip_suffix(".")  # noqa: E731
    attempts = att.with_columns(
        source=pl.lit(FORMAT),
        agent=agent,
        outcome=outcome,
        recipient=rcpt,
        orig_recipient=orig,
        recipient_domain=pl.coalesce(domain_of(rcpt), domain_of(orig)),
        sender=pl.coalesce(pl.col("fsender"), pl.col("a_sender")),
        egress_pool=pl.when(has_host).then(pl.col("transport")),
        remote=has_host & (pl.col("smtp_code").is_not_null() | flag.is_in(["=>", "->", ">>"])),
        delay_s=delay,
        queued_at=pl.coalesce(pl.col("ts") - pl.duration(microseconds=(delay * 1e6).cast(pl.Int64)), pl.col("a_ts")),
        size=pl.coalesce(pl.col("dsize"), pl.col("a_size")),
    )
    # attempt: the try's rank within its (message, recipient); the tries are the attempt rows
    # in the same order, so the numbers go beside them
    attempt = try_numbers(att.select("seq", "message_key", recipient="rcpt").collect())
    attempts = attempts.with_columns(attempt=pl.lit(attempt)).with_columns(
        # C="..." on a remote delivery is the reply to the end of the data; a positive errno
        # without a reply is the connection itself failing (Exim logs no stage for either).
        smtp_stage=pl.coalesce(
            pl.col("smtp_stage"),
            pl.when(flag.is_in(["=>", "->", ">>"]) & has_host & pl.col("has_conf")).then(pl.lit("end of DATA")),
            pl.when((pl.col("agent") == "smtp") & (pl.col("errno") > 0) & pl.col("smtp_code").is_null()).then(pl.lit("connect")),
        ),
    )

    attempts = (
        # rec is in seq order (files in order, lines in order) and filters and left joins keep it.
        attempts.join_asof(last_host, on="seq", by="message_key", strategy="backward", check_sortedness=False)
        .with_columns(
            _fill=(pl.col("agent") == "smtp") & pl.col("mx_host").is_null() & ~pl.col("remote")
            & ((pl.col("ts") - pl.col("c_ts")).dt.total_seconds().abs() <= 60).fill_null(False)
        )
        .with_columns(
            mx_host=pl.when(pl.col("_fill")).then(pl.col("c_host")).otherwise(pl.col("mx_host")),
            mx_ip=pl.when(pl.col("_fill")).then(pl.col("c_ip")).otherwise(pl.col("mx_ip")),
        )
    )
    attempts = schema.conform(attempts, schema.ATTEMPT_COLUMNS).collect()
    return Load(attempts=attempts.lazy(), connections=connections.lazy(), accounting=accounting)
