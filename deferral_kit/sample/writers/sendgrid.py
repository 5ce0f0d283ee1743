"""Render a world as SendGrid Event Webhook events (JSON lines, one file per day).

Per recipient: ``processed`` at arrival, then ``deferred`` (``response``, ``attempt`` as a
string), ``delivered`` (``response``) or ``bounce`` (``reason``, ``status``, ``type``)
per try, with ``email``, ``timestamp`` (Unix seconds), ``smtp-id``, ``sg_event_id``,
``sg_message_id`` (``<id>.filter0001.<n>.<hex>.0``), ``category`` and the sending
``ip``.  SendGrid shows no MX host; connect timeouts appear as deferrals without an SMTP
code; Postfix-only local suspensions and queue expiry are not written.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import polars as pl

from .common import base62, rng_for


def render(world) -> pl.DataFrame:
    rng = rng_for(world, 5)
    n_msg = world.envelopes.height
    sg = world.envelopes.select("msg", "queue_id").with_columns(
        pl.Series("sg_base", base62(rng, n_msg, 22)), pl.Series("filt", rng.integers(10000, 99999, n_msg)))
    t = world.truth.filter(pl.col("agent") == "smtp").join(sg, on="msg").sort("ts", maintain_order=True).with_columns(
        pl.int_range(pl.len()).over("r").add(1).alias("n_try"))
    t = t.with_columns(pl.Series("ev_id", base62(rng, t.height, 22)))
    sg_mid = pl.format("{}.filter{}.{}.{}.0", "sg_base", pl.lit("0001"), "filt", "queue_id")
    reply = pl.col("reply_text").str.replace_all("\n", " ", literal=True)
    base = [pl.col("recipient").alias("email"), pl.col("ts").dt.epoch("s").alias("timestamp"), pl.col("message_id").alias("smtp-id")]
    tail = [pl.lit("newsletter").alias("category"), pl.format("{}==", "ev_id").alias("sg_event_id"), sg_mid.alias("sg_message_id")]
    ev = (
        t.filter(pl.col("outcome") == "deferred").select("ts", pl.struct(*base, pl.lit("deferred").alias("event"), *tail,
            pl.when(pl.col("smtp_code").is_not_null()).then(reply).otherwise(pl.lit("unable to connect: Connection timed out")).alias("response"),
            pl.col("n_try").cast(pl.String).alias("attempt"), pl.col("egress_ip").alias("ip"), pl.lit(1).alias("tls")).struct.json_encode().alias("line")),
        t.filter(pl.col("outcome") == "delivered").select("ts", pl.struct(*base, pl.lit("delivered").alias("event"), *tail,
            reply.alias("response"), pl.col("egress_ip").alias("ip"), pl.lit(1).alias("tls")).struct.json_encode().alias("line")),
        t.filter(pl.col("outcome") == "bounced").select("ts", pl.struct(*base, pl.lit("bounce").alias("event"), *tail,
            reply.alias("reason"), pl.col("enhanced_code").alias("status"),
            pl.when(pl.col("class_truth") == "policy").then(pl.lit("blocked")).otherwise(pl.lit("bounce")).alias("type"),
            pl.col("egress_ip").alias("ip"), pl.lit(1).alias("tls")).struct.json_encode().alias("line")),
    )
    msgs = world.messages.join(sg, on="msg").join(world.envelopes.select("msg", "message_id"), on="msg")
    msgs = msgs.with_columns(pl.Series("ev_id", base62(rng, msgs.height, 22)))
    processed = msgs.select(pl.col("arrival").alias("ts"), pl.struct(
        pl.col("recipient").alias("email"), pl.col("arrival").dt.epoch("s").alias("timestamp"), pl.col("message_id").alias("smtp-id"),
        pl.lit("processed").alias("event"), *tail).struct.json_encode().alias("line"))
    return pl.concat([processed, *ev]).sort("ts", maintain_order=True)


def write(world, out_dir: Path, *, rotate: bool = True, gzip_old: bool = False) -> list[Path]:
    """Write ``sendgrid-events-YYYYMMDD.jsonl`` (one per UTC day when ``rotate``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = render(world).with_columns(pl.col("ts").dt.date().alias("day"))
    paths = []
    for part in (rows.partition_by("day", maintain_order=True) if rotate else [rows]):
        path = out_dir / (f"sendgrid-events-{part['day'][0]:%Y%m%d}.jsonl" if rotate else "sendgrid-events.jsonl")
        buf = io.BytesIO()
        part.select("line").write_csv(buf, include_header=False, quote_style="never")
        path.write_bytes(buf.getvalue())
        last = part["ts"].max().timestamp()
        os.utime(path, (last, last))
        paths.append(path)
    return paths
