"""HTML tables: escaped cells, masked addresses, formatted numbers and times."""

from __future__ import annotations

from datetime import datetime, timezone

import polars as pl

from deferral_kit.tables import html_table, key_values

FRAME = pl.DataFrame({
    "recipient_domain": ["outlook.com", "<b>evil</b>.example"],
    "attempts": [1234567, 999],
    "rate_per_10k": [31.74603, None],
    "band": ["incident", "watch"],
    "response_text": ["421 <script>alert(1)</script> & more", "550 5.1.1 <alice.smith@gmail.com> unknown"],
    "last_seen": [datetime(2026, 11, 18, 14, 30, tzinfo=timezone.utc)] * 2,
    "share": [0.875, 0.125],
})


def test_cells_are_escaped_masked_and_formatted():
    page = html_table(FRAME, caption="Top <destinations>", tz="Europe/Berlin", formats={"share": "percent"}).html
    rows = page.split("<tbody>")[1]
    assert rows.splitlines()[1] == (
        '<tr><td>outlook.com</td><td class="num">1,234,567</td><td class="num">31.75</td><td class="dk-band-incident">incident</td>'
        '<td>421 &lt;script&gt;alert(1)&lt;/script&gt; &amp; more</td><td>2026-11-18 15:30</td><td class="num">87.5%</td></tr>'
    )
    assert rows.splitlines()[2] == (
        '<tr><td>&lt;b&gt;evil&lt;/b&gt;.example</td><td class="num">999</td><td class="num"></td><td class="dk-band-watch">watch</td>'
        '<td>550 5.1.1 &lt;***@gmail.com&gt; unknown</td><td>2026-11-18 15:30</td><td class="num">12.5%</td></tr>'
    )
    assert "<caption>Top &lt;destinations&gt;</caption>" in page
    assert '<th>recipient domain</th><th class="num">attempts</th>' in page
    assert "alice.smith" not in page and "<script>" not in page


def test_addresses_shown_only_when_allowed():
    assert "&lt;alice.smith@gmail.com&gt;" in html_table(FRAME, show_addresses=True).html


def test_long_tables_are_cut_with_a_note():
    page = html_table(pl.DataFrame({"n": list(range(250))}), max_rows=200).html
    assert page.count("<tr><td") == 200
    assert '<p class="dk-note">50 more rows not shown.</p>' in page


def test_key_values_escapes():
    assert key_values([("band", "<i>incident</i>")]).html == '<table class="dk-table dk-headline"><tbody><tr><th>band</th><td>&lt;i&gt;incident&lt;/i&gt;</td></tr></tbody></table>'
