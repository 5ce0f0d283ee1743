"""Render a world as SparkPost webhook batches (JSON lines, each line one POSTed batch
``[{"msys": {"message_event": {…}}}, …]``; one file per day).

Per recipient an ``injection`` event, then per try ``delay`` / ``delivery`` / ``bounce`` with
SparkPost's string-valued fields: ``rcpt_to``, ``raw_rcpt_to``, ``timestamp`` (Unix
seconds), ``message_id``, ``transmission_id``, ``event_id``, ``sending_ip``, ``ip_pool``,
``ip_address`` (the receiving MX's IP), ``num_retries`` (tries before this one),
``queue_time`` (ms), ``injection_time``; delays and bounces add ``bounce_class``,
``error_code``, ``reason``/``raw_reason`` (the reply, lines joined by spaces).  A connect
timeout is a delay with bounce class 24 and SparkPost's own ``[internal]`` text.  Deliveries
carry no reply text, as in SparkPost's events; no MX host name; queue expiry and Postfix-only
local suspensions are not written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from ._daily import write_daily
from .common import rng_for

BATCH = 100  # events per webhook POST
_CLASS = {"mailbox": "10", "policy": "50", "reputation": "51", "capacity": "20", "rate_limit": "20", "connection": "24", "other": "20"}


def render(world) -> pl.DataFrame:
    rng = rng_for(world, 9)
    n_r = world.messages.height
    ids = pl.DataFrame({"r": world.messages["r"],
                        "sp_mid": np.frombuffer(rng.bytes(n_r * 10).hex().encode(), dtype="S20").astype("U20")})
    tx = world.envelopes.select("msg", pl.Series("tx", rng.integers(10**16, 10**17, world.envelopes.height)).cast(pl.String))
    t = world.truth.filter(pl.col("agent") == "smtp").join(ids, on="r").join(tx, on="msg").sort("ts", maintain_order=True).with_columns(
        pl.int_range(pl.len()).over("r").alias("retries"))
    t = t.with_columns(pl.Series("ev", rng.integers(10**16, 10**17, t.height)).cast(pl.String))
    reply = pl.col("reply_text").str.replace_all("\n", " ", literal=True)
    timeout = pl.col("smtp_code").is_null()
    raw = pl.when(timeout).then(pl.format("421 4.4.1 [internal] Connection timed out to {} ({})", "mx_host", "mx_ip")).otherwise(reply)
    out = pl.col("outcome")
    base = [
        out.replace_strict({"deferred": "delay", "delivered": "delivery", "bounced": "bounce"}).alias("type"),
        pl.col("ev").alias("event_id"), pl.col("sp_mid").alias("message_id"), pl.col("tx").alias("transmission_id"),
        pl.col("ts").dt.epoch("s").cast(pl.String).alias("timestamp"),
        pl.col("recipient").alias("rcpt_to"), pl.col("recipient").alias("raw_rcpt_to"),
        pl.col("sender").alias("msg_from"), pl.col("size").cast(pl.String).alias("msg_size"),
        pl.col("egress_ip").alias("sending_ip"), pl.col("egress_pool").alias("ip_pool"), pl.col("mx_ip").alias("ip_address"),
        pl.col("retries").cast(pl.String).alias("num_retries"),
        (pl.col("delay_s") * 1000).round(0).cast(pl.Int64).cast(pl.String).alias("queue_time"),
        pl.col("queued_at").dt.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").alias("injection_time"),
        pl.col("recipient_domain").alias("routing_domain"), pl.lit("esmtp").alias("delv_method"),
        pl.when(timeout).then(pl.lit("0")).otherwise(pl.lit("1")).alias("outbound_tls"),
    ]
    failure = [
        pl.when(timeout).then(pl.lit("24")).otherwise(pl.col("class_truth").replace_strict(_CLASS, default="1")).alias("bounce_class"),
        pl.when(timeout).then(pl.lit("421")).otherwise(pl.col("smtp_code").cast(pl.String)).alias("error_code"),
        raw.alias("reason"), raw.alias("raw_reason"),
    ]
    wrap = lambda ev: pl.struct(pl.struct(ev.alias("message_event")).alias("msys")).struct.json_encode()  # noqa: E731
    events = pl.concat([
        t.filter(out != "delivered").select("ts", wrap(pl.struct(*base, *failure)).alias("event")),
        t.filter(out == "delivered").select("ts", wrap(pl.struct(*base)).alias("event")),
    ])
    m = world.messages.join(ids, on="r").join(tx, on="msg").join(world.envelopes.select("msg", "size", "egress_ip", "egress_pool"), on="msg")
    m = m.with_columns(pl.Series("ev", rng.integers(10**16, 10**17, m.height)).cast(pl.String))
    injection = m.select(pl.col("arrival").alias("ts"), wrap(pl.struct(
        pl.lit("injection").alias("type"), pl.col("ev").alias("event_id"), pl.col("sp_mid").alias("message_id"), pl.col("tx").alias("transmission_id"),
        pl.col("arrival").dt.epoch("s").cast(pl.String).alias("timestamp"), pl.col("recipient").alias("rcpt_to"), pl.col("recipient").alias("raw_rcpt_to"),
        pl.col("sender").alias("msg_from"), pl.col("size").cast(pl.String).alias("msg_size"), pl.col("egress_pool").alias("ip_pool"),
        pl.col("arrival").dt.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").alias("injection_time"), pl.col("recipient_domain").alias("routing_domain"),
    )).alias("event"))
    ev = pl.concat([injection, events]).sort("ts", maintain_order=True).with_columns(pl.col("ts").dt.date().alias("day"))
    # Webhook batches never span two days' files: number them within each day.
    ev = ev.with_columns((pl.int_range(pl.len()).over("day") // BATCH).alias("batch"))
    return ev.group_by("day", "batch", maintain_order=True).agg(
        pl.col("ts").last(), pl.format("[{}]", pl.col("event").str.join(", ")).alias("line")).select("ts", "line")


def write(world, out_dir: Path, *, rotate: bool = True, gzip_old: bool = False) -> list[Path]:
    """Write ``sparkpost-events-YYYYMMDD.jsonl`` (one per UTC day when ``rotate``)."""
    return write_daily(render(world), out_dir, lambda d: f"sparkpost-events-{d:%Y%m%d}.jsonl" if d else "sparkpost-events.jsonl", rotate=rotate)
