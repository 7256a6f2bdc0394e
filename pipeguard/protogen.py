"""Regenerate the protobuf/gRPC Python code in ``pipeguard/v1`` from ``protos/``.

Run ``python -m pipeguard.protogen`` after editing a ``.proto`` file and commit the result;
``tests/test_protos.py`` regenerates into a temporary folder and fails on any drift.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
PROTO_FILES = sorted(PROTO_DIR.rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) over every .proto file, writing into ``out_dir``."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(PROTO_DIR)) for p in PROTO_FILES],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted(p for p in (out_dir / "pipeguard").rglob("*_pb2*") if p.suffix in {".py", ".pyi"})


def main() -> int:
    written = generate(ROOT)
    for path in written:
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
