"""Which mailbox provider answered: Microsoft consumer, Microsoft 365, Google, Yahoo/AOL, Apple, ...

The provider comes from the MX host that was tried, not from the recipient domain: a
Microsoft 365 tenant on a vanity domain is Microsoft, and ``outlook.com`` mail relayed
through our own smarthost is not a Microsoft reply.  Only when a row has no MX host (ESP
events) do we fall back to markers in the reply text, then to well-known recipient
domains; ``provider_basis`` records which of ``mx`` / ``reply`` / ``domain`` was used.

The table is data (``data/providers.yaml``); a user YAML file with the same shape adds
providers that are tried before the shipped ones.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from .config import read_user, shipped

UNKNOWN = "unknown"  # no MX host and nothing else to go on
OTHER = "other"  # an MX host that is not in the table
LOCAL = "local"  # loopback / unix-socket hops (content filters, local LMTP): not a provider at all

# Loopback and local-socket "relays" (amavis 127.0.0.1:10024, dovecot LMTP over a socket,
# Postfix unix:private/...): hops inside our own host, never an MX.
LOCAL_HOP_PATTERN = r"(?i)^(\[?(127\.\d{1,3}\.\d{1,3}\.\d{1,3}|::1|ipv6:::1)\]?|localhost(\.localdomain)?|unix:.*|private/.*|public/.*|/.*)$"


@dataclass(frozen=True)
class Provider:
    """One row of the provider table."""

    id: str
    family: str
    mx_suffixes: tuple[str, ...] = ()
    reply: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProviderRules:
    """The ordered provider table; the first provider that matches wins."""

    providers: tuple[Provider, ...] = field(default_factory=tuple)

    def __add__(self, other: ProviderRules) -> ProviderRules:
        return ProviderRules(self.providers + other.providers)


def _parse(doc: Mapping | Sequence, origin: str) -> ProviderRules:
    items = doc.get("providers", []) if isinstance(doc, Mapping) else doc
    out = []
    for i, item in enumerate(items or []):
        if not isinstance(item, Mapping) or "id" not in item:
            raise ValueError(f"{origin}: provider #{i + 1} needs at least an 'id'")
        for rx in item.get("reply") or ():
            try:
                re.compile(rx)
            except re.error as exc:
                raise ValueError(f"{origin}: provider {item['id']!r}: bad reply regex {rx!r}: {exc}") from exc
        out.append(
            Provider(
                id=str(item["id"]),
                family=str(item.get("family") or item["id"]),
                mx_suffixes=tuple(str(s).lower().rstrip(".") for s in item.get("mx_suffixes") or ()),
                reply=tuple(str(r) for r in item.get("reply") or ()),
                domains=tuple(str(d).lower().rstrip(".") for d in item.get("domains") or ()),
            )
        )
    return ProviderRules(tuple(out))


def default_rules() -> ProviderRules:
    """The shipped provider table (``deferral_kit/data/providers.yaml``)."""
    return _parse(*shipped("providers.yaml"))


def load_provider_rules(path: str | Path | None = None, *, extend: bool = True) -> ProviderRules:
    """Provider table from a user YAML file (same shape as the shipped one).

    With ``extend`` (default) the user's providers are tried first and the shipped table
    after them, so a user file only needs the providers it adds or overrides.
    """
    if path is None:
        return default_rules()
    user = _parse(read_user(path, "provider rules"), str(path))
    return user + default_rules() if extend else user


def _coerce(rules) -> ProviderRules:
    if rules is None:
        return default_rules()
    if isinstance(rules, ProviderRules):
        return rules
    if isinstance(rules, (str, Path)):
        return load_provider_rules(rules)
    return _parse(rules, "provider rules") + default_rules()


def normalise_host(expr: pl.Expr) -> pl.Expr:
    """Lower case, no trailing dot, no surrounding whitespace (MX names as logged vary)."""
    return expr.str.strip_chars().str.to_lowercase().str.strip_chars_end(".")


def is_local_hop(mx_host: pl.Expr | str = "mx_host", mx_ip: pl.Expr | str | None = "mx_ip") -> pl.Expr:
    """True for loopback / local-socket relays (content-filter hops, local LMTP); never null."""
    host = pl.col(mx_host) if isinstance(mx_host, str) else mx_host
    hit = host.str.contains(LOCAL_HOP_PATTERN).fill_null(False)
    if mx_ip is not None:
        ip = pl.col(mx_ip) if isinstance(mx_ip, str) else mx_ip
        hit = hit | ip.str.contains(LOCAL_HOP_PATTERN).fill_null(False)
    return hit


def _suffix_regex(suffixes: Sequence[str]) -> str:
    alts = "|".join(re.escape(s.lstrip(".")) for s in suffixes)
    return rf"(^|\.)({alts})$"


def _chain(pairs: list[tuple[pl.Expr, str]], otherwise: pl.Expr) -> pl.Expr:
    if not pairs:
        return otherwise
    cond, value = pairs[0]
    expr = pl.when(cond).then(pl.lit(value))
    for cond, value in pairs[1:]:
        expr = expr.when(cond).then(pl.lit(value))
    return expr.otherwise(otherwise)


def provider_of(mx_host_expr: pl.Expr | str = "mx_host", *, rules=None) -> pl.Expr:
    """Provider id from an MX host expression alone: a table id, ``local`` for loopback or
    socket hops, ``other`` for any other host, ``unknown`` when the host is null."""
    table = _coerce(rules)
    host = normalise_host(pl.col(mx_host_expr) if isinstance(mx_host_expr, str) else mx_host_expr)
    pairs = [(host.str.contains(LOCAL_HOP_PATTERN), LOCAL)]
    pairs += [(host.str.contains(_suffix_regex(p.mx_suffixes)), p.id) for p in table.providers if p.mx_suffixes]
    return pl.when(host.is_null() | (host == "")).then(pl.lit(UNKNOWN)).otherwise(_chain(pairs, pl.lit(OTHER)))


def family_of(provider_expr: pl.Expr | str = "provider", *, rules=None) -> pl.Expr:
    """Provider family (microsoft, google, yahoo, apple, ..., other, local, unknown) of a provider id."""
    table = _coerce(rules)
    mapping = {p.id: p.family for p in table.providers}
    prov = pl.col(provider_expr) if isinstance(provider_expr, str) else provider_expr
    return prov.replace_strict(mapping, default=prov, return_dtype=pl.String)


def with_provider(attempts: pl.LazyFrame, *, rules=None) -> pl.LazyFrame:
    """Add ``provider``, ``provider_family`` and ``provider_basis`` (mx / reply / domain, null
    when nothing matched) to an attempts (or connection-events) frame.

    ``rules``: None for the shipped table, a YAML path (tried before the shipped table), a
    :class:`ProviderRules`, or a list of provider mappings.
    """
    table = _coerce(rules)
    lf = attempts.lazy()
    have = lf.collect_schema()
    lf = lf.drop([c for c in PROVIDER_COLUMNS if c in have])
    # The reply and domain fallbacks only matter without an MX host; blanking them elsewhere
    # keeps the set of distinct keys small, so normalising and the regexes run once per
    # distinct key, not once per row.
    raw_no_host = pl.col("mx_host").is_null() | (pl.col("mx_host").str.len_bytes() == 0)
    keys = {
        "_k_host": pl.col("mx_host"),
        "_k_reply": pl.when(raw_no_host).then(pl.col("response")).otherwise(None) if "response" in have else pl.lit(None, dtype=pl.String),
        "_k_domain": pl.when(raw_no_host).then(pl.col("recipient_domain")).otherwise(None)
        if "recipient_domain" in have else pl.lit(None, dtype=pl.String),
        # Postfix names the LMTP socket in the address slot (relay=mail.example.org[private/dovecot-lmtp]),
        # so a real-looking host name can still be a hop inside our own machine.
        "_k_local_ip": is_local_hop(pl.lit(None, dtype=pl.String), "mx_ip") if "mx_ip" in have else pl.lit(False),
    }
    lf = lf.with_columns(**keys)

    reply = pl.col("_k_reply")
    reply_pairs = [(reply.str.contains("(?i)" + "|".join(f"(?:{r})" for r in p.reply)), p.id) for p in table.providers if p.reply]
    from_reply = _chain(reply_pairs, pl.lit(None, dtype=pl.String))
    dom = normalise_host(pl.col("_k_domain"))
    from_domain = _chain([(dom.is_in(list(p.domains)), p.id) for p in table.providers if p.domains], pl.lit(None, dtype=pl.String))
    # A reply marker often names only the family ("...prod.outlook.com" is Microsoft, consumer or
    # 365 alike); when the recipient domain names a provider of that same family, the domain is the
    # more specific answer, so outlook.com rows do not split into "microsoft" and "microsoft_consumer".
    family = {p.id: p.family for p in table.providers}
    same_family = from_reply.replace_strict(family, default=None, return_dtype=pl.String) == from_domain.replace_strict(
        family, default=None, return_dtype=pl.String)
    no_host_provider = pl.when(same_family.fill_null(False)).then(from_domain).otherwise(pl.coalesce(from_reply, from_domain))
    host = normalise_host(pl.col("_k_host"))
    has_host = host.is_not_null() & (host != "")
    lookup = (
        lf.select(list(keys)).unique()
        .with_columns(
            pl.when(pl.col("_k_local_ip")).then(pl.lit(LOCAL))
            .when(has_host).then(provider_of(pl.col("_k_host"), rules=table))
            .otherwise(pl.coalesce(no_host_provider, pl.lit(UNKNOWN))).alias("provider"),
            pl.when(has_host | pl.col("_k_local_ip")).then(pl.lit("mx"))
            .when(from_reply.is_not_null()).then(pl.lit("reply"))
            .when(from_domain.is_not_null()).then(pl.lit("domain"))
            .otherwise(pl.lit(None, dtype=pl.String)).alias("provider_basis"),
        )
        .with_columns(family_of("provider", rules=table).alias("provider_family"))
    )
    return (
        lf.join(lookup, on=list(keys), how="left", nulls_equal=True, maintain_order="left")
        .drop(list(keys))
        .select(pl.exclude(PROVIDER_COLUMNS), *PROVIDER_COLUMNS)
    )


PROVIDER_COLUMNS = ("provider", "provider_family", "provider_basis")
