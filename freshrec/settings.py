"""The one typed settings tree of freshrec.

Reads ``base.yaml`` from the settings folder (the first of ``FRESHREC_CONF_DIR``, ``./conf`` in the
working directory, the user config folder ``$XDG_CONFIG_HOME/freshrec`` (``~/.config/freshrec``) that
holds a ``base.yaml``, else the defaults shipped with the package), lays the profile file
``<profile>.yaml`` over it (``FRESHREC_PROFILE``, default ``local``), expands ``${VAR}`` /
``${VAR:-default}`` from the environment, then applies overrides ``FRESHREC__SECTION__KEY=value``
(parsed as YAML, except that a setting typed as text keeps the text as written, and keys inside a
map setting keep their case), then the secrets directory
(``paths.secrets_dir`` / ``FRESHREC_SECRETS_DIR``: one file per secret, see :data:`SECRET_FILES`;
a file readable by group or others is refused). Unknown keys are rejected with a message naming
the key and the file. Secret values are :class:`pydantic.SecretStr` (``repr`` and dumps show
``**********``). The development secrets (the dev HMAC key and tokens) are accepted only by the
``local`` profile: any other profile refuses them, naming the setting. Writes nothing.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import stat
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic import (BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator,
                      model_validator)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# A source checkout (editable install, tests, make) keeps conf/ at its root; an installed wheel
# carries the same files as package data in freshrec/_conf (setup.py copies them at build time).
SOURCE_CHECKOUT = (PROJECT_ROOT / "pyproject.toml").is_file() and (PROJECT_ROOT / "conf").is_dir()
PACKAGE_CONF_DIR = PROJECT_ROOT / "conf" if SOURCE_CHECKOUT else Path(__file__).resolve().parent / "_conf"
ENV_PREFIX = "FRESHREC__"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class SettingsError(ValueError):
    """A settings file or override is wrong; the message says which key and what to do."""


# The development secrets: accepted by the `local` profile only (conf/local.yaml sets them).
DEV_HMAC_KEY = "freshrec-local-development-key"
DEV_TOKENS = {"dev-client-token": "client", "dev-admin-token": "admin"}
DEV_TOKEN_SHA256 = {hashlib.sha256(t.encode()).hexdigest(): t for t in DEV_TOKENS}
# secrets-directory file -> (section, key, environment variable that also sets it)
SECRET_FILES = {"hmac_key": ("privacy", "hmac_key", "FRESHREC_HMAC_KEY"),
                "hmac_key_chain": ("privacy", "hmac_key_chain", "FRESHREC_HMAC_KEY_CHAIN"),
                "admin_token": ("refresher", "token", "FRESHREC_ADMIN_TOKEN"),
                "data_key": ("privacy", "data_key", "FRESHREC_DATA_KEY")}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsSettings(_Section):
    data_dir: str = Field(description="Root of all state: Delta tables, landing files, snapshots, "
                          "MLflow. A local folder (relative: from the project root in a source "
                          "checkout, from the working directory when installed), a file:// URI, or "
                          "s3://bucket/prefix: the Delta tables in object storage "
                          "(freshrec/storage/objects.py), and `local_dir` holds the rest.")
    local_dir: Path | None = Field(None, description="With an object-store data_dir: the local "
                                   "directory for landing files, write-ahead and impression logs, "
                                   "snapshots, reports, MLflow's SQLite store and Spark scratch "
                                   "(unused for a local data_dir).")
    storage_options: dict[str, str] = Field(
        default_factory=dict, description="Object-store options over the AWS_* environment "
        "(AWS_ENDPOINT_URL, AWS_REGION, AWS_ALLOW_HTTP, ...); keep credentials in the environment.")

    @field_validator("data_dir", mode="before")
    @classmethod
    def _uri_or_path(cls, v: Any) -> Any:
        from freshrec.storage.objects import check_uri, is_uri

        if isinstance(v, Path):
            return str(v)
        if is_uri(v) and not v.lower().startswith("file://"):
            return check_uri(v)
        return v

    @field_validator("local_dir", mode="before")
    @classmethod
    def _local_only(cls, v: Any) -> Any:
        from freshrec.storage.objects import is_uri

        if v == "":
            return None
        if is_uri(v):
            raise ValueError(f"paths.local_dir {v!r} must be a local directory, not a URI")
        return v
    secrets_dir: Path | None = Field(None, description="Directory with one file per secret "
                                     "(hmac_key, hmac_key_chain, admin_token), mode 0600 or "
                                     "stricter; a file there wins over the YAML value. Also "
                                     "FRESHREC_SECRETS_DIR.")

    @field_validator("data_dir", mode="before")
    @classmethod
    def _path_is_text(cls, v: Any) -> Any:
        return os.fspath(v) if isinstance(v, os.PathLike) else v

    @field_validator("secrets_dir", mode="before")
    @classmethod
    def _empty_is_none(cls, v: Any) -> Any:
        return None if v == "" else v


class SparkSettings(_Section):
    master: str = Field("local[*]", description="Spark master URL; local[*] is the embedded default.")
    app_name: str = "freshrec"
    driver_memory: str = "4g"
    shuffle_partitions: int = Field(8, ge=1, description="spark.sql.shuffle.partitions; few on 2 cores.")
    extra_conf: dict[str, str] = Field(default_factory=dict, description="Extra Spark conf pairs.")
    submit: bool = Field(False, description="Run the Spark jobs (ingest, clean, features, evaluate) "
                         "with spark-submit on `master` instead of in the calling process "
                         "(freshrec/ops/submit.py); the cluster profile turns it on.")
    executor_memory: str = Field("1g", description="spark.executor.memory for submitted jobs.")


class DeltaSettings(_Section):
    backend: Literal["auto", "spark", "rs"] = Field(
        "auto", description="auto: delta-spark when the session has the Delta jars (a non-local "
        "master with .jars/ present, or jars given to spark-submit), delta-rs otherwise (local "
        "sessions do not load them); spark or rs force one.")


class ValueRuleSettings(_Section):
    """How one event type's ``value`` is checked and turned into a confidence weight (the rules
    live in ``freshrec/contracts/events.py``; RecordEvents and the clean job both apply them)."""

    min: float = Field(0.0, description="Smallest accepted value.")
    max: float = Field(1e9, description="Largest accepted value.")
    transform: Literal["linear", "log1p", "constant"] = Field(
        "constant", description="weight = type weight * value (linear: ratings), type weight * "
        "log1p(value) (log1p: counts, durations), or the type weight (constant: the value is "
        "checked and kept, not weighed). An event without a value weighs the type weight.")

    @model_validator(mode="after")
    def _sane(self) -> "ValueRuleSettings":
        if not (math.isfinite(self.min) and math.isfinite(self.max)) or self.min > self.max:
            raise ValueError(f"value range [{self.min}, {self.max}] must be finite with min <= max")
        if self.transform != "constant" and self.min < 0:
            raise ValueError(f"a {self.transform} value range must start at 0 or above (a weight "
                             f"is never negative), got min {self.min}")
        return self


class EventSettings(_Section):
    types: dict[str, float] = Field(description="Accepted event types and their confidence weights "
                                    "(the weight of an event of that type without a value).")
    values: dict[str, ValueRuleSettings] = Field(
        default_factory=dict, description="Per event type: accepted value range and the transform "
        "of value into weight. Types not listed use `default_value`; entries for types not in "
        "`types` are unused.")
    default_value: ValueRuleSettings = Field(default_factory=ValueRuleSettings,
                                             description="Value rule of types not in `values`.")
    value_min: float | None = Field(None, description="Deprecated (one range for every type): "
                                    "when set, the lower bound of every `linear` (rating) type.")
    value_max: float | None = Field(None, description="Deprecated: when set, the upper bound of "
                                    "every `linear` (rating) type.")
    max_id_length: int = Field(128, ge=1, description="Longer user, item or event ids are refused.")
    earliest_ts: str = Field("1990-01-01T00:00:00+00:00",
                             description="Events before this instant are refused.")
    max_future_skew_seconds: float = Field(
        86400.0, ge=0, description="Events more than this far after the reference instant (now "
        "for RecordEvents, the interval's end for clean) are refused.")

    @field_validator("types")
    @classmethod
    def _weights_positive(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("events.types must name at least one event type")
        bad = {k: w for k, w in v.items() if w <= 0}
        if bad:
            raise ValueError(f"event type weights must be > 0, got {bad}")
        return v

    @field_validator("earliest_ts")
    @classmethod
    def _instant(cls, v: str) -> str:
        from datetime import datetime

        try:
            datetime.fromisoformat(v)
        except ValueError:
            raise ValueError(f"events.earliest_ts {v!r} is not an ISO-8601 instant") from None
        return v

    @model_validator(mode="before")
    @classmethod
    def _old_range(cls, data: Any) -> Any:
        """value_min / value_max (one range for all types, made for ratings) set the range of
        every ``linear`` type, so profiles written for them keep working."""
        if not isinstance(data, dict) or (data.get("value_min") is None
                                          and data.get("value_max") is None):
            return data
        values = {}
        for name, rule in (data.get("values") or {}).items():
            rule = rule.model_dump() if isinstance(rule, BaseModel) else dict(rule or {})
            if rule.get("transform") == "linear":
                if data.get("value_min") is not None:
                    rule["min"] = data["value_min"]
                if data.get("value_max") is not None:
                    rule["max"] = data["value_max"]
            values[name] = rule
        return {**data, "values": values}


class PrivacySettings(_Section):
    pseudonymize_users: bool = Field(True, description="Replace user ids by a keyed HMAC at ingest.")
    hmac_key: SecretStr = Field(SecretStr(""), description="HMAC key for user pseudonyms (at least "
                                "16 characters outside the local profile): the secrets directory's "
                                "`hmac_key` file or FRESHREC_HMAC_KEY.")
    hmac_key_chain: list[SecretStr] = Field(
        default_factory=list, description="Keys of the rotations applied so far, oldest first "
        "(`freshrec privacy rotate-key` appends one): pseudonym = HMAC(k_n, ... HMAC(k_1, "
        "HMAC(hmac_key, user_id))). The secrets directory's `hmac_key_chain` file (one key a line) "
        "or FRESHREC_HMAC_KEY_CHAIN (comma-separated).")
    vacuum_retention_hours: float = Field(
        0.0, ge=0, description="Erasure: Delta VACUUM (and log clean-up) retention of the tables "
        "holding user rows. 0 removes the erased rows from every earlier version at once (and "
        "with them time travel to those versions); above 0 they stay readable in old versions "
        "until `freshrec erase --vacuum` runs after that many hours.")
    encrypt_at_rest: bool = Field(False, description="Seal the event, impression and audit logs, "
                                  "the landing zone's Parquet files and the snapshots' users.npz "
                                  "with AES-256-GCM under data_key (see freshrec/storage/crypto.py).")
    data_key: SecretStr = Field(SecretStr(""), description="32-byte key (64 hex digits or urlsafe "
                                "base64) for encrypt_at_rest: the secrets directory's `data_key` "
                                "file or FRESHREC_DATA_KEY.")
    volume_encryption: Literal["required", "not_required"] = Field(
        "not_required", description="`required`: the server and the batch jobs refuse to start "
        "unless the data directory is on a dm-crypt/LUKS volume or volume_encrypted_attested is "
        "set (freshrec/privacy/volume.py); covers the Delta tables and MLflow artifacts.")
    volume_encrypted_attested: bool = Field(False, description="The operator attests that the "
                                            "data directory's volume (or object store) is "
                                            "encrypted in a way the start-up check cannot see.")

    @field_validator("hmac_key_chain", mode="before")
    @classmethod
    def _chain_text(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [k.strip() for k in re.split(r"[,\n]", v) if k.strip()]
        return v

    @model_validator(mode="after")
    def _data_key(self) -> "PrivacySettings":
        if self.encrypt_at_rest:
            from freshrec.storage.crypto import parse_key

            if not self.data_key.get_secret_value():
                raise ValueError("privacy.encrypt_at_rest is on but privacy.data_key is not set: "
                                 "put a key in the secrets directory (file data_key, mode 0600) "
                                 "or export FRESHREC_DATA_KEY")
            parse_key(self.data_key.get_secret_value())
        return self


class FeatureSettings(_Section):
    popularity_half_life_days: float = Field(7.0, gt=0, description="Time-decay half-life.")
    neighbors_top_k: int = Field(50, ge=1, description="Neighbours kept per item in item_neighbors.")
    neighbors_max_history: int = Field(50, ge=2, description="Most recent distinct items per user "
                                       "that count for co-occurrence (bounds the self-join).")
    neighbors_min_cooccurrence: int = Field(2, ge=1, description="Pairs seen fewer times are dropped.")
    top_categories: int = Field(5, ge=1, description="Category affinities kept per user.")


class AlsSettings(_Section):
    rank: int = Field(64, ge=1)
    iterations: int = Field(10, ge=1)
    reg_param: float = Field(0.1, ge=0)
    alpha: float = Field(1.0, gt=0, description="Confidence scale: c = 1 + alpha * sum(weights).")
    num_blocks: int = Field(2, ge=1, description="User and item blocks; 2 on 2 cores, more on clusters "
                            "(cg: at most the task slots, as its blocks run at once).")
    seed: int = 42
    solver: Literal["cg", "mllib"] = Field(
        "cg", description="Implicit feedback: `cg`, blocked ALS on the executors with a "
        "conjugate-gradient solve per row (the `implicit` library's kernel; regularization "
        "reg_param per row), or `mllib`, Spark MLlib's ALS (Cholesky; reg_param times each row's "
        "number of ratings). Explicit ratings always use mllib.")
    cg_steps: int = Field(3, ge=1, description="Conjugate-gradient steps per row and half-iteration (cg).")


class EvaluationSettings(_Section):
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Each user's last share of events.")
    ks: list[int] = Field(default_factory=lambda: [10, 20], description="Cut-offs for the metrics.")
    max_users: int = Field(0, ge=0, description="Evaluate a seeded sample of this many users; 0: all.")
    models: list[str] = Field(default_factory=lambda: ["most_popular", "trending", "item_knn", "als",
                                                       "hybrid"],
                              description="Models the batch DAG fits and compares (`all`: every one).")
    gate_models: list[str] = Field(default_factory=list, description="Models that may become "
                                   "@champion (empty: any evaluated model).")
    validation_fraction: float = Field(
        0.1, gt=0, lt=1, description="Each user's newest share of *training* events (before the "
        "test period) held out as the validation split: models are fitted on the rest, the gate "
        "chooses and tests significance there, and the test split only reports.")
    significance: float = Field(0.05, gt=0, lt=1, description="The gate promotes a model only "
                                "when its gain over the champion's method has a paired p-value "
                                "below this on the validation split.")
    bootstrap_resamples: int = Field(2000, ge=100, description="Resamples of the paired per-user "
                                     "bootstrap (p-values resolve to 1/(n+1)).")
    refit: bool = Field(True, description="Refit the gate's candidate on every event of the "
                        "interval (the split's held-out newest events included) before it is "
                        "registered, keeping what it chose on validation (the hybrid's blender). "
                        "Its metrics stay those of the split fit.")
    fit_in_worker: bool = Field(True, description="Fit and score the models in a worker process "
                                "(spark_jobs/evaluate_worker.py) that reads the events itself, so "
                                "the events, splits and models never enter the driver's memory; "
                                "false: in the driver's process.")
    seed: int = 13


class IndexSettings(_Section):
    exact_max_items: int = Field(50000, ge=1, description="Catalogs up to this size get exact search.")
    ann_type: Literal["ivf", "hnsw"] = "ivf"
    ivf_nlist: int = Field(0, ge=0, description="IVF lists; 0 picks 4*sqrt(n).")
    ivf_nprobe: int = Field(16, ge=1)
    hnsw_m: int = Field(32, ge=4)
    hnsw_ef_search: int = Field(128, ge=1)


class TokenSettings(_Section):
    name: str = Field(description="Who holds the token (shown in logs, metrics and the audit log).")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 hex of the bearer token.")
    role: Literal["client", "admin"] = Field(description="client: Recommender; admin: also Admin.")


class ArmSettings(_Section):
    """One arm of an A/B experiment: a registered model and its share of users."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$",
                      description="The arm's name (RecommendResponse.arm, metric labels).")
    model: str = Field(min_length=1, description="freshrec-retrieval alias (champion, challenger) "
                       "or version number served to this arm's users.")
    share: float = Field(gt=0, le=1, description="Share of users assigned to this arm.")


class ExperimentSettings(_Section):
    """An A/B experiment over users: each user pseudonym is hashed with the salt into [0, 1) and
    falls into the arm whose cumulative share covers it (sticky, stateless). The first arm is the
    control: Admin.LoadModel without an arm replaces it, and Status.model_version names it."""

    name: str = Field("", description="Experiment name (reports, MLflow runs).")
    salt: str = Field("", description="Hash salt; a new salt reshuffles users (empty: the name).")
    arms: list[ArmSettings] = Field(default_factory=list, description="Empty: no experiment, "
                                    "serving.model serves everyone. Shares must sum to 1.")

    @model_validator(mode="after")
    def _arms_sane(self) -> "ExperimentSettings":
        if not self.arms:
            return self
        names = [a.name for a in self.arms]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"arm names must be unique; repeated: {', '.join(dup)}")
        total = sum(a.share for a in self.arms)
        if abs(total - 1.0) > 1e-6:
            each = ", ".join(f"{a.name} {a.share:g}" for a in self.arms)
            raise ValueError(f"arm shares sum to {total:g} ({each}); they must sum to 1")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.arms)


class MonitorSettings(_Section):
    """Online monitoring on the server: drift of served scores and of popularity, per arm."""

    sample_every: int = Field(16, ge=1, description="Keep every n-th personalized slate for the "
                              "drift gauges (1: every one).")
    window: int = Field(2000, ge=10, description="Sampled slates kept per arm (rolling).")
    interval_seconds: float = Field(15.0, gt=0, description="How often the gauges are recomputed.")
    reference_users: int = Field(200, ge=0, description="Snapshot users scored at model load for "
                                 "the reference score distribution (0: no reference).")
    popular_top_n: int = Field(100, ge=1, description="Top-N popular items (at load) whose share "
                               "of served items is the popularity-drift gauge.")
    k: int = Field(10, ge=1, description="Slate size of the reference scoring.")


class ServingSettings(_Section):
    model: str = Field("champion", description="The freshrec-retrieval version served: an alias "
                       "(champion) or a version number (pins one). Admin.LoadModel changes it live.")
    reranker: str = Field("", description="Re-ranking policy over the top candidates: empty (off), "
                          "a directory with an exported policy, or `champion` (freshrec-policy).")
    rerank_candidates: int = Field(30, ge=2, description="Retrieval candidates the policy sees.")
    rerank_epsilon: float = Field(0.05, ge=0, le=1, description="Share of random slates (exploration).")
    host: str = Field("127.0.0.1", description="Address the gRPC server binds.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    workers: int = Field(8, ge=1, description="Threads serving requests.")
    max_k: int = Field(100, ge=1, description="Largest k a request may ask for.")
    max_id_length: int = Field(128, ge=1)
    max_events_per_call: int = Field(1000, ge=1)
    overfetch: float = Field(2.0, ge=1.0, description="Candidates fetched per wanted result under "
                             "a category filter (vector search) or always (models scored over "
                             "histories); doubled until k results qualify or the index is "
                             "exhausted.")
    cache_size: int = Field(100_000, ge=0, description="Cached per-user results (0: off).")
    cache_ttl_seconds: float = Field(300.0, gt=0)
    metrics_port: int = Field(9464, ge=-1, le=65535, description="Prometheus /metrics; -1: off, 0: any.")
    auth_enabled: bool = Field(True, description="Require bearer tokens (health/reflection excepted).")
    tokens: list[TokenSettings] = Field(default_factory=list)
    tls_cert_file: str = Field("", description="PEM certificate; with tls_key_file turns TLS on "
                               "(one without the other is refused).")
    tls_key_file: str = Field("", description="PEM private key of tls_cert_file.")
    tls_client_ca_file: str = Field("", description="PEM CA; set to require client certificates "
                                    "(needs tls_cert_file and tls_key_file).")
    rate_limit_per_second: float = Field(2000.0, gt=0, description="Sustained calls per second "
                                         "per token (every method of Recommender and Admin).")
    rate_limit_burst: int = Field(4000, ge=1)
    peer_rate_limit_per_second: float = Field(
        2000.0, gt=0, description="Sustained calls per second per client address (host, port "
        "excluded), authenticated or not, every method including health and reflection.")
    peer_rate_limit_burst: int = Field(4000, ge=1)
    max_rate_limit_keys: int = Field(100_000, ge=1, description="Rate-limit buckets kept (the "
                                     "least recently used are dropped beyond this).")
    max_concurrent_rpcs: int = Field(256, ge=1, description="Calls in flight at once (streams "
                                     "included); more are refused with RESOURCE_EXHAUSTED.")
    max_message_bytes: int = Field(4 << 20, ge=1024, description="Largest request message.")
    max_context_entries: int = Field(32, ge=0, description="Entries in a RecommendRequest.context "
                                     "or an event's context.")
    max_context_bytes: int = Field(4096, ge=0, description="Total bytes of a context's keys and "
                                   "values.")
    stream_idle_seconds: float = Field(10.0, gt=0, description="A streaming call (health Watch, "
                                       "reflection) is ended after this long.")
    max_recent_users: int = Field(100_000, ge=1, description="Users whose recent events serving "
                                  "holds in memory (least recently active dropped first).")
    max_vector_norm: float = Field(1e3, gt=0, description="ApplyDeltas refuses vectors with a "
                                   "larger L2 norm.")
    wal_flush_seconds: float = Field(30.0, gt=0, description="How often a server moves its "
                                     "recorded events from its write-ahead log to the landing "
                                     "zone (every nearline round also lands every server's log).")
    grace_seconds: float = Field(5.0, ge=0, description="In-flight calls get this long at shutdown.")
    log_impressions: bool = Field(True, description="Log every served Recommend slate to the "
                                  "per-process impression log (then the `impressions` table).")
    impressions_flush_ms: float = Field(200.0, gt=0, description="The impression log is written "
                                        "and fsynced this often (a crash loses at most this much).")
    impressions_flush_records: int = Field(2000, ge=1, description="...or as soon as this many "
                                           "slates wait.")
    impressions_max_buffer: int = Field(200_000, ge=1, description="Slates held in memory at most; "
                                        "beyond, new ones are dropped and counted (never blocks).")
    recent_events_per_user: int = Field(50, ge=1)
    json_logs: bool = Field(True, description="`freshrec serve` logs one JSON object per line.")
    processes: int = Field(0, ge=0, description="Server processes on this host, sharing "
                           "serving.port (SO_REUSEPORT) under a supervisor that restarts any that "
                           "dies (serving/host.py); 0: one per core; 1: one process, no supervisor.")
    mmap_index: Literal["auto"] | bool = Field(
        "auto", description="Load the snapshot's FAISS index memory-mapped read-only, so the "
        "processes of a host share its pages (deltas go to a small in-memory overlay): true, "
        "false, or auto: true in the processes a supervisor starts (serving.processes other "
        "than 1), false otherwise.")
    faiss_threads: int = Field(1, ge=1, description="OpenMP threads per FAISS search; 1 lets "
                               "concurrent requests use the cores instead of spinning threads.")
    gpu_batch_window_ms: float = Field(
        1.0, ge=0, le=1.0, description="Where the index is searched on a GPU: concurrent "
        "Recommend searches arriving within this window are answered by one batched GPU search "
        "(recmodels/batcher.py); 0: each searches alone. Ignored on the CPU.")
    gpu_batch_max: int = Field(256, ge=1, description="Most queries in one batched GPU search.")
    tracing: bool = Field(False, description="OpenTelemetry tracing of every gRPC call (the "
                          "`tracing` extra: opentelemetry-instrumentation-grpc); spans go to the "
                          "process's tracer provider, else OTLP per the OTEL_EXPORTER_OTLP_* "
                          "variables.")
    experiment: ExperimentSettings = Field(default_factory=ExperimentSettings,
                                           description="A/B experiment over registered models.")
    monitor: MonitorSettings = Field(default_factory=MonitorSettings)

    @model_validator(mode="after")
    def _tls_whole(self) -> "ServingSettings":
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            have, missing = (("tls_cert_file", "tls_key_file") if self.tls_cert_file
                             else ("tls_key_file", "tls_cert_file"))
            raise ValueError(f"serving.{have} is set but serving.{missing} is not: set both "
                             "(FRESHREC_TLS_CERT and FRESHREC_TLS_KEY) or neither")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("serving.tls_client_ca_file is set without serving.tls_cert_file and "
                             "serving.tls_key_file: client certificates need TLS on")
        return self


class RefresherSettings(_Section):
    replicas: list[str] = Field(default_factory=list,
                                description="host:port of every serving replica to keep fresh and "
                                "to roll promoted models out to; none by default (list your "
                                "servers, e.g. 127.0.0.1:50051 for a local `freshrec serve`).")
    token: SecretStr = Field(SecretStr(""), description="Admin bearer token for ApplyDeltas: the "
                             "secrets directory's `admin_token` file or FRESHREC_ADMIN_TOKEN.")
    ca_file: str = Field("", description="CA (PEM) when the replicas use TLS.")
    interval_seconds: float = Field(60.0, gt=0, description="`freshrec refresh --loop` period.")
    schedule_minutes: int = Field(5, ge=1, description="The nearline DAG's period.")
    batch_size: int = Field(5000, ge=1, description="Vectors per ApplyDeltas call.")
    retries: int = Field(4, ge=0, description="Tries per replica call beyond the first.")
    backoff_seconds: float = Field(0.5, ge=0, description="First retry delay; doubles each time.")
    timeout_seconds: float = Field(60.0, gt=0, description="Deadline of each admin call to a "
                                   "replica (a stopped process fails the call at it, and is "
                                   "retried and reported).")

    def bearer(self) -> str:
        """The admin token, or a SettingsError saying how to set it."""
        token = self.token.get_secret_value()
        if not token:
            raise SettingsError("refresher.token is not set: put the admin token in the secrets "
                                "directory (file admin_token, mode 0600) or export "
                                "FRESHREC_ADMIN_TOKEN")
        return token


class OnlineSettings(_Section):
    """Online metrics from the ``feedback`` table and the online promotion gate."""

    hit_rate_k: int = Field(10, ge=1, description="k of hit-rate@k (slates with a click in the top k).")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Level of the confidence intervals.")
    alpha: float = Field(0.05, gt=0, lt=0.5, description="One-sided significance level a challenger "
                         "must reach (two-proportion z-test on CTR) to be promoted online.")
    min_impressions: int = Field(1000, ge=1, description="Impressions each arm needs before the "
                                 "online gate decides.")
    bootstrap: int = Field(200, ge=0, description="Bootstrap resamples of slates for the "
                           "coverage interval (0: no interval).")
    days: int = Field(14, ge=1, description="Feedback of the last N days counts.")
    experiment: str = Field("freshrec-online", description="MLflow experiment of the online runs.")


class RegistrySettings(_Section):
    require_online_win: bool = Field(False, description="The batch/training gate moves an offline "
                                     "winner to @challenger instead of @champion; `freshrec model "
                                     "promote-online` makes it champion only when its experiment "
                                     "arm beats control on CTR (online settings).")
    challenger_alias: str = Field("challenger", min_length=1)


class FeedbackSettings(_Section):
    """The feedback join (impressions x later silver events -> `feedback`)."""

    window_minutes: float = Field(30.0, gt=0, description="Attribution window: an event on a "
                                  "shown item this long after the impression is its click.")
    settle_minutes: float = Field(10.0, ge=0, description="Events and impressions reach the "
                                  "tables this late at most; the join waits that long past a "
                                  "window's end before it labels the impressions in it.")
    in_nearline: bool = Field(True, description="Run the join in every nearline round.")


class TrainingSettings(_Section):
    """The training lane (deep retrieval and RL policies); ``freshrec train`` flags override."""

    epochs: int = Field(20, ge=1, description="Most epochs; early stopping on validation NDCG@10.")
    patience: int = Field(3, ge=1, description="Epochs without a better validation NDCG before stopping.")
    batch_size: int = Field(1024, ge=2)
    dim: int = Field(64, ge=4, description="Embedding size of the towers and of SASRec.")
    max_len: int = Field(50, ge=2, description="Recent items a user tower / SASRec reads.")
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    temperature: float = Field(0.05, gt=0, description="Softmax temperature of the two-tower loss.")
    samples_per_epoch: int = Field(400_000, ge=100, description="Training pairs drawn per epoch "
                                   "(the embedded default has ~800k).")
    val_users: int = Field(3000, ge=10, description="Users whose last training item validates.")
    sasrec_blocks: int = Field(2, ge=1)
    sasrec_heads: int = Field(2, ge=1)
    dropout: float = Field(0.2, ge=0, lt=1)
    negatives: int = Field(512, ge=1, description="Shared sampled negatives per SASRec batch.")
    seed: int = 1234
    experiment: str = "freshrec-training"


class AirflowSettings(_Section):
    failure_log: str = Field("", description="File the DAGs' failure notifier appends one JSON line "
                             "per failed task to (freshrec/contracts/dag_support.py); empty: "
                             "<data_dir>/alerts/task_failures.jsonl. A local path.")


class MlflowSettings(_Section):
    tracking_uri: str = Field("", description="Empty: SQLite under data_dir/mlflow.")
    experiment: str = "freshrec-batch"


class SynthSettings(_Section):
    n_events: int = Field(1_000_000, ge=100)
    n_users: int = Field(50_000, ge=10)
    n_items: int = Field(20_000, ge=10)
    n_clusters: int = Field(24, ge=1)
    days: int = Field(60, ge=1)
    malformed_fraction: float = Field(0.004, ge=0, lt=0.5)
    duplicate_fraction: float = Field(0.002, ge=0, lt=0.5)
    seed: int = 7


class Settings(BaseSettings):
    """Everything freshrec reads from configuration. Build with :func:`load_settings`, which reads
    the files, the environment and the secrets directory into one tree and validates it here."""

    model_config = SettingsConfigDict(extra="forbid", frozen=True)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   **_others: PydanticBaseSettingsSource
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_settings merges files, FRESHREC__ overrides (typed: see _env_overrides) and
        # secrets itself; pydantic-settings' own env source lower-cases map keys.
        return (init_settings,)

    profile: str = "local"
    paths: PathsSettings
    spark: SparkSettings = SparkSettings()
    delta: DeltaSettings = DeltaSettings()
    events: EventSettings
    privacy: PrivacySettings
    features: FeatureSettings = FeatureSettings()
    als: AlsSettings = AlsSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    index: IndexSettings = IndexSettings()
    mlflow: MlflowSettings = MlflowSettings()
    synth: SynthSettings = SynthSettings()
    serving: ServingSettings = ServingSettings()
    refresher: RefresherSettings = RefresherSettings()
    feedback: FeedbackSettings = FeedbackSettings()
    device: Literal["auto", "cpu", "cuda"] = "auto"
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    online: OnlineSettings = Field(default_factory=OnlineSettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    models: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Parameters per model, models.<name>.<param> (the "
        "model's constructor arguments; recmodels.model_params reads them). `als` and "
        "`als_explicit` lay theirs over the `als` section.")
    airflow: AirflowSettings = Field(default_factory=AirflowSettings)

    @property
    def failure_log(self) -> Path:
        return Path(self.airflow.failure_log) if self.airflow.failure_log else (
            self.data_dir / "alerts" / "task_failures.jsonl")

    @property
    def data_is_uri(self) -> bool:
        """Whether ``paths.data_dir`` is an object-store URI (see freshrec/storage/objects.py)."""
        from freshrec.storage.objects import is_uri

        return is_uri(self.paths.data_dir) and not self.paths.data_dir.lower().startswith("file://")

    @property
    def data_dir(self) -> Path:
        """The local root: ``paths.data_dir``, or ``paths.local_dir`` when data_dir is a URI
        (refused, naming the setting, when local_dir is unset)."""
        if self.data_is_uri:
            if self.paths.local_dir is None:
                raise SettingsError(
                    f"paths.data_dir is the object-store URI {self.paths.data_dir}, but landing "
                    "files, write-ahead and impression logs, snapshots, reports and MLflow's "
                    "SQLite store need a local directory: set paths.local_dir "
                    "(FRESHREC__PATHS__LOCAL_DIR) to one")
            return local_data_dir(str(self.paths.local_dir))
        return local_data_dir(self.paths.data_dir)

    @property
    def data_uri(self) -> str:
        """paths.data_dir as written: a local folder or a URI (s3://...)."""
        return self.paths.data_dir

    @property
    def tables_uri(self) -> str:
        """Where the Delta tables live: ``<data_dir>/tables``, a path or an s3:// URI."""
        if self.data_is_uri:
            return f"{self.paths.data_dir}/tables"
        return str(self.data_dir / "tables")

    @property
    def tables_dir(self) -> Path:
        """The tables' local directory; refused for an object-store data_dir (use tables_uri)."""
        if self.data_is_uri:
            raise SettingsError(f"the tables are in object storage ({self.tables_uri}), not a local "
                                "directory: this component needs a local paths.data_dir")
        return self.data_dir / "tables"

    @property
    def landing_dir(self) -> Path:
        return self.data_dir / "landing"

    @property
    def snapshots_dir(self) -> Path:
        return self.data_dir / "snapshots"

    @property
    def mlflow_tracking_uri(self) -> str:
        if self.mlflow.tracking_uri:
            return self.mlflow.tracking_uri
        return f"sqlite:///{self.data_dir / 'mlflow' / 'mlflow.db'}"

    @property
    def mlflow_artifact_location(self) -> str:
        return (self.data_dir / "mlflow" / "artifacts").as_uri()


def local_data_dir(raw: str) -> Path:
    """A local folder for paths.data_dir: ``file://`` URIs and plain paths (relative ones from
    the project root in a source checkout, else the working directory); any other URI scheme
    raises :class:`SettingsError` instead of becoming a folder named ``s3:``."""
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", raw)
    if m and m.group(1).lower() != "file":
        raise SettingsError(
            f"paths.data_dir is {raw!r}, a {m.group(1)}:// URI, and this component works on a "
            "local folder only: set paths.data_dir (FRESHREC_DATA_DIR) to a local folder or "
            "a file:// URI")
    if m:
        from urllib.parse import unquote, urlparse

        p = Path(unquote(urlparse(raw).path))
    else:
        p = Path(raw).expanduser()
    return p if p.is_absolute() else ((PROJECT_ROOT if SOURCE_CHECKOUT else Path.cwd()) / p).resolve()


def user_conf_dir(env: dict[str, str] | None = None) -> Path:
    env = dict(os.environ if env is None else env)
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(base) / "freshrec"


def find_conf_dir(env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[Path, str]:
    """The settings folder and why it was picked: FRESHREC_CONF_DIR, else ./conf, else the user
    config folder (each only when it holds a base.yaml), else the package defaults."""
    env = dict(os.environ if env is None else env)
    if env.get("FRESHREC_CONF_DIR"):
        return Path(env["FRESHREC_CONF_DIR"]), "FRESHREC_CONF_DIR"
    here = (cwd or Path.cwd()) / "conf"
    if (here / "base.yaml").is_file():
        return here, "the working directory"
    user = user_conf_dir(env)
    if (user / "base.yaml").is_file():
        return user, "the user config folder"
    return PACKAGE_CONF_DIR, "the package defaults"


def _expand_env(value: Any, env: dict[str, str], where: str) -> Any:
    if isinstance(value, dict):
        return {k: _expand_env(v, env, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, env, where) for v in value]
    if not isinstance(value, str):
        return value

    def repl(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in env and env[name] != "":
            return env[name]
        if default is not None:
            return default
        raise SettingsError(f"setting {where.lstrip('.')} refers to ${{{name}}}, which is not set: "
                            f"export {name}=... or give a default as ${{{name}:-value}}")

    return _ENV_REF.sub(repl, value)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("types", "extra_conf"):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as e:
        raise SettingsError(f"settings file {path} does not exist: create it or pick another "
                            "profile with FRESHREC_PROFILE") from e
    except yaml.YAMLError as e:
        raise SettingsError(f"settings file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise SettingsError(f"settings file {path} must hold a mapping at the top level")
    return data


def _unwrap(annotation: Any) -> Any:
    """``X | None`` -> X (other unions stay as they are)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def _is_text(annotation: Any) -> bool:
    if annotation in (str, SecretStr, Path):
        return True
    if typing.get_origin(annotation) is Literal:
        return all(isinstance(a, str) for a in typing.get_args(annotation))
    return False


# Map settings whose keys are Python names (models.<name>.<param>: a model's constructor
# arguments), lower-cased from env like field names; other maps keep their keys' case.
IDENTIFIER_MAPS = {"models"}


def _env_path(parts: list[str]) -> tuple[list[str], Any]:
    """Walk the settings model along an override's key parts: field names match case-insensitively
    (lower-cased), keys inside a map setting keep their case. Returns the keys and the annotation
    of the target (None when unknown: validation then names the bad key)."""
    node: Any = Settings
    keys: list[str] = []
    identifiers = bool(parts) and parts[0].lower() in IDENTIFIER_MAPS
    for part in parts:
        node = _unwrap(node) if node is not None else None
        if isinstance(node, type) and issubclass(node, BaseModel):
            name = part.lower()
            field = node.model_fields.get(name)
            keys.append(name)
            node = field.annotation if field else None
        elif typing.get_origin(node) is dict:
            keys.append(part.lower() if identifiers else part)
            node = typing.get_args(node)[1]
        else:
            keys.append(part.lower())
            node = None
    return keys, (_unwrap(node) if node is not None else None)


def _env_value(raw: str, annotation: Any, key: str) -> Any:
    """YAML, except that a setting typed as text keeps the text as written (``1234567890`` stays
    a string; a quoted YAML string is unquoted)."""
    if raw == "":
        return ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        if _is_text(annotation):
            return raw
        raise SettingsError(f"{key}={raw!r} is not valid YAML ({str(e).splitlines()[0]}): quote "
                            "it or fix the value") from None
    if annotation is not None and _is_text(annotation) and not isinstance(value, str):
        return raw
    return value


def _env_overrides(env: dict[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, raw in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        parts, annotation = _env_path([p for p in key[len(ENV_PREFIX):].split("__") if p])
        if not parts:
            continue
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = _env_value(raw, annotation, key)
    return tree


def _read_secrets(tree: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """Lay the secrets directory's files over ``tree`` (a file wins over the YAML and the env)."""
    raw = env.get("FRESHREC_SECRETS_DIR") or (tree.get("paths") or {}).get("secrets_dir")
    if not raw:
        return tree
    root = Path(raw)
    tree = _deep_merge(tree, {"paths": {"secrets_dir": str(root)}})
    if not root.is_dir():
        raise SettingsError(f"paths.secrets_dir {root} is not a directory: create it (mode 0700) "
                            "or unset FRESHREC_SECRETS_DIR")
    for name, (section, key, _var) in SECRET_FILES.items():
        path = root / name
        if not path.exists():
            continue
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SettingsError(f"secret file {path} is readable by group or others (mode "
                                f"{stat.S_IMODE(mode):o}): chmod 600 {path}")
        try:
            value = path.read_text().strip()
        except OSError as e:
            raise SettingsError(f"secret file {path} cannot be read ({e.strerror}): make it "
                                "readable by the user running freshrec") from None
        tree = _deep_merge(tree, {section: {key: value}})
    return tree


def _refuse_dev_secrets(s: Settings) -> None:
    """Outside the local profile: no development secret, and the HMAC key set."""
    how = ("put a real one in the secrets directory (paths.secrets_dir / FRESHREC_SECRETS_DIR, "
           "file {file}, mode 0600) or export {var}")
    key = s.privacy.hmac_key.get_secret_value()
    if s.profile == "local":
        return
    if key == DEV_HMAC_KEY:
        raise SettingsError(f"profile {s.profile!r} refuses the development value of "
                            "privacy.hmac_key: " + how.format(file="hmac_key", var="FRESHREC_HMAC_KEY"))
    if s.privacy.pseudonymize_users and len(key) < 16:
        raise SettingsError(f"privacy.hmac_key is {'not set' if not key else 'shorter than 16 characters'} "
                            f"(profile {s.profile!r}): " + how.format(file="hmac_key",
                                                                      var="FRESHREC_HMAC_KEY"))
    if s.refresher.token.get_secret_value() in DEV_TOKENS:
        raise SettingsError(f"profile {s.profile!r} refuses the development value of "
                            "refresher.token: " + how.format(file="admin_token",
                                                             var="FRESHREC_ADMIN_TOKEN"))
    for n, t in enumerate(s.serving.tokens):
        if t.sha256 in DEV_TOKEN_SHA256:
            raise SettingsError(
                f"profile {s.profile!r} refuses serving.tokens[{n}] ({t.name}): it is the hash of "
                f"the development token {DEV_TOKEN_SHA256[t.sha256]!r}; list the SHA-256 of a "
                "token of your own (python -c 'import secrets; print(secrets.token_urlsafe(32))', "
                "then sha256sum)")


def load_settings(profile: str | None = None, conf_dir: Path | None = None,
                  env: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """Load base + profile + environment overrides (+ keyword overrides, for tests) + the
    secrets directory; a profile other than ``local`` refuses the development secrets."""
    env = dict(os.environ if env is None else env)
    conf_dir = Path(conf_dir) if conf_dir else find_conf_dir(env)[0]
    profile = profile or env.get("FRESHREC_PROFILE") or "local"
    tree = _read_yaml(conf_dir / "base.yaml")
    if profile != "base":
        tree = _deep_merge(tree, _read_yaml(conf_dir / f"{profile}.yaml"))
    tree = _deep_merge(tree, _env_overrides(env))
    tree = _deep_merge(tree, overrides)
    tree["profile"] = profile
    tree = _expand_env(tree, env, "")
    tree = _read_secrets(tree, env)
    try:
        settings = Settings.model_validate(tree)
    except ValidationError as e:
        parts = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                parts.append(f"{key}: unknown setting (typo? see {conf_dir / 'base.yaml'} for the "
                             "known keys)")
            else:
                got = err.get("input")
                secret = any(str(p) in ("hmac_key", "hmac_key_chain", "token", "data_key")
                             for p in err["loc"])
                shown = "" if secret or isinstance(got, dict) else f" (got {got!r})"
                parts.append(f"{key}: {err['msg']}{shown}")
        raise SettingsError(f"invalid settings (profile {profile!r}, conf dir {conf_dir}): "
                            + "; ".join(parts)) from None
    _refuse_dev_secrets(settings)
    return settings
