"""Altair builders for incident reviews: episode timeline, the rate around one episode, queue age,
first-attempt vs final delivery.  Small frames in (from :mod:`deferral_kit.incidents`,
:mod:`deferral_kit.queue`, :mod:`deferral_kit.outcomes`), charts out; times shown as wall-clock
time of the display zone on a UTC scale, like :mod:`deferral_kit.charts`.
"""

from __future__ import annotations

from typing import Any

import altair as alt
import polars as pl

from .charts import _check, rate_over_time, wall_clock

_BAND_COLORS = alt.Scale(domain=["watch", "throttle", "incident"], range=["#9e9e9e", "#f9a825", "#c62828"])


def _x(tz: str, field: str = "time") -> alt.X:
    return alt.X(f"{field}:T", title=f"time ({tz})", scale=alt.Scale(type="utc"), axis=alt.Axis(format="%a %d %H:%M", labelAngle=0))


def episode_timeline(episodes: pl.DataFrame, *, group: str = "provider", tz: str = "UTC", width: int = 760) -> alt.Chart:
    """One bar per episode from its start to its end, a row per group, coloured by the band at its peak."""
    _check(episodes, ["episode", group, "signal", "start", "end", "peak_band", "peak_rate_per_10k", "count", "attempts", "side"])
    data = episodes.select(
        pl.col("episode"),
        pl.format("{} · {}", pl.col(group), pl.col("signal")).alias("row"),
        wall_clock("start", tz).alias("time"),
        wall_clock("end", tz).alias("time_end"),
        "peak_band",
        "peak_rate_per_10k",
        "count",
        "attempts",
        "side",
        pl.col("response_class").fill_null("") if "response_class" in episodes.columns else pl.lit("").alias("response_class"),
    )
    return (
        alt.Chart(data)
        .mark_bar(cornerRadius=2, height=14)
        .encode(
            x=_x(tz),
            x2="time_end:T",
            y=alt.Y("row:N", title=None, axis=alt.Axis(labelLimit=300)),
            color=alt.Color("peak_band:N", title="band at peak", scale=_BAND_COLORS),
            tooltip=[
                alt.Tooltip("episode:Q", title="episode"),
                alt.Tooltip("row:N", title="group · signal"),
                alt.Tooltip("response_class:N", title="class"),
                alt.Tooltip("side:N"),
                alt.Tooltip("count:Q", title="matching replies", format=","),
                alt.Tooltip("attempts:Q", format=","),
                alt.Tooltip("peak_rate_per_10k:Q", title="peak per 10k", format=".1f"),
            ],
        )
        .properties(title="Episodes (bar = first to last hot bucket)", width=width, height=alt.Step(22))
    )


def rate_around(rates: pl.DataFrame, episode: dict[str, Any], *, group: str, bands=None, tz: str = "UTC", what: str = "", width: int = 760) -> alt.LayerChart:
    """The episode's group rate over time (``metrics.rate`` frame with ``bucket``) with the episode window shaded."""
    what = what or str(episode.get("signal") or "")
    base = rate_over_time(rates, group=group, bands=bands, tz=tz, what=what, width=width,
                          title=f"{what} per 10,000 attempts around episode {episode['episode']} ({episode[group]})")
    win = pl.DataFrame({"start": [episode["start"]], "end": [episode["end"]]}).select(
        wall_clock("start", tz).alias("time"), wall_clock("end", tz).alias("time_end"), pl.lit("episode").alias("label")
    )
    shade = alt.Chart(win).mark_rect(color="#c62828", opacity=0.08).encode(x=_x(tz), x2="time_end:T", tooltip=["label:N"])
    return alt.layer(shade, base)


def queue_age(age: pl.DataFrame, *, tz: str = "UTC", title: str = "Queue age", episode: dict[str, Any] | None = None, width: int = 760) -> alt.LayerChart:
    """Oldest and p90 queue age (minutes, log scale) at each instant, and recipients waiting (bars, right axis).

    ``age``: :func:`deferral_kit.queue.age_over_time` for one group (or summed over groups)."""
    pcol = next(c for c in age.columns if c.startswith("p") and c.endswith("_min"))
    _check(age, ["instant", "waiting", "oldest_min", pcol])
    data = age.select(wall_clock("instant", tz).alias("time"), "waiting", "oldest_min", pl.col(pcol))
    long = data.unpivot(index=["time", "waiting"], on=["oldest_min", pcol], variable_name="measure", value_name="minutes").with_columns(
        pl.col("measure").replace({"oldest_min": "oldest", pcol: pcol.removesuffix("_min")})
    )
    bars = alt.Chart(data).mark_bar(opacity=0.25, color="#607d8b").encode(
        x=_x(tz), y=alt.Y("waiting:Q", title="recipients waiting"), tooltip=[alt.Tooltip("waiting:Q", format=",")]
    )
    lines = alt.Chart(long).mark_line(point=alt.OverlayMarkDef(size=14)).encode(
        x=_x(tz),
        y=alt.Y("minutes:Q", title="queue age (minutes)", scale=alt.Scale(type="symlog")),
        color=alt.Color("measure:N", title=None),
        tooltip=["measure:N", alt.Tooltip("minutes:Q", format=".1f"), alt.Tooltip("waiting:Q", format=",")],
    )
    layers = [bars, lines]
    if episode is not None:
        win = pl.DataFrame({"start": [episode["start"]], "end": [episode["end"]]}).select(wall_clock("start", tz).alias("time"), wall_clock("end", tz).alias("time_end"))
        layers.insert(0, alt.Chart(win).mark_rect(color="#c62828", opacity=0.08).encode(x=_x(tz), x2="time_end:T"))
    return alt.layer(*layers).resolve_scale(y="independent").properties(title=title, width=width, height=220)


def first_vs_final(frame: pl.DataFrame, *, group: str, title: str = "First-attempt vs final delivery rate", width: int = 360) -> alt.Chart:
    """Grouped bars of ``rate`` by ``measure`` (first attempt / final) per ``group``:
    the frame from :func:`deferral_kit.outcomes.first_vs_final`."""
    _check(frame, [group, "measure", "rate"])
    return (
        alt.Chart(frame)
        .mark_bar()
        .encode(
            y=alt.Y(f"{group}:N", title=group.replace("_", " "), axis=alt.Axis(labelLimit=260)),
            yOffset=alt.YOffset("measure:N"),
            x=alt.X("rate:Q", title="share of recipients", axis=alt.Axis(format="%"), scale=alt.Scale(domain=[0, 1])),
            color=alt.Color("measure:N", title=None, scale=alt.Scale(domain=["first attempt", "final"], range=["#f9a825", "#2e7d32"])),
            tooltip=[f"{group}:N", "measure:N", alt.Tooltip("rate:Q", format=".2%")],
        )
        .properties(title=title, width=width)
    )
