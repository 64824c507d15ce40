"""Regenerate the Python stubs of the ``.proto`` files beside this module.

    python -m fedprompt.protocols.generate          # rewrite the committed stubs
    python -m fedprompt.protocols.generate --check  # exit 1 if they differ from what the .proto files give

Needs the dev extras (grpcio-tools and mypy-protobuf, pinned in pyproject.toml): the stubs depend on the
compiler's version, so a different one shows up as a difference here rather than at run time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The stubs import each other as fedprompt.protocols.*: map that virtual path onto this folder.
VIRTUAL = "fedprompt/protocols"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def proto_files() -> list[Path]:
    return sorted(HERE.glob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Compile every .proto into ``out`` (flat); returns the files written."""
    plugin_dir = Path(sys.executable).parent  # protoc-gen-mypy and protoc-gen-mypy_grpc live beside python
    env = {**os.environ, "PATH": f"{plugin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{VIRTUAL}={HERE}",
            f"--python_out={tmp}", f"--grpc_python_out={tmp}", f"--mypy_out={tmp}", f"--mypy_grpc_out={tmp}",
            *(f"{HERE}/{p.name}" for p in proto_files()),
        ]  # fmt: skip
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"protoc failed:\n{done.stderr}")
        written = []
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted((Path(tmp) / VIRTUAL).iterdir()):
            shutil.copyfile(f, out / f.name)
            written.append(out / f.name)
    return written


def committed() -> list[Path]:
    return sorted(p for p in HERE.iterdir() if p.name.endswith(SUFFIXES))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    if not args.check:
        for f in generate(HERE):
            print(f"wrote {f.relative_to(HERE.parent)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p.read_bytes() for p in generate(Path(tmp))}
    have = {p.name: p.read_bytes() for p in committed()}
    differ = sorted(n for n in fresh.keys() | have.keys() if fresh.get(n) != have.get(n))
    for n in differ:
        print(f"stale: protocols/{n}" if n in have else f"missing: protocols/{n}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
