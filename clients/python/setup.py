"""Packaging of strata_client, the Python client of a Strata server.

The gRPC stubs are generated here, at build/install time, from the repository's proto/ directory
(never committed). Install offline on Debian 12 (python3-grpcio, python3-protobuf, protobuf-compiler,
protobuf-compiler-grpc):

    /usr/bin/python3 -m venv --system-site-packages .venv
    .venv/bin/pip install --no-build-isolation ./clients/python

There is deliberately no pyproject.toml: with one, pip would build in an isolated environment and
try to download setuptools from PyPI. Without it, pip builds with the setuptools already installed.

Code generation, first that works:
  1. protoc + the gRPC Python plugin: $STRATA_PROTOC (default `protoc` on PATH) and
     $STRATA_GRPC_PYTHON_PLUGIN (default `grpc_python_plugin` on PATH, /usr/bin/grpc_python_plugin);
  2. `python -m grpc_tools.protoc` (grpcio-tools), when protoc or the plugin is missing.
The proto directory: $STRATA_PROTO_DIR, else ./proto, else ../../proto (the repository's).
The generated modules are checked to import with the installed protobuf before anything is built.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build_py import build_py
from setuptools.command.egg_info import egg_info

HERE = Path(__file__).resolve().parent
PACKAGE = "strata_client"
GENERATED = HERE / PACKAGE / "_proto"
# Every .proto the client needs, relative to the proto directory.
PROTOS = [
    "strata/v1/common.proto",
    "strata/v1/adaptation.proto",
    "strata/v1/inference.proto",
    "strata/v1/admin.proto",
    "grpc/health/v1/health.proto",
]


def _version() -> str:
    text = (HERE / PACKAGE / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__ = "([^"]+)"', text, re.M)
    if not match:
        raise RuntimeError("no __version__ in strata_client/__init__.py")
    return match.group(1)


def _proto_dir() -> Path:
    candidates = []
    if os.environ.get("STRATA_PROTO_DIR"):
        candidates.append(Path(os.environ["STRATA_PROTO_DIR"]))
    candidates += [HERE / "proto", HERE.parent.parent / "proto"]
    for c in candidates:
        if (c / PROTOS[0]).is_file():
            return c.resolve()
    raise RuntimeError(
        "strata_client: cannot find the .proto files (looked in "
        + ", ".join(str(c) for c in candidates)
        + "); install from a Strata checkout (pip install ./clients/python) or set STRATA_PROTO_DIR"
    )


def _protoc_command(proto_dir: Path, out: Path) -> list[str]:
    protoc = os.environ.get("STRATA_PROTOC") or shutil.which("protoc")
    plugin = (
        os.environ.get("STRATA_GRPC_PYTHON_PLUGIN")
        or shutil.which("grpc_python_plugin")
        or ("/usr/bin/grpc_python_plugin" if os.path.exists("/usr/bin/grpc_python_plugin") else None)
    )
    args = [f"-I{proto_dir}", f"--python_out={out}", f"--grpc_python_out={out}"]
    if protoc and plugin:
        return [protoc, f"--plugin=protoc-gen-grpc_python={plugin}", *args, *PROTOS]
    try:
        import grpc_tools  # noqa: F401  (grpcio-tools)
    except ImportError:
        raise RuntimeError(
            "strata_client: generating the gRPC stubs needs protoc and grpc_python_plugin "
            "(Debian: apt-get install protobuf-compiler protobuf-compiler-grpc) or grpcio-tools; "
            f"found protoc={protoc or 'none'}, grpc_python_plugin={plugin or 'none'}"
        ) from None
    return [sys.executable, "-m", "grpc_tools.protoc", *args, *PROTOS]


def _flatten(tree: Path, dest: Path) -> None:
    """Copies the generated modules of `tree` into one flat package `dest`, rewriting the absolute
    imports between them (`from strata.v1 import common_pb2`) into relative ones: a top-level
    `strata` or `grpc.health` package would clash with other code (`grpc` is grpcio itself)."""
    dest.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(r"^from (?:strata\.v1|grpc\.health\.v1) import ", re.M)
    for proto in PROTOS:
        stem = proto[: -len(".proto")]
        for suffix in ("_pb2.py", "_pb2_grpc.py"):
            src = tree / (stem + suffix)
            if not src.exists():
                continue
            text = pattern.sub("from . import ", src.read_text(encoding="utf-8"))
            (dest / src.name).write_text(text, encoding="utf-8")
    (dest / "__init__.py").write_text(
        '"""gRPC stubs generated from proto/ by setup.py at build time (not committed)."""\n',
        encoding="utf-8",
    )


def _check_imports(package_dir: Path) -> None:
    """Imports every generated *_pb2 module in a fresh interpreter, so that code from a protoc too
    new for the installed protobuf fails the build with a clear message instead of at first use."""
    try:
        import google.protobuf  # noqa: F401
    except ImportError:
        print("strata_client: protobuf is not installed here; skipping the import check")
        return
    modules = [p.stem for p in package_dir.glob("*_pb2.py")]
    code = "import importlib\n" + "".join(
        f"importlib.import_module('{package_dir.name}.{m}')\n" for m in modules
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=package_dir.parent, capture_output=True, text=True
    )
    if result.returncode != 0:
        import google.protobuf as pb

        raise RuntimeError(
            "strata_client: the generated stubs do not import with the installed protobuf "
            f"{pb.__version__} (is protoc newer than the protobuf runtime?):\n{result.stderr}"
        )


_generated_here = False


def generate_stubs(verbose: bool = True, force: bool = False) -> Path:
    """Generates strata_client/_proto from the .proto files (once per process unless `force`);
    returns the package directory."""
    global _generated_here
    if _generated_here and not force:
        return GENERATED
    _generated_here = True
    proto_dir = _proto_dir()
    with tempfile.TemporaryDirectory(prefix="strata-protos-") as tmp:
        tree = Path(tmp) / "tree"
        tree.mkdir()
        cmd = _protoc_command(proto_dir, tree)
        if verbose:
            print("strata_client: " + " ".join(cmd))
        subprocess.run(cmd, check=True)
        check_pkg = Path(tmp) / "strata_proto_check"
        _flatten(tree, check_pkg)
        _check_imports(check_pkg)
        if GENERATED.exists():
            shutil.rmtree(GENERATED)
        _flatten(tree, GENERATED)
    return GENERATED


class BuildProtos(Command):
    """`python setup.py build_protos`: generate the stubs in place (to run from the source tree)."""

    description = "generate strata_client/_proto from the .proto files"
    user_options: list = []

    def initialize_options(self) -> None:
        pass

    def finalize_options(self) -> None:
        pass

    def run(self) -> None:
        generate_stubs(force=True)


class BuildPyWithProtos(build_py):
    """build_py that generates the stubs first (pip install, bdist_wheel)."""

    def run(self) -> None:
        generate_stubs()
        super().run()


class EggInfoWithProtos(egg_info):
    """egg_info (pip's metadata step, and editable installs) needs the generated package to exist."""

    def run(self) -> None:
        generate_stubs()
        super().run()


setup(
    name="strata-client",
    version=_version(),
    description="Python client of the Strata continual-adaptation server (gRPC)",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=[PACKAGE, f"{PACKAGE}._proto"],
    python_requires=">=3.8",
    # Debian 12: python3-grpcio 1.51 and python3-protobuf (4.)3.21, seen by a venv made with
    # --system-site-packages, satisfy these without any download.
    install_requires=["grpcio>=1.40", "protobuf>=3.20"],
    entry_points={"console_scripts": ["strata-py = strata_client.__main__:main"]},
    cmdclass={
        "build_py": BuildPyWithProtos,
        "egg_info": EggInfoWithProtos,
        "build_protos": BuildProtos,
    },
    zip_safe=False,
)
