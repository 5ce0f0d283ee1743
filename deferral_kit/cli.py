"""The ``deferral-kit`` command: parse, rates, sample, report, incidents, schema.

Each subcommand is registered by one ``_add_<name>`` function below; the work itself is
done by library functions so notebooks and the CLI give the same numbers.
Exit status: 0 on success, 2 on bad input or usage (the message says which file and why),
1 on any other failure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import polars as pl

from . import schema
from .sources import InputError


class UsageError(Exception):
    """Bad arguments or input: reported on stderr, exit status 2."""


def _add_input_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", default="auto", help="log format, or auto to detect each file from its content (default: auto)")
    p.add_argument("--tz", default="UTC", help="time zone of timestamps written without an offset (syslog, Exim), e.g. Europe/Berlin (default: UTC)")
    p.add_argument("--year", type=int, default=None, help="year of year-less syslog timestamps (default: inferred from each file's modification time)")
    p.add_argument("--keep-duplicates", action="store_true", help="do not drop lines identical to one already read from another file")
    p.add_argument("--mapping", default=None, metavar="FILE", help="YAML column mapping for --format generic (CSV / JSON lines from in-house pipelines); implies --format generic when --format is auto")


def read_input(inputs: list[str], args: argparse.Namespace, *, quiet: bool = False):
    """Attempts (and the Load, for logs) from log files or canonical Parquet files."""
    from .loaders import Load, LoadOptions, load

    if inputs and all(str(p).endswith(".parquet") for p in inputs):
        for p in inputs:
            if not Path(p).exists():
                raise InputError(f"{p}: no such file or directory")
        lf = pl.scan_parquet(inputs)
        try:
            schema.validate(lf)
        except schema.SchemaError as exc:
            raise InputError(f"{', '.join(inputs)}: not a deferral_kit attempts table ({exc})") from exc
        return Load(attempts=lf)
    mapping = None
    if getattr(args, "mapping", None):
        from .loaders.generic import load_mapping

        mapping = load_mapping(args.mapping)
    opts = LoadOptions(tz=args.tz, year=args.year, mapping=mapping, dedupe=not getattr(args, "keep_duplicates", False))
    fmt = "generic" if mapping is not None and args.format == "auto" else args.format
    return load(inputs, format=fmt, options=opts)


# --- parse ---------------------------------------------------------------------------------

def _add_parse(sub) -> None:
    p = sub.add_parser("parse", help="parse logs into the canonical attempts table (Parquet) and print the line accounting")
    p.add_argument("inputs", nargs="+", metavar="LOG", help="log files, directories or globs (.gz/.zst read transparently)")
    _add_input_options(p)
    p.add_argument("--out", required=True, help="attempts Parquet file to write; connection events go next to it as <name>.connections.parquet")
    p.set_defaults(func=_cmd_parse)


def _cmd_parse(args) -> int:
    res = read_input(args.inputs, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    conn_out = out.with_name(out.stem + ".connections.parquet")
    tmp, ctmp = out.with_suffix(".parquet.part"), conn_out.with_suffix(".parquet.part")
    # zstd level 1: the size of the default level 3 (within 2 %) in half the time
    pl.collect_all([res.attempts.sink_parquet(tmp, compression_level=1, lazy=True), res.connections.sink_parquet(ctmp, compression_level=1, lazy=True)])
    tmp.replace(out)
    ctmp.replace(conn_out)
    n_att = pl.scan_parquet(out).select(pl.len()).collect().item()
    n_conn = pl.scan_parquet(conn_out).select(pl.len()).collect().item()
    print(res.accounting.to_text())
    print(f"attempts: {n_att:,} -> {out}")
    print(f"connection events: {n_conn:,} -> {conn_out}")
    if n_att == 0:
        # (per-connection replies alone, e.g. an excerpt without its status= line, are written
        # but are not tries: say so, so the file beside the output is not a surprise)
        events = "1 connection event" if n_conn == 1 else f"{n_conn:,} connection events"
        extra = f" ({events} without a final record written to {conn_out})" if n_conn else ""
        print(f"error: no delivery attempts found in {', '.join(args.inputs)}{extra}", file=sys.stderr)
        return 2
    return 0


# --- rates ---------------------------------------------------------------------------------

def _add_rates(sub) -> None:
    p = sub.add_parser("rates", help="rate of a response per 10,000 attempts, grouped and bucketed, with 95%% Wilson intervals and bands")
    p.add_argument("inputs", nargs="+", metavar="LOG-or-PARQUET")
    _add_input_options(p)
    p.add_argument("--by", default="recipient_domain", help="comma-separated grouping columns, e.g. recipient_domain,mx_host (default: recipient_domain); 'provider' is derived from mx_host")
    p.add_argument("--bucket", default=None, help="time bucket such as 5m, 1h, 1d (default: whole period)")
    p.add_argument("--code", type=int, default=452, help="SMTP reply code to count (default: 452)")
    p.add_argument("--enhanced", default="4.3.1", help="enhanced status code to count; '' for any (default: 4.3.1)")
    p.add_argument("--class", dest="response_class", default=None, help="count a response class instead of a code (e.g. capacity, rate_limit)")
    p.add_argument("--bands", default=None, help="YAML file overriding the threshold bands")
    p.add_argument("--top", type=int, default=30, help="rows to print (default: 30); ignored with --csv")
    p.add_argument("--csv", action="store_true", help="print all rows as CSV")
    p.set_defaults(func=_cmd_rates)


def _cmd_rates(args) -> int:
    from . import metrics

    res = read_input(args.inputs, args)
    by = [c.strip() for c in args.by.split(",") if c.strip()]
    table = metrics.rates_table(
        res.attempts,
        by=by,
        bucket=args.bucket,
        code=args.code,
        enhanced=args.enhanced or None,
        response_class=args.response_class,
        bands=metrics.load_bands(args.bands) if args.bands else None,
    ).collect()
    if table.height == 0 or table["attempts"].sum() == 0:
        # (suspensions and local deliveries alone give no rate: say so rather than print a table of zeros)
        print(f"error: no delivery attempts against a remote host in {', '.join(args.inputs)}", file=sys.stderr)
        return 2
    if args.csv:
        sys.stdout.write(table.write_csv())
    else:
        with pl.Config(tbl_rows=args.top, tbl_cols=-1, tbl_width_chars=200, fmt_str_lengths=60):
            print(table.head(args.top))
        if table.height > args.top:
            print(f"({table.height - args.top:,} more rows; --csv for all)")
    return 0


# --- sample --------------------------------------------------------------------------------

def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="write a realistic generated log (with its known truth) for demos, tests and benchmarks")
    p.add_argument("--out", required=True, help="directory to write into")
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--format", default="postfix", help="log format to write (default: postfix)")
    p.add_argument("--messages-per-day", type=int, default=None, help="volume (default: the generator's)")
    p.add_argument("--start", default=None, help="first day (UTC midnight), e.g. 2026-11-16 (default: Monday of 2026-W47)")
    p.add_argument("--timestamps", choices=("syslog", "rfc3339"), default="syslog", help="postfix: 'Nov 16 00:00:03' or rsyslog high-precision RFC 3339 stamps (default: syslog)")
    p.add_argument("--no-episodes", action="store_true", help="background deferrals only (no Microsoft capacity / reputation episode)")
    p.add_argument("--no-noise", action="store_true", help="postfix: leave out noise lines (postscreen, anvil, opendkim, TLS)")
    p.add_argument("--compress-all", action="store_true", help="postfix: every day gzipped (mail.log.1.gz ... as after a rotation without delaycompress)")
    p.add_argument("--no-rotate", action="store_true", help="one file instead of one per day")
    p.add_argument("--truth-parquet", action="store_true", help="also write the intended attempts to <out>/truth/attempts.parquet")
    p.set_defaults(func=_cmd_sample)


def _cmd_sample(args) -> int:
    from . import sample

    return sample.cli(args)


# --- schema --------------------------------------------------------------------------------

def _add_schema(sub) -> None:
    p = sub.add_parser("schema", help="print the canonical attempts and connection-event columns")
    p.set_defaults(func=lambda args: print("attempts\n\n" + schema.describe(schema.ATTEMPT_COLUMNS) + "\n\nconnection events\n\n" + schema.describe(schema.CONNECTION_COLUMNS)) or 0)


# --- report / incidents are registered by their modules' owners below ------------------------

def _add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="run a report notebook (papermill) and export a self-contained offline HTML file to <out>/<week>/",
        description="Runs notebooks/<NAME>.ipynb with papermill (kernel python3), exports it to HTML without code "
        "(Vega embedded once, nothing fetched from the network), writes <out>/<week>/<NAME>.html, the executed "
        "notebook and <NAME>.metrics.json, and rewrites <out>/index.html.  A failed run exits non-zero and leaves "
        "earlier reports as they were.",
    )
    p.add_argument("--input", dest="inputs", action="append", default=None, metavar="PATH",
                   help="log file, directory, glob or canonical Parquet file (repeatable; default: the bundled sample data/sample/)")
    p.add_argument("--week", default=None, help="last (last complete ISO week, UTC), an ISO week like 2026-W47, or data (busiest week of the input); "
                   "default: the sample's week for the bundled sample, else last")
    p.add_argument("--format", default=None, help="log format of the input (default: auto)")
    p.add_argument("-p", "--param", dest="params", action="append", default=[], metavar="NAME=VALUE",
                   help="notebook parameter (repeatable), e.g. -p display_tz=Europe/Berlin -p top_n=15")
    p.add_argument("--params", dest="params_file", default=None, metavar="YAML", help="YAML file of notebook parameters (-p and the options above win)")
    p.add_argument("--notebook", default="weekly_report", metavar="NAME", help="notebook in notebooks/ to run (default: weekly_report)")
    p.add_argument("--out", default="reports", help="reports folder (default: reports)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. under cron)")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args) -> int:
    import yaml

    from . import report
    from .sources import discover

    nb = report.notebook_path(args.notebook)
    params: dict = {}
    if args.params_file:
        try:
            doc = yaml.safe_load(Path(args.params_file).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise UsageError(f"{args.params_file}: cannot read parameters ({exc})") from exc
        if not isinstance(doc, dict):
            raise UsageError(f"{args.params_file}: expected a mapping of parameter names to values")
        params.update(doc)
    raw = {}
    for item in args.params:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"-p {item!r}: expected NAME=VALUE")
        raw[name.strip()] = value
    params.update(report.coerce_parameters(nb, raw))
    if args.inputs:
        params["inputs"] = args.inputs
    if args.week:
        params["week"] = args.week
    if args.format:
        params["input_format"] = args.format
    if "inputs" in params:
        inputs = [params["inputs"]] if isinstance(params["inputs"], str) else list(params["inputs"])
        discover(inputs)  # a missing file fails here, before a kernel starts
        params["inputs"] = [str(Path(x).resolve()) if not any(c in str(x) for c in "*?[") else str(Path.cwd() / x) for x in inputs]
    import signal

    # systemd/cron stop a run with SIGTERM: exit through Python so the staging folder is removed
    try:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    except ValueError:  # not the main thread (embedded use): leave signals alone
        pass
    try:
        report.run(notebook=args.notebook, parameters=params, out=args.out, progress=not args.no_progress)
    except report.ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(f"error: no report written; earlier reports in {args.out} are unchanged", file=sys.stderr)
        return 1
    return 0


def _add_incidents(sub) -> None:
    p = sub.add_parser("incidents", help="list deferral episodes per provider or destination (Wilson lower bound in the throttle/incident band)")
    p.add_argument("inputs", nargs="+", metavar="LOG-or-PARQUET")
    _add_input_options(p)
    p.add_argument("--provider", default=None, help="only this provider or provider family, e.g. microsoft or microsoft_365")
    p.add_argument("--by", default="provider", choices=["provider", "provider_family", "recipient_domain", "mx_host"], help="group episodes by (default: provider)")
    p.add_argument("--class", dest="response_class", default=None, help="detect a response class (capacity, reputation, rate_limit, ... or 'all' for one pass per class) instead of a reply code")
    p.add_argument("--code", type=int, default=452, help="SMTP reply code to detect when no --class (default: 452)")
    p.add_argument("--enhanced", default="4.3.1", help="enhanced status code to detect; '' for any (default: 4.3.1)")
    p.add_argument("--bucket", default="1h", help="time bucket of the rates (default: 1h)")
    p.add_argument("--merge-gap", default="1h", help="merge hot buckets at most this far apart (default: 1h)")
    p.add_argument("--min-count", type=int, default=3, help="matching replies a bucket needs to count as evidence (default: 3)")
    p.add_argument("--bands", default=None, help="YAML file overriding the threshold bands")
    p.add_argument("--own-infrastructure", default=None, metavar="YAML", help="our own relays/smarthosts (replies from them are sender-side), shaped like deferral_kit/data/own_infrastructure.example.yaml")
    p.add_argument("--json", action="store_true", help="print the episodes as JSON (one object per episode)")
    p.set_defaults(func=_cmd_incidents)


def _cmd_incidents(args) -> int:
    import json

    from . import incidents, metrics
    from .classify import with_classes

    res = read_input(args.inputs, args)
    # classify once and keep the table: detection reads it several times, logs would be re-parsed
    try:
        attempts = with_classes(res.attempts, own_infrastructure=args.own_infrastructure).collect().lazy()
    except ValueError as exc:  # an unreadable own-infrastructure file
        raise UsageError(str(exc)) from exc
    if args.provider:
        attempts = attempts.filter((pl.col("provider") == args.provider) | (pl.col("provider_family") == args.provider))
    try:
        episodes = incidents.detect(
            attempts,
            by=[args.by],
            bucket=args.bucket,
            code=None if args.response_class else args.code,
            enhanced=None if args.response_class else (args.enhanced or None),
            response_class=args.response_class,
            bands=metrics.load_bands(args.bands) if args.bands else None,
            min_count=args.min_count,
            merge_gap=args.merge_gap,
        )
    except ValueError as exc:  # a bucket or gap that is not a duration
        raise UsageError(f"incidents: {exc}") from exc
    if args.json:
        rows = [{k: (v.isoformat() if hasattr(v, "isoformat") else v.total_seconds() if hasattr(v, "total_seconds") else v) for k, v in r.items()}
                for r in episodes.iter_rows(named=True)]
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    if episodes.height == 0:
        print("no episodes: no bucket had the rate's 95% lower bound in the throttle or incident band")
        return 0
    print(incidents.to_text(episodes, by=[args.by]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deferral-kit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_parse, _add_rates, _add_sample, _add_report, _add_incidents, _add_schema):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (InputError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
