"""Render a world as KumoMTA JSON log records (zstd segments named by start time, one per day).

Records: ``Reception`` per message, ``Delivery`` / ``TransientFailure`` / ``Bounce`` per
try, ``Expiration`` at the end of the queue lifetime.  ``response`` is ``{code,
enhanced_code {class, subject, detail} | null, content, command}`` where ``content`` is
the reply without the code and enhanced-code prefixes (continuation lines joined by
spaces) and ``command`` is ``RCPT TO``/``MAIL FROM``/``.``; ``peer_address`` is ``{name
(with the trailing dot), addr}``; connect timeouts are ``KumoMTA internal`` transient
failures.  ``num_attempts`` is the 1-based number of this try.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import polars as pl

from .common import CLIENTS, rng_for

NODEID = "557f3ad4-2c8c-11ee-976e-782d7e12e173"
_PREFIX = r"^\d{3}[ -](?:\d\.\d{1,3}\.\d{1,3} )?\s*"


def _content(text: pl.Expr) -> pl.Expr:
    return text.str.split("\n").list.eval(pl.element().str.replace(_PREFIX, "").str.strip_chars()).list.join(" ")


def render(world) -> pl.DataFrame:
    rng = rng_for(world, 4)
    n_r = world.messages.height
    ids = pl.DataFrame({"r": world.messages["r"], "kid": np.frombuffer(rng.bytes(n_r * 16).hex().encode(), dtype="S32").astype("U32"),
                        "sess": np.frombuffer(rng.bytes(n_r * 16).hex().encode(), dtype="S32").astype("U32")})
    t = world.truth.filter(pl.col("agent") != "error").join(ids, on="r").sort("ts", maintain_order=True).with_columns(
        (pl.col("agent") == "smtp").cast(pl.Int32).cum_sum().over("r").alias("n_try"))
    remote = pl.col("smtp_code").is_not_null()
    enh = pl.col("enhanced_code").str.split(".")
    source = pl.format("ip-{}", pl.col("egress_ip").str.replace_all(".", "-", literal=True))
    session = pl.format("{}-{}-{}-{}-{}", *(pl.col("sess").str.slice(a, b) for a, b in ((0, 8), (8, 4), (12, 4), (16, 4), (20, 12))))
    typ = pl.col("outcome").replace_strict({"delivered": "Delivery", "deferred": "TransientFailure", "bounced": "Bounce", "expired": "Expiration"})
    enhanced = pl.when(remote & pl.col("reply_text").str.contains(r"^\d{3}[ -]\d\.\d{1,3}\.\d{1,3}")).then(
        pl.struct(enh.list.get(0).cast(pl.Int64).alias("class"), enh.list.get(1).cast(pl.Int64).alias("subject"), enh.list.get(2).cast(pl.Int64).alias("detail")))
    internal = pl.format("KumoMTA internal: failed to connect to any candidate hosts: connect to {}:25 and read initial banner: timed out", "mx_ip")
    response = (pl.when(pl.col("outcome") == "expired").then(pl.struct(
                    pl.lit(551, pl.Int64).alias("code"),
                    pl.struct(pl.lit(5, pl.Int64).alias("class"), pl.lit(4, pl.Int64).alias("subject"), pl.lit(7, pl.Int64).alias("detail")).alias("enhanced_code"),
                    pl.format("Next delivery time would be at {} which exceeds the expiry time {} configured via set_scheduling",
                              (pl.col("ts") + pl.duration(seconds=4000)).dt.strftime("%Y-%m-%d %H:%M:%S%.9f UTC"),
                              (pl.col("queued_at") + pl.duration(days=5)).dt.strftime("%Y-%m-%d %H:%M:%S%.9f UTC")).alias("content"),
                    pl.lit(None, pl.String).alias("command")))
                .when(~remote).then(pl.struct(pl.lit(400, pl.Int64).alias("code"), pl.lit(None).alias("enhanced_code"), internal.alias("content"), pl.lit(None, pl.String).alias("command")))
                .otherwise(pl.struct(pl.col("smtp_code").cast(pl.Int64).alias("code"), enhanced.alias("enhanced_code"), _content(pl.col("reply_text")).alias("content"),
                                     pl.col("smtp_stage").replace_strict({"end of DATA": "."}, default=pl.col("smtp_stage")).alias("command"))))
    tries = t.select(
        "ts",
        pl.struct(
            typ.alias("type"), pl.col("kid").alias("id"), "sender", "recipient", pl.col("recipient_domain").alias("queue"),
            pl.when(pl.col("mx_host").is_not_null()).then(pl.format("{}->{}.", source, "mx_host")).otherwise(pl.lit("")).alias("site"),
            "size", response.alias("response"),
            pl.when(remote).then(pl.struct(pl.format("{}.", "mx_host").alias("name"), pl.col("mx_ip").alias("addr"))).alias("peer_address"),
            pl.col("ts").dt.epoch("s").alias("timestamp"), pl.col("ts").dt.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").alias("event_time"),
            pl.col("queued_at").dt.epoch("s").alias("created"), pl.col("queued_at").dt.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").alias("created_time"),
            pl.col("n_try").alias("num_attempts"), pl.lit("Uncategorized").alias("bounce_classification"),
            pl.col("egress_pool").alias("egress_pool"), source.alias("egress_source"),
            pl.when(pl.col("outcome") != "expired").then(pl.struct(pl.format("{}:{}", "egress_ip", (pl.col("r") * 7919 % 28000 + 32768)).alias("address"),
                                                                      pl.lit(None, pl.String).alias("protocol"), pl.lit(None, pl.String).alias("server"))).alias("source_address"),
            pl.lit("ESMTP").alias("delivery_protocol"), pl.lit("ESMTP").alias("reception_protocol"), pl.lit(NODEID).alias("nodeid"),
            pl.when(remote).then(pl.lit("TLS_AES_256_GCM_SHA384")).alias("tls_cipher"), pl.when(remote).then(pl.lit("TLSv1.3")).alias("tls_protocol_version"),
            session.alias("session_id"),
        ).struct.json_encode().alias("json"),
    )
    msgs = world.messages.join(ids, on="r").join(world.envelopes.select("msg", "size", "client", "egress_pool"), on="msg")
    client = pl.col("client").replace_strict(list(range(len(CLIENTS))), [c.split("[")[0] for c in CLIENTS], return_dtype=pl.String)
    client_ip = pl.col("client").replace_strict(list(range(len(CLIENTS))), [c.split("[")[1].rstrip("]") for c in CLIENTS], return_dtype=pl.String)
    recv = msgs.select(
        pl.col("arrival").alias("ts"),
        pl.struct(
            pl.lit("Reception").alias("type"), pl.col("kid").alias("id"), "sender", "recipient", pl.col("recipient_domain").alias("queue"),
            pl.lit("").alias("site"), "size",
            pl.struct(pl.lit(250, pl.Int64).alias("code"), pl.lit(None).alias("enhanced_code"), pl.lit("").alias("content"), pl.lit(".").alias("command")).alias("response"),
            pl.struct(client.alias("name"), client_ip.alias("addr")).alias("peer_address"),
            pl.col("arrival").dt.epoch("s").alias("timestamp"), pl.col("arrival").dt.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").alias("event_time"),
            pl.col("arrival").dt.epoch("s").alias("created"), pl.col("arrival").dt.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").alias("created_time"),
            pl.lit(0, pl.Int32).alias("num_attempts"), pl.lit("Uncategorized").alias("bounce_classification"),
            pl.lit(None, pl.String).alias("egress_pool"), pl.lit(None, pl.String).alias("egress_source"), pl.lit(None).alias("source_address"),
            pl.lit(None, pl.String).alias("delivery_protocol"), pl.lit("ESMTP").alias("reception_protocol"), pl.lit(NODEID).alias("nodeid"),
            pl.lit(None, pl.String).alias("tls_cipher"), pl.lit(None, pl.String).alias("tls_protocol_version"), session.alias("session_id"),
        ).struct.json_encode().alias("json"),
    )
    out = pl.concat([recv, tries]).sort("ts", maintain_order=True)
    # meta and headers are always present as empty objects in real records.
    return out.select("ts", pl.col("json").str.replace(r"\}$", ',"feedback_report":null,"meta":{},"headers":{}}').alias("line"))


def write(world, out_dir: Path, *, rotate: bool = True, gzip_old: bool = True, compress: bool = True) -> list[Path]:
    """Write zstd-compressed segments named ``YYYYMMDD-HHMMSS`` (one per UTC day when ``rotate``)."""
    import zstandard

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = render(world).with_columns(pl.col("ts").dt.date().alias("day"))
    paths = []
    for part in (rows.partition_by("day", maintain_order=True) if rotate else [rows]):
        first = part["ts"].min()
        path = out_dir / first.strftime("%Y%m%d-%H%M%S")
        buf = io.BytesIO()
        part.select("line").write_csv(buf, include_header=False, quote_style="never")
        data = buf.getvalue()
        path.write_bytes(zstandard.ZstdCompressor(level=6).compress(data) if compress else data)
        last = part["ts"].max().timestamp()
        os.utime(path, (last, last))
        paths.append(path)
    return paths
