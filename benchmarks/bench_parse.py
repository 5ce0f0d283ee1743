"""Parse throughput on one large Postfix log: ``deferral-kit parse`` vs ``grep -c`` vs ``pflogsumm``.

    .venv/bin/python benchmarks/bench_parse.py [--messages-per-day 80000] [--skip-pflogsumm] [--repeat 3]

Generates (once, cached under benchmarks/out/) a 7-day Postfix log of >= 5 million lines
with the sample generator, then runs on the same file:

* ``deferral-kit parse FILE --out ...parquet`` (the canonical attempts table),
* ``grep -c status=deferred FILE`` (the I/O floor: one pass over the bytes),
* ``pflogsumm`` (the tool analysts use today; ``--syslog-name`` matches the
  multi-instance ``postfix-<ip>`` names),

and prints wall time, lines/s, MB/s and peak RSS (``/usr/bin/time``) side by side.  A
shared machine's speed varies from run to run: ``--repeat N`` runs the parse N times and
shows every run, and the ratio to pflogsumm on the same run is the figure that compares.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import OUT, cached_world_files, machine_note, timed  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages-per-day", type=int, default=80_000, help="volume of the generated log (default 80,000: about 5.2 M lines)")
    ap.add_argument("--days", type=int, default=7)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--skip-pflogsumm", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="run the parse this many times (shared machines vary run to run)")
    args = ap.parse_args(argv)

    folder, meta = cached_world_files(f"postfix-{args.days}d-{args.messages_per_day}", "postfix", days=args.days, seed=args.seed,
                                      messages_per_day=args.messages_per_day)
    log = folder / meta["files"][0]
    size_mb = log.stat().st_size / 1e6
    with open(log, "rb") as fh:
        n_lines = sum(buf.count(b"\n") for buf in iter(lambda: fh.read(1 << 24), b""))
    print(f"input: {log} ({n_lines:,} lines, {size_mb:,.0f} MB; {meta['messages']:,} messages, {meta['truth_attempts']:,} attempts)")
    print(machine_note())
    from deferral_kit.loaders import postfix

    workers, batch = postfix._plan()
    print(f"postfix loader: {workers} blocks parsed at once, {batch / (1 << 20):.1f} MB each (one per thread of polars' pool, 2 to 8)")

    exe = Path(sys.executable).with_name("deferral-kit")
    runs = []
    out = OUT / "parse.parquet"
    for i in range(args.repeat):
        wall, rss, proc = timed([str(exe), "parse", str(log), "--out", str(out)], stdout=subprocess.PIPE)
        got = next((ln for ln in proc.stdout.splitlines() if ln.startswith("attempts:")), "")
        runs.append(("deferral-kit parse -> Parquet" + (f" #{i + 1}" if args.repeat > 1 else ""), wall, rss, got))
    wall, rss, proc = timed(["grep", "-c", "status=deferred", str(log)], stdout=subprocess.PIPE)
    runs.append(("grep -c status=deferred", wall, rss, f"{int(proc.stdout.strip()):,} lines"))
    pfl = shutil.which("pflogsumm") or "/usr/sbin/pflogsumm"
    if not args.skip_pflogsumm and Path(pfl).exists():
        wall, rss, proc = timed([pfl, "--syslog-name=postfix-[0-9.]+", "--problems-first", str(log)], stdout=subprocess.PIPE)
        deferred = next((" ".join(ln.split()) for ln in proc.stdout.splitlines() if re.match(r"\s*\d+\s+deferred", ln)), "")
        runs.append(("pflogsumm", wall, rss, deferred))

    print()
    print(f"{'tool':<32} {'wall s':>8} {'lines/s':>12} {'MB/s':>8} {'peak RSS MB':>12}  result")
    for name, wall, rss, note in runs:
        print(f"{name:<32} {wall:>8.1f} {n_lines / wall:>12,.0f} {size_mb / wall:>8.1f} {rss:>12,.0f}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
