"""KumoMTA JSON log records (``/var/log/kumomta/*`` segments, webhook batches) → canonical attempts.

Input: one JSON record per line (zstd/gzip segments are decompressed by ``sources``), a
JSON array per line (``configure_log_hook``/webhook batches), or a pretty-printed
document with ``//`` comments (the docs' JSONC; comments and trailing commas are
tolerated, the whole file is then one document).

Mapping (formats.md §4): ``Delivery`` → delivered, ``TransientFailure`` → deferred,
``Bounce`` → bounced, ``Expiration`` → expired; ``recipient`` arrays are exploded to one
row per recipient.  ``response`` is rebuilt as ``"code x.y.z content"`` because KumoMTA
strips the code from ``content``.  Records whose content starts with ``KumoMTA internal:``
(spool/dispatcher errors, expiry) never reached a remote server: ``agent`` "internal",
``remote`` false — except "failed to connect to any candidate hosts", which is a
connection failure against the MX (``agent`` "smtp", ``remote`` false, like Postfix's
``connect to … timed out``).  ``attempt`` is counted from the logged events in time order
(``num_attempts`` "may be approximate after a restart", kumo-log-types).  Reception,
Delayed (local scheduling), AdminBounce, OOB, Feedback, Rejection and queue-movement
records are counted as skipped with their type as the reason.
"""

from __future__ import annotations

import re

import polars as pl

from .. import schema
from ..accounting import Accounting
from ..sources import SourceFile, scan_lines
from . import Load, LoadOptions
from .generic import account, block_lines, byte_blocks, domain_of, owned_strings, squash_spaces

FORMAT = "kumomta"

_TYPES = ("Delivery", "TransientFailure", "Bounce", "Expiration")
_OUTCOME = {"Delivery": "delivered", "TransientFailure": "deferred", "Bounce": "bounced", "Expiration": "expired"}
_SKIP_REASON = {
    "Reception": "Reception (inbound message)",
    "Rejection": "Rejection (inbound SMTP rejected)",
    "Delayed": "Delayed (local scheduling, not a try)",
    "AdminBounce": "AdminBounce (administrative, not a try)",
    "OOB": "OOB (asynchronous bounce report)",
    "Feedback": "Feedback (complaint report)",
    "AdminRebind": "AdminRebind (queue movement)",
    "DeferredInjectionRebind": "DeferredInjectionRebind (queue movement)",
    "XferOut": "XferOut (queue movement)",
    "XferIn": "XferIn (queue movement)",
}
_ALL_TYPES = _TYPES + tuple(_SKIP_REASON)

_SNIFF_TYPE = re.compile(r'["\']type["\']\s*:\s*"(' + "|".join(_ALL_TYPES) + r')"')
_SNIFF_SHAPE = re.compile(r'"(response|num_attempts|nodeid|egress_pool|queue)"\s*:')

_S = pl.String
_RECORD = pl.Struct(
    {
        "type": _S,
        "id": _S,
        "sender": _S,
        "recipient": pl.List(_S),
        "queue": _S,
        "site": _S,
        "size": _S,
        "response": pl.Struct({"code": _S, "enhanced_code": pl.Struct({"class": _S, "subject": _S, "detail": _S}), "content": _S, "command": _S}),
        "peer_address": pl.Struct({"name": _S, "addr": _S}),
        "timestamp": _S,
        "event_time": _S,
        "created": _S,
        "created_time": _S,
        "num_attempts": _S,
        "egress_pool": _S,
        "egress_source": _S,
        "source_address": pl.Struct({"address": _S}),
        "delivery_protocol": _S,
        "nodeid": _S,
        "headers": pl.Struct({"Message-ID": _S, "Message-Id": _S}),
    }
)

# A JSON string literal (with escapes) or a // or /* */ comment; comments are dropped, strings kept.
_JSONC_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|//[^\n]*|/\*.*?\*/', re.S)
_TRAILING_COMMA = re.compile(r",(\s*[}\]])")
# KumoMTA writes recipient as a string, or an array for batch transactions: make it always an array.
_RECIPIENT_STR = r'"recipient"(\s*):(\s*)("(?:[^"\\]|\\.)*")'

_STAGE = [("MAIL FROM", "MAIL FROM"), ("RCPT TO", "RCPT TO"), ("DATA", "DATA"), ("EHLO", "HELO"), ("HELO", "HELO"), ("LHLO", "HELO"), ("STARTTLS", "STARTTLS"), ("AUTH", "AUTH")]

_INTERNAL = r"^KumoMTA internal:"
_CONNECT_FAIL = r"(?i)failed to connect to any candidate hosts"


def sniff(text: str) -> bool:
    """A KumoMTA log record: a ``"type"`` of one of KumoMTA's record types (capitalised,
    unlike SparkPost's lower-case event types) next to KumoMTA's own keys."""
    return bool(_SNIFF_TYPE.search(text)) and bool(_SNIFF_SHAPE.search(text))


def _is_document(sf: SourceFile) -> bool:
    """True when the file is one pretty-printed JSON(C) document rather than a record per line."""
    with open(sf.readable, "rb") as fh:
        head = fh.read(65536).decode("utf-8", "replace").lstrip("\ufeff")
    for ln in head.splitlines():
        s = ln.strip()
        if not s or s.startswith("//"):
            continue
        return s in ("{", "[") or not (s.endswith("}") or s.endswith("]"))
    return False


def _document_lines(sf: SourceFile) -> pl.LazyFrame:
    """A JSONC document as one line: comments and trailing commas removed (one regex pass per file)."""
    text = open(sf.readable, encoding="utf-8", errors="replace").read().lstrip("\ufeff")
    text = _JSONC_TOKEN.sub(lambda m: m.group(0) if m.group(0).startswith('"') else "", text)
    text = _TRAILING_COMMA.sub(r"\1", text).strip()
    # Several top-level objects one after another (pretty-printed stream) → an array.
    text = re.sub(r"}\s*{", "},{", text)
    return pl.LazyFrame({"file": [sf.name], "line_no": [1], "line": [" ".join(text.split())]}, schema={"file": pl.String, "line_no": pl.Int64, "line": pl.String})


def _lines(files: list[SourceFile]) -> pl.LazyFrame:
    line_files = [sf for sf in files if not _is_document(sf)]
    doc_frames = [_document_lines(sf) for sf in files if sf not in line_files]
    return pl.concat([scan_lines(line_files), *doc_frames], how="vertical") if doc_frames else scan_lines(line_files)


_FLAT = pl.Struct({f.name: (pl.String if f.name == "recipient" else f.dtype) for f in _RECORD.fields})


def _decode_flat(batch: pl.DataFrame, data: bytes) -> pl.DataFrame | None:
    """The fast path for a block of plain JSON lines (one object per line, no blank line, no
    recipient array, as KumoMTA writes its log): the NDJSON reader on the block's bytes, about
    twice as fast as decoding the strings.  None when the block does not qualify or the
    reader disagrees (any bad line): the careful path then reads it."""
    line = pl.col("line").str.strip_chars()
    plain = batch.select((line.str.starts_with("{") & ~pl.col("line").str.contains(r'"recipient"\s*:\s*\[')).all()).item()
    if not plain:
        return None
    try:
        recs = pl.read_ndjson(data, schema=dict(_FLAT))
    except pl.exceptions.PolarsError:
        return None
    if recs.height != batch.height:
        return None
    rec = pl.struct(pl.all()).struct.with_fields(pl.concat_list(pl.field("recipient")).alias("recipient"))
    return pl.concat([batch, recs.select(rec.alias("rec"))], how="horizontal").select(
        "file", "line_no", pl.lit(0, dtype=pl.Int64).alias("rec_no"), pl.lit(True).alias("valid"), "line", "rec"
    )


def _decode(batch: pl.DataFrame) -> pl.DataFrame:
    """Lines ``file, line_no, line`` → one row per record ``file, line_no, rec_no, valid, line, rec``.

    The whole batch is decoded at once; only when that fails (``str.json_decode`` rejects a
    batch over one bad line) is each line checked on its own, so clean input pays no
    per-line validation."""
    line = pl.col("line").str.strip_chars()
    shaped = line.str.starts_with("{") | line.str.starts_with("[")
    as_array = pl.when(line.str.starts_with("[")).then(line).otherwise(pl.concat_str(pl.lit("["), line, pl.lit("]")))
    normalized = as_array.str.replace_all(_RECIPIENT_STR, r'"recipient"${1}:${2}[${3}]')
    decoded = pl.when(pl.col("valid")).then(normalized).otherwise(pl.lit("[]")).str.json_decode(pl.List(_RECORD)).alias("rec")
    try:
        out = batch.with_columns(valid=shaped).with_columns(decoded)
    except pl.exceptions.ComputeError:
        out = batch.with_columns(valid=shaped & line.str.json_path_match("$").is_not_null()).with_columns(decoded)
    return (
        out.with_columns(pl.when(pl.col("valid") & (pl.col("rec").list.len() > 0)).then(pl.col("rec")).otherwise(pl.lit([None], dtype=pl.List(_RECORD))).alias("rec"))
        .with_columns(pl.int_ranges(pl.col("rec").list.len()).alias("rec_no"))
        .explode("rec", "rec_no")
        .select("file", "line_no", "rec_no", "valid", "line", "rec")
    )


def records(files: list[SourceFile]) -> pl.LazyFrame:
    """Decoded records ``file, line_no, rec_no, text, valid, line, rec`` (one row per record; arrays exploded)."""
    lines = _lines(files).collect()
    return _decode(lines).with_columns(pl.col("line").alias("text")).select("file", "line_no", "rec_no", "text", "valid", "line", "rec").lazy()


def _epoch_or_rfc3339(rfc: pl.Expr, epoch: pl.Expr) -> pl.Expr:
    parsed = rfc.str.to_datetime("%Y-%m-%dT%H:%M:%S%.fZ", time_unit="us", time_zone="UTC", strict=False)
    parsed = parsed.fill_null(rfc.str.to_datetime(time_unit="us", time_zone="UTC", strict=False))
    secs = epoch.cast(pl.Float64, strict=False)
    from_epoch = (secs * 1_000_000).round().cast(pl.Int64).cast(schema.UTC_DT)
    return parsed.fill_null(from_epoch)


def _strip_port(addr: pl.Expr) -> pl.Expr:
    # "10.0.0.1:53210" and "[2001:db8::1]:25" → address; a bare IPv6 address is left alone.
    return (
        pl.when(addr.str.contains(r"^\[.*\]:\d+$"))
        .then(addr.str.extract(r"^\[(.*)\]:\d+$"))
        .when(addr.str.contains(r"^[^:]+:\d+$"))
        .then(addr.str.extract(r"^([^:]+):\d+$"))
        .otherwise(addr)
    )


def _stage(command: pl.Expr) -> pl.Expr:
    cmd = command.str.strip_chars().str.to_uppercase()
    expr = pl.when(cmd == ".").then(pl.lit("end of DATA"))
    for prefix, stage in _STAGE:
        expr = expr.when(cmd.str.starts_with(prefix)).then(pl.lit(stage))
    return expr.otherwise(pl.lit(None, dtype=pl.String))


def _canonical(recs: pl.LazyFrame) -> pl.LazyFrame:
    r = pl.col("rec")
    resp = r.struct.field("response")
    enh = resp.struct.field("enhanced_code")
    code = resp.struct.field("code").cast(pl.Int16, strict=False)
    enhanced = pl.concat_str(enh.struct.field("class"), enh.struct.field("subject"), enh.struct.field("detail"), separator=".")
    content = resp.struct.field("content")
    rtype = r.struct.field("type")
    internal = content.str.contains(_INTERNAL).fill_null(False) | (rtype == "Expiration")
    connect_fail = content.str.contains(_CONNECT_FAIL).fill_null(False)
    proto = r.struct.field("delivery_protocol")
    mx = r.struct.field("peer_address").struct.field("name").str.strip_chars().str.strip_suffix(".").str.to_lowercase()
    headers = r.struct.field("headers")
    node = r.struct.field("nodeid")
    qid = r.struct.field("id")
    ts = _epoch_or_rfc3339(r.struct.field("event_time"), r.struct.field("timestamp"))
    queued = _epoch_or_rfc3339(r.struct.field("created_time"), r.struct.field("created"))
    out = recs.with_columns(
        pl.lit(FORMAT).alias("source"),
        ts.alias("ts"),
        queued.alias("queued_at"),
        node.alias("log_host"),
        r.struct.field("egress_source").alias("instance"),
        pl.when(internal & ~connect_fail)
        .then(pl.lit("internal"))
        .when(proto.is_null() | (proto.str.to_uppercase().is_in(["ESMTP", "SMTP"])))
        .then(pl.lit("smtp"))
        .when(proto.str.to_uppercase() == "LMTP")
        .then(pl.lit("lmtp"))
        .otherwise(proto.str.to_lowercase())
        .alias("agent"),
        qid.alias("queue_id"),
        pl.concat_str(pl.lit("kumomta:"), node.fill_null(""), pl.lit(":"), qid).alias("message_key"),
        headers.struct.field("Message-ID").fill_null(headers.struct.field("Message-Id")).str.strip_chars().str.strip_prefix("<").str.strip_suffix(">").alias("message_id"),
        r.struct.field("sender").alias("sender"),
        r.struct.field("recipient").alias("recipient"),
        _strip_port(r.struct.field("source_address").struct.field("address")).alias("egress_ip"),
        r.struct.field("egress_pool").fill_null(r.struct.field("egress_source")).alias("egress_pool"),
        pl.when(mx != "").then(mx).alias("mx_host"),
        _strip_port(r.struct.field("peer_address").struct.field("addr")).alias("mx_ip"),
        code.alias("smtp_code"),
        enhanced.alias("enhanced_code"),
        enhanced.alias("dsn"),
        _stage(resp.struct.field("command")).alias("smtp_stage"),
        pl.concat_str(code.cast(pl.String), enhanced, pl.when(content.str.strip_chars() != "").then(squash_spaces(content)), separator=" ", ignore_nulls=True).alias("response"),
        rtype.replace_strict(_OUTCOME, default=None).alias("outcome"),
        (rtype.is_in(["Delivery", "TransientFailure", "Bounce"]) & ~internal & code.is_not_null()).alias("remote"),
        pl.when(r.struct.field("size").cast(pl.Int64, strict=False) > 0).then(r.struct.field("size").cast(pl.Int64, strict=False)).alias("size"),
    )
    out = out.explode("recipient").with_columns(
        domain_of(pl.col("recipient")).alias("recipient_domain"),
        ((pl.col("ts") - pl.col("queued_at")).dt.total_microseconds() / 1e6).alias("delay_s"),
    )
    # Canonical columns (attempt numbered later, over all files) plus rec_no for the duplicate check.
    have = out.collect_schema()
    return out.select(
        *[pl.col(n).cast(d, strict=False) if n in have else pl.lit(None, dtype=d).alias(n) for n, d in schema.ATTEMPTS.items()],
        pl.col("rec_no"),
    )


_BATCH_BYTES = 16 << 20


def _compact_strings(frame: pl.DataFrame) -> pl.DataFrame:
    """String columns copied into buffers of their own, in one chunk (so that the attempt
    numbers added later do not make polars rechunk the block then)."""
    return owned_strings(frame).rechunk()


def _first_distinct(recs: pl.DataFrame) -> pl.Series:
    """``struct(_h1, _h2, rec_no).is_first_distinct()``, grouping only the rows whose first
    hash repeats (usually few: a struct of every row costs hundreds of MB)."""
    first = recs.select(pl.col("_h1").is_first_distinct()).to_series()
    if first.all():
        return first
    cand = recs.select(pl.col("_h1").is_in(recs["_h1"].filter(~first).unique().implode())).to_series()
    sub = recs.filter(cand).select(pl.struct("_h1", "_h2", "rec_no").is_first_distinct()).to_series()
    return pl.repeat(True, recs.height, eager=True).scatter(cand.arg_true(), sub)


def _attempt_numbers(keys: pl.DataFrame) -> pl.Series:
    """``attempt`` as :func:`number_attempts` (``sort=False``) derives it: the rank of a row's
    time order (ts, file, line_no) within its (message_key, recipient).  A pair seen once (the
    usual case) is try 1; only pairs whose hash repeats are grouped, on their real keys."""
    order = keys.select(pl.arg_sort_by(["ts", "file", "line_no"], nulls_last=True).arg_sort()).to_series()
    pair = keys.select(pl.struct("message_key", "recipient").hash()).to_series()
    first = pair.is_first_distinct()
    attempt = pl.repeat(1, keys.height, dtype=pl.Int32, eager=True)
    if not first.all():
        again = pair.is_in(pair.filter(~first).unique().implode())
        sub = keys.select("message_key", "recipient").with_columns(_order=order).filter(again)
        ranked = sub.select(pl.col("_order").rank("ordinal").over("message_key", "recipient").cast(pl.Int32)).to_series()
        attempt = attempt.scatter(again.arg_true(), ranked)
    return attempt


def load(files: list[SourceFile], options: LoadOptions) -> Load:
    """KumoMTA log files → attempts (one row per recipient per Delivery/TransientFailure/Bounce/Expiration);
    no connection events (KumoMTA logs one record per try)."""
    # Batches of lines keep memory bounded: each is decoded once, reduced to a slim
    # per-record row (for the accounting) plus the canonical columns of its attempt records,
    # and its text is dropped before the next one is read.
    slim, tried = [], []
    docs = {sf.name for sf in files if _is_document(sf)}
    # File order is kept: a document is one batch of one line.
    blocks = (
        blk for sf in files
        for blk in ([(_document_lines(sf).collect(), None)] if sf.name in docs
                    else ((block_lines(sf, n, data), data) for n, data in byte_blocks(sf, batch_bytes=_BATCH_BYTES)))
    )
    for batch, data in blocks:
        decoded = _decode_flat(batch, data) if data is not None else None
        recs = (decoded if decoded is not None else _decode(batch)).with_columns(
            pl.col("rec").struct.field("type").alias("_type"),
            (pl.col("line").str.strip_chars() == "").alias("_blank"),
            # Identity of the line for the duplicate check: two independent 64-bit hashes.
            pl.col("line").hash(11).alias("_h1"),
            pl.col("line").hash(29).alias("_h2"),
        )
        # (the file name as a categorical: 4 bytes a line instead of a 16-byte view)
        slim.append(recs.select(pl.col("file").cast(pl.Categorical), "line_no", "rec_no", "valid", "_blank", "_type", "_h1", "_h2"))
        # (strings copied: a view would keep the block's decoded records alive to the end)
        tried.append(_compact_strings(_canonical(recs.lazy().filter(pl.col("valid") & pl.col("_type").is_in(_TYPES))).collect()))
        del recs, decoded
    if not slim:
        return Load(accounting=Accounting(problems=[f"{sf.name}: {p}" for sf in files for p in sf.problems]))
    recs = pl.concat(slim)
    if options.dedupe:
        # The same record read twice (overlapping copies of a segment) counts once.
        first = pl.when(pl.col("valid") & pl.col("_type").is_not_null()).then(_first_distinct(recs)).otherwise(True)
    else:
        first = pl.lit(True)
    recs = recs.with_columns(first.alias("_first"))
    blank = pl.col("_blank")
    category = (
        pl.when(blank)
        .then(pl.lit("skipped"))
        .when(~pl.col("valid"))
        .then(pl.lit("malformed"))
        .when(~pl.col("_first"))
        .then(pl.lit("duplicate"))
        .when(pl.col("_type").is_in(_TYPES))
        .then(pl.lit("attempt"))
        .otherwise(pl.lit("skipped"))
    )
    reason = (
        pl.when(blank)
        .then(pl.lit("blank line"))
        .when(~pl.col("valid"))
        .then(pl.lit("invalid JSON"))
        .when(~pl.col("_first"))
        .then(pl.lit("identical record already read"))
        .when(pl.col("_type").is_in(_TYPES))
        .then(pl.lit(None, dtype=pl.String))
        .when(pl.col("_type").is_null())
        .then(pl.lit("not a KumoMTA record (no type)"))
        .otherwise(
            # (the text for an unknown type is built on those rows only)
            pl.col("_type").replace_strict(_SKIP_REASON, default=None).fill_null(
                pl.concat_str(pl.lit("unknown record type "), pl.when(~pl.col("_type").is_in(list(_SKIP_REASON))).then(pl.col("_type")))
            )
        )
    )
    # (categoricals: the accounting groups small codes per line, not strings)
    # (computed once, not by each of the accounting's queries)
    classified = recs.select("file", "line_no", category.cast(pl.Categorical).alias("category"), reason.cast(pl.Categorical).alias("reason")).lazy()
    problems = [f"{sf.name}: {p}" for sf in files for p in sf.problems]
    accounting = account(classified, files=files, fmt=FORMAT, problems=problems)
    dups = recs.filter(~pl.col("_first")).select(pl.col("file").cast(pl.String), "line_no", "rec_no")
    if dups.height:
        tried = [t.join(dups, on=["file", "line_no", "rec_no"], how="anti", maintain_order="left") for t in tried]
    # The attempt numbers are added block by block (a column of one chunk beside a frame of
    # many chunks would copy the whole table).
    numbers = _attempt_numbers(pl.concat([t.select("ts", "file", "line_no", "message_key", "recipient") for t in tried]))
    parts, offset = [], 0
    for t in tried:
        parts.append(t.with_columns(pl.col("attempt").cast(pl.Int32, strict=False).fill_null(numbers.slice(offset, t.height))).drop("rec_no"))
        offset += t.height
    attempts = pl.concat(parts, rechunk=False).lazy()
    del tried, parts, numbers
    return Load(attempts=attempts, connections=schema.empty(schema.CONNECTION_COLUMNS), accounting=accounting)
