"""Reports: offline Altair rendering, recorded figures, and the papermill + nbconvert runner.

Inside a notebook: :func:`setup` (embed the Vega bundle once, switch Altair to the offline
renderer), :func:`load_week` (read the input, cut the reporting week and the one before),
:func:`record` (write a figure to the run's ``metrics.json`` sidecar, which tests and
scheduled jobs read).

From the command line: :func:`run` executes ``notebooks/<name>.ipynb`` with papermill in a
staging folder, exports HTML without input cells through the ``deferral_kit`` nbconvert
template shipped in this package, checks that nothing is fetched from the network, moves the
files into ``<out>/<week>/`` (the HTML last, each with an atomic rename) and rewrites
``<out>/index.html``.  A failing run leaves an earlier report in place.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import polars as pl

from .sources import InputError

PACKAGE_DIR = Path(__file__).resolve().parent
TEMPLATE_DIR = PACKAGE_DIR / "templates" / "nbconvert"
TEMPLATE_NAME = "deferral_kit"
NOTEBOOK_DIR = PACKAGE_DIR.parent / "notebooks"
SAMPLE_DIR = PACKAGE_DIR.parent / "data" / "sample"

# The runner tells the kernel where record() writes through the environment: it is
# inherited by the kernel papermill starts, and a notebook run by hand falls back to cwd.
METRICS_ENV = "DEFERRAL_KIT_METRICS"
RENDERER = "deferral_kit"


class ReportError(Exception):
    """A report run failed; the message says which notebook, which cell and why."""


# --- offline rendering ------------------------------------------------------------------------

_EMBED_OPTIONS = {
    # The expression interpreter instead of Function(): charts work under a CSP without 'unsafe-eval'.
    "ast": True,
    "renderer": "svg",  # crisp when zoomed or printed; the specs are small aggregates
    "actions": {"export": True, "source": False, "compiled": False, "editor": False},
}

_CHART_HTML = """<div class="dk-chart" id="{div}"></div>
<script type="text/javascript">
(function () {{
  var el = document.getElementById("{div}");
  function fail(e) {{
    var p = document.createElement("pre");
    p.className = "dk-chart-error";
    p.textContent = "chart failed: " + e;
    el.appendChild(p);
  }}
  function draw() {{ window.vegaEmbed(el, {spec}, {opts}).catch(fail); }}
  if (window.vegaEmbed) {{ draw(); }}
  else {{ window.addEventListener("load", function () {{
    window.vegaEmbed ? draw() : fail("the Vega bundle is missing: call deferral_kit.report.setup() first");
  }}); }}
}})();
</script>"""

_bundle_emitted = False
_charts_rendered = 0


def script_json(obj: Any) -> str:
    """JSON safe to place inside ``<script>``: ``<``, ``>``, ``&`` and JS line separators escaped,
    so text from remote servers (``</script>`` in a reply) cannot end the script element."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, default=str)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def offline_renderer(spec: dict, **metadata) -> dict:
    """Altair renderer: a ``<div>`` plus a call to the page's one ``vegaEmbed`` (see :func:`setup`)."""
    from altair.utils.display import compile_with_vegafusion, using_vegafusion

    mode = "vega-lite"
    if using_vegafusion():  # built-in renderers compile VegaFusion specs themselves; so must we
        spec, mode = compile_with_vegafusion(spec), "vega"
    opts = {"mode": mode, **_EMBED_OPTIONS, **metadata.get("embed_options", {})}
    global _charts_rendered
    _charts_rendered += 1
    return {"text/html": _CHART_HTML.format(div=f"dk-vis-{uuid.uuid4().hex}", spec=script_json(spec), opts=script_json(opts))}


def setup(*, static: bool = False, force: bool = False) -> None:
    """Prepare a notebook for an offline, self-contained HTML export.

    Emits the Vega / Vega-Lite / vega-embed JavaScript once (a ~0.9 MB output in this cell,
    instead of one copy or one CDN fetch per chart) and makes every later Altair chart a small
    ``vegaEmbed`` call.  ``static=True`` renders SVG instead: no JavaScript and no interactivity,
    for readers whose mail client or CSP blocks scripts.
    """
    import altair as alt
    from IPython.display import HTML, display

    global _bundle_emitted
    if static:
        alt.renderers.enable("svg")
        return
    if not _bundle_emitted or force:
        import vl_convert as vlc

        vl = ".".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])
        bundle = vlc.javascript_bundle(vl_version=vl)
        # Function scope: the bundle's top-level declarations must not collide with the page's.
        display(HTML(f'<script type="text/javascript">if (!window.vegaEmbed) {{ (function () {{\n{bundle}\n}})(); }}</script>'))
        _bundle_emitted = True
    alt.renderers.register(RENDERER, offline_renderer)
    alt.renderers.enable(RENDERER)


# --- recorded figures ---------------------------------------------------------------------------

def _jsonable(value: Any) -> Any:
    if isinstance(value, pl.DataFrame):
        return [_jsonable(r) for r in value.to_dicts()]
    if isinstance(value, pl.Series):
        return [_jsonable(v) for v in value.to_list()]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        return _jsonable(value.item())
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def metrics_path() -> Path:
    """Where :func:`record` writes: the runner's choice, else ``./metrics.json``."""
    return Path(os.environ.get(METRICS_ENV) or "metrics.json")


def record(name: str, value: Any) -> None:
    """Store a figure the notebook computed (a number, string, dict or small DataFrame) in the
    run's ``metrics.json`` sidecar, so tests and scheduled jobs read the report's own numbers."""
    path = metrics_path()
    data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    data[name] = _jsonable(value)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True), encoding="utf-8")
    tmp.replace(path)


# --- the reporting week -------------------------------------------------------------------------

@dataclass(frozen=True)
class Week:
    """A reporting period ``[start, end)`` in UTC and its folder label (``2026-W47``)."""

    start: datetime
    end: datetime
    label: str

    def previous(self) -> Week:
        span = self.end - self.start
        start = self.start - span
        return Week(start, self.start, _label(start, self.start))

    def contains(self, column: str = "ts") -> pl.Expr:
        return (pl.col(column) >= self.start) & (pl.col(column) < self.end)


def _label(start: datetime, end: datetime) -> str:
    y, w, d = start.date().isocalendar()
    if d == 1 and end - start == timedelta(days=7) and start.time() == datetime.min.time():
        return f"{y}-W{w:02d}"
    return f"{start.date().isoformat()}_{(end - timedelta(days=1)).date().isoformat()}"


def _iso_week(year: int, week: int) -> Week:
    start = datetime.combine(date.fromisocalendar(year, week, 1), datetime.min.time(), tzinfo=timezone.utc)
    return Week(start, start + timedelta(days=7), f"{year}-W{week:02d}")


_ISO_WEEK = re.compile(r"^(\d{4})-?W(\d{1,2})$", re.IGNORECASE)


def resolve_week(week: str = "last", *, start: str = "", end: str = "", attempts: pl.LazyFrame | None = None, today: date | None = None) -> Week:
    """The reporting period named by the notebook parameters.

    ``week``: ``last`` (the last complete ISO week, UTC), an ISO week (``2026-W47``), or ``data``
    (the ISO week with the most attempts in ``attempts``: the bundled sample's week).
    ``start``/``end`` (``YYYY-MM-DD``, ``end`` inclusive) override ``week`` when both are given.
    """
    if start or end:
        if not (start and end):
            raise InputError("give both start and end (YYYY-MM-DD), or neither")
        try:
            s, e = date.fromisoformat(start), date.fromisoformat(end)
        except ValueError as exc:
            raise InputError(f"start/end must be dates like 2026-11-16: {exc}") from exc
        if e < s:
            raise InputError(f"end {end} is before start {start}")
        s_dt = datetime.combine(s, datetime.min.time(), tzinfo=timezone.utc)
        e_dt = datetime.combine(e + timedelta(days=1), datetime.min.time(), tzinfo=timezone.utc)
        return Week(s_dt, e_dt, _label(s_dt, e_dt))
    w = (week or "last").strip()
    if w == "last":
        today = today or datetime.now(timezone.utc).date()
        y, n, _ = (today - timedelta(days=7)).isocalendar()
        return _iso_week(y, n)
    if m := _ISO_WEEK.match(w):
        try:
            return _iso_week(int(m[1]), int(m[2]))
        except ValueError as exc:
            raise InputError(f"week {w!r}: {exc}") from exc
    if w == "data":
        if attempts is None:
            raise InputError("week 'data' needs the attempts to look at")
        busiest = (
            attempts.select(pl.col("ts").dt.replace_time_zone(None).dt.truncate("1w").alias("monday"))
            .group_by("monday")
            .len()
            .sort(["len", "monday"], descending=[True, True])
            .head(1)
            .collect()
        )
        if busiest.height == 0 or busiest["monday"][0] is None:
            raise InputError("the input has no timestamped attempts, so there is no week to report")
        y, n, _ = busiest["monday"][0].date().isocalendar()
        return _iso_week(y, n)
    raise InputError(f"week {w!r}: expected 'last', 'data', or an ISO week like 2026-W47")


# --- loading the input for a report -------------------------------------------------------------

def sample_inputs() -> list[str]:
    """The bundled sample's log files (``data/sample/``, without its truth and notes)."""
    if not SAMPLE_DIR.is_dir():
        raise InputError(f"{SAMPLE_DIR}: the bundled sample is missing; pass --input")
    files = sorted(str(p) for p in SAMPLE_DIR.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix not in (".json", ".md", ".txt", ".yaml", ".yml"))
    if not files:
        raise InputError(f"{SAMPLE_DIR}: no log files in the bundled sample")
    return files


@dataclass
class WeekData:
    """The input cut to the reporting week (``attempts``) and the week before (``previous``),
    both with provider and response-class columns; ``accounting`` covers the whole input."""

    week: Week
    attempts: pl.LazyFrame
    previous: pl.LazyFrame
    accounting: Any
    parquet: bool = False
    inputs: list[str] = field(default_factory=list)


def load_week(inputs: list[str] | str, *, format: str = "auto", log_tz: str = "UTC", year: int | None = None, week: str = "", start: str = "", end: str = "") -> WeekData:
    """Read logs (any supported format) or canonical Parquet files and cut the reporting week.

    No ``inputs``: the bundled sample.  ``week`` as in :func:`resolve_week`; empty means ``data``
    for the bundled sample and ``last`` otherwise.

    The input is read once; the reporting week and the week before are kept (collected, with
    provider and response-class columns) and the line accounting covers all files read.
    """
    from argparse import Namespace

    from .classify import with_classes
    from .cli import read_input

    inputs = [inputs] if isinstance(inputs, str) else [str(p) for p in inputs]
    bundled = not inputs or all(Path(p).resolve() == SAMPLE_DIR for p in inputs)
    if not week and not (start or end):
        week = "data" if bundled else "last"  # the bundled sample's own week; real logs: last week
    if bundled:
        inputs = sample_inputs()  # the folder also holds truth.json, which is not a log
    parquet = all(p.endswith(".parquet") for p in inputs)
    res = read_input(inputs, Namespace(format=format, tz=log_tz, year=year, keep_duplicates=False))
    attempts = res.attempts
    if (week or "").strip() == "data" and not (start or end):
        attempts = attempts.collect().lazy()  # the week is read off the data: collect once, not twice
    wk = resolve_week(week, start=start, end=end, attempts=attempts)
    prev = wk.previous()
    # Only the two weeks are kept, with provider and response class computed once: every
    # section below reads them again.
    attempts = with_classes(attempts.filter((pl.col("ts") >= prev.start) & (pl.col("ts") < wk.end))).collect().lazy()
    return WeekData(
        week=wk,
        attempts=attempts.filter(wk.contains()),
        previous=attempts.filter(prev.contains()),
        accounting=res.accounting,
        parquet=parquet,
        inputs=inputs,
    )


# --- the runner --------------------------------------------------------------------------------

@dataclass
class Report:
    """A finished run: where its files are, what it recorded, how long it took."""

    html: Path
    notebook: Path
    metrics: dict
    seconds: float
    label: str


def notebook_path(name: str) -> Path:
    """``notebooks/<name>.ipynb`` of this checkout, or ``name`` itself when it is a path."""
    p = Path(name)
    if p.suffix == ".ipynb" and p.is_file():
        return p.resolve()
    cand = NOTEBOOK_DIR / f"{p.stem if p.suffix == '.ipynb' else name}.ipynb"
    if not cand.is_file():
        known = sorted(x.stem for x in NOTEBOOK_DIR.glob("*.ipynb")) if NOTEBOOK_DIR.is_dir() else []
        raise InputError(f"notebook {name!r} not found in {NOTEBOOK_DIR} (known: {', '.join(known) or 'none'})")
    return cand


def notebook_parameters(path: Path) -> dict[str, dict]:
    """The notebook's declared parameters (name -> papermill's inferred type, default, help)."""
    import papermill

    return papermill.inspect_notebook(str(path))


_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str, "list": list, "dict": dict}


def check_parameters(path: Path, params: dict[str, Any]) -> None:
    """Raise :class:`InputError` for a parameter the notebook does not declare or of the wrong type
    (papermill itself only warns and runs with the default)."""
    declared = notebook_parameters(path)
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise InputError(f"{path.name}: unknown parameter(s) {', '.join(unknown)}; it takes: {', '.join(declared)}")
    for name, value in params.items():
        want = _TYPES.get(str(declared[name].get("inferred_type_name", "")).strip())
        if want is None:
            continue
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if not ok:
            raise InputError(f"{path.name}: parameter {name} must be {declared[name]['inferred_type_name']}, got {value!r}")


def external_references(page: str) -> list[str]:
    """Scripts, styles and modules a page would fetch from the network (should be none)."""
    pats = (
        r"<script\b[^>]*\bsrc\s*=\s*[\"']?(?:https?:)?//[^\"'\s>]*",
        r"<link\b[^>]*\bhref\s*=\s*[\"']?(?:https?:)?//[^\"'\s>]*",
        r"\bimport\s*\(\s*[\"'](?:https?:)?//[^\"']*",
        r"@import\s+(?:url\()?\s*[\"']?(?:https?:)?//[^\"')\s]*",
    )
    return [m.group(0) for p in pats for m in re.finditer(p, page, flags=re.IGNORECASE)]


@contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _export_html(executed: Path, *, title: str) -> str:
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(executed), as_version=4)
    nb.metadata["title"] = title
    nb.metadata.pop("widgets", None)  # widget state would need the unpkg widget manager
    exporter = HTMLExporter(template_name=TEMPLATE_NAME, extra_template_basedirs=[str(TEMPLATE_DIR)])
    exporter.exclude_input = True
    exporter.exclude_input_prompt = True
    exporter.exclude_output_prompt = True
    body, _ = exporter.from_notebook_node(nb)
    return body


def _cell_error(exc: Exception) -> str:
    ename, evalue = getattr(exc, "ename", type(exc).__name__), getattr(exc, "evalue", str(exc))
    return f"{ename}: {evalue}".strip()


def run(*, notebook: str = "weekly_report", parameters: dict[str, Any] | None = None, out: str | os.PathLike = "reports", progress: bool = True, log=None) -> Report:
    """Execute a notebook with papermill (kernel ``python3``) and publish its offline HTML report.

    Files land in ``<out>/<label>/``: ``<name>.html``, the executed ``<name>.ipynb`` and
    ``<name>.metrics.json``.  ``label`` is the ``week`` the notebook recorded (else ``undated``).
    Raises :class:`InputError` for bad parameters and :class:`ReportError` when a cell fails;
    either way nothing under ``out`` changes except a removed staging folder.  The notebook must
    call :func:`setup` before its first chart: a page that would load anything from the network
    is not published.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    path = notebook_path(notebook)
    name = path.stem
    params = dict(parameters or {})
    check_parameters(path, params)
    out = Path(out).resolve()  # the kernel runs in the staging folder: no relative paths
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.staging"):  # left by a run that was killed (SIGKILL, power loss)
        if time.time() - stale.stat().st_mtime > 86_400:
            shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", suffix=".staging", dir=out))  # same file system: renames are atomic
    try:
        executed = staging / f"{name}.ipynb"
        metrics_file = staging / f"{name}.metrics.json"
        log(f"running {path} (kernel python3) ...")
        try:
            with _env(METRICS_ENV, str(metrics_file)):
                papermill.execute_notebook(
                    str(path), str(executed), parameters=params, kernel_name="python3",
                    progress_bar=progress, cwd=str(staging), log_output=False,
                    # ipykernel 7 warns about unencrypted local TCP on every run: noise under cron
                    extra_arguments=["--IPKernelApp.log_level=ERROR"],
                )
        except PapermillExecutionError as exc:
            raise ReportError(f"{name}: cell {exc.exec_count} failed: {_cell_error(exc)}") from None
        except Exception as exc:  # kernel died, no such kernel, unwritable output
            raise ReportError(f"{name}: could not run the notebook: {_cell_error(exc)}") from exc
        metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.exists() else {}
        label = str(metrics.get("week") or "undated")
        if not re.fullmatch(r"[\w.-]+", label):
            raise ReportError(f"{name}: recorded week {label!r} is not usable as a folder name")
        log("exporting HTML ...")
        page = _export_html(executed, title=f"{name.replace('_', ' ')} {label}")
        fetched = external_references(page)
        if fetched:
            raise ReportError(f"{name}: the HTML would fetch from the network ({'; '.join(fetched[:3])}); not published")
        (staging / f"{name}.html").write_text(page, encoding="utf-8")
        target = out / label
        target.mkdir(parents=True, exist_ok=True)
        for fname in (f"{name}.ipynb", f"{name}.metrics.json", f"{name}.html"):  # the HTML last: it marks a complete report
            if (staging / fname).exists():
                os.replace(staging / fname, target / fname)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_index(out)
    report = Report(html=target / f"{name}.html", notebook=target / f"{name}.ipynb", metrics=metrics, seconds=time.perf_counter() - t0, label=label)
    log(f"wrote {report.html} ({report.html.stat().st_size / 1e6:.2f} MB) in {report.seconds:.1f} s; index: {out / 'index.html'}")
    return report


def write_index(out: str | os.PathLike) -> Path:
    """(Re)write ``<out>/index.html`` linking every report under ``<out>/<label>/``, newest label first."""
    out = Path(out)
    pages = sorted((p for p in out.glob("*/*.html") if not p.parent.name.startswith(".")), key=lambda p: (p.parent.name, p.name), reverse=True)
    rows = []
    for p in pages:
        rel = p.relative_to(out).as_posix()
        stamp = datetime.fromtimestamp(p.stat().st_mtime, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        rows.append(
            f'<tr><td>{html.escape(p.parent.name)}</td><td><a href="{html.escape(rel, quote=True)}">{html.escape(p.stem.replace("_", " "))}</a></td>'
            f'<td class="num">{p.stat().st_size / 1e6:.2f} MB</td><td>{stamp}</td></tr>'
        )
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Deferral reports</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:3px 10px;text-align:left;border-bottom:1px solid #ddd}"
        "td.num{text-align:right}</style></head><body><h1>Deferral reports</h1>\n"
        "<table><thead><tr><th>period</th><th>report</th><th>size</th><th>generated</th></tr></thead><tbody>\n"
        + "\n".join(rows)
        + "\n</tbody></table></body></html>\n"
    )
    tmp = out / ".index.html.part"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out / "index.html")
    return out / "index.html"


# --- report sections: small frames the notebooks show ---------------------------------------------
# Compositions of deferral_kit.metrics reductions, so the notebooks stay a list of calls.

def focus(provider: str) -> pl.Expr:
    """Rows of a provider family (``microsoft``) or provider id (``microsoft_365``)."""
    return ((pl.col("provider_family") == provider) | (pl.col("provider") == provider)).fill_null(False)


def headline(data: WeekData, *, provider: str = "microsoft", code: int = 452, enhanced: str = "4.3.1", bands=None, bucket: str = "1h") -> dict:
    """The week's figures for one provider: attempts against its MX hosts (the denominator), the
    count of ``code enhanced`` replies, the rate per 10,000 attempts with its 95 % Wilson interval
    and band, the same for the previous week, the change in rate per 10,000, and the ``peak``
    bucket (most such replies) of the week."""
    from . import metrics

    where = metrics.response_is(code=code, enhanced=enhanced)
    this_week, last_week, buckets = pl.collect_all(
        [metrics.rate(lf.filter(focus(provider)), where=where, bands=bands) for lf in (data.attempts, data.previous)]
        + [metrics.rate(data.attempts.filter(focus(provider)), where=where, bucket=bucket, bands=bands).sort(["count", "bucket"], descending=[True, False]).head(1)]
    )

    def row(frame: pl.DataFrame) -> dict:
        if frame.height == 0:
            return {"attempts": 0, "count": 0, "rate_per_10k": None, "ci_low_per_10k": None, "ci_high_per_10k": None, "band": None}
        return frame.row(0, named=True)

    now, before = row(this_week), row(last_week)
    change = None if now["rate_per_10k"] is None or before["rate_per_10k"] is None else now["rate_per_10k"] - before["rate_per_10k"]
    all_attempts = data.attempts.filter(metrics.is_mx_attempt()).select(pl.len()).collect().item()
    return {
        "week": data.week.label,
        "start": data.week.start,
        "end": data.week.end,
        "provider": provider,
        "response": f"{code} {enhanced}",
        "all_attempts": int(all_attempts),
        **now,
        "previous": {"week": data.week.previous().label, **before},
        "change_per_10k": change,
        "peak": buckets.row(0, named=True) if buckets.height and buckets["count"][0] > 0 else None,
    }


def headline_html(h: dict, *, tz: str = "UTC"):
    """The headline as an escaped HTML block."""
    from .tables import HtmlTable

    def fmt(v, spec=",.2f"):
        return "n/a" if v is None else format(v, spec)

    start = h["start"].astimezone(_zone(tz)).strftime("%a %Y-%m-%d %H:%M")
    end = (h["end"] - timedelta(seconds=1)).astimezone(_zone(tz)).strftime("%a %Y-%m-%d %H:%M %Z")
    band = h.get("band") or "n/a"
    prev = h["previous"]
    change = h["change_per_10k"]
    arrow = "" if change is None else ("up" if change > 0 else "down" if change < 0 else "unchanged")
    items = [
        f"<h2>Week {html.escape(h['week'])}</h2>",
        f'<p class="dk-note">{html.escape(start)} to {html.escape(end)}; {h["all_attempts"]:,} attempts against remote MX hosts in total.</p>',
        '<p class="dk-headline">',
        f"<b>{html.escape(h['provider'])}</b>: {h['attempts']:,} attempts, <b>{h['count']:,}</b> × {html.escape(h['response'])}, ",
        f"<b>{fmt(h['rate_per_10k'])} per 10,000 attempts</b> (95 % CI {fmt(h['ci_low_per_10k'])} to {fmt(h['ci_high_per_10k'])}), ",
        f'band <span class="dk-band-{html.escape(band)}">{html.escape(band)}</span>.<br>',
        f"Previous week ({html.escape(prev['week'])}): {prev['attempts']:,} attempts, {prev['count']:,} × {html.escape(h['response'])}, {fmt(prev['rate_per_10k'])} per 10,000",
        "" if change is None else f"; change {change:+,.2f} per 10,000 ({arrow}).",
        "</p>",
    ]
    peak = h.get("peak")
    if peak:
        when = peak["bucket"].astimezone(_zone(tz)).strftime("%a %Y-%m-%d %H:%M %Z")
        items.append(f'<p class="dk-note">Peak: {peak["count"]:,} of {peak["attempts"]:,} attempts in the bucket starting {html.escape(when)} ({fmt(peak["rate_per_10k"])} per 10,000).</p>')
    return HtmlTable("\n".join(items))


def _zone(tz: str):
    from zoneinfo import ZoneInfo

    return ZoneInfo(tz)


def rates_over_time(attempts: pl.LazyFrame, *, group: str, bucket: str = "1h", top_n: int = 10, code: int = 452, enhanced: str = "4.3.1", bands=None, where: pl.Expr | None = None) -> pl.DataFrame:
    """:func:`deferral_kit.metrics.rate` of ``code enhanced`` per ``group`` and bucket, for the
    ``top_n`` groups with the most such replies in the period (then the most attempts)."""
    from . import metrics

    lf = attempts if where is None else attempts.filter(where)
    lf = lf.filter(pl.col(group).is_not_null())
    rates = metrics.rate(lf, where=metrics.response_is(code=code, enhanced=enhanced), by=[group], bucket=bucket, bands=bands)
    top = rates.group_by(group).agg(pl.col("count").sum(), pl.col("attempts").sum()).sort(["count", "attempts", group], descending=[True, True, False]).head(top_n)
    return rates.join(top.select(group), on=group, how="semi").sort("bucket", group).collect()


def destination_table(attempts: pl.LazyFrame, *, top_n: int = 20, code: int = 452, enhanced: str = "4.3.1", bands=None) -> pl.DataFrame:
    """Per recipient domain: provider, ``attempts`` (tries against remote MX hosts), ``count`` of
    ``code enhanced``, ``rate_per_10k`` with its Wilson interval and band, ``other_4xx`` (other
    temporary replies or failures: 4xx codes), ``bounces`` (attempts that ended bounced).
    The ``top_n`` domains with the most such replies, then the most attempts."""
    from . import metrics

    mx = attempts.filter(metrics.is_mx_attempt())
    target = metrics.response_is(code=code, enhanced=enhanced)
    rates = metrics.rate(attempts, where=target, by=["recipient_domain"], bands=bands)
    extra = mx.group_by("recipient_domain").agg(
        pl.col("provider_family").drop_nulls().mode().first().alias("provider"),
        ((pl.col("smtp_code") // 100 == 4).fill_null(False) & ~target).sum().cast(pl.Int64).alias("other_4xx"),
        (pl.col("outcome") == "bounced").fill_null(False).sum().cast(pl.Int64).alias("bounces"),
    )
    return (
        rates.join(extra, on="recipient_domain", how="left", nulls_equal=True)
        .select("recipient_domain", "provider", "attempts", "count", "rate_per_10k", "ci_low_per_10k", "ci_high_per_10k", "band", "other_4xx", "bounces")
        .sort(["count", "attempts", "recipient_domain"], descending=[True, True, False], nulls_last=True)
        .head(top_n)
        .collect()
    )


def response_groups(attempts: pl.LazyFrame, *, limit: int = 30) -> pl.DataFrame:
    """Reply texts of temporary failures (4xx replies and deferred tries), normalized by
    :func:`deferral_kit.textnorm.normalize_response`, with their response class and likely side
    (:mod:`deferral_kit.classify`), most frequent first."""
    from .textnorm import group_responses

    temporary = ((pl.col("smtp_code") // 100 == 4) | (pl.col("outcome") == "deferred")).fill_null(False)
    have = attempts.collect_schema()
    describe = [c for c in ("response_class", "side") if c in have]
    return group_responses(attempts, where=temporary, describe=describe, limit=limit).collect()


def accounting_table(data: WeekData) -> pl.DataFrame:
    """What became of the input lines (whole input, not only the week): category, reason, lines."""
    acc = data.accounting
    if data.parquet or acc.table.height == 0:
        return pl.DataFrame({"format": ["parquet"], "category": ["attempt"], "reason": ["canonical rows in this period (Parquet input: no line accounting)"], "lines": [data.attempts.select(pl.len()).collect().item()]})
    return acc.summary().sort(["category", "lines"], descending=[False, True])


def charts_rendered() -> int:
    """How many charts the offline renderer has emitted in this kernel."""
    return _charts_rendered


def sender_column(attempts: pl.LazyFrame) -> str:
    """The column that tells sending IPs apart in this input: ``egress_ip`` when the logs say,
    else ``egress_pool``, else ``instance`` (Postfix logs name the instance, not the source IP)."""
    counts = attempts.select(pl.col(c).drop_nulls().len().alias(c) for c in ("egress_ip", "egress_pool", "instance")).collect().row(0, named=True)
    return next((c for c, n in counts.items() if n), "egress_ip")


def coerce_parameters(path: Path, raw: dict[str, str]) -> dict[str, Any]:
    """Command-line ``name=value`` strings converted to the types the notebook declares
    (``int``, ``float``, ``bool``, ``list``; anything else stays a string)."""
    import yaml

    declared = notebook_parameters(path)
    out: dict[str, Any] = {}
    for name, text in raw.items():
        kind = str(declared.get(name, {}).get("inferred_type_name", "")).strip()
        try:
            if kind == "int":
                out[name] = int(text)
            elif kind == "float":
                out[name] = float(text)
            elif kind == "bool":
                value = yaml.safe_load(text)
                if not isinstance(value, bool):
                    raise ValueError(f"not true/false: {text!r}")
                out[name] = value
            elif kind in ("list", "dict"):
                value = yaml.safe_load(text)
                out[name] = value if isinstance(value, (list, dict)) else [value]
            else:
                out[name] = text
        except (ValueError, yaml.YAMLError) as exc:
            raise InputError(f"parameter {name}={text!r}: expected {kind} ({exc})") from exc
    return out
