"""Regenerate the checked-in Python modules of the `.proto` files beside this file.

`python -m imagestream.service.proto.generate [OUT_DIR]` (default: this directory). The modules
are checked in so that installing and running the server needs neither grpcio-tools nor a build
step; a unit test regenerates them into a temporary directory and fails when they differ, so
they never drift from the `.proto` files. The `.pyi` stubs come from mypy-protobuf, which is how
`mypy --strict` types the generated code.
"""

from __future__ import annotations

import shutil
import sys
from importlib import resources
from pathlib import Path

#: The `.proto` files, relative to the source root: their paths make the generated modules
#: import each other as `imagestream.service.proto.*`, not as top-level modules.
PROTOS = ("imagestream/service/proto/streaming.proto", "imagestream/service/proto/version.proto")
HERE = Path(__file__).resolve().parent
SOURCE_ROOT = HERE.parents[2]


def generate(out_root: Path) -> None:
    """Write `*_pb2.py`, `*_pb2_grpc.py` and their `.pyi` stubs under `out_root`, laid out as
    the source root is (`out_root/imagestream/service/proto/`)."""
    from grpc_tools import protoc  # noqa: PLC0415 (a build tool, not a run-time dependency)

    include = resources.files("grpc_tools") / "_proto"
    (out_root / "imagestream/service/proto").mkdir(parents=True, exist_ok=True)
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{SOURCE_ROOT}",
            f"-I{include}",
            f"--python_out={out_root}",
            f"--mypy_out={out_root}",
            f"--grpc_python_out={out_root}",
            f"--mypy_grpc_out={out_root}",
            # mypy-protobuf's plugins, installed beside this interpreter (PATH may not say so).
            *(f"--plugin={name}={_plugin(name)}" for name in _MYPY_PLUGINS),
            *(str(SOURCE_ROOT / proto) for proto in PROTOS),
        ]
    )
    if status != 0:
        raise SystemExit(f"protoc failed with status {status}")


_MYPY_PLUGINS = ("protoc-gen-mypy", "protoc-gen-mypy_grpc")


def _plugin(name: str) -> str:
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else shutil.which(name) or name


def main() -> None:
    """Regenerate into the source root, or into the directory given as the only argument."""
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else SOURCE_ROOT)


if __name__ == "__main__":
    main()
