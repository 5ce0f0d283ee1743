"""PowerMTA accounting CSV loader (``acct-*.csv``): ``d``, ``b``, ``t`` records are attempts.

Columns come from each file's own header line (``type,timeLogged,...``; a header repeated or
changed mid-file, as when rotated files are concatenated, starts a new layout).  A file
without a header is read with the documented default 23-column layout when its first record
fits it; two ``timeImprinted`` layouts seen in the wild (22 columns, and 23 with a trailing
``header_Message-Id``) are recognised by content (``dsnAction``/``dsnStatus`` in the right
places).  Any other header-less file is counted as malformed, with the reason, and reported
under ``problems``.

Record types (the ``type`` column):

* ``d`` delivered, ``t`` transient (deferred try), ``b`` bounced → attempts.  A ``b`` with
  ``bounceCat=message-expired`` is the queue giving up (outcome ``expired``, agent
  ``internal``: not a new try).  ``agent`` is ``dlvType`` when logged, else ``smtp`` when the
  record names a remote MTA or carries an ``smtp;`` diagnostic (always for ``d``), else
  ``internal``.  ``remote`` is false for PowerMTA's own connection failures
  (``no-answer-from-host``/``bad-connection``, ``4.4.x`` connection timed out/refused).
* ``tq`` queue-level transient → connections table (event ``queue_transient``).
* ``rb``/``rs`` (remote bounce/status arriving later by mail, not an SMTP try), ``f`` (FBL),
  ``r`` (received) → skipped with the reason.

Each file is read line by line so that every physical line is accounted for.  A file with
one layout, no blank line and no line with an odd number of quotes (so one record per line)
gets its fields from the CSV parser, row for row beside its lines; only rows whose last
field is empty have their fields counted (a short row reads like trailing empty fields).
Any other file, or one the parser rejects, goes through a vectorized RFC 4180 field splitter,
so a truncated row, a stray non-CSV line or a mid-file header is counted with its physical
line number instead of aborting or shifting the whole file; quoted fields with commas,
doubled quotes and embedded line breaks (rejoined) are handled.  ``line_no`` is the
physical line where the record starts.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

import polars as pl

from .. import schema
from ..accounting import Accounting
from ..sources import SourceFile, head, scan_lines
from .exim import _localize
from .generic import account, block_lines, byte_blocks, later_copies, owned_strings, squash_spaces, try_numbers

if TYPE_CHECKING:  # (imported at call time: the package imports this module)
    from . import Load

FORMAT = "powermta"

DEFAULT_FIELDS = (
    "type,timeLogged,timeQueued,orig,rcpt,orcpt,dsnAction,dsnStatus,dsnDiag,dsnMta,bounceCat,srcType,srcMta,"
    "dlvType,dlvSourceIp,dlvDestinationIp,dlvEsmtpAvailable,dlvSize,vmta,jobId,envId,queue,vmtaPool"
).split(",")
_IMPRINTED = (
    "type,timeLogged,timeQueued,timeImprinted,orig,rcpt,orcpt,dsnAction,dsnStatus,dsnDiag,dsnMta,bounceCat,srcType,"
    "srcMta,dlvType,dlvSourceIp,dlvDestinationIp,dlvEsmtpAvailable,dlvSize,vmta,jobId,envId"
).split(",")
# Layouts tried, in order, for a file without a header line.
HEADERLESS_LAYOUTS = (DEFAULT_FIELDS, _IMPRINTED, [*_IMPRINTED, "header_Message-Id"])

RECORD_TYPES = ("d", "b", "t", "tq", "r", "f", "rb", "rs")
_DSN_ACTIONS = ("", "relayed", "delivered", "failed", "delayed", "expanded")
_STATUS_RE = re.compile(r"^\d\.\d{1,3}\.\d{1,3}\b")

_FIELD = r',(?:"(?:[^"]|"")*"|[^,]*)'
_TIME_RE = r"^\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d"

_SNIFF_HEADER = re.compile(r"(?m)^\ufeff?\"?type\"?,.*\btimeLogged\b")
_SNIFF_RECORD = re.compile(
    r"(?m)^(?:d|b|t|tq|rb|rs|f|r),(?:\d{9,11}|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:[+-]\d{4})?),"
    r"(?:[^\n]*,)?(?:\d\.\d{1,3}\.\d{1,3} \([^)\n]*\)|relayed|delivered|failed|delayed),"
)


def sniff(text: str) -> bool:
    """True for a header line naming ``type`` and ``timeLogged``, or a header-less record
    (``d,2015-03-07 08:31:17+0000,...,2.0.0 (success),...``)."""
    return bool(_SNIFF_HEADER.search(text) or _SNIFF_RECORD.search(text))


def _first_record(sf: SourceFile) -> list[str] | None:
    for line in head(sf).splitlines():
        if line.strip():
            try:
                return next(csv.reader(io.StringIO(line)))
            except (csv.Error, StopIteration):
                return None
    return None


def _is_header(fields: list[str]) -> bool:
    return bool(fields) and fields[0].strip().lower() == "type" and any(f.strip().lower() == "timelogged" for f in fields)


def headerless_layout(fields: list[str]) -> list[str] | None:
    """The known layout a header-less record fits (by column count and content), or None."""
    for layout in HEADERLESS_LAYOUTS:
        if len(layout) != len(fields):
            continue
        rec = dict(zip(layout, fields))
        if (
            rec["type"].lower() in RECORD_TYPES
            and rec.get("dsnAction", "").lower() in _DSN_ACTIONS
            and (rec.get("dsnStatus", "") == "" or _STATUS_RE.match(rec["dsnStatus"]))
        ):
            return layout
    return None


def _split_fields(line: pl.Expr) -> pl.Expr:
    """RFC 4180 fields of one record line, still quoted (``,"a,b"`` stays ``"a,b"``); each
    field keeps its leading comma.  :func:`_unquote` finishes the columns that are used."""
    return ("," + line).str.extract_all(_FIELD)


def _unquote(field: pl.Expr) -> pl.Expr:
    """A raw field from :func:`_split_fields` as its value: comma dropped, quotes removed, ``""`` → ``"``."""
    f = field.str.slice(1)
    quoted = f.str.starts_with('"') & f.str.ends_with('"') & (f.str.len_chars() >= 2)
    return pl.when(quoted).then(f.str.slice(1, f.str.len_chars() - 2).str.replace_all('""', '"', literal=True)).otherwise(f)


def _time(expr: pl.Expr, tz: str) -> pl.Expr:
    """UTC time from a UNIX time_t or ``YYYY-MM-DD HH:MM:SS[+zzzz]`` (no offset: ``tz``)."""
    e = expr.str.strip_chars()
    epoch = pl.from_epoch(e.cast(pl.Int64, strict=False), time_unit="s").dt.replace_time_zone("UTC")
    with_off = e.str.replace("T", " ").str.to_datetime("%Y-%m-%d %H:%M:%S%z", strict=False, time_unit="us").dt.convert_time_zone("UTC")
    naive = (
        pl.when(e.str.contains(r"[+-]\d{2}:?\d{2}$|Z$")).then(None).otherwise(e.str.replace("T", " "))
        .str.to_datetime("%Y-%m-%d %H:%M:%S", strict=False, time_unit="us")
        .pipe(_localize, tz)
    )
    return pl.when(e.str.contains(r"^\d{9,11}$")).then(epoch).otherwise(pl.coalesce(with_off, naive))


class _Layouts:
    """The distinct field layouts seen over all files, numbered in order of appearance."""

    def __init__(self) -> None:
        self.layouts: list[list[str]] = []
        self._index: dict[tuple[str, ...], int] = {}

    def idx(self, layout: list[str]) -> int:
        key = tuple(layout)
        if key not in self._index:
            self._index[key] = len(self.layouts)
            self.layouts.append(list(layout))
        return self._index[key]


_HEADERISH = r"^\ufeff?\"?[Tt][Yy][Pp][Ee]\"?,"


def _file_layouts(sf: SourceFile, lines: pl.DataFrame, reg: _Layouts, problems: list[str]) -> pl.DataFrame:
    """(file, seg) -> layout index for one file.  Segment 0 of a file without a header gets
    the header-less layout its first record fits (or none)."""
    rows: list[tuple[str, int, int | None]] = []
    # A loop over the (few) header lines of one file, not over records.
    headers = [
        h for h in lines.filter(pl.col("line").str.contains(_HEADERISH))["line"].to_list()
        if _is_header(next(csv.reader(io.StringIO(h.lstrip("\ufeff")))))
    ]
    first = _first_record(sf)
    if first is not None and not _is_header([f.lstrip("\ufeff") for f in first]):
        layout = headerless_layout(first)
        if layout is None:
            problems.append(
                f"{sf.name}: no header line and the first record has {len(first)} columns, which fits no known "
                f"PowerMTA layout (default: {len(DEFAULT_FIELDS)} columns); add the file's header line "
                "(the record-fields of its <acct-file>) to read it"
            )
            rows.append((sf.name, 0, None))
        else:
            rows.append((sf.name, 0, reg.idx(layout)))
    for seg, hline in enumerate(headers, start=1):
        fields = [f.strip() for f in next(csv.reader(io.StringIO(hline.lstrip("\ufeff"))))]
        rows.append((sf.name, seg, reg.idx(fields)))
    return pl.DataFrame(rows, schema={"file": pl.String, "seg": pl.Int32, "layout": pl.Int32}, orient="row")


def _joined_records(lines: pl.LazyFrame) -> pl.LazyFrame:
    """Records spanning lines (a quoted field with a line break) joined onto their first line.
    A line with an odd number of quotes opens or closes such a record."""
    odd = (pl.col("line").str.count_matches('"', literal=True) % 2 == 1)
    lf = lines.with_columns(_odd=odd).with_columns(_open=pl.col("_odd").cast(pl.Int32).cum_sum().over("file") % 2)
    # A line belongs to the record opened before it while the open count (before it) is odd.
    lf = lf.with_columns(
        _open_before=(pl.col("_open") - pl.col("_odd").cast(pl.Int32)).abs() % 2,
        _opener=pl.when(pl.col("_odd") & (pl.col("_open") == 1)).then(pl.col("line_no")).forward_fill().over("file"),
    ).with_columns(joined_into=pl.when(pl.col("_open_before") == 1).then(pl.col("_opener")))
    cont = (
        lf.filter(pl.col("joined_into").is_not_null())
        .group_by("file", "joined_into")
        .agg(pl.col("line").sort_by("line_no").str.join("\n").alias("_more"))
        .rename({"joined_into": "line_no"})
    )
    return (
        lf.join(cont, on=["file", "line_no"], how="left", maintain_order="left")
        .with_columns(
            record=pl.when(pl.col("_more").is_not_null()).then(pl.col("line") + "\n" + pl.col("_more")).otherwise(pl.col("line")),
            unclosed=(pl.col("_open") == 1) & pl.col("_more").is_null() & pl.col("joined_into").is_null(),
        )
        .drop("_odd", "_open", "_open_before", "_opener", "_more")
    )


_WANT = (
    "type", "timeLogged", "timeQueued", "orig", "rcpt", "orcpt", "dsnAction", "dsnStatus", "dsnDiag", "dsnMta",
    "bounceCat", "dlvType", "dlvSourceIp", "dlvDestinationIp", "dlvSize", "vmta", "jobId", "envId", "queue", "vmtaPool",
)


def _blank_or_empty(value: pl.Expr) -> pl.Expr:
    v = value.str.strip_chars()
    return pl.when(v != "").then(v)


def _fields_by_regex(lf: pl.LazyFrame, layouts: list[list[str]]) -> pl.LazyFrame:
    """The careful path: ``p_*`` columns, ``nf`` and ``width`` from the regex field splitter,
    for any file (mid-file headers, several layouts, multi-line or broken records)."""
    lf = lf.with_columns(f=_split_fields(pl.col("record").str.strip_prefix("\ufeff"))).with_columns(nf=pl.col("f").list.len().cast(pl.Int32))
    cols = {}
    for name in (*_WANT, "header_message-id"):
        expr = pl.lit(None, dtype=pl.String)
        for k, layout in enumerate(layouts):
            lower = [x.lower() for x in layout]
            if name.lower() in lower:
                expr = pl.when(pl.col("layout") == k).then(pl.col("f").list.get(lower.index(name.lower()), null_on_oob=True)).otherwise(expr)
        cols["p_msgid" if name == "header_message-id" else f"p_{name}"] = _unquote(expr) if name == "header_message-id" else _unquote(expr).str.strip_chars()
    width = pl.lit(None, dtype=pl.Int32)
    for k, layout in enumerate(layouts):
        width = pl.when(pl.col("layout") == k).then(pl.lit(len(layout), dtype=pl.Int32)).otherwise(width)
    return lf.with_columns(**{k: pl.when(v != "").then(v) for k, v in cols.items()}, width=width).drop("f")


def _fields_by_csv(source, lines: pl.DataFrame, layout: list[str], has_header: bool) -> pl.DataFrame | None:
    """The fast path: the file (or a block of its bytes) read by the CSV parser, row for row beside its lines, or None
    when the parser rejects it (more fields than the header) so the careful path reads it.

    Only called for a file with one layout, no blank lines and no line with an odd number of
    quotes, so each line is one record."""
    try:
        rows = pl.read_csv(
            source, has_header=False, skip_rows=1 if has_header else 0, new_columns=layout,
            schema={c: pl.String for c in layout}, quote_char='"', encoding="utf8-lossy", truncate_ragged_lines=False,
        )
    except pl.exceptions.PolarsError:
        return None
    body = lines.filter(~pl.col("is_header"))
    if rows.height != body.height:
        return None
    lower = [x.lower() for x in layout]
    get = lambda name: pl.col(layout[lower.index(name.lower())]) if name.lower() in lower else pl.lit(None, dtype=pl.String)  # noqa: E731
    fields = rows.select(
        **{f"p_{n}": _blank_or_empty(get(n)) for n in _WANT},
        p_msgid=pl.when(get("header_message-id") != "").then(get("header_message-id")),
        _last_null=pl.col(layout[-1]).is_null(),
    ).with_columns(pl.col("p_type").str.strip_prefix("\ufeff").str.strip_chars())
    out = pl.concat([body, fields], how="horizontal")
    # A short row reads as trailing nulls, like a row whose last fields are empty: count the
    # fields of those rows (only) with the splitter.
    nf = pl.when(pl.col("_last_null")).then(_split_fields(pl.col("record")).list.len().cast(pl.Int32)).otherwise(pl.lit(len(layout), dtype=pl.Int32))
    out = out.with_columns(nf=nf, width=pl.lit(len(layout), dtype=pl.Int32)).drop("_last_null")
    head_rows = lines.filter(pl.col("is_header")).with_columns(
        **{f"p_{n}": pl.lit(None, dtype=pl.String) for n in _WANT}, p_msgid=pl.lit(None, dtype=pl.String),
        nf=pl.lit(None, dtype=pl.Int32), width=pl.lit(len(layout), dtype=pl.Int32),
    )
    # (the header, if any, is the first line: already in line order)
    return pl.concat([head_rows, out.select(head_rows.columns)])


_IS_HEADER = pl.col("line").str.contains(_HEADERISH) & pl.col("line").str.contains(r"(?i)timeLogged")
_IRREGULAR = (pl.col("line").str.count_matches('"', literal=True) % 2 == 1) | (pl.col("line").str.strip_chars() == "")
_BLOCK_BYTES = 16 << 20


def _finish(fi: int, out: pl.DataFrame, dedupe: bool) -> pl.DataFrame:
    blank = pl.col("line").str.strip_chars() == ""
    ident = [pl.col("record").hash(11).alias("_h1"), pl.col("record").hash(29).alias("_h2")] if dedupe else []
    keep = ["seq", "file", "line_no", "is_header", "joined_into", "unclosed", "layout", "nf", "width", *[f"p_{n}" for n in _WANT], "p_msgid"]
    return out.select(*keep, *ident, blank=blank, fidx=pl.lit(fi, dtype=pl.Int32))


def _file_frames(fi: int, sf: SourceFile, reg: _Layouts, problems: list[str], dedupe: bool) -> Iterator[pl.DataFrame | None]:
    """One file's lines with their fields (``p_*``), layout and record checks, in blocks.

    A first pass over the file's blocks finds its header lines and whether every line is a
    one-line record of one layout (the usual file); such a file is then read block by block
    by the CSV parser, so memory holds one block's text at a time.  Any other file, or one
    whose block the parser rejects (then ``None`` is yielded first: what came before is void),
    is read whole by the careful path."""
    heads, n_lines, n_headers, first_is_header, irregular = [], 0, 0, False, False
    for n, data in byte_blocks(sf, batch_bytes=_BLOCK_BYTES):
        lines = block_lines(sf, n, data)
        st = lines.select(h=_IS_HEADER.sum(), f=_IS_HEADER.first(), i=_IRREGULAR.any()).row(0)
        if n_lines == 0:
            first_is_header = bool(st[1])
        n_lines += lines.height
        n_headers += int(st[0] or 0)
        irregular = irregular or bool(st[2])
        heads.append(lines.filter(pl.col("line").str.contains(_HEADERISH)))
        del lines, data
    heads = pl.concat(heads) if heads else pl.DataFrame(schema={"file": pl.String, "line_no": pl.Int64, "line": pl.String})
    table = _file_layouts(sf, heads, reg, problems)
    header_first = n_headers == 0 or (n_headers == 1 and first_is_header)
    simple = n_lines > 0 and header_first and table.height == 1 and table["layout"][0] is not None and not irregular
    if simple:
        k = table["layout"][0]
        for n, data in byte_blocks(sf, batch_bytes=_BLOCK_BYTES):
            lines = block_lines(sf, n, data).with_columns(is_header=_IS_HEADER, seq=pl.lit(fi << 36, dtype=pl.Int64) + pl.col("line_no"))
            base = lines.with_columns(
                record=pl.col("line"), joined_into=pl.lit(None, dtype=pl.Int64), unclosed=pl.lit(False),
                seg=pl.col("is_header").cast(pl.Int32).cum_sum(), layout=pl.lit(k, dtype=pl.Int32),
            )
            out = _fields_by_csv(data, base, reg.layouts[k], n_headers == 1 and n == 1)
            if out is None:
                yield None
                break
            yield _finish(fi, out, dedupe)
        else:
            return
    lines = scan_lines([sf]).collect()
    lines = lines.with_columns(is_header=_IS_HEADER, seq=pl.lit(fi << 36, dtype=pl.Int64) + pl.col("line_no"))
    out = (
        _joined_records(lines.lazy())
        .with_columns(seg=pl.col("is_header").cast(pl.Int32).cum_sum())
        .join(table.lazy(), on=["file", "seg"], how="left", maintain_order="left")
        .pipe(_fields_by_regex, reg.layouts)
        .collect()
    )
    yield _finish(fi, out, dedupe)


_DUPLICATE = ("duplicate", "identical record in an earlier file")


def _category_reason() -> pl.Expr:
    """``cr``: (category, reason) of a line of one file; a duplicate of a record in an earlier
    file, which only the whole load can tell, is marked afterwards (it takes precedence over
    every case but blank and header lines)."""
    rtype = pl.col("p_type").str.to_lowercase()
    return (
        pl.when(pl.col("joined_into").is_not_null())
        .then(pl.struct(c=pl.lit("context"), r=pl.lit("continuation of a multi-line CSV record")))
        .when(pl.col("blank")).then(pl.struct(c=pl.lit("skipped"), r=pl.lit("empty line")))
        .when(pl.col("is_header")).then(pl.struct(c=pl.lit("context"), r=pl.lit("header line")))
        .when(pl.col("layout").is_null())
        .then(pl.struct(c=pl.lit("malformed"), r=pl.lit("no header line and no known layout fits")))
        .when(pl.col("unclosed")).then(pl.struct(c=pl.lit("malformed"), r=pl.lit("unclosed quote (record cut short)")))
        .when(pl.col("nf") < pl.col("width")).then(pl.struct(c=pl.lit("malformed"), r=pl.lit("truncated row (fewer fields than the header)")))
        .when(pl.col("nf") > pl.col("width")).then(pl.struct(c=pl.lit("malformed"), r=pl.lit("more fields than the header")))
        .when(rtype.is_in(["d", "b", "t"])).then(pl.struct(c=pl.lit("attempt"), r=pl.lit(None, dtype=pl.String)))
        .when(rtype == "tq").then(pl.struct(c=pl.lit("connection"), r=pl.lit("tq queue-level transient")))
        .when(rtype.is_in(["rb", "rs"])).then(pl.struct(c=pl.lit("skipped"), r=pl.lit("rb/rs remote bounce/status (out-of-band, not an SMTP try)")))
        .when(rtype == "f").then(pl.struct(c=pl.lit("skipped"), r=pl.lit("f feedback-loop (FBL) record")))
        .when(rtype == "r").then(pl.struct(c=pl.lit("skipped"), r=pl.lit("r received record")))
        .otherwise(pl.struct(c=pl.lit("malformed"), r=pl.lit("unknown record type")))
    )


def _parsed(lf: pl.LazyFrame) -> pl.LazyFrame:
    """The reply and remote-host fields of attempt and connection rows."""
    diag = pl.col("p_dsnDiag")
    diag_type = diag.str.extract(r"^([A-Za-z0-9-]+);", 1).str.to_lowercase()
    lf = lf.with_columns(
        _reply=squash_spaces(
            diag.str.replace(r"^[A-Za-z0-9-]+;\s*", "")
            .str.replace_all(r"\r?\n\d{3}[ -](?:\d\.\d{1,3}\.\d{1,3} )?", " ")
            .str.replace(r"^(\d{3})-", "$1 ")
        )
    )
    reply = pl.col("_reply")
    mta = pl.col("p_dsnMta").str.extract_groups(r"^\s*(?P<host>[^\s(]+)?\s*(?:\((?P<ip>[^/)\s]+)(?:/[^)]*)?\))?\s*$")
    dest_ip = pl.col("p_dlvDestinationIp").str.extract(r"^([^/\s]+)", 1)
    host = mta.struct.field("host").str.to_lowercase().str.strip_suffix(".")
    host_is_ip = host.str.contains(r"^[0-9.]+$|^[0-9a-f:]+:[0-9a-f:]*$")
    code = reply.str.extract(r"^(\d{3})\b", 1).cast(pl.Int16, strict=False)
    dsn = pl.col("p_dsnStatus").str.extract(r"^(\d\.\d{1,3}\.\d{1,3})", 1)
    enhanced = pl.coalesce(reply.str.extract(r"^\d{3}[ -]([245]\.\d{1,3}\.\d{1,3})\b", 1), dsn)
    bcat = pl.col("p_bounceCat").str.to_lowercase()
    local_failure = bcat.is_in(["no-answer-from-host", "bad-connection"]).fill_null(False) | (
        enhanced.str.starts_with("4.4.") & reply.str.contains(r"(?i)timed out|refused|no answer|unreachable|no route|unable to connect")
    ).fill_null(False)
    return lf.with_columns(
        mx_host=pl.when(~host_is_ip).then(host),
        mx_ip=pl.coalesce(mta.struct.field("ip"), pl.when(host_is_ip).then(host), dest_ip),
        smtp_code=code,
        enhanced_code=enhanced,
        dsn=dsn,
        response=pl.when(reply != "").then(reply),
        remote=code.is_not_null() & (diag_type == "smtp").fill_null(False) & ~local_failure,
    ).drop("_reply")


def _conform(frame: pl.LazyFrame, columns) -> pl.LazyFrame:
    """:func:`schema.conform` keeping ``seq`` at the end (for the steps over all files)."""
    return pl.concat([schema.conform(frame, columns), frame.select("seq")], how="horizontal")


def _block_parts(frame: pl.DataFrame, dedupe: bool, tz: str) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """One block of a file (from :func:`_file_frames`) parsed to the end: its slim per-line
    rows (``seq, file, line_no, category, reason`` and the duplicate-check identity), its attempts (canonical columns plus ``seq``,
    ``attempt`` still null) and its connection events.  Only the duplicate check and the
    attempt numbers need the other files."""
    frame = frame.with_columns(cr=_category_reason())
    frame = frame.with_columns(category=pl.col("cr").struct.field("c"), reason=pl.col("cr").struct.field("r")).drop("cr")
    ident = ["_h1", "_h2"] if dedupe else []
    slim = frame.select(
        "seq", "file", "line_no", "category", "reason", *ident,
        _elig=~pl.col("blank") & ~pl.col("is_header"), fidx=pl.col("fidx"),
    )
    rows = _parsed(frame.filter(pl.col("category").is_in(["attempt", "connection"])).select(
        "seq", "file", "line_no", "category", pl.selectors.starts_with("p_"),
    ).lazy()).collect()
    del frame
    rtype = pl.col("p_type").str.to_lowercase()
    bcat = pl.col("p_bounceCat").str.to_lowercase()
    rcpt = pl.col("p_rcpt")
    expired = (rtype == "b") & (bcat == "message-expired").fill_null(False)
    evidence = pl.col("p_dsnMta").is_not_null() | pl.col("p_dlvDestinationIp").is_not_null() | pl.col("remote")
    queued = _time(pl.col("p_timeQueued"), tz)
    ts = _time(pl.col("p_timeLogged"), tz)
    key = pl.concat_str(
        [pl.col("p_jobId").fill_null(""), pl.col("p_envId").fill_null(""), pl.col("p_timeQueued").fill_null(""), pl.col("p_orig").fill_null("")],
        separator="|",
    )
    attempts = rows.lazy().filter(pl.col("category") == "attempt").with_columns(
        ts=ts,
        source=pl.lit(FORMAT),
        instance=pl.col("p_vmta"),
        # A try against a remote host needs evidence of one (a delivery, a remote MTA or
        # destination IP, a remote reply); a bounce without any (no MX, policy) is PowerMTA's own.
        agent=pl.when(expired).then(pl.lit("internal"))
        .when((rtype == "d") | evidence).then(pl.coalesce(pl.col("p_dlvType").str.to_lowercase(), pl.lit("smtp")))
        .otherwise(pl.lit("internal")),
        queue_id=pl.col("p_envId"),
        message_key=pl.when(key.str.replace_all(r"\|", "") != "").then(key),
        message_id=pl.coalesce(pl.col("p_msgid"), pl.col("p_envId")),
        sender=pl.col("p_orig"),
        recipient=rcpt,
        orig_recipient=pl.col("p_orcpt").str.replace(r"(?i)^rfc822;", ""),
        recipient_domain=rcpt.str.extract(r"@([^@\s>]+)>?$", 1).str.to_lowercase().str.strip_suffix("."),
        egress_ip=pl.col("p_dlvSourceIp"),
        egress_pool=pl.coalesce(pl.col("p_vmtaPool"), pl.col("p_vmta")),
        outcome=pl.when(rtype == "d").then(pl.lit("delivered")).when(rtype == "t").then(pl.lit("deferred"))
        .when(expired).then(pl.lit("expired")).otherwise(pl.lit("bounced")),
        queued_at=queued,
        delay_s=(ts - queued).dt.total_microseconds() / 1e6,
        size=pl.col("p_dlvSize").cast(pl.Int64, strict=False),
    ).with_columns(
        remote=((rtype == "d") | pl.col("remote")) & (pl.col("agent") != "internal"),
    )
    attempts = _conform(attempts, schema.ATTEMPT_COLUMNS)
    connections = rows.lazy().filter(pl.col("category") == "connection").with_columns(
        ts=ts,
        source=pl.lit(FORMAT),
        instance=pl.col("p_vmta"),
        event=pl.lit("queue_transient"),
        recipient_domain=pl.col("p_queue").str.extract(r"^([^/]+)", 1).str.to_lowercase(),
        egress_ip=pl.col("p_dlvSourceIp"),
    )
    connections = _conform(connections, schema.CONNECTION_COLUMNS)
    attempts, connections = pl.collect_all([attempts, connections])
    return slim, owned_strings(attempts), owned_strings(connections)


def _duplicates(slim: pl.DataFrame) -> pl.Series:
    """True for a record identical to one in an earlier file (by two 64-bit hashes).  Only
    lines whose first hash repeats are grouped (usually few or none)."""
    return later_copies(slim, pl.col("_elig"))


def load(files: list[SourceFile], options) -> Load:
    """Parse PowerMTA accounting files into attempts, ``tq`` connection events and the accounting.

    One file at a time to the canonical rows (memory: a file's text and fields are dropped
    before the next is read); the duplicate check and attempt numbers then run over all."""
    from . import Load

    tz = getattr(options, "tz", "UTC") or "UTC"
    reg = _Layouts()
    problems: list[str] = []
    dedupe = getattr(options, "dedupe", True) and len(files) > 1
    slims, tried, conns = [], [], []
    for fi, sf in enumerate(files):
        if sf.readable.stat().st_size == 0:
            continue
        done = len(slims)
        for frame in _file_frames(fi, sf, reg, problems, dedupe):
            if frame is None:  # the file is read again by the careful path
                del slims[done:], tried[done:], conns[done:]
                continue
            slim, att, con = _block_parts(frame, dedupe, tz)
            del frame
            slims.append(slim)
            tried.append(att)
            conns.append(con)
    problems += [f"{sf.name}: {p}" for sf in files for p in sf.problems]
    if not slims:
        return Load(accounting=Accounting(problems=problems))
    slim = pl.concat(slims)
    connections = pl.concat(conns)
    del slims, conns
    if dedupe:
        dup = _duplicates(slim)
        if dup.any():
            slim = slim.with_columns(
                category=pl.when(dup).then(pl.lit(_DUPLICATE[0])).otherwise(pl.col("category")),
                reason=pl.when(dup).then(pl.lit(_DUPLICATE[1])).otherwise(pl.col("reason")),
            )
            dup_seq = slim.filter(dup).select("seq")
            tried = [t.join(dup_seq, on="seq", how="anti", maintain_order="left") for t in tried]
            connections = connections.join(dup_seq, on="seq", how="anti", maintain_order="left")
        del dup
    # Files come in seq order and each file's rows in line order.  The attempt numbers are
    # added file by file (a column of one chunk beside frames of several would copy them all).
    numbers = try_numbers(pl.concat([t.select("seq", "message_key", "recipient") for t in tried]))
    offsets = [0]
    for t in tried:
        offsets.append(offsets[-1] + t.height)
    attempts = pl.concat([t.with_columns(attempt=numbers.slice(o, t.height)).drop("seq") for t, o in zip(tried, offsets)], rechunk=False)
    del tried, numbers
    accounting = account(slim.lazy().select("file", "line_no", "category", "reason"), files=files, fmt=FORMAT, problems=problems)
    return Load(attempts=attempts.lazy(), connections=connections.drop("seq").lazy(), accounting=accounting)
