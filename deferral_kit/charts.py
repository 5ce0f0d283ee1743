"""Altair chart builders: small aggregated polars frames in, charts out.

The frames come from :func:`deferral_kit.metrics.rate` (columns ``bucket``, a group column,
``attempts``, ``count``, ``rate_per_10k``, ``ci_low_per_10k``, ``ci_high_per_10k``, ``band``).
No raw attempt rows go into a spec: a builder refuses frames over :data:`MAX_ROWS`.

Times: buckets are UTC instants.  A chart shows them as wall-clock time in the report's
display zone, encoded on a UTC scale, so every reader sees the same hours whatever the time
zone of their browser (a tz-aware column would be shifted to the reader's zone).

Interactivity that survives the offline export is Vega's own: clicking a legend entry
highlights that group, a drop-down picks one group, tooltips give the numbers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import altair as alt
import polars as pl

MAX_ROWS = 5_000  # Altair's own default guard; charts get aggregates, never raw rows
RATE_TITLE = "per 10,000 attempts"

_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks", "s": "seconds"}


def _check(frame: pl.DataFrame, needed: Sequence[str]) -> None:
    if isinstance(frame, pl.LazyFrame):
        raise TypeError("charts take a collected, aggregated pl.DataFrame, not a LazyFrame")
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise ValueError(f"chart frame lacks columns {missing}; have {frame.columns}")
    if frame.height > MAX_ROWS:
        raise ValueError(f"{frame.height:,} rows is too many for a chart spec (max {MAX_ROWS:,}): aggregate first")


def wall_clock(column: str, tz: str) -> pl.Expr:
    """A UTC instant as the wall-clock time of ``tz``, tagged UTC so a UTC scale shows it unchanged."""
    return pl.col(column).dt.convert_time_zone(tz).dt.replace_time_zone("UTC")


def _bucket_delta(bucket: str) -> dict[str, int]:
    m = re.fullmatch(r"(\d+)([smhdw])", bucket)
    if not m:
        raise ValueError(f"bucket {bucket!r}: expected a simple duration like 15m, 1h, 1d")
    return {_UNITS[m[2]]: int(m[1])}


def _with_time(frame: pl.DataFrame, *, tz: str, bucket: str | None = None) -> pl.DataFrame:
    out = frame.with_columns(
        wall_clock("bucket", tz).alias("time"),
        pl.col("bucket").dt.convert_time_zone(tz).dt.strftime("%a %Y-%m-%d %H:%M %Z").alias("time_label"),
    )
    if bucket:
        out = out.with_columns((pl.col("time") + pl.duration(**_bucket_delta(bucket))).alias("time_end"))
    # Three decimals of a rate per 10,000 are plenty and halve the spec; the UTC original
    # would be serialised too, the chart needs only the display columns.
    floats = [n for n, d in out.schema.items() if d.is_float()]
    return out.with_columns(pl.col(floats).round(3)).drop("bucket")


def threshold_lines(bands) -> pl.DataFrame:
    """One row per band boundary: ``rate_per_10k`` where ``band`` (the band above it) starts."""
    if bands is None:
        return pl.DataFrame(schema={"band": pl.String, "rate_per_10k": pl.Float64, "label": pl.String})
    f = bands.to_frame()
    return f.filter(pl.col("lower_per_10k") > 0).select(
        "band",
        pl.col("lower_per_10k").alias("rate_per_10k"),
        pl.format("{} above {}/10k", pl.col("band"), pl.col("lower_per_10k").round(2)).alias("label"),
    )


def _param_name(group: str) -> str:
    return "pick_" + re.sub(r"\W", "_", group)


def rate_over_time(
    frame: pl.DataFrame,
    *,
    group: str,
    bands=None,
    tz: str = "UTC",
    title: str = "",
    what: str = "452 4.3.1",
    width: int = 760,
    height: int = 280,
) -> alt.LayerChart:
    """Rate per 10,000 attempts over time, one line per ``group`` value, with its 95 % Wilson
    interval as a bar on every bucket that had such replies, and the threshold band boundaries
    as dashed rules.

    Click a legend entry to highlight a group; the drop-down under the chart shows one group.
    The y axis is symmetric-log so a quiet 1/10k and an incident's 500/10k both read.
    """
    _check(frame, ["bucket", group, "attempts", "count", "rate_per_10k", "ci_low_per_10k", "ci_high_per_10k", "band"])
    data = _with_time(frame, tz=tz)
    groups = data.group_by(group).agg(pl.col("count").sum(), pl.col("attempts").sum()).sort(["count", "attempts", group], descending=[True, True, False])[group].cast(pl.String).to_list()
    highlight = alt.selection_point(fields=[group], bind="legend", name=f"legend_{_param_name(group)}")
    pick = alt.param(
        name=_param_name(group),
        value=None,
        bind=alt.binding_select(options=[None, *groups], labels=["all", *groups], name=f"{group.replace('_', ' ')}: "),
    )
    x = alt.X("time:T", title=f"time ({tz})", scale=alt.Scale(type="utc"), axis=alt.Axis(format="%a %d %H:%M", labelAngle=0))
    y_scale = alt.Scale(type="symlog", constant=1)
    color = alt.Color(f"{group}:N", title=group.replace("_", " "), sort=groups, legend=alt.Legend(orient="right", symbolLimit=40, labelLimit=260))
    fade = alt.condition(highlight, alt.value(1.0), alt.value(0.12))
    tooltip = [
        alt.Tooltip(f"{group}:N", title=group.replace("_", " ")),
        alt.Tooltip("time_label:N", title="time"),
        alt.Tooltip("attempts:Q", title="attempts", format=","),
        alt.Tooltip("count:Q", title=what, format=","),
        alt.Tooltip("rate_per_10k:Q", title=f"{what} {RATE_TITLE}", format=".2f"),
        alt.Tooltip("ci_low_per_10k:Q", title="95% CI low", format=".2f"),
        alt.Tooltip("ci_high_per_10k:Q", title="95% CI high", format=".2f"),
        alt.Tooltip("band:N", title="band"),
    ]
    chosen = f"{pick.name} == null || datum[{group!r}] == {pick.name}"
    base = alt.Chart(data).transform_filter(chosen).encode(x=x, color=color)
    # Intervals only where replies occurred: an hour with 0 of 12 attempts has an upper bound of
    # ~2,400/10k, and drawing those for every quiet hour would bury the signal.
    ci = base.transform_filter("datum.count > 0").mark_rule(strokeWidth=3).encode(
        y=alt.Y("ci_low_per_10k:Q", scale=y_scale, stack=None, title=f"{what} {RATE_TITLE}"), y2="ci_high_per_10k:Q",
        opacity=alt.condition(highlight, alt.value(0.35), alt.value(0.05)),
    )
    line = base.mark_line(interpolate="step-after", point=alt.OverlayMarkDef(size=18)).encode(
        y=alt.Y("rate_per_10k:Q", scale=y_scale, stack=None), opacity=fade, tooltip=tooltip
    )
    layers = [ci, line.add_params(highlight, pick)]
    rules = threshold_lines(bands)
    if rules.height:
        rule = alt.Chart(rules).mark_rule(strokeDash=[6, 4], color="#b71c1c", opacity=0.7).encode(y=alt.Y("rate_per_10k:Q", scale=y_scale), tooltip=["label:N"])
        text = alt.Chart(rules).mark_text(align="left", dx=4, dy=-6, color="#b71c1c", fontSize=11).encode(
            y=alt.Y("rate_per_10k:Q", scale=y_scale), x=alt.value(0), text="label:N"
        )
        layers += [rule, text]
    return alt.layer(*layers).properties(title=title or f"{what} {RATE_TITLE} by {group.replace('_', ' ')}", width=width, height=height)


def heatmap(
    frame: pl.DataFrame,
    *,
    group: str,
    bucket: str = "1h",
    tz: str = "UTC",
    title: str = "",
    what: str = "452 4.3.1",
    width: int = 760,
) -> alt.Chart:
    """``group`` × time bucket, coloured by the rate per 10,000 attempts (lightest: attempts
    without a match; blank: no attempts).  Rows are ordered by the group's total count."""
    _check(frame, ["bucket", group, "attempts", "count", "rate_per_10k", "band"])
    data = _with_time(frame.select("bucket", group, "attempts", "count", "rate_per_10k", "band"), tz=tz, bucket=bucket)  # only what is encoded
    order = data.group_by(group).agg(pl.col("count").sum(), pl.col("attempts").sum()).sort(["count", "attempts", group], descending=[True, True, False])[group].cast(pl.String).to_list()
    return (
        alt.Chart(data)
        .mark_rect()
        .encode(
            x=alt.X("time:T", title=f"time ({tz})", scale=alt.Scale(type="utc"), axis=alt.Axis(format="%a %d %H:%M", labelAngle=0)),
            x2="time_end:T",
            y=alt.Y(f"{group}:N", sort=order, title=group.replace("_", " "), axis=alt.Axis(labelLimit=260)),
            color=alt.Color("rate_per_10k:Q", title=RATE_TITLE, scale=alt.Scale(type="symlog", scheme="orangered")),
            tooltip=[
                alt.Tooltip(f"{group}:N", title=group.replace("_", " ")),
                alt.Tooltip("time_label:N", title="from"),
                alt.Tooltip("attempts:Q", format=","),
                alt.Tooltip("count:Q", title=what, format=","),
                alt.Tooltip("rate_per_10k:Q", title=f"{what} {RATE_TITLE}", format=".2f"),
                alt.Tooltip("band:N"),
            ],
        )
        .properties(title=title or f"{what} {RATE_TITLE}: {group.replace('_', ' ')} × {bucket}", width=width, height=alt.Step(18))
    )
