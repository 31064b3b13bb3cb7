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
    assert s.privacy.hmac_key.get_secret_value() == "freshrec-local-development-key"
    s2 = load_settings("local", env={"FRESHREC_HMAC_KEY": "a-much-better-key"})
    assert s2.privacy.hmac_key.get_secret_value() == "a-much-better-key"


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
    s = load_settings("cluster", env=REAL)
    assert (s.spark.master, s.spark.submit, s.delta.backend) == \
        ("spark://127.0.0.1:7077", True, "spark")
    s = load_settings("cluster", env={**REAL, "SPARK_MASTER": "spark://10.0.0.5:7077"})
    assert s.spark.master == "spark://10.0.0.5:7077"


def test_missing_profile_file_is_clear():
    with pytest.raises(SettingsError, match="nosuch.yaml does not exist"):
        load_settings("nosuch", env={})


def test_device_cpu_and_auto_without_gpu_and_cuda_refused():
    from freshrec.device import DeviceUnavailable, resolve_device
    from recmodels.index import gpu_count

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


# ---- secrets ------------------------------------------------------------------------------
REAL = {"FRESHREC_DATA_DIR": "/tmp/freshrec-x", "FRESHREC_HMAC_KEY": "a-real-key-of-32-characters-xyz0",
        "FRESHREC_ADMIN_TOKEN": "a-real-admin-token"}


def test_cluster_profile_starts_with_real_secrets_and_has_no_dev_tokens():
    s = load_settings("cluster", env=REAL)
    assert s.serving.tokens == [] and s.refresher.bearer() == "a-real-admin-token"


@pytest.mark.parametrize("env, named", [
    ({"FRESHREC_HMAC_KEY": ""}, r"privacy\.hmac_key is not set.*FRESHREC_HMAC_KEY"),
    ({"FRESHREC_HMAC_KEY": "freshrec-local-development-key"},
     r"refuses the development value of privacy\.hmac_key.*file hmac_key"),
    ({"FRESHREC_ADMIN_TOKEN": "dev-admin-token"}, r"development value of refresher\.token"),
])
def test_other_profiles_refuse_dev_or_missing_secrets_naming_the_setting(env, named):
    with pytest.raises(SettingsError, match=named) as e:
        load_settings("cluster", env={**REAL, **env})
    assert "\n" not in str(e.value)  # the CLI prints it on one line


def test_other_profiles_refuse_the_dev_token_hashes(tmp_path: Path):
    from freshrec.settings import DEV_TOKEN_SHA256

    dev = next(iter(DEV_TOKEN_SHA256))
    with pytest.raises(SettingsError, match=r"serving\.tokens\[0\] \(ops\).*development token"):
        load_settings("cluster", env=REAL,
                      serving={"tokens": [{"name": "ops", "role": "admin", "sha256": dev}]})


def test_secrets_dir_files_are_used_and_loose_modes_refused(tmp_path: Path):
    d = tmp_path / "secrets"
    d.mkdir(mode=0o700)
    (d / "hmac_key").write_text("key-from-the-secrets-directory\n")
    (d / "admin_token").write_text("token-from-file")
    for f in d.iterdir():
        f.chmod(0o600)
    env = {"FRESHREC_DATA_DIR": "/tmp/x", "FRESHREC_SECRETS_DIR": str(d)}
    s = load_settings("cluster", env=env)
    assert s.privacy.hmac_key.get_secret_value() == "key-from-the-secrets-directory"
    assert s.refresher.token.get_secret_value() == "token-from-file"
    # never in repr, str or a dump
    for text in (repr(s), str(s), repr(s.model_dump()), s.model_dump_json()):
        assert "key-from-the-secrets-directory" not in text and "token-from-file" not in text
    (d / "hmac_key").chmod(0o640)
    with pytest.raises(SettingsError, match=r"hmac_key is readable by group or others.*chmod 600"):
        load_settings("cluster", env=env)


def test_a_bad_secret_value_is_not_echoed_in_the_error():
    with pytest.raises(SettingsError) as e:
        load_settings("local", env={}, refresher={"token": ["not", "a-string-secret-xyz"]})
    assert "a-string-secret-xyz" not in str(e.value) and "refresher.token" in str(e.value)


@pytest.mark.parametrize("tls, named", [
    ({"tls_cert_file": "/x/cert.pem"}, r"serving\.tls_cert_file is set but serving\.tls_key_file"),
    ({"tls_key_file": "/x/key.pem"}, r"serving\.tls_key_file is set but serving\.tls_cert_file"),
    ({"tls_client_ca_file": "/x/ca.pem"}, r"tls_client_ca_file is set without"),
])
def test_half_configured_tls_is_refused(tls, named):
    with pytest.raises(SettingsError, match=named):
        load_settings("local", env={}, serving=tls)


def test_pseudonym_chain_rekeys_without_raw_ids():
    from freshrec.privacy.pseudonyms import pseudonymize, rekey

    old = pseudonymize("alice", "base-key-0123456789")
    new = pseudonymize("alice", "base-key-0123456789", ["rotation-key-1"])
    assert new == rekey(old, "rotation-key-1") and new != old
    assert pseudonymize("bob", "base-key-0123456789", ["rotation-key-1"]) != new


# ---- environment overrides, settings folders, data_dir URIs (issue 15) ---------------------------

def test_env_override_keeps_text_settings_as_text():
    """Digits given to a text setting stay text (YAML would make them a number and be refused)."""
    env = {"FRESHREC__PRIVACY__HMAC_KEY": "1234567890123456", "FRESHREC__MLFLOW__EXPERIMENT": "2026",
           "FRESHREC__SERVING__MODEL": '"7"', "FRESHREC__SPARK__DRIVER_MEMORY": "2048",
           "FRESHREC__SERVING__PORT": "50099", "FRESHREC__SERVING__JSON_LOGS": "false",
           "FRESHREC__EVALUATION__MODELS": "[als, ease]"}
    s = load_settings("local", env=env)
    assert s.privacy.hmac_key.get_secret_value() == "1234567890123456"
    assert s.mlflow.experiment == "2026" and s.spark.driver_memory == "2048"
    assert s.serving.model == "7"  # a quoted YAML string is unquoted
    # typed settings still parse: numbers, booleans, lists
    assert s.serving.port == 50099 and s.serving.json_logs is False
    assert s.evaluation.models == ["als", "ease"]


def test_env_override_keeps_the_case_of_map_keys():
    env = {"FRESHREC__SPARK__EXTRA_CONF__spark.sql.adaptive.coalescePartitions.enabled": "false",
           "FRESHREC__Events__TYPES__AddToCart": "3.5"}
    s = load_settings("local", env=env)
    assert s.spark.extra_conf == {"spark.sql.adaptive.coalescePartitions.enabled": "false"}
    assert s.events.types == {"AddToCart": 3.5}  # an env map replaces the map, key case kept


def test_env_override_of_an_unknown_key_names_it():
    with pytest.raises(SettingsError, match=r"serving\.no_such_key: unknown setting"):
        load_settings("local", env={"FRESHREC__SERVING__NO_SUCH_KEY": "1"})


def test_s3_data_dir_is_kept_as_a_uri_and_refused_where_a_folder_is_needed():
    s = load_settings("local", env={"FRESHREC_DATA_DIR": "s3://bucket/x"})
    assert s.data_uri == "s3://bucket/x"
    with pytest.raises(SettingsError, match=r"paths\.data_dir is the object-store URI s3://bucket/x"
                                            r".*set paths\.local_dir \(FRESHREC__PATHS__LOCAL_DIR\)"):
        s.data_dir  # noqa: B018
    assert s.tables_uri == "s3://bucket/x/tables"
    with pytest.raises(ValueError, match="gs:// scheme is not supported"):
        load_settings("local", env={"FRESHREC_DATA_DIR": "gs://bucket/x"})
    assert load_settings("local", env={"FRESHREC_DATA_DIR": "file:///tmp/fr%20data"}).data_dir == \
        Path("/tmp/fr data")


def test_settings_folder_is_found_in_conf_dir_env_then_cwd_then_user_config(tmp_path, monkeypatch):
    from freshrec.settings import PACKAGE_CONF_DIR, find_conf_dir

    base = (PACKAGE_CONF_DIR / "base.yaml").read_text()
    work, home, explicit = tmp_path / "work", tmp_path / "home", tmp_path / "explicit"
    for d in (work / "conf", home / ".config" / "freshrec", explicit):
        d.mkdir(parents=True)
        (d / "base.yaml").write_text(base.replace("experiment: freshrec-batch",
                                                  f"experiment: from-{d.parent.name}"))
        (d / "local.yaml").write_text("{}\n")
    env = {"HOME": str(home)}
    assert find_conf_dir(env, cwd=tmp_path) == (home / ".config" / "freshrec", "the user config folder")
    assert find_conf_dir(env, cwd=work) == (work / "conf", "the working directory")
    assert find_conf_dir({**env, "FRESHREC_CONF_DIR": str(explicit)}, cwd=work)[0] == explicit
    assert find_conf_dir({"HOME": str(tmp_path)}, cwd=tmp_path) == (PACKAGE_CONF_DIR,
                                                                    "the package defaults")
    monkeypatch.chdir(work)
    assert load_settings("local", env=env).mlflow.experiment == "from-work"
