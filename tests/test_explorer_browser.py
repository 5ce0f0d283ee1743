"""The explorer notebook in a real browser: headless JupyterLab, the system Chromium driven by
Playwright, run all cells, pick a provider in the drop-down and see the chart and the totals change.

Data: the report world (``tests/report_world.py``) as Parquet; the notebook's ``inputs`` point at it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import report_world as world

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
HOURS = 24 * 14


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _notebook(tmp: Path, parquet: str) -> Path:
    """A copy of notebooks/explorer.ipynb whose parameters cell reads ``parquet``."""
    nb = json.loads((ROOT / "notebooks" / "explorer.ipynb").read_text(encoding="utf-8"))
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    src = "".join(cell["source"])
    assert "inputs: list = []" in src
    cell["source"] = src.replace("inputs: list = []", f"inputs: list = [{parquet!r}]")
    path = tmp / "explorer.ipynb"
    path.write_text(json.dumps(nb), encoding="utf-8")
    return path


def _wait_for_server(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"jupyter lab did not answer {url} within {timeout} s")


_PROMPTS_JS = "() => [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].map(e => e.textContent.trim())"


def _run_all_until(page, selector: str, timeout: float = 180) -> None:
    """Run > Run All Cells and wait for ``selector``.  Dialogs JupyterLab may raise on the way (the
    kernel picker when the session is not settled yet) are accepted, and Run All is repeated when
    no cell started within 30 s (the menu can act before the notebook panel takes commands)."""
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=90_000)
    deadline = time.monotonic() + timeout
    clicked = None
    while time.monotonic() < deadline:
        dialog = page.locator(".jp-Dialog .jp-mod-accept")
        if dialog.count():
            dialog.first.click()
            continue
        if page.locator(selector).count():
            return
        prompts = page.evaluate(_PROMPTS_JS)
        # (the prompt list is empty while the notebook panel is still rendering)
        idle = bool(prompts) and not any("*" in p for p in prompts) and prompts[-1] in ("[ ]:", "")
        if clicked is None or (idle and time.monotonic() - clicked > 30):
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            item = page.locator(".lm-Menu-item", has_text="Run All Cells").first
            item.wait_for(timeout=10_000)
            item.click()
            clicked = time.monotonic()
        page.wait_for_timeout(1000)
    raise AssertionError(f"{selector} did not appear within {timeout} s of Run All Cells")


@pytest.mark.slow  # JupyterLab + Chromium + a kernel (~30-60 s)
def test_explorer_in_jupyterlab(tmp_path):
    from playwright.sync_api import sync_playwright  # the dev extra; uses the system Chromium, no `playwright install`

    assert Path(CHROMIUM).exists(), "the system Chromium (/usr/bin/chromium) is required"
    work = tmp_path / "lab"
    work.mkdir()
    parquet = world.write(work / "attempts.parquet")
    _notebook(work, parquet)
    token, port = secrets.token_hex(16), _free_port()
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"), "JUPYTER_DATA_DIR": str(tmp_path / "data")}
    jupyter = shutil.which("jupyter", path=str(Path(sys.executable).parent)) or str(Path(sys.executable).parent / "jupyter")
    cmd = [jupyter, "lab", "--no-browser", f"--ServerApp.token={token}", f"--port={port}", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.root_dir={work}", "--ServerApp.port_retries=0", "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           "--LabApp.extension_manager=readonly", "--ServerApp.terminals_enabled=False"]
    if os.geteuid() == 0:  # CI and the dev machines run as root
        cmd.append("--allow-root")
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for_server(f"{base}/api/status?token={token}", proc)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(f"{base}/lab/tree/explorer.ipynb?token={token}", wait_until="domcontentloaded")
                page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
                try:
                    _run_all_until(page, ".dk-explorer-chart svg", timeout=120)
                except AssertionError:
                    # A freshly started Lab sometimes swallows the first Run All (session or kernel
                    # not settled); one reload and a second Run All is what a person would do.
                    page.reload(wait_until="domcontentloaded")
                    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
                    _run_all_until(page, ".dk-explorer-chart svg", timeout=120)
                status = page.locator(".widget-html-content", has_text="tries against MX hosts").first
                assert f"103 452 4.3.1 of {5 * 60 * HOURS:,} tries" in status.inner_text()
                before = page.locator(".dk-explorer-chart").first.inner_html()

                provider = page.locator(".widget-dropdown", has=page.locator("label", has_text="provider")).locator("select")
                provider.select_option("google")
                page.wait_for_function(
                    "() => [...document.querySelectorAll('.widget-html-content')].some(e => e.textContent.includes('0 452 4.3.1 of 20,160 tries'))",
                    timeout=60_000,
                )
                page.wait_for_function("(old) => document.querySelector('.dk-explorer-chart').innerHTML !== old", arg=before, timeout=60_000)
                after = page.locator(".dk-explorer-chart").first.inner_html()
                assert "<svg" in after and after != before
                # the other drop-downs follow the provider
                domains = page.locator(".widget-dropdown", has=page.locator("label", has_text="destination")).locator("option").all_inner_texts()
                assert domains == ["(all)", "gmail.com"]
            except Exception:
                page.screenshot(path=str(tmp_path / "failure.png"))  # kept in pytest's tmp dir for diagnosis
                raise
            finally:
                browser.close()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the server shuts its kernels down on SIGTERM
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
