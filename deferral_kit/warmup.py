"""IP warm-up ramps against provider capacity events: did our ramp cause the deferrals, or is
the provider short of resources for everyone?

Volumes.  The unit of warm-up volume is the **recipient first tried** that day (an MX try with
``attempt == 1``), the number warm-up plans and ESPs count as "emails sent"; ``attempts`` counts
every MX try (retries included), the denominator of every rate here (``metrics.is_mx_attempt``).

Ramp.  Without a plan the ramp is inferred per sending IP from its daily recipients:

* a **step** is a day whose volume exceeds ``step_ratio`` (default 1.25) times the highest daily
  volume of the previous 7 days, with at least ``min_volume`` recipients.  Against the 7-day high
  (not yesterday) so a warm IP's Monday after a quiet weekend is not a step;
* an IP is **warming** on a day when it stepped within the last ``settle_days`` (default 3) days,
  or when a plan lists it for that day and its planned volume still rises later or rose within
  ``settle_days``; otherwise it is **warm**.  The first day of the data cannot show a step.

Verdict per day and provider (family by default):

* **capacity event**: the provider's capacity replies (class ``capacity``, e.g. ``452 4.3.1``)
  are significant (at least ``min_count`` and the 95 % Wilson lower bound of the rate above the
  first band, 2 per 10,000 by default), spread over our IPs (at least ``spread`` of the active
  IPs, and a warm IP among them when warm IPs were active), and over the provider's MX hosts (the
  hosts that answered so carry at least ``spread`` of the provider's tries);
* **ramp pressure**: rate-limit / reputation deferrals (e.g. ``451 4.7.650``) on warming IPs are
  significant (same test), concentrated on them (the Wilson lower bound of their rate at least
  ``concentration`` times the warm IPs' rate), and a warming IP that got them stepped up today or the day before;
* **both**, or **neither**.  ``evidence`` says which numbers decided; ``action`` is the seed
  practice: during a capacity event hold the planned increase for that provider, resume only after
  the rate is back to baseline and queue age falls, raise concurrency gradually.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import altair as alt
import polars as pl

from .sources import InputError

SENDING_IP = "sending_ip"
THROTTLE_CLASSES = ("rate_limit", "reputation")
CAPACITY_CLASSES = ("capacity",)
VERDICTS = ("capacity_event", "ramp_pressure", "both", "neither")
PLAN_COLUMNS = {"sender": pl.String, "target": pl.String, "date": pl.Date, "planned": pl.Int64}
_IPV4 = r"((?:\d{1,3}\.){3}\d{1,3})"

ACTIONS = {
    "capacity_event": "hold the planned increase for this provider on every IP; resume only after the capacity rate is back to baseline "
                      "and queue age falls; then raise concurrency gradually",
    "ramp_pressure": "do not step the warming IP(s) again: repeat the last good volume until the rate-limit/reputation rate is back "
                     "in the watch band for a day, then resume with smaller steps",
    "both": "hold the ramp for this provider (capacity event) and cut the warming IP(s) back to the last good volume (ramp pressure); "
            "resume after the rates and queue age are back to baseline",
    "neither": "continue the plan",
}


# --- columns -----------------------------------------------------------------------------------

def sending_ip() -> pl.Expr:
    """The sending IP of a row: ``egress_ip`` when the log has it, else an IPv4 address in the
    instance name (``postfix-198.51.100.30``), else the pool, else the instance."""
    return pl.coalesce(
        pl.col("egress_ip"),
        pl.col("instance").str.extract(_IPV4, 1),
        pl.col("egress_pool"),
        pl.col("instance"),
    ).alias(SENDING_IP)


def prepare(attempts: pl.LazyFrame | pl.DataFrame, *, own_infrastructure=None) -> pl.LazyFrame:
    """Attempts with provider, class (``classify.with_classes``), ``sending_ip`` and ``day`` (UTC date)."""
    from .classify import with_classes

    lf = attempts.lazy()
    have = lf.collect_schema()
    if "response_class" not in have or "side" not in have:
        lf = with_classes(lf, own_infrastructure=own_infrastructure)
    return lf.with_columns(sending_ip(), pl.col("ts").dt.date().alias("day"))


def _counts() -> list[pl.Expr]:
    from .metrics import is_mx_attempt

    mx = is_mx_attempt().fill_null(False)
    deferred = pl.col("outcome") == "deferred"
    first = mx & (pl.col("attempt").fill_null(1) == 1)
    return [
        mx.sum().cast(pl.Int64).alias("attempts"),
        first.sum().cast(pl.Int64).alias("recipients"),
        (mx & deferred & pl.col("response_class").is_in(CAPACITY_CLASSES)).sum().cast(pl.Int64).alias("capacity"),
        (mx & deferred & pl.col("response_class").is_in(THROTTLE_CLASSES)).sum().cast(pl.Int64).alias("throttle"),
        (first & (pl.col("outcome") == "delivered")).sum().cast(pl.Int64).alias("first_delivered"),
    ]


def _per_10k(count: str, n: str = "attempts") -> pl.Expr:
    return pl.when(pl.col(n) > 0).then(pl.col(count) / pl.col(n) * 1e4).alias(f"{count}_per_10k")


def volume(attempts: pl.LazyFrame, *, bucket: str = "1d", by: Sequence[str] = (SENDING_IP, "provider_family")) -> pl.LazyFrame:
    """Per time ``bucket`` (UTC) × ``by``: ``attempts`` (MX tries, the denominator), ``recipients``
    (first tries: the warm-up volume), ``capacity`` and ``throttle`` (rate-limit + reputation)
    deferrals with their rates per 10,000 attempts, ``first_delivered`` and
    ``first_attempt_delivery_rate`` (= first_delivered / recipients).  ``attempts`` must come from
    :func:`prepare`.  Groups without MX tries are left out."""
    lf = attempts.with_columns(pl.col("ts").dt.truncate(bucket).alias("bucket"))
    keys = ["bucket", *by]
    return (
        lf.group_by(keys).agg(_counts())
        .filter(pl.col("attempts") > 0)
        .with_columns(
            _per_10k("capacity"), _per_10k("throttle"),
            pl.when(pl.col("recipients") > 0).then(pl.col("first_delivered") / pl.col("recipients")).alias("first_attempt_delivery_rate"),
        )
        .sort(keys)
    )


# --- plans -------------------------------------------------------------------------------------

def _plan_error(path: Path, msg: str) -> InputError:
    return InputError(f"{path}: warm-up plan: {msg}")


def load_plan(path: str | Path) -> pl.DataFrame:
    """A warm-up plan from CSV or YAML (see ``data/README.md``) as ``sender`` (IP or pool),
    ``target`` (provider family, provider id, recipient domain, or ``*`` for all traffic),
    ``date`` and ``planned`` (recipients that day).

    CSV columns: ``ip`` or ``pool``, ``provider`` or ``domain`` (optional: ``*``), ``date``
    (YYYY-MM-DD), ``planned_volume``.  YAML: ``plan:`` a list of such rows, and/or ``ramps:``
    a list of ``{ip|pool, provider|domain, start, volumes: [...]}`` (one volume per day from start).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise _plan_error(p, f"cannot read ({exc})") from exc
    rows: list[dict[str, Any]] = []
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            doc = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise _plan_error(p, f"not valid YAML ({exc})") from exc
        if not isinstance(doc, dict):
            raise _plan_error(p, "expected a mapping with 'plan' and/or 'ramps'")
        rows += list(doc.get("plan") or [])
        for i, ramp in enumerate(doc.get("ramps") or []):  # one ramp per IP and target: a handful
            if not isinstance(ramp, dict) or "start" not in ramp or not ramp.get("volumes"):
                raise _plan_error(p, f"ramp #{i + 1} needs 'start' and a 'volumes' list")
            start = _date(ramp["start"], p)
            for k, v in enumerate(ramp["volumes"]):
                rows.append({**{key: ramp.get(key) for key in ("ip", "pool", "provider", "domain")}, "date": start + timedelta(days=k), "planned_volume": v})
    elif p.suffix.lower() == ".csv":
        try:
            frame = pl.read_csv(p, infer_schema=False)
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise _plan_error(p, f"not a readable CSV ({exc})") from exc
    else:
        raise _plan_error(p, "use a .csv or .yaml file")
    if p.suffix.lower() in (".yaml", ".yml"):
        if not all(isinstance(r, dict) for r in rows):
            raise _plan_error(p, "every 'plan' row must be a mapping")
        keys = sorted({k for r in rows for k in r})
        frame = pl.DataFrame({k: [None if r.get(k) is None else str(r.get(k)) for r in rows] for k in keys}, schema={k: pl.String for k in keys})
    return _normalise_plan(frame, p)


def _normalise_plan(frame: pl.DataFrame, p: Path) -> pl.DataFrame:
    """Plan rows (all strings) to :data:`PLAN_COLUMNS`; the first bad row is named in the error."""
    if frame.height == 0:
        raise _plan_error(p, "no rows")

    def col(*names: str) -> pl.Expr:
        have = [pl.col(n).str.strip_chars().replace("", None) for n in names if n in frame.columns]
        return pl.coalesce(*have, pl.lit(None, dtype=pl.String)) if have else pl.lit(None, dtype=pl.String)

    volume = col("planned_volume", "planned")
    out = frame.with_row_index("_row", offset=1).select(
        "_row",
        col("ip", "pool").alias("sender"),
        col("provider", "domain").fill_null("*").str.to_lowercase().alias("target"),
        col("date").alias("_date"),
        col("date").str.slice(0, 10).str.to_date("%Y-%m-%d", strict=False).alias("date"),
        volume.alias("_volume"),
        volume.cast(pl.Float64, strict=False).cast(pl.Int64, strict=False).alias("planned"),
    )
    checks = (
        (pl.col("sender").is_null(), lambda r: f"row {r['_row']} needs 'ip' or 'pool'"),
        (pl.col("date").is_null(), lambda r: f"row {r['_row']}: date {r['_date']!r} is not YYYY-MM-DD"),
        (pl.col("planned").is_null(), lambda r: f"row {r['_row']}: planned_volume must be a number, got {r['_volume']!r}"),
    )
    for bad, message in checks:  # three checks; the first offending row is reported
        rows = out.filter(bad)
        if rows.height:
            raise _plan_error(p, message(rows.row(0, named=True)))
    return out.select(list(PLAN_COLUMNS)).sort("sender", "target", "date")


def _date(value, path: Path) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value).strip())
    except ValueError:
        raise _plan_error(path, f"ramp start {value!r} is not YYYY-MM-DD") from None


def plan_vs_actual(attempts: pl.LazyFrame, plan: pl.DataFrame) -> pl.DataFrame:
    """Each plan row with the actual ``recipients`` (first tries) and ``attempts`` that day from that
    IP or pool to that target, and ``actual_over_plan`` = recipients / planned.  A target matches a
    provider family, a provider id or a recipient domain; ``*`` matches all traffic."""
    targets = [("provider_family", pl.col("provider_family")), ("provider", pl.col("provider")), ("recipient_domain", pl.col("recipient_domain")),
               ("all", pl.lit("*"))]
    parts = []
    for sender_col in (SENDING_IP, "egress_pool"):
        for _, expr in targets:
            parts.append(
                attempts.filter(pl.col(sender_col).is_not_null())
                .group_by(pl.col("day").alias("date"), pl.col(sender_col).alias("sender"), expr.str.to_lowercase().alias("target"))
                .agg(_counts()[:2])
            )
    actual = pl.concat(pl.collect_all(parts)).group_by("date", "sender", "target").agg(pl.col("attempts").max(), pl.col("recipients").max())
    return (
        plan.join(actual, on=["date", "sender", "target"], how="left")
        .with_columns(pl.col("recipients").fill_null(0), pl.col("attempts").fill_null(0))
        .with_columns(pl.when(pl.col("planned") > 0).then(pl.col("recipients") / pl.col("planned")).alias("actual_over_plan"))
        .sort("sender", "target", "date")
    )


# --- ramp --------------------------------------------------------------------------------------

def ramp(attempts: pl.LazyFrame, *, plan: pl.DataFrame | None = None, step_ratio: float = 1.25, min_volume: int = 20,
         settle_days: int = 3) -> pl.DataFrame:
    """Per day × sending IP (every day of the data, zero-filled): ``recipients`` (first tries, all
    providers), ``attempts``, ``previous_high`` (highest daily recipients of the previous 7 days),
    ``growth`` (recipients / previous_high), ``step``, ``days_since_first`` (days since the IP's first
    traffic in the data), ``planned`` (the plan's ``*`` row for the IP, else its rows summed over
    targets; null without a plan),
    ``warming`` and ``recent_step`` (a step today or yesterday).  Rules in the module docstring."""
    daily = attempts.group_by("day", SENDING_IP).agg(_counts()[:2]).collect()
    if daily.height == 0:
        return pl.DataFrame(schema={"day": pl.Date, SENDING_IP: pl.String, "recipients": pl.Int64, "attempts": pl.Int64, "previous_high": pl.Int64,
                                    "growth": pl.Float64, "step": pl.Boolean, "days_since_first": pl.Int64, "planned": pl.Int64,
                                    "warming": pl.Boolean, "recent_step": pl.Boolean})
    days = pl.date_range(daily["day"].min(), daily["day"].max(), "1d", eager=True).alias("day").to_frame()
    grid = days.join(daily.select(SENDING_IP).unique(), how="cross").join(daily, on=["day", SENDING_IP], how="left").with_columns(
        pl.col("recipients").fill_null(0), pl.col("attempts").fill_null(0)
    ).sort(SENDING_IP, "day")
    prev_high = pl.col("recipients").shift(1).rolling_max(7, min_samples=1).over(SENDING_IP)
    first_day = pl.col("day").filter(pl.col("recipients") > 0).min().over(SENDING_IP)
    out = grid.with_columns(prev_high.alias("previous_high"), ((pl.col("day") - first_day).dt.total_days()).alias("days_since_first"))
    out = out.with_columns(
        pl.when(pl.col("previous_high") > 0).then(pl.col("recipients") / pl.col("previous_high")).alias("growth"),
    ).with_columns(
        ((pl.col("recipients") >= min_volume) & (pl.col("recipients") > step_ratio * pl.col("previous_high").fill_null(0)) & pl.col("previous_high").is_not_null())
        .alias("step")
    )
    stepped = pl.col("step").cast(pl.Int8)
    warming = stepped.rolling_max(settle_days, min_samples=1).over(SENDING_IP) > 0
    if plan is not None and plan.height:
        # the IP's whole-traffic rows ("*") when it has them, else its per-provider rows added up
        has_all = (pl.col("target") == "*").any().over("sender")
        planned = (
            plan.filter(~has_all | (pl.col("target") == "*"))
            .group_by(pl.col("sender").alias(SENDING_IP), pl.col("date").alias("day")).agg(pl.col("planned").sum())
        )
        # the plan ramps until its last increase; warming lasts settle_days beyond it
        last_rise = (
            planned.sort(SENDING_IP, "day")
            .filter(pl.col("planned") > pl.col("planned").shift(1).over(SENDING_IP))
            .group_by(SENDING_IP).agg(pl.col("day").max().alias("_last_rise"))
        )
        out = out.join(planned, on=[SENDING_IP, "day"], how="left").join(last_rise, on=SENDING_IP, how="left")
        in_plan = pl.col("planned").is_not_null() & (pl.col("day") <= pl.col("_last_rise") + pl.duration(days=settle_days - 1))
        out = out.with_columns((warming | in_plan.fill_null(False)).alias("warming")).drop("_last_rise")
    else:
        out = out.with_columns(pl.lit(None, dtype=pl.Int64).alias("planned"), warming.alias("warming"))
    out = out.with_columns((stepped.rolling_max(2, min_samples=1).over(SENDING_IP) > 0).alias("recent_step"))
    return out.select("day", SENDING_IP, "recipients", "attempts", pl.col("previous_high").cast(pl.Int64), "growth", "step", pl.col("days_since_first").cast(pl.Int64),
                      pl.col("planned").cast(pl.Int64), "warming", "recent_step").sort("day", SENDING_IP)


# --- verdicts ----------------------------------------------------------------------------------

def _significant(count: str, n: str, *, threshold: float, min_count: int) -> pl.Expr:
    from .metrics import wilson_interval

    low, _ = wilson_interval(pl.col(count), pl.col(n))
    return ((pl.col(count) >= min_count) & (low.fill_null(0.0) > threshold)).fill_null(False)


def verdicts(attempts: pl.LazyFrame, *, ramp_frame: pl.DataFrame | None = None, plan: pl.DataFrame | None = None, level: str = "provider_family",
             providers: Sequence[str] | None = None, bands=None, min_count: int = 3, spread: float = 0.5, concentration: float = 3.0,
             min_ip_attempts: int = 10, **ramp_options) -> pl.DataFrame:
    """One row per day × provider (``level``: provider_family or provider) with the verdict
    (capacity_event | ramp_pressure | both | neither), the numbers behind it, ``evidence`` in words
    and the ``action`` of the seed practice.  ``attempts`` from :func:`prepare`.

    Columns: ``day``, the provider, ``attempts``; capacity: ``capacity``, ``capacity_per_10k``,
    ``active_ips`` (IPs with at least ``min_ip_attempts`` tries), ``ips_with_capacity`` (of them, IPs
    whose own capacity rate is at least a quarter of the provider's), ``warm_ips``/``warming_ips``
    active, ``warm_ips_with_capacity``, ``mx_share_with_capacity`` (share of tries that went to MX
    hosts which answered with capacity replies); ramp: ``warming_attempts``, ``warming_throttle``,
    ``warming_throttle_per_10k``, ``warm_throttle_per_10k``, ``stepped_ips`` (warming IPs with
    throttle replies and a step today or yesterday); the booleans ``capacity_event`` and
    ``ramp_pressure``; ``verdict``, ``evidence``, ``action``.
    """
    from .metrics import DEFAULT_BANDS, is_mx_attempt, wilson_interval

    bands = bands or DEFAULT_BANDS
    threshold = bands.upper[0]
    rf = ramp_frame if ramp_frame is not None else ramp(attempts, plan=plan, **ramp_options)
    lf = attempts.filter(is_mx_attempt().fill_null(False))
    if providers:
        lf = lf.filter(pl.col(level).is_in(list(providers)) | pl.col("provider").is_in(list(providers)))
    per_ip, per_mx = pl.collect_all([
        lf.group_by("day", level, SENDING_IP).agg(_counts()),
        lf.group_by("day", level, "mx_host").agg(pl.len().alias("tries"), (pl.col("response_class").is_in(CAPACITY_CLASSES) & (pl.col("outcome") == "deferred")).sum().alias("cap")),
    ])
    per_ip = per_ip.join(rf.select("day", SENDING_IP, "warming", "recent_step"), on=["day", SENDING_IP], how="left").with_columns(
        pl.col("warming").fill_null(False), pl.col("recent_step").fill_null(False)
    )
    keys = ["day", level]
    prov_rate = (pl.col("capacity").sum() / pl.col("attempts").sum()).over(keys)
    active = pl.col("attempts") >= min_ip_attempts
    hit = active & (pl.col("capacity") > 0) & (pl.col("capacity") / pl.col("attempts") >= 0.25 * prov_rate)
    per_ip = per_ip.with_columns(hit.alias("_hit"), active.alias("_active"))
    w, warm = pl.col("warming"), ~pl.col("warming")
    agg = per_ip.group_by(keys).agg(
        pl.col("attempts").sum(),
        pl.col("capacity").sum(),
        pl.col("_active").sum().cast(pl.Int64).alias("active_ips"),
        pl.col("_hit").sum().cast(pl.Int64).alias("ips_with_capacity"),
        (pl.col("_active") & warm).sum().cast(pl.Int64).alias("warm_ips"),
        (pl.col("_active") & w).sum().cast(pl.Int64).alias("warming_ips"),
        (pl.col("_hit") & warm).sum().cast(pl.Int64).alias("warm_ips_with_capacity"),
        pl.col("attempts").filter(w).sum().cast(pl.Int64).alias("warming_attempts"),
        pl.col("throttle").filter(w).sum().cast(pl.Int64).alias("warming_throttle"),
        pl.col("attempts").filter(warm).sum().cast(pl.Int64).alias("warm_attempts"),
        pl.col("throttle").filter(warm).sum().cast(pl.Int64).alias("warm_throttle"),
        pl.col(SENDING_IP).filter(w & (pl.col("throttle") > 0) & pl.col("recent_step")).sort().alias("stepped_ips"),
        pl.col(SENDING_IP).filter(w & pl.col("_active")).sort().alias("warming_ip_list"),
    )
    mx_share = per_mx.group_by(keys).agg(
        (pl.col("tries").filter(pl.col("cap") > 0).sum() / pl.col("tries").sum()).alias("mx_share_with_capacity"),
        (pl.col("cap") > 0).sum().cast(pl.Int64).alias("mx_hosts_with_capacity"),
        pl.col("mx_host").n_unique().cast(pl.Int64).alias("mx_hosts"),
    )
    out = agg.join(mx_share, on=keys, how="left").with_columns(
        _per_10k("capacity"),
        pl.when(pl.col("warming_attempts") > 0).then(pl.col("warming_throttle") / pl.col("warming_attempts") * 1e4).alias("warming_throttle_per_10k"),
        pl.when(pl.col("warm_attempts") > 0).then(pl.col("warm_throttle") / pl.col("warm_attempts") * 1e4).alias("warm_throttle_per_10k"),
    )
    cap_sig = _significant("capacity", "attempts", threshold=threshold, min_count=min_count)
    ip_spread = (pl.col("ips_with_capacity") >= spread * pl.col("active_ips")) & ((pl.col("warm_ips") == 0) | (pl.col("warm_ips_with_capacity") > 0))
    mx_spread = pl.col("mx_share_with_capacity").fill_null(0.0) >= spread
    thr_sig = _significant("warming_throttle", "warming_attempts", threshold=threshold, min_count=min_count)
    # the warming IPs' rate must beat the warm IPs' by `concentration` beyond chance: its Wilson
    # lower bound, not the point estimate (3 of 64 is no evidence against a 76/10k baseline)
    warming_low = wilson_interval(pl.col("warming_throttle"), pl.col("warming_attempts"))[0] * 1e4
    concentrated = pl.col("warm_throttle_per_10k").is_null() | (warming_low >= concentration * pl.col("warm_throttle_per_10k"))
    stepped = pl.col("stepped_ips").list.len() > 0
    out = out.with_columns(
        (cap_sig & ip_spread & mx_spread).alias("capacity_event"),
        (thr_sig & concentrated.fill_null(False) & stepped).alias("ramp_pressure"),
        cap_sig.alias("_cap_sig"), ip_spread.alias("_ip_spread"), mx_spread.alias("_mx_spread"),
        thr_sig.alias("_thr_sig"), concentrated.fill_null(False).alias("_conc"), stepped.alias("_stepped"),
    )
    verdict = (
        pl.when(pl.col("capacity_event") & pl.col("ramp_pressure")).then(pl.lit("both"))
        .when(pl.col("capacity_event")).then(pl.lit("capacity_event"))
        .when(pl.col("ramp_pressure")).then(pl.lit("ramp_pressure"))
        .otherwise(pl.lit("neither"))
    )
    out = out.with_columns(verdict.alias("verdict")).with_columns(
        _evidence().alias("evidence"),
        pl.col("verdict").replace_strict(ACTIONS, return_dtype=pl.String).alias("action"),
    )
    return out.select(
        "day", level, "verdict", "attempts", "capacity", "capacity_per_10k", "active_ips", "ips_with_capacity", "warm_ips", "warming_ips",
        "warm_ips_with_capacity", "mx_hosts", "mx_hosts_with_capacity", "mx_share_with_capacity", "warming_attempts", "warming_throttle",
        "warming_throttle_per_10k", "warm_throttle_per_10k", pl.col("stepped_ips").list.join(", "), pl.col("warming_ip_list").list.join(", ").alias("warming_ip_list"),
        "capacity_event", "ramp_pressure", "evidence", "action",
    ).sort("day", level)


def _evidence() -> pl.Expr:
    """One sentence per day and provider naming the numbers that decided (vectorized)."""
    def yn(flag: str, yes: str, no: str) -> pl.Expr:
        return pl.when(pl.col(flag)).then(pl.lit(yes)).otherwise(pl.lit(no))

    r = lambda c: pl.col(c).fill_null(0.0).round(1).cast(pl.String)  # noqa: E731
    cap = pl.concat_str([
        pl.lit("capacity "), pl.col("capacity").cast(pl.String), pl.lit(" of "), pl.col("attempts").cast(pl.String),
        pl.lit(" tries ("), r("capacity_per_10k"), pl.lit("/10k, "), yn("_cap_sig", "significant", "not significant"),
        pl.lit("); on "), pl.col("ips_with_capacity").cast(pl.String), pl.lit(" of "), pl.col("active_ips").cast(pl.String),
        pl.lit(" IPs ("), pl.col("warm_ips_with_capacity").cast(pl.String), pl.lit(" of "), pl.col("warm_ips").cast(pl.String), pl.lit(" warm), "),
        yn("_ip_spread", "spread", "not spread"), pl.lit("; MX hosts answering so carry "),
        (pl.col("mx_share_with_capacity").fill_null(0.0) * 100).round(0).cast(pl.Int64).cast(pl.String), pl.lit("% of tries"),
    ])
    ramp_txt = pl.concat_str([
        pl.lit("rate-limit/reputation on warming IPs "), pl.col("warming_throttle").cast(pl.String), pl.lit(" of "),
        pl.col("warming_attempts").cast(pl.String), pl.lit(" ("), r("warming_throttle_per_10k"), pl.lit("/10k, "),
        yn("_thr_sig", "significant", "not significant"), pl.lit(") vs warm IPs "), r("warm_throttle_per_10k"), pl.lit("/10k ("),
        yn("_conc", "concentrated", "not concentrated"), pl.lit("); "),
        pl.when(pl.col("_stepped")).then(pl.concat_str([pl.lit("step today/yesterday on "), pl.col("stepped_ips").list.join(", ")]))
        .otherwise(pl.lit("no recent volume step on an IP that got them")),
    ])
    return pl.concat_str([cap, pl.lit(". "), ramp_txt], ignore_nulls=True)


def episode_verdicts(attempts: pl.LazyFrame, episodes: pl.DataFrame, days: pl.DataFrame, *, level: str = "provider_family") -> pl.DataFrame:
    """Episodes of :func:`deferral_kit.incidents.detect` (grouped by ``level``) with the day verdicts
    they overlap: ``verdicts`` (distinct, comma-joined) and ``verdict`` (the one of the day holding
    most of the episode's matching replies)."""
    if episodes.height == 0:
        return episodes.with_columns(pl.lit(None, dtype=pl.String).alias("day_verdicts"), pl.lit(None, dtype=pl.String).alias("verdict"))
    spans = episodes.select("episode", level, "signal", "start", "end", "count").with_columns(
        pl.date_ranges(pl.col("start").dt.date(), (pl.col("end") - pl.duration(microseconds=1)).dt.date(), "1d").alias("day")
    ).explode("day")
    joined = spans.join(days.select("day", level, "verdict", "capacity", "warming_throttle"), on=["day", level], how="left")
    weight = pl.when(pl.col("signal") == "capacity").then(pl.col("capacity")).otherwise(pl.col("warming_throttle")).fill_null(0)
    per = joined.with_columns(weight.alias("_w")).group_by("episode").agg(
        pl.col("verdict").drop_nulls().unique().sort().str.join(", ").alias("day_verdicts"),
        pl.col("verdict").sort_by("_w", descending=True).first().alias("verdict"),
    )
    return episodes.join(per, on="episode", how="left")


# --- charts ------------------------------------------------------------------------------------

def _utc_x(tz: str, field: str = "time") -> alt.X:
    return alt.X(f"{field}:T", title=f"time ({tz})", scale=alt.Scale(type="utc"), axis=alt.Axis(format="%a %d %H:%M", labelAngle=0))


def ramp_chart(ramp_frame: pl.DataFrame, *, ips: Sequence[str] | None = None, tz: str = "UTC", width: int = 760, height: int = 220) -> alt.LayerChart:
    """Daily recipients per sending IP (solid, dots on steps) and the plan (dashed) when there is one."""
    f = ramp_frame if not ips else ramp_frame.filter(pl.col(SENDING_IP).is_in(list(ips)))
    f = f.with_columns(wall_clock_day("day", tz).alias("time")).select("time", SENDING_IP, "recipients", "planned", "step", "warming")
    base = alt.Chart(f).encode(x=_utc_x(tz), color=alt.Color(f"{SENDING_IP}:N", title="sending IP"))
    tip = [alt.Tooltip(f"{SENDING_IP}:N"), alt.Tooltip("time:T", format="%Y-%m-%d"), alt.Tooltip("recipients:Q", format=","),
           alt.Tooltip("planned:Q", format=","), "step:N", "warming:N"]
    actual = base.mark_line(point=True).encode(y=alt.Y("recipients:Q", title="recipients first tried per day"), tooltip=tip)
    layers = [actual]
    if f["planned"].is_not_null().any():
        layers.append(base.transform_filter("datum.planned != null").mark_line(strokeDash=[5, 4], opacity=0.7).encode(y="planned:Q", tooltip=tip))
    return alt.layer(*layers).properties(title="Warm-up volume per IP: actual (solid) vs plan (dashed)", width=width, height=height)


def wall_clock_day(column: str, tz: str) -> pl.Expr:
    """A calendar day drawn at its UTC midnight shown as wall-clock time of ``tz``."""
    return pl.col(column).cast(pl.Datetime("us", "UTC")).dt.convert_time_zone(tz).dt.replace_time_zone("UTC")


def class_rates(attempts: pl.LazyFrame, *, provider: str | None = None, level: str = "provider_family", bucket: str = "1h",
                by: str | None = None) -> pl.DataFrame:
    """Deferral rate per 10,000 MX tries by response class (capacity, rate_limit, reputation) per
    bucket for one provider (all when None), optionally per ``by`` (e.g. sending_ip): columns
    bucket, [by], response_class, attempts, count, rate_per_10k."""
    from .metrics import is_mx_attempt

    lf = attempts.filter(is_mx_attempt().fill_null(False))
    if provider:
        lf = lf.filter((pl.col(level) == provider) | (pl.col("provider") == provider))
    keys = ["bucket", *([by] if by else [])]
    lf = lf.with_columns(pl.col("ts").dt.truncate(bucket).alias("bucket"))
    den = lf.group_by(keys).agg(pl.len().cast(pl.Int64).alias("attempts"))
    classes = [*CAPACITY_CLASSES, *THROTTLE_CLASSES]
    num = (
        lf.filter((pl.col("outcome") == "deferred") & pl.col("response_class").is_in(classes))
        .group_by(*keys, "response_class").agg(pl.len().cast(pl.Int64).alias("count"))
    )
    grid = den.join(pl.LazyFrame({"response_class": classes}), how="cross")
    return (
        grid.join(num, on=[*keys, "response_class"], how="left")
        .with_columns(pl.col("count").fill_null(0))
        .with_columns((pl.col("count") / pl.col("attempts") * 1e4).alias("rate_per_10k"))
        .sort(*keys, "response_class")
        .collect()
    )


def rates_chart(rates: pl.DataFrame, *, episodes: pl.DataFrame | None = None, tz: str = "UTC", width: int = 760, height: int = 220,
                title: str = "Deferrals by class per 10,000 tries") -> alt.LayerChart:
    """Rates by response class on the same time axis as :func:`ramp_chart`, episodes shaded."""
    from .charts import wall_clock

    f = rates.with_columns(wall_clock("bucket", tz).alias("time")).drop("bucket")
    line = alt.Chart(f).mark_line(interpolate="step-after").encode(
        x=_utc_x(tz), y=alt.Y("rate_per_10k:Q", title="per 10,000 tries", scale=alt.Scale(type="symlog", constant=1)),
        color=alt.Color("response_class:N", title="class"),
        tooltip=["response_class:N", alt.Tooltip("time:T", format="%Y-%m-%d %H:%M"), alt.Tooltip("count:Q", format=","),
                 alt.Tooltip("attempts:Q", format=","), alt.Tooltip("rate_per_10k:Q", format=".1f")],
    )
    layers = []
    if episodes is not None and episodes.height:
        shade = episodes.select(
            wall_clock("start", tz).alias("time"), wall_clock("end", tz).alias("time_end"), pl.col("signal"),
            *( [pl.col("verdict")] if "verdict" in episodes.columns else []),
        )
        layers.append(alt.Chart(shade).mark_rect(opacity=0.15, color="#b71c1c").encode(
            x=_utc_x(tz), x2="time_end:T", tooltip=["signal:N", *(["verdict:N"] if "verdict" in shade.columns else [])]))
    layers.append(line)
    return alt.layer(*layers).properties(title=title, width=width, height=height)
