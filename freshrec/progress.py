"""Progress of long steps, carried by log records.

A job calls :func:`advance` where it finishes a piece of a long step (a model fitted, an epoch
trained, a batch job done): it logs one INFO line, as before, with ``(step, done, total)`` attached
under :data:`KEY`. ``freshrec`` draws those records as progress bars (plain lines when stderr is not
a terminal); under plain logging (Airflow, spark-submit) they are ordinary log lines.
"""

from __future__ import annotations

import logging

KEY = "freshrec_progress"


def advance(logger: logging.Logger, step: str, done: int, total: int | None, msg: str,
            *args: object) -> None:
    """Log ``msg % args`` at INFO, marked as ``done`` of ``total`` (None: unknown) in ``step``."""
    logger.info(msg, *args, extra={KEY: (step, done, total)})
