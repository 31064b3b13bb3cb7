"""The freshrec.v1 gRPC API: ``.proto`` sources in ``freshrec/v1/``, Python stubs generated next to them.

The stubs are generated at build time (``setup.py``'s build_py runs :func:`generate` into the
wheel), so an installed freshrec imports them as they are. protoc is given the ``.proto`` files by
their path from the source root (the directory holding ``freshrec/``), so the generated modules
import each other as ``freshrec.api.proto.freshrec.v1.*``: no rewriting of generated code, and the
proto package keeps its name (``freshrec.v1``, the services' wire names). In a source checkout,
``make proto`` generates them; :func:`stubs` also does when they are missing or older than the
``.proto`` files.

This module imports only the standard library at the top, so ``setup.py`` can load it from its path.
"""

from __future__ import annotations

import importlib
import sys
import threading
from pathlib import Path
from types import ModuleType

PROTO_ROOT = Path(__file__).resolve().parent
API = PROTO_ROOT / "freshrec" / "v1"
MODULES = ("recommender_pb2", "recommender_pb2_grpc", "admin_pb2", "admin_pb2_grpc")
_lock = threading.Lock()


def sources(api: Path = API) -> list[Path]:
    return sorted(api.glob("*.proto"))


def _stale(api: Path = API) -> bool:
    """Missing stubs; in a source checkout also stubs older than their .proto (an installed
    package's file times say nothing: its stubs were built from its own .proto files)."""
    srcs = sources(api)
    outputs = [api / f"{p.stem}_pb2_grpc.py" for p in srcs]
    checkout = (PROTO_ROOT.parents[2] / "pyproject.toml").is_file()
    return not all(o.exists() and (not checkout or o.stat().st_mtime >= p.stat().st_mtime)
                   for o, p in zip(outputs, srcs))


def generate(root: Path | None = None) -> list[Path]:
    """Run protoc (python, pyi and grpc outputs) on ``root/freshrec/api/proto/freshrec/v1/*.proto``,
    writing the modules next to them. ``root`` is the directory holding ``freshrec/`` (default:
    this source tree's; the build passes its build folder). Returns the files written."""
    from grpc_tools import protoc

    root = Path(root) if root else PROTO_ROOT.parents[2]
    api = root / "freshrec" / "api" / "proto" / "freshrec" / "v1"
    srcs = sources(api)
    if not srcs:
        raise RuntimeError(f"no .proto files in {api}")
    include = str(Path(protoc.__file__).parent / "_proto")
    args = ["protoc", f"-I{root}", f"-I{include}", f"--python_out={root}", f"--pyi_out={root}",
            f"--grpc_python_out={root}", *[str(p.relative_to(root)) for p in srcs]]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {[str(p) for p in srcs]}")
    return sorted(api.glob("*_pb2*.py*"))


def stubs() -> dict[str, ModuleType]:
    """The generated modules: recommender_pb2(_grpc), admin_pb2(_grpc)."""
    with _lock:
        if _stale():
            try:
                generate()
            except ImportError:
                raise RuntimeError(f"the gRPC stubs in {API} are missing or older than the .proto "
                                   "files, and grpcio-tools is not installed to generate them: "
                                   "pip install grpcio-tools, then run `make proto`") from None
    base = f"{__name__}.freshrec.v1"
    return {name: importlib.import_module(f"{base}.{name}") for name in MODULES}


if __name__ == "__main__":
    written = generate()
    print(f"generated {[p.name for p in written]} in {API}", file=sys.stderr)
