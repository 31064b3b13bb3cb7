"""Object storage: ``paths.data_dir`` as an ``s3://bucket/prefix`` URI.

The Delta tables then live under ``<data_dir>/tables`` in the bucket, reached by

- delta-rs (``deltalake``): ``storage_options`` (:func:`delta_options`), the object_store names
  ``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_SESSION_TOKEN``, ``AWS_ALLOW_HTTP``;
- pyarrow: :func:`pyarrow_filesystem` (``pyarrow.fs.S3FileSystem``) for the tables' Parquet files;
- Spark: hadoop-aws's S3A filesystem, registered for the ``s3`` scheme so the same URIs work
  (:func:`spark_conf`; the jars come from ``make jars``, see :mod:`freshrec.ops.jars`).

The options are the ``AWS_*`` variables of the environment with ``paths.storage_options`` laid
over them (keys case-insensitive). Keep credentials in the environment (or the secrets of your
deployment), not in YAML.

What needs a local filesystem (the landing files, serving's write-ahead and impression logs,
snapshots, reports, MLflow's SQLite store, Spark's scratch space) goes under ``paths.local_dir``;
with a URI ``data_dir`` and no ``local_dir`` they refuse to start, naming the setting
(:class:`freshrec.settings.SettingsError` from ``Settings.data_dir``).
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING
from urllib.parse import urlparse

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow.fs

    from freshrec.settings import Settings

SUPPORTED_SCHEMES = ("s3",)
OPTION_KEYS = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
               "AWS_SESSION_TOKEN", "AWS_ALLOW_HTTP")
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")


class StorageUnreachable(OSError):
    """The object store did not answer, or refused the credentials; the message is one line."""


def unreachable(uri: str, error: BaseException) -> StorageUnreachable:
    """A one-line :class:`StorageUnreachable` for ``uri`` from delta-rs's multi-line error."""
    text = re.sub(r"\x1b\[[0-9;]*m|↳", " ", str(error))
    detail = " ".join(text.split())[:300]
    return StorageUnreachable(f"{uri}: the object store did not answer or refused the request "
                              f"({detail}); check AWS_ENDPOINT_URL, AWS_REGION and the credentials "
                              "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment, or "
                              "paths.storage_options), and that the server is up")


def is_uri(value: object) -> bool:
    """True for ``scheme://...`` (a scheme of two or more letters, so ``C:/x`` stays a path)."""
    return isinstance(value, str) and bool(_URI.match(value))


def check_uri(value: str, setting: str = "paths.data_dir") -> str:
    """``value`` without a trailing slash, or a ValueError naming ``setting`` and the fix."""
    scheme = _URI.match(value).group(1).lower()  # type: ignore[union-attr]
    if scheme in ("s3a", "s3n"):
        raise ValueError(f"{setting} {value!r}: write the bucket as s3://{value.split('://', 1)[1]} "
                         "(Spark's s3a is mapped onto s3:// for you)")
    if scheme not in SUPPORTED_SCHEMES:
        raise ValueError(f"{setting} {value!r}: the {scheme}:// scheme is not supported; use a "
                         "local directory or s3://bucket/prefix (S3 or an S3-compatible server, "
                         "endpoint in AWS_ENDPOINT_URL)")
    if not urlparse(value).netloc:
        raise ValueError(f"{setting} {value!r} names no bucket: use s3://bucket/prefix")
    return value.rstrip("/")


def object_store_options(settings: Settings) -> dict[str, str]:
    """The ``AWS_*`` environment with ``paths.storage_options`` over it (upper-case keys)."""
    out = {k: os.environ[k] for k in OPTION_KEYS if os.environ.get(k)}
    out.update({k.upper(): str(v) for k, v in settings.paths.storage_options.items()})
    return out


def delta_options(settings: Settings) -> dict[str, str] | None:
    """delta-rs ``storage_options`` for the tables: None for a local ``data_dir``."""
    return object_store_options(settings) if settings.data_is_uri else None


def _endpoint(options: dict[str, str]) -> tuple[str | None, bool]:
    """(host[:port] or None, whether to use https)."""
    url = options.get("AWS_ENDPOINT_URL")
    if not url:
        return None, True
    parsed = urlparse(url if "://" in url else f"https://{url}")
    return parsed.netloc, parsed.scheme != "http"


def pyarrow_filesystem(settings: Settings) -> pyarrow.fs.FileSystem:
    """A filesystem for the paths below ``data_dir``: S3FileSystem for a URI (paths then are
    ``bucket/key``, see :func:`pyarrow_path`), the local filesystem otherwise."""
    import pyarrow.fs as pafs

    if not settings.data_is_uri:
        return pafs.LocalFileSystem()
    o = object_store_options(settings)
    host, https = _endpoint(o)
    return pafs.S3FileSystem(access_key=o.get("AWS_ACCESS_KEY_ID"),
                             secret_key=o.get("AWS_SECRET_ACCESS_KEY"),
                             session_token=o.get("AWS_SESSION_TOKEN"),
                             region=o.get("AWS_REGION", "us-east-1"), endpoint_override=host,
                             scheme="https" if https else "http")


def pyarrow_path(uri: str) -> str:
    """``s3://bucket/key`` -> ``bucket/key`` (what S3FileSystem takes); a local path unchanged."""
    return uri.split("://", 1)[1] if is_uri(uri) else uri


def spark_conf(settings: Settings) -> dict[str, str]:
    """Spark conf for a URI ``data_dir``: S3A for ``s3://`` (and ``s3a://``), the endpoint, path
    style for a custom endpoint, and the credentials when given; empty for a local one."""
    if not settings.data_is_uri:
        return {}
    o = object_store_options(settings)
    conf = {"spark.hadoop.fs.s3.impl": "org.apache.hadoop.fs.s3a.S3AFileSystem",
            "spark.hadoop.fs.AbstractFileSystem.s3.impl": "org.apache.hadoop.fs.s3a.S3A"}
    host, https = _endpoint(o)
    if host:
        conf.update({"spark.hadoop.fs.s3a.endpoint": o["AWS_ENDPOINT_URL"],
                     "spark.hadoop.fs.s3a.path.style.access": "true",
                     "spark.hadoop.fs.s3a.connection.ssl.enabled": str(https).lower()})
    if o.get("AWS_REGION"):
        conf["spark.hadoop.fs.s3a.endpoint.region"] = o["AWS_REGION"]
    if o.get("AWS_ACCESS_KEY_ID") and o.get("AWS_SECRET_ACCESS_KEY"):
        conf.update({"spark.hadoop.fs.s3a.access.key": o["AWS_ACCESS_KEY_ID"],
                     "spark.hadoop.fs.s3a.secret.key": o["AWS_SECRET_ACCESS_KEY"]})
        if o.get("AWS_SESSION_TOKEN"):
            conf.update({"spark.hadoop.fs.s3a.session.token": o["AWS_SESSION_TOKEN"],
                         "spark.hadoop.fs.s3a.aws.credentials.provider":
                         "org.apache.hadoop.fs.s3a.TemporaryAWSCredentialsProvider"})
    return conf
