"""Erasing a user on request (``Admin.DeleteUser``, ``freshrec erase --user U``): the user's rows
leave the current tables AND every place a copy of them lies on disk.

What :func:`erase_user` does, in this order:

1. under the **exclusive erasure lock** (``<data>/privacy/erasure.lock``, ``flock``):

   * appends ``{"user_id": <pseudonym>, "erased_at": <time>}`` to the erasure log
     ``<data>/privacy/erasures.jsonl`` (fsynced; the pseudonym and the time, nothing else);
   * Delta DELETE of the user's rows in every table with a ``user_id`` column, and of
     ``impressions_dead_letter`` rows whose raw record names them;
   * rewrites the landing zone's Parquet files, the segments of the event and impression logs
     (open ones included, under their seal lock), every ``.npz`` under the snapshots directory
     (``users.npz``, the model's ``arrays.npz``: see :func:`scrub_npz`) and, given the raw id,
     the raw input files under ``<data>/raw``;
   * Delta VACUUM (``privacy.vacuum_retention_hours``, retention check off, ``_change_data``
     included) of those tables, then a checkpoint and a clean-up of the transaction log older
     than the same retention (the log's file statistics hold min/max user ids);
2. rewrites the MLflow artifacts (user factors, user id arrays, input examples) and tags each
   affected run or logged model ``freshrec.privacy.erasure``: with the embedded store, the files under
   every ``file:`` artifact location of the tracking store; with a tracking server
   (``http(s)://``, e.g. ``make mlflow-up`` with proxied artifacts), every run's and logged
   model's artifacts through MLflow's artifact API (:func:`scrub_remote_artifacts`: download,
   rewrite, upload to the same path). Appends the counts (no id) to
   ``<data>/privacy/erasure-reports.jsonl``.

**Writers cannot bring the rows back.** Every Delta write of :class:`freshrec.storage.delta.DeltaStore`,
the nearline ingest's MERGE, the feedback join and the landing of events hold the erasure lock
*shared* from reading the erasure log to their commit, and drop the rows of erased users whose
time is not after the erasure (:func:`drop_erased`). So a batch job that read the user's rows
before an erasure and commits after it writes them without those rows, and a job that committed
before is undone by the DELETE. Rows newer than the erasure (the user came back) are kept. The
lock is a ``flock``: it holds between processes of one host (a data directory shared between
hosts needs a file system whose ``flock`` works across them).

Replicas learn about erasures from the refresher: the erasure log's length is a version the
replica reports (``Admin.Status.delta_versions["erasures"]``); each round sends the users erased
since as ``remove_users``. A snapshot records the erasure log length it was built at, and
loading it drops users erased since.

Idempotent (a second erasure of the same user finds nothing and appends one more log line) and
safe to run concurrently (the exclusive lock serializes erasures between threads and processes).
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from freshrec.durable import fsync_path
from freshrec.settings import Settings

log = logging.getLogger(__name__)

# the time of a row, per table: rows of an erased user at or before the erasure are dropped
TIME_COLUMNS = {"events": ("ts",), "events_raw": ("ts",), "events_dead_letter": ("ts",),
                "impressions": ("ts",), "feedback": ("impression_ts", "event_ts"),
                "user_features": ("last_ts",)}
ERASED_ID = ""  # what an erased user's id becomes inside arrays whose shape must stay
_held = threading.local()


def privacy_dir(settings: Settings) -> Path:
    return settings.data_dir / "privacy"


def log_path(settings: Settings) -> Path:
    return privacy_dir(settings) / "erasures.jsonl"


def _lock_file(settings: Settings) -> Path:
    d = privacy_dir(settings)
    d.mkdir(parents=True, exist_ok=True)
    return d / "erasure.lock"


@contextmanager
def _flock(path: Path, how: int) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, how)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextmanager
def exclusive(settings: Settings) -> Iterator[None]:
    """Hold the erasure lock exclusively (no writer commits meanwhile). Re-entrant per thread."""
    if getattr(_held, "depth", 0):
        _held.depth += 1
        try:
            yield
        finally:
            _held.depth -= 1
        return
    with _flock(_lock_file(settings), fcntl.LOCK_EX):
        _held.depth = 1
        try:
            yield
        finally:
            _held.depth = 0


@dataclass
class Erasures:
    """The erasure log: (pseudonym, erased_at epoch seconds) in log order (read-only: shared
    between readers of the same file version)."""

    entries: list[tuple[str, float]] = field(default_factory=list)
    _by_user: dict[str, float] | None = field(default=None, repr=False, compare=False)
    _users: pa.Array | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def by_user(self) -> dict[str, float]:
        """Each erased user's newest erasure time."""
        if self._by_user is None:
            out: dict[str, float] = {}
            for u, t in self.entries:
                out[u] = max(t, out.get(u, t))
            self._by_user = out
        return self._by_user

    @property
    def users(self) -> pa.Array:
        if self._users is None:
            self._users = pa.array(list(self.by_user), pa.string())
        return self._users

    def since(self, n: int | None) -> list[str]:
        """Users erased at log positions >= ``n`` (all for None)."""
        return sorted({u for u, _ in self.entries[(n or 0):]})


_cache: dict[str, tuple[tuple, Erasures]] = {}
_cache_lock = threading.Lock()


def read_log(settings: Settings) -> Erasures:
    """The erasure log (a torn last line, cut by a crash before its fsync, is left out); parsed
    once per change of the file (inode, size, mtime)."""
    path = log_path(settings)
    try:
        st = path.stat()
    except FileNotFoundError:
        return Erasures()
    key = (st.st_ino, st.st_size, st.st_mtime_ns)
    with _cache_lock:
        hit = _cache.get(str(path))
    if hit is not None and hit[0] == key:
        return hit[1]
    out = _parse_log(path)
    with _cache_lock:
        _cache[str(path)] = (key, out)
    return out


def _parse_log(path: Path) -> Erasures:
    out = Erasures()
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines[-1].strip():
        log.warning("%s: the last line is torn (a crash while appending); it is ignored", path)
    for line in lines[:-1]:
        if line.strip():
            rec = json.loads(line)
            if "user_id" not in rec:  # the key-rotation marker
                continue
            out.entries.append((rec["user_id"], datetime.fromisoformat(rec["erased_at"])
                                .timestamp()))
    return out


@contextmanager
def guarded(settings: Settings) -> Iterator[Erasures]:
    """For writers: hold the erasure lock shared from reading the log to the commit. Inside an
    erasure (this thread holds it exclusively) it only reads the log."""
    if getattr(_held, "depth", 0):
        yield read_log(settings)
        return
    with _flock(_lock_file(settings), fcntl.LOCK_SH):
        yield read_log(settings)


def _row_seconds(value) -> float | None:
    """A row's time as epoch seconds: timestamps, ISO / epoch text; None when not a time."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
    from freshrec.contracts.events import parse_ts

    us = parse_ts(value)
    return None if us is None else us / 1e6


def drop_erased(name: str, table: pa.Table, erasures: Erasures) -> pa.Table:
    """``table`` without the rows of erased users whose time (the first non-null column of
    :data:`TIME_COLUMNS`; a row without one counts as old) is not after their erasure."""
    if not len(erasures) or table.num_rows == 0 or "user_id" not in table.column_names:
        return table
    when = erasures.by_user
    hit = pc.fill_null(pc.is_in(table.column("user_id"), value_set=erasures.users), False)
    rows = np.flatnonzero(hit.to_numpy(zero_copy_only=False))
    if not len(rows):
        return table
    cols = [c for c in TIME_COLUMNS.get(name, ()) if c in table.column_names]
    users = table.column("user_id").take(rows).to_pylist()
    times = [table.column(c).take(rows).to_pylist() for c in cols]
    keep = np.ones(table.num_rows, bool)
    for n, (r, u) in enumerate(zip(rows, users)):
        s = next((x for x in (_row_seconds(t[n]) for t in times) if x is not None), None)
        keep[r] = s is not None and s > when[u]
    dropped = int((~keep).sum())
    if dropped:
        log.info("%s: %d row(s) of erased users left out of the write", name, dropped)
    return table.filter(pa.array(keep))


def drop_erased_spark(name: str, df, erasures: Erasures):
    """:func:`drop_erased` for a Spark DataFrame (an anti-join on a small frame of erasures)."""
    if not len(erasures) or "user_id" not in df.columns:
        return df
    from pyspark.sql import functions as F

    spark = df.sparkSession
    er = spark.createDataFrame([(u, float(t)) for u, t in erasures.by_user.items()],
                               "_erased_user string, _erased_at double")
    cols = [c for c in TIME_COLUMNS.get(name, ()) if c in df.columns]
    t = F.coalesce(*[F.to_timestamp(F.col(c)).cast("double") for c in cols]) if cols else \
        F.lit(None).cast("double")
    cond = (F.col("user_id") == F.col("_erased_user")) & (t.isNull() | (t <= F.col("_erased_at")))
    return df.join(F.broadcast(er), cond, "left_anti")


# ---- the erasure ------------------------------------------------------------------------------
def _append_log(settings: Settings, pseudonym: str) -> float:
    path = log_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc)
    line = json.dumps({"user_id": pseudonym, "erased_at": now.isoformat()}).encode() + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_path(path.parent)
    return now.timestamp()


def user_tables() -> list[str]:
    from freshrec.storage.tables import TABLES

    return [n for n, s in TABLES.items() if "user_id" in s.schema.names] + \
        ["impressions_dead_letter"]


def _delete_rows(settings: Settings, pseudonym: str) -> dict[str, int]:

    from freshrec.storage.delta import DeltaStore, sql_literal

    store = DeltaStore(settings)
    removed: dict[str, int] = {}
    for name in user_tables():
        if not store.exists(name):
            continue
        like = sql_literal("%" + pseudonym + "%")
        cond = {"impressions_dead_letter": f"raw LIKE {like}",  # the raw record names them
                "events_dead_letter": f"user_id = {sql_literal(pseudonym)} OR context LIKE {like}"
                }.get(name, f"user_id = {sql_literal(pseudonym)}")
        metrics = store.table(name).delete(cond)
        removed[name] = int(metrics.get("num_deleted_rows", 0) or 0)
    return removed


def vacuum_user_tables(settings: Settings) -> dict[str, int]:
    """VACUUM every table that can hold user rows (``privacy.vacuum_retention_hours``, retention
    check off, ``_change_data`` included), then checkpoint and drop transaction-log entries older
    than the same retention (their file statistics name user ids). Returns files removed."""

    from freshrec.storage.delta import DeltaStore

    hours = settings.privacy.vacuum_retention_hours
    store = DeltaStore(settings)
    out: dict[str, int] = {}
    with exclusive(settings):  # no writer has files on disk that are not committed yet
        for name in user_tables():
            if not store.exists(name):
                continue
            dt = store.table(name)
            gone = dt.vacuum(retention_hours=math.ceil(hours), dry_run=False,
                             enforce_retention_duration=False, full=True)
            out[name] = len(gone)
            before = dt.metadata().configuration.get("delta.logRetentionDuration")
            dt.alter.set_table_properties(
                {"delta.logRetentionDuration": f"interval {int(hours * 3600)} seconds"},
                raise_if_not_exists=False)
            dt = store.table(name)
            dt.create_checkpoint()
            dt.cleanup_metadata()
            store.table(name).alter.set_table_properties(
                {"delta.logRetentionDuration": before or "interval 30 days"},
                raise_if_not_exists=False)
    return out


def _scrub_parquet(path: Path, needle: str, columns: tuple[str, ...] = ("user_id",),
                   cipher=None) -> int:
    """Rewrite a Parquet file without the rows whose ``columns`` equal ``needle``; rows removed.
    A sealed file (:mod:`freshrec.storage.crypto`) is opened with ``cipher`` and stays sealed."""
    from freshrec.storage.crypto import is_sealed, read_parquet, write_parquet

    if is_sealed(path):
        t = read_parquet(path, cipher)
        cols = [c for c in columns if c in t.column_names]
        hit = None
        for c in cols:
            h = pc.fill_null(pc.equal(t.column(c).cast(pa.string()), needle), False)
            hit = h if hit is None else pc.or_(hit, h)
        n = 0 if hit is None else int(pc.sum(hit.cast(pa.int64())).as_py() or 0)
        if n:
            write_parquet(path, t.filter(pc.invert(hit)), cipher)
        return n
    t = pq.read_table(path)
    cols = [c for c in columns if c in t.column_names]
    if not cols:
        return 0
    hit = None
    for c in cols:
        h = pc.fill_null(pc.equal(t.column(c).cast(pa.string()), needle), False)
        hit = h if hit is None else pc.or_(hit, h)
    n = int(pc.sum(hit.cast(pa.int64())).as_py() or 0)
    if n:
        tmp = path.with_name(f".{path.name}.erase.tmp")
        pq.write_table(t.filter(pc.invert(hit)), tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    return n


def _scrub_segments(settings: Settings, pseudonym: str) -> int:
    """Drop the user's lines from every segment of the event and impression logs (the open ones
    under their seal lock: an append never interleaves, and the writer reopens the new file)."""
    from freshrec.storage.crypto import cipher_for, open_line
    from freshrec.storage.segments import (OPEN, flocked, impressions_root, line_text, process_dirs,
                                   wal_root)

    cipher = cipher_for(settings)
    needle = pseudonym.encode()
    removed = 0
    for root in (wal_root(settings), impressions_root(settings)):
        if not root.exists():
            continue
        for proc_dir in process_dirs(root):
            with flocked(proc_dir / "seal.lock"):
                for seg in [proc_dir / OPEN, *sorted(proc_dir.glob("sealed-*.jsonl"))]:
                    if not seg.exists():
                        continue
                    lines = seg.read_bytes().split(b"\n")
                    kept = []
                    for n, line in enumerate(lines):
                        try:
                            plain = line if n == len(lines) - 1 else \
                                open_line(line, cipher, str(seg))
                        except ValueError:  # sealed under another key: cannot be read here
                            plain = line
                        if needle in plain or needle in line_text(plain):
                            removed += 1
                        else:
                            kept.append(line)
                    if len(kept) == len(lines):
                        continue
                    tmp = seg.with_name(f".{seg.name}.erase.tmp")
                    tmp.write_bytes(b"\n".join(kept))
                    fsync_path(tmp)
                    os.replace(tmp, seg)
                    fsync_path(proc_dir)
    return removed


def scrub_arrays(arrays: dict[str, np.ndarray], needle: str) -> bool:
    """Remove ``needle`` (a user id) from arrays in the ``.npz`` layouts of snapshots and model
    artifacts, in place, keeping every array's shape: its entry in ``user_ids`` becomes ``""``,
    its row of every per-user array (first dimension = number of users) becomes zeros, and its
    row of every CSR matrix over users (``<prefix>indptr`` of length users + 1, with the data
    arrays of the same prefix) becomes empty. Any other string array loses the value too.
    Returns whether anything changed."""
    changed = False
    ids = arrays.get("user_ids")
    if ids is not None and ids.dtype.kind in "UO":
        hit = np.flatnonzero(ids.astype(str) == needle)
        if len(hit):
            changed = True
            n = len(ids)
            ids = ids.astype(str).copy()
            ids[hit] = ERASED_ID
            arrays["user_ids"] = ids
            groups = {k[:-len("indptr")]: k for k, v in arrays.items()
                      if k.endswith("indptr") and v.ndim == 1 and len(v) == n + 1}
            in_csr: set[str] = set()
            for prefix, key in groups.items():
                ptr = arrays[key].astype(np.int64)
                data_keys = [k for k, v in arrays.items() if k.startswith(prefix) and k != key
                             and not k.endswith("indptr") and v.ndim >= 1
                             and len(v) == ptr[-1] and k != "user_ids"]
                keep = np.ones(int(ptr[-1]), bool)
                for r in hit:
                    keep[ptr[r]:ptr[r + 1]] = False
                lengths = np.diff(ptr)
                lengths[hit] = 0
                arrays[key] = np.r_[0, np.cumsum(lengths)].astype(arrays[key].dtype)
                for k in data_keys:
                    arrays[k] = arrays[k][keep]
                in_csr.update(data_keys + [key])
            for k, v in list(arrays.items()):
                if k == "user_ids" or k in in_csr or v.ndim == 0 or len(v) != n \
                        or v.dtype.kind in "UO":
                    continue
                v = v.copy()
                v[hit] = 0
                arrays[k] = v
    for k, v in list(arrays.items()):
        if v.dtype.kind in "UO" and v.size:
            s = v.astype(str)
            if (s == needle).any():
                arrays[k] = np.where(s == needle, ERASED_ID, s)
                changed = True
    return changed


def scrub_npz(path: Path, needle: str, cipher=None) -> bool:
    """:func:`scrub_arrays` on one ``.npz`` file (sealed or not), rewritten atomically when it
    changed; returns whether it did."""
    from freshrec.storage.crypto import is_sealed, load_npz, save_npz

    arrays = load_npz(path, cipher)
    if not scrub_arrays(arrays, needle):
        return False
    save_npz(path, arrays, cipher if is_sealed(path) else None)
    return True


def scrub_tree(root: Path, needle: str, cipher=None, text: bool = True,
               parquet_columns: tuple[str, ...] = ("user_id",)) -> tuple[list[Path], list[Path]]:
    """Remove ``needle`` from every file under ``root``: ``.npz`` (:func:`scrub_npz`), Parquet
    (rows whose ``parquet_columns`` equal it) and, with ``text``, UTF-8 text files (each
    occurrence replaced by ``erased``). Returns (files rewritten, files that still hold it and
    could not be rewritten: binary formats)."""
    changed: list[Path] = []
    stuck: list[Path] = []
    if not root.exists():
        return changed, stuck
    raw = needle.encode()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        if path.suffix == ".lock":
            continue
        if path.suffix == ".npz":
            if scrub_npz(path, needle, cipher):
                changed.append(path)
            continue
        if path.suffix == ".parquet":
            if _scrub_parquet(path, needle, parquet_columns):
                changed.append(path)
            continue
        if not text or path.stat().st_size > 256 << 20:
            continue
        data = path.read_bytes()
        if raw not in data:
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            stuck.append(path)
            continue
        tmp = path.with_name(f".{path.name}.erase.tmp")
        tmp.write_bytes(data.replace(raw, b"erased"))
        fsync_path(tmp)
        os.replace(tmp, path)
        changed.append(path)
    return changed, stuck


def _artifact_roots(settings: Settings) -> list[Path]:
    """Local directories of the tracking store's artifacts: the configured location and every
    experiment's ``file:`` location that lies in it or in the data directory (a location
    elsewhere belongs to another deployment, e.g. the one this data directory was copied from:
    it is named in a warning and left alone)."""
    roots = []
    own = None
    if settings.mlflow_artifact_location.startswith("file:"):
        own = Path(unquote(urlparse(settings.mlflow_artifact_location).path)).resolve()
        roots.append(own)
    uri = settings.mlflow_tracking_uri
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        return [r for r in roots if r.exists()]  # no tracking store yet: nothing logged
    try:
        from mlflow.tracking import MlflowClient

        from freshrec.tracking import mlflow_for

        mlflow_for(settings)
        for e in MlflowClient().search_experiments():
            loc = e.artifact_location or ""
            if loc.startswith("file:"):
                roots.append(Path(unquote(urlparse(loc).path)))
            elif loc.startswith("/"):
                roots.append(Path(loc))
    except Exception as e:  # noqa: BLE001 - no tracking store: only the configured location
        log.warning("erasure: cannot list the MLflow experiments (%s); scrubbing %s only", e,
                    roots)
    out: list[Path] = []
    data = settings.data_dir.resolve()
    for r in roots:
        r = r.resolve()
        if not (r.is_relative_to(data) or (own is not None and r.is_relative_to(own))):
            log.warning("erasure: MLflow artifact location %s is outside %s and the configured "
                        "artifact location: not rewritten here (erase there too)", r, data)
            continue
        if r.exists() and not any(r == o or r.is_relative_to(o) for o in out):
            out = [o for o in out if not o.is_relative_to(r)] + [r]
    return out


def _tag_artifacts(settings: Settings, files: list[Path], roots: list[Path], stamp: str) -> int:
    """Tag the runs and logged models whose artifacts were rewritten."""
    runs: dict[tuple[str, str], int] = {}
    for f in files:
        for root in roots:
            if f.is_relative_to(root):
                parts = f.relative_to(root).parts
                if "artifacts" not in parts:
                    break
                i = parts.index("artifacts")
                if i >= 2 and parts[i - 2] == "models":
                    key = ("model", parts[i - 1])
                elif i >= 1:
                    key = ("run", parts[i - 1])
                else:
                    break
                runs[key] = runs.get(key, 0) + 1
                break
    if not runs:
        return 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    return sum(_tag_erased(client, kind, ident, n, stamp) for (kind, ident), n in runs.items())


def _tag_erased(client, kind: str, ident: str, files: int, stamp: str) -> bool:
    """Tag a run or logged model whose artifacts an erasure rewrote (``freshrec.privacy.erasure``: how
    many files, when); a tag that cannot be set is logged, not raised (the files are rewritten;
    the tag is a record). Returns whether it was set."""
    value = f"{files} artifact file(s) rewritten by an erasure at {stamp}"
    try:
        if kind == "run":
            client.set_tag(ident, "freshrec.privacy.erasure", value)
        else:
            client.set_logged_model_tags(ident, {"freshrec.privacy.erasure": value})
        return True
    except Exception as e:  # noqa: BLE001 - the files are rewritten; the tag is a record
        log.warning("erasure: could not tag %s %s (%s)", kind, ident, e)
        return False


def remote_tracking(settings: Settings) -> bool:
    """Whether the tracking store is a server (``http(s)://``): its artifacts are reached through
    MLflow's artifact API, wherever the server keeps them."""
    return settings.mlflow_tracking_uri.startswith(("http://", "https://"))


def _remote_artifact_roots(client) -> list[tuple[str, str, str]]:
    """(kind, id, artifact URI) of every run and logged model of every experiment (deleted ones
    included) on the tracking server."""
    from mlflow.entities import ViewType

    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    roots: list[tuple[str, str, str]] = []
    for start in range(0, len(ids), 100):
        chunk, token = ids[start:start + 100], None
        while True:
            runs = client.search_runs(chunk, run_view_type=ViewType.ALL, max_results=1000,
                                      page_token=token)
            roots += [("run", r.info.run_id, r.info.artifact_uri) for r in runs]
            token = runs.token
            if not token:
                break
        token = None
        while True:
            models = client.search_logged_models(chunk, page_token=token)
            roots += [("model", m.model_id, m.artifact_location) for m in models]
            token = models.token
            if not token:
                break
    return roots


def _unreachable_local(uri: str) -> bool:
    """Whether ``uri`` is a local path (``file://`` or none) of which neither it nor its three
    nearest folders exist here: the location of a tracking server on another machine that does
    not proxy artifacts (a run without artifacts has at least its experiment's folder)."""
    from urllib.parse import urlparse

    u = urlparse(uri)
    if u.scheme not in ("", "file"):
        return False
    p = Path(u.path)
    return not any(a.exists() for a in [p, *p.parents][:4] if a != Path(p.anchor))


def scrub_remote_artifacts(settings: Settings, needle: str, stamp: str) -> tuple[int, int, list[str]]:
    """Remove ``needle`` from the artifacts of every run and logged model on a tracking server,
    through MLflow's artifact API: each root is downloaded to a private temporary folder,
    :func:`scrub_tree` rewrites what holds the user, and each rewritten file is uploaded again to
    the same artifact path (replacing it); the run or logged model is tagged
    ``freshrec.privacy.erasure``. Returns (files rewritten, runs/models tagged, artifacts that still hold
    the user and could not be rewritten, as URIs, plus each root that could not be scrubbed: a
    local location this machine does not have, or an error, with its reason; the other roots are
    scrubbed all the same). Every root is downloaded in full: the cost
    grows with everything the server stores."""
    import tempfile

    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.tracking import MlflowClient

    from freshrec.tracking import mlflow_for

    mlflow_for(settings)
    client = MlflowClient()
    rewritten = tagged = 0
    stuck: list[str] = []
    for kind, ident, uri in _remote_artifact_roots(client):
        if not uri:
            continue
        if _unreachable_local(uri):
            stuck.append(f"{uri} ({kind} {ident}: a local artifact location this machine does "
                         "not have: erase there, or serve artifacts through the tracking server)")
            continue
        try:
            repo = get_artifact_repository(uri)
            if not repo.list_artifacts(""):
                continue
            with tempfile.TemporaryDirectory(prefix="freshrec-erasure-") as tmp:
                local = Path(repo.download_artifacts("", dst_path=tmp))
                changed, st = scrub_tree(local, needle)
                for f in changed:
                    parent = f.relative_to(local).parent
                    repo.log_artifact(str(f), None if parent == Path(".") else parent.as_posix())
                stuck += [f"{uri.rstrip('/')}/{f.relative_to(local).as_posix()}" for f in st]
        except Exception as e:  # noqa: BLE001 - one run must not stop the others or the report
            reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            log.error("erasure: the artifacts of %s %s (%s) could not be scrubbed: %s", kind,
                      ident, uri, reason)
            stuck.append(f"{uri} ({kind} {ident}: could not be scrubbed: {reason})")
            continue
        if not changed:
            continue
        rewritten += len(changed)
        tagged += _tag_erased(client, kind, ident, len(changed), stamp)
    return rewritten, tagged, stuck


def erase_user(settings: Settings, pseudonym: str, raw_id: str | None = None) -> dict:
    """Erase one user everywhere (see the module docstring); returns what was removed:
    ``tables`` (rows per table), ``landing_rows``, ``log_lines``, ``snapshot_files``,
    ``raw_rows``, ``vacuumed_files``, ``mlflow_files``, ``mlflow_tagged``, ``unscrubbed``."""
    from freshrec.storage.crypto import cipher_for

    if not pseudonym:
        raise ValueError("user id is empty: name the user to erase")
    cipher = cipher_for(settings)
    t0 = time.perf_counter()
    with exclusive(settings):
        erased_at = _append_log(settings, pseudonym)
        position = len(read_log(settings))
        tables = _delete_rows(settings, pseudonym)
        landing = sum(_scrub_parquet(f, pseudonym, cipher=cipher) for f in
                      sorted(settings.landing_dir.glob("**/*.parquet")))
        lines = _scrub_segments(settings, pseudonym)
        snaps, stuck = scrub_tree(settings.snapshots_dir, pseudonym, cipher)
        raw_rows = 0
        if raw_id:
            raw_rows = sum(_scrub_parquet(f, raw_id) for f in
                           sorted((settings.data_dir / "raw").glob("**/*.parquet")))
        vacuumed = vacuum_user_tables(settings)
    stamp = datetime.fromtimestamp(erased_at, timezone.utc).isoformat()
    stuck_where = [str(p) for p in stuck]
    if remote_tracking(settings):
        try:
            n_art, tagged, remote_stuck = scrub_remote_artifacts(settings, pseudonym, stamp)
        except Exception as e:  # noqa: BLE001 - the rows are gone: the report must be written
            n_art, tagged = 0, 0
            remote_stuck = [f"{settings.mlflow_tracking_uri} (every artifact: the tracking "
                            f"server failed: {' '.join(f'{type(e).__name__}: {e}'.split())[:300]}"
                            "; erase again when it is back)"]
        stuck_where += remote_stuck
    else:
        roots = _artifact_roots(settings)
        art: list[Path] = []
        for r in roots:
            changed, st = scrub_tree(r, pseudonym)
            art += changed
            stuck_where += [str(p) for p in st]
        n_art = len(art)
        tagged = _tag_artifacts(settings, art, roots, stamp) if art else 0
    stuck = stuck_where
    report = {"log_position": position, "tables": tables, "landing_rows": landing, "log_lines": lines,
              "snapshot_files": len(snaps), "raw_rows": raw_rows,
              "vacuumed_files": sum(vacuumed.values()), "mlflow_files": n_art,
              "mlflow_tagged": tagged, "unscrubbed": stuck,
              "seconds": round(time.perf_counter() - t0, 3)}
    with _flock(_lock_file(settings), fcntl.LOCK_EX):
        path = privacy_dir(settings) / "erasure-reports.jsonl"
        with open(path, "ab") as f:  # counts only: no id
            f.write(json.dumps({"erased_at": stamp, **{k: v for k, v in report.items()
                                                        if k != "unscrubbed"},
                                "unscrubbed": len(stuck)}).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
    if stuck:
        log.error("erasure: %d file(s) still hold the user and are not a format erasure "
                  "rewrites: %s", len(stuck), ", ".join(map(str, stuck)))
    log.info("erased a user: %s", {k: v for k, v in report.items() if k != "unscrubbed"})
    return report


def rows_removed(report: dict) -> int:
    """The rows an erasure removed from tables, landing files, logs and raw input."""
    return sum(report["tables"].values()) + report["landing_rows"] + report["log_lines"] + \
        report["raw_rows"]
