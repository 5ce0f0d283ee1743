"""Small polars frames as HTML tables that are safe to publish.

Every cell is HTML-escaped (reply texts come from remote servers and may contain markup),
email addresses are masked unless the caller allows them, numbers are formatted for reading
and times are shown in the report's display zone.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence

import polars as pl

from .textnorm import mask_addresses

MAX_ROWS = 200


class HtmlTable:
    """An HTML fragment that notebooks display as HTML (``_repr_html_``) and tests read as ``.html``."""

    def __init__(self, markup: str):
        self.html = markup

    def _repr_html_(self) -> str:
        return self.html

    def __str__(self) -> str:
        return self.html


def _escape(expr: pl.Expr) -> pl.Expr:
    # html.escape's replacements, vectorized; & first so the others are not double-escaped
    for ch, ent in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ('"', "&quot;"), ("'", "&#x27;")):
        expr = expr.str.replace_all(ch, ent, literal=True)
    return expr


def _cell_text(name: str, dtype: pl.DataType, fmt: str | None, tz: str) -> pl.Expr:
    c = pl.col(name)
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone is not None:
            c = c.dt.convert_time_zone(tz)
        return c.dt.strftime(fmt or "%Y-%m-%d %H:%M")
    if fmt == "percent":
        return (c * 100).round(2).cast(pl.String) + "%"
    if dtype.is_integer():
        # thousands separators: digits grouped in threes from the right
        s = c.abs().cast(pl.String)
        grouped = s.str.reverse().str.replace_all(r"(\d{3})", "$1,").str.reverse().str.strip_prefix(",")
        return pl.when(c < 0).then("-" + grouped).otherwise(grouped)
    if dtype.is_float():
        return c.round(int(fmt) if fmt and fmt.isdigit() else 2).cast(pl.String)
    return c.cast(pl.String)


def html_table(
    frame: pl.DataFrame,
    *,
    caption: str | None = None,
    formats: Mapping[str, str] | None = None,
    show_addresses: bool = False,
    tz: str = "UTC",
    max_rows: int = MAX_ROWS,
    headers: Mapping[str, str] | None = None,
    note: str | None = None,
) -> HtmlTable:
    """Render a small frame as an escaped HTML table.

    ``formats``: per column, ``percent`` (a proportion shown as %), a digit count for floats,
    or a strftime pattern for datetimes.  ``tz``: zone in which times are shown.
    ``show_addresses``: keep email addresses as they are (default: local parts masked).
    A ``band`` column gets a class per band for colouring.  At most ``max_rows`` rows are shown.
    """
    formats = dict(formats or {})
    headers = dict(headers or {})
    shown = frame.head(max_rows)
    strings = [n for n, d in shown.schema.items() if d == pl.String]
    if strings and not show_addresses:
        shown = shown.with_columns(mask_addresses(pl.col(n)).alias(n) for n in strings)
    numeric = {n for n, d in shown.schema.items() if d.is_numeric()}
    cells = []
    for name, dtype in shown.schema.items():
        text = _escape(_cell_text(name, dtype, formats.get(name), tz).fill_null(""))
        cls = ' class="num"' if name in numeric else ""
        if name == "band":
            cls = pl.concat_str(pl.lit(' class="dk-band-'), _escape(pl.col("band").fill_null("")), pl.lit('"'))
            cells.append(pl.concat_str(pl.lit("<td"), cls, pl.lit(">"), text, pl.lit("</td>")))
        else:
            cells.append(pl.concat_str(pl.lit(f"<td{cls}>"), text, pl.lit("</td>")))
    rows = shown.select(pl.concat_str(pl.lit("<tr>"), *cells, pl.lit("</tr>")).alias("row"))["row"].to_list() if shown.width else []
    num_cls = ' class="num"'
    head = "".join(f"<th{num_cls if n in numeric else ''}>{html.escape(headers.get(n, n.replace('_', ' ')))}</th>" for n in shown.columns)
    parts = ['<table class="dk-table">']
    if caption:
        parts.append(f"<caption>{html.escape(caption)}</caption>")
    parts.append(f"<thead><tr>{head}</tr></thead><tbody>")
    parts.extend(rows)
    parts.append("</tbody></table>")
    if frame.height > max_rows:
        parts.append(f'<p class="dk-note">{frame.height - max_rows:,} more rows not shown.</p>')
    if note:
        parts.append(f'<p class="dk-note">{html.escape(note)}</p>')
    return HtmlTable("\n".join(parts))


def key_values(pairs: Sequence[tuple[str, object]], *, caption: str | None = None) -> HtmlTable:
    """A two-column label/value table (headline figures); values are escaped text."""
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape('' if v is None else str(v))}</td></tr>" for k, v in pairs)
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return HtmlTable(f'<table class="dk-table dk-headline">{cap}<tbody>{rows}</tbody></table>')
