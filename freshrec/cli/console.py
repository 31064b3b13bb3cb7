"""What ``freshrec`` shows a person or a script: results on stdout (text, or one JSON object with
``--json``), progress and warnings on stderr, and every error as one line with what to do."""

from __future__ import annotations

import json
import logging
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from freshrec.progress import KEY

# Loggers whose INFO lines are freshrec's own progress; other libraries show warnings only.
OWN = ("freshrec", "spark_jobs", "training", "serving", "recmodels", "dags", "__main__")


@dataclass
class Output:
    """Where a command writes. ``say`` is for people (dropped under ``--json``); ``result`` is the
    command's outcome, printed as JSON at the end under ``--json``."""

    json_mode: bool = False
    quiet: bool = False
    data: dict[str, Any] = field(default_factory=dict)

    def say(self, *parts: object) -> None:
        if not self.json_mode:
            print(*parts, flush=True)

    def result(self, **data: Any) -> None:
        self.data.update(data)

    def flush_json(self) -> None:
        if self.json_mode:
            print(json.dumps(self.data, default=str, indent=2), flush=True)


def _own(name: str) -> bool:
    return name.split(".", 1)[0] in OWN


class ProgressView(logging.Handler):
    """Turns log records into the terminal view. On a terminal: a spinner line showing the latest
    progress message, one bar per step that reports ``done/total`` (see freshrec.progress), and
    warnings above them. Elsewhere: each progress record as one line. ``verbose`` (-v) prints every
    INFO line of freshrec's own modules too, ``-vv`` everything at DEBUG; ``quiet`` only errors."""

    def __init__(self, verbosity: int, quiet: bool, tty: bool | None = None):
        super().__init__(logging.DEBUG)
        self.verbosity, self.quiet = verbosity, quiet
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.progress = None
        self.tasks: dict[str, Any] = {}
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        if self.tty and not quiet:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn,
                                       TextColumn, TimeElapsedColumn)

            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TimeElapsedColumn(),
                                     console=Console(stderr=True), transient=False)
        self.started = False  # the live display starts with the first bar (not for `serve`)

    def _start(self) -> None:
        if self.progress is not None and not self.started:
            self.progress.start()
            self.started = True

    def _line(self, text: str) -> None:
        if self.progress is not None and self.started:
            self.progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            mark = getattr(record, KEY, None)
            if record.levelno >= logging.ERROR or (record.levelno >= logging.WARNING and not self.quiet):
                self._line(f"{record.levelname.lower()}: {msg}" if _own(record.name)
                           else self.format(record))
                return
            if self.quiet:
                return
            own = _own(record.name)
            if mark is not None and own:
                self._progress(mark, msg)
                if self.verbosity >= 1 and self.progress is not None:
                    self._line(msg)
                return
            if (own and self.verbosity >= 1) or self.verbosity >= 2:
                self._line(msg if own else self.format(record))
        except Exception:  # a view must never break a job
            self.handleError(record)

    def _progress(self, mark: tuple, msg: str) -> None:
        step, done, total = mark
        if self.progress is None:
            self._line(f"[{done}/{total}] {msg}" if total else msg)
            return
        short = msg.splitlines()[0][:90] if msg else step
        self._start()
        if step not in self.tasks:
            self.tasks[step] = self.progress.add_task(short, total=total)
        self.progress.update(self.tasks[step], completed=done, total=total, description=short)

    def task(self, step: str, total: int | None) -> None:
        """Open a bar for ``step`` before its first record (so it shows while the first piece runs)."""
        if self.progress is not None and step not in self.tasks:
            self._start()
            self.tasks[step] = self.progress.add_task(step, total=total)

    def close(self) -> None:
        if self.progress is not None and self.started:
            self.progress.stop()
        self.progress = None
        super().close()


@contextmanager
def view(verbosity: int, quiet: bool) -> Iterator[ProgressView]:
    """Install the view on the root logger for one command; remove it afterwards."""
    root = logging.getLogger()
    handler = ProgressView(verbosity, quiet)
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO)
    for noisy in ("py4j", "urllib3", "alembic", "matplotlib", "PIL", "filelock", "fsspec", "asyncio",
                  "httpx", "git"):
        if verbosity < 2:
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        yield handler
    finally:
        handler.close()
        if handler in root.handlers:
            root.removeHandler(handler)
        root.setLevel(old_level)


# ---- errors: one line, with what to do ---------------------------------------------------------

GRPC_FIXES = {
    "UNAVAILABLE": "is the server up? start it with `freshrec serve`, or point --server (or "
                   "serving.host/serving.port) at a running one",
    "UNAUTHENTICATED": "pass a valid bearer token with --token or FRESHREC_TOKEN (its SHA-256 must "
                       "be listed in serving.tokens)",
    "PERMISSION_DENIED": "this call needs a token with the admin role (refresher.token / "
                         "FRESHREC_ADMIN_TOKEN)",
    "DEADLINE_EXCEEDED": "the server did not answer in time: check its load and logs, then retry",
    "RESOURCE_EXHAUSTED": "the server is rate-limiting or at its concurrency limit: retry later or "
                          "raise serving.rate_limit_per_second",
    "INVALID_ARGUMENT": "fix the request as the server says",
    "NOT_FOUND": "check the id or version you asked for",
    "FAILED_PRECONDITION": "the server is not ready for this call: see its logs",
    "UNIMPLEMENTED": "the server runs another version of the API: upgrade client or server",
}


def grpc_line(e: Exception, target: str | None = None) -> str | None:
    """One line for a grpc.RpcError: the status, where, the server's words and what to do."""
    if "grpc" not in sys.modules:
        return None
    import grpc

    if not isinstance(e, grpc.RpcError) or not hasattr(e, "code"):
        return None
    code = e.code().name if e.code() is not None else "UNKNOWN"
    details = (e.details() or "").splitlines()[0] if hasattr(e, "details") and e.details() else ""
    where = f" from {target}" if target else ""
    fix = GRPC_FIXES.get(code, "see the server's logs")
    return f"gRPC {code}{where}" + (f" ({details})" if details else "") + f": {fix}"


def error_line(e: BaseException, target: str | None = None) -> str:
    """The one line printed for an error a command raised."""
    line = grpc_line(e, target) if isinstance(e, Exception) else None
    if line:
        return line
    text = " ".join(str(e).split()) or type(e).__name__
    known = ("SettingsError", "ValueError", "FileNotFoundError", "RuntimeError", "LookupError",
             "KeyError", "FloatingPointError", "SubmitError", "RolloutFailed", "PermissionError",
             "NanLoss", "OSError", "StorageUnreachable", "EventsFileError")
    if type(e).__name__ not in known and not isinstance(e, (ValueError, LookupError, RuntimeError)):
        # not one of freshrec's own errors (which say what to do): name it, point at --debug
        text = f"{type(e).__name__}: {text} (unexpected: rerun with --debug for the traceback)"
    return text
