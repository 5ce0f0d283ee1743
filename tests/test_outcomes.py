"""Per-recipient outcomes across tries: hand-built canonical rows with known fates."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import polars as pl
import pytest

from deferral_kit import outcomes, schema

T0 = datetime(2026, 3, 2, 10, 0, tzinfo=timezone.utc)
MX = "hotmail-com.olc.protection.outlook.com"


def attempts_frame(rows: list[dict]) -> pl.LazyFrame:
    """Canonical attempts from partial rows (absent columns null), ``ts``/``queued_at`` in minutes after T0."""
    full = []
    for i, r in enumerate(rows, 1):
        r = dict(r)
        r["ts"] = T0 + timedelta(minutes=r.pop("t"))
        q = r.pop("q", 0)
        r["queued_at"] = None if q is None else T0 + timedelta(minutes=q)
        r.setdefault("agent", "smtp")
        r.setdefault("mx_host", MX)
        r.setdefault("line_no", i)
        r.setdefault("recipient_domain", r["recipient"].split("@")[1])
        full.append(r)
    df = pl.DataFrame(full, infer_schema_length=None).with_columns(pl.col("ts", "queued_at").cast(schema.UTC_DT))
    return schema.conform(df.lazy())


# message m1: a delivered first try; m2: two recipients, one deferred then delivered at the
# 2nd try, one deferred twice (plus a local suspension row) then delivered at the 4th row;
# m3: deferred then bounced; m4: deferred then expired by qmgr; m5: pending at the end;
# m6: no queued_at (ESP-like) deferred then delivered; m7: first try before the data.
ROWS = [
    dict(message_key="m1", recipient="a@outlook.com", t=1, outcome="delivered", attempt=1, egress_ip="192.0.2.1"),
    dict(message_key="m2", recipient="b@outlook.com", t=2, outcome="deferred", attempt=1, egress_ip="192.0.2.1"),
    dict(message_key="m2", recipient="b@outlook.com", t=12, outcome="delivered", attempt=2, egress_ip="192.0.2.2"),
    dict(message_key="m2", recipient="c@hotmail.com", t=2, outcome="deferred", attempt=1, egress_ip="192.0.2.1"),
    dict(message_key="m2", recipient="c@hotmail.com", t=5, outcome="deferred", attempt=2, agent="error", mx_host=None),
    dict(message_key="m2", recipient="c@hotmail.com", t=20, outcome="deferred", attempt=3, egress_ip="192.0.2.2"),
    dict(message_key="m2", recipient="c@hotmail.com", t=62, outcome="delivered", attempt=4, egress_ip="192.0.2.2"),
    # a duplicate log line after the delivery does not change the fate
    dict(message_key="m2", recipient="c@hotmail.com", t=63, outcome="deferred", attempt=5, egress_ip="192.0.2.2"),
    dict(message_key="m3", recipient="d@outlook.com", t=3, q=1, outcome="deferred", attempt=1, egress_ip="192.0.2.1"),
    dict(message_key="m3", recipient="d@outlook.com", t=33, q=1, outcome="bounced", attempt=2, egress_ip="192.0.2.1"),
    dict(message_key="m4", recipient="e@example.org", t=4, outcome="deferred", attempt=1, mx_host="mx.example.org"),
    dict(message_key="m4", recipient="e@example.org", t=120, outcome="expired", attempt=2, agent="qmgr", mx_host=None),
    dict(message_key="m5", recipient="f@example.org", t=30, q=25, outcome="deferred", attempt=1, mx_host="mx.example.org"),
    dict(message_key="m5", recipient="f@example.org", t=90, q=25, outcome="deferred", attempt=2, mx_host="mx.example.org"),
    dict(message_key="m6", recipient="g@outlook.com", t=40, q=None, outcome="deferred", attempt=1),
    dict(message_key="m6", recipient="g@outlook.com", t=50, q=None, outcome="delivered", attempt=2),
    dict(message_key="m7", recipient="h@outlook.com", t=6, q=-100, outcome="delivered", attempt=3),
]


@pytest.fixture(scope="module")
def per_recipient() -> pl.DataFrame:
    return outcomes.recipient_outcomes(attempts_frame(ROWS)).collect().sort(outcomes.KEY)


def test_one_row_per_recipient_message_with_its_fate(per_recipient):
    got = per_recipient.select("message_key", "recipient", "first_outcome", "final_status", "deferrals", "tries", "delivered_attempt", "first_attempt_seen")
    assert got.rows() == [
        ("m1", "a@outlook.com", "delivered", "delivered", 0, 1, 1, True),
        ("m2", "b@outlook.com", "deferred", "delivered", 1, 2, 2, True),
        # the error-agent suspension is a row (a deferral) but not a try against the MX
        ("m2", "c@hotmail.com", "deferred", "delivered", 3, 3, 4, True),
        ("m3", "d@outlook.com", "deferred", "bounced", 1, 2, None, True),
        # the qmgr expiry row is not an MX try either
        ("m4", "e@example.org", "deferred", "expired", 1, 1, None, True),
        ("m5", "f@example.org", "deferred", "pending", 2, 2, None, True),
        ("m6", "g@outlook.com", "deferred", "delivered", 1, 2, 2, True),
        ("m7", "h@outlook.com", "delivered", "delivered", 0, 1, 3, False),
    ]


def test_time_to_delivery_from_queued_at_or_first_try(per_recipient):
    got = dict(zip(per_recipient["recipient"], zip(per_recipient["time_to_delivery_s"], per_recipient["ttd_basis"])))
    assert got["a@outlook.com"] == (60.0, "queued_at")
    assert got["b@outlook.com"] == (720.0, "queued_at")
    assert got["c@hotmail.com"] == (3720.0, "queued_at")
    assert got["d@outlook.com"] == (None, "queued_at")
    assert got["f@example.org"] == (None, "queued_at")
    # no queued_at: measured from the first try (40 -> 50 minutes)
    assert got["g@outlook.com"] == (600.0, "first_attempt")
    assert got["h@outlook.com"] == (6360.0, "queued_at")
    pending = per_recipient.filter(pl.col("final_status") == "pending")
    assert pending["final_ts"].to_list() == [None]
    assert pending["last_ts"].to_list() == [T0 + timedelta(minutes=90)]


def test_final_row_columns_are_the_delivering_try(per_recipient):
    got = dict(zip(per_recipient["recipient"], per_recipient["egress_ip"]))
    assert got["b@outlook.com"] == "192.0.2.2"
    assert got["c@hotmail.com"] == "192.0.2.2"
    assert dict(zip(per_recipient["recipient"], per_recipient["mx_host"]))["e@example.org"] is None  # the qmgr row


def test_summary_rates_and_denominators(per_recipient):
    s = outcomes.outcome_summary(per_recipient.lazy()).collect().row(0, named=True)
    assert {k: s[k] for k in ("recipients", "first_attempt_seen", "first_attempt_delivered", "delivered", "bounced", "expired",
                              "pending", "resolved", "first_attempt_deferred", "deferred_then_delivered", "bounced_after_deferral")} == {
        "recipients": 8, "first_attempt_seen": 7, "first_attempt_delivered": 1, "delivered": 5, "bounced": 1, "expired": 1,
        "pending": 1, "resolved": 7, "first_attempt_deferred": 6, "deferred_then_delivered": 3, "bounced_after_deferral": 1,
    }
    assert s["first_attempt_delivery_rate"] == pytest.approx(1 / 7)
    assert s["final_delivery_rate"] == pytest.approx(5 / 7)  # the pending recipient is not a failure
    assert s["retry_success_rate"] == pytest.approx(3 / 5)  # b, c, g of b, c, d, e, g (f pending)
    assert s["attempts_per_delivered"] == pytest.approx((1 + 2 + 4 + 2 + 3) / 5)
    ttd = sorted([60.0, 720.0, 3720.0, 600.0, 6360.0])
    assert s["ttd_p50_s"] == pytest.approx(720.0)
    assert s["ttd_p90_s"] == pytest.approx(ttd[3] + 0.6 * (ttd[4] - ttd[3]))
    assert s["ttd_p99_s"] == pytest.approx(ttd[3] + 0.96 * (ttd[4] - ttd[3]))


def test_summary_by_destination_and_sending_ip(per_recipient):
    by_dom = outcomes.outcome_summary(per_recipient.lazy(), by=["recipient_domain"]).collect()
    assert by_dom.select("recipient_domain", "recipients", "delivered", "pending", "final_delivery_rate").rows() == [
        ("example.org", 2, 0, 1, 0.0),
        ("hotmail.com", 1, 1, 0, 1.0),
        ("outlook.com", 5, 4, 0, 0.8),
    ]
    by_ip = outcomes.outcome_summary(per_recipient.filter(pl.col("final_status") == "delivered").lazy(), by=["egress_ip"]).collect()
    assert by_ip.select("egress_ip", "delivered", "ttd_p50_s").rows() == [(None, 2, 3480.0), ("192.0.2.1", 1, 60.0), ("192.0.2.2", 2, 2220.0)]


def test_retry_success_by_attempt(per_recipient):
    got = outcomes.retry_success_by_attempt(per_recipient.lazy()).collect()
    # cohort: the six recipients deferred at a first try seen in the data
    assert got.rows() == [(2, 2, 6, pytest.approx(2 / 6)), (4, 1, 6, pytest.approx(3 / 6))]


def test_first_vs_final_long_frame(per_recipient):
    s = outcomes.outcome_summary(per_recipient.lazy(), by=["recipient_domain"])
    got = outcomes.first_vs_final(s, by=["recipient_domain"]).filter(pl.col("recipient_domain") == "outlook.com")
    assert got.select("measure", "rate").rows() == [("first attempt", 0.25), ("final", 0.8)]


# --- against the generator's per-recipient truth ---------------------------------------------------

@pytest.fixture(scope="module")
def world():
    from deferral_kit.sample import Episode, WorldConfig, generate

    return generate(WorldConfig(days=3, seed=5, messages_per_day=3000, episodes=[
        Episode("ms-capacity", kind="capacity", providers=["microsoft"], probability=0.3, start="2026-11-17T13:00Z", end="2026-11-17T17:00Z"),
    ]))


def test_outcomes_match_generator_truth(world):
    got = outcomes.recipient_outcomes(world.attempts.lazy()).collect()
    truth = world.messages
    assert got.height == truth.height
    j = got.join(truth, on=list(outcomes.KEY), how="inner", suffix="_truth")
    assert j.height == truth.height
    assert (j["final_status"] == j["final_outcome"]).all()
    assert j.filter(pl.col("final_ts").ne_missing(pl.col("final_ts_truth"))).height == 0
    assert ((j["first_outcome"] == "delivered") == j["first_attempt_delivered"]).all()
    # the generator counts every agent=smtp row as a try; tries against a loopback-addressed MX
    # (a few tail domains get 127.x addresses) are not MX attempts for metrics.is_mx_attempt
    loop = world.truth.filter(pl.col("mx_ip").str.starts_with("127.")).select(outcomes.KEY).unique()
    rest = j.join(loop, on=list(outcomes.KEY), how="anti")
    assert (rest["tries"] == rest["attempts"]).all()
    counts = dict(got["final_status"].value_counts().iter_rows())
    assert counts == world.summary()["recipients"]
    assert int((got["first_outcome"] == "delivered").sum()) == world.summary()["first_attempt_delivered"]


def test_time_to_delivery_percentiles_match_truth(world):
    got = outcomes.outcome_summary(outcomes.recipient_outcomes(world.attempts.lazy()), by=["recipient_domain"]).collect()
    truth = (
        world.messages.filter(pl.col("final_outcome") == "delivered")
        .with_columns(((pl.col("final_ts") - pl.col("arrival")).dt.total_microseconds() / 1e6).alias("ttd"))
        .group_by("recipient_domain")
        .agg(pl.len().alias("n"), *[pl.col("ttd").quantile(q, interpolation="linear").alias(f"p{int(q * 100)}") for q in (0.5, 0.9, 0.99)])
    )
    j = got.join(truth, on="recipient_domain")
    assert j.height == truth.height
    assert (j["delivered"] == j["n"]).all()
    for p in ("p50", "p90", "p99"):
        assert j[f"ttd_{p}_s"].to_list() == pytest.approx(j[p].to_list(), rel=1e-9, abs=1e-6)
    # the Microsoft capacity episode shows: first-attempt delivery below the final rate
    ms = got.filter(pl.col("recipient_domain") == "hotmail.com").row(0, named=True)
    truth_ms = world.messages.filter(pl.col("recipient_domain") == "hotmail.com")
    assert ms["first_attempt_delivery_rate"] == pytest.approx(truth_ms["first_attempt_delivered"].mean())
    assert ms["first_attempt_delivery_rate"] < ms["final_delivery_rate"]
