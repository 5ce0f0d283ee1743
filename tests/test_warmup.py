"""Warm-up ramp vs capacity verdicts on a generated world with a known ramp and known episodes
(see ``tests/warmup_world.py``): per day, from the truth table and from the Postfix logs the
world renders, and through the notebook under papermill."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import polars as pl
import pytest

import warmup_world as ww
from deferral_kit import incidents, loaders, report, warmup
from deferral_kit.sample import Episode, generate, write
from deferral_kit.sources import InputError

ROOT = Path(__file__).resolve().parents[1]
PLAN = ROOT / "data" / "warmup_plan.example.csv"
DAYS = sorted(ww.VERDICTS)


@pytest.fixture(scope="module")
def world():
    return ww.world()


@pytest.fixture(scope="module")
def prepared(world) -> pl.LazyFrame:
    return warmup.prepare(world.attempts.lazy()).collect().lazy()


@pytest.fixture(scope="module")
def logs(world, tmp_path_factory) -> list[str]:
    return [str(p) for p in write(world, "postfix", tmp_path_factory.mktemp("warmup_logs"))]


def _truth_daily(world, where: pl.Expr) -> dict:
    t = world.truth.filter((pl.col("agent") == "smtp") & where)
    return dict(t.group_by(pl.col("ts").dt.date()).len().iter_rows())


def test_verdict_per_day_from_the_truth(prepared):
    v = warmup.verdicts(prepared)
    ms = v.filter(pl.col("provider_family") == "microsoft")
    assert dict(ms.select("day", "verdict").iter_rows()) == ww.VERDICTS
    others = v.filter(pl.col("provider_family") != "microsoft")
    assert others["verdict"].unique().to_list() == ["neither"]


def test_verdict_per_day_from_postfix_logs_with_exact_counts(world, logs):
    a = warmup.prepare(loaders.load(logs).attempts).collect().lazy()
    ms = warmup.verdicts(a).filter(pl.col("provider_family") == "microsoft")
    assert dict(ms.select("day", "verdict").iter_rows()) == ww.VERDICTS
    is_ms = pl.col("provider_family_truth") == "microsoft"
    capacity = _truth_daily(world, is_ms & (pl.col("class_truth") == "capacity") & (pl.col("outcome") == "deferred"))
    tries = _truth_daily(world, is_ms)
    throttle_warming = _truth_daily(world, is_ms & (pl.col("egress_ip") == ww.WARMING_IP) & pl.col("class_truth").is_in(["reputation", "rate_limit"])
                                    & (pl.col("outcome") == "deferred"))
    got = {d: r for d, *r in ms.select("day", "capacity", "attempts", "warming_throttle").iter_rows()}
    for d in DAYS:
        assert got[d][0] == capacity.get(d, 0), d
        assert got[d][1] == tries[d], d
    # the warming IP is warming from its first step (Tue) on; its reputation deferrals are those of Thu and Fri
    assert got[date(2026, 11, 19)][2] == throttle_warming[date(2026, 11, 19)]
    assert got[date(2026, 11, 20)][2] == throttle_warming[date(2026, 11, 20)]


def test_evidence_shows_the_numbers(prepared):
    ms = {r["day"]: r for r in warmup.verdicts(prepared).filter(pl.col("provider_family") == "microsoft").iter_rows(named=True)}
    cap = ms[date(2026, 11, 17)]
    assert (cap["active_ips"], cap["ips_with_capacity"], cap["warm_ips"], cap["warm_ips_with_capacity"], cap["warming_ips"]) == (3, 3, 2, 2, 1)
    assert cap["mx_share_with_capacity"] >= 0.5
    assert "significant); on 3 of 3 IPs (2 of 2 warm), spread" in cap["evidence"]
    assert cap["action"].startswith("hold the planned increase for this provider")
    ramp = ms[date(2026, 11, 19)]
    assert ramp["stepped_ips"] == ww.WARMING_IP and ramp["capacity"] == 0
    assert ramp["warming_throttle_per_10k"] >= 3 * ramp["warm_throttle_per_10k"]
    assert f"step today/yesterday on {ww.WARMING_IP}" in ramp["evidence"]
    assert ms[date(2026, 11, 18)]["stepped_ips"] == ""  # the step alone, without throttling, is no pressure


def test_ramp_is_inferred_from_the_logs(world, prepared):
    r = warmup.ramp(prepared)
    first = world.truth.filter((pl.col("agent") == "smtp") & (pl.col("attempt") == 1))
    truth = {(d, ip): n for d, ip, n in first.group_by(pl.col("ts").dt.date(), "egress_ip").len().iter_rows()}
    assert {(d, ip): n for d, ip, n in r.select("day", "sending_ip", "recipients").iter_rows()} == truth
    warming = r.filter(pl.col("sending_ip") == ww.WARMING_IP)
    assert warming["step"].to_list() == [False, True, True, True, True]  # doubling daily; day one has no history
    assert warming["warming"].to_list() == [False, True, True, True, True]
    assert warming["days_since_first"].to_list() == [0, 1, 2, 3, 4]
    warm = r.filter(pl.col("sending_ip").is_in(ww.WARM_IPS))
    assert not warm["step"].any() and not warm["warming"].any()


def test_capacity_on_the_warming_ip_alone_is_no_capacity_event():
    cfg = ww.config()
    cfg.episodes = [Episode("only-warming", kind="capacity", providers=["microsoft"], egress_ips=[ww.WARMING_IP], probability=0.3,
                            start="2026-11-17T00:00Z", end="2026-11-18T00:00Z")]
    a = warmup.prepare(generate(cfg).attempts.lazy()).collect().lazy()
    row = warmup.verdicts(a).filter((pl.col("provider_family") == "microsoft") & (pl.col("day") == date(2026, 11, 17))).row(0, named=True)
    assert row["verdict"] == "neither"
    assert (row["ips_with_capacity"], row["warm_ips_with_capacity"]) == (1, 0)
    assert "not spread" in row["evidence"]


def test_plan_file_and_plan_vs_actual(world, prepared, tmp_path):
    plan = warmup.load_plan(PLAN)
    assert plan.height == 10 and plan["sender"].unique().to_list() == [ww.WARMING_IP]
    assert plan.filter(pl.col("target") == "*")["planned"].to_list() == list(ww.RAMP)
    pva = warmup.plan_vs_actual(prepared, plan)
    t = world.truth.filter((pl.col("agent") == "smtp") & (pl.col("attempt") == 1) & (pl.col("egress_ip") == ww.WARMING_IP))
    everything = dict(t.group_by(pl.col("ts").dt.date()).len().iter_rows())
    ms = dict(t.filter(pl.col("provider_family_truth") == "microsoft").group_by(pl.col("ts").dt.date()).len().iter_rows())
    assert dict(pva.filter(pl.col("target") == "*").select("date", "recipients").iter_rows()) == everything
    assert dict(pva.filter(pl.col("target") == "microsoft").select("date", "recipients").iter_rows()) == ms
    assert pva.filter(pl.col("target") == "*")["actual_over_plan"].to_list() == pytest.approx([everything[d] / p for d, p in zip(DAYS, ww.RAMP)])

    # the same plan as YAML ramps
    y = tmp_path / "plan.yaml"
    y.write_text(f"ramps:\n  - ip: {ww.WARMING_IP}\n    provider: '*'\n    start: 2026-11-16\n    volumes: [60, 120, 240, 480, 960]\n"
                 f"  - ip: {ww.WARMING_IP}\n    provider: microsoft\n    start: 2026-11-16\n    volumes: [20, 40, 80, 160, 320]\n")
    assert warmup.load_plan(y).equals(plan)

    # with the plan the IP counts as warming from its first planned day
    r = warmup.ramp(prepared, plan=plan).filter(pl.col("sending_ip") == ww.WARMING_IP)
    assert r["warming"].to_list() == [True] * 5
    assert r["planned"].to_list() == list(ww.RAMP)  # the whole-traffic rows, not added to the Microsoft ones
    only_ms = warmup.ramp(prepared, plan=plan.filter(pl.col("target") == "microsoft")).filter(pl.col("sending_ip") == ww.WARMING_IP)
    assert only_ms["planned"].to_list() == [20, 40, 80, 160, 320]


def test_bad_plans_name_the_file(tmp_path):
    bad = tmp_path / "plan.csv"
    bad.write_text("ip,provider,date,planned_volume\n198.51.100.30,*,2026-13-01,10\n")
    with pytest.raises(InputError, match=r"plan\.csv: warm-up plan: row 1: date '2026-13-01' is not YYYY-MM-DD"):
        warmup.load_plan(bad)
    bad.write_text("provider,date,planned_volume\n*,2026-11-16,10\n")
    with pytest.raises(InputError, match=r"plan\.csv: warm-up plan: row 1 needs 'ip' or 'pool'"):
        warmup.load_plan(bad)
    txt = tmp_path / "plan.txt"
    txt.write_text("198.51.100.30 60\n")
    with pytest.raises(InputError, match=r"plan\.txt: warm-up plan: use a \.csv or \.yaml file"):
        warmup.load_plan(txt)
    with pytest.raises(InputError, match=r"nope\.csv: warm-up plan: cannot read"):
        warmup.load_plan(tmp_path / "nope.csv")


def test_hourly_volume_adds_up_to_the_day(prepared):
    hourly = warmup.volume(prepared, bucket="1h").collect()
    daily = warmup.volume(prepared, bucket="1d").collect()
    keys = ["sending_ip", "provider_family"]
    h = hourly.group_by(pl.col("bucket").dt.date(), *keys).agg(pl.col("attempts", "recipients", "capacity", "throttle", "first_delivered").sum())
    d = daily.with_columns(pl.col("bucket").dt.date()).select(h.columns)
    assert h.sort("bucket", *keys).equals(d.sort("bucket", *keys))
    row = daily.filter((pl.col("sending_ip") == ww.WARMING_IP) & (pl.col("provider_family") == "microsoft") & (pl.col("bucket").dt.date() == date(2026, 11, 19))).row(0, named=True)
    assert row["throttle_per_10k"] == pytest.approx(row["throttle"] / row["attempts"] * 1e4)
    assert row["first_attempt_delivery_rate"] == pytest.approx(row["first_delivered"] / row["recipients"])


def test_episodes_carry_the_day_verdict(prepared):
    days = warmup.verdicts(prepared)
    eps = incidents.detect(prepared, by=["provider_family"], response_class=["capacity", "reputation"])
    eps = warmup.episode_verdicts(prepared, eps.filter(pl.col("provider_family") == "microsoft"), days)
    cap = eps.filter(pl.col("signal") == "capacity").sort("start")
    assert cap.select(pl.col("start").dt.date(), "verdict").rows() == [(date(2026, 11, 17), "capacity_event"), (date(2026, 11, 20), "both")]
    assert set(eps.filter(pl.col("signal") == "reputation")["verdict"]) == {"ramp_pressure", "both"}


@pytest.mark.slow  # papermill run of the notebook (~25 s)
def test_notebook_records_the_verdicts(logs, tmp_path):
    rep = report.run(notebook="warmup_vs_capacity", parameters={"inputs": logs, "week": "2026-W47", "plan_file": str(PLAN), "display_tz": "Europe/Berlin"},
                     out=tmp_path / "reports", progress=False, log=lambda m: None)
    m = rep.metrics
    assert m["week"] == "2026-W47"
    assert {date.fromisoformat(r["day"]): r["verdict"] for r in m["verdicts"]} == ww.VERDICTS
    assert [r["planned"] for r in m["plan_vs_actual"] if r["target"] == "*"] == list(ww.RAMP)
    assert [r["schedule"] for r in m["retry_what_if"]] == ["seed 10/20/40/80m, jitter, 48h", "postfix defaults", "kumomta defaults", "yours"]
    assert m["retry_observed"]["recipients"] == m["retry_what_if"][0]["recipients"] > 0
    assert m["charts"] == 2
    page = rep.html.read_text(encoding="utf-8")
    assert report.external_references(page) == []
    assert "ramp_pressure" in page and "capacity_event" in page
    nb = json.loads((ROOT / "notebooks" / "warmup_vs_capacity.ipynb").read_text(encoding="utf-8"))
    assert all(c.get("outputs") == [] and c.get("execution_count") is None for c in nb["cells"] if c["cell_type"] == "code")
