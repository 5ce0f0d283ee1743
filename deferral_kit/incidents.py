"""Incident episodes: contiguous time where a deferral rate is significantly in the throttle or incident band.

Detection works on the small frame of rates per time bucket and group from
:func:`deferral_kit.metrics.rate` (denominator: tries against a remote MX, ``is_mx_attempt``):

1. a bucket is *hot* when the 95 % Wilson **lower** bound of its rate is in the throttle
   or incident band (above the throttle threshold, 2 per 10,000 by default) **and** it has
   at least ``min_count`` matching replies.  The point estimate is not enough: 1 hit in 200
   tries is 50 per 10,000 but says little.  The count floor is needed too, because the
   Wilson bound of 1 in 200 is still 8.8 per 10,000;
2. hot buckets of the same group and signal that are at most ``merge_gap`` apart are
   merged into one episode (a quiet hour inside an incident does not split it);
3. each episode is described from the attempts themselves (first/last matching reply,
   sending IPs, destinations, MX hosts, reply texts, side) and from the fate of the
   recipients it deferred (:mod:`deferral_kit.outcomes`).

Groups are providers (``by=("provider",)``) or destinations (``by=("recipient_domain",)``).
The *signal* is either a reply (default ``452 4.3.1``) or response classes from
:mod:`deferral_kit.classify` (one detection pass per class, so a warm-up IP's 4.7.650
reputation deferrals and Microsoft's capacity deferrals are separate episodes).
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import polars as pl

from .outcomes import KEY, recipient_outcomes
from .queue import _step_us

# Classes about one recipient (mailbox full, too many recipients in one transaction), not the
# path to a provider: "all" leaves them out, they are never an incident of the destination.
PER_RECIPIENT_CLASSES = ("delivered", "mailbox", "too_many_recipients")
MAX_LISTED = 20  # IPs, destinations, MX hosts and reply texts kept per episode, most frequent first

EPISODE_COLUMNS = (
    "episode", "signal", "start", "end", "first_seen", "last_seen", "hot_buckets", "attempts", "count", "rate_per_10k",
    "ci_low_per_10k", "ci_high_per_10k", "peak_rate_per_10k", "peak_at", "peak_band", "peak_attempts", "peak_count",
    "response_class", "side", "side_evidence", "sending_ips", "n_sending_ips", "active_sending_ips", "destinations",
    "n_destinations", "mx_hosts", "n_mx_hosts", "responses", "affected_recipients", "retries", "retry_success_rate",
    "delivered", "bounced", "expired", "pending", "final_delivery_rate", "recovered_at", "time_to_recover", "ongoing",
)


def _enrich(attempts: pl.LazyFrame, *, need_provider: bool, own_infrastructure=None) -> pl.LazyFrame:
    """Add provider and class columns when the input lacks them."""
    have = attempts.collect_schema()
    if need_provider and "provider" not in have:
        from .providers import with_provider

        attempts = with_provider(attempts)
    if "response_class" not in have or "side" not in have:
        from .classify import with_classes

        attempts = with_classes(attempts, own_infrastructure=own_infrastructure)
    return attempts


def _signals(attempts: pl.LazyFrame, *, code: int | None, enhanced: str | None, response_class) -> list[tuple[str, pl.Expr]]:
    """(label, matching-row expression) per signal to detect."""
    from . import metrics

    if response_class is None:
        label = " ".join(str(x) for x in (code, enhanced) if x)
        return [(label or "any", metrics.response_is(code=code, enhanced=enhanced))]
    if isinstance(response_class, str) and response_class == "all":
        classes = (
            attempts.filter((pl.col("outcome") == "deferred") & metrics.is_mx_attempt() & ~pl.col("response_class").is_in(PER_RECIPIENT_CLASSES))
            .select(pl.col("response_class").drop_nulls().unique().sort())
            .collect()
            .to_series()
            .to_list()
        )
    else:
        classes = [response_class] if isinstance(response_class, str) else list(response_class)
    # class signals count deferrals: a bounce is not a try that will be retried
    return [(c, (pl.col("response_class") == c) & (pl.col("outcome") == "deferred")) for c in classes]


def rates(
    attempts: pl.LazyFrame,
    *,
    by: Sequence[str] = ("provider",),
    bucket: str = "1h",
    code: int | None = 452,
    enhanced: str | None = "4.3.1",
    response_class: str | Sequence[str] | None = None,
    bands=None,
    min_count: int = 3,
    own_infrastructure=None,
) -> pl.DataFrame:
    """Rates per ``bucket`` × group × ``signal`` (``metrics.rate`` columns) with ``hot``: the bucket counts as episode evidence.

    ``signal`` is ``"452 4.3.1"`` (the reply counted) or a response class name.  The
    denominator of every rate is all MX tries of the group in the bucket, whatever the class.
    """
    from . import metrics

    bands = bands if bands is not None else metrics.DEFAULT_BANDS
    attempts = _enrich(attempts, need_provider="provider" in by or "provider_family" in by, own_infrastructure=own_infrastructure)
    parts = []
    # one pass per signal (a handful of classes): splitting by class inside one rate call
    # would split the denominator too
    for label, where in _signals(attempts, code=code, enhanced=enhanced, response_class=response_class):
        parts.append(metrics.rate(attempts, where=where, by=list(by), bucket=bucket, bands=bands).with_columns(pl.lit(label).alias("signal")))
    if not parts:
        return pl.DataFrame()
    frame = pl.concat(pl.collect_all(parts), how="vertical_relaxed")
    quiet = bands.names[0]  # the lowest band ("watch"): anything above it is throttle or worse
    return frame.with_columns(
        ((metrics.band_expr(pl.col("ci_low_per_10k") / 1e4, bands) != quiet) & (pl.col("count") >= min_count)).alias("hot")
    ).sort(["signal", *by, "bucket"])


def detect(
    attempts: pl.LazyFrame,
    *,
    by: Sequence[str] = ("provider",),
    bucket: str = "1h",
    code: int | None = 452,
    enhanced: str | None = "4.3.1",
    response_class: str | Sequence[str] | None = None,
    bands=None,
    min_count: int = 3,
    merge_gap: str = "1h",
    own_infrastructure=None,
) -> pl.DataFrame:
    """Episodes, one row each, oldest first (see the module docstring for the rule).

    ``response_class``: a class name, a list, or ``"all"`` (every class seen on deferred
    MX tries except :data:`PER_RECIPIENT_CLASSES`) to detect deferrals per class instead of
    the reply ``code``/``enhanced``.
    Columns (:data:`EPISODE_COLUMNS` plus the ``by`` columns):

    * ``start``/``end``: first hot bucket's start, last hot bucket's end; ``first_seen``/
      ``last_seen``: first and last matching reply inside that window;
    * ``attempts``, ``count``, ``rate_per_10k`` and its Wilson interval: over every bucket of
      the window (quiet buckets merged in included); ``peak_*``: the hot bucket with the
      highest rate, ``peak_band`` its band (point estimate);
    * ``sending_ips`` (of ``active_sending_ips`` that tried the group in the window),
      ``destinations``, ``mx_hosts``, ``responses``: most frequent first, at most 20;
    * ``side``: receiver or sender by majority of the matching replies' ``side``
      (``classify``), ``side_evidence`` says why in words;
    * ``affected_recipients``: recipient-messages with a matching reply in the window;
      ``retries``/``retry_success_rate``: their tries right after such a reply, and the share
      delivered; ``delivered``/``bounced``/``expired``/``pending`` their final status and
      ``final_delivery_rate`` = delivered / resolved (pending excluded);
    * ``recovered_at``: start of the first later bucket whose point rate is back in the
      watch band; ``time_to_recover`` = ``recovered_at - start``; ``ongoing`` when the data
      ends before that.
    """
    from . import metrics

    by = list(by)
    attempts = _enrich(attempts, need_provider="provider" in by or "provider_family" in by, own_infrastructure=own_infrastructure)
    r = rates(attempts, by=by, bucket=bucket, code=code, enhanced=enhanced, response_class=response_class, bands=bands, min_count=min_count)
    keys = ["signal", *by]
    step = timedelta(microseconds=_step_us(bucket))
    gap = timedelta(microseconds=_step_us(merge_gap))
    if r.height == 0 or not r["hot"].any():
        return _empty(by, r)
    hot = (
        r.filter("hot")
        .sort([*keys, "bucket"])
        .with_columns(((pl.col("bucket").diff().over(keys) - step) > gap).fill_null(True).cum_sum().over(keys).alias("_run"))
    )
    ep = (
        hot.group_by([*keys, "_run"])
        .agg(
            pl.col("bucket").min().alias("start"),
            (pl.col("bucket").max() + step).alias("end"),
            pl.len().cast(pl.Int64).alias("hot_buckets"),
            pl.col("rate_per_10k").max().alias("peak_rate_per_10k"),
            pl.col("bucket").sort_by(["rate_per_10k", "bucket"], descending=[True, False]).first().alias("peak_at"),
            pl.col("band").sort_by(["rate_per_10k", "bucket"], descending=[True, False]).first().alias("peak_band"),
            pl.col("attempts").sort_by(["rate_per_10k", "bucket"], descending=[True, False]).first().alias("peak_attempts"),
            pl.col("count").sort_by(["rate_per_10k", "bucket"], descending=[True, False]).first().alias("peak_count"),
        )
        .sort(["start", *keys])
        .with_row_index("episode", offset=1)
        .with_columns(pl.col("episode").cast(pl.Int64))
        .drop("_run")
    )
    in_window = (pl.col("bucket") >= pl.col("start")) & (pl.col("bucket") < pl.col("end"))
    totals = (
        r.join(ep.select("episode", *keys, "start", "end"), on=keys)
        .filter(in_window)
        .group_by("episode")
        .agg(pl.col("attempts").sum(), pl.col("count").sum())
    )
    lo, hi = metrics.wilson_interval(pl.col("count"), pl.col("attempts"))
    totals = totals.with_columns(
        (pl.col("count") / pl.col("attempts") * 1e4).alias("rate_per_10k"), (lo * 1e4).alias("ci_low_per_10k"), (hi * 1e4).alias("ci_high_per_10k")
    )
    recovery = (
        r.join(ep.select("episode", *keys, "end"), on=keys)
        .filter((pl.col("bucket") >= pl.col("end")) & (pl.col("band") == (bands or metrics.DEFAULT_BANDS).names[0]))
        .group_by("episode")
        .agg(pl.col("bucket").min().alias("recovered_at"))
    )
    ep = ep.join(totals, on="episode", how="left").join(recovery, on="episode", how="left").with_columns(
        (pl.col("recovered_at") - pl.col("start")).alias("time_to_recover"),
        pl.col("recovered_at").is_null().alias("ongoing"),
    )
    details = _details(attempts, ep, by=by, code=code, enhanced=enhanced, response_class=response_class)
    out = ep.join(details, on="episode", how="left")
    return out.select("episode", "signal", *by, *[c for c in EPISODE_COLUMNS[2:] if c in out.columns]).sort("episode")


def _empty(by: list[str], r: pl.DataFrame) -> pl.DataFrame:
    dt = pl.Datetime("us", "UTC")
    lst = pl.List(pl.String)
    types = {
        "episode": pl.Int64, "signal": pl.String, "start": dt, "end": dt, "first_seen": dt, "last_seen": dt, "hot_buckets": pl.Int64,
        "attempts": pl.Int64, "count": pl.Int64, "rate_per_10k": pl.Float64, "ci_low_per_10k": pl.Float64, "ci_high_per_10k": pl.Float64,
        "peak_rate_per_10k": pl.Float64, "peak_at": dt, "peak_band": pl.String, "peak_attempts": pl.Int64, "peak_count": pl.Int64,
        "response_class": pl.String, "side": pl.String, "side_evidence": pl.String, "sending_ips": lst, "n_sending_ips": pl.Int64,
        "active_sending_ips": pl.Int64, "destinations": lst, "n_destinations": pl.Int64, "mx_hosts": lst, "n_mx_hosts": pl.Int64,
        "responses": lst, "affected_recipients": pl.Int64, "retries": pl.Int64, "retry_success_rate": pl.Float64, "delivered": pl.Int64,
        "bounced": pl.Int64, "expired": pl.Int64, "pending": pl.Int64, "final_delivery_rate": pl.Float64, "recovered_at": dt,
        "time_to_recover": pl.Duration("us"), "ongoing": pl.Boolean,
    }
    cols = {"episode": types["episode"], "signal": types["signal"]}
    cols.update({b: (r.schema[b] if b in r.columns else pl.String) for b in by})
    cols.update({k: v for k, v in types.items() if k not in cols})
    return pl.DataFrame(schema=cols)


def _ranked(frame: pl.DataFrame, col: str, name: str) -> pl.DataFrame:
    """Per episode: distinct ``col`` values most frequent first (ties alphabetical), at most MAX_LISTED."""
    return (
        frame.filter(pl.col(col).is_not_null())
        .group_by("episode", col)
        .len()
        .sort(["episode", "len", col], descending=[False, True, False])
        .group_by("episode", maintain_order=True)
        .agg(pl.col(col).head(MAX_LISTED).alias(name), pl.len().cast(pl.Int64).alias(f"n_{name}"))
    )


def _details(attempts: pl.LazyFrame, ep: pl.DataFrame, *, by: list[str], code, enhanced, response_class) -> pl.DataFrame:
    """What the matching replies inside each episode window say, and what became of their recipients."""
    from . import metrics

    keys = ["signal", *by]
    windows = ep.select("episode", *keys, "start", "end").lazy()
    mx = attempts.filter(metrics.is_mx_attempt().fill_null(False))
    in_window = (pl.col("ts") >= pl.col("start")) & (pl.col("ts") < pl.col("end"))
    hit_parts = []
    for label, where in _signals(attempts, code=code, enhanced=enhanced, response_class=response_class):
        if label not in ep["signal"]:
            continue
        hit_parts.append(mx.filter(where.fill_null(False)).with_columns(pl.lit(label).alias("signal")))
    cols = ["episode", *KEY, "ts", "attempt", "line_no", "egress_ip", "recipient_domain", "mx_host", "response", "response_class", "side"]
    hits = pl.concat(hit_parts, how="vertical_relaxed").join(windows, on=keys).filter(in_window).select(cols)
    active = (
        mx.join(windows.select("episode", *by, "start", "end"), on=by)
        .filter(in_window)
        .group_by("episode")
        .agg(pl.col("egress_ip").drop_nulls().n_unique().cast(pl.Int64).alias("active_sending_ips"))
    )
    hits, active = pl.collect_all([hits, active])

    base = hits.group_by("episode").agg(
        pl.col("ts").min().alias("first_seen"),
        pl.col("ts").max().alias("last_seen"),
        pl.col("response_class").drop_nulls().mode().sort().first().alias("response_class"),
        (pl.col("side") == "sender").sum().cast(pl.Int64).alias("_sender"),
        (pl.col("side") == "receiver").sum().cast(pl.Int64).alias("_receiver"),
        pl.len().cast(pl.Int64).alias("_hits"),
        pl.col("mx_host").filter(pl.col("side") == "sender").drop_nulls().unique().sort().head(5).alias("_own_hosts"),
    )
    for col, name in (("egress_ip", "sending_ips"), ("recipient_domain", "destinations"), ("mx_host", "mx_hosts"), ("response", "responses")):
        base = base.join(_ranked(hits, col, name), on="episode", how="left")
    base = base.join(active, on="episode", how="left").drop("n_responses").with_columns(
        # formats that do not log the sending IP (Postfix) or the MX give empty lists, not nulls
        *[pl.col(c).fill_null(pl.lit([], dtype=pl.List(pl.String))) for c in ("sending_ips", "destinations", "mx_hosts", "responses")],
        *[pl.col(c).fill_null(0) for c in ("n_sending_ips", "n_destinations", "n_mx_hosts", "active_sending_ips")],
    )

    # the recipients these replies deferred: their next try, and their final status
    affected = hits.select("episode", *KEY).unique()
    rows = (
        attempts.join(affected.select(KEY).unique().lazy(), on=KEY, how="semi")
        .sort([*KEY, "ts", "attempt", "line_no"], nulls_last=True)
        .with_columns(pl.col("outcome").shift(-1).over(KEY).alias("_next"))
    )
    nexts, fates = pl.collect_all([rows.select(*KEY, "ts", "line_no", "_next"), recipient_outcomes(rows.drop("_next"))])
    retry = (
        hits.join(nexts, on=[*KEY, "ts", "line_no"], how="left", nulls_equal=True)
        .group_by("episode")
        .agg(
            pl.col("_next").is_not_null().sum().cast(pl.Int64).alias("retries"),
            (pl.col("_next") == "delivered").sum().cast(pl.Int64).alias("_retry_ok"),
        )
        .with_columns(pl.when(pl.col("retries") > 0).then(pl.col("_retry_ok") / pl.col("retries")).alias("retry_success_rate"))
        .drop("_retry_ok")
    )
    st = pl.col("final_status")
    fate = (
        affected.join(fates.select(*KEY, "final_status"), on=KEY, how="left")
        .group_by("episode")
        .agg(
            pl.len().cast(pl.Int64).alias("affected_recipients"),
            *[(st == s).sum().cast(pl.Int64).alias(s) for s in ("delivered", "bounced", "expired", "pending")],
        )
        .with_columns(
            pl.when(pl.col("affected_recipients") > pl.col("pending"))
            .then(pl.col("delivered") / (pl.col("affected_recipients") - pl.col("pending")))
            .alias("final_delivery_rate")
        )
    )
    out = base.join(retry, on="episode", how="left").join(fate, on="episode", how="left")
    return out.with_columns(
        pl.when(pl.col("_sender") > pl.col("_receiver")).then(pl.lit("sender"))
        .when(pl.col("_receiver") > 0).then(pl.lit("receiver"))
        .otherwise(pl.lit("unknown")).alias("side")
    ).pipe(_with_evidence).drop("_sender", "_receiver", "_hits", "_own_hosts")


def _with_evidence(frame: pl.DataFrame) -> pl.DataFrame:
    """One sentence per episode saying why the side was chosen."""
    texts = []
    for row in frame.iter_rows(named=True):  # one row per episode: a handful
        n, s, rcv = row["_hits"], row["_sender"], row["_receiver"]
        n_ips, active = row["n_sending_ips"] or 0, row["active_sending_ips"] or 0
        ips = f"{n_ips} of {active} active sending IPs affected" if active else "sending IPs not in the logs"
        where = f"{row['n_mx_hosts'] or 0} MX host(s), {row['n_destinations'] or 0} destination(s)"
        if row["side"] == "sender":
            hosts = ", ".join(row["_own_hosts"] or [])
            texts.append(f"{s} of {n} matching replies came from our own infrastructure ({hosts}): the problem is on the sending side; {ips}")
        elif row["side"] == "receiver":
            if not active:
                spread = ""
            elif n_ips > 1 and n_ips * 2 >= active:
                spread = ", spread over most of our sending IPs, as receiver capacity is"
            else:
                spread = ", concentrated on few of our sending IPs, as IP throttling or reputation is"
            texts.append(f"{rcv} of {n} matching replies came from the receiver's MX hosts ({where}); {ips}{spread}")
        else:
            texts.append(f"the {n} matching replies carry no side (unclassified): {where}; {ips}")
    return frame.with_columns(pl.Series("side_evidence", texts, dtype=pl.String))


# --- playbook --------------------------------------------------------------------------------------

def verdict(episode: dict[str, Any], *, queue_age: pl.DataFrame | None = None) -> dict[str, Any]:
    """What to do about one episode (a row of :func:`detect` as a dict).

    Returns ``verdict`` (one line), ``actions`` (list), ``restore_when`` and ``status``
    (ongoing | recovering | recovered).  ``queue_age``: :func:`deferral_kit.queue.age_over_time`
    for the episode's group; with it, *recovered* also needs the latest p90 queue age back
    within the pre-episode level or under an hour (the backlog drained), otherwise the status
    is *recovering*.
    """
    cls = episode.get("response_class") or ""
    side = episode.get("side") or "unknown"
    retry = episode.get("retry_success_rate")
    retry_txt = f"{retry:.0%} of retries right after a deferral were delivered" if retry is not None else "no retries seen yet"
    status = "ongoing" if episode.get("ongoing") else "recovered"
    if status == "recovered" and queue_age is not None and queue_age.height:
        status = _queue_status(episode, queue_age)
    if side == "sender":
        hosts = ", ".join(episode.get("mx_hosts") or [])
        return {
            "verdict": "fix our own relay: the deferrals come from our infrastructure, not the provider",
            "actions": [
                f"check the relay(s) {hosts} (queue disk space, back pressure, resource limits)",
                "do not slow down or reroute the provider: it is not the bottleneck",
                "keep retrying: messages flow again once the relay recovers",
            ],
            "restore_when": "the relay answers normally again and its queue drains",
            "status": status,
        }
    if cls in ("reputation", "rate_limit", "policy"):
        ips = ", ".join((episode.get("sending_ips") or [])[:5])
        return {
            "verdict": "slow the affected sending IPs: the receiver limits our traffic, it is not short of capacity",
            "actions": [
                f"reduce volume on {ips}; pause their warm-up ramp",
                "check complaint rates, list hygiene and authentication for the traffic on those IPs",
                f"keep retrying at the normal schedule ({retry_txt}); do not retry harder",
            ],
            "restore_when": "the deferral rate on those IPs is back in the watch band for a day, then resume the ramp in smaller steps",
            "status": status,
        }
    return {
        "verdict": "receiver capacity: keep retrying, ease off slightly, hold ramp-ups",
        "actions": [
            f"keep retrying at the normal schedule ({retry_txt})",
            "reduce concurrency towards this provider slightly (e.g. 10-20 % fewer connections)",
            "hold IP warm-up ramp-ups towards this provider",
        ],
        "restore_when": "the rate is back to baseline (watch band) and queue age has fallen back",
        "status": status,
    }


def _queue_status(episode: dict[str, Any], queue_age: pl.DataFrame, *, settled_min: float = 60.0) -> str:
    """recovered when the latest p90 queue age is within the pre-episode maximum, or under
    ``settled_min`` (an ordinary retry backlog); else recovering."""
    pcol = next((c for c in queue_age.columns if re.fullmatch(r"p\d+_min", c)), None)
    if pcol is None:
        return "recovered"
    before = queue_age.filter(pl.col("instant") < episode["start"])[pcol].max()
    after = queue_age.filter(pl.col("instant") >= episode["recovered_at"]).sort("instant")
    if after.height == 0:
        return "recovered"
    last = after.group_by("instant").agg(pl.col(pcol).max()).sort("instant")[pcol][-1]  # null: nothing waiting
    return "recovered" if (last or 0.0) <= max(before or 0.0, settled_min) else "recovering"


def window(episode: dict[str, Any], *, pad: str = "12h") -> tuple:
    """``(start, end)`` of the episode widened by ``pad`` each side, for the charts around it."""
    p = timedelta(microseconds=_step_us(pad))
    end = episode.get("recovered_at") or episode["end"]
    return episode["start"] - p, max(end, episode["end"]) + p


def group_filter(episode: dict[str, Any], *, by: Sequence[str]) -> pl.Expr:
    """Rows of the episode's group (its provider or destination)."""
    return pl.all_horizontal([pl.col(b) == episode[b] for b in by])


def to_text(episodes: pl.DataFrame, *, by: Sequence[str] = ("provider",)) -> str:
    """The episode list for a terminal: one block per episode."""
    out = []
    for e in episodes.iter_rows(named=True):  # one row per episode
        group = " / ".join(str(e[b]) for b in by)
        ttr = e["time_to_recover"]
        recovered = f"recovered {e['recovered_at']:%Y-%m-%d %H:%M} ({ttr})" if e["recovered_at"] else "ongoing at the end of the data"
        fdr = "n/a" if e["final_delivery_rate"] is None else f"{e['final_delivery_rate']:.1%}"
        rsr = "n/a" if e["retry_success_rate"] is None else f"{e['retry_success_rate']:.1%}"
        out += [
            f"#{e['episode']} {group}  {e['signal']}  class {e['response_class']}  side {e['side']}",
            f"    {e['start']:%Y-%m-%d %H:%M} - {e['end']:%Y-%m-%d %H:%M} UTC (first {e['first_seen']:%H:%M:%S}, last {e['last_seen']:%Y-%m-%d %H:%M:%S}); {recovered}",
            f"    {e['count']:,} of {e['attempts']:,} attempts = {e['rate_per_10k']:.1f} per 10k (95% {e['ci_low_per_10k']:.1f}-{e['ci_high_per_10k']:.1f}); "
            f"peak {e['peak_rate_per_10k']:.1f} per 10k at {e['peak_at']:%Y-%m-%d %H:%M} ({e['peak_band']})",
            f"    sending IPs {e['n_sending_ips']} of {e['active_sending_ips']}: {', '.join(e['sending_ips'][:5])}{' ...' if e['n_sending_ips'] > 5 else ''}"
            if e["active_sending_ips"] else "    sending IPs: not in the logs",
            f"    MX hosts {e['n_mx_hosts']}: {', '.join(e['mx_hosts'][:3])}{' ...' if e['n_mx_hosts'] > 3 else ''}; destinations {e['n_destinations']}: "
            f"{', '.join(e['destinations'][:5])}{' ...' if e['n_destinations'] > 5 else ''}",
            f"    affected recipients {e['affected_recipients']:,}: retry success {rsr}, final delivery {fdr} "
            f"(delivered {e['delivered']:,}, bounced {e['bounced']:,}, expired {e['expired']:,}, pending {e['pending']:,})",
            f"    side: {e['side_evidence']}",
            f"    reply: {(e['responses'] or [''])[0][:150]}",
        ]
    return "\n".join(out)


# --- one episode, for the review notebook ------------------------------------------------------------

def pick(episodes: pl.DataFrame, number: int = 0) -> dict[str, Any] | None:
    """Episode ``number`` (its ``episode`` id) as a dict; 0 picks the one with the most matching
    replies.  None when there are no episodes (or no such number)."""
    if episodes.height == 0:
        return None
    if number:
        rows = episodes.filter(pl.col("episode") == number)
        return rows.row(0, named=True) if rows.height else None
    return episodes.sort(["count", "episode"], descending=[True, False]).row(0, named=True)


def episode_table(episodes: pl.DataFrame, *, by: Sequence[str] = ("provider",)) -> pl.DataFrame:
    """The episode list flattened for an HTML table (lists joined, durations in hours)."""
    def joined(col: str, n: int = 5) -> pl.Expr:
        return pl.col(col).list.head(n).list.join(", ")

    return episodes.select(
        "episode", *by, "signal", "response_class", "side", "start", "end", "count", "attempts", "rate_per_10k", "peak_rate_per_10k", "peak_band",
        pl.format("{} of {}", "n_sending_ips", "active_sending_ips").alias("sending_ips"),
        joined("destinations").alias("destinations"),
        joined("mx_hosts", 3).alias("mx_hosts"),
        "affected_recipients", "retry_success_rate", "final_delivery_rate", "pending",
        (pl.col("time_to_recover").dt.total_minutes() / 60).alias("hours_to_recover"),
    )


_PERIODS = ("before", "during", "after")


@dataclass
class Review:
    """What the incident review shows for one episode (all small frames).

    ``rates``: ``metrics.rate`` per bucket for the episode's group and signal over the padded
    window.  ``queue_age``: :func:`deferral_kit.queue.age_over_time` of the group's recipients
    (all of them, not only the affected).  ``delivery``: :func:`outcomes.outcome_summary` of the
    group's recipients by ``period`` (before / during / after the episode, by their first try).
    ``verdict``: :func:`verdict` with that queue age.  ``scope``: :func:`deferral_kit.classify.scope`
    over the episode window across every provider (who else saw the reply, and the side it
    suggests), when :func:`review` got ``everyone``.
    """

    episode: dict[str, Any]
    start: datetime
    end: datetime
    rates: pl.DataFrame
    queue_age: pl.DataFrame
    delivery: pl.DataFrame
    verdict: dict[str, Any]
    scope: dict[str, Any] | None = None


def review(
    attempts: pl.LazyFrame,
    episode: dict[str, Any],
    *,
    by: Sequence[str] = ("provider",),
    bucket: str = "1h",
    every: str = "15m",
    pad: str = "12h",
    code: int | None = 452,
    enhanced: str | None = "4.3.1",
    response_class: str | Sequence[str] | None = None,
    bands=None,
    own_infrastructure=None,
    everyone: pl.LazyFrame | None = None,
) -> Review:
    """The frames around one episode of :func:`detect` (give the same ``by``, ``bucket``, signal
    options and bands).  ``every``: queue-age grid; ``pad``: time shown each side;
    ``everyone``: the attempts of all providers (when ``attempts`` is one provider's), for the
    cross-provider ``scope``."""
    from . import metrics
    from .outcomes import outcome_summary
    from .queue import age_over_time

    by = list(by)
    attempts = _enrich(attempts, need_provider="provider" in by or "provider_family" in by, own_infrastructure=own_infrastructure)
    start, end = window(episode, pad=pad)
    group = attempts.filter(group_filter(episode, by=by))
    if response_class is None:
        where = metrics.response_is(code=code, enhanced=enhanced)
    else:  # detected per class: the episode's signal is its class
        where = (pl.col("response_class") == episode["signal"]) & (pl.col("outcome") == "deferred")
    rates = metrics.rate(group.filter(pl.col("ts").is_between(start, end, closed="left")), where=where, by=by, bucket=bucket, bands=bands).sort("bucket")
    oc = recipient_outcomes(group)
    period = (
        pl.when(pl.col("first_ts") < episode["start"]).then(pl.lit("before"))
        .when(pl.col("first_ts") < episode["end"]).then(pl.lit("during"))
        .otherwise(pl.lit("after"))
    )
    age, delivery = pl.collect_all([
        age_over_time(oc, every=every, by=[], start=start, end=end),
        outcome_summary(oc.filter(pl.col("first_ts").is_between(start, end, closed="left")).with_columns(period.alias("period")), by=["period"]),
    ])
    delivery = delivery.with_columns(pl.col("period").cast(pl.Enum(_PERIODS))).sort("period")
    spread = None
    if everyone is not None:
        from .classify import scope

        if "provider_family" not in everyone.collect_schema():
            from .providers import family_of, with_provider

            everyone = everyone.with_columns(family_of("provider").alias("provider_family")) if "provider" in everyone.collect_schema() else with_provider(everyone)
        spread = scope(everyone, start=episode["start"], end=episode["end"], where=where, own_infrastructure=own_infrastructure)
    return Review(episode, start, end, rates.collect(), age, delivery, verdict(episode, queue_age=age), spread)


def verdict_markdown(v: dict[str, Any]) -> str:
    """The playbook verdict as Markdown for the notebook (host names from the logs escaped)."""
    esc = html.escape
    lines = [f"**{esc(v['verdict'])}** (status: {esc(v['status'])})", ""]
    lines += [f"- {esc(a)}" for a in v["actions"]]
    lines += ["", f"Restore normal settings when {esc(v['restore_when'])}."]
    return "\n".join(lines)
