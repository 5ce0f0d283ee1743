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

import polars as pl

from .. import schema
from ..sources import SourceFile, scan_lines
from .generic import account, squash_spaces

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


def _records(files: list[SourceFile], options) -> pl.LazyFrame:
    """One row per physical line with wrapper fields parsed and wrapped/split continuations
    joined onto their record (``body``); continuation lines keep ``joined_into``."""
    lines = scan_lines(files).with_row_index("seq")
    lf = lines.with_columns(w=pl.col("line").str.extract_groups(_WRAP)).with_columns(
        has_ts=pl.any_horizontal(pl.col("w").struct.field(k).is_not_null() for k in ("bsd", "d1", "d2")),
        log_host=pl.col("w").struct.field("host"),
        pid=pl.coalesce(pl.col("w").struct.field("spid"), pl.col("w").struct.field("pid")),
        split_n=pl.col("w").struct.field("sn").cast(pl.Int32, strict=False),
        split_sep=pl.col("w").struct.field("ssep"),
        # the prefix only is captured: a trailing ".*" group would make the regex engine walk every line
        body=pl.col("line").str.slice(pl.col("w").struct.field("pre").str.len_chars()),
    )
    is_piece = pl.col("has_ts") & (pl.col("split_n").fill_null(1) > 1)
    lf = lf.with_columns(
        is_start=pl.col("has_ts") & ~is_piece,
        is_cont=is_piece | ~pl.col("has_ts"),
    ).with_columns(
        _prev_start=pl.when(pl.col("is_start")).then(pl.col("line_no")).forward_fill().over("file"),
    )
    # A [n/m] piece belongs to the previous [1/m] piece of the same process; computed on the
    # (usually empty) set of split lines only.  A line without a timestamp continues the
    # record before it (a wrapped line).
    pieces = (
        lf.filter(pl.col("split_n").is_not_null() & pl.col("has_ts"))
        .with_columns(_into=pl.when(pl.col("split_n") == 1).then(pl.col("line_no")).forward_fill().over("file", "pid"))
        .filter(pl.col("split_n") > 1)
        .select("file", "seq", "_into", piece=pl.when(pl.col("split_sep") == "/").then(pl.col("body")).otherwise(" " + pl.col("body")))
    )
    wrapped = lf.filter(~pl.col("has_ts")).select(
        "file", "seq", _into=pl.col("_prev_start"), piece=" " + pl.col("line").str.strip_chars()
    )
    cont = (
        pl.concat([pieces, wrapped])
        .filter(pl.col("_into").is_not_null())
        .group_by("file", "_into")
        .agg(pl.col("piece").sort_by("seq").str.join(""))
        .rename({"_into": "line_no"})
    )
    return (
        lf.join(cont, on=["file", "line_no"], how="left", maintain_order="left")
        .with_columns(body=pl.when(pl.col("piece").is_not_null()).then(pl.col("body") + pl.col("piece")).otherwise(pl.col("body")))
        .drop("piece")
    )


def _parse_file(sf: SourceFile, options, *, offset: int, identity: bool) -> pl.DataFrame:
    """One file's lines parsed and classified (all but the cross-file steps: duplicates and
    message instances), reduced to the columns the attempts, connections and accounting use.
    ``offset`` makes ``seq`` run on over files; ``identity`` adds line hashes for the
    duplicate check."""
    files = [sf]
    rec = _records(files, options).with_columns(ts=_timestamps(files, options))
    body = pl.col("body")
    rec = rec.with_columns(queue_id=body.str.extract(rf"^({_ID}) ", 1)).with_columns(
        rest=pl.when(pl.col("queue_id").is_not_null()).then(body.str.slice(pl.col("queue_id").str.len_chars() + 1))
    ).with_columns(
        flag=pl.col("rest").str.extract(r"^(<=|=>|->|>>|==|\*\*|\*>|\(=) ", 1),
    )
    # Recipient token, then " <orig>" / " (parent)" groups, then the fields; plain extracts
    # (no lazy quantifiers) keep this on the fast regex engine.  A trailing colon on the
    # token is the "** addr: message" form.
    after = pl.col("rest").str.slice(pl.col("flag").str.len_chars() + 1).str.replace_all("[email protected]", "[email-protected]", literal=True)
    rec = rec.with_columns(_tok=after.str.extract(r"^(\S+)", 1), _after=after)
    rec = rec.with_columns(_r1=pl.col("_after").str.slice(pl.col("_tok").str.len_chars()))
    rec = rec.with_columns(extra=pl.col("_r1").str.extract(r"^((?: (?:<[^>]*>|\([^)]*\)))*)", 1))
    rec = rec.with_columns(
        rcpt=pl.col("_tok").str.strip_suffix(":"),
        colon=pl.when(pl.col("_tok").str.ends_with(":")).then(pl.lit(":")).otherwise(pl.lit("")),
        tail=pl.col("_r1").str.slice(pl.col("extra").str.len_chars()).str.strip_prefix(" "),
    ).drop("_tok", "_after", "_r1")
    # Delivery fields are read on delivery lines only (arrivals and the rest stay null: the
    # regexes then skip them), which halves the work on a typical log.
    rec = rec.with_columns(_dtail=pl.when(pl.col("flag").is_in(["=>", "->", ">>", "==", "**"])).then(pl.col("tail")))
    tail = pl.col("_dtail")
    # "defer (N)[: strerror][ H=host [ip][:port][*]][ DT=..]: message" (deliver.c order).
    defer = tail.str.extract_groups(
        r"(?:^| )defer \((?P<errno>-?\d+)\)(?:: (?P<strerr>[^:]*))?(?: H=(?P<dh>[^\s\[]\S*) \[(?P<dip>[^\]]+)\](?::\d+)?\*?)?"
        r"(?: (?:DT|I)=\S+)*(?:: (?P<msg>.*))?$"
    )
    # "** addr [<orig>] [F=<s>] [R=r] [T=t] [H=h [ip]] [PS=..] : message"; "** addr: message".
    fail_msg = pl.when(pl.col("colon") == ":").then(tail).otherwise(
        (" " + pl.when(pl.col("flag") == "**").then(tail)).str.extract(r"^(?:\s+[A-Z]{1,3}=(?:<[^>]*>|\S+)(?: \[[^\]]*\](?::\d+)?\*?)?)*\s*:\s?(.*)$", 1)
    )
    rec = rec.with_columns(
        router=tail.str.extract(r"(?:^| )R=(\S+)", 1),
        transport=tail.str.extract(r"(?:^| )T=(\S+)", 1).str.strip_suffix(":"),
        hm=tail.str.extract_groups(r"(?:^| )H=(?P<host>[^\s\[]\S*) \[(?P<ip>[^\]]+)\](?::(?P<port>\d+))?"),
        egress_ip=tail.str.extract(r"(?:^| )I=\[([^\]]+)\]", 1),
        conf=tail.str.extract(r'(?:^| )C="((?:[^"\\]|\\.)*)"', 1),
        qt=tail.str.extract(r"(?:^| )QT=(\S+)", 1),
        dsize=pl.col("tail").str.extract(r"(?:^| )S=(\d+)", 1).cast(pl.Int64, strict=False),
        fsender=tail.str.extract(r"(?:^| )F=<([^>]*)>", 1),
        errno=defer.struct.field("errno").cast(pl.Int32, strict=False),
        msg=pl.when(pl.col("flag") == "==").then(pl.coalesce(defer.struct.field("msg"), defer.struct.field("strerr"))).when(pl.col("flag") == "**").then(pl.coalesce(fail_msg, tail)),
    )
    msg = pl.col("msg")
    se = msg.str.extract_groups(_SMTP_ERR)
    rec = rec.with_columns(
        mx_host=_clean_host(pl.coalesce(pl.col("hm").struct.field("host"), se.struct.field("ohost"))),
        mx_ip=pl.coalesce(pl.col("hm").struct.field("ip"), se.struct.field("oip")),
        proto=se.struct.field("proto"),
        smtp_stage=smtp_stage(se.struct.field("cmd")),
        reply=pl.coalesce(se.struct.field("reply"), pl.when(pl.col("flag").is_in(["=>", "->", ">>"])).then(pl.col("conf"))),
    )
    rec = rec.with_columns(_reply_j=join_reply_lines(pl.col("reply")))
    reply = pl.col("_reply_j")
    rec = rec.with_columns(
        response=pl.coalesce(reply, join_reply_lines(pl.when(pl.col("reply").is_null()).then(msg))),
        smtp_code=reply.str.extract(r"^(\d{3})\b", 1).cast(pl.Int16, strict=False),
        enhanced_code=reply.str.extract(r"^\d{3}[ -]([245]\.\d{1,3}\.\d{1,3})\b", 1),
    )
    # --- per-line category and reason ------------------------------------------------------
    flag = pl.col("flag")
    # The pattern checks below decide only lines with an id but no flag (and not Completed),
    # or lines without an id: other lines are nulled first so the regexes skip them.
    rec = rec.with_columns(
        _rest_nf=pl.when(flag.is_null() & ~pl.col("rest").str.starts_with("Completed")).then(pl.col("rest")),
        _body_nq=pl.when(pl.col("queue_id").is_null()).then(pl.col("body")),
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
    category_reason = (
        pl.when(pl.col("is_cont") & (pl.col("has_ts") | pl.col("_prev_start").is_not_null()))
        .then(pl.struct(c=pl.lit("context"), r=pl.lit("continuation line joined to its record")))
        .when(~pl.col("has_ts"))
        .then(pl.struct(c=pl.lit("malformed"), r=pl.lit("not an Exim log line (no timestamp)")))
        .when(pl.col("queue_id").is_null())
        .then(
            pl.when(pl.col("_body_nq").str.starts_with("cwd="))
            .then(pl.struct(c=pl.lit("skipped"), r=pl.lit("cwd/args line (log_selector +arguments)")))
            .when(pl.col("_body_nq").str.contains(r"daemon (?:started|stopped)|^exim \d|^pid \d+: SIGHUP|^Start queue run|^End queue run"))
            .then(pl.struct(c=pl.lit("skipped"), r=pl.lit("daemon or queue-runner line")))
            .otherwise(pl.struct(c=pl.lit("skipped"), r=pl.lit("no message id (inbound SMTP session, reject or notice)")))
        )
        .when(flag == "<=").then(pl.struct(c=pl.lit("context"), r=pl.lit("arrival (<=)")))
        .when(pl.col("rest").str.starts_with("Completed")).then(pl.struct(c=pl.lit("context"), r=pl.lit("message completed")))
        .when(flag == "*>").then(pl.struct(c=pl.lit("skipped"), r=pl.lit("delivery suppressed by -N (*>)")))
        .when(flag == "(=").then(pl.struct(c=pl.lit("skipped"), r=pl.lit("fakereject (=")))
        .when((flag == "==") & retry_not_reached)
        .then(pl.struct(c=pl.lit("skipped"), r=pl.lit("retry time not reached (no attempt made)")))
        .when(flag.is_not_null()).then(pl.struct(c=pl.lit("attempt"), r=pl.lit(None, dtype=pl.String)))
        .when(per_host_err).then(pl.struct(c=pl.lit("connection"), r=pl.lit("per-host SMTP error")))
        .when(per_host_conn).then(pl.struct(c=pl.lit("connection"), r=pl.lit("per-host connection failure")))
        .when(rest.str.contains(r"(?i)^(?:Frozen|Unfrozen|Message is frozen|frozen)"))
        .then(pl.struct(c=pl.lit("skipped"), r=pl.lit("frozen/unfrozen notice")))
        .when(rest.str.contains(r"^(?:SMTP connection outbound|Sender identification|SMTP connection identification)"))
        .then(pl.struct(c=pl.lit("skipped"), r=pl.lit("cPanel custom line")))
        .when(rest.str.contains(r"rejected|^SMTP connection from|^H=|^F=|^SA: "))
        .then(pl.struct(c=pl.lit("skipped"), r=pl.lit("inbound reject or scan notice")))
        .otherwise(pl.struct(c=pl.lit("skipped"), r=pl.lit("other message event")))
    )
    rec = rec.with_columns(cr=category_reason).with_columns(
        category=pl.col("cr").struct.field("c"), reason=pl.col("cr").struct.field("r")
    )

    ident = [pl.col("line").hash(11).alias("_h1"), pl.col("line").hash(29).alias("_h2")] if identity else []
    return rec.select(
        (pl.col("seq").cast(pl.Int64) + offset).alias("seq"),
        "file", "line_no", "has_ts", "ts", "log_host", "queue_id", "flag", "rcpt", "extra", "transport",
        "egress_ip", "qt", "dsize", "fsender", "errno", "mx_host", "mx_ip", "proto", "smtp_stage",
        "response", "smtp_code", "enhanced_code", *ident,
        # Memory: what the later steps ask of the message and C= as flags, category and reason
        # as categoricals, and the sparse text columns copied (a column filtered by when/then
        # still holds the buffer of every line it came from).
        has_conf=pl.col("conf").is_not_null(),
        give_up=pl.col("msg").str.contains(r"(?i)retry timeout exceeded|failing for a long time"),
        msg_trouble=pl.col("msg").str.contains(_CONNECT_TROUBLE).fill_null(False),
        category=pl.col("category").cast(pl.Categorical),
        reason=pl.col("reason").cast(pl.Categorical),
        message_id=_compact(pl.when(pl.col("flag") == "<=").then(pl.col("tail").str.extract(r"(?:^| )id=(\S+)", 1))),
        rest=_compact(pl.when(pl.col("category") == "connection").then(pl.col("rest"))),
        text=_compact(pl.when(pl.col("category").is_in(["skipped", "malformed"])).then(pl.col("line"))),
    ).collect()


def _compact(text: pl.Expr) -> pl.Expr:
    """The strings copied into a buffer of their own."""
    return pl.concat_str([text, pl.lit("")])


def load(files: list[SourceFile], options) -> "Load":
    """Parse Exim mainlogs into attempts, connection events and the line accounting."""
    from . import Load

    # One file at a time (memory: every line's intermediate strings are dropped with its
    # file); the cross-file steps below run on the parsed, reduced rows.
    identity = getattr(options, "dedupe", True) and len(files) > 1
    parts, offset = [], 0
    for fi, sf in enumerate(files):
        part = _parse_file(sf, options, offset=offset, identity=identity)
        parts.append(part.with_columns(fidx=pl.lit(fi, dtype=pl.Int32)))
        offset += part.height
    rec = pl.concat(parts).lazy()
    # The same line in an earlier file (a file given twice under two names, overlapping
    # rotated copies) is counted once.
    if identity:
        duplicate = pl.col("has_ts") & (pl.col("fidx") > pl.col("fidx").min().over("_h1", "_h2"))
        rec = rec.with_columns(
            category=pl.when(duplicate).then(pl.lit("duplicate")).otherwise(pl.col("category")),
            reason=pl.when(duplicate).then(pl.lit("identical line in an earlier file")).otherwise(pl.col("reason")),
        )
    # --- message instances: an id is reused when an arrival repeats it -----------------------
    key_base = pl.when(pl.col("log_host").is_not_null()).then(pl.col("log_host") + "/" + pl.col("queue_id")).otherwise(pl.col("queue_id"))
    rec = rec.with_columns(_key_base=key_base).with_columns(
        _gen=(pl.col("flag") == "<=").fill_null(False).cast(pl.Int32).cum_sum().over("_key_base")
    ).with_columns(
        message_key=pl.when(pl.col("_gen") <= 1).then(pl.col("_key_base")).otherwise(pl.col("_key_base") + "." + pl.col("_gen").cast(pl.String))
    ).drop("_key_base", "_gen", "has_ts", "fidx", "_h1", "_h2", strict=False).collect().lazy()
    flag = pl.col("flag")
    arrivals = (
        rec.filter((pl.col("category") == "context") & (pl.col("flag") == "<="))
        .select(
            "message_key",
            a_sender=pl.col("rcpt").replace("<>", ""),
            a_size=pl.col("dsize"),
            message_id=pl.col("message_id"),
            a_ts=pl.col("ts"),
        )
        .unique("message_key", keep="first")
    )

    att = rec.filter(pl.col("category") == "attempt").drop("message_id").join(arrivals, on="message_key", how="left", maintain_order="left")
    transport = pl.col("transport").str.to_lowercase()
    has_host = pl.col("mx_host").is_not_null()
    remote_transport = transport.str.contains(r"(?:^|[^b])smtp|remote|lmtp")
    give_up = pl.col("give_up")
    agent = (
        pl.when(has_host & ((pl.col("proto") == "LMTP") | transport.str.contains("lmtp").fill_null(False))).then(pl.lit("lmtp"))
        .when(has_host).then(pl.lit("smtp"))
        .when(give_up).then(pl.lit("retry"))
        .when(flag.is_in(["=>", "->", ">>"])).then(pl.lit("local"))
        .when(pl.col("transport").is_null()).then(pl.when(flag.is_in(["=>", "->"])).then(pl.lit("local")).otherwise(pl.lit("router")))
        .when(transport.str.contains(r"\*\*bypassed\*\*")).then(pl.lit("local"))
        .when(remote_transport & ((pl.col("errno") > 0) | pl.col("msg_trouble"))).then(pl.lit("smtp"))
        .when(remote_transport & transport.str.contains("lmtp")).then(pl.lit("local"))
        .when(remote_transport).then(pl.lit("internal"))
        .otherwise(pl.lit("local"))
    )
    outcome = (
        pl.when(flag.is_in(["=>", "->", ">>"])).then(pl.lit("delivered"))
        .when(flag == "==").then(pl.lit("deferred"))
        .when(give_up).then(pl.lit("expired"))
        .otherwise(pl.lit("bounced"))
    )
    delay = duration_seconds(pl.col("qt"))
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
    ).with_columns(
        attempt=pl.col("seq").rank("ordinal").over("message_key", "recipient").cast(pl.Int32),
        # C="..." on a remote delivery is the reply to the end of the data; a positive errno
        # without a reply is the connection itself failing (Exim logs no stage for either).
        smtp_stage=pl.coalesce(
            pl.col("smtp_stage"),
            pl.when(flag.is_in(["=>", "->", ">>"]) & has_host & pl.col("has_conf")).then(pl.lit("end of DATA")),
            pl.when((pl.col("agent") == "smtp") & (pl.col("errno") > 0) & pl.col("smtp_code").is_null()).then(pl.lit("connect")),
        ),
    )

    conn_rows = rec.filter(pl.col("category") == "connection")
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
    last_host = (
        connections.filter(pl.col("mx_host").is_not_null() & pl.col("message_key").is_not_null())
        .select("seq", "message_key", c_host="mx_host", c_ip="mx_ip", c_ts="ts")
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
    attempts = schema.conform(attempts, schema.ATTEMPT_COLUMNS)
    connections = schema.conform(connections, schema.CONNECTION_COLUMNS)

    classified = rec.select("file", "line_no", "category", "reason", "text")
    problems = [f"{sf.name}: {p}" for sf in files for p in sf.problems]
    accounting = account(classified, files=files, fmt=FORMAT, problems=problems)
    return Load(attempts=attempts, connections=connections, accounting=accounting)
