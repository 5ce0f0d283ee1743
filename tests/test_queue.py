"""Queue age reconstructed from logs, checked against a hand-built queue."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import polars as pl
import pytest

from deferral_kit import outcomes, queue, schema

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def build(rows: list[tuple]) -> pl.LazyFrame:
    """(message_key, recipient, queued minute or None, [(minute, outcome), ...]) -> per-recipient outcomes."""
    flat = []
    for mk, rcpt, q, tries in rows:
        for n, (t, outcome) in enumerate(tries, 1):
            flat.append(dict(message_key=mk, recipient=rcpt, recipient_domain=rcpt.split("@")[1], ts=at(t), queued_at=None if q is None else at(q),
                             outcome=outcome, attempt=n, agent="smtp", mx_host="mx." + rcpt.split("@")[1], line_no=len(flat) + 1))
    df = pl.DataFrame(flat).with_columns(pl.col("ts", "queued_at").cast(schema.UTC_DT))
    return outcomes.recipient_outcomes(schema.conform(df.lazy()))


# A and B (x.com) enter at 10:00, leave at 10:07 and 10:30; C (y.com) entered at 09:00 and is
# still pending when the data ends at 11:00; D (y.com) has no queued_at, first tried at
# 10:20, bounced at 11:00.
QUEUE = [
    ("m1", "a@x.com", 60, [(61, "deferred"), (67, "delivered")]),
    ("m1", "b@x.com", 60, [(61, "deferred"), (75, "deferred"), (90, "delivered")]),
    ("m2", "c@y.com", 0, [(1, "deferred"), (50, "deferred"), (110, "deferred")]),
    ("m3", "d@y.com", None, [(80, "deferred"), (120, "bounced")]),
]


@pytest.fixture(scope="module")
def oc() -> pl.LazyFrame:
    return build(QUEUE).collect().lazy()


def test_samples_on_a_10_minute_grid(oc):
    got = queue.samples(oc, every="10m").collect().sort("instant", "recipient_domain", "age_min")
    by_instant = {}
    for t, dom, age in got.iter_rows():
        by_instant.setdefault(int((t - T0).total_seconds() // 60), []).append((dom, age))
    assert by_instant[0] == [("y.com", 0.0)]  # C at the instant it entered
    assert by_instant[60] == [("x.com", 0.0), ("x.com", 0.0), ("y.com", 60.0)]
    assert by_instant[70] == [("x.com", 10.0), ("y.com", 70.0)]  # A left at 10:07
    assert by_instant[80] == [("x.com", 20.0), ("y.com", 0.0), ("y.com", 80.0)]  # D from its first try
    assert by_instant[90] == [("y.com", 10.0), ("y.com", 90.0)]  # B delivered at 10:30: not waiting
    assert by_instant[120] == [("y.com", 120.0)]  # pending C until the end; D bounced at 11:00
    assert sorted(by_instant) == list(range(0, 121, 10))
    assert got.height == 6 + 3 + 2 + 3 + 2 + 2 + 2 + 1  # 09:00-09:50 C alone, then as above


def test_qshape_at_one_instant(oc):
    got = queue.qshape(oc, at=at(65))
    assert got.columns == ["recipient_domain", "T", *queue.QSHAPE_LABELS]
    rows = {r[0]: r[1:] for r in got.rows()}
    # A and B are 5 minutes old: "10" is 5 to under 10 minutes; C is 65 minutes old
    assert rows["x.com"] == (2, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0)
    assert rows["y.com"] == (1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0)
    assert rows["TOTAL"] == (3, 0, 2, 0, 0, 1, 0, 0, 0, 0, 0)
    assert got["recipient_domain"].to_list() == ["TOTAL", "x.com", "y.com"]


def test_age_buckets_follow_qshape_edges():
    ages = pl.Series([0.0, 4.99, 5.0, 39.9, 40.0, 1279.0, 1280.0, 5000.0])
    got = pl.select(queue.age_bucket(pl.lit(ages))).to_series().cast(pl.String).to_list()
    assert got == ["5", "5", "10", "40", "80", "1280", "1280+", "1280+"]


def test_shape_over_time(oc):
    got = queue.shape(oc, every="10m").collect()
    row = got.filter((pl.col("instant") == at(80)) & (pl.col("recipient_domain") == "y.com"))
    assert row.select(pl.col("age_bucket").cast(pl.String), "recipients").rows() == [("5", 1), ("160", 1)]


def test_age_over_time_hourly(oc):
    got = queue.age_over_time(oc, every="1h").collect()
    # every instant for every destination: nothing waiting is 0 with no age
    assert got.rows() == [
        (at(0), "x.com", 0, None, None),
        (at(0), "y.com", 1, 0.0, 0.0),
        (at(60), "x.com", 2, 0.0, 0.0),
        (at(60), "y.com", 1, 60.0, 60.0),
        (at(120), "x.com", 0, None, None),
        (at(120), "y.com", 1, 120.0, 120.0),
    ]
    total = queue.age_over_time(oc, every="10m", by=[]).collect().filter(pl.col("instant") == at(80))
    assert total.rows() == [(at(80), 3, 80.0, pytest.approx(20.0 + 0.8 * 60.0))]


def test_window_limits(oc):
    got = queue.age_over_time(oc, every="10m", by=[], start=at(100), end=at(110)).collect()
    assert got.select("instant", "waiting", "oldest_min").rows() == [(at(100), 2, 100.0), (at(110), 2, 110.0)]


def test_bad_step():
    with pytest.raises(ValueError, match="grid step"):
        queue.samples(pl.LazyFrame(), every="hourly")
