"""Message outcomes: what became of each recipient across all its tries.

The unit is the **recipient-message**: the key ``(message_key, recipient)``.  One message
to three recipients is three recipient-messages, each with its own tries and fate.

Definitions used everywhere below (and in the notebooks):

* ``final_status``: the outcome of the recipient's first terminal row (delivered, bounced
  or expired), ordered by ``ts``, then ``attempt``, then ``line_no``; ``pending`` when every
  row we saw was a deferral, i.e. the last known try was deferred and no final status
  followed before the end of the data.  Pending recipients are neither delivered nor
  failed: rates that need a final answer use the *resolved* recipients as denominator.
* ``first_outcome``/``first_ts``: outcome and time of the recipient's first row, whatever its
  agent (a Postfix "delivery temporarily suspended" row counts: the recipient was not
  delivered then).  ``first_attempt_seen`` is
  false when that row's ``attempt`` is above 1 (the data starts after the first try), and
  such recipients are left out of first-attempt rates.
* ``time_to_delivery_s``: delivered ``ts`` minus ``queued_at``; when ``queued_at`` is null
  (formats that do not log arrival), minus the first row's ``ts`` instead, which
  understates the time by the wait before the first try.  ``ttd_basis`` says which.
* ``tries``: rows that are tries against a remote MX (``metrics.is_mx_attempt``) up to and
  including the terminal row; ``delivered_attempt`` is the ``attempt`` number of the
  delivering row.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

KEY = ("message_key", "recipient")
TERMINAL = ("delivered", "bounced", "expired")
FINAL_STATUSES = ("delivered", "bounced", "expired", "pending")
QUANTILES = (0.5, 0.9, 0.99)

# Columns taken from the recipient's final row (the delivering/bouncing try, or the last
# deferral of a pending recipient) when the input has them.
_FROM_FINAL_ROW = ("egress_ip", "egress_pool", "mx_host", "provider", "provider_family", "response_class", "side")


def _mx_attempt() -> pl.Expr:
    from .metrics import is_mx_attempt

    return is_mx_attempt()


def recipient_outcomes(attempts: pl.LazyFrame) -> pl.LazyFrame:
    """One row per recipient-message ``(message_key, recipient)`` with its fate across tries.

    Columns: the key, ``recipient_domain``, ``queued_at``, ``first_ts``, ``last_ts``,
    ``first_attempt_seen``, ``first_outcome``, ``final_status`` (delivered | bounced |
    expired | pending), ``final_ts`` (null when pending), ``deferrals`` (deferred rows
    before the terminal one), ``tries`` (remote MX tries up to the terminal row),
    ``delivered_attempt``, ``time_to_delivery_s``, ``ttd_basis`` (queued_at |
    first_attempt), and from the final row whichever of ``egress_ip, egress_pool, mx_host,
    provider, provider_family, response_class, side`` the input has.
    """
    have = attempts.collect_schema()
    carry = [c for c in _FROM_FINAL_ROW if c in have]
    new_key = (pl.col("message_key") != pl.col("message_key").shift(1)) | (pl.col("recipient") != pl.col("recipient").shift(1))
    mx = _mx_attempt()
    needed = dict.fromkeys([*KEY, "ts", "attempt", "line_no", "outcome", "recipient_domain", "queued_at", *mx.meta.root_names(), *carry])
    rows = (
        attempts.select(list(needed))
        .filter(pl.col("message_key").is_not_null() & pl.col("recipient").is_not_null())
        .sort([*KEY, "ts", "attempt", "line_no"], nulls_last=True)
        .with_columns(
            new_key.fill_null(True).alias("_new"),
            mx.fill_null(False).alias("_mx"),
            pl.col("outcome").is_in(TERMINAL).cast(pl.Int64).alias("_terminal"),
        )
        .with_columns(
            # an integer id per recipient-message (rows are sorted by key): cheap to group on
            pl.col("_new").cum_sum().alias("_g"),
            # terminal rows before this one in its group, from running sums (no window function)
            (pl.col("_terminal").cum_sum() - pl.col("_terminal")).alias("_before"),
        )
        .with_columns(pl.col("_before") - pl.when(pl.col("_new")).then(pl.col("_before")).forward_fill())
        # rows after the first terminal one (duplicates, late log noise) do not change the fate
        .filter(pl.col("_before") == 0)
    )
    # after that filter the last row of a group is its terminal row, or its last deferral
    last_outcome = pl.col("outcome").last()
    terminal = last_outcome.is_in(TERMINAL)
    out = rows.group_by("_g").agg(
        pl.col("message_key").first(),
        pl.col("recipient").first(),
        pl.col("recipient_domain").drop_nulls().first(),
        pl.col("queued_at").min(),
        pl.col("ts").first().alias("first_ts"),
        pl.col("ts").last().alias("last_ts"),
        (pl.col("attempt").first().fill_null(1) <= 1).alias("first_attempt_seen"),
        pl.col("outcome").first().alias("first_outcome"),
        pl.when(terminal).then(last_outcome).otherwise(pl.lit("pending")).alias("final_status"),
        pl.when(terminal).then(pl.col("ts").last()).alias("final_ts"),
        (pl.col("outcome") == "deferred").sum().cast(pl.Int32).alias("deferrals"),
        pl.col("_mx").sum().cast(pl.Int32).alias("tries"),
        # the log's attempt number, else the row's position (formats without a counter)
        pl.when(last_outcome == "delivered").then(pl.coalesce(pl.col("attempt").last(), pl.len().cast(pl.Int32))).alias("delivered_attempt"),
        *[pl.col(c).last() for c in carry],
    )
    entered = pl.coalesce("queued_at", "first_ts")
    return out.with_columns(
        pl.when(pl.col("final_status") == "delivered")
        .then((pl.col("final_ts") - entered).dt.total_microseconds() / 1e6)
        .alias("time_to_delivery_s"),
        pl.when(pl.col("queued_at").is_not_null()).then(pl.lit("queued_at")).otherwise(pl.lit("first_attempt")).alias("ttd_basis"),
    ).select(
        *KEY,
        "recipient_domain",
        "queued_at",
        "first_ts",
        "last_ts",
        "first_attempt_seen",
        "first_outcome",
        "final_status",
        "final_ts",
        "deferrals",
        "tries",
        "delivered_attempt",
        "time_to_delivery_s",
        "ttd_basis",
        *carry,
    )


def _rate(num: pl.Expr, den: pl.Expr) -> pl.Expr:
    return pl.when(den > 0).then(num / den)


def outcome_summary(outcomes: pl.LazyFrame, *, by: Sequence[str] = (), quantiles: Sequence[float] = QUANTILES) -> pl.LazyFrame:
    """Delivery outcomes per group (whole data when ``by`` is empty), from :func:`recipient_outcomes`.

    Counts are recipient-messages.  Rates and their denominators:

    * ``first_attempt_delivery_rate`` = delivered at the first try / recipients whose first
      try is in the data (``first_attempt_seen``);
    * ``final_delivery_rate`` = delivered / resolved (delivered + bounced + expired);
      ``pending`` recipients are reported, not counted as failures;
    * ``retry_success_rate`` = deferred at the first try and finally delivered / deferred at
      the first try and resolved;
    * ``bounced_after_deferral``: bounced with at least one deferral before;
    * ``attempts_per_delivered``: mean ``delivered_attempt`` over delivered recipients;
    * ``ttd_p50_s`` ... : time-to-delivery percentiles (seconds, linear interpolation) over
      delivered recipients.

    ``by`` may name any column of the outcomes frame, e.g. ``recipient_domain``,
    ``provider``, ``egress_ip`` (the IP of the final try).
    """
    by = list(by)
    st = pl.col("final_status")
    seen = pl.col("first_attempt_seen")
    first_deferred = seen & (pl.col("first_outcome") == "deferred")
    resolved = st != "pending"
    delivered = st == "delivered"
    aggs = [
        pl.len().alias("recipients"),
        seen.sum().alias("first_attempt_seen"),
        (seen & (pl.col("first_outcome") == "delivered")).sum().alias("first_attempt_delivered"),
        delivered.sum().alias("delivered"),
        (st == "bounced").sum().alias("bounced"),
        (st == "expired").sum().alias("expired"),
        (st == "pending").sum().alias("pending"),
        resolved.sum().alias("resolved"),
        first_deferred.sum().alias("first_attempt_deferred"),
        (first_deferred & resolved).sum().alias("_first_deferred_resolved"),
        (first_deferred & delivered).sum().alias("deferred_then_delivered"),
        ((st == "bounced") & (pl.col("deferrals") > 0)).sum().alias("bounced_after_deferral"),
        pl.col("delivered_attempt").filter(delivered).mean().alias("attempts_per_delivered"),
        *[
            pl.col("time_to_delivery_s").quantile(q, interpolation="linear").alias(f"ttd_p{round(q * 100):d}_s")
            for q in quantiles
        ],
    ]
    grouped = outcomes.group_by(by) if by else outcomes
    out = grouped.agg(aggs) if by else outcomes.select(aggs)
    counts = ["recipients", "first_attempt_seen", "first_attempt_delivered", "delivered", "bounced", "expired", "pending",
              "resolved", "first_attempt_deferred", "_first_deferred_resolved", "deferred_then_delivered", "bounced_after_deferral"]
    out = out.with_columns(pl.col(counts).cast(pl.Int64)).with_columns(
        _rate(pl.col("first_attempt_delivered"), pl.col("first_attempt_seen")).alias("first_attempt_delivery_rate"),
        _rate(pl.col("delivered"), pl.col("resolved")).alias("final_delivery_rate"),
        _rate(pl.col("deferred_then_delivered"), pl.col("_first_deferred_resolved")).alias("retry_success_rate"),
    ).drop("_first_deferred_resolved")
    return out.sort(by) if by else out


def retry_success_by_attempt(outcomes: pl.LazyFrame, *, by: Sequence[str] = ()) -> pl.LazyFrame:
    """Of the recipients deferred at their first try, when were they delivered?

    One row per group and ``delivered_attempt`` (2, 3, ...): ``delivered`` (recipients
    delivered at that try), ``cohort`` (recipients deferred at the first try, first try in
    the data), ``cumulative_share`` (delivered at or before that try / cohort).  The
    remainder of the cohort bounced, expired or is still pending.
    """
    by = list(by)
    cohort_filter = pl.col("first_attempt_seen") & (pl.col("first_outcome") == "deferred")
    cohort = outcomes.filter(cohort_filter)
    sizes = (cohort.group_by(by).agg(pl.len().cast(pl.Int64).alias("cohort")) if by
             else cohort.select(pl.len().cast(pl.Int64).alias("cohort")))
    per = (
        cohort.filter(pl.col("final_status") == "delivered")
        .group_by([*by, "delivered_attempt"])
        .agg(pl.len().cast(pl.Int64).alias("delivered"))
    )
    per = per.join(sizes, on=by, how="left") if by else per.join(sizes, how="cross")
    return (
        per.sort([*by, "delivered_attempt"])
        .with_columns((pl.col("delivered").cum_sum().over(by) if by else pl.col("delivered").cum_sum()).alias("_cum"))
        .with_columns((pl.col("_cum") / pl.col("cohort")).alias("cumulative_share"))
        .drop("_cum")
    )


def first_vs_final(summary: pl.LazyFrame | pl.DataFrame, *, by: Sequence[str] = ()) -> pl.DataFrame:
    """Long frame (group, ``measure``, ``rate``) of first-attempt vs final delivery rate, for charts."""
    frame = summary.collect() if isinstance(summary, pl.LazyFrame) else summary
    return frame.unpivot(
        index=list(by), on=["first_attempt_delivery_rate", "final_delivery_rate"], variable_name="measure", value_name="rate"
    ).with_columns(pl.col("measure").replace({"first_attempt_delivery_rate": "first attempt", "final_delivery_rate": "final"}))
