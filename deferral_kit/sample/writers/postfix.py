"""Render a world as Postfix syslog lines, exactly as Postfix writes them.

One multi-instance Postfix per sending IP (``syslog_name`` ``postfix-<ip>``): smtpd
``connect``/``client=``/``disconnect``, cleanup ``message-id=``, qmgr ``from=<..>, size=..,
nrcpt=.. (queue active)`` each time the message enters the active queue, smtp ``to=<..>``
records with ``relay=``, ``delay=``, ``delays=a/b/c/d``, ``dsn=``, ``status=`` and the
reason, per-MX ``host .. said:`` and ``connect to ..: Connection timed out`` lines before
the record, ``postfix/error`` suspensions, qmgr ``status=expired, returned to sender``,
bounce notifications, ``removed``; plus noise (postscreen, anvil, opendkim, TLS lines).
Files are a Debian-rotated set (``mail.log``, ``mail.log.1``, ``mail.log.2.gz`` ...), one
per UTC day, each with its last line's time as mtime so year inference works.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from .common import CLIENTS, TLS_CIPHER, fmt_postfix_delay, pids, rng_for, write_rotated

SYSLOG = "%b %e %H:%M:%S"
RFC3339 = "%Y-%m-%dT%H:%M:%S%.6f+00:00"


def _us(seconds: float | pl.Expr) -> pl.Expr:
    return pl.duration(microseconds=(seconds * 1e6) if isinstance(seconds, pl.Expr) else int(seconds * 1e6))


def render(world, *, timestamps: str = "syslog", noise: bool = True) -> pl.DataFrame:
    """All log lines of the world: columns ``ts`` (UTC), ``line`` (without the newline), sorted by time."""
    rng = rng_for(world, 1)
    host = world.config.log_host
    env = world.envelopes.with_columns(
        pl.Series("client", np.array(CLIENTS)[world.envelopes["client"].to_numpy()]),
        pl.Series("spid", pids(rng, world.envelopes.height)),
        pl.Series("cpid", pids(rng, world.envelopes.height)),
        pl.Series("opid", pids(rng, world.envelopes.height)),
        pl.Series("new_qid", np.frombuffer(rng.bytes(world.envelopes.height * 5).hex().upper().encode(), dtype="S10").astype("U10")),
    )
    # qmgr runs as one long-lived process per instance.
    instances = env["instance"].unique().sort().to_list()
    qpid = dict(zip(instances, (int(p) for p in pids(rng, len(instances)))))
    env = env.with_columns(pl.col("instance").replace_strict(qpid, return_dtype=pl.Int64).alias("qpid"))
    t = world.truth.join(env.select("msg", "client", "nrcpt", "qpid"), on="msg", how="left").with_columns(
        pl.Series("pid", pids(rng, world.truth.height)))
    parts: list[pl.DataFrame] = []

    def add(frame: pl.DataFrame, ts: pl.Expr, text: pl.Expr, order: int) -> None:
        parts.append(frame.select(ts.alias("ts"), pl.lit(order, pl.Int8).alias("order"), text.alias("text")))

    inst = pl.col("instance")
    # --- arrival (smtpd, cleanup, opendkim, disconnect) --------------------------------------
    a = pl.col("arrival")
    add(env, a - _us(0.35), pl.format("{}/smtpd[{}]: connect from {}", inst, "spid", "client"), 0)
    add(env, a - _us(0.30), pl.format("{}/smtpd[{}]: {}: client={}", inst, "spid", "queue_id", "client"), 1)
    add(env, a - _us(0.20), pl.format("{}/cleanup[{}]: {}: message-id={}", inst, "cpid", "queue_id", "message_id"), 2)
    if noise:
        add(env, a - _us(0.15), pl.format("opendkim[{}]: {}: DKIM-Signature field added (s=s2026, d={})", "opid", "queue_id",
                                          pl.col("sender").str.split("@").list.get(1)), 3)
    add(env, a + _us(0.01), pl.format("{}/smtpd[{}]: disconnect from {} ehlo=1 mail=1 rcpt={} data=1 quit=1 commands={}", inst, "spid", "client",
                                      "nrcpt", (pl.col("nrcpt") + 4)), 5)
    # --- qmgr: the message enters the active queue (once per retry round) -------------------
    runs = t.filter(pl.col("agent") != "qmgr").group_by("msg", "active_at").agg(pl.first("instance", "qpid", "queue_id", "sender", "size", "nrcpt"))
    add(runs, pl.col("active_at"), pl.format("{}/qmgr[{}]: {}: from=<{}>, size={}, nrcpt={} (queue active)", inst, "qpid", "queue_id", "sender", "size", "nrcpt"), 4)

    # --- delivery records ---------------------------------------------------------------------
    tries = t.filter(pl.col("agent") != "qmgr")
    remote = pl.col("smtp_code").is_not_null()
    stage_txt = pl.col("smtp_stage")  # Postfix names them as the canonical stages do: RCPT TO, MAIL FROM, end of DATA
    said = lambda h, ip: pl.format("host {}[{}] said: {} (in reply to {} command)", h, ip, pl.col("reply_text").str.replace_all("\n", " ", literal=True), stage_txt)  # noqa: E731
    start = pl.col("ts") - _us(pl.col("delays_c") + pl.col("delays_d"))
    smtp_prog = pl.format("{}/smtp[{}]", inst, "pid")
    # non-final reply from the first of two hosts tried, then Postfix moves on
    two = tries.filter((pl.col("n_hosts") == 2) & remote)
    add(two, start + _us(pl.col("delays_c") * 0.45), pl.format("{}: {}: {}", smtp_prog, "queue_id", said("first_mx_host", "first_mx_ip")), 6)
    # failed connects: every host tried is logged, the last one too
    to = tries.filter(~remote & (pl.col("agent") == "smtp"))
    add(to.filter(pl.col("n_hosts") == 2), start + _us(pl.col("delays_c") * 0.5), pl.format("{}: connect to {}[{}]:25: Connection timed out", smtp_prog, "first_mx_host", "first_mx_ip"), 6)
    add(to, pl.col("ts") - _us(0.0005), pl.format("{}: connect to {}[{}]:25: Connection timed out", smtp_prog, "mx_host", "mx_ip"), 6)
    if noise:
        add(tries.filter(remote), start + _us(pl.col("delays_c") * 0.9), pl.format("{}: Trusted TLS connection established to {}[{}]:25: {}", smtp_prog, "mx_host", "mx_ip", pl.lit(TLS_CIPHER)), 6)
    f = fmt_postfix_delay
    reason = (pl.when(~remote).then(pl.col("response"))
              .when(pl.col("outcome") == "delivered").then(pl.col("reply_text").str.replace_all("\n", " ", literal=True))
              .otherwise(said("mx_host", "mx_ip")))
    add(tries, pl.col("ts"), pl.format(
        "{}/{}[{}]: {}: to=<{}>, relay={}, delay={}, delays={}/{}/{}/{}, dsn={}, status={} ({})",
        inst, "agent", "pid", "queue_id", "recipient",
        pl.when(remote).then(pl.format("{}[{}]:25", "mx_host", "mx_ip")).otherwise(pl.lit("none")),
        f(pl.col("delay_s")), f(pl.col("delays_a")), f(pl.col("delays_b")), f(pl.col("delays_c")), f(pl.col("delays_d")), "dsn",
        pl.col("outcome").replace_strict({"delivered": "sent", "deferred": "deferred", "bounced": "bounced"}, default="deferred"), reason), 7)

    # --- message end: expiry, bounce notice, removal ------------------------------------------
    exp = t.filter(pl.col("outcome") == "expired").group_by("msg").agg(pl.first("instance", "qpid", "queue_id", "sender"), pl.col("ts").min())
    add(exp, pl.col("ts"), pl.format("{}/qmgr[{}]: {}: from=<{}>, status=expired, returned to sender", inst, "qpid", "queue_id", "sender"), 8)
    pending = world.messages.filter(pl.col("final_outcome") == "pending").select("msg").unique()
    ends = t.join(pending, on="msg", how="anti").group_by("msg").agg(
        pl.first("instance", "qpid", "queue_id"), pl.col("ts").max(), pl.col("outcome").is_in(["bounced", "expired"]).any().alias("failed"))
    ends = ends.join(env.select("msg", "new_qid"), on="msg").with_columns(pl.Series("bpid", pids(rng, ends.height)))
    add(ends.filter("failed"), pl.col("ts") + _us(0.001), pl.format("{}/bounce[{}]: {}: sender non-delivery notification: {}", inst, "bpid", "queue_id", "new_qid"), 9)
    add(ends, pl.col("ts") + _us(0.002), pl.format("{}/qmgr[{}]: {}: removed", inst, "qpid", "queue_id"), 10)

    # --- noise: inbound postscreen, anvil statistics -----------------------------------------
    if noise:
        n = max(1, env.height // 6)
        t0 = world.config.start.timestamp()
        span = world.config.days * 86400
        ts = pl.Series((t0 + np.sort(rng.random(n)) * span) * 1e6).cast(pl.Int64).cast(pl.Datetime("us", "UTC"))
        octets = rng.integers(1, 255, (n, 4))
        inbound = pl.DataFrame({"ts": ts, "pid": pids(rng, n), "port": rng.integers(30000, 65000, n),
                                "o1": octets[:, 0], "o2": octets[:, 1], "o3": octets[:, 2], "o4": octets[:, 3]}).with_columns(
            pl.format("{}.{}.{}.{}", "o1", "o2", "o3", "o4").alias("ip"))
        add(inbound, pl.col("ts"), pl.format("postfix/postscreen[{}]: CONNECT from [{}]:{} to [192.0.2.25]:25", "pid", "ip", "port"), 0)
        add(inbound, pl.col("ts") + _us(0.004), pl.format("postfix/postscreen[{}]: PASS OLD [{}]:{}", "pid", "ip", "port"), 1)
        hours = pl.DataFrame({"ts": pl.Series((t0 + np.arange(world.config.days * 24) * 3600.0) * 1e6).cast(pl.Int64).cast(pl.Datetime("us", "UTC"))})
        hours = hours.with_columns(pl.Series("pid", pids(rng, hours.height)), (pl.col("ts") - _us(412.0)).alias("peak"))
        add(hours, pl.col("ts") + _us(7.0), pl.format("postfix/anvil[{}]: statistics: max connection rate 3/60s for (smtp:10.1.0.11) at {}", "pid",
                                                     pl.col("peak").dt.strftime(SYSLOG)), 0)

    lines = pl.concat(parts).sort("ts", "order", maintain_order=True)
    fmt = SYSLOG if timestamps == "syslog" else RFC3339
    if timestamps not in ("syslog", "rfc3339"):
        raise ValueError(f"timestamps must be syslog or rfc3339, not {timestamps!r}")
    return lines.select("ts", pl.format("{} {} {}", pl.col("ts").dt.strftime(fmt), pl.lit(host), "text").alias("line"))


def write(world, out_dir: Path, *, rotate: bool = True, gzip_old: bool = True, timestamps: str = "syslog", noise: bool = True,
          compress_all: bool = False) -> list[Path]:
    """Write the world as ``mail.log`` (+ ``mail.log.1``, ``mail.log.2.gz``, ... one per day when ``rotate``;
    ``compress_all``: ``mail.log.1.gz`` ... only, as right after a rotation without delaycompress)."""
    lines = render(world, timestamps=timestamps, noise=noise).with_columns(pl.col("ts").dt.date().alias("day"))
    return write_rotated(lines, Path(out_dir), "mail.log", rotate=rotate, gzip_old=gzip_old, compress_all=compress_all)
