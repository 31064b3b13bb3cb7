"""The package installs anywhere: a wheel built from the source files alone (no stubs generated
beforehand) carries the default settings and the gRPC stubs; installed into a fresh virtual
environment, its ``freshrec`` runs from another directory, finds its settings (package defaults,
then the user config folder, then ./conf) and imports the stubs without generating anything."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    # the source as git has it (tracked and new files, nothing ignored: no generated stubs)
    files = _run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                 cwd=ROOT).stdout.split("\0")
    src = tmp / "src"
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    assert not list((src / "serving" / "proto").rglob("*_pb2*.py"))
    # --no-build-isolation: the build requirements (setuptools, grpcio-tools) come from this venv
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "-w", tmp / "dist", src])
    wheel = next((tmp / "dist").glob("freshrec-*.whl"))
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    site = Path(_run([venv / "bin" / "python", "-c", "import sysconfig; "
                      "print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # the dependencies (numpy, grpc, ...) from this venv, after the new venv's own packages; a
    # path in a .pth file does not run that folder's .pth files, so this venv's editable
    # freshrec stays out
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q",
          "--no-deps", "--no-index", wheel])
    return {"wheel": wheel, "venv": venv, "site": site, "tmp": tmp}


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FRESHREC") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "HOME": str(home), "XDG_CONFIG_HOME": ""}


def test_the_wheel_carries_settings_protos_and_built_stubs(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    for f in ("freshrec/_conf/base.yaml", "freshrec/_conf/local.yaml", "freshrec/_conf/cluster.yaml",
              "freshrec/api/proto/freshrec/v1/recommender.proto",
              "freshrec/api/proto/freshrec/v1/admin.proto",
              "freshrec/api/proto/freshrec/v1/recommender_pb2.py",
              "freshrec/api/proto/freshrec/v1/recommender_pb2_grpc.py",
              "freshrec/api/proto/freshrec/v1/admin_pb2_grpc.py"):
        assert f in names, f
    grpc_stub = zipfile.ZipFile(installed["wheel"]).read(
        "freshrec/api/proto/freshrec/v1/admin_pb2_grpc.py").decode()
    assert "from freshrec.api.proto.freshrec.v1 import admin_pb2" in grpc_stub  # no rewriting needed
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = {ln.split(":", 1)[1].split()[0].split(";")[0].split(">")[0].split("=")[0].strip()
                for ln in zipfile.ZipFile(installed["wheel"]).read(meta).decode().splitlines()
                if ln.startswith("Requires-Dist:") and "extra ==" not in ln}
    assert {"typer", "rich", "pydantic-settings", "pydantic", "pyyaml"} <= requires


def test_the_installed_cli_runs_from_another_directory(installed, tmp_path):
    venv, site = installed["venv"], installed["site"]
    work, home = tmp_path / "elsewhere", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    freshrec = venv / "bin" / "freshrec"
    r = _run([freshrec, "--version"], cwd=work, env=_env(home))
    assert r.stdout.strip() == "freshrec 0.1.0"
    # settings: the package defaults; relative data_dir from the working directory
    cfg = json.loads(_run([freshrec, "config", "--json"], cwd=work, env=_env(home)).stdout)
    assert cfg["conf_source"] == "the package defaults"
    assert Path(cfg["conf_dir"]) == site / "freshrec" / "_conf"
    assert cfg["data_dir"] == str(work / "data") and cfg["profile"] == "local"
    # a user config folder wins over the package defaults, ./conf over both
    user = home / ".config" / "freshrec"
    user.mkdir(parents=True)
    base = (site / "freshrec" / "_conf" / "base.yaml").read_text()
    (user / "base.yaml").write_text(base.replace("experiment: freshrec-batch", "experiment: mine"))
    (user / "local.yaml").write_text((site / "freshrec" / "_conf" / "local.yaml").read_text())
    cfg = json.loads(_run([freshrec, "config", "--json"], cwd=work, env=_env(home)).stdout)
    assert cfg["conf_source"] == "the user config folder"
    assert cfg["settings"]["mlflow"]["experiment"] == "mine"
    shutil.copytree(user, work / "conf")
    (work / "conf" / "base.yaml").write_text(base.replace("experiment: freshrec-batch",
                                                          "experiment: here"))
    cfg = json.loads(_run([freshrec, "config", "--json"], cwd=work, env=_env(home)).stdout)
    assert cfg["conf_source"] == "the working directory"
    assert cfg["settings"]["mlflow"]["experiment"] == "here"
    # the installed freshrec is the one that runs, and its stubs import as built
    r = _run([venv / "bin" / "python", "-c", "import freshrec, freshrec.api.proto as p; m = p.stubs(); "
              "print(freshrec.__file__); print(m['recommender_pb2'].__file__); "
              "print(m['recommender_pb2'].DESCRIPTOR.services_by_name['Recommender'].full_name)"],
             cwd=work, env=_env(home))
    fr, stub, service = r.stdout.split()
    assert Path(fr).is_relative_to(site) and Path(stub).is_relative_to(site)
    assert service == "freshrec.v1.Recommender"
    # a usage error from the installed command: exit 2, one line
    r = subprocess.run([freshrec, "report", "--date", "2026-13-01"], cwd=work, env=_env(home),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
