"""Render a world as Mailgun webhook bodies (JSON lines ``{"signature": …, "event-data": …}``, one file per day).

Per recipient ``accepted`` at arrival, then per try ``failed`` (``severity`` temporary, reason
generic) / ``failed`` (permanent, reason bounce) / ``delivered`` with ``delivery-status``
``{code, enhanced-code, message (the reply without its code, lines joined by \\n),
mx-host, attempt-no, …}``; a connect timeout is code 499 "Unable to connect to MX
servers" without an ``mx-host``; queue expiry is ``failed``/permanent with ``reason: old``
("Too old").  ``timestamp`` is float Unix seconds.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from ._daily import write_daily
from .common import base62, rng_for

_ENH = r"^\d{3}[ -](\d\.\d{1,3}\.\d{1,3})\b"


def render(world) -> pl.DataFrame:
    rng = rng_for(world, 7)
    t = world.truth.filter(pl.col("agent") != "error").sort("ts", maintain_order=True).with_columns(
        (pl.col("agent") == "smtp").cast(pl.Int32).cum_sum().over("r").alias("n_try"))
    t = t.with_columns(pl.Series("ev_id", base62(rng, t.height, 22)), pl.Series("tok", base62(rng, t.height, 50)))
    out = pl.col("outcome")
    timeout = (out != "expired") & pl.col("smtp_code").is_null()
    lines = pl.col("reply_text").str.split("\n").list.eval(pl.element().str.replace(r"^\d{3}[ -]", "")).list.join("\n")
    mid = pl.col("message_id").str.strip_chars("<>")
    status = pl.struct(
        pl.lit(True).alias("tls"),
        pl.when(timeout | (out == "expired")).then(pl.lit("")).otherwise(pl.col("mx_host")).alias("mx-host"),
        pl.when(out == "expired").then(pl.col("n_try") + 1).otherwise(pl.col("n_try")).alias("attempt-no"),
        pl.when(timeout).then(pl.format("Unable to connect to MX servers: [{}]", "mx_host"))
        .when(out == "expired").then(pl.lit("Too old")).otherwise(pl.lit("")).alias("description"),
        pl.col("delays_d").round(3).alias("session-seconds"),
        pl.when(out == "deferred").then((pl.col("n_try") * 600).clip(600, 14400)).alias("retry-seconds"),
        pl.when(timeout).then(pl.lit(499, pl.Int64)).when(out == "expired").then(pl.lit(421, pl.Int64))
        .otherwise(pl.col("smtp_code").cast(pl.Int64)).alias("code"),
        pl.col("reply_text").str.extract(_ENH, 1).alias("enhanced-code"),
        pl.when(timeout).then(pl.lit("")).when(out == "expired").then(pl.lit("Too old")).otherwise(lines).alias("message"),
    )
    envelope = pl.struct(pl.col("egress_ip").alias("sending-ip"), "sender", pl.lit("smtp").alias("transport"), pl.col("recipient").alias("targets"))
    message = pl.struct(pl.struct(pl.col("recipient").alias("to"), mid.alias("message-id"), pl.col("sender").alias("from"),
                                  pl.lit("Newsletter").alias("subject")).alias("headers"), "size")
    epoch = (pl.col("ts").dt.epoch("us") / 1e6).round(6)
    signature = pl.struct(epoch.cast(pl.Int64).cast(pl.String).alias("timestamp"), pl.col("tok").alias("token"),
                          pl.lit("0" * 64).alias("signature"))
    data = pl.struct(
        pl.col("ev_id").alias("id"), epoch.alias("timestamp"),
        out.replace_strict({"delivered": "info", "deferred": "warn"}, default="error").alias("log-level"),
        pl.when(out == "delivered").then(pl.lit("delivered")).otherwise(pl.lit("failed")).alias("event"),
        pl.when(out == "deferred").then(pl.lit("temporary")).when(out != "delivered").then(pl.lit("permanent")).alias("severity"),
        pl.when(out == "deferred").then(pl.lit("generic")).when(out == "bounced").then(pl.lit("bounce"))
        .when(out == "expired").then(pl.lit("old")).alias("reason"),
        "recipient", pl.col("recipient_domain").alias("recipient-domain"),
        envelope.alias("envelope"), message.alias("message"), status.alias("delivery-status"),
    )
    tries = t.select("ts", pl.struct(signature.alias("signature"), data.alias("event-data")).struct.json_encode().alias("line"))
    m = world.messages.join(world.envelopes.select("msg", "message_id", "size", "egress_ip"), on="msg")
    m = m.with_columns(pl.Series("ev_id", base62(rng, m.height, 22)), pl.Series("tok", base62(rng, m.height, 50)))
    a_epoch = (pl.col("arrival").dt.epoch("us") / 1e6).round(6)
    accepted = m.select(pl.col("arrival").alias("ts"), pl.struct(
        pl.struct(a_epoch.cast(pl.Int64).cast(pl.String).alias("timestamp"), pl.col("tok").alias("token"), pl.lit("0" * 64).alias("signature")).alias("signature"),
        pl.struct(pl.col("ev_id").alias("id"), a_epoch.alias("timestamp"), pl.lit("info").alias("log-level"), pl.lit("accepted").alias("event"),
                  "recipient", pl.col("recipient_domain").alias("recipient-domain"), envelope.alias("envelope"), message.alias("message")).alias("event-data"),
    ).struct.json_encode().alias("line"))
    return pl.concat([accepted, tries]).sort("ts", maintain_order=True)


def write(world, out_dir: Path, *, rotate: bool = True, gzip_old: bool = False) -> list[Path]:
    """Write ``mailgun-events-YYYYMMDD.jsonl`` (one per UTC day when ``rotate``)."""
    return write_daily(render(world), out_dir, lambda d: f"mailgun-events-{d:%Y%m%d}.jsonl" if d else "mailgun-events.jsonl", rotate=rotate)
