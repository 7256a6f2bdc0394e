"""The wire schema: committed generated code matches the .proto, and the schema follows the style rules."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeguard import protogen
from pipeguard.v1 import pipeguard_pb2 as pb

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
GENERATED = sorted(p for p in (ROOT / "pipeguard").rglob("*_pb2*") if p.suffix in {".py", ".pyi"})
FIX = "run `python -m pipeguard.protogen` and commit the result"


def test_generated_code_matches_the_proto_files(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev dependency) is needed to regenerate")
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in protogen.generate(tmp_path)}
    committed = {p.relative_to(ROOT): p.read_bytes() for p in GENERATED}

    assert fresh, "protoc generated nothing"
    missing = sorted(str(p) for p in fresh.keys() - committed.keys())
    stale = sorted(str(p) for p in committed.keys() - fresh.keys())
    assert not missing, f"generated files not committed: {missing}; {FIX}"
    assert not stale, f"committed files no .proto generates any more: {stale}; delete them and {FIX}"
    drifted = sorted(str(p) for p in fresh if fresh[p] != committed[p])
    assert not drifted, f"{drifted} differ from what protos/ generates; {FIX}"


def _all_enums():
    def walk(messages):
        for m in messages:
            yield from m.enum_types
            yield from walk(m.nested_types)

    yield from pb.DESCRIPTOR.enum_types_by_name.values()
    yield from walk(pb.DESCRIPTOR.message_types_by_name.values())


@pytest.mark.parametrize("enum", list(_all_enums()), ids=lambda e: e.name)
def test_enum_zero_is_unspecified(enum):
    zero = enum.values_by_number.get(0)
    assert zero is not None and zero.name.endswith("_UNSPECIFIED"), f"{enum.full_name}: value 0 must be *_UNSPECIFIED"
    prefix = zero.name.removesuffix("UNSPECIFIED")
    assert all(v.name.startswith(prefix) for v in enum.values), f"{enum.full_name}: values must share {prefix!r}"


def test_every_field_and_enum_value_has_a_comment():
    undocumented = []
    for proto in protogen.PROTO_FILES:
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            is_member = re.match(r"^(repeated\s+)?[\w.]+\s+\w+\s*=\s*\d+\s*;", stripped) or \
                re.match(r"^[A-Z][A-Z0-9_]*\s*=\s*\d+\s*;", stripped)
            if is_member and not lines[i - 1].strip().startswith("//") and "//" not in line:
                undocumented.append(f"{proto.name}:{i + 1}: {stripped}")
    assert not undocumented, "fields/enum values without a comment:\n" + "\n".join(undocumented)
