"""The Delta jars for delta-spark: which ones, where they live, fetching them with Maven.

``make jars`` (run by ``make install`` when ``mvn`` is on the PATH) calls ``python -m freshrec.ops.jars
fetch``, which copies ``io.delta:delta-spark_<spark major.minor>_2.13`` and ``io.delta:delta-storage``
from Maven Central into ``.jars/`` (ignored by git; ``FRESHREC_JARS_DIR`` moves it) once. The other
runtime dependencies Maven lists for delta-spark (Delta Kernel, the Unity Catalog client, older
copies of jars pyspark already ships) are not needed for path-based tables and are not fetched.

``python -m freshrec.ops.jars fetch-s3`` (also run by ``make jars``) copies ``org.apache.hadoop:hadoop-aws``
at the Hadoop version pyspark ships (``hadoop-client-api-<v>.jar``) with the AWS SDK v2 modules it
uses (``s3``, ``s3-transfer-manager``, ``sts`` at the SDK version Hadoop's own pom pins, instead of the
~600 MB ``bundle``) into ``.jars/s3/``, leaving out what pyspark already ships (netty, Apache HTTP
client, commons, slf4j). Spark needs them for an ``s3://`` ``paths.data_dir``
(:mod:`freshrec.storage.objects`).

The pinned ``delta-spark`` wheel is 4.4.1, but Maven Central serves Delta jars for Spark 4.2 only up
to 4.4.0 (checked 2026-11-28): the wheel's Python API is a thin py4j layer over the same classes, so
the 4.4.0 jars back it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from freshrec.settings import PROJECT_ROOT

DELTA_VERSION = "4.4.0"
SCALA = "2.13"

# Session conf every delta-spark session gets (local or on the cluster).
DELTA_CONF = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
    # delta-rs (serving, refresher, importers, erasure) reads and writes the same tables: keep new
    # tables free of the reader features it may not support.
    "spark.databricks.delta.properties.defaults.enableDeletionVectors": "false",
    "spark.databricks.delta.properties.defaults.columnMapping.mode": "none",
}


class JarsMissing(RuntimeError):
    """The Delta jars are not in the jars folder."""


def spark_minor() -> str:
    import importlib.metadata

    version = importlib.metadata.version("pyspark")
    return ".".join(version.split(".")[:2])


def coordinates(spark_version: str | None = None) -> list[str]:
    """Maven coordinates of the Delta jars for the installed pyspark."""
    mm = spark_version or spark_minor()
    return [f"io.delta:delta-spark_{mm}_{SCALA}:{DELTA_VERSION}",
            f"io.delta:delta-storage:{DELTA_VERSION}"]


def jar_name(coordinate: str) -> str:
    _, artifact, version = coordinate.split(":")
    return f"{artifact}-{version}.jar"


def jars_dir() -> Path:
    return Path(os.environ.get("FRESHREC_JARS_DIR") or PROJECT_ROOT / ".jars")


def delta_jars(directory: Path | None = None) -> list[Path]:
    """The Delta jar files when all are present, else an empty list."""
    d = directory or jars_dir()
    files = [d / jar_name(c) for c in coordinates()]
    return files if all(f.is_file() for f in files) else []


def require_delta_jars(directory: Path | None = None) -> list[Path]:
    files = delta_jars(directory)
    if not files:
        d = directory or jars_dir()
        raise JarsMissing(f"the Delta jars ({', '.join(jar_name(c) for c in coordinates())}) are "
                          f"not in {d}: run `make jars` (needs Maven) or set delta.backend to rs")
    return files


def fetch(directory: Path | None = None, mvn: str = "mvn") -> list[Path]:
    """Copy the Delta jars from Maven into ``directory`` (skips those present); returns them."""
    d = directory or jars_dir()
    d.mkdir(parents=True, exist_ok=True)
    if shutil.which(mvn) is None:
        raise JarsMissing(f"{mvn} is not on the PATH: install Maven (apt-get install -y maven) to "
                          "fetch the Delta jars, or keep delta.backend at auto/rs (delta-rs)")
    for c in coordinates():
        if (d / jar_name(c)).is_file():
            continue
        # Maven's copy goal needs a project directory; an empty temporary one will do.
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [mvn, "-q", "-B", "dependency:copy", f"-Dartifact={c}",
                   f"-DoutputDirectory={d}"]
            proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        if proc.returncode != 0 or not (d / jar_name(c)).is_file():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
            raise JarsMissing(f"Maven could not fetch {c} ({' '.join(cmd)}):\n{tail}")
    return require_delta_jars(d)


S3_DIR = "s3"
S3_DONE = ".complete"
# what pyspark's jars/ already holds in a newer version
S3_EXCLUDE_GROUPS = "io.netty,org.slf4j,commons-logging,commons-codec,org.apache.httpcomponents"


def hadoop_version() -> str:
    """The Hadoop version of pyspark's bundled client (``hadoop-client-api-<v>.jar``)."""
    import pyspark

    jars = Path(pyspark.__file__).parent / "jars"
    found = sorted(jars.glob("hadoop-client-api-*.jar"))
    if not found:
        raise JarsMissing(f"no hadoop-client-api jar in {jars}: cannot tell which hadoop-aws fits")
    return found[-1].name[len("hadoop-client-api-"):-len(".jar")]


def s3_jars(directory: Path | None = None) -> list[Path]:
    """hadoop-aws and its AWS SDK jars when fetched completely, else an empty list."""
    d = (directory or jars_dir()) / S3_DIR
    return sorted(d.glob("*.jar")) if (d / S3_DONE).is_file() else []


def require_s3_jars(directory: Path | None = None) -> list[Path]:
    files = s3_jars(directory)
    if not files:
        d = (directory or jars_dir()) / S3_DIR
        raise JarsMissing(f"hadoop-aws and the AWS SDK jars are not in {d}, and Spark needs them "
                          "for an s3:// paths.data_dir: run `make jars` (needs Maven)")
    return files


def _mvn(mvn: str, args: list[str], cwd: str, what: str) -> None:
    proc = subprocess.run([mvn, "-q", "-B", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
        raise JarsMissing(f"Maven could not fetch {what} (mvn {' '.join(args)}):\n{tail}")


def fetch_s3(directory: Path | None = None, mvn: str = "mvn") -> list[Path]:
    """Copy hadoop-aws and the AWS SDK modules it needs into ``<directory>/s3`` once."""
    import re

    if s3_jars(directory):
        return s3_jars(directory)
    if shutil.which(mvn) is None:
        raise JarsMissing(f"{mvn} is not on the PATH: install Maven (apt-get install -y maven) "
                          "to fetch hadoop-aws for an s3:// data_dir")
    d = (directory or jars_dir()) / S3_DIR
    d.mkdir(parents=True, exist_ok=True)
    hv = hadoop_version()
    with tempfile.TemporaryDirectory() as tmp:
        parent = f"org.apache.hadoop:hadoop-project:{hv}:pom"
        _mvn(mvn, ["dependency:copy", f"-Dartifact={parent}", f"-DoutputDirectory={tmp}"], tmp,
             parent)
        pom = (Path(tmp) / f"hadoop-project-{hv}.pom").read_text()
        m = re.search(r"<aws-java-sdk-v2.version>([^<]+)</aws-java-sdk-v2.version>", pom)
        if not m:
            raise JarsMissing(f"{parent} names no aws-java-sdk-v2.version")
        sdk = m.group(1)
        sdk_deps = "".join(
            f"<dependency><groupId>software.amazon.awssdk</groupId><artifactId>{a}</artifactId>"
            f"<version>{sdk}</version></dependency>" for a in ("s3", "s3-transfer-manager", "sts"))
        (Path(tmp) / "pom.xml").write_text(
            '<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>'
            "<groupId>freshrec</groupId><artifactId>s3-jars</artifactId><version>1</version>"
            "<dependencies><dependency><groupId>org.apache.hadoop</groupId>"
            f"<artifactId>hadoop-aws</artifactId><version>{hv}</version><exclusions><exclusion>"
            "<groupId>software.amazon.awssdk</groupId><artifactId>bundle</artifactId>"
            f"</exclusion></exclusions></dependency>{sdk_deps}</dependencies></project>")
        _mvn(mvn, ["dependency:copy-dependencies", "-DincludeScope=runtime",
                   f"-DexcludeGroupIds={S3_EXCLUDE_GROUPS}", f"-DoutputDirectory={d}"], tmp,
             f"org.apache.hadoop:hadoop-aws:{hv} with AWS SDK {sdk}")
    (d / S3_DONE).write_text(f"hadoop-aws {hv}, AWS SDK {sdk}\n")
    return require_s3_jars(directory)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cmd = args[0] if args else "fetch"
    if cmd == "fetch":
        try:
            files = fetch()
        except JarsMissing as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print("Delta jars in " + str(jars_dir()) + ": " + ", ".join(f.name for f in files))
        return 0
    if cmd == "fetch-s3":
        try:
            files = fetch_s3()
        except JarsMissing as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"hadoop-aws and the AWS SDK ({len(files)} jars) in {jars_dir() / S3_DIR}")
        return 0
    if cmd == "path":  # comma-separated, for spark-submit --jars
        print(",".join(str(f) for f in require_delta_jars()))
        return 0
    print("usage: python -m freshrec.ops.jars [fetch|fetch-s3|path]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
