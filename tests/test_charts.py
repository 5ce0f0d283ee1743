"""Chart builders: aggregated frames in, Vega-Lite specs out (wall-clock times, bands, params)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import polars as pl
import pytest
import vl_convert as vlc

from deferral_kit import charts, metrics

T0 = datetime(2026, 11, 18, 12, tzinfo=timezone.utc)


def rates(counts: dict[str, list[int]], attempts: int = 200) -> pl.DataFrame:
    """A frame shaped like metrics.rate(by=[recipient_domain], bucket="1h")."""
    rows = [(T0 + timedelta(hours=i), d, attempts, c) for d, cs in counts.items() for i, c in enumerate(cs)]
    f = pl.DataFrame(rows, schema={"bucket": pl.Datetime("us", "UTC"), "recipient_domain": pl.String, "attempts": pl.Int64, "count": pl.Int64}, orient="row")
    p = pl.col("count") / pl.col("attempts")
    low, high = metrics.wilson_interval("count", "attempts")
    return f.with_columns((p * 1e4).alias("rate_per_10k"), (low * 1e4).alias("ci_low_per_10k"), (high * 1e4).alias("ci_high_per_10k"), metrics.band_expr(p).alias("band"))


def dataset(spec: dict) -> list[dict]:
    """The chart's main data (layered charts also carry the band rules)."""
    first = spec["layer"][0] if "layer" in spec else spec
    return spec["datasets"][first["data"]["name"] if "data" in first else spec["data"]["name"]]


def find_params(spec: dict) -> dict:
    return {p["name"]: p for p in spec.get("params", [])}


FRAME = rates({"outlook.com": [0, 10, 30], "gmail.com": [0, 0, 1]})


def test_rate_over_time_shows_wall_clock_in_the_display_zone():
    spec = charts.rate_over_time(FRAME, group="recipient_domain", bands=metrics.DEFAULT_BANDS, tz="America/New_York").to_dict()
    rows = dataset(spec)
    assert len(rows) == FRAME.height == 6
    first = next(r for r in rows if r["recipient_domain"] == "outlook.com" and r["count"] == 0)
    # 12:00 UTC is 07:00 in New York: encoded as 07:00 on a UTC scale, so every viewer sees 07:00
    assert first["time"] == "2026-11-18T07:00:00+0000"
    assert first["time_label"] == "Wed 2026-11-18 07:00 EST"
    assert "bucket" not in first
    line = spec["layer"][1]
    assert line["encoding"]["x"]["scale"] == {"type": "utc"}
    assert line["encoding"]["x"]["title"] == "time (America/New_York)"
    assert line["encoding"]["y"]["scale"] == {"type": "symlog", "constant": 1}
    ci = spec["layer"][0]
    assert ci["mark"]["type"] == "rule" and ci["encoding"]["y2"] == {"field": "ci_high_per_10k"}
    assert ci["transform"][-1] == {"filter": "datum.count > 0"}  # no interval bars on quiet buckets
    assert ci["encoding"]["y"]["stack"] is None  # intervals of groups are not summed


def test_rate_over_time_draws_band_boundaries():
    spec = charts.rate_over_time(FRAME, group="recipient_domain", bands=metrics.DEFAULT_BANDS).to_dict()
    rule_layers = [layer for layer in spec["layer"] if layer["mark"].get("type") == "rule" and "strokeDash" in layer["mark"]]
    assert len(rule_layers) == 1
    rules = spec["datasets"][rule_layers[0]["data"]["name"]]
    assert [(r["band"], r["rate_per_10k"], r["label"]) for r in rules] == [("throttle", 2.0, "throttle above 2.0/10k"), ("incident", 20.0, "incident above 20.0/10k")]
    custom = metrics.Bands(names=("ok", "bad"), upper=(0.001, None))
    assert charts.threshold_lines(custom)["rate_per_10k"].to_list() == [10.0]


def test_rate_over_time_params_survive_export():
    spec = charts.rate_over_time(FRAME, group="recipient_domain").to_dict()
    params = find_params(spec)
    assert params["legend_pick_recipient_domain"]["bind"] == "legend"
    assert params["legend_pick_recipient_domain"]["select"] == {"type": "point", "fields": ["recipient_domain"]}
    pick = params["pick_recipient_domain"]
    # options ordered by the number of matching replies: the most affected destination first
    assert pick["bind"]["input"] == "select" and pick["bind"]["options"] == [None, "outlook.com", "gmail.com"]
    assert pick["bind"]["labels"] == ["all", "outlook.com", "gmail.com"]
    assert spec["layer"][1]["transform"] == [{"filter": "pick_recipient_domain == null || datum['recipient_domain'] == pick_recipient_domain"}]
    tooltip = {t["field"]: t.get("format") for t in spec["layer"][1]["encoding"]["tooltip"]}
    assert tooltip["rate_per_10k"] == ".2f" and tooltip["attempts"] == ","


def test_rates_are_rounded_for_the_spec():
    spec = charts.rate_over_time(FRAME, group="recipient_domain").to_dict()
    row = next(r for r in dataset(spec) if r["recipient_domain"] == "outlook.com" and r["count"] == 10)
    assert row["rate_per_10k"] == 500.0
    assert (row["ci_low_per_10k"], row["ci_high_per_10k"]) == (273.826, 895.781)  # Wilson 10 of 200, three decimals


def test_heatmap_cells_span_their_bucket_and_rows_follow_counts():
    spec = charts.heatmap(FRAME, group="recipient_domain", bucket="1h", tz="UTC").to_dict()
    row = dataset(spec)[0]
    assert (row["time"], row["time_end"]) in {("2026-11-18T12:00:00+0000", "2026-11-18T13:00:00+0000")}
    assert spec["encoding"]["y"]["sort"] == ["outlook.com", "gmail.com"]
    assert spec["encoding"]["x2"] == {"field": "time_end"}
    assert spec["mark"]["type"] == "rect"
    assert charts.heatmap(FRAME, group="recipient_domain", bucket="15m").to_dict()["datasets"]
    with pytest.raises(ValueError, match="bucket '1mo'"):
        charts.heatmap(FRAME, group="recipient_domain", bucket="1mo")


def test_specs_compile_and_render():
    for chart in (charts.rate_over_time(FRAME, group="recipient_domain", bands=metrics.DEFAULT_BANDS, tz="Europe/Berlin"),
                  charts.heatmap(FRAME, group="recipient_domain", tz="Europe/Berlin")):
        svg = vlc.vegalite_to_svg(chart.to_dict())
        assert svg.startswith("<svg") and "outlook.com" in svg


def test_charts_refuse_raw_rows():
    with pytest.raises(TypeError, match="not a LazyFrame"):
        charts.rate_over_time(FRAME.lazy(), group="recipient_domain")
    big = rates({f"d{i}.example": [1] * 100 for i in range(51)})
    with pytest.raises(ValueError, match="5,100 rows is too many"):
        charts.rate_over_time(big, group="recipient_domain")
    with pytest.raises(ValueError, match="lacks columns"):
        charts.rate_over_time(FRAME.drop("band"), group="recipient_domain")
