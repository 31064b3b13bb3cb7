"""Build hooks (metadata lives in setup.cfg): the wheel carries the gRPC stubs, generated here
from the .proto files, and the default settings (conf/*.yaml, conf/alerts) as package data in
freshrec/_conf, where freshrec.settings looks when it is not run from a source checkout."""

import importlib.util
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildWithStubsAndConf(build_py):
    def run(self):
        super().run()
        if self.editable_mode:  # a source checkout generates its stubs with `make proto`
            return
        out = Path(self.build_lib)
        shutil.copytree(HERE / "conf", out / "freshrec" / "_conf", dirs_exist_ok=True)
        spec = importlib.util.spec_from_file_location("_freshrec_proto",
                                                      HERE / "freshrec" / "api" / "proto" / "__init__.py")
        proto = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(proto)
        for f in proto.generate(out):
            print(f"generated {f.relative_to(out)}")


setup(cmdclass={"build_py": BuildWithStubsAndConf})
