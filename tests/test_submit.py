"""Which Delta engine and which launcher the Spark jobs get, decided from settings without starting
Spark: the embedded default never loads the jars; the cluster profile submits with them; a missing
piece is a one-line error saying how to get it."""

from __future__ import annotations

import pytest

from freshrec.ops.jars import JarsMissing, coordinates, fetch, jar_name
from freshrec.settings import load_settings
from freshrec.storage.spark import delta_spark_wanted
from freshrec.ops.submit import SubmitError, command, submit


@pytest.fixture
def fake_jars(tmp_path, monkeypatch):
    d = tmp_path / "jars"
    d.mkdir()
    for c in coordinates():
        (d / jar_name(c)).write_bytes(b"")
    monkeypatch.setenv("FRESHREC_JARS_DIR", str(d))
    return d

# the cluster profile refuses the development secrets
SECRETS = {"FRESHREC_HMAC_KEY": "a-real-key-of-32-characters-xyz0",
           "FRESHREC_ADMIN_TOKEN": "a-real-admin-token"}


def test_the_embedded_default_keeps_delta_rs_even_with_the_jars_present(fake_jars):
    assert not delta_spark_wanted(load_settings("local", env={}))
    assert delta_spark_wanted(load_settings("local", env={}, spark={"master": "spark://h:7077"}))
    assert delta_spark_wanted(load_settings("local", env={}, delta={"backend": "spark"}))
    assert not delta_spark_wanted(load_settings("local", env={}, delta={"backend": "rs"},
                                                spark={"master": "spark://h:7077"}))


def test_the_suite_session_has_no_delta_jars(spark):
    assert "delta" not in spark.sparkContext.getConf().get("spark.jars", "")


def test_the_cluster_command_names_master_jars_and_the_delta_conf(fake_jars):
    settings = load_settings("cluster", env={**SECRETS, "SPARK_MASTER": "spark://10.1.2.3:7077"})
    cmd = command("clean", ["--date", "2026-11-27"], settings)
    assert cmd[cmd.index("--master") + 1] == "spark://10.1.2.3:7077"
    assert cmd[cmd.index("--jars") + 1] == ",".join(str(fake_jars / jar_name(c))
                                                    for c in coordinates())
    confs = {cmd[i + 1] for i, a in enumerate(cmd) if a == "--conf"}
    assert "spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension" in confs
    assert "spark.databricks.delta.properties.defaults.enableDeletionVectors=false" in confs
    assert cmd[-4:] == [cmd[-4], "clean", "--date", "2026-11-27"]
    assert cmd[-4].endswith("spark_jobs/submit_driver.py")


def test_missing_jars_for_the_cluster_profile_say_make_jars(tmp_path, monkeypatch):
    monkeypatch.setenv("FRESHREC_JARS_DIR", str(tmp_path / "empty"))
    settings = load_settings("cluster", env=SECRETS)
    with pytest.raises(SubmitError, match=r"make jars"):
        submit("ingest", ["--date", "2026-11-27"], settings)


def test_fetching_jars_without_maven_says_how_to_install_it(tmp_path):
    with pytest.raises(JarsMissing, match=r"no-such-mvn is not on the PATH: install Maven"):
        fetch(tmp_path, mvn="no-such-mvn")


def test_only_spark_jobs_are_submitted(fake_jars):
    with pytest.raises(SubmitError, match="'gate' is not a Spark job"):
        submit("gate", ["--date", "2026-11-27"], load_settings("cluster", env=SECRETS))


@pytest.mark.parametrize("conn", [None, '{"conn_type": "spark", "host": "yarn"}',
                                  '{"conn_type": "spark", "host": "spark://other:7077"}'])
def test_the_dag_operator_refuses_a_spark_default_that_is_not_spark_master(conn, fake_jars,
                                                                           monkeypatch):
    """Without a spark_default connection the provider's hook would submit to yarn (a Java trace
    later); a connection to another master than the settings' is refused the same way."""
    from datetime import datetime, timezone

    from freshrec.ops.spark_operator import SparkJobOperator

    monkeypatch.setenv("FRESHREC_PROFILE", "local")
    monkeypatch.setenv("FRESHREC__SPARK__SUBMIT", "true")
    monkeypatch.setenv("FRESHREC__SPARK__MASTER", "spark://127.0.0.1:1")
    if conn is None:
        monkeypatch.delenv("AIRFLOW_CONN_SPARK_DEFAULT", raising=False)
    else:
        monkeypatch.setenv("AIRFLOW_CONN_SPARK_DEFAULT", conn)
    t = datetime(2026, 11, 1, tzinfo=timezone.utc)
    context = {"data_interval_start": t, "data_interval_end": t}
    with pytest.raises(SubmitError, match="AIRFLOW_CONN_SPARK_DEFAULT") as e:
        SparkJobOperator(job="clean").execute(context)
    assert "\n" not in str(e.value)
    assert ("yarn" in str(e.value)) == (conn is None or "yarn" in conn)
    # the settings' own master passes this check (and reaches the next: the cluster is down)
    monkeypatch.setenv("AIRFLOW_CONN_SPARK_DEFAULT",
                       '{"conn_type": "spark", "host": "spark://127.0.0.1:1"}')
    with pytest.raises(SubmitError, match="make cluster-up"):
        SparkJobOperator(job="clean").execute(context)
