from pathlib import Path

import pytest

from freshrec.settings import PROJECT_ROOT, SettingsError, load_settings


def test_local_profile_loads_with_defaults():
    s = load_settings("local", env={})
    assert s.profile == "local"
    assert s.events.types["purchase"] > s.events.types["view"]
    assert s.data_dir.is_absolute()
    assert s.mlflow_tracking_uri.startswith("sqlite:///")


def test_env_expansion_and_default(tmp_path: Path):
    s = load_settings("local", env={"FRESHREC_DATA_DIR": str(tmp_path)})
    assert s.data_dir == tmp_path
    assert s.privacy.hmac_key == "freshrec-local-development-key"
    s2 = load_settings("local", env={"FRESHREC_HMAC_KEY": "a-much-better-key"})
    assert s2.privacy.hmac_key == "a-much-better-key"


def test_environment_override_is_typed():
    s = load_settings("local", env={"FRESHREC__ALS__RANK": "32", "FRESHREC__SPARK__MASTER": "local[2]"})
    assert s.als.rank == 32
    assert s.spark.master == "local[2]"


def test_unknown_key_is_rejected_with_its_name():
    with pytest.raises(SettingsError, match=r"als\.rnak: unknown setting"):
        load_settings("local", env={"FRESHREC__ALS__RNAK": "8"})


def test_bad_value_names_the_key():
    with pytest.raises(SettingsError, match=r"als\.rank"):
        load_settings("local", env={"FRESHREC__ALS__RANK": "0"})


def test_missing_variable_without_default_says_what_to_export(tmp_path):
    import shutil

    shutil.copy(PROJECT_ROOT / "conf" / "base.yaml", tmp_path / "base.yaml")
    (tmp_path / "shared.yaml").write_text("paths:\n  data_dir: ${FRESHREC_DATA_DIR}\n")
    with pytest.raises(SettingsError, match="export FRESHREC_DATA_DIR"):
        load_settings("shared", conf_dir=tmp_path, env={})


def test_cluster_profile_submits_to_the_loopback_master_with_delta_spark():
    s = load_settings("cluster", env={})
    assert (s.spark.master, s.spark.submit, s.delta.backend) == \
        ("spark://127.0.0.1:7077", True, "spark")
    s = load_settings("cluster", env={"SPARK_MASTER": "spark://10.0.0.5:7077"})
    assert s.spark.master == "spark://10.0.0.5:7077"


def test_missing_profile_file_is_clear():
    with pytest.raises(SettingsError, match="nosuch.yaml does not exist"):
        load_settings("nosuch", env={})


def test_device_cpu_and_auto_without_gpu_and_cuda_refused():
    from freshrec.device import DeviceUnavailable, resolve_device
    from serving.index import gpu_count

    assert resolve_device("cpu").name == "cpu"
    if gpu_count() == 0:
        assert resolve_device("auto").name == "cpu"
        with pytest.raises(DeviceUnavailable, match="gpu extra"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="auto, cpu or cuda"):
        resolve_device("tpu")


def test_json_log_lines():
    import json
    import logging

    from freshrec.logs import JsonFormatter

    rec = logging.LogRecord("freshrec.x", logging.INFO, __file__, 1, "hello %s", ("there",), None)
    rec.method = "Recommend"
    out = json.loads(JsonFormatter().format(rec))
    assert out["message"] == "hello there" and out["method"] == "Recommend"
    assert out["level"] == "INFO"
