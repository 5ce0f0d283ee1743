"""Writers: render a :class:`~deferral_kit.sample.world.World` as the files a real MTA or ESP writes.

Each writer module has ``write(world, out_dir, *, rotate, gzip_old, ...) -> list[Path]``.
Local Postfix suspensions (``postfix/error``) exist only in the Postfix output; the other
formats have no equivalent record.  Queue expiry is written by Postfix, Exim, PowerMTA,
KumoMTA, Exchange and Mailgun; SendGrid, SES, SparkPost and Postmark exports have no record for it here.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

FORMATS = ("postfix", "exim", "powermta", "kumomta", "sendgrid", "exchange", "mailgun", "ses", "sparkpost", "postmark")


def write(world, fmt: str, out_dir, *, rotate: bool = True, gzip_old: bool = True, **kw) -> list[Path]:
    """Write ``world`` as ``fmt`` files into ``out_dir``; returns the paths, oldest first.

    ``rotate``: one file per UTC day, named the way the software rotates them;
    ``gzip_old``: compress older files as logrotate does.  Postfix also takes
    ``timestamps="syslog"|"rfc3339"``, ``noise=True|False`` and ``compress_all``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown sample format {fmt!r}; choose from {', '.join(FORMATS)}")
    mod = importlib.import_module(f"{__name__}.{fmt}")
    return mod.write(world, Path(out_dir), rotate=rotate, gzip_old=gzip_old, **kw)


def cli(args) -> int:
    """``deferral-kit sample``: generate the default world (with the Microsoft capacity and
    reputation episodes of :func:`~deferral_kit.sample.world.default_episodes`) and write it
    with ``truth.json`` (the exact counts a loader must reproduce)."""
    from ..world import WorldConfig, default_episodes, generate
    from ...cli import UsageError

    if args.format not in FORMATS:
        raise UsageError(f"--format {args.format!r}: the generator writes {', '.join(FORMATS)}")
    kw = {"days": args.days, "seed": args.seed}
    if args.messages_per_day:
        kw["messages_per_day"] = args.messages_per_day
    if getattr(args, "start", None):
        kw["start"] = args.start
    try:
        cfg = WorldConfig(**kw)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if not getattr(args, "no_episodes", False):
        cfg.episodes = default_episodes(cfg)
    world = generate(cfg)
    out = Path(args.out)
    wkw = {}
    if args.format == "postfix":
        wkw = {"timestamps": getattr(args, "timestamps", "syslog") or "syslog", "noise": not getattr(args, "no_noise", False),
               "compress_all": getattr(args, "compress_all", False)}
    paths = write(world, args.format, out, rotate=not getattr(args, "no_rotate", False), **wkw)
    (out / "truth.json").write_text(json.dumps(world.summary(), indent=1) + "\n")
    if getattr(args, "truth_parquet", False):
        (out / "truth").mkdir(exist_ok=True)
        world.truth.write_parquet(out / "truth" / "attempts.parquet")
        world.messages.write_parquet(out / "truth" / "messages.parquet")
    total = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} {args.format} file(s), {total / 1e6:.1f} MB, to {out}: {world.envelopes.height:,} messages, "
          f"{world.truth.height:,} attempts ({world.mx_attempts().height:,} against an MX)")
    print(f"truth: {out / 'truth.json'}; parse with: deferral-kit parse '{out / _GLOBS[args.format]}' --out attempts.parquet")
    return 0


# The log files of each format (the output folder also holds truth.json).
_GLOBS = {"postfix": "mail.log*", "exim": "mainlog*", "powermta": "acct-*.csv", "kumomta": "2*-*", "sendgrid": "sendgrid-events*.jsonl",
          "exchange": "MSGTRK*.LOG", "mailgun": "mailgun-events*.jsonl", "ses": "ses-events-*", "sparkpost": "sparkpost-events*.jsonl",
          "postmark": "postmark-webhooks*.jsonl"}
