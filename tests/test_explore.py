"""The explorer driven from Python, no browser: set the widgets as a user would and check the data
behind the chart and tables against the known report world (``tests/report_world.py``: five
destinations, 60 tries an hour each over 2026-11-09..22 from two IPs; ``452 4.3.1`` on 12 tries an
hour to outlook.com and hotmail.com on 2026-11-18 14:00-17:59 UTC, one a day to outlook.com in W46)."""

from __future__ import annotations

from datetime import datetime, timezone

import polars as pl
import pytest

import report_world as world
from deferral_kit import explore

HOURS = 24 * 14
ALL_431 = 2 * 4 * 12 + 7


@pytest.fixture(scope="module")
def attempts() -> pl.DataFrame:
    return world.attempts()


@pytest.fixture(scope="module")
def data(attempts) -> pl.DataFrame:
    return explore.cube(attempts.lazy())


@pytest.fixture()
def ex(data) -> explore.Explorer:
    return explore.Explorer(data=data)


def _utc(*args) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)


def _set_range(ex: explore.Explorer, start: datetime, end: datetime) -> None:
    values = [v for _, v in ex.time.options]
    ex.time.index = (values.index(start), values.index(end))


def test_cube_keeps_every_row(attempts, data):
    assert data["rows"].sum() == attempts.height
    assert data.filter("mx")["rows"].sum() == 5 * 60 * HOURS  # the error-agent suspensions are not MX tries
    assert data.filter(pl.col("code") == "452 4.3.1")["rows"].sum() == ALL_431 + 14  # + one suspension a day


def test_initial_view_counts_everything(ex):
    assert ex.provider.options == ("(all)", "microsoft_consumer", "google", "microsoft_365", "yahoo")
    assert ex.signal.value == "code:452 4.3.1"
    assert ex.frame["count"].sum() == ALL_431 and ex.frame["attempts"].sum() == 5 * 60 * HOURS
    assert f"{ALL_431} 452 4.3.1 of 100,800 tries" in ex.status.value
    assert ex.chart_html.value.startswith("<svg")


def test_provider_narrows_the_other_controls_and_the_data(ex):
    chart_before = ex.chart_html.value
    ex.provider.value = "microsoft_consumer"
    assert ex.domain.options == ("(all)", "hotmail.com", "outlook.com")
    assert ex.mx_host.options == ("(all)", "hotmail-com.olc.protection.outlook.com", "outlook-com.olc.protection.outlook.com")
    assert set(ex.frame["provider"]) == {"microsoft_consumer"}
    assert ex.frame["count"].sum() == ALL_431 and ex.frame["attempts"].sum() == 2 * 60 * HOURS
    assert ex.chart_html.value != chart_before  # redrawn in place, same widget


def test_one_destination_one_ip_one_afternoon(ex):
    ex.provider.value = "microsoft_consumer"
    ex.domain.value = "hotmail.com"
    ex.split.value = "sending_ip"
    assert dict(ex.frame.group_by("sending_ip").agg(pl.col("count").sum()).iter_rows()) == {"192.0.2.10": 24, "192.0.2.11": 24}
    assert dict(ex.frame.group_by("sending_ip").agg(pl.col("attempts").sum()).iter_rows()) == {"192.0.2.10": 30 * HOURS, "192.0.2.11": 30 * HOURS}
    ex.ip.value = "192.0.2.10"
    _set_range(ex, _utc(2026, 11, 18, 14), _utc(2026, 11, 18, 16))
    f = ex.frame.sort("bucket")
    assert f.select("bucket", "attempts", "count", "rate_per_10k").rows() == [
        (_utc(2026, 11, 18, 14), 30, 6, 2000.0),
        (_utc(2026, 11, 18, 15), 30, 6, 2000.0),
    ]
    assert f["band"].to_list() == ["incident", "incident"]
    assert ex.table.select("sending_ip", "attempts", "count").rows() == [("192.0.2.10", 60, 12)]
    assert ex.code_table.select("code", "response_class", "tries").rows() == [("452 4.3.1", "capacity", 12)]


def test_response_class_bucket_and_split(ex):
    ex.signal.value = "class:capacity"
    assert ex.frame["count"].sum() == ALL_431
    ex.bucket.value = "1d"
    assert ex.frame["bucket"].dt.hour().unique().to_list() == [0]
    day = ex.frame.filter(pl.col("bucket") == _utc(2026, 11, 18)).group_by("bucket").agg(pl.col("count").sum(), pl.col("attempts").sum())
    assert day.row(0) == (_utc(2026, 11, 18), 96, 5 * 60 * 24)
    ex.split.value = "response_class"
    # every class's deferrals over the same denominator: capacity, and the Yahoo [TSS04] deferrals
    totals = dict(ex.frame.group_by("response_class").agg(pl.col("count").sum()).iter_rows())
    assert totals["capacity"] == ALL_431 and sum(totals.values()) == ALL_431 + 7


def test_display_zone_relabels_time_but_not_the_data(ex):
    _set_range(ex, _utc(2026, 11, 18, 14), _utc(2026, 11, 18, 18))
    frame, svg = ex.frame, ex.chart_html.value
    ex.tz.value = "Europe/Berlin"
    labels = dict((v, k) for k, v in ex.time.options)
    assert labels[_utc(2026, 11, 18, 14)] == "Wed 11-18 15:00"
    assert ex.time.value == (_utc(2026, 11, 18, 14), _utc(2026, 11, 18, 18))
    assert ex.frame.equals(frame)
    assert ex.chart_html.value != svg and "Europe/Berlin" in ex.chart_html.value
    ex.tz.value = "Not/AZone"  # typed but not a zone: ignored, nothing redrawn
    assert "Europe/Berlin" in ex.chart_html.value


def test_loads_files_once_and_reports_bad_input(attempts, tmp_path):
    parquet = world.write(tmp_path / "attempts.parquet")
    before = dict(explore.cache_stats)
    a = explore.Explorer([parquet])
    b = explore.Explorer([parquet])
    assert explore.cache_stats["loads"] == before["loads"] + 1 and explore.cache_stats["hits"] == before["hits"] + 1
    assert a.cube is b.cube and a.frame["count"].sum() == ALL_431
    b.inputs.value = str(tmp_path / "missing.log")
    b.load_button.click()
    assert "error" in b.status.value and "missing.log" in b.status.value
    assert b.frame["count"].sum() == ALL_431  # the last good view stays


def test_rare_domains_are_lumped(attempts):
    c = explore.cube(attempts.lazy(), top=2)
    assert c["rows"].sum() == attempts.height
    # outlook.com leads by its suspension rows; the rest tie and are kept alphabetically
    assert set(c["recipient_domain"]) == {"outlook.com", "contoso.com", explore.OTHER}
    assert c.filter(pl.col("recipient_domain") == explore.OTHER)["rows"].sum() == 3 * 60 * HOURS


def test_explorer_notebook_is_committed_clean():
    import json
    from pathlib import Path

    from deferral_kit import report

    path = Path(__file__).resolve().parents[1] / "notebooks" / "explorer.ipynb"
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    assert all(c.get("outputs") == [] and c.get("execution_count") is None for c in nb["cells"] if c["cell_type"] == "code")
    assert set(report.notebook_parameters(path)) == {"inputs", "input_format", "log_tz", "display_tz"}
