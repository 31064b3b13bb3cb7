"""The data interval a job works on, and the command-line arguments every job shares.

A batch job processes exactly one interval ``[start, end)``; its ``batch_date`` (the start date) tags
the rows it writes, so re-running the interval replaces its own rows and nothing else.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from freshrec.settings import Settings, load_settings


@dataclass(frozen=True)
class DataInterval:
    start: datetime
    end: datetime

    @property
    def batch_date(self) -> str:
        return self.start.strftime("%Y-%m-%d")

    @classmethod
    def for_day(cls, day: str | datetime) -> "DataInterval":
        start = parse_instant(day) if isinstance(day, str) else day
        start = start.astimezone(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
        return cls(start, start + timedelta(days=1))


def parse_instant(text: str) -> datetime:
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not a date or timestamp: {text!r}; use YYYY-MM-DD or an ISO-8601 "
                         "timestamp") from None
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def job_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--date", help="the interval's day (YYYY-MM-DD): [date, date+1)")
    p.add_argument("--start", help="interval start (ISO-8601); with --end instead of --date")
    p.add_argument("--end", help="interval end, exclusive (ISO-8601)")
    p.add_argument("--profile", help="settings profile (default: FRESHREC_PROFILE or local)")
    return p


def parse_job_args(description: str, argv: list[str] | None,
                   extra: "callable | None" = None) -> tuple[argparse.Namespace, Settings,
                                                             DataInterval]:
    p = job_parser(description)
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    if args.start and args.end:
        interval = DataInterval(parse_instant(args.start), parse_instant(args.end))
    elif args.date:
        interval = DataInterval.for_day(args.date)
    else:
        p.error("give the data interval: --date YYYY-MM-DD, or --start and --end")
    if interval.end <= interval.start:
        p.error(f"the interval end {interval.end} must be after its start {interval.start}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args, load_settings(args.profile), interval


def run_job(run: "callable", description: str, argv: list[str] | None) -> dict:
    """The ``main`` of a batch job: parse the shared arguments, then ``run(settings, interval)``
    (files it creates: the owner's only)."""
    from freshrec.storage.crypto import private_umask

    private_umask()
    _, settings, interval = parse_job_args(description, argv)
    from freshrec.privacy.volume import check_volume_encryption

    # refuses, naming the setting and the job (the docstring's head: 'Ingest: ...' -> 'ingest')
    check_volume_encryption(settings, description.split(":", 1)[0].strip().lower())
    return run(settings, interval)
