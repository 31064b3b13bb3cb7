"""Delta Lake I/O for every lane: the one module that reads and writes freshrec's tables.

Two engines, one behaviour. When the Spark session has loaded the Delta jars (``.jars/``, see
:mod:`freshrec.ops.jars`; by default on a cluster, or with ``delta.backend: spark``), Spark DataFrames
are read and written with delta-spark on the executors: ``format("delta")``, ``replaceWhere`` for a
batch's rows, and the "commit only when changed" comparison is a checksum aggregate computed on the
executors, so no table passes through the driver. Otherwise (the embedded default, and wherever the
jars are missing) the same tables are read and written with delta-rs (``deltalake``), moving data
between Spark and Arrow: reads hand Spark the table's Parquet files, writes collect to Arrow and
commit through delta-rs. Arrow data (importers, serving, the refresher, erasure) always goes through
delta-rs. Both engines open the tables the other wrote (tests/test_delta_engines.py); delta-spark
sessions keep deletion vectors and column mapping off, which delta-rs readers would need.
Every write is cast to the table's schema from :mod:`freshrec.storage.tables`; a failed write leaves the
table as it was (Delta commits are atomic). Every write leaves out the rows of erased users and
commits under the shared erasure lock (:func:`freshrec.privacy.erasure.guarded`), so a job that read
before an erasure cannot bring the user back.
"""

from __future__ import annotations

import logging
from pathlib import Path
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable, write_deltalake

from freshrec.settings import Settings
from freshrec.storage.tables import TABLES, TableSpec

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

WriteMode = Literal["append", "overwrite"]


class SchemaMismatch(ValueError):
    """Data handed to a table lacks a column of the table's schema or has one of the wrong type."""


def conform(table: pa.Table, spec: TableSpec) -> pa.Table:
    """Select and cast ``table``'s columns to ``spec``'s schema, or say which column is wrong."""
    missing = [f.name for f in spec.schema if f.name not in table.column_names]
    if missing:
        raise SchemaMismatch(f"table {spec.name}: data lacks column(s) {missing}; "
                             f"expected {spec.schema.names}")
    cols = []
    for f in spec.schema:
        col = table.column(f.name)
        if col.type != f.type:
            try:
                col = col.cast(f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise SchemaMismatch(f"table {spec.name}: column {f.name} has type {col.type}, "
                                     f"which does not cast to {f.type}: {e}") from e
        if not f.nullable and col.null_count:
            raise SchemaMismatch(f"table {spec.name}: column {f.name} holds {col.null_count} "
                                 "null(s) but may not be null")
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=spec.schema)


class DeltaStore:
    """Reads and writes the named freshrec tables under ``settings.tables_uri`` (a local
    directory, or ``s3://...`` reached with ``storage_options``, see :mod:`freshrec.storage.objects`)."""

    def __init__(self, settings: Settings) -> None:
        from freshrec.storage.objects import delta_options

        self.settings = settings
        self.root = settings.tables_uri
        self.options = delta_options(settings)  # delta-rs storage_options; None when local
        self._spark_backend: str | None = None

    # ---- paths and metadata -------------------------------------------------------------
    def spec(self, name: str) -> TableSpec:
        try:
            return TABLES[name]
        except KeyError:
            raise KeyError(f"unknown table {name!r}; known tables: {sorted(TABLES)}") from None

    def path(self, name: str) -> str:
        return f"{self.root}/{self.spec(name).name}"

    def table(self, name: str, version: int | None = None) -> DeltaTable:
        """The table as delta-rs opens it (at ``version`` when given)."""
        return DeltaTable(self.path(name), version=version, storage_options=self.options)

    def exists(self, name: str) -> bool:
        if self.options is None:
            return DeltaTable.is_deltatable(self.path(name))
        try:
            return DeltaTable.is_deltatable(self.path(name), storage_options=self.options)
        except OSError as e:
            from freshrec.storage.objects import unreachable

            raise unreachable(self.path(name), e) from None

    def ensure(self, name: str) -> DeltaTable:
        """Open the table, creating it empty (with its schema and CDF setting) when missing."""
        spec = self.spec(name)
        if not self.exists(name):
            if self.options is None:
                Path(self.path(name)).mkdir(parents=True, exist_ok=True)
            config = {"delta.enableChangeDataFeed": "true"} if spec.change_data_feed else None
            DeltaTable.create(self.path(name), spec.schema, mode="ignore", configuration=config,
                              name=spec.name, description=spec.doc, storage_options=self.options)
        return self.table(name)

    def ensure_all(self) -> None:
        for name in TABLES:
            self.ensure(name)

    def version(self, name: str) -> int | None:
        return self.table(name).version() if self.exists(name) else None

    def versions(self, names: list[str] | None = None) -> dict[str, int | None]:
        return {n: self.version(n) for n in (names or list(TABLES))}

    # ---- Arrow ---------------------------------------------------------------------------
    def read_arrow(self, name: str, version: int | None = None, columns: list[str] | None = None,
                   filter: Any = None) -> pa.Table:
        dt = self.ensure(name) if version is None else self.table(name, version)
        schema = self.spec(name).schema
        ds = dt.to_pyarrow_dataset(schema=schema)
        try:
            return ds.to_table(columns=columns, filter=filter)
        except pa.ArrowNotImplementedError:
            # Files rewritten by delta-rs (DELETE, MERGE) may hold string_view columns, which a
            # pushed-down filter cannot compare with strings: filter after the cast instead.
            table = ds.to_table().cast(schema)
            if filter is not None:
                table = table.filter(filter)
            return table.select(columns) if columns is not None else table

    def scan_batches(self, name: str, version: int | None = None,
                     columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """The table's rows a record batch at a time (bounded memory, for reading a large table
        in one Python process); string_view columns come back as the spec's types."""
        dt = self.ensure(name) if version is None else self.table(name, version)
        spec = self.spec(name).schema
        schema = pa.schema([spec.field(c) for c in columns]) if columns else spec
        for batch in dt.to_pyarrow_dataset(schema=spec).to_batches(columns=columns, batch_readahead=2,
                                                                   fragment_readahead=1):
            yield batch if batch.schema.equals(schema) else batch.cast(schema)

    def count(self, name: str) -> int:
        return self.ensure(name).to_pyarrow_dataset().count_rows() if self.exists(name) else 0

    def write_arrow(self, name: str, data: pa.Table, mode: WriteMode = "append",
                    predicate: str | None = None) -> int:
        """Append, overwrite, or replace the rows matching ``predicate``; returns the new version."""
        from freshrec.privacy.erasure import drop_erased, guarded

        spec = self.spec(name)
        self.ensure(name)
        data = conform(data, spec)
        kwargs: dict[str, Any] = {"mode": mode, "schema_mode": None}
        if predicate is not None:
            if mode != "overwrite":
                raise ValueError("a predicate needs mode='overwrite' (replace the matching rows)")
            kwargs["predicate"] = predicate
        with guarded(self.settings) as erased:  # no erased user's rows come back
            write_deltalake(self.path(name), drop_erased(name, data, erased),
                            storage_options=self.options, **kwargs)
        return self.table(name).version()

    def write_if_changed(self, name: str, data: pa.Table, predicate: str | None = None,
                         where: Any = None) -> int | None:
        """Replace the table's rows (those matching ``predicate``/``where``, or all) with ``data``
        unless they already equal it; returns the new version, or None when nothing changed.

        This is what makes every batch task a transaction that can be re-run: the same interval
        with the same input gives the same rows, and a second run commits nothing.
        ``predicate`` is the SQL form of the row filter for the write, ``where`` the same filter
        as a pyarrow expression for the comparison.
        """
        spec = self.spec(name)
        data = conform(data, spec)
        current = self.read_arrow(name, filter=where)
        if _same_rows(current, data, spec.key):
            log.info("%s: unchanged (%d rows); no commit", name, data.num_rows)
            return None
        version = self.write_arrow(name, data, mode="overwrite", predicate=predicate)
        log.info("%s: wrote %d rows (version %d)", name, data.num_rows, version)
        return version

    def upsert_arrow(self, name: str, data: pa.Table) -> dict[str, int]:
        """MERGE on the table key: insert new keys, update rows whose values changed.

        Rows equal to what is stored are left alone, so re-applying the same data changes nothing.
        """
        from freshrec.privacy.erasure import drop_erased, guarded

        spec = self.spec(name)
        self.ensure(name)
        data = conform(data, spec)
        if data.num_rows == 0:
            return {"inserted": 0, "updated": 0}
        on = " AND ".join(f"t.{k} = s.{k}" for k in spec.key)
        others = [c for c in spec.schema.names if c not in spec.key]
        changed = " OR ".join(f"NOT (t.{c} <=> s.{c})" for c in others) or "false"
        with guarded(self.settings) as erased:
            data = drop_erased(name, data, erased)
            if data.num_rows == 0:
                return {"inserted": 0, "updated": 0}
            metrics = (self.table(name)
                       .merge(data, predicate=on, source_alias="s", target_alias="t")
                       .when_matched_update_all(predicate=changed)
                       .when_not_matched_insert_all()
                       .execute())
        return {"inserted": int(metrics.get("num_target_rows_inserted", 0)),
                "updated": int(metrics.get("num_target_rows_updated", 0))}

    # ---- Spark ---------------------------------------------------------------------------
    def spark_backend(self, spark: SparkSession) -> str:
        """Decide once, from settings and what the session can load: 'spark' or 'rs'."""
        if self._spark_backend is None:
            wanted = self.settings.delta.backend
            loadable = _delta_jars_loadable(spark)
            if wanted == "spark" and not loadable:
                raise RuntimeError("delta.backend is 'spark' but this Spark session cannot load the "
                                   "Delta jars (io.delta.tables.DeltaTable): run `make jars` (they "
                                   "go to .jars/ and get_spark loads them), pass them to "
                                   "spark-submit --jars, or set delta.backend to auto/rs")
            self._spark_backend = "spark" if (wanted == "spark" or (wanted == "auto" and loadable)) \
                else "rs"
            log.info("Delta engine for Spark jobs: %s (delta.backend=%s, Delta jars loadable: %s)",
                     "delta-spark" if self._spark_backend == "spark" else "delta-rs",
                     wanted, loadable)
        return self._spark_backend

    def read_spark(self, spark: SparkSession, name: str, version: int | None = None) -> DataFrame:
        spec = self.spec(name)
        if self.spark_backend(spark) == "spark":
            self.ensure(name)
            reader = spark.read.format("delta")
            if version is not None:
                reader = reader.option("versionAsOf", version)
            return reader.load(self.path(name))
        dt = self.ensure(name) if version is None else self.table(name, version)
        files = dt.file_uris()
        if not files:
            return spark.createDataFrame([], _spark_schema(spec.schema))
        return spark.read.schema(_spark_schema(spec.schema)).parquet(*files)

    def write_spark(self, name: str, df: DataFrame, mode: WriteMode = "append",
                    predicate: str | None = None) -> int:
        """Append, overwrite, or replace the rows matching ``predicate``; returns the new version."""
        spark = df.sparkSession
        if self.spark_backend(spark) == "spark":
            from freshrec.privacy.erasure import drop_erased_spark, guarded

            self.ensure(name)
            if predicate is not None and mode != "overwrite":
                raise ValueError("a predicate needs mode='overwrite' (replace the matching rows)")
            with guarded(self.settings) as erased:  # no erased user's rows come back
                df = drop_erased_spark(name, conform_spark(df, self.spec(name)), erased)
                writer = df.write.format("delta").mode(mode)
                if predicate is not None:
                    writer = writer.option("replaceWhere", predicate)
                writer.save(self.path(name))
            return self.table(name).version()
        return self.write_arrow(name, df.toArrow(), mode=mode, predicate=predicate)

    def stage_spark(self, name: str, df: DataFrame) -> StagedWrite:
        """Compute ``df`` once for a later :meth:`StagedWrite.commit_if_changed`: with delta-rs
        it is collected to Arrow on the driver, with delta-spark persisted on the executors.
        ``rows`` is known before anything is written (for checks that must pass first)."""
        if self.spark_backend(df.sparkSession) == "spark":
            staged = conform_spark(df, self.spec(name)).persist()
            return StagedWrite(self, name, staged.count(), frame=staged)
        data = conform(df.toArrow(), self.spec(name))
        return StagedWrite(self, name, data.num_rows, table=data)

    def write_spark_if_changed(self, name: str, df: DataFrame, predicate: str | None = None,
                               where: Any = None) -> tuple[int | None, int]:
        """:meth:`stage_spark` then :meth:`StagedWrite.commit_if_changed`; returns
        (new version or None, rows)."""
        staged = self.stage_spark(name, df)
        return staged.commit_if_changed(predicate, where), staged.rows


class StagedWrite:
    """Rows computed for one table, not yet written (see :meth:`DeltaStore.stage_spark`)."""

    def __init__(self, store: DeltaStore, name: str, rows: int, table: pa.Table | None = None,
                 frame: DataFrame | None = None) -> None:
        self.store, self.name, self.rows = store, name, rows
        self.table, self.frame = table, frame

    def commit_if_changed(self, predicate: str | None = None, where: Any = None) -> int | None:
        """Replace the table's rows matching ``predicate`` (SQL; ``where`` is the same filter as a
        pyarrow expression, used on the delta-rs path), or all rows, with the staged rows unless
        they are already equal; returns the new version, or None when nothing changed.

        On the delta-spark path "equal" means: the same row count and the same sums of two
        independent hashes (64-bit xxhash64 and 32-bit murmur3) of every row's JSON form, computed
        on the executors. Different rows pass as equal only if all three collide.
        """
        if self.frame is None:
            assert self.table is not None
            return self.store.write_if_changed(self.name, self.table, predicate, where)
        from pyspark.sql import functions as F

        store, name = self.store, self.name
        try:
            spark = self.frame.sparkSession
            current = store.read_spark(spark, name)
            if predicate is not None:
                current = current.where(F.expr(predicate))
            if fingerprint(current) == fingerprint(self.frame):
                log.info("%s: unchanged (%d rows); no commit", name, self.rows)
                return None
            version = store.write_spark(name, self.frame, mode="overwrite", predicate=predicate)
            log.info("%s: wrote %d rows with delta-spark (version %d)", name, self.rows, version)
            return version
        finally:
            self.frame.unpersist()


def conform_spark(df: DataFrame, spec: TableSpec) -> DataFrame:
    """Select and cast ``df``'s columns to ``spec``'s schema, or say which column is missing."""
    from pyspark.sql import functions as F

    missing = [f.name for f in spec.schema if f.name not in df.columns]
    if missing:
        raise SchemaMismatch(f"table {spec.name}: data lacks column(s) {missing}; "
                             f"expected {spec.schema.names}")
    return df.select(*[F.col(f.name).cast(f.dataType).alias(f.name)
                       for f in _spark_schema(spec.schema).fields])


def fingerprint(df: DataFrame) -> tuple[int, int, int]:
    """(rows, sum of xxhash64, sum of murmur3) over the rows' JSON form, computed on the executors;
    independent of row order and of how the rows are partitioned."""
    from pyspark.sql import functions as F

    row = F.to_json(F.struct(*[F.col(c) for c in df.columns]),
                    {"timestampFormat": "yyyy-MM-dd'T'HH:mm:ss.SSSSSSXXX"})  # to the microsecond
    out = df.select(row.alias("_row")).agg(
        F.count(F.lit(1)).alias("n"),
        F.sum(F.xxhash64("_row").cast("decimal(38,0)")).alias("h64"),
        F.sum(F.hash("_row").cast("decimal(38,0)")).alias("h32")).first()
    return int(out["n"]), int(out["h64"] or 0), int(out["h32"] or 0)


def _delta_jars_loadable(spark: SparkSession) -> bool:
    try:
        # spark.jars land in the context class loader, not the one Class.forName would use
        jvm = spark._jvm  # type: ignore[attr-defined]
        loader = jvm.java.lang.Thread.currentThread().getContextClassLoader()
        loader.loadClass("io.delta.tables.DeltaTable")
        return True
    except Exception:
        return False


def _spark_schema(schema: pa.Schema) -> Any:
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(schema)


def _same_rows(a: pa.Table, b: pa.Table, key: tuple[str, ...]) -> bool:
    if a.num_rows != b.num_rows or a.schema.names != b.schema.names:
        return False
    if a.num_rows == 0:
        return True
    order = [(k, "ascending") for k in key] or [(a.schema.names[0], "ascending")]
    return a.sort_by(order).cast(b.schema).equals(b.sort_by(order))


def sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def batch_filter(batch_date: str) -> tuple[str, Any]:
    """The SQL predicate and the pyarrow filter for one batch_date's rows."""
    return f"batch_date = {sql_literal(batch_date)}", pc.field("batch_date") == batch_date
