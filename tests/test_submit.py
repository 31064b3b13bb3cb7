"""Which Delta engine and which launcher the Spark jobs get, decided from settings without starting
Spark: the embedded default never loads the jars; the cluster profile submits with them; a missing
piece is a one-line error saying how to get it."""

from __future__ import annotations

import pytest

from freshrec.jars import JarsMissing, coordinates, fetch, jar_name
from freshrec.settings import load_settings
from freshrec.spark import delta_spark_wanted
from freshrec.submit import SubmitError, command, submit


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
