"""Render a world as an Exim ``mainlog`` (Debian: ``/var/log/exim4/mainlog``, rotated daily).

``<=`` arrival, ``=>`` delivery with ``H=host [ip]``, ``C="..."``, ``QT=``/``DT=``;
``== rcpt R=dnslookup T=remote_smtp defer (-44) H=host [ip]: SMTP error from remote mail
server after RCPT TO:<rcpt>: 452 4.3.1 ...`` (``-45`` after MAIL FROM, ``-46`` after end of
data; multi-line replies keep Exim's literal ``\\n``), per-host lines without a flag for the
first of two hosts tried, ``defer (110): Connection timed out`` for connect failures,
``**`` bounces, ``** rcpt R=dnslookup T=remote_smtp: retry timeout exceeded`` at expiry and
``Completed``.  Postfix-only local suspensions (``postfix/error``) are not written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from .common import CLIENTS, base62, rng_for, write_rotated

STAMP = "%Y-%m-%d %H:%M:%S"


def exim_time(seconds: pl.Expr) -> pl.Expr:
    """Exim's readconf_printtime: ``1d2h3m4s``, ``0s``."""
    s = seconds.floor().cast(pl.Int64)
    d, h, m, sec = s // 86400, (s % 86400) // 3600, (s % 3600) // 60, s % 60
    part = lambda v, u: pl.when(v > 0).then(pl.format("{}" + u, v)).otherwise(pl.lit(""))  # noqa: E731
    out = pl.concat_str([part(d, "d"), part(h, "h"), part(m, "m"), pl.when(sec > 0).then(pl.format("{}s", sec)).otherwise(pl.lit(""))])
    return pl.when(out == "").then(pl.lit("0s")).otherwise(out)


def _us(x) -> pl.Expr:
    return pl.duration(microseconds=(x * 1e6) if isinstance(x, pl.Expr) else int(x * 1e6))


def render(world) -> pl.DataFrame:
    rng = rng_for(world, 2)
    n = world.envelopes.height
    ids = pl.Series("exim_id", np.char.add(np.char.add(np.char.add(np.char.add(base62(rng, n, 6), "-"), base62(rng, n, 6)), "-"), base62(rng, n, 2)))
    env = world.envelopes.with_columns(ids, pl.Series("client", np.array(CLIENTS)[world.envelopes["client"].to_numpy()])).with_columns(
        pl.format("{} [{}]", pl.col("client").str.extract(r"^([^\[]+)"), pl.col("client").str.extract(r"\[([^\]]+)\]")).alias("client_h"))
    t = world.truth.join(env.select("msg", "exim_id"), on="msg").filter(pl.col("agent") != "error")
    parts = []

    def add(frame, ts, text, order):
        parts.append(frame.select(ts.alias("ts"), pl.lit(order, pl.Int8).alias("order"), pl.format("{} {}", "exim_id", text).alias("text")))

    add(env, pl.col("arrival"), pl.format("<= {} H={} P=esmtp S={} id={}", "sender", "client_h", "size", pl.col("message_id").str.strip_chars("<>")), 0)
    remote = pl.col("smtp_code").is_not_null()
    reply = pl.col("reply_text").str.replace_all("\n", "\\n", literal=True)
    after = (pl.when(pl.col("smtp_stage") == "MAIL FROM").then(pl.format("MAIL FROM:<{}> SIZE={}", "sender", "size"))
             .when(pl.col("smtp_stage") == "end of DATA").then(pl.lit("end of data"))
             .otherwise(pl.format("RCPT TO:<{}>", "recipient")))
    errno = pl.when(pl.col("smtp_stage") == "MAIL FROM").then(pl.lit("-45")).when(pl.col("smtp_stage") == "end of DATA").then(pl.lit("-46")).otherwise(pl.lit("-44"))
    tries = t.filter(pl.col("agent") == "smtp")
    start = pl.col("ts") - _us(pl.col("delays_c") + pl.col("delays_d"))
    two = tries.filter((pl.col("n_hosts") == 2) & remote)
    add(two, start + _us(pl.col("delays_c") * 0.45), pl.format("H={} [{}]: SMTP error from remote mail server after {}: {}", "first_mx_host", "first_mx_ip", after, reply), 1)
    to = tries.filter(~remote)
    add(to.filter(pl.col("n_hosts") == 2), start + _us(pl.col("delays_c") * 0.5), pl.format("H={} [{}] Connection timed out", "first_mx_host", "first_mx_ip"), 1)
    add(to, pl.col("ts") - _us(0.0005), pl.format("H={} [{}] Connection timed out", "mx_host", "mx_ip"), 1)
    qt = exim_time(pl.col("delay_s"))
    dt = exim_time(pl.col("delays_c") + pl.col("delays_d"))
    rt = "R=dnslookup T=remote_smtp"
    line = (pl.when(pl.col("outcome") == "delivered").then(pl.format(
                "=> {} {} H={} [{}] X=TLS1.3:ECDHE_X25519__RSA_PSS_RSAE_SHA256__AES_256_GCM:256 CV=yes C=\"{}\" QT={} DT={}",
                "recipient", pl.lit(rt), "mx_host", "mx_ip", pl.col("reply_text").str.replace_all("\"", "\\\"", literal=True), qt, dt))
            .when(~remote).then(pl.format("== {} {} defer (110): Connection timed out", "recipient", pl.lit(rt)))
            .when(pl.col("outcome") == "bounced").then(pl.format("** {} {} H={} [{}]: SMTP error from remote mail server after {}: {}",
                                                                  "recipient", pl.lit(rt), "mx_host", "mx_ip", after, reply))
            .otherwise(pl.format("== {} {} defer ({}) H={} [{}]: SMTP error from remote mail server after {}: {}",
                                 "recipient", pl.lit(rt), errno, "mx_host", "mx_ip", after, reply)))
    add(tries, pl.col("ts"), line, 2)
    exp = t.filter(pl.col("outcome") == "expired")
    add(exp, pl.col("ts"), pl.format("** {} {}: retry timeout exceeded", "recipient", pl.lit(rt)), 2)
    pending = world.messages.filter(pl.col("final_outcome") == "pending").select("msg").unique()
    ends = t.join(pending, on="msg", how="anti").group_by("msg").agg(pl.first("exim_id"), pl.col("ts").max())
    add(ends, pl.col("ts") + _us(0.002), pl.lit("Completed"), 3)
    lines = pl.concat(parts).sort("ts", "order", maintain_order=True)
    return lines.select("ts", pl.format("{} {}", pl.col("ts").dt.strftime(STAMP), "text").alias("line"))


def write(world, out_dir: Path, *, rotate: bool = True, gzip_old: bool = True) -> list[Path]:
    """Write ``mainlog`` (+ ``mainlog.1``, ``mainlog.2.gz``, ... one per UTC day)."""
    lines = render(world).with_columns(pl.col("ts").dt.date().alias("day"))
    return write_rotated(lines, Path(out_dir), "mainlog", rotate=rotate, gzip_old=gzip_old)
