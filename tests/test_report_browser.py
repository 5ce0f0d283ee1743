"""The exported report in a real browser: headless Chromium with the network disabled renders
every chart (and its drop-down) from the embedded bundle, also under a strict CSP without
'unsafe-eval'."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

import report_world as world
from deferral_kit import report

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
STRICT_CSP = (
    '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; script-src \'unsafe-inline\'; '
    'style-src \'unsafe-inline\'; img-src data:; font-src data:">'
)
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--virtual-time-budget=15000", "--dump-dom",
]


def _offline_prefix() -> tuple[list[str], list[str]]:
    """A network namespace without interfaces when we may create one; else a dead proxy and resolver."""
    try:
        if subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10).returncode == 0:
            return ["unshare", "-n"], []
    except (OSError, subprocess.SubprocessError):
        pass
    return [], ["--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND"]


def dump_dom(page: Path, profile: Path) -> str:
    prefix, extra = _offline_prefix()
    cmd = [*prefix, CHROMIUM, *FLAGS, *extra, f"--user-data-dir={profile}", page.resolve().as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> report.Report:
    base = tmp_path_factory.mktemp("browser")
    parquet = world.write(base / "attempts.parquet")
    return report.run(parameters={"inputs": [parquet], "week": "2026-W47"}, out=base / "reports", progress=False, log=lambda m: None)


def _check_rendered(dom: str, charts: int) -> None:
    assert len(re.findall(r'<svg[^>]*class="marks"', dom)) == charts
    assert dom.count('class="vega-bind"') == 3  # the three "pick one" drop-downs, live
    assert 'class="dk-chart-error"' not in dom
    visible = re.sub(r"<(script|style)\b.*?</\1>", "", dom, flags=re.S)  # the page's own code names these errors
    assert "chart failed" not in visible and "Error loading script" not in visible and "EvalError" not in visible
    assert "&lt;script&gt;alert(&lt;n&gt;)&lt;/script&gt;" in dom and "<script>alert(" not in dom


@pytest.mark.slow  # papermill run + two Chromium runs
def test_report_renders_offline(exported, tmp_path):
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} missing: install the chromium package"
    dom = dump_dom(exported.html, tmp_path / "profile")
    _check_rendered(dom, exported.metrics["charts"])


@pytest.mark.slow
def test_report_renders_under_strict_csp(exported, tmp_path):
    page = exported.html.read_text(encoding="utf-8")
    strict = tmp_path / "strict.html"
    strict.write_text(page.replace("<head>", "<head>\n" + STRICT_CSP, 1), encoding="utf-8")
    dom = dump_dom(strict, tmp_path / "profile")
    assert "Content-Security-Policy" in dom
    _check_rendered(dom, exported.metrics["charts"])
