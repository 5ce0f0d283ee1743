"""Retry what-if: what a different retry schedule would have done during observed deferral episodes.

The model (expected values, replayed on the recipients the episode actually deferred):

1. **Who.** Every recipient-message whose first matching deferral (e.g. ``452 4.3.1``) falls in
   the episode window, from the attempts table: ``t0`` = that deferral's time, ``queued_at``
   (else ``t0``) = when the message entered the queue.  The try at ``t0`` happened in every
   schedule; the schedules differ in what follows.
2. **When the receiver says no.** The *deferral curve* ``p(t)``: per time bucket, the share of
   tries to the destination that got the matching reply (observed, :func:`deferral_curve`), or
   windows given by hand.  Outside the curve ``p = baseline`` (default 0: the receiver accepts).
   Each retry is independent: deferred with probability ``p`` of its bucket, else delivered.
   Receiver behaviour does not depend on our retry load (an optimistic assumption for capacity
   events: retrying harder may prolong them), and bounces are ignored.
3. **When we retry.** A :class:`Schedule` gives the wait before retry ``k`` (1, 2, ...): a list of
   intervals (the last repeats), exponential (``initial`` × ``factor``^(k-1) capped at
   ``max_interval``: KumoMTA), or Postfix's rule (wait = the message's age, clamped to
   [``minimal_backoff``, ``maximal_backoff``], then the next deferred-queue scan on a
   ``queue_run_delay`` grid from the epoch).  ``jitter`` j multiplies each wait by a uniform
   factor in [1 - j, 1 + j] drawn per recipient and retry (seeded).  A retry due after
   ``max_age`` since ``queued_at`` does not happen: the recipient **expires** (bounces).
4. **What we report** per schedule, over the affected recipients: expected time to delivery
   (``queued_at`` to the delivering try) p50 / p90 of the mixture of all recipients' delivery-time
   distributions (null when more than that share expires), ``attempts_in_episode`` (expected tries
   sent to the receiver inside the episode window, the first try included), ``retries`` (expected
   retries per recipient), ``expected_expired`` (recipients expected to expire) and
   ``at_risk`` (recipients whose chance to expire is at least 50 %).

Vectorized over recipients with numpy; the Python loop runs over retry rounds only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import polars as pl

_US = 1_000_000


@dataclass(frozen=True)
class Schedule:
    """A retry schedule; times in seconds.  ``kind``: ``list`` (``intervals``, last repeats),
    ``exponential`` (``initial`` × ``factor``^(k-1), capped at ``max_interval`` when set) or
    ``postfix`` (``minimal_backoff``/``maximal_backoff``/``queue_run_delay``)."""

    name: str
    kind: str = "list"
    intervals: tuple[float, ...] = ()
    initial: float = 1200.0
    factor: float = 2.0
    max_interval: float | None = None
    minimal_backoff: float = 300.0
    maximal_backoff: float = 4000.0
    queue_run_delay: float = 300.0
    max_age: float = 5 * 86400.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("list", "exponential", "postfix"):
            raise ValueError(f"schedule {self.name!r}: kind must be list, exponential or postfix, not {self.kind!r}")
        if self.kind == "list" and (not self.intervals or min(self.intervals) <= 0):
            raise ValueError(f"schedule {self.name!r}: a list schedule needs positive intervals")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"schedule {self.name!r}: jitter must be in [0, 1)")

    def wait(self, k: int, age: np.ndarray) -> np.ndarray:
        """Seconds to wait before retry ``k`` (1-based) for messages of ``age`` seconds (before the grid)."""
        if self.kind == "list":
            return np.full(age.shape, float(self.intervals[min(k, len(self.intervals)) - 1]))
        if self.kind == "exponential":
            w = self.initial * self.factor ** (k - 1)
            return np.full(age.shape, min(w, self.max_interval) if self.max_interval else w)
        return np.clip(age, self.minimal_backoff, self.maximal_backoff)


SEED_EXAMPLE = Schedule("seed 10/20/40/80m, jitter, 48h", intervals=(600, 1200, 2400, 4800), jitter=0.1, max_age=48 * 3600)
POSTFIX = Schedule("postfix defaults", kind="postfix", minimal_backoff=300, maximal_backoff=4000, queue_run_delay=300, max_age=5 * 86400)
# KumoMTA make_queue_config: retry_interval "20 minutes" doubling on each attempt, max_retry_interval
# unset (no upper limit), max_age 7 days (docs.kumomta.com reference pages).
KUMOMTA = Schedule("kumomta defaults", kind="exponential", initial=1200, factor=2.0, max_interval=None, max_age=7 * 86400)
DEFAULT_SCHEDULES = (SEED_EXAMPLE, POSTFIX, KUMOMTA)


def schedule(name: str, spec: str | Sequence[float], *, max_age: str | float = "48h", jitter: float = 0.0) -> Schedule:
    """A user list schedule from durations: ``"5m,15m,1h"`` or seconds ``[300, 900, 3600]``."""
    def secs(x) -> float:
        if isinstance(x, (int, float)):
            return float(x)
        from .queue import _step_us

        return _step_us(str(x).strip()) / _US

    items = [s for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    return Schedule(name, intervals=tuple(secs(x) for x in items), max_age=secs(max_age), jitter=jitter)


# --- inputs -----------------------------------------------------------------------------------

def affected(attempts: pl.LazyFrame, *, where: pl.Expr, start: datetime, end: datetime) -> pl.DataFrame:
    """Recipient-messages whose first try matching ``where`` lies in [start, end): ``t0`` (that try),
    ``queued_at`` (else t0), and what really happened (``observed_status``, ``observed_ttd_s``)
    from :func:`deferral_kit.outcomes.recipient_outcomes`."""
    from .metrics import is_mx_attempt
    from .outcomes import KEY, recipient_outcomes

    hits = (
        attempts.filter(is_mx_attempt().fill_null(False) & where.fill_null(False))
        .group_by(KEY).agg(pl.col("ts").min().alias("t0"), pl.col("queued_at").min())
        .filter((pl.col("t0") >= start) & (pl.col("t0") < end))
    )
    fates = recipient_outcomes(attempts.join(hits.select(KEY), on=list(KEY), how="semi")).select(
        *KEY, pl.col("final_status").alias("observed_status"), pl.col("time_to_delivery_s").alias("observed_ttd_s")
    )
    return (
        hits.join(fates, on=list(KEY), how="left")
        .with_columns(pl.coalesce(pl.min_horizontal("queued_at", "t0"), "t0").alias("queued_at"))
        .sort("t0", *KEY)
        .collect()
    )


def deferral_curve(attempts: pl.LazyFrame, *, where: pl.Expr, start: datetime, end: datetime, bucket: str = "15m") -> pl.DataFrame:
    """Observed ``p`` per bucket in [start, end): share of MX tries (``metrics.is_mx_attempt``) that
    matched ``where``.  Columns ``bucket``, ``bucket_end``, ``attempts``, ``count``, ``p``.  Pass the
    destination's tries only (e.g. filtered to one provider)."""
    from .metrics import is_mx_attempt
    from .queue import _step_us

    step = _step_us(bucket)
    return (
        attempts.filter(is_mx_attempt().fill_null(False) & (pl.col("ts") >= start) & (pl.col("ts") < end))
        .with_columns(pl.col("ts").dt.truncate(bucket).alias("bucket"))
        .group_by("bucket").agg(pl.len().cast(pl.Int64).alias("attempts"), where.fill_null(False).sum().cast(pl.Int64).alias("count"))
        .with_columns((pl.col("bucket") + pl.duration(microseconds=step)).alias("bucket_end"), (pl.col("count") / pl.col("attempts")).alias("p"))
        .select("bucket", "bucket_end", "attempts", "count", "p")
        .sort("bucket")
        .collect()
    )


def windows(spans: Sequence[tuple[datetime, datetime, float]]) -> pl.DataFrame:
    """A hand-made deferral curve: ``(start, end, p)`` triples as ``bucket``/``bucket_end``/``p``."""
    return pl.DataFrame(
        {"bucket": [s[0] for s in spans], "bucket_end": [s[1] for s in spans], "p": [float(s[2]) for s in spans]},
        schema={"bucket": pl.Datetime("us", "UTC"), "bucket_end": pl.Datetime("us", "UTC"), "p": pl.Float64},
    ).sort("bucket")


# --- simulation -------------------------------------------------------------------------------

def _us(series: pl.Series) -> np.ndarray:
    return series.cast(pl.Datetime("us", "UTC")).dt.epoch("us").to_numpy().astype(np.int64)


def _p_at(t_us: np.ndarray, starts: np.ndarray, ends: np.ndarray, ps: np.ndarray, baseline: float) -> np.ndarray:
    """p of the curve interval holding each time (intervals sorted, non-overlapping)."""
    i = np.searchsorted(starts, t_us, side="right") - 1
    ok = (i >= 0) & (t_us < ends[np.clip(i, 0, None)])
    return np.where(ok, ps[np.clip(i, 0, None)], baseline)


def simulate(recipients: pl.DataFrame, curve: pl.DataFrame, schedules: Sequence[Schedule] = DEFAULT_SCHEDULES, *,
             episode: tuple[datetime, datetime] | None = None, baseline: float = 0.0, seed: int = 0, max_rounds: int = 500) -> pl.DataFrame:
    """Replay ``recipients`` (:func:`affected`: ``t0``, ``queued_at``) against the deferral ``curve``
    (:func:`deferral_curve` or :func:`windows`) under each schedule; one row per schedule (see the
    module docstring): ``schedule``, ``recipients``, ``ttd_p50_s``, ``ttd_p90_s``,
    ``mean_ttd_s`` (delivered mass only), ``attempts_in_episode``, ``retries_per_recipient``,
    ``expected_expired``, ``at_risk``, ``max_age_h``.  ``episode``: the window in which tries count
    as sent during the episode (default: the curve's span).
    """
    n = recipients.height
    t0 = _us(recipients["t0"])
    q = _us(recipients["queued_at"].fill_null(recipients["t0"]))
    c = curve.sort("bucket")
    starts, ends, ps = _us(c["bucket"]), _us(c["bucket_end"]), c["p"].to_numpy().astype(float)
    ep_start, ep_end = (int(x.timestamp() * _US) for x in episode) if episode else ((starts.min(), ends.max()) if len(starts) else (0, 0))
    rows = []
    for s in schedules:  # a handful of schedules
        rng = np.random.default_rng(seed)
        t = t0.copy()
        alive = np.ones(n)  # chance the recipient is still queued (the try at t0 was deferred)
        in_ep = ((t0 >= ep_start) & (t0 < ep_end)).astype(float)
        retries = np.zeros(n)
        expired = np.zeros(n)
        times, masses = [], []
        max_age_us = int(s.max_age * _US)
        for k in range(1, max_rounds + 1):  # retry rounds; arrays over recipients
            wait = s.wait(k, (t - q) / _US)
            if s.jitter:
                wait = wait * rng.uniform(1 - s.jitter, 1 + s.jitter, n)
            nxt = t + (wait * _US).astype(np.int64)
            if s.kind == "postfix" and s.queue_run_delay > 0:
                grid = int(s.queue_run_delay * _US)
                nxt = -(-nxt // grid) * grid  # the next deferred-queue scan
            late = nxt - q > max_age_us
            expired += np.where(late, alive, 0.0)
            alive = np.where(late, 0.0, alive)
            p = _p_at(nxt, starts, ends, ps, baseline)
            retries += alive
            in_ep += np.where((nxt >= ep_start) & (nxt < ep_end), alive, 0.0)
            delivered = alive * (1 - p)
            times.append((nxt - q) / _US)
            masses.append(delivered)
            alive = alive * p
            t = nxt
            if alive.max(initial=0.0) < 1e-9:
                break
        expired += alive  # still queued after max_rounds: counted as lost
        ttd = np.concatenate(times) if times else np.array([])
        mass = np.concatenate(masses) if masses else np.array([])
        rows.append({
            "schedule": s.name,
            "recipients": n,
            "ttd_p50_s": _quantile(ttd, mass, 0.5, n),
            "ttd_p90_s": _quantile(ttd, mass, 0.9, n),
            "mean_ttd_s": float((ttd * mass).sum() / mass.sum()) if mass.sum() > 0 else None,
            "attempts_in_episode": float(in_ep.sum()),
            "retries_per_recipient": float(retries.sum() / n) if n else None,
            "expected_expired": float(expired.sum()),
            "at_risk": int((expired >= 0.5).sum()),
            "max_age_h": s.max_age / 3600,
        })
    return pl.DataFrame(rows, schema={
        "schedule": pl.String, "recipients": pl.Int64, "ttd_p50_s": pl.Float64, "ttd_p90_s": pl.Float64, "mean_ttd_s": pl.Float64,
        "attempts_in_episode": pl.Float64, "retries_per_recipient": pl.Float64, "expected_expired": pl.Float64, "at_risk": pl.Int64,
        "max_age_h": pl.Float64,
    })


def _quantile(values: np.ndarray, mass: np.ndarray, q: float, n: int) -> float | None:
    """q-quantile of the mixture: the smallest delivery time by which a share q of all ``n``
    recipients is expected delivered (None when expiry keeps the share below q)."""
    if n == 0 or values.size == 0:
        return None
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(mass[order]) / n
    i = np.searchsorted(cum, q - 1e-12)
    return float(values[order][i]) if i < values.size else None


def observed(recipients: pl.DataFrame) -> dict:
    """What really happened to the same recipients: p50/p90 time to delivery (delivered only) and
    status counts, to set beside the simulated schedules."""
    d = recipients.filter(pl.col("observed_status") == "delivered")["observed_ttd_s"]
    counts = dict(recipients.group_by("observed_status").len().iter_rows())
    return {"recipients": recipients.height, "ttd_p50_s": d.quantile(0.5, "lower") if d.len() else None,
            "ttd_p90_s": d.quantile(0.9, "lower") if d.len() else None, **{k: counts.get(k, 0) for k in ("delivered", "bounced", "expired", "pending")}}


def what_if(attempts: pl.LazyFrame, *, where: pl.Expr, start: datetime, end: datetime, schedules: Sequence[Schedule] = DEFAULT_SCHEDULES,
            bucket: str = "15m", seed: int = 0) -> pl.DataFrame:
    """:func:`simulate` for the recipients deferred by ``where`` in [start, end) against the observed
    curve of the same tries (``attempts`` already limited to the destination or provider)."""
    rcpts = affected(attempts, where=where, start=start, end=end)
    curve = deferral_curve(attempts, where=where, start=start, end=end, bucket=bucket)
    return simulate(rcpts, curve, schedules, episode=(start, end), seed=seed)
