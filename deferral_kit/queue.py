"""Queue age reconstructed from the logs alone: who was waiting, and for how long, at any instant.

A recipient-message (see :mod:`deferral_kit.outcomes`) is *in the queue* from the moment
it entered (``queued_at``; the first try's ``ts`` when the log does not say) until its
terminal row (delivered, bounced, expired).  A pending recipient is still in the queue at
the end of the data.  The interval is half-open: at the instant of its delivery a
recipient no longer counts as waiting.

Its *queue age* at instant ``t`` is ``t - entered``, in minutes.  Instants are a regular
grid (``every``, e.g. ``5m`` or ``1h``) starting at the first entry truncated to ``every``
(or at ``start``), up to the end of the data (the last row's ``ts``, or ``end``).

Ages are grouped like Postfix ``qshape``: columns named by their upper bound in minutes,
``5`` (under 5), ``10`` (5 to under 10), ``20``, ``40``, ``80``, ``160``, ``320``, ``640``,
``1280`` (640 to under 1280) and ``1280+`` (1280 or more); the bucket edges are 0, 5, 10,
20, 40, 80, 160, 320, 640, 1280.  Like qshape, counts are recipients, not messages.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timedelta

import polars as pl

from .schema import UTC_DT

QSHAPE_EDGES_MIN = (0, 5, 10, 20, 40, 80, 160, 320, 640, 1280)
QSHAPE_LABELS = ("5", "10", "20", "40", "80", "160", "320", "640", "1280", "1280+")
AGE_BUCKET = pl.Enum(QSHAPE_LABELS)

_UNIT_US = {"s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000}


def _step_us(every: str | timedelta) -> int:
    if isinstance(every, timedelta):
        return int(every / timedelta(microseconds=1))
    m = re.fullmatch(r"\s*(\d+)\s*([smhd])\s*", every)
    if not m:
        raise ValueError(f"grid step {every!r}: use a number and s, m, h or d, e.g. 5m or 1h")
    return int(m[1]) * _UNIT_US[m[2]]


def age_bucket(age_min: pl.Expr) -> pl.Expr:
    """qshape bucket (Enum of :data:`QSHAPE_LABELS`) of an age in minutes."""
    # index = number of edges at or below the age (lower edge inclusive, like qshape)
    idx = pl.sum_horizontal([(age_min >= e).cast(pl.Int8) for e in QSHAPE_EDGES_MIN[1:]])
    return idx.replace_strict(dict(enumerate(QSHAPE_LABELS)), return_dtype=AGE_BUCKET)


def intervals(outcomes: pl.LazyFrame, *, by: Sequence[str] = ("recipient_domain",)) -> pl.LazyFrame:
    """Queue residence per recipient-message: ``entered``, ``left`` (null while pending) and the ``by`` columns."""
    return outcomes.select(
        "message_key",
        "recipient",
        *by,
        pl.coalesce("queued_at", "first_ts").alias("entered"),
        pl.col("final_ts").alias("left"),
    )


def samples(
    outcomes: pl.LazyFrame,
    *,
    every: str | timedelta = "5m",
    by: Sequence[str] = ("recipient_domain",),
    start: datetime | None = None,
    end: datetime | None = None,
) -> pl.LazyFrame:
    """One row per grid instant and recipient waiting at it: ``instant``, the ``by`` columns, ``age_min``.

    Built by interval arithmetic (each residence becomes the range of grid indices it
    covers, exploded), so the cost is the number of (instant, waiting recipient) pairs.
    ``end`` defaults to the last ``last_ts`` in the outcomes (the end of the data).
    """
    by = list(by)
    step = _step_us(every)
    iv = intervals(outcomes, by=by)
    bounds = outcomes.select(
        pl.coalesce("queued_at", "first_ts").min().alias("lo"),
        pl.col("last_ts").max().alias("hi"),
    )
    us = lambda e: e.cast(UTC_DT).dt.epoch("us")  # noqa: E731
    lo = us(pl.lit(start, dtype=UTC_DT)) if start is not None else us(pl.col("lo"))
    hi = us(pl.lit(end, dtype=UTC_DT)) if end is not None else us(pl.col("hi"))
    origin = (lo // step) * step if start is None else lo
    grid = bounds.select(origin.alias("_o"), hi.alias("_hi"))
    ent, left = us(pl.col("entered")), us(pl.col("left"))
    last_idx = (pl.col("_hi") - pl.col("_o")) // step
    return (
        iv.join(grid, how="cross")
        .with_columns(
            # first grid instant at or after entry; last instant strictly before leaving
            ((ent - pl.col("_o") + step - 1) // step).clip(lower_bound=0).alias("_i0"),
            pl.when(left.is_null())
            .then(last_idx)
            .otherwise(pl.min_horizontal((left - pl.col("_o") + step - 1) // step - 1, last_idx))
            .alias("_i1"),
        )
        .filter(pl.col("_i1") >= pl.col("_i0"))
        .with_columns(pl.int_ranges("_i0", pl.col("_i1") + 1).alias("_i"))
        .explode("_i")
        .with_columns((pl.col("_o") + pl.col("_i") * step).cast(pl.Datetime("us")).dt.replace_time_zone("UTC").alias("instant"))
        .select(
            "instant",
            *by,
            ((pl.col("instant") - pl.col("entered")).dt.total_microseconds() / 60e6).alias("age_min"),
        )
    )


def shape(
    outcomes: pl.LazyFrame,
    *,
    every: str | timedelta = "5m",
    by: Sequence[str] = ("recipient_domain",),
    start: datetime | None = None,
    end: datetime | None = None,
) -> pl.LazyFrame:
    """qshape over time, long: ``instant``, the ``by`` columns, ``age_bucket``, ``recipients`` waiting (non-zero rows only)."""
    by = list(by)
    return (
        samples(outcomes, every=every, by=by, start=start, end=end)
        .with_columns(age_bucket(pl.col("age_min")).alias("age_bucket"))
        .group_by(["instant", *by, "age_bucket"])
        .agg(pl.len().cast(pl.Int64).alias("recipients"))
        .sort(["instant", *by, "age_bucket"])
    )


def qshape(outcomes: pl.LazyFrame, *, at: datetime, by: str = "recipient_domain") -> pl.DataFrame:
    """The queue at one instant in qshape's layout: a ``TOTAL`` row, then one row per ``by`` value
    (largest first), columns ``T`` (recipients waiting) and one per age bucket."""
    long = shape(outcomes, every="1d", by=[by], start=at, end=at).collect()
    wide = (
        long.pivot(on="age_bucket", index=by, values="recipients")
        if long.height
        else pl.DataFrame(schema={by: pl.String})
    )
    for label in QSHAPE_LABELS:
        if label not in wide.columns:
            wide = wide.with_columns(pl.lit(0, dtype=pl.Int64).alias(label))
    wide = wide.with_columns(pl.col(QSHAPE_LABELS).fill_null(0).cast(pl.Int64))
    wide = wide.select(pl.col(by).cast(pl.String), pl.sum_horizontal(QSHAPE_LABELS).cast(pl.Int64).alias("T"), *QSHAPE_LABELS)
    total = wide.select(pl.lit("TOTAL").alias(by), pl.col("T", *QSHAPE_LABELS).sum())
    return pl.concat([total, wide.sort(["T", by], descending=[True, False])])


def age_over_time(
    outcomes: pl.LazyFrame,
    *,
    every: str | timedelta = "1h",
    by: Sequence[str] = ("recipient_domain",),
    start: datetime | None = None,
    end: datetime | None = None,
    quantile: float = 0.9,
) -> pl.LazyFrame:
    """Queue state at each grid instant: ``waiting`` recipients, ``oldest_min`` and ``p90_min``
    (the ``quantile`` of their ages, linear interpolation).  Every instant of the grid is there
    for every group: when nothing waits, ``waiting`` is 0 and the ages are null."""
    by = list(by)
    q = f"p{round(quantile * 100):d}_min"
    step = _step_us(every)
    stats = (
        samples(outcomes, every=every, by=by, start=start, end=end)
        .group_by(["instant", *by])
        .agg(
            pl.len().cast(pl.Int64).alias("waiting"),
            pl.col("age_min").max().alias("oldest_min"),
            pl.col("age_min").quantile(quantile, interpolation="linear").alias(q),
        )
    )
    us = lambda e: e.cast(UTC_DT).dt.epoch("us")  # noqa: E731
    lo = us(pl.lit(start, dtype=UTC_DT)) if start is not None else (us(pl.coalesce("queued_at", "first_ts").min()) // step) * step
    hi = us(pl.lit(end, dtype=UTC_DT)) if end is not None else us(pl.col("last_ts").max())
    instants = (
        outcomes.select(lo.alias("_o"), hi.alias("_hi"))
        .select(pl.int_ranges(0, (pl.col("_hi") - pl.col("_o")) // step + 1).alias("_i"), "_o")
        .explode("_i")
        .filter(pl.col("_i").is_not_null())
        .select((pl.col("_o") + pl.col("_i") * step).cast(pl.Datetime("us")).dt.replace_time_zone("UTC").alias("instant"))
    )
    grid = instants.join(outcomes.select(by).unique(), how="cross") if by else instants
    return (
        grid.join(stats, on=["instant", *by], how="left", nulls_equal=True)
        .with_columns(pl.col("waiting").fill_null(0))
        .sort(["instant", *by])
    )
