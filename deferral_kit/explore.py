"""The live explorer: ipywidgets controls over one destination, one IP, one afternoon.

Loading is done once per input (cached by path, size and modification time) and reduced at once to
a **cube**: counts of rows per hour × provider × recipient domain × MX host × sending IP × response
class × reply code × outcome × "is an MX try".  Every control then filters and sums that small
frame, so changing a control on a week of a large sender costs milliseconds, not a re-read.
Domains and MX hosts beyond the ``top`` busiest are lumped into ``(other)`` to bound the cube.

The numbers are those of :func:`deferral_kit.metrics.rate`: ``attempts`` = MX tries
(``metrics.is_mx_attempt``) matching the filters, ``count`` = those of them with the chosen
response (a class's *deferred* tries, or a reply code), ``rate_per_10k`` with its 95 % Wilson
interval and band.

Use in JupyterLab::

    from deferral_kit.explore import Explorer
    Explorer(["/var/log/mail.log*"]).widget

Charts render to SVG in the kernel (vl-convert), so the explorer works offline and the chart
updates in place; ``render="vega"`` shows the interactive Vega-Lite chart instead.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl

from . import metrics
from .warmup import sending_ip

ALL = "(all)"
OTHER = "(other)"
RESOLUTION = "1h"
BUCKETS = ("1h", "3h", "6h", "12h", "1d")
SPLITS = ("provider", "recipient_domain", "mx_host", "sending_ip", "response_class")
ZONES = ("UTC", "Europe/London", "Europe/Berlin", "America/New_York", "America/Chicago", "America/Los_Angeles", "Asia/Kolkata", "Asia/Tokyo",
         "Australia/Sydney")
DIMENSIONS = ("provider", "recipient_domain", "mx_host", "sending_ip")
CUBE_KEYS = ("bucket", *DIMENSIONS, "response_class", "code", "outcome", "mx")

_cache: dict[tuple, pl.DataFrame] = {}
cache_stats = {"hits": 0, "loads": 0}


# --- the cube -----------------------------------------------------------------------------------

def _code() -> pl.Expr:
    return pl.concat_str([pl.col("smtp_code").cast(pl.String), pl.col("enhanced_code")], separator=" ", ignore_nulls=True)


def cube(attempts: pl.LazyFrame | pl.DataFrame, *, top: int = 500, resolution: str = RESOLUTION, own_infrastructure=None) -> pl.DataFrame:
    """Rows per :data:`CUBE_KEYS` (``rows``); ``mx`` tells MX tries (the rate denominator) from the
    rest.  Domains and MX hosts outside the ``top`` by rows become ``(other)``."""
    from .classify import with_classes

    lf = attempts.lazy()
    if "response_class" not in lf.collect_schema():
        lf = with_classes(lf, own_infrastructure=own_infrastructure)
    lf = lf.with_columns(
        pl.col("ts").dt.truncate(resolution).alias("bucket"),
        sending_ip(),
        _code().alias("code"),
        metrics.is_mx_attempt().fill_null(False).alias("mx"),
    )
    fine = lf.group_by(CUBE_KEYS).agg(pl.len().cast(pl.Int64).alias("rows")).collect()
    for col in ("recipient_domain", "mx_host"):
        keep = fine.group_by(col).agg(pl.col("rows").sum()).sort(["rows", col], descending=[True, False], nulls_last=True).head(top)[col]
        fine = fine.with_columns(pl.when(pl.col(col).is_in(keep.implode()) | pl.col(col).is_null()).then(pl.col(col)).otherwise(pl.lit(OTHER)).alias(col))
    return fine.group_by(CUBE_KEYS).agg(pl.col("rows").sum()).sort("bucket")


def _files(inputs: Sequence[str]) -> list[Path]:
    from .sources import discover

    return sorted({Path(f.path) for f in discover(list(inputs))})


def load_cube(inputs: Sequence[str], *, format: str = "auto", log_tz: str = "UTC", year: int | None = None, top: int = 500) -> pl.DataFrame:
    """:func:`cube` of log files or canonical Parquet files, cached for the life of the kernel by the
    files' paths, sizes and modification times (a rotated or appended log is read again)."""
    from argparse import Namespace

    from .cli import read_input

    inputs = [str(p) for p in inputs]
    if all(p.endswith(".parquet") for p in inputs):
        files = [Path(p) for p in inputs]
    else:
        files = _files(inputs)
    key = (tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()), format, log_tz, year, top)
    if key in _cache:
        cache_stats["hits"] += 1
        return _cache[key]
    res = read_input(inputs, Namespace(format=format, tz=log_tz, year=year, keep_duplicates=False))
    out = cube(res.attempts, top=top)
    _cache[key] = out
    cache_stats["loads"] += 1
    return out


# --- selections ---------------------------------------------------------------------------------

def select(c: pl.DataFrame, *, provider: str = ALL, recipient_domain: str = ALL, mx_host: str = ALL, sending_ip: str = ALL,
           start: datetime | None = None, end: datetime | None = None) -> pl.DataFrame:
    """Cube rows matching the filters (``(all)`` = no filter) in [start, end)."""
    cond = pl.lit(True)
    for col, value in (("provider", provider), ("recipient_domain", recipient_domain), ("mx_host", mx_host), ("sending_ip", sending_ip)):
        if value and value != ALL:
            cond = cond & (pl.col(col) == value)
    if start is not None:
        cond = cond & (pl.col("bucket") >= start)
    if end is not None:
        cond = cond & (pl.col("bucket") < end)
    return c.filter(cond)


def signal_expr(signal: str) -> pl.Expr:
    """``class:NAME`` (deferred tries of that response class) or ``code:452 4.3.1`` (that reply)."""
    kind, _, value = signal.partition(":")
    if kind == "class":
        return (pl.col("response_class") == value) & (pl.col("outcome") == "deferred")
    if kind == "code":
        return pl.col("code") == value
    raise ValueError(f"signal {signal!r}: use class:NAME or code:CODE")


def _with_rates(frame: pl.DataFrame, bands) -> pl.DataFrame:
    low, high = metrics.wilson_interval("count", "attempts")
    p = pl.col("count") / pl.col("attempts")
    return frame.with_columns(
        (p * metrics.PER).alias("rate_per_10k"), (low * metrics.PER).alias("ci_low_per_10k"), (high * metrics.PER).alias("ci_high_per_10k"),
        metrics.band_expr(p, bands).alias("band"),
    )


def series(selected: pl.DataFrame, *, signal: str, bucket: str = "1h", split: str = "provider", top_n: int = 8, bands=None) -> pl.DataFrame:
    """Rate per ``bucket`` (UTC) and ``split`` group of the selected cube rows, in the columns of
    :func:`deferral_kit.metrics.rate` (buckets without MX tries left out); the ``top_n`` groups
    with the most matching tries (then the most tries) are kept."""
    mx = selected.filter(pl.col("mx"))
    if split == "response_class":  # the denominator is all tries; each class its own numerator
        den = mx.group_by(pl.col("bucket").dt.truncate(bucket)).agg(pl.col("rows").sum().alias("attempts"))
        num = mx.filter(pl.col("outcome") == "deferred").group_by(pl.col("bucket").dt.truncate(bucket), "response_class").agg(pl.col("rows").sum().alias("count"))
        out = num.join(den, on="bucket").with_columns(pl.col("response_class").fill_null("unknown"))
    else:
        hit = signal_expr(signal).fill_null(False)
        out = mx.group_by(pl.col("bucket").dt.truncate(bucket), pl.col(split).fill_null("unknown")).agg(
            pl.col("rows").sum().alias("attempts"), pl.col("rows").filter(hit).sum().alias("count"))
    out = out.with_columns(pl.col("attempts").cast(pl.Int64), pl.col("count").cast(pl.Int64))
    top = out.group_by(split).agg(pl.col("count").sum(), pl.col("attempts").sum()).sort(["count", "attempts", split], descending=[True, True, False]).head(top_n)
    out = out.join(top.select(split), on=split, how="semi")
    return _with_rates(out, bands or metrics.DEFAULT_BANDS).sort("bucket", split)


def summary(selected: pl.DataFrame, *, signal: str, split: str = "provider", bands=None, limit: int = 20) -> pl.DataFrame:
    """Per ``split`` group over the whole selection: attempts, count, rate with Wilson interval and band."""
    mx = selected.filter(pl.col("mx"))
    hit = signal_expr(signal).fill_null(False) if split != "response_class" else (pl.col("outcome") == "deferred")
    out = mx.group_by(pl.col(split).fill_null("unknown")).agg(pl.col("rows").sum().cast(pl.Int64).alias("attempts"), pl.col("rows").filter(hit).sum().cast(pl.Int64).alias("count"))
    return _with_rates(out, bands or metrics.DEFAULT_BANDS).sort(["count", "attempts", split], descending=[True, True, False]).head(limit)


def codes(selected: pl.DataFrame, *, limit: int = 15) -> pl.DataFrame:
    """Reply codes of the selection's MX tries that were not delivered, most frequent first."""
    return (
        selected.filter(pl.col("mx") & (pl.col("outcome") != "delivered"))
        .group_by("code", "response_class", "outcome").agg(pl.col("rows").sum().cast(pl.Int64).alias("tries"))
        .sort(["tries", "code"], descending=[True, False], nulls_last=True).head(limit)
    )


def _options(c: pl.DataFrame, col: str) -> list[str]:
    """Values of ``col`` by MX tries, busiest first, after ``(all)``."""
    vals = c.filter(pl.col("mx") & pl.col(col).is_not_null()).group_by(col).agg(pl.col("rows").sum()).sort(["rows", col], descending=[True, False])[col].to_list()
    return [ALL, *vals]


def signal_options(c: pl.DataFrame, *, codes_limit: int = 12) -> list[tuple[str, str]]:
    """(label, value) pairs: every response class seen on deferred MX tries, then the commonest non-2xx codes."""
    mx = c.filter(pl.col("mx"))
    classes = mx.filter(pl.col("outcome") == "deferred").group_by("response_class").agg(pl.col("rows").sum()).sort(["rows", "response_class"], descending=[True, False])["response_class"].drop_nulls().to_list()
    for must in ("capacity", "rate_limit", "reputation"):
        if must not in classes:
            classes.append(must)
    top_codes = (
        mx.filter(pl.col("code").is_not_null() & ~pl.col("code").str.starts_with("2"))
        .group_by("code").agg(pl.col("rows").sum()).sort(["rows", "code"], descending=[True, False]).head(codes_limit)["code"].to_list()
    )
    if "452 4.3.1" not in top_codes:
        top_codes.insert(0, "452 4.3.1")
    return [(f"class: {k}", f"class:{k}") for k in classes] + [(f"code: {k}", f"code:{k}") for k in top_codes]


# --- the widget ---------------------------------------------------------------------------------

def _svg(chart) -> str:
    import vl_convert as vlc

    return vlc.vegalite_to_svg(chart.to_dict(), vl_version="v" + _vl_version())


def _vl_version() -> str:
    import altair as alt

    return ".".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])


class Explorer:
    """ipywidgets controls driving :func:`series` / :func:`summary` / :func:`codes` on a cached cube.

    ``inputs``: log files, globs or Parquet files (loaded with :func:`load_cube`), or give ``data``
    (a cube from :func:`cube`).  After every change ``frame`` (the chart's data), ``table``,
    ``code_table`` and ``chart_html`` hold what is shown; ``widget`` is the box to display.
    """

    def __init__(self, inputs: Sequence[str] | str | None = None, *, data: pl.DataFrame | None = None, format: str = "auto", log_tz: str = "UTC",
                 tz: str = "UTC", bucket: str = "1h", signal: str = "code:452 4.3.1", split: str = "provider", bands=None, render: str = "svg"):
        import ipywidgets as w

        self.bands = bands or metrics.DEFAULT_BANDS
        self.render = render
        self._busy = False
        self._timed = False
        self.updates = 0
        inputs = [inputs] if isinstance(inputs, str) else list(inputs or [])
        style = {"description_width": "110px"}
        lay = w.Layout(width="360px")
        self.inputs = w.Text(value=", ".join(inputs), description="input data", placeholder="log files, globs or .parquet, comma-separated", style=style,
                             layout=w.Layout(width="600px"))
        self.format = w.Text(value=format, description="format", style=style, layout=w.Layout(width="220px"))
        self.log_tz = w.Text(value=log_tz, description="log time zone", style=style, layout=w.Layout(width="260px"))
        self.load_button = w.Button(description="Load", button_style="primary")
        self.provider = w.Dropdown(description="provider", style=style, layout=lay)
        self.domain = w.Dropdown(description="destination", style=style, layout=lay)
        self.mx_host = w.Dropdown(description="MX host", style=style, layout=lay)
        self.ip = w.Dropdown(description="sending IP", style=style, layout=lay)
        self.signal = w.Dropdown(description="response", style=style, layout=lay)
        self.time = w.SelectionRangeSlider(options=[("-", 0)], description="time range", style=style, layout=w.Layout(width="740px"), continuous_update=False)
        self.bucket = w.Dropdown(options=list(BUCKETS), value=bucket, description="bucket", style=style, layout=w.Layout(width="220px"))
        self.tz = w.Combobox(options=list(ZONES), value=tz, description="display zone", style=style, ensure_option=False, layout=w.Layout(width="300px"))
        self.split = w.Dropdown(options=list(SPLITS), value=split, description="lines per", style=style, layout=w.Layout(width="300px"))
        self.status = w.HTML()
        self.chart_html = w.HTML(layout=w.Layout(min_height="300px"))
        self.chart_html.add_class("dk-explorer-chart")
        self.chart_out = w.Output()
        self.table_html = w.HTML()
        self.table_html.add_class("dk-explorer-table")
        self._initial_signal = signal
        self.cube: pl.DataFrame | None = None
        self.frame = pl.DataFrame()
        self.table = pl.DataFrame()
        self.code_table = pl.DataFrame()
        self.load_button.on_click(lambda _: self.load())
        for ctl in (self.provider, self.domain, self.mx_host, self.ip, self.signal, self.time, self.bucket, self.split):
            ctl.observe(self._changed, names="value")
        self.tz.observe(self._tz_changed, names="value")
        chart = self.chart_html if render == "svg" else self.chart_out
        self.widget = w.VBox([
            w.HBox([self.inputs, self.format, self.log_tz, self.load_button]),
            w.HBox([self.provider, self.domain]), w.HBox([self.mx_host, self.ip]), w.HBox([self.signal, self.split]),
            self.time, w.HBox([self.bucket, self.tz]), self.status, chart, self.table_html,
        ])
        if data is not None:
            self.set_data(data)
        elif inputs:
            self.load()

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    # -- data --
    def load(self) -> None:
        """Read the ``input data`` box (cached) and reset the controls."""
        paths = [p.strip() for p in self.inputs.value.split(",") if p.strip()]
        if not paths:
            from .report import sample_inputs

            paths = sample_inputs()
        self.status.value = "<i>loading ...</i>"
        try:
            c = load_cube(paths, format=self.format.value or "auto", log_tz=self.log_tz.value or "UTC")
        except Exception as exc:  # shown in the widget: a bad path must not kill the session
            self.status.value = f"<b>error:</b> {html.escape(str(exc))}"
            return
        self.set_data(c)

    def set_data(self, c: pl.DataFrame) -> None:
        """Use cube ``c`` and reset every control to its options."""
        self.cube = c
        self._busy = True
        try:
            self.provider.options = _options(c, "provider")
            self.provider.value = ALL
            self._narrow()
            opts = signal_options(c)
            self.signal.options = opts
            values = [v for _, v in opts]
            self.signal.value = self._initial_signal if self._initial_signal in values else values[0]
            self._time_options()
        finally:
            self._busy = False
        self.refresh()

    def _narrow(self) -> None:
        """Domain / MX / IP choices limited to what the provider (and domain) selection has."""
        c = select(self.cube, provider=self.provider.value or ALL)
        keep = {ctl: ctl.value for ctl in (self.domain, self.mx_host, self.ip)}
        self.domain.options = _options(c, "recipient_domain")
        self.domain.value = keep[self.domain] if keep[self.domain] in self.domain.options else ALL
        c2 = select(c, recipient_domain=self.domain.value)
        self.mx_host.options = _options(c2, "mx_host")
        self.mx_host.value = keep[self.mx_host] if keep[self.mx_host] in self.mx_host.options else ALL
        self.ip.options = _options(c2, "sending_ip")
        self.ip.value = keep[self.ip] if keep[self.ip] in self.ip.options else ALL

    def _time_options(self) -> None:
        """Slider stops at every cube bucket (plus the end), labelled in the display zone."""
        if self.cube is None or self.cube.height == 0:
            return
        lo, hi = self.cube["bucket"].min(), self.cube["bucket"].max() + timedelta(hours=1)
        stops = pl.datetime_range(lo, hi, RESOLUTION, eager=True, time_zone="UTC")
        labels = stops.dt.convert_time_zone(self._zone()).dt.strftime("%a %m-%d %H:%M").to_list()
        old = self.time.value if self.time.options and self.time.options[0][0] != "-" else None
        self.time.options = list(zip(labels, stops.to_list()))
        self._timed = True
        self.time.index = (0, len(stops) - 1) if old is None else tuple(self._nearest(stops, v) for v in old)

    @staticmethod
    def _nearest(stops: pl.Series, value) -> int:
        return int((stops - value).abs().arg_min()) if value is not None else 0

    def _zone(self) -> str:
        from zoneinfo import ZoneInfo

        try:
            ZoneInfo(self.tz.value)
            return self.tz.value
        except Exception:
            return "UTC"

    # -- events --
    def _changed(self, change) -> None:
        if self._busy or self.cube is None:
            return
        if change["owner"] in (self.provider, self.domain):
            self._busy = True
            try:
                self._narrow()
            finally:
                self._busy = False
        self.refresh()

    def _tz_changed(self, change) -> None:
        if self._busy or self.cube is None or self._zone() != change["new"]:
            return
        self._busy = True
        try:
            self._time_options()
        finally:
            self._busy = False
        self.refresh()

    # -- output --
    def selection(self) -> pl.DataFrame:
        """Cube rows behind the current controls."""
        start, end = self.time.value if self._timed else (None, None)
        return select(self.cube, provider=self.provider.value or ALL, recipient_domain=self.domain.value or ALL, mx_host=self.mx_host.value or ALL,
                      sending_ip=self.ip.value or ALL, start=start, end=end)

    def refresh(self) -> None:
        """Recompute the chart data and tables from the controls and redraw in place."""
        from . import charts, tables

        sel = self.selection()
        split = self.split.value
        self.frame = series(sel, signal=self.signal.value, bucket=self.bucket.value, split=split, bands=self.bands)
        self.table = summary(sel, signal=self.signal.value, split=split, bands=self.bands)
        self.code_table = codes(sel)
        what = "deferrals" if split == "response_class" else self.signal.value.partition(":")[2]
        n, k = int(self.table["attempts"].sum()), int(self.table["count"].sum())
        self.status.value = (f"{k:,} {html.escape(what)} of {n:,} tries against MX hosts in the selection "
                             f"({(1e4 * k / n if n else 0):.1f} per 10,000); {sel['rows'].sum():,} rows")
        tz = self._zone()
        if self.frame.height:
            chart = charts.rate_over_time(self.frame, group=split, bands=self.bands, tz=tz, what=what, width=700, height=260,
                                          title=f"{what} per 10,000 tries, per {split.replace('_', ' ')} ({self.bucket.value} buckets, {tz})")
        else:
            chart = None
        if self.render == "svg":
            self.chart_html.value = _svg(chart) if chart is not None else "<p>No tries against MX hosts in this selection.</p>"
        else:
            from IPython.display import display

            self.chart_out.clear_output(wait=True)
            with self.chart_out:
                display(chart if chart is not None else "No tries against MX hosts in this selection.")
        fmt = {"rate_per_10k": "1", "ci_low_per_10k": "1", "ci_high_per_10k": "1"}
        self.table_html.value = tables.html_table(self.table, formats=fmt).html + tables.html_table(self.code_table).html
        self.updates += 1


def explore(inputs: Sequence[str] | str | None = None, **options: Any) -> Explorer:
    """An :class:`Explorer` over ``inputs`` (empty and no ``data``: the bundled sample); display it."""
    if not inputs and options.get("data") is None:
        from .report import sample_inputs

        inputs = sample_inputs()
    return Explorer(inputs, **options)
