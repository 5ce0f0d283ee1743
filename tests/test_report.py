"""The weekly report end to end: papermill run, recorded figures against known truth, the
exported HTML (self-contained, escaped, no recipient addresses), the index, failing runs."""

from __future__ import annotations

import json
import re
from datetime import date, datetime, timezone
from pathlib import Path

import polars as pl
import pytest

import report_world as world
from deferral_kit import cli, report

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world_parquet(tmp_path_factory) -> str:
    return world.write(tmp_path_factory.mktemp("world") / "attempts.parquet")


@pytest.fixture(scope="module")
def world_report(world_parquet, tmp_path_factory) -> report.Report:
    out = tmp_path_factory.mktemp("reports")
    return report.run(parameters={"inputs": [world_parquet], "week": "2026-W47", "display_tz": "Europe/Berlin"}, out=out, progress=False, log=lambda m: None)


# --- figures the notebook recorded -------------------------------------------------------------

@pytest.mark.slow  # runs the notebook (papermill, ~10-25 s once per module)
def test_headline_matches_the_known_episode(world_report):
    m = world_report.metrics
    t = world.TRUTH
    assert m["week"] == world_report.label == "2026-W47"
    h = m["headline"]
    assert h["provider"] == "microsoft" and h["response"] == "452 4.3.1"
    assert h["attempts"] == t["microsoft_attempts"] == 30240  # the error-agent suspensions are not attempts
    assert h["count"] == t["microsoft_431"] == 96
    assert h["rate_per_10k"] == pytest.approx(96 / 30240 * 10_000)
    assert h["band"] == "incident"
    assert h["all_attempts"] == 5 * 60 * 24 * 7
    assert h["previous"] == pytest.approx({"week": "2026-W46", "attempts": 30240, "count": 7, "rate_per_10k": 7 / 30240 * 10_000,
                                           "ci_low_per_10k": h["previous"]["ci_low_per_10k"], "ci_high_per_10k": h["previous"]["ci_high_per_10k"], "band": "throttle"})
    assert h["change_per_10k"] == pytest.approx((96 - 7) / 30240 * 10_000)
    assert h["peak"]["bucket"] == t["peak_bucket"]
    assert (h["peak"]["count"], h["peak"]["attempts"]) == (t["peak_count"], t["peak_attempts"]) == (24, 180)
    assert h["ci_low_per_10k"] < h["rate_per_10k"] < h["ci_high_per_10k"]


@pytest.mark.slow  # runs the notebook (papermill, ~10-25 s once per module)
def test_destination_table_counts(world_report):
    rows = {r["recipient_domain"]: r for r in world_report.metrics["destinations"]}
    assert [r["recipient_domain"] for r in world_report.metrics["destinations"]][:2] == ["hotmail.com", "outlook.com"]
    for d in world.EPISODE_DOMAINS:
        assert (rows[d]["attempts"], rows[d]["count"], rows[d]["band"], rows[d]["provider"]) == (10080, 48, "incident", "microsoft")
    assert (rows["contoso.com"]["count"], rows["contoso.com"]["band"]) == (0, "watch")
    assert (rows["gmail.com"]["bounces"], rows["gmail.com"]["other_4xx"], rows["gmail.com"]["provider"]) == (world.TRUTH["gmail_bounces"], 0, "google")
    assert (rows["yahoo.com"]["other_4xx"], rows["yahoo.com"]["bounces"]) == (world.TRUTH["yahoo_other_4xx"], 0)


@pytest.mark.slow  # runs the notebook (papermill, ~10-25 s once per module)
def test_response_texts_grouped_after_masking(world_report):
    groups = world_report.metrics["responses"]
    top = groups[0]
    # 96 replies from many Microsoft hosts at many times collapse into one text
    assert top["response_text"] == "452 4.3.1 Insufficient system resources (TSTE) [<host>.outlook.com <time>]"
    assert (top["attempts"], top["destinations"], top["mx_hosts"]) == (96, 2, 2)
    assert (top["response_class"], top["side"]) == ("capacity", "receiver")
    texts = {g["response_text"]: g["attempts"] for g in groups}
    assert texts["421 4.7.0 [TSS04] <script>alert(<n>)</script> temporarily deferred"] == 7
    assert texts["452 4.3.1 delivery temporarily suspended"] == 7
    assert len(groups) == 3


@pytest.mark.slow  # runs the notebook (papermill, ~10-25 s once per module)
def test_accounting_and_chart_count(world_report):
    m = world_report.metrics
    assert m["accounting"][0]["format"] == "parquet"
    assert m["accounting"][0]["lines"] == 5 * 60 * 24 * 7 + 7  # the week's rows, suspensions included
    assert m["charts"] == 4


# --- the exported HTML ----------------------------------------------------------------------------

@pytest.mark.slow  # runs the notebook (papermill, ~10-25 s once per module)
def test_html_is_self_contained_and_has_every_chart(world_report):
    page = world_report.html.read_text(encoding="utf-8")
    assert page.count('class="dk-chart"') == world_report.metrics["charts"] == 4
    assert page.count("if (!window.vegaEmbed)") == 1  # the bundle, once
    assert report.external_references(page) == []
    assert not re.search(r"<script[^>]*\ssrc=", page)
    assert not re.search(r"<link[^>]*href=[\"']?https?:", page)
    assert 'import("http' not in page
    assert "require.js" not in page and "mathjax" not in page.lower()
    assert "<title>weekly report 2026-W47</title>" in page
    assert world_report.notebook.is_file() and world_report.html.parent.name == "2026-W47"


@pytest.mark.slow  # runs the notebook (papermill, ~10-25 s once per module)
def test_html_escapes_remote_text_and_hides_recipients(world_report):
    page = world_report.html.read_text(encoding="utf-8")
    assert "<script>alert(" not in page
    assert "&lt;script&gt;alert(&lt;n&gt;)&lt;/script&gt;" in page
    assert world.BOUNCED_RECIPIENT_LOCAL not in page
    addresses = {a for a in re.findall(r"[\w.+-]+@[\w-]+\.[\w.-]+", page) if not a.startswith("***")}
    assert addresses == set()


@pytest.mark.slow  # runs the notebook (papermill, ~10-25 s once per module)
def test_html_shows_times_in_the_display_zone(world_report):
    page = world_report.html.read_text(encoding="utf-8")
    # the peak bucket 14:00 UTC is 15:00 in Berlin, in the headline and in the chart data
    assert "Wed 2026-11-18 15:00 CET" in page
    assert "2026-11-18T15:00:00+0000" in page


@pytest.mark.slow  # runs the notebook (papermill, ~10-25 s once per module)
def test_index_links_the_report(world_report):
    index = (world_report.html.parents[1] / "index.html").read_text(encoding="utf-8")
    assert '<a href="2026-W47/weekly_report.html">weekly report</a>' in index


# --- failing runs -----------------------------------------------------------------------------------

def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow  # runs the notebook (papermill, ~10-25 s once per module)
def test_failing_runs_exit_nonzero_and_keep_the_earlier_report(world_report, world_parquet, capsys):
    out = world_report.html.parents[1]
    before = _snapshot(out)

    assert cli.main(["report", "--input", str(out / "missing.log"), "--out", str(out), "--no-progress"]) == 2
    assert f"{out / 'missing.log'}: no such file or directory" in capsys.readouterr().err

    assert cli.main(["report", "--input", world_parquet, "-p", "colour=red", "--out", str(out), "--no-progress"]) == 2
    assert "unknown parameter(s) colour" in capsys.readouterr().err

    assert cli.main(["report", "--input", world_parquet, "-p", "top_n=many", "--out", str(out), "--no-progress"]) == 2
    assert "top_n='many': expected int" in capsys.readouterr().err

    # a cell fails inside the kernel: exit 1, the cell and the error named
    assert cli.main(["report", "--input", world_parquet, "--week", "2026-W47", "-p", "display_tz=Mars/Olympus", "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "weekly_report: cell" in err and "ZoneInfoNotFoundError" in err and "Mars/Olympus" in err

    assert _snapshot(out) == before
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no staging folder left


# --- pieces of the runner ---------------------------------------------------------------------------

def test_resolve_week():
    w = report.resolve_week("2026-W47")
    assert (w.start, w.end, w.label) == (datetime(2026, 11, 16, tzinfo=timezone.utc), datetime(2026, 11, 23, tzinfo=timezone.utc), "2026-W47")
    assert w.previous().label == "2026-W46"
    assert report.resolve_week("last", today=date(2026, 11, 28)).label == "2026-W47"
    assert report.resolve_week("last", today=date(2027, 1, 4)).label == "2026-W53"  # 2026 has 53 ISO weeks
    custom = report.resolve_week("last", start="2026-11-18", end="2026-11-19")
    assert (custom.start, custom.end, custom.label) == (datetime(2026, 11, 18, tzinfo=timezone.utc), datetime(2026, 11, 20, tzinfo=timezone.utc), "2026-11-18_2026-11-19")
    assert custom.previous().label == "2026-11-16_2026-11-17"
    data = pl.LazyFrame({"ts": [datetime(2026, 11, 15, 23, tzinfo=timezone.utc)] + [datetime(2026, 11, 17, h, tzinfo=timezone.utc) for h in range(3)]})
    assert report.resolve_week("data", attempts=data).label == "2026-W47"
    for bad, msg in (("2026-W60", "week '2026-W60'"), ("yesterday", "expected 'last'")):
        with pytest.raises(report.InputError, match=msg):
            report.resolve_week(bad)
    with pytest.raises(report.InputError, match="both start and end"):
        report.resolve_week(start="2026-11-18")


def test_script_json_cannot_close_the_script_element():
    text = report.script_json({"response": "</script><script>alert(1)</script>", "sep": "a\u2028b"})
    assert "<" not in text and ">" not in text and "\u2028" not in text
    assert json.loads(text) == {"response": "</script><script>alert(1)</script>", "sep": "a\u2028b"}


def test_external_references_finds_network_fetches():
    page = ('<script src="https://cdn.jsdelivr.net/npm/vega@6"></script><link rel="stylesheet" href="//fonts.example/x.css">'
            '<script>import("https://esm.sh/x")</script><style>@import url("http://a/b.css")</style>'
            '<a href="https://help.yahoo.com/">link</a><svg xmlns="http://www.w3.org/2000/svg"></svg>')
    assert report.external_references(page) == [
        '<script src="https://cdn.jsdelivr.net/npm/vega@6',
        '<link rel="stylesheet" href="//fonts.example/x.css',
        'import("https://esm.sh/x',
        '@import url("http://a/b.css',
    ]


def test_parameters_typed_from_the_command_line():
    nb = report.notebook_path("weekly_report")
    got = report.coerce_parameters(nb, {"top_n": "15", "show_recipients": "true", "inputs": "[a.log, b.log]", "week": "2026-W47", "start": "2026-11-16"})
    assert got == {"top_n": 15, "show_recipients": True, "inputs": ["a.log", "b.log"], "week": "2026-W47", "start": "2026-11-16"}
    with pytest.raises(report.InputError, match="show_recipients='maybe'"):
        report.coerce_parameters(nb, {"show_recipients": "maybe"})
    with pytest.raises(report.InputError, match="must be int"):
        report.check_parameters(nb, {"top_n": "10"})
    with pytest.raises(report.InputError, match="notebook 'nope' not found"):
        report.notebook_path("nope")


def test_notebook_is_committed_clean():
    nb = json.loads((ROOT / "notebooks" / "weekly_report.ipynb").read_text(encoding="utf-8"))
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c.get("outputs") == [] and c.get("execution_count") is None for c in code)
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1
    assert set(report.notebook_parameters(ROOT / "notebooks" / "weekly_report.ipynb")) == {
        "inputs", "input_format", "log_tz", "week", "start", "end", "display_tz", "bucket",
        "provider_focus", "bands_file", "top_n", "top_table", "show_recipients",
    }


def test_index_lists_newest_period_first(tmp_path):
    for label in ("2026-W45", "2026-W47", "2026-W46"):
        (tmp_path / label).mkdir()
        (tmp_path / label / "weekly_report.html").write_text("<html></html>")
    (tmp_path / "2026-W47" / "incident_review.html").write_text("<html></html>")
    (tmp_path / ".weekly_report-x.staging").mkdir()
    (tmp_path / ".weekly_report-x.staging" / "weekly_report.html").write_text("half")
    page = report.write_index(tmp_path).read_text()
    links = re.findall(r'href="([^"]+)"', page)
    assert links == ["2026-W47/weekly_report.html", "2026-W47/incident_review.html", "2026-W46/weekly_report.html", "2026-W45/weekly_report.html"]


# --- the README's command on the bundled sample -------------------------------------------------------

@pytest.mark.slow  # parses the week of bundled Postfix logs in the kernel (~20-40 s)
def test_default_run_on_the_bundled_sample_matches_its_truth(tmp_path, monkeypatch, capsys):
    truth = json.loads((ROOT / "data" / "sample" / "truth.json").read_text(encoding="utf-8"))
    monkeypatch.chdir(tmp_path)  # the sample and the notebook are found from any working directory
    assert cli.main(["report", "--out", "reports", "--no-progress"]) == 0
    start = datetime.fromisoformat(truth["start"])
    week = f"{start.isocalendar().year}-W{start.isocalendar().week:02d}"
    folder = tmp_path / "reports" / week
    m = json.loads((folder / "weekly_report.metrics.json").read_text(encoding="utf-8"))
    assert m["week"] == week
    h = m["headline"]
    assert (h["attempts"], h["count"]) == (truth["microsoft"]["mx_attempts"], truth["microsoft"]["code_452_431"])
    assert round(h["rate_per_10k"], 3) == truth["microsoft"]["per_10k"]
    assert h["all_attempts"] == truth["mx_attempts"]
    assert h["band"] == "incident"
    by_host = truth["code_452_431"]["by_host"]
    counts = {r["recipient_domain"]: r["count"] for r in m["destinations"]}
    assert counts["hotmail.com"] == by_host["hotmail-com.olc.protection.outlook.com"]
    assert counts["outlook.com"] == by_host["outlook-com.olc.protection.outlook.com"]
    texts = {g["response_text"]: g["attempts"] for g in m["responses"]}
    assert texts["452 4.3.1 Insufficient system resources (TSTE) [<host>.outlook.com <time> <hex>]"] == truth["code_452_431"]["total"]
    page = (folder / "weekly_report.html").read_text(encoding="utf-8")
    assert page.count('class="dk-chart"') == m["charts"] == 4
    assert report.external_references(page) == []
    assert {a for a in re.findall(r"[\w.+-]+@[\w-]+\.[\w.-]+", page) if not a.startswith("***")} == set()
    assert f"wrote {folder / 'weekly_report.html'}" in capsys.readouterr().err


def test_bad_parameters_fail_before_a_kernel_starts(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("display_tz: Europe/Berlin\ncolour: red\n")
    out = tmp_path / "reports"
    assert cli.main(["report", "--params", str(params), "--out", str(out)]) == 2
    assert "unknown parameter(s) colour" in capsys.readouterr().err
    params.write_text("- just\n- a list\n")
    assert cli.main(["report", "--params", str(params), "--out", str(out)]) == 2
    assert "expected a mapping of parameter names to values" in capsys.readouterr().err
    assert cli.main(["report", "-p", "top_n", "--out", str(out)]) == 2
    assert "-p 'top_n': expected NAME=VALUE" in capsys.readouterr().err
    assert cli.main(["report", "--notebook", "nope", "--out", str(out)]) == 2
    assert "notebook 'nope' not found" in capsys.readouterr().err
    assert not out.exists() or list(out.iterdir()) == []
