"""Response rates per 10,000 attempts against remote MX hosts, with 95 % Wilson intervals and bands.

The denominator is what the seed practice counts: tries against a remote host (``agent``
smtp or lmtp, connection failures included).  Error-agent suspensions ("delivery
temporarily suspended"), local/virtual/pipe deliveries, qmgr expiry rows and loopback
content-filter hops stay in the table but are not attempts against an MX; they are left
out of rates and counted separately (:func:`non_mx_rows`, column ``non_mx_rows`` of
:func:`rates_table`).

The reductions use only filter, group-by/aggregation, join and ``dt.truncate`` on lazy
frames, so they stay within the narwhals-portable subset (no ``group_by_dynamic``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from .config import read_user, shipped
from .providers import PROVIDER_COLUMNS, is_local_hop, with_provider
from .schema import REMOTE_AGENTS

Z95 = 1.959963984540054  # two-sided 95 % normal quantile
PER = 10_000  # rates are reported per 10,000 attempts
CLASS_COLUMNS = ("response_class", "rule_id", "side")
_BUCKET = re.compile(r"^(\d+(ns|us|ms|s|m|h|d|w|mo|q|y))+$")
# the columns :func:`rate` adds after the group keys, in order
RATE_COLUMNS = ("attempts", "count", "rate_per_10k", "ci_low_per_10k", "ci_high_per_10k", "band")


# --- denominators and predicates --------------------------------------------------------------

def is_mx_attempt() -> pl.Expr:
    """True for a try against a remote MX: agent smtp/lmtp and not a loopback/socket hop.

    Connection failures count (they were tries); error-agent suspensions, local/virtual/pipe
    deliveries, qmgr-level expiry rows and content-filter hops (127.0.0.1:10024, LMTP over a
    unix socket) do not.
    """
    return pl.col("agent").is_in(list(REMOTE_AGENTS)).fill_null(False) & ~is_local_hop("mx_host", "mx_ip")


def response_is(*, code: int | Sequence[int] | None = 452, enhanced: str | Sequence[str] | None = "4.3.1",
                response_class: str | Sequence[str] | None = None, side: str | Sequence[str] | None = None) -> pl.Expr:
    """Predicate for "this attempt got that response"; never null.

    With ``response_class`` the class (from :func:`deferral_kit.classify.with_classes`) is
    matched and ``code``/``enhanced`` are ignored.  Otherwise ``code`` and ``enhanced``
    (either may be None for "any") are matched.  ``side`` (receiver/sender/unknown)
    narrows further, e.g. ``side="receiver"`` keeps an own relay's 452 4.3.1 out.
    """
    def _in(col: str, value) -> pl.Expr:
        values = [value] if isinstance(value, (str, int)) else list(value)
        return pl.col(col).is_in(values)

    if response_class is not None:
        cond = _in("response_class", response_class)
    else:
        cond = pl.lit(True)
        if code is not None:
            cond = cond & _in("smtp_code", code)
        if enhanced is not None:
            cond = cond & _in("enhanced_code", enhanced)
    if side is not None:
        cond = cond & _in("side", side)
    return cond.fill_null(False)


# --- Wilson interval -----------------------------------------------------------------------------

def wilson_interval(count: pl.Expr | str, n: pl.Expr | str, *, z: float = Z95) -> tuple[pl.Expr, pl.Expr]:
    """Wilson score interval (low, high) of the proportion ``count / n`` as expressions.

    Null when ``n`` is 0.  Unlike the normal approximation it stays inside [0, 1] and is
    not degenerate at 0 events (0 of 200 gives an upper bound of about 0.0188).
    """
    c = (pl.col(count) if isinstance(count, str) else count).cast(pl.Float64)
    nn = (pl.col(n) if isinstance(n, str) else n).cast(pl.Float64)
    p = c / nn
    z2 = z * z
    denom = 1.0 + z2 / nn
    centre = (p + z2 / (2.0 * nn)) / denom
    half = (z / denom) * ((p * (1.0 - p) / nn + z2 / (4.0 * nn * nn)).clip(lower_bound=0.0)).sqrt()
    # at 0 (or n) events the bound is exactly 0 (or 1); the formula leaves rounding noise there
    low = pl.when(nn <= 0).then(None).when(c <= 0).then(0.0).otherwise((centre - half).clip(0.0, 1.0))
    high = pl.when(nn <= 0).then(None).when(c >= nn).then(1.0).otherwise((centre + half).clip(0.0, 1.0))
    return low, high


def wilson(count: int, n: int, *, z: float = Z95) -> tuple[float, float]:
    """Wilson interval for plain numbers (used in reports and tests)."""
    if n <= 0:
        return (math.nan, math.nan)
    p = count / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p * (1 - p) / n + z2 / (4 * n * n), 0.0))
    low = 0.0 if count <= 0 else max(0.0, centre - half)
    high = 1.0 if count >= n else min(1.0, centre + half)
    return low, high


# --- bands ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Bands:
    """Ordered threshold bands.  ``upper`` holds each band's inclusive upper bound as a
    proportion (0.0002 = 0.02 % = 2 per 10,000); the last band's is None (unbounded)."""

    names: tuple[str, ...]
    upper: tuple[float | None, ...]

    def __post_init__(self):
        if not self.names or len(self.names) != len(self.upper):
            raise ValueError("bands need at least one name and one upper bound per band")
        bounds = [u for u in self.upper[:-1]]
        if any(u is None for u in bounds) or self.upper[-1] is not None:
            raise ValueError("every band but the last needs an upper bound; the last has none")
        if any(b2 <= b1 for b1, b2 in zip(bounds, bounds[1:])) or any(b < 0 for b in bounds):
            raise ValueError(f"band bounds must be non-negative and increasing: {bounds}")

    @classmethod
    def from_mapping(cls, doc, origin: str = "bands") -> Bands:
        items = doc.get("bands") if isinstance(doc, dict) else doc
        if not items:
            raise ValueError(f"{origin}: no 'bands' list")
        names, upper = [], []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or "name" not in item:
                raise ValueError(f"{origin}: band #{i + 1} needs a 'name'")
            keys = [k for k in ("max_per_10k", "max_percent", "max_proportion") if item.get(k) is not None]
            if len(keys) > 1:
                raise ValueError(f"{origin}: band {item['name']!r} has more than one of {keys}")
            if keys:
                value = float(item[keys[0]])
                value = {"max_per_10k": value / PER, "max_percent": value / 100.0, "max_proportion": value}[keys[0]]
            else:
                value = None
            names.append(str(item["name"]))
            upper.append(value)
        try:
            return cls(tuple(names), tuple(upper))
        except ValueError as exc:
            raise ValueError(f"{origin}: {exc}") from exc

    def to_frame(self) -> pl.DataFrame:
        """The bands as a small frame (name, lower/upper per 10,000) for charts and legends."""
        lows = [0.0] + [u * PER for u in self.upper[:-1]]
        ups = [None if u is None else u * PER for u in self.upper]
        return pl.DataFrame({"band": list(self.names), "lower_per_10k": lows, "upper_per_10k": ups},
                            schema={"band": pl.String, "lower_per_10k": pl.Float64, "upper_per_10k": pl.Float64})


def _shipped_bands() -> Bands:
    return Bands.from_mapping(*shipped("bands.yaml"))


DEFAULT_BANDS = _shipped_bands()


def load_bands(path: str | Path | None = None) -> Bands:
    """Bands from a YAML file shaped like ``deferral_kit/data/bands.yaml`` (None: the defaults)."""
    if path is None:
        return DEFAULT_BANDS
    return Bands.from_mapping(read_user(path, "bands"), str(path))


def band_expr(rate_proportion_expr: pl.Expr, bands: Bands | None = None) -> pl.Expr:
    """Band name of a rate given as a proportion; a rate equal to a bound stays in the lower band.
    Null rate -> null band."""
    b = bands or DEFAULT_BANDS
    r = rate_proportion_expr
    # tolerance so that 2/10,000 computed from counts equals a bound written as 0.02 %
    expr = None
    for name, up in zip(b.names[:-1], b.upper[:-1]):
        cond = r <= up * (1 + 1e-9)
        expr = pl.when(cond).then(pl.lit(name)) if expr is None else expr.when(cond).then(pl.lit(name))
    last = pl.lit(b.names[-1])
    expr = last if expr is None else expr.otherwise(last)
    return pl.when(r.is_null()).then(pl.lit(None, dtype=pl.String)).otherwise(expr)


# --- rates ------------------------------------------------------------------------------------

def _check_bucket(bucket: str | None) -> None:
    if bucket is not None and not _BUCKET.match(bucket):
        raise ValueError(f"bucket {bucket!r} is not a duration such as 5m, 1h, 1d")


def enrich(attempts: pl.LazyFrame | pl.DataFrame, *, need: Sequence[str] = ()) -> pl.LazyFrame:
    """Add provider / classification columns when ``need`` names some that are missing."""
    lf = attempts.lazy()
    have = lf.collect_schema()
    missing = [c for c in need if c not in have]
    if any(c in CLASS_COLUMNS for c in missing):
        from .classify import with_classes

        return with_classes(lf)  # also adds the provider columns
    if any(c in PROVIDER_COLUMNS for c in missing):
        return with_provider(lf)
    return lf


def _keys(by: Sequence[str] | str, bucket: str | None) -> list[str]:
    by = [by] if isinstance(by, str) else list(by)
    return (["bucket"] if bucket else []) + by


def rate(attempts: pl.LazyFrame | pl.DataFrame, *, where: pl.Expr, by: Sequence[str] | str = (), bucket: str | None = None,
         denominator: pl.Expr | None = None, bands: Bands | None = None) -> pl.LazyFrame:
    """Count and rate per 10,000 attempts of rows matching ``where``, per ``by`` group and time bucket.

    Denominator (``attempts``): rows matching ``denominator`` (default :func:`is_mx_attempt`).
    ``count``: those of them matching ``where``.  ``rate_per_10k`` = 10,000 x count / attempts,
    ``ci_low_per_10k``/``ci_high_per_10k`` its 95 % Wilson interval, ``band`` the threshold
    band of the rate.  ``bucket`` (e.g. "5m", "1h", "1d") truncates ``ts`` in UTC into a
    ``bucket`` column.  A bucket with attempts but no match appears with count 0; buckets
    without attempts do not appear.  ``by`` may name provider or classification columns;
    they are derived when missing.  Rows: bucket ascending, then count descending.
    """
    _check_bucket(bucket)
    keys = _keys(by, bucket)
    den = is_mx_attempt() if denominator is None else denominator
    need = [k for k in keys if k != "bucket"] + list(where.meta.root_names()) + list(den.meta.root_names())
    lf = enrich(attempts, need=need).filter(den.fill_null(False))
    if bucket:
        lf = lf.with_columns(pl.col("ts").dt.truncate(bucket).alias("bucket"))
    lf = lf.with_columns(where.fill_null(False).cast(pl.Int64).alias("_hit"))
    aggs = [pl.len().cast(pl.Int64).alias("attempts"), pl.col("_hit").sum().cast(pl.Int64).alias("count")]
    out = lf.group_by(keys).agg(aggs) if keys else lf.select(aggs).filter(pl.col("attempts") > 0)
    low, high = wilson_interval("count", "attempts")
    p = pl.col("count") / pl.col("attempts")
    out = out.with_columns(
        (p * PER).alias("rate_per_10k"),
        (low * PER).alias("ci_low_per_10k"),
        (high * PER).alias("ci_high_per_10k"),
        band_expr(p, bands).alias("band"),
    )
    return _rate_order(out.select(*keys, *RATE_COLUMNS), keys)


def _rate_order(lf: pl.LazyFrame, keys: Sequence[str]) -> pl.LazyFrame:
    """The row order of :func:`rate` and :func:`rates_table`: bucket ascending, then count and
    attempts descending, then the other keys ascending (nulls last)."""
    bucketed = "bucket" in keys
    others = [k for k in keys if k != "bucket"]
    return lf.sort(
        [*(["bucket"] if bucketed else []), "count", "attempts", *others],
        descending=[*([False] if bucketed else []), True, True, *[False] * len(others)],
        nulls_last=True,
    )


def non_mx_rows(attempts: pl.LazyFrame | pl.DataFrame, *, by: Sequence[str] | str = (), bucket: str | None = None,
                denominator: pl.Expr | None = None) -> pl.LazyFrame:
    """Rows left out of the rate denominator, counted per group, bucket and ``reason``:
    the agent (error, local, virtual, pipe, qmgr, ...) or ``loopback`` for content-filter /
    local-socket hops of an smtp/lmtp agent.  Columns: bucket?, by..., reason, rows."""
    _check_bucket(bucket)
    keys = _keys(by, bucket)
    den = is_mx_attempt() if denominator is None else denominator
    lf = enrich(attempts, need=[k for k in keys if k != "bucket"]).filter(~den.fill_null(False))
    if bucket:
        lf = lf.with_columns(pl.col("ts").dt.truncate(bucket).alias("bucket"))
    reason = (
        pl.when(pl.col("agent").is_in(list(REMOTE_AGENTS)) & is_local_hop("mx_host", "mx_ip"))
        .then(pl.lit("loopback"))
        .otherwise(pl.col("agent").fill_null("unknown"))
        .alias("reason")
    )
    return (
        lf.with_columns(reason)
        .group_by([*keys, "reason"])
        .agg(pl.len().cast(pl.Int64).alias("rows"))
        .sort([*keys, "rows"], descending=[*[False] * len(keys), True], nulls_last=True)
    )


def rates_table(attempts: pl.LazyFrame | pl.DataFrame, *, by: Sequence[str] | str = ("recipient_domain",), bucket: str | None = None,
                code: int | None = 452, enhanced: str | None = "4.3.1", response_class: str | None = None,
                bands: Bands | None = None) -> pl.LazyFrame:
    """What ``deferral-kit rates`` prints: :func:`rate` of a reply code / enhanced code (or of a
    response class, which then replaces the code match) per group and bucket, plus
    ``non_mx_rows``: rows of the same group and bucket left out of the denominator
    (suspensions, local deliveries, loopback hops).  ``by`` may include ``provider``,
    ``provider_family``, ``response_class``, ``side``; they are derived when missing.

    Every group and bucket with any row appears.  One whose rows are all non-MX rows (a
    destination only suspended by the error agent, an hour with only suspensions) has
    attempts 0, count 0, and a null rate, interval and band (there is no denominator);
    its ``non_mx_rows`` says how much traffic it had.  Columns and row order are those of
    :func:`rate` plus ``non_mx_rows``.
    """
    keys = _keys(by, bucket)
    need = [k for k in keys if k != "bucket"] + (list(CLASS_COLUMNS) if response_class else [])
    lf = enrich(attempts, need=need)
    where = response_is(code=code, enhanced=enhanced, response_class=response_class)
    table = rate(lf, where=where, by=by, bucket=bucket, bands=bands)
    excluded = non_mx_rows(lf, by=by, bucket=bucket)
    if not keys:  # one constant key, so that no rows at all still gives an empty table
        on = ["_all"]
        table, excluded = (f.with_columns(pl.lit(0, dtype=pl.Int8).alias("_all")) for f in (table, excluded))
    else:
        on = keys
    excluded = excluded.group_by(on).agg(pl.col("rows").sum().cast(pl.Int64).alias("non_mx_rows"))
    # full join: a group or bucket with only non-MX rows has no row in ``table`` and must not be lost
    table = table.join(excluded, on=on, how="full", coalesce=True, nulls_equal=True).with_columns(
        pl.col("attempts", "count", "non_mx_rows").fill_null(0).cast(pl.Int64)
    )
    return _rate_order(table.select(*keys, *RATE_COLUMNS, "non_mx_rows"), keys)
