"""Retry what-if on cases worked out by hand, then on the generated warm-up world's capacity event.

Hand cases: a recipient first deferred at 00:00 (queued then), the receiver deferring every try
in [00:00, 01:00) and accepting after.

* seed 10/20/40/80 min (no jitter): retries at 00:10 and 00:30 (deferred), 01:10 delivered:
  4200 s, 3 tries in the episode (the first included), 3 retries;
* Postfix (300-4000 s following the age, scan every 300 s): 00:05, 00:10, 00:20, 00:40 deferred,
  01:20 delivered: 4800 s, 5 tries in the episode, 5 retries;
* KumoMTA (20 min doubling): 00:20 deferred, 01:00 delivered (the window is half-open): 3600 s,
  2 tries, 2 retries.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import polars as pl
import pytest

import warmup_world as ww
from deferral_kit import retry, warmup

T = datetime(2026, 11, 18, tzinfo=timezone.utc)
HOUR = [(T, T + timedelta(hours=1), 1.0)]
SEED = retry.Schedule("seed", intervals=(600, 1200, 2400, 4800), max_age=48 * 3600)


def _rcpts(*pairs) -> pl.DataFrame:
    """(t0, queued_at) pairs as offsets in minutes from T."""
    dt = pl.Datetime("us", "UTC")
    return pl.DataFrame({"t0": [T + timedelta(minutes=a) for a, _ in pairs], "queued_at": [T + timedelta(minutes=q) for _, q in pairs]},
                        schema={"t0": dt, "queued_at": dt})


def _by_name(frame: pl.DataFrame) -> dict:
    return {r["schedule"]: r for r in frame.iter_rows(named=True)}


def test_one_hour_outage_by_hand():
    out = _by_name(retry.simulate(_rcpts((0, 0)), retry.windows(HOUR), [SEED, retry.POSTFIX, retry.KUMOMTA]))
    got = {k: (v["ttd_p50_s"], v["ttd_p90_s"], v["attempts_in_episode"], v["retries_per_recipient"], v["expected_expired"]) for k, v in out.items()}
    assert got == {
        "seed": (4200.0, 4200.0, 3.0, 3.0, 0.0),
        "postfix defaults": (4800.0, 4800.0, 5.0, 5.0, 0.0),
        "kumomta defaults": (3600.0, 3600.0, 2.0, 2.0, 0.0),
    }


def test_half_deferred_expected_values():
    # each try in the hour is deferred with p 0.5: delivered at 10 min (0.5), 30 min (0.25), 70 min (0.25)
    r = retry.simulate(_rcpts((0, 0)), retry.windows([(T, T + timedelta(hours=1), 0.5)]), [SEED]).row(0, named=True)
    assert (r["ttd_p50_s"], r["ttd_p90_s"]) == (600.0, 4200.0)
    assert r["attempts_in_episode"] == pytest.approx(1 + 1 + 0.5)
    assert r["retries_per_recipient"] == pytest.approx(1 + 0.5 + 0.25)
    assert r["mean_ttd_s"] == pytest.approx(0.5 * 600 + 0.25 * 1800 + 0.25 * 4200)


def test_recipients_are_vectorized_and_timed_from_the_queue():
    # B: queued 00:20, first deferred 00:30, retried 00:40 (deferred), 01:00 delivered = 40 min after queueing
    r = retry.simulate(_rcpts((0, 0), (30, 20)), retry.windows(HOUR), [SEED]).row(0, named=True)
    assert (r["recipients"], r["ttd_p50_s"], r["ttd_p90_s"]) == (2, 2400.0, 4200.0)
    assert r["attempts_in_episode"] == 5.0 and r["retries_per_recipient"] == 2.5


def test_postfix_waits_for_the_next_queue_scan():
    # first try 00:01 (age 0): due 00:06, picked up by the 00:10 scan, after the 8-minute outage
    r = retry.simulate(_rcpts((1, 1)), retry.windows([(T, T + timedelta(minutes=8), 1.0)]), [retry.POSTFIX]).row(0, named=True)
    assert r["ttd_p50_s"] == 540.0 and r["retries_per_recipient"] == 1.0


def test_three_day_outage_expires_the_short_lifetime():
    out = _by_name(retry.simulate(_rcpts((0, 0)), retry.windows([(T, T + timedelta(days=3), 1.0)]), [SEED, retry.POSTFIX, retry.KUMOMTA]))
    seed = out["seed"]
    # 10+20+40 min, then every 80 min until 48 h: 3 + 35 retries, then expiry
    assert (seed["ttd_p50_s"], seed["expected_expired"], seed["at_risk"], seed["retries_per_recipient"]) == (None, 1.0, 1, 38.0)
    # Postfix: 5, 10, 20, 40, 80 min, 150 min (4000 s rounded to the scan), then every 4200 s: first past 72 h at 261,000 s
    assert (out["postfix defaults"]["ttd_p50_s"], out["postfix defaults"]["retries_per_recipient"], out["postfix defaults"]["at_risk"]) == (261000.0, 66.0, 0)
    # KumoMTA: 20 min x (2^k - 1) passes 72 h at k = 8: 5100 min
    assert (out["kumomta defaults"]["ttd_p50_s"], out["kumomta defaults"]["retries_per_recipient"]) == (306000.0, 8.0)


def test_jitter_is_seeded_and_bounded():
    s = retry.Schedule("jittered", intervals=(600, 1200, 2400, 4800), jitter=0.1, max_age=48 * 3600)
    a = retry.simulate(_rcpts((0, 0), (0, 0), (0, 0)), retry.windows(HOUR), [s], seed=7)
    b = retry.simulate(_rcpts((0, 0), (0, 0), (0, 0)), retry.windows(HOUR), [s], seed=7)
    assert a.equals(b)
    r = a.row(0, named=True)
    # retries near 10, 30 and 70 min: the third is always after the hour (at least 63 min)
    assert 63 * 60 <= r["ttd_p50_s"] <= 77 * 60 and r["attempts_in_episode"] == 9.0


def test_user_schedule_from_durations():
    s = retry.schedule("mine", "5m, 15m,1h", max_age="72h", jitter=0.2)
    assert (s.intervals, s.max_age, s.jitter, s.kind) == ((300.0, 900.0, 3600.0), 259200.0, 0.2, "list")
    with pytest.raises(ValueError, match="kind must be list, exponential or postfix"):
        retry.Schedule("x", kind="linear")
    with pytest.raises(ValueError, match="needs positive intervals"):
        retry.Schedule("x", intervals=())


def test_what_if_on_the_observed_capacity_event():
    world = ww.world()
    a = warmup.prepare(world.attempts.lazy()).collect().lazy()
    ms = a.filter(pl.col("provider_family") == "microsoft")
    start, end = datetime(2026, 11, 17, 13, tzinfo=timezone.utc), datetime(2026, 11, 17, 17, tzinfo=timezone.utc)
    where = (pl.col("response_class") == "capacity") & (pl.col("outcome") == "deferred")
    rcpts = retry.affected(ms, where=where, start=start, end=end)
    t = world.truth.filter((pl.col("agent") == "smtp") & (pl.col("provider_family_truth") == "microsoft"))
    first_cap = t.filter((pl.col("class_truth") == "capacity") & (pl.col("outcome") == "deferred")).group_by("message_key", "recipient").agg(pl.col("ts").min())
    assert rcpts.height == first_cap.filter(pl.col("ts").is_between(start, end, closed="left")).height
    curve = retry.deferral_curve(ms, where=where, start=start, end=end, bucket="1h")
    in_win = t.filter(pl.col("ts").is_between(start, end, closed="left"))
    assert curve["attempts"].sum() == in_win.height
    assert curve["count"].sum() == in_win.filter((pl.col("class_truth") == "capacity") & (pl.col("outcome") == "deferred")).height
    out = _by_name(retry.what_if(ms, where=where, start=start, end=end))
    assert {r["recipients"] for r in out.values()} == {rcpts.height}
    # a 4-hour event: nobody nears a 48 h lifetime, and the first try of each recipient is in the episode
    assert all(r["expected_expired"] == 0.0 and r["attempts_in_episode"] >= rcpts.height for r in out.values())
    seen = retry.observed(rcpts)
    assert seen["recipients"] == rcpts.height and seen["delivered"] + seen["bounced"] + seen["expired"] + seen["pending"] == rcpts.height
